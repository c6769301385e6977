"""Captions of a graph's latents: the tokens they promote and their top contexts."""

from __future__ import annotations

import torch
from conftest import plain_model_io

from sae_nb.activations.corpora import load_corpus, pack_contexts
from sae_nb.activations.models import hf_model
from sae_nb.circuits.captions import promoted_tokens, top_contexts
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
