"""Per-sentence codes and the fit check, on a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import identity_like

import sae_nb
from sae_nb.dictionaries.architectures import ReLUSAE, TopKSAE
from sae_nb.texts.codes import sentence_codes
from sae_nb.training.evaluate import fit_check

TEXTS = ["the state of the union", "war and peace", "a new law for trade and work", "we must"]


def test_sentence_table_matches_a_direct_computation(llama):
    sae = TopKSAE(32, 64, k=4)
    torch.nn.init.normal_(sae.b_enc)
    res = sentence_codes(llama, sae, TEXTS, site="resid_out_layer1")
    pooled = sae_nb.pooled_activations(llama, TEXTS, ["resid_out_layer1"])["resid_out_layer1"]
    torch.testing.assert_close(res.acts, pooled)
    with torch.no_grad():
        torch.testing.assert_close(res.codes, sae.encode(pooled))
    table = res.table()
    assert list(table["sentence"]) == TEXTS
    torch.testing.assert_close(torch.tensor(table["act_mean"].values), pooled.mean(1))
    torch.testing.assert_close(torch.tensor(table["code_max"].values), res.codes.max(1).values)
    assert (table["code_argmax"].values == res.codes.argmax(1).numpy()).all()
    assert (table["code_l0"] <= 4).all()
    strongest = res.strongest_latents(3)
    assert res.codes.max(0).values[strongest[0]] == res.codes.max()


def test_fit_check_passes_a_good_dictionary_and_warns_on_a_bad_one(llama, corpus_dir):
    good = fit_check(identity_like(32), llama, corpus=str(corpus_dir), n_tokens=256, ctx_len=32)
    assert good["d_in_match"].item() and good["fvu"].item() < 1e-6
    bad = ReLUSAE(32, 64)
    bad.metadata = {"site": "resid_out_layer1"}
    with torch.no_grad():
        bad.b_dec.fill_(50.0)
    with pytest.warns(UserWarning, match="FVU .* > 1"):
        row = fit_check(bad, llama, corpus=str(corpus_dir), n_tokens=256, ctx_len=32)
    assert row["fvu"].item() > 1


def test_width_mismatch_is_reported(llama, corpus_dir):
    wrong = ReLUSAE(16, 32)
    wrong.metadata = {"site": "resid_out_layer1"}
    with pytest.warns(UserWarning, match="d_in=16"):
        row = fit_check(wrong, llama, corpus=str(corpus_dir), n_tokens=128, ctx_len=32)
    assert not row["d_in_match"].item()
    with pytest.raises(ValueError, match="16-wide"):
        sentence_codes(llama, wrong, TEXTS)
    with pytest.raises(ValueError, match="names no site"):
        sentence_codes(llama, ReLUSAE(32, 64), TEXTS)


def test_pooled_token_codes_encode_each_token_then_pool(llama):
    from sae_nb.texts.codes import pooled_token_codes

    sae = TopKSAE(32, 64, k=4)
    torch.nn.init.normal_(sae.b_enc)
    res = pooled_token_codes(llama, sae, TEXTS, site="resid_out_layer1", batch_size=3)
    tok = llama.tokenizer
    for i, text in enumerate(TEXTS):  # one sentence alone, by hand
        ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
        (site,) = sae_nb.activations.extract.resolve_sites(llama, ["resid_out_layer1"])
        acts = sae_nb.run_sites(llama, [site], ids, torch.ones_like(ids))[0][0, 1:]
        with torch.no_grad():
            torch.testing.assert_close(res.codes[i], sae.encode(acts).mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(res.acts[i], acts.mean(0), rtol=1e-4, atol=1e-5)
