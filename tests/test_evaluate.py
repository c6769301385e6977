"""Evaluation metrics: reconstruction statistics and the spliced cross-entropy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import identity_like

from sae_nb.dictionaries.architectures import NormalizedTopKSAE, SkipTopKSAE, TopKSAE
from sae_nb.training.evaluate import (
    ce_metrics,
    evaluate_dictionary,
    reconstruction_metrics,
    splice_loss,
)


class Identity(torch.nn.Module):
    """A stand-in dictionary that reconstructs perfectly."""

    def forward(self, x):
        return x


def tokens_for(model, n=3, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 200, (n, T), generator=g)


def test_reconstruction_metrics_match_a_direct_computation():
    sae = TopKSAE(8, 32, k=3)
    torch.nn.init.normal_(sae.b_enc)
    x = torch.randn(500, 8) * 2 + 1
    row, density = reconstruction_metrics(sae, x, batch_size=64)
    with torch.no_grad():
        f = sae.encode(x)
        err = (x - sae.decode(f)).pow(2).sum()
    assert row["mse"] == pytest.approx(float(err) / 500, rel=1e-5)
    assert row["fvu"] == pytest.approx(float(err / (x - x.mean(0)).pow(2).sum()), rel=1e-5)
    assert row["l0"] == pytest.approx(float((f != 0).sum(1).float().mean()), rel=1e-6)
    assert row["l1"] == pytest.approx(float(f.abs().sum(1).mean()), rel=1e-5)
    np.testing.assert_allclose(density, (f != 0).float().mean(0).numpy(), rtol=1e-6)
    assert row["frac_alive"] + row["frac_dead"] == pytest.approx(1.0)


def _random_weights(sae, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return sae


def test_fvu_of_openai_and_skip_topk_follows_the_papers_maths():
    """The reconstruction of OpenAI's TopK (Gao et al. 2024, their ``sparse_autoencoder`` code)
    and of sparsify's skip TopK, written out here from the maths, not through our classes."""
    D, F, K = 8, 32, 3
    x = torch.randn(300, D) * 3 + 2  # (N, D)

    def topk_relu(pre):
        v, i = pre.topk(K, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, i, torch.relu(v))

    def fvu(x_hat):
        return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())

    oa = _random_weights(NormalizedTopKSAE(D, F, k=K))
    W_enc, b_enc, W_dec, b_dec = (t.detach() for t in (oa.W_enc, oa.b_enc, oa.W_dec, oa.b_dec))
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)  # torch's default: unbiased, as in OpenAI's LN
    xn = (x - mu) / (std + 1e-5)
    f = topk_relu((xn - b_dec) @ W_enc + b_enc)  # encoder(x - pre_bias) + latent_bias
    x_hat = (f @ W_dec + b_dec) * std + mu  # decode, then undo the layer norm (no eps)
    row, _ = reconstruction_metrics(oa, x, batch_size=64)
    assert row["fvu"] == pytest.approx(fvu(x_hat), rel=1e-4)
    assert row["mse"] == pytest.approx(float((x - x_hat).pow(2).sum(1).mean()), rel=1e-4)
    assert row["l0"] == pytest.approx(float((f != 0).sum(1).float().mean()))

    sk = _random_weights(SkipTopKSAE(D, F, k=K), seed=1)
    W_enc, b_enc, W_dec, b_dec, W_skip = (t.detach() for t in (sk.W_enc, sk.b_enc, sk.W_dec,
                                                               sk.b_dec, sk.W_skip))
    f = topk_relu((x - b_dec) @ W_enc + b_enc)
    x_hat = f @ W_dec + b_dec + x @ W_skip.T  # sparsify: decode + x @ W_skip.mT
    row, _ = reconstruction_metrics(sk, x, batch_size=64)
    assert row["fvu"] == pytest.approx(fvu(x_hat), rel=1e-4)


@pytest.mark.parametrize("site", ["resid_out_layer1", "mlp_out_layer1", "attn_out_layer0",
                                  "mlp_in_layer2"])
def test_identity_splice_gives_the_clean_loss(llama, site):
    tokens = tokens_for(llama)
    clean, _ = splice_loss(llama, site, tokens, None)
    spliced, _ = splice_loss(llama, site, tokens, lambda a: a.clone())
    torch.testing.assert_close(spliced, clean)
    zero, _ = splice_loss(llama, site, tokens, torch.zeros_like)
    assert not torch.allclose(zero, clean)  # the splice really reaches the model
    m = ce_metrics(Identity(), llama, site, tokens)
    assert m["ce_spliced"] == pytest.approx(m["ce_clean"], rel=1e-6)
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert m["kl_div"] == pytest.approx(0.0, abs=1e-6)


