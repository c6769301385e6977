"""The ground-truth lab: its rows follow the planted probabilities, hierarchy, correlations and
magnitudes; it round-trips through an activation store; a TopK trained on it recovers it."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import multivariate_normal, norm

from sae_nb.activations.split import heldout_split
from sae_nb.activations.store import ActivationStore, StoreError
from sae_nb.comparison.recovery import score_recovery
from sae_nb.comparison.synthetic import LabConfig, LabError, load_lab, make_lab, write_lab_store
from sae_nb.training.trainer import train_dictionary


def on(lab, feature) -> np.ndarray:
    return (lab.codes[:, feature] > 0).toarray().ravel()


def test_lab_is_seeded_and_is_codes_times_directions_plus_noise():
    a = make_lab(rows=3000, n_features=200, d=32, noise_std=0.1, bias_norm=2.0, seed=3)
    b = make_lab(rows=3000, n_features=200, d=32, noise_std=0.1, bias_norm=2.0, seed=3)
    c = make_lab(rows=3000, n_features=200, d=32, noise_std=0.1, bias_norm=2.0, seed=4)
    np.testing.assert_array_equal(a.acts, b.acts)
    assert not np.allclose(a.acts, c.acts)
    np.testing.assert_allclose(np.linalg.norm(a.directions, axis=1), 1, atol=1e-5)
    assert np.linalg.norm(a.bias) == pytest.approx(2.0, rel=1e-5)
    noise = a.acts - (a.codes.toarray() @ a.directions.astype(np.float64) + a.bias)
    assert noise.std() == pytest.approx(0.1, rel=0.02) and abs(noise.mean()) < 0.005
    assert a.codes.shape == (3000, 200) and (a.codes.data > 0).all()


def test_orthogonal_lab_has_orthonormal_directions():
    lab = make_lab(rows=10, n_features=24, d=32, superposition=False)
    np.testing.assert_allclose(lab.directions @ lab.directions.T, np.eye(24), atol=1e-5)
    with pytest.raises(LabError, match="n_features"):
        LabConfig(n_features=40, d=32, superposition=False)


def test_firing_rates_follow_zipf_and_sum_to_l0():
    cfg = LabConfig(n_features=100, d=16, mean_l0=5.0, zipf_exponent=1.0, max_probability=0.9)
    lab = make_lab(cfg, rows=40_000)
    p = lab.probabilities
    assert p.sum() == pytest.approx(5.0, rel=1e-6)
    assert p[0] == pytest.approx(0.9)  # 0.96 before the cap
    np.testing.assert_allclose(p[1:] * np.arange(2, 101), 2 * p[1], rtol=1e-6)  # (i+1)^-1
    rate = np.asarray((lab.codes > 0).mean(0)).ravel()
    assert (np.abs(rate - p) < 5 * np.sqrt(p * (1 - p) / 40_000)).all()
    assert lab.codes.getnnz(axis=1).mean() == pytest.approx(5.0, rel=0.02)
    capped = make_lab(rows=10, n_features=10, d=8, mean_l0=4.0, zipf_exponent=2.0,
                      max_probability=0.5).probabilities
    assert capped.max() == pytest.approx(0.5) and capped.sum() == pytest.approx(4.0)


def test_children_fire_only_with_their_parent_one_at_a_time():
    lab = make_lab(rows=40_000, n_features=60, d=16, mean_l0=4.0, n_parents=3,
                   children_per_parent=4, child_coverage=0.8, seed=1)
    pairs = lab.hierarchy()
    assert len(pairs) == 12 and set(pairs["parent"]) == {0, 1, 2}
    for par, kids in pairs.groupby("parent")["child"]:
        parent_on = on(lab, par)
        kids_on = np.stack([on(lab, k) for k in kids], 1)
        assert not (kids_on.any(1) & ~parent_on).any()  # never without the parent
        assert kids_on.sum(1).max() == 1  # mutually exclusive
        given = kids_on[parent_on].mean(0)  # P(child | parent) = coverage / children
        np.testing.assert_allclose(given, 0.2, atol=4 * np.sqrt(0.16 / parent_on.sum()))
        np.testing.assert_allclose(lab.probabilities[kids], lab.probabilities[par] * 0.2)


def test_correlated_groups_fire_together_as_the_copula_says():
    rho = 0.6
    lab = make_lab(rows=60_000, n_features=40, d=16, mean_l0=4.0, zipf_exponent=0.0,
                   n_groups=2, group_size=3, correlation=rho, seed=2)
    p = 0.1  # 4 / 40, every feature alike
    members = [np.nonzero(lab.group == g)[0] for g in range(2)]
    a, b = on(lab, members[0][0]), on(lab, members[0][1])
    t = norm.isf(p)  # both fire when both latent normals exceed t: the bivariate normal CDF
    expected = multivariate_normal([0, 0], [[1, rho], [rho, 1]]).cdf([-t, -t])
    assert (a & b).mean() == pytest.approx(expected, abs=4 * np.sqrt(expected / 60_000))
    c = on(lab, members[1][0])  # another group: independent
    assert (a & c).mean() == pytest.approx(p * p, abs=4 * np.sqrt(p * p / 60_000))
    assert a.mean() == pytest.approx(p, abs=0.005)  # the copula keeps the marginal


def test_magnitudes_have_their_planted_mean():
    lab = make_lab(rows=20_000, n_features=50, d=16, magnitude_mean=2.0, magnitude_std=0.3,
                   magnitude_spread=0.5, seed=5)
    codes = lab.codes.tocsc()
    for f in range(5):
        values = codes[:, f].data
        assert values.mean() == pytest.approx(lab.magnitudes[f],
                                              rel=4 * 0.3 / np.sqrt(len(values)) + 0.01)
    assert lab.magnitudes.std() > 0.3  # the per-feature spread


def test_lab_store_round_trip_and_split(tmp_path):
    lab = make_lab(rows=5000, n_features=80, d=16, n_parents=2, children_per_parent=3,
                   noise_std=0.05)
    store = write_lab_store(lab, tmp_path / "lab", ctx_len=64, shard_rows=2000)
    assert isinstance(store, ActivationStore) and len(store) == 5000 and store.d == 16
    assert len(store.manifest["shards"]) == 3
    np.testing.assert_array_equal(store[:], lab.acts)
    back = load_lab(tmp_path / "lab")
    np.testing.assert_array_equal(back.acts, lab.acts)
    assert (back.codes != lab.codes).nnz == 0
    np.testing.assert_array_equal(back.parent, lab.parent)
    assert back.config == lab.config
    split = heldout_split(store, 1000, 0)  # whole pseudo-contexts held out
    assert split.boundary % 64 == 0 and 1000 <= len(store) - split.boundary < 1064
    with pytest.raises(StoreError, match="overwrite=True"):
        write_lab_store(lab, tmp_path / "lab")
    write_lab_store(lab, tmp_path / "lab", overwrite=True)
    assert len(ActivationStore(tmp_path / "lab").manifest["shards"]) == 1  # default shard size
    assert sorted(p.name for p in (tmp_path / "lab").glob("shard_*")) == [
        "shard_00000.index.npy", "shard_00000.npy"]  # the old shards are gone


def test_bad_settings_are_named():
    with pytest.raises(LabError, match="hierarchy"):
        LabConfig(n_features=10, n_parents=3, children_per_parent=4)
    with pytest.raises(LabError, match="child_coverage"):
        LabConfig(child_coverage=1.5)
    with pytest.raises(LabError, match="mean_l0"):
        make_lab(rows=10, n_features=10, d=8, mean_l0=8.0, max_probability=0.5)


@pytest.mark.slow
def test_topk_recovers_an_orthogonal_noiseless_dictionary(tmp_path):
    """24 orthonormal features in 32 dims, no noise, ~1.5 active per row; a TopK of twice the
    width (k = 6, so that rows with several features keep them all) trained through the store.
    At width 24 (one latent per feature) training stalls in a local minimum where a latent
    holds two features (MCC 0.95-0.98 over 1k-4k steps); twice as wide it reaches 0.9999."""
    lab = make_lab(rows=8192, n_features=24, d=32, superposition=False, mean_l0=1.5,
                   zipf_exponent=0.0, magnitude_std=0.2, noise_std=0.0)
    store = write_lab_store(lab, tmp_path / "lab")
    res = train_dictionary(store.batches(256, epochs=None, seed=0), architecture="topk",
                           d_sae=48, k=6, total_tokens=256 * 1500, lr=3e-3, progress=False)
    rec = score_recovery(res.dictionary, lab)
    assert rec.summary["mcc"] >= 0.99, rec.summary
    assert rec.summary["hungarian_cos"] >= 0.99 and rec.summary["recall"] >= 0.99, rec.summary
