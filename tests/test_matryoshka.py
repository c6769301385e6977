"""Matryoshka BatchTopK: the nested loss against a brute-force sum, one prefix equal to plain
BatchTopK bit for bit, training lowering every prefix's error, the save/load round trip, and
bad widths refused."""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from sae_nb.dictionaries.architectures import BatchTopKSAE, build_dictionary
from sae_nb.dictionaries.saving import load_sae_nb, save_dictionary
from sae_nb.training.objectives import (
    batchtopk_step,
    default_matryoshka_widths,
    matryoshka_prefix_losses,
)
from sae_nb.training.sparse_ops import batch_top
from sae_nb.training.trainer import TrainConfig, Training, TrainingError, train_dictionary

D, F, K = 16, 64, 4
WIDTHS = (8, 16, 32, 64)


def data(n=2048, d=D, seed=0, density=0.08) -> torch.Tensor:
    """Sparse combinations of a few hidden directions plus an offset: SAE-shaped data."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(48, d, generator=g)
    freq = torch.linspace(0.25, 0.01, 48)  # a few frequent features, many rare ones
    codes = (torch.rand(n, 48, generator=g)
             * (torch.rand(n, 48, generator=g) < freq * density / 0.08))
    return codes @ dirs + 0.5


def batches(x, batch=128, epochs=50):
    for _ in range(epochs):
        yield from x.split(batch)


def brute_force_loss(sae: BatchTopKSAE, x: torch.Tensor, widths) -> float:
    """Dense float64 loops: batch top-k over all B*F activations, then for every prefix width
    m the row-by-row reconstruction from latents j < m; the sum over prefixes of the mean over
    rows of the squared error summed over D."""
    W_enc, b_enc = sae.W_enc.detach().double().numpy(), sae.b_enc.detach().double().numpy()
    W_dec, b_dec = sae.W_dec.detach().double().numpy(), sae.b_dec.detach().double().numpy()
    X = x.double().numpy()
    acts = np.maximum((X - b_dec) @ W_enc + b_enc, 0.0)
    cut = np.sort(acts.ravel())[::-1][sae.k * len(X) - 1]
    f = np.where(acts >= cut, acts, 0.0)
    total = 0.0
    for m in widths:
        err = 0.0
        for i in range(len(X)):
            recon = b_dec.copy()
            for j in range(m):
                recon += f[i, j] * W_dec[j]
            err += ((X[i] - recon) ** 2).sum()
        total += err / len(X)
    return total


def random_sae(seed=0) -> BatchTopKSAE:
    g = torch.Generator().manual_seed(seed)
    sae = build_dictionary("batchtopk", D, F, k=K)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, F, generator=g) / D ** 0.5)
        sae.W_dec.copy_(torch.randn(F, D, generator=g) / D ** 0.5)
        sae.b_enc.copy_(torch.randn(F, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(D, generator=g) * 0.1)
    return sae


def test_loss_equals_brute_force_sum_over_prefixes():
    sae = random_sae()
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(1))
    for widths, sparse in itertools.product((WIDTHS, (5, 64), (64,)), (False, True)):
        step = batchtopk_step(sae, x, x, None, 8, 1 / 32, update_threshold=False,
                              matryoshka_widths=widths, sparse=sparse)
        assert float(step.loss.detach()) == pytest.approx(brute_force_loss(sae, x, widths),
                                                          rel=1e-5)
        assert float(step.mse) == pytest.approx(brute_force_loss(sae, x, (F,)), rel=1e-5)
    # The per-prefix figures sum to the loss, the smallest prefix reconstructs worst here.
    parts = matryoshka_prefix_losses(sae, x, WIDTHS)
    assert sum(parts) == pytest.approx(brute_force_loss(sae, x, WIDTHS), rel=1e-5)


def test_loss_gradient_matches_brute_force_autograd():
    """The grouped decode's gradient equals autograd through a plain per-prefix dense decode."""
    sae = random_sae(2)
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(3))
    step = batchtopk_step(sae, x, x, None, 8, 1 / 32, update_threshold=False,
                          matryoshka_widths=WIDTHS)
    got = torch.autograd.grad(step.loss, [sae.W_enc, sae.W_dec, sae.b_dec])
    f = sae.batch_activation(sae.pre_acts(x))
    ref = sum((x - (f * (torch.arange(F) < m)) @ sae.W_dec - sae.b_dec).pow(2).sum(-1).mean()
              for m in WIDTHS)
    want = torch.autograd.grad(ref, [sae.W_enc, sae.W_dec, sae.b_dec])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_one_prefix_is_plain_batchtopk_bit_for_bit():
    x = data()
    kw = dict(d_sae=F, k=K, total_tokens=20 * 128, progress=False, log_every=1)
    plain = train_dictionary(batches(x), architecture="batchtopk", **kw)
    one = train_dictionary(batches(x), architecture="matryoshka_batchtopk",
                           matryoshka_widths=[F], **kw)
    for name, tensor in plain.dictionary.state_dict().items():
        assert torch.equal(tensor, one.dictionary.state_dict()[name]), name
    assert plain.log["loss"].tolist() == one.log["loss"].tolist()
    # and with several prefixes the training differs (the nested loss is in effect)
    nested = train_dictionary(batches(x), architecture="matryoshka_batchtopk",
                              matryoshka_widths=WIDTHS, **kw)
    assert not torch.equal(nested.dictionary.W_dec, plain.dictionary.W_dec)