def test_evaluate_dictionary_returns_one_row_with_every_metric(llama):
    sae = TopKSAE(32, 64, k=4)
    acts = torch.randn(200, 32)
    ev = evaluate_dictionary(sae, acts, model=llama, site="resid_out_layer1",
                             tokens=tokens_for(llama), splice_bos=False)
    assert len(ev.metrics) == 1
    for col in ("mse", "fvu", "l0", "l1", "frac_alive", "frac_dead", "ce_clean", "ce_spliced",
                "ce_zero_ablation", "ce_loss_recovered", "kl_div"):
        assert col in ev.metrics.columns
    assert 0 < ev.metrics["l0"].iloc[0] <= 4
    assert ev.density.shape == (64,)
    assert np.isfinite(ev.log10_density()).all()


# -- BOS in the splice follows how the dictionary was trained --------------------------------
SITE = "resid_out_layer1"


def hand_splice_logp(llama, dictionary, tokens, keep_id):
    """Next-token log-probs ``(B, T-1, V)`` with layer 1's output replaced by
    ``dictionary.reconstruct`` (``None``: the clean run), positions holding ``keep_id`` left
    clean: a plain torch forward hook on the transformers module, not sae_nb's nnsight splice."""
    hf = llama._module
    keep = torch.zeros_like(tokens, dtype=torch.bool) if keep_id is None else tokens == keep_id

    def hook(module, args, out):
        acts = out[0] if isinstance(out, tuple) else out
        new = torch.where(keep[..., None], acts, dictionary.reconstruct(acts))
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

    handle = hf.model.layers[1].register_forward_hook(hook) if dictionary is not None else None
    try:
        with torch.no_grad():
            logits = hf(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits
    finally:
        if handle is not None:
            handle.remove()
    return torch.log_softmax(logits[:, :-1].double(), -1)


def hand_splice_ce(llama, dictionary, tokens, keep_id):
    """Mean next-token CE of :func:`hand_splice_logp`."""
    logp = hand_splice_logp(llama, dictionary, tokens, keep_id)
    return float(-logp.gather(-1, tokens[:, 1:, None]).mean())


@pytest.mark.parametrize("exclude_bos", [True, False])
def test_splice_keeps_bos_clean_exactly_when_training_excluded_it(llama, corpus_dir, tmp_path,
                                                                 exclude_bos):
    from dataclasses import asdict

    import sae_nb

    (store,) = sae_nb.extract_activations(
        llama, tmp_path, sites=[SITE], corpus=str(corpus_dir), n_tokens=768, ctx_len=32,
        dtype="float32", exclude_bos=exclude_bos, progress=False).values()
    split = sae_nb.heldout_split(store, heldout_tokens=256, n_contexts=8)
    tokens = split.ce_tokens
    bos = llama.tokenizer.bos_token_id
    assert (tokens == bos).sum() > len(tokens)  # BOS opens each context and separates documents
    result = sae_nb.train_dictionary(
        split.train_batches(64), sae_nb.TrainConfig(architecture="topk", expansion=2, k=4,
                                                   total_tokens=128, device="cpu",
                                                   metadata=split.metadata(64)), progress=False)
    sae = result.dictionary
    expected = hand_splice_ce(llama, sae, tokens, bos if exclude_bos else None)
    other = hand_splice_ce(llama, sae, tokens, None if exclude_bos else bos)
    assert abs(expected - other) > 1e-3  # the BOS choice shows in the number

    def spliced(ev):
        return ev.metrics["ce_spliced"].item()

    acts = split.heldout_acts
    # A call without a BOS argument and notebook 02's call (the split's BOS id) follow the
    # training store.
    assert spliced(sae_nb.evaluate_dictionary(sae, acts, llama, SITE, tokens)) == \
        pytest.approx(expected, rel=1e-5)
    assert spliced(sae_nb.evaluate_dictionary(sae, acts, llama, SITE, tokens,
                                              bos_token_id=split.bos_token_id)) == \
        pytest.approx(expected, rel=1e-5)
    # Any dictionary, given the store it was trained on.
    bare = TopKSAE(32, 64, k=4)
    bare.load_state_dict(sae.state_dict())
    assert spliced(sae_nb.evaluate_dictionary(bare, acts, llama, SITE, tokens, store=store)) == \
        pytest.approx(expected, rel=1e-5)
    # A saved dictionary, from the train config saved with it.
    folder = sae_nb.save_dictionary(sae, tmp_path / "saved", model="tiny", site=SITE,
                                    train_config=asdict(result.config))
    loaded = sae_nb.load_sae_nb(folder)
    assert spliced(sae_nb.evaluate_dictionary(loaded, acts, llama, SITE, tokens)) == \
        pytest.approx(expected, rel=1e-5)
    # An explicit choice wins over the store.
    assert spliced(sae_nb.evaluate_dictionary(sae, acts, llama, SITE, tokens, store=store,
                                              splice_bos=exclude_bos)) == \
        pytest.approx(other, rel=1e-5)


# -- the downstream metrics' maths --------------------------------------------------------------
def tokens_with_bos(llama, n=3, T=16):
    """Random byte tokens, BOS at position 0 of each context and inside one (a document
    separator), as packed contexts hold them."""
    tokens = tokens_for(llama, n, T, seed=3)
    bos = llama.tokenizer.bos_token_id
    tokens[:, 0] = bos
    tokens[1, 7] = bos
    return tokens, bos


@pytest.mark.parametrize("keep_bos", [True, False])
def test_a_zero_dictionary_recovers_0_percent_and_a_perfect_one_100(llama, keep_bos):
    from sae_nb.dictionaries.architectures import ReLUSAE

    tokens, bos = tokens_with_bos(llama)
    keep = bos if keep_bos else None
    zero = ReLUSAE(32, 64)
    torch.nn.init.normal_(zero.b_enc)
    with torch.no_grad():
        zero.W_dec.zero_()
        zero.b_dec.zero_()  # the splice writes zeros: exactly the zero ablation
    m = ce_metrics(zero, llama, SITE, tokens, bos_token_id=keep)
    assert m["ce_spliced"] == m["ce_zero_ablation"]
    assert m["ce_loss_recovered"] == 0.0
    assert m["ce_clean"] == pytest.approx(hand_splice_ce(llama, None, tokens, None), rel=1e-6)
    perfect = identity_like(32)
    x = torch.randn(50, 32)
    with torch.no_grad():
        assert torch.equal(perfect(x), x)
    m = ce_metrics(perfect, llama, SITE, tokens, bos_token_id=keep)
    assert abs(m["ce_zero_ablation"] - m["ce_clean"]) > 0.01  # the denominator is not ~0
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-12)
    assert m["kl_div"] == pytest.approx(0.0, abs=1e-12)


