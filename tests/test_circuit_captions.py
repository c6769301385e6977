"""Captions of a graph's latents: the tokens they promote, their top contexts and their rule
explanations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import plain_model_io

from sae_nb.activations.corpora import load_corpus, pack_contexts
from sae_nb.activations.models import hf_model
from sae_nb.circuits.captions import (
    latent_evidence,
    promoted_tokens,
    top_contexts,
    with_explanations,
)
from sae_nb.circuits.transcoder_set import TranscoderSet


def test_promoted_tokens_are_the_top_logits_of_the_decoder_row_alone(llama):
    """A residual stream holding only the latent's decoder row, run through the model's own
    final norm and head: its top logits (the norm's scale is one positive factor) are the
    tokens the latent promotes."""
    tset = TranscoderSet.random(llama, d_sae=16, k=4)
    hf = hf_model(llama)
    for layer, latent in [(0, 3), (2, 11)]:
        row = tset[layer].W_dec[latent].detach()
        with torch.no_grad():
            logits = hf.lm_head(hf.model.norm(row[None, None]))[0, 0]
        expected = [llama.tokenizer.decode([i]) for i in logits.topk(3).indices.tolist()]
        assert promoted_tokens(llama, tset, [(layer, latent)])[(layer, latent)] == expected


def test_top_contexts_hold_the_largest_activations_by_brute_force(llama, corpus_dir):
    tset = TranscoderSet.random(llama, d_sae=32, k=4, seed=3)
    wanted = [(0, 5), (1, 7), (2, 0)]
    found = top_contexts(llama, tset, wanted, n_tokens=640, ctx_len=32, corpus=str(corpus_dir),
                         n_top=3, window=4)
    packed = pack_contexts(load_corpus(str(corpus_dir)), llama.tokenizer, 32, 20, 1, True)
    ids = torch.from_numpy(packed.tokens.astype("int64"))
    seen = {i: x for i, (x, _) in enumerate(plain_model_io(llama, ids)[2])}
    for layer, latent in wanted:
        with torch.no_grad():
            acts = tset[layer].encode(seen[layer].reshape(-1, seen[layer].shape[-1]))[:, latent]
        acts = acts.reshape(ids.shape)
        acts[:, 0] = 0  # BOS left out
        expected = acts.flatten().topk(3).values
        expected = expected[expected > 0]
        got = found[(layer, latent)]
        assert len(got) == len(expected) > 0
        torch.testing.assert_close(torch.tensor([c["value"] for c in got]), expected,
                                   rtol=1e-4, atol=1e-5)
        for c in got:
            assert len(c["tokens"]) == len(c["acts"]) and c["acts"][c["center"]] == c["value"]


def test_rule_explanations_score_on_the_held_out_contexts_by_hand(llama, corpus_dir):
    """Each latent's rule, applied by hand to the last quarter of the contexts (BOS left out),
    gives the reported held-out F1 against the latent's firing there (brute-force codes), and
    only explanations that beat their control are shown."""
    tset = TranscoderSet.random(llama, d_sae=32, k=8, seed=3)
    wanted = [(0, i) for i in range(12)] + [(2, i) for i in range(12)]
    evidence = latent_evidence(llama, tset, wanted, n_tokens=1280, ctx_len=32,
                               corpus=str(corpus_dir))
    table = evidence.explanations
    assert sorted(zip(table["layer"], table["latent"])) == wanted
    packed = pack_contexts(load_corpus(str(corpus_dir)), llama.tokenizer, 32, 40, 1, True)
    ids = torch.from_numpy(packed.tokens.astype("int64"))
    mlp_in = [x for x, _ in plain_model_io(llama, ids)[2]]
    held = ids[30:]  # 40 contexts, the first 30 fit the rules
    tok, prev = held[:, 1:].flatten().numpy(), held[:, :-1].flatten().numpy()
    checked = 0
    for row in table.itertuples():
        if not row.rule:
            continue
        rule = json.loads(row.rule)
        with torch.no_grad():
            fires = (tset[row.layer].encode(mlp_in[row.layer][30:, 1:].reshape(-1, 32))
                     [:, row.latent] > 0).numpy()
        if rule["kind"] == "tokens":
            match = np.isin(tok, rule["items"])
        elif rule["kind"] == "prev_tokens":
            match = np.isin(prev, rule["items"])
        else:
            match = np.zeros(len(tok), bool)
            for p, t in rule["items"]:
                match |= (prev == p) & (tok == t)
        assert row.n_fired_heldout == fires.sum()
        if fires.sum():
            want = 2 * (match & fires).sum() / (fires.sum() + match.sum())
            assert row.f1 == pytest.approx(want, abs=1e-9), row
            checked += 1
    assert checked >= 10
    assert table["f1"].max() > 0.3  # some latent follows its tokens
    shown = [evidence.explanation(r.layer, r.latent) for r in table.itertuples()]
    for text, r in zip(shown, table.itertuples()):
        assert bool(text) == bool(r.beyond_noise and r.f1 > r.control)
        if text:
            assert text.startswith(r.explanation) and f"held-out F1 {r.f1:.2f}" in text
    assert any(shown)
    cards = with_explanations({(0, 1): "promotes 'a'"}, evidence)
    assert cards == {(0, 1): {"tokens": "promotes 'a'", "explanation": shown[1]}}