def test_the_logged_loss_is_the_sum_over_prefixes():
    """Each logged step's loss is the brute-force sum over prefixes of the dictionary as it was
    before that step, on that step's (scaled) batch: a mean over prefixes would be a quarter of
    it here, and the logged MSE is the full-width term alone."""
    x = data()
    cfg = TrainConfig(architecture="matryoshka_batchtopk", matryoshka_widths=WIDTHS, d_sae=F,
                      k=K, total_tokens=20 * 128, log_every=1)
    steps = list(itertools.islice(batches(x), 3))
    run = Training(steps[0], steps[0], cfg, progress=False)  # as train_dictionary starts one
    for batch in steps:
        before = copy.deepcopy(run.sae)
        scaled = batch * run.scale[0]
        run.step(batch)
        logged = run.state["log"][-1]
        total = brute_force_loss(before, scaled, WIDTHS)
        assert logged["loss"] == pytest.approx(total, rel=1e-5)
        assert logged["loss"] != pytest.approx(total / len(WIDTHS), rel=0.1)
        assert logged["mse"] == pytest.approx(brute_force_loss(before, scaled, (F,)), rel=1e-5)


@pytest.fixture(scope="module")
def trained():
    x = data(4096, density=0.04)
    kw = dict(d_sae=F, k=K, total_tokens=400 * 128, progress=False, seed=0)
    first = train_dictionary(batches(x), architecture="matryoshka_batchtopk",
                             matryoshka_widths=WIDTHS, **{**kw, "total_tokens": 128})
    mat = train_dictionary(batches(x), architecture="matryoshka_batchtopk",
                           matryoshka_widths=WIDTHS, **kw)
    plain = train_dictionary(batches(x), architecture="batchtopk", **kw)
    return x, first, mat, plain


def test_training_lowers_every_prefix_loss(trained):
    x, first, mat, plain = trained
    held = data(1024, seed=7, density=0.04)
    before = matryoshka_prefix_losses(first.dictionary, held, WIDTHS)
    after = matryoshka_prefix_losses(mat.dictionary, held, WIDTHS)
    assert all(a < 0.9 * b for a, b in zip(after, before)), (before, after)
    assert after[-1] < 0.5 * before[-1], (before, after)
    assert after == sorted(after, reverse=True)  # a longer prefix reconstructs at least as well
    # The point of the nesting: its first eighth reconstructs far better than plain BatchTopK's.
    plain_inner = matryoshka_prefix_losses(plain.dictionary, held, WIDTHS)
    assert after[0] < 0.95 * plain_inner[0], (after, plain_inner)


