"""Recovery scores against values derived independently: brute-force matchings, closed-form and
Monte-Carlo chance levels, hand-built detectors, and a dictionary built from the truth."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sae_nb.comparison.recovery import (
    absorption,
    correlation_matrix,
    cosine_matrix,
    detection,
    expected_max_cosine,
    hungarian,
    hungarian_cosine,
    latent_codes,
    matched_mean,
    mcc,
    mean_max_cosine,
    recovery_intervals,
    score_recovery,
    shrinkage,
)
from sae_nb.comparison.synthetic import make_lab
from sae_nb.dictionaries.architectures import TopKSAE
from sae_nb.training.trainer import train_dictionary


def random_units(n, d, rng):
    g = rng.standard_normal((n, d))
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def test_a_dictionary_scores_one_against_itself_in_any_order():
    rng = np.random.default_rng(0)
    true = random_units(50, 16, rng)
    perm = rng.permutation(50)
    assert hungarian_cosine(true, true) == pytest.approx(1.0)
    assert hungarian_cosine(3.0 * true[perm], true) == pytest.approx(1.0)  # norms do not count
    assert mean_max_cosine(true[perm], true) == pytest.approx(1.0)
    rows, cols = hungarian(cosine_matrix(true[perm], true))
    np.testing.assert_array_equal(perm[rows], cols)  # the permutation is found
    codes = sp.random(400, 30, density=0.1, random_state=1, format="csr")
    assert mcc(codes, codes) == pytest.approx(1.0)
    assert mcc(codes[:, rng.permutation(30)] * 2.5, codes) == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(5, 5), (7, 4), (4, 6)])
def test_hungarian_matches_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    sim = rng.standard_normal(shape)
    m, n = shape
    if m >= n:  # every column matched to a distinct row
        best = max(sum(sim[r, c] for c, r in enumerate(rows))
                   for rows in itertools.permutations(range(m), n))
    else:  # every row matched to a distinct column
        best = max(sum(sim[r, c] for r, c in enumerate(cols))
                   for cols in itertools.permutations(range(n), m))
    assert matched_mean(sim) == pytest.approx(best / n)


def test_expected_max_cosine_closed_form_and_monte_carlo():
    # d = 3: a cosine is uniform on [-1, 1] (Archimedes), so E[max of n] = -1 + 2n / (n + 1).
    for n in (1, 2, 10, 100):
        assert expected_max_cosine(3, n) == pytest.approx(-1 + 2 * n / (n + 1), abs=1e-6)
    assert expected_max_cosine(40, 1) == pytest.approx(0.0, abs=1e-6)  # symmetric
    rng = np.random.default_rng(1)
    d, n, trials = 64, 500, 400
    fixed = np.eye(d)[0]
    maxima = [(random_units(n, d, rng) @ fixed).max() for _ in range(trials)]
    assert np.mean(maxima) == pytest.approx(expected_max_cosine(d, n),
                                            abs=4 * np.std(maxima) / np.sqrt(trials))


def test_random_dictionaries_score_chance():
    """Random decoder rows against fixed true directions: the mean max cosine is the analytic
    chance level; the Hungarian cosine lies below it, and close when latents far outnumber
    features (few collisions); random codes give an MCC at the chance level of correlations
    (a Pearson correlation of independent Gaussian columns of N rows is a cosine in N-1 dims)."""
    rng = np.random.default_rng(2)
    d, n, m = 64, 32, 2048
    true = random_units(n, d, rng)
    learned = random_units(m, d, rng)
    chance = expected_max_cosine(d, m)  # ~0.46
    assert mean_max_cosine(learned, true) == pytest.approx(chance, abs=0.03)
    hung = hungarian_cosine(learned, true)
    assert hung <= mean_max_cosine(learned, true) + 1e-12
    assert hung == pytest.approx(chance, abs=0.05)
    assert hungarian_cosine(random_units(n, d, rng), true) < 0.3  # square: far below max
    N = 2000
    latents, codes = rng.standard_normal((N, 256)), rng.standard_normal((N, 8))
    assert mcc(latents, codes) == pytest.approx(expected_max_cosine(N - 1, 256), abs=0.01)


def test_correlation_matrix_matches_numpy_dense_and_sparse():
    rng = np.random.default_rng(3)
    a = rng.random((300, 6)) * (rng.random((300, 6)) < 0.3)
    t = rng.random((300, 4)) * (rng.random((300, 4)) < 0.2)
    a[:, 2] = 0  # a dead latent: correlation 0, not NaN
    with np.errstate(invalid="ignore"):
        want = np.corrcoef(a.T, t.T)[:6, 6:]
    want[2] = 0
    np.testing.assert_allclose(correlation_matrix(a, t), want, atol=1e-10)
    np.testing.assert_allclose(correlation_matrix(sp.csr_matrix(a), sp.csr_matrix(t)), want,
                               atol=1e-10)


def test_detection_counts_hits_by_hand():
    # feature 0 fires on rows 0-3; its latent 1 fires on rows 2-5: 2 hits of 4 firings, 2 of 4
    codes = np.zeros((8, 2))
    codes[:4, 0] = 1.0
    codes[6:, 1] = 2.0
    lat = np.zeros((8, 3))
    lat[2:6, 1] = 0.5
    lat[6:, 0] = 1.0
    lat[7, 0] = 0.05  # below a threshold of 0.1
    got = detection(lat, codes, np.array([1, 0]))
    assert got.loc[0, ["precision", "recall", "f1"]].tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert got.loc[1, ["precision", "recall", "f1"]].tolist() == pytest.approx([1, 1, 1])
    got = detection(lat, codes, np.array([1, 0]), threshold=0.1)
    assert got.loc[1, ["precision", "recall"]].tolist() == pytest.approx([1, 0.5])
    assert detection(lat, codes, np.array([-1, 0])).loc[0, "f1"] == 0  # no latent: no detector


def test_absorption_by_hand():
    # parent 0 with children 1, 2; the parent's latent 5 goes silent whenever child 1 fires
    rng = np.random.default_rng(4)
    n = 1000
    par = rng.random(n) < 0.5
    which = rng.integers(0, 3, n)  # 0: no child, 1: child 1, 2: child 2
    codes = np.zeros((n, 3))
    codes[par, 0] = 1
    codes[par & (which == 1), 1] = 1
    codes[par & (which == 2), 2] = 1
    lat = np.zeros((n, 6))
    lat[:, 5] = codes[:, 0] * (codes[:, 1] == 0)
    got = absorption(lat, codes, np.array([-1, 0, 0]), np.array([5, -1, -1, ]))
    assert got["absorbed"].tolist() == [1.0, 0.0] and got["missed_alone"].tolist() == [0.0, 0.0]
    assert got["rows"].tolist() == [int((codes[:, 1] > 0).sum()), int((codes[:, 2] > 0).sum())]


def test_shrinkage_is_the_norm_ratio():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((100, 8)) + 3.0
    assert shrinkage(x, 0.8 * x) == pytest.approx(0.8)
    center = np.full(8, 3.0)
    assert shrinkage(x, center + 0.7 * (x - center), center) == pytest.approx(0.7)


def truth_dictionary(lab, k):
    """A TopK whose decoder rows are the true directions and whose encoder reads them out
    exactly (orthonormal directions, no noise): the perfect dictionary."""
    d = lab.config.d
    sae = TopKSAE(d, lab.config.n_features, k=k)
    with torch.no_grad():
        sae.W_dec.copy_(torch.from_numpy(lab.directions))
        sae.W_enc.copy_(torch.from_numpy(lab.directions).T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_the_true_dictionary_scores_perfectly():
    lab = make_lab(rows=3000, n_features=24, d=32, superposition=False, mean_l0=2.0,
                   n_parents=2, children_per_parent=2, seed=6)
    k = int(lab.codes.getnnz(axis=1).max())
    rec = score_recovery(truth_dictionary(lab, k), lab)
    s = rec.summary
    for key in ("mcc", "mean_max_cos", "hungarian_cos", "precision", "recall", "f1", "shrinkage"):
        assert s[key] == pytest.approx(1.0, abs=1e-5), key
    assert s["absorption"] == 0 and s["fvu"] < 1e-10
    assert s["l0"] <= k  # the TopK's extra picks come out ~1e-7: counted in L0, not as firing
    np.testing.assert_array_equal(rec.features["latent"], np.arange(24))
    assert len(rec.absorption) == 4
    # An encoder whose parent read-out is pushed below 0 whenever a child fires: absorption by
    # construction, on every (parent, child) pair, and no miss where the parent fires alone.
    sae = truth_dictionary(lab, k)
    with torch.no_grad():
        for par, kids in lab.hierarchy().groupby("parent")["child"]:
            sae.W_enc[:, par] -= 10 * torch.from_numpy(lab.directions[kids.to_numpy()]).sum(0)
    held = score_recovery(sae, lab, rows=slice(0, 1500))
    assert held.absorption["absorbed"].tolist() == [1.0] * 4
    assert held.absorption["missed_alone"].tolist() == [0.0] * 4
    assert held.summary["absorption"] == 1.0 and held.summary["missed_alone"] == 0.0
    assert held.absorption["rows"].sum() == sum(
        ((lab.codes[:1500, c] > 0).sum()) for c in lab.hierarchy()["child"])


@pytest.mark.slow
def test_plain_topk_absorbs_a_planted_hierarchy():
    """Parents that fire often, each with 4 mutually exclusive children covering 90% of its
    firings, in 32 orthogonal dims; a TopK with tight k. Records what a plain TopK does with a
    hierarchy: the parent's latent goes silent far more often when a child fires than when the
    parent fires alone (measured: 0.40 against 0.06; most children absorb about half their
    parent's firings, one child per parent or so none)."""
    lab = make_lab(rows=16384, n_features=32, d=32, superposition=False, mean_l0=2.0,
                   zipf_exponent=0.0, n_parents=4, children_per_parent=4, child_coverage=0.9,
                   seed=7)
    res = train_dictionary(torch.from_numpy(lab.acts).split(256) * 20, architecture="topk",
                           d_sae=64, k=3, total_tokens=256 * 1200, lr=3e-3, progress=False)
    rec = score_recovery(res.dictionary, lab)
    ab = rec.absorption
    assert ab["absorbed"].mean() > 0.25, ab
    assert ab["absorbed"].mean() > 3 * ab["missed_alone"].mean(), ab



def test_recovery_intervals_agree_with_the_scores_and_with_copied_rows():
    """The estimates are score_recovery's; one resample (n_resamples=1: low = high = its score)
    equals scoring the drawn rows copied as often as drawn, with the matchings of all rows."""
    lab = make_lab(rows=2000, n_features=24, d=16, mean_l0=3.0, n_parents=2,
                   children_per_parent=3, noise_std=0.05, seed=8)
    sae = TopKSAE(16, 48, k=4)
    torch.nn.init.normal_(sae.b_enc, std=0.1)
    rec = score_recovery(sae, lab)
    iv = recovery_intervals(sae, lab, n_resamples=50,
                            groups=np.arange(2000) // 50).set_index("metric")
    for key in ("mcc", "precision", "recall", "f1", "shrinkage", "absorption", "missed_alone",
                "fvu"):
        assert iv.loc[key, "estimate"] == pytest.approx(rec.summary[key], rel=1e-9, abs=1e-12), key
        assert iv.loc[key, "low"] <= iv.loc[key, "estimate"] <= iv.loc[key, "high"], key
    assert (iv["high"] > iv["low"]).all()
    one = recovery_intervals(sae, lab, n_resamples=1, seed=5).set_index("metric")
    idx = np.random.default_rng(5).integers(0, 2000, 2000)  # the draw resample_indices makes
    latents, recon = latent_codes(sae, lab.acts[idx])
    codes = lab.codes[idx]
    f = rec.features
    corr = correlation_matrix(latents, codes)
    norms = sae.W_dec.detach().double().norm(dim=1).numpy()
    det = detection(latents @ sp.diags(norms), codes, f["latent"].to_numpy(), 0.01)
    ab = absorption(latents @ sp.diags(norms), codes, lab.parent, f["latent"].to_numpy(), 0.01)
    x = lab.acts[idx].astype(np.float64)
    want = {"mcc": corr[f["latent_by_corr"], np.arange(24)].mean(), "f1": det["f1"].mean(),
            "recall": det["recall"].mean(), "absorption": ab["absorbed"].mean(),
            "shrinkage": shrinkage(lab.acts[idx], recon, lab.bias),
            "fvu": ((x - recon) ** 2).sum() / ((x - lab.acts.mean(0)) ** 2).sum()}
    for key, value in want.items():
        assert one.loc[key, "low"] == pytest.approx(value, rel=1e-6), key
