"""Intervals cover the truth at their nominal rate over repeated draws; group resampling where
rows are correlated; paired differences; the comparison table's verdicts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from sae_nb.comparison.uncertainty import (
    Interval,
    UncertaintyError,
    bootstrap_interval,
    compare,
    compare_paired,
    fvu_of,
    paired_difference,
    per_row_reconstruction,
    reconstruction_intervals,
    resample_indices,
    seed_interval,
    summarize,
)


def ratio(e, v):
    return e.sum() / v.sum()


def test_bootstrap_covers_a_ratio_metric_at_its_nominal_rate():
    """An FVU-like ratio of sums, E[e] / E[v] = 0.25 / 1 with e ~ 0.25 * Exp(1) * v and v ~
    Gamma(2, 0.5) (skewed, as squared errors are): the 95% percentile interval from 300 rows
    covers 0.25 in 90-99% of 200 independent draws."""
    rng = np.random.default_rng(0)
    covered = 0
    for draw in range(200):
        v = rng.gamma(2.0, 0.5, 300)
        e = 0.25 * rng.exponential(1.0, 300) * v  # E[e] = 0.25 E[v]
        iv = bootstrap_interval(ratio, e, v, n_resamples=300, seed=draw)
        covered += iv.contains(0.25)
        assert iv.low <= iv.estimate <= iv.high
    assert 0.90 <= covered / 200 <= 0.99, covered


def test_seed_interval_is_the_t_interval_and_covers_at_its_rate():
    got = seed_interval([1.0, 2.0, 4.0])
    half = stats.t.ppf(0.975, 2) * np.std([1, 2, 4], ddof=1) / np.sqrt(3)
    assert (got.estimate, got.low, got.high) == pytest.approx((7 / 3, 7 / 3 - half, 7 / 3 + half))
    assert got.n == 3 and got.method == "seeds (t)"
    rng = np.random.default_rng(1)
    covered = sum(seed_interval(rng.normal(0.7, 0.05, 5)).contains(0.7) for _ in range(200))
    assert 0.90 <= covered / 200 <= 0.99, covered
    with pytest.raises(UncertaintyError, match="at least 2"):
        seed_interval([0.5])
    with pytest.raises(UncertaintyError, match="level"):
        seed_interval([0.5, 0.6], level=95)


def test_group_resampling_is_needed_when_rows_come_in_correlated_groups():
    """Rows of one context share its offset (as tokens of one text do): resampling rows
    ignores that and its intervals cover the mean far too rarely; resampling whole contexts
    covers at about the nominal rate."""
    rng = np.random.default_rng(2)
    hits_rows = hits_groups = 0
    groups = np.repeat(np.arange(40), 16)  # 40 contexts of 16 tokens
    for draw in range(100):
        x = rng.normal(0, 1, 40)[groups] + rng.normal(0, 0.3, len(groups))  # true mean 0
        hits_rows += bootstrap_interval(np.mean, x, n_resamples=200, seed=draw).contains(0.0)
        hits_groups += bootstrap_interval(np.mean, x, n_resamples=200, seed=draw,
                                          groups=groups).contains(0.0)
    assert hits_rows / 100 < 0.6 and 0.85 <= hits_groups / 100 <= 1.0, (hits_rows, hits_groups)


def test_resampled_groups_are_whole():
    groups = np.array([5, 5, 7, 7, 7, 9])
    for idx in resample_indices(6, 20, np.random.default_rng(0), groups):
        labels = groups[idx]
        for g in np.unique(labels):  # a group comes with all its rows, as often as drawn
            assert (labels == g).sum() % (groups == g).sum() == 0
    with pytest.raises(UncertaintyError, match="one per row"):
        next(resample_indices(6, 1, np.random.default_rng(0), groups[:3]))


def test_paired_difference_is_tighter_than_two_intervals():
    """Two dictionaries scored on the same rows share the rows' difficulty: their separate
    intervals overlap (compare() would call them within noise), but the paired interval of the
    difference is far narrower, excludes 0 and contains the true difference 0.002."""
    rng = np.random.default_rng(3)
    hard = rng.gamma(2.0, 0.5, 2000)  # how hard each row is, shared by both; E = 1
    err_a = 0.100 * hard * rng.uniform(0.95, 1.05, 2000)
    err_b = 0.098 * hard * rng.uniform(0.95, 1.05, 2000)
    a = bootstrap_interval(np.mean, err_a, n_resamples=400)
    b = bootstrap_interval(np.mean, err_b, n_resamples=400)
    d = paired_difference(np.mean, [err_a], [err_b], n_resamples=400)
    assert d.estimate == pytest.approx(a.estimate - b.estimate)
    assert a.low <= b.high and b.low <= a.high  # the two intervals overlap
    assert d.half_width < 0.3 * (a.half_width + b.half_width)
    assert d.low > 0 and d.contains(0.002)
    with pytest.raises(UncertaintyError, match="same per-row"):
        paired_difference(ratio, [err_a, hard], [err_b])
    table = compare_paired("error", np.mean, {"a": [err_a], "b": [err_b], "a2": [err_a]},
                           higher_is_better=False, n_resamples=200)
    assert table.verdict.tolist() == ["b better", "within noise", "b better"]
    assert table.loc[0, "low"] > 0 and table.loc[1, "difference"] == 0


def test_summarize_and_compare_mark_differences_within_noise():
    runs = pd.DataFrame({"arch": ["topk"] * 3 + ["batchtopk"] * 3 + ["relu"] * 3,
                         "seed": [0, 1, 2] * 3,
                         "mcc": [0.90, 0.91, 0.92, 0.905, 0.915, 0.925, 0.70, 0.71, 0.72],
                         "fvu": [0.10, 0.11, 0.12, 0.10, 0.11, 0.12, 0.05, 0.06, 0.07]})
    table = summarize(runs, "arch", ["mcc", "fvu"])
    assert list(table.index) == ["topk", "batchtopk", "relu"] and (table["n"] == 3).all()
    iv = seed_interval([0.90, 0.91, 0.92])
    assert table.loc["topk", ["mcc", "mcc_low", "mcc_high"]].tolist() == pytest.approx(
        [iv.estimate, iv.low, iv.high])
    out = compare(table, higher_is_better={"mcc": True, "fvu": False})
    verdict = {(r.metric, r.a, r.b): r.verdict for r in out.itertuples()}
    assert verdict[("mcc", "topk", "batchtopk")] == "within noise"
    assert verdict[("mcc", "topk", "relu")] == "topk better"
    assert verdict[("fvu", "topk", "relu")] == "relu better"  # lower FVU is better
    assert verdict[("fvu", "topk", "batchtopk")] == "within noise"
    assert len(out) == 2 * 3  # two metrics x three pairs
    row = out[(out.metric == "mcc") & (out.a == "topk") & (out.b == "relu")].iloc[0]
    assert row.difference == pytest.approx(0.2)
    assert compare(table, ["mcc"]).verdict.tolist()[1] == "topk higher"  # no direction given
    with pytest.raises(UncertaintyError, match="no column"):
        summarize(runs, "arch", ["l0"])
    with pytest.raises(UncertaintyError, match="no metric with an interval"):
        compare(table[["mcc"]])


def test_interval_basics():
    iv = Interval(0.5, 0.4, 0.6, 0.95, "bootstrap", 100)
    assert iv.contains(0.4) and not iv.contains(0.61) and iv.half_width == pytest.approx(0.1)
    assert str(iv) == "0.5 [0.4, 0.6]"
    with pytest.raises(UncertaintyError, match="length"):
        bootstrap_interval(ratio, np.ones(5), np.ones(4))


def test_reconstruction_intervals_of_a_dictionary():
    import torch

    from sae_nb.dictionaries.architectures import TopKSAE

    torch.manual_seed(0)
    sae = TopKSAE(8, 32, k=3)
    x = torch.randn(600, 8) + 1.0
    rows = per_row_reconstruction(sae, x, batch_size=128)
    with torch.no_grad():
        x_hat = sae(x)
    fvu = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert fvu_of(rows["err"], rows["dev"]) == pytest.approx(fvu, rel=1e-5)
    assert (rows["l0"] <= 3).all() and len(rows["l0"]) == 600
    table = reconstruction_intervals(sae, x, groups=np.arange(600) // 20, n_resamples=200)
    fvu_row = table.set_index("metric").loc["fvu"]
    assert fvu_row.estimate == pytest.approx(fvu, rel=1e-5)
    assert fvu_row.low < fvu < fvu_row.high and fvu_row.method == "bootstrap (groups)"