def test_save_load_round_trip_same_codes(trained, tmp_path):
    _, _, mat, _ = trained
    sae = mat.dictionary
    assert float(sae.threshold.min()) > 0 and torch.all(sae.threshold == sae.threshold[0])
    path = save_dictionary(sae, tmp_path / "mat", model="tiny", site="resid_out_layer0",
                           train_config=asdict(mat.config))
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"  # SAELens's inference form: one threshold
    meta = json.loads((path / "sae_nb.json").read_text())
    assert meta["train_config"]["architecture"] == "matryoshka_batchtopk"
    assert meta["train_config"]["matryoshka_widths"] == list(WIDTHS)
    back = load_sae_nb(path)
    assert isinstance(back, BatchTopKSAE) and back.k == K
    x = data(512, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(back.reconstruct(x), sae.reconstruct(x), rtol=0, atol=0)
        assert (sae.encode(x) > 0).sum(1).float().mean() > 0  # the threshold lets codes through


def test_default_widths():
    assert default_matryoshka_widths(4608) == (576, 1152, 2304, 4608)
    assert default_matryoshka_widths(2) == (1, 2)
    cfg = TrainConfig(architecture="matryoshka_batchtopk")
    assert cfg.matryoshka_widths is None and cfg.matryoshka_widths_value(64) == WIDTHS


@pytest.mark.parametrize("widths, match", [
    ([16, 8, 64], "strictly increasing"),
    ([8, 8, 64], "strictly increasing"),
    ([0, 64], "strictly increasing"),
    ([], "empty"),
    ([8.5, 64], "whole numbers"),
    (["a", 64], "whole numbers"),
])
def test_bad_widths_are_refused(widths, match):
    with pytest.raises(TrainingError, match=match):
        TrainConfig(architecture="matryoshka_batchtopk", matryoshka_widths=widths)


def test_last_width_must_be_d_sae():
    with pytest.raises(TrainingError, match="End the list with 64"):
        TrainConfig(architecture="matryoshka_batchtopk", d_sae=64, matryoshka_widths=[8, 32])
    # d_sae from the expansion: found when the width is known, before any step
    with pytest.raises(TrainingError, match=r"d_sae=128.*End the list with 128"):
        train_dictionary(batches(data(256)), architecture="matryoshka_batchtopk", expansion=8,
                         matryoshka_widths=[8, 64], progress=False)
    with pytest.raises(TrainingError, match="architecture='matryoshka_batchtopk'"):
        TrainConfig(architecture="batchtopk", matryoshka_widths=[8, 64])


@pytest.mark.parametrize("widths", [None, (64,), WIDTHS])
@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_step_equals_dense_reference(widths, with_dead):
    """The trainer's sparse BatchTopK step (ragged codes, CSR encoder gradient, prefixes by
    masking latents >= width) gives the dense reference's loss, gradients and threshold."""
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(4)) + 0.3
    dead = (torch.arange(F) % 3 == 0) if with_dead else None
    out = {}
    for sparse in (False, True):
        sae = random_sae(5)
        step = batchtopk_step(sae, x, x, dead, 8, 1 / 32, matryoshka_widths=widths, sparse=sparse)
        grads = torch.autograd.grad(step.loss, [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec])
        out[sparse] = (step, grads, sae.threshold.clone())
    (d, gd, td), (s, gs, ts) = out[False], out[True]
    torch.testing.assert_close(s.loss, d.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.x_hat, d.x_hat, rtol=1e-5, atol=1e-5)
    assert s.l0 == d.l0 and torch.equal(s.fired, d.fired)
    for a, b in zip(gs, gd):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ts, td)


@pytest.mark.parametrize("case", ["spread", "one_heavy_row", "few_positive", "ties"])
def test_batch_selection_equals_one_topk_over_the_whole_batch(case):
    """BatchTopK's selection from per-row candidates equals one top-k over all B * F entries:
    the same kept entries (the same values where the cut ties), in row order, whether the
    candidates suffice or a row holding more than its share forces the full top-k."""
    gen = torch.Generator().manual_seed(11)
    B, F_, k = 64, 300, 6
    acts = torch.relu(torch.randn(B, F_, generator=gen))
    if case == "one_heavy_row":  # row 5 alone holds more than 4k of the largest entries
        acts[5] += 10.0
    elif case == "few_positive":  # fewer positive entries than k * B: zeros fill the rest
        acts = acts * (torch.rand(B, F_, generator=gen) < 0.01)
    elif case == "ties":
        acts = torch.round(acts * 4) / 4
    n = k * B
    vals, flat = batch_top(acts, n)
    ref_vals, ref_flat = acts.flatten().topk(n)
    rows = flat // F_
    assert bool((rows[1:] >= rows[:-1]).all()) and len(flat.unique()) == n
    assert torch.equal(acts.flatten()[flat], vals)
    torch.testing.assert_close(vals.sort().values, ref_vals.sort().values, rtol=0, atol=0)
    if case in ("spread", "one_heavy_row"):  # no ties: the very same entries
        assert torch.equal(flat.sort().values, ref_flat.sort().values)
    if case == "one_heavy_row":
        assert int((flat // F_ == 5).sum()) > 4 * k  # the heavy row keeps more than 4k