def test_kl_is_clean_to_spliced_as_saelens_computes_it(llama):
    """SAELens (evals.get_recons_loss) and SAEBench report KL(clean || spliced):
    sum_v p_clean (log p_clean - log p_spliced), averaged over positions."""
    tokens, bos = tokens_with_bos(llama)
    sae = identity_like(32)
    with torch.no_grad():
        sae.W_dec.mul_(4.0)  # the splice writes 4x the activation: sharper next-token guesses
    m = ce_metrics(sae, llama, SITE, tokens, bos_token_id=bos)
    lp = hand_splice_logp(llama, None, tokens, None)  # clean, (B, T-1, V)
    lq = hand_splice_logp(llama, sae, tokens, bos)  # spliced, BOS kept clean
    kl_pq = float((lp.exp() * (lp - lq)).sum(-1).mean())
    kl_qp = float((lq.exp() * (lq - lp)).sum(-1).mean())
    # The direction matters here: the two differ by 2%, 2,000 times the tolerance below.
    assert abs(kl_pq - kl_qp) > 1000 * 1e-5 * kl_pq
    assert m["kl_div"] == pytest.approx(kl_pq, rel=1e-5)
    assert m["ce_spliced"] == pytest.approx(float(-lq.gather(-1, tokens[:, 1:, None]).mean()),
                                            rel=1e-5)


def test_width_mismatch_and_empty_rows_are_named(llama):
    """A width mismatch once surfaced as a raw tensor-size error from inside the encode."""
    from sae_nb.training.evaluate import EvaluationError

    sae = TopKSAE(32, 64, k=4)
    sae.metadata = {"site": "resid_out_layer1"}
    with pytest.raises(EvaluationError, match=r"shape \(10, 48\).*\(N, 32\).*'resid_out_layer1'"):
        evaluate_dictionary(sae, torch.randn(10, 48))
    with pytest.raises(EvaluationError, match="No activation rows"):
        evaluate_dictionary(sae, torch.randn(0, 32))
    with pytest.raises(EvaluationError, match="targets hold 5 rows but acts 10"):
        evaluate_dictionary(sae, torch.randn(10, 32), targets=torch.randn(5, 32))
