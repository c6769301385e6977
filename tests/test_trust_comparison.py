"""Comparisons that must not say more than their data: no verdict without two distinct seeds,
a metric whose ideal is 1 compared by its distance to 1, and absorption of a normalised TopK
read in the input's units."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from sae_nb.comparison import grid
from sae_nb.comparison.synthetic import make_lab
from sae_nb.comparison.uncertainty import compare, summarize

T1 = float(stats.t.ppf(0.975, 1))  # 12.706: the t quantile of two seeds


def runs_of(seeds_a, seeds_b, mcc_a, mcc_b) -> pd.DataFrame:
    return pd.DataFrame({"architecture": ["topk"] * len(seeds_a) + ["relu"] * len(seeds_b),
                         "k": 8, "seed": list(seeds_a) + list(seeds_b),
                         "mcc": list(mcc_a) + list(mcc_b)})


def verdicts(summary: pd.DataFrame, metric: str = "mcc") -> list[str]:
    table = grid.labelled(summary)
    return compare(table, [metric], grid.higher_is_better([metric])).verdict.tolist()


def test_one_seed_per_configuration_gives_no_verdict():
    summary = grid.summarize_runs(runs_of([0], [0], [0.9], [0.5]), ["mcc"])
    assert summary["n"].tolist() == [1, 1]
    (verdict,) = verdicts(summary)
    assert verdict.startswith("no verdict"), verdict
    assert "1 distinct seed" in verdict and "at least 2" in verdict


def test_a_repeated_seed_counts_once():
    # The same seed twice is the same run twice: one distinct seed, no interval, no verdict.
    summary = grid.summarize_runs(runs_of([0, 0], [0, 0], [0.9, 0.9], [0.5, 0.5]), ["mcc"])
    assert summary["n"].tolist() == [1, 1]
    assert summary["mcc_low"].isna().all() and summary["mcc_high"].isna().all()
    (verdict,) = verdicts(summary)
    assert verdict.startswith("no verdict"), verdict
    # Rows of one seed are averaged first: seeds 0, 0, 1 give the interval of two values.
    summary = grid.summarize_runs(runs_of([0, 0, 1], [0, 1], [0.8, 0.9, 0.95], [0.5, 0.52]),
                                  ["mcc"])
    row = summary.iloc[0]
    mean, half = (0.85 + 0.95) / 2, T1 * abs(0.95 - 0.85) / 2  # sd |a - b| / sqrt 2, over sqrt 2
    assert row["n"] == 2 and row["mcc"] == pytest.approx(mean)
    assert row["mcc_low"] == pytest.approx(mean - half)
    assert row["mcc_high"] == pytest.approx(min(mean + half, 1.0))


def test_summarize_counts_distinct_seeds():
    runs = runs_of([0, 0, 0], [0, 1, 2], [0.9, 0.9, 0.9], [0.5, 0.6, 0.7]).rename(
        columns={"architecture": "arch"})
    table = summarize(runs, "arch", ["mcc"])
    assert table.loc["topk", "n"] == 1 and np.isnan(table.loc["topk", "mcc_low"])
    assert table.loc["relu", "n"] == 3
    (verdict,) = compare(table, ["mcc"], {"mcc": True}).verdict
    assert verdict.startswith("no verdict") and "topk" in verdict


def test_compare_gives_no_verdict_for_missing_bounds_and_names_the_row():
    table = pd.DataFrame({"mcc": [0.9, 0.5, 0.7], "mcc_low": [0.85, np.nan, 0.6],
                          "mcc_high": [0.95, np.nan, 0.8]}, index=["a", "b", "c"])
    out = compare(table, ["mcc"], {"mcc": True}).set_index(["a", "b"])["verdict"]
    assert out[("a", "b")].startswith("no verdict") and "b" in out[("a", "b")].split(":")[1]
    assert out[("a", "c")] == "a better"


@pytest.mark.parametrize("seeds", [[0], [0, 0]])
def test_train_grid_trains_each_distinct_seed_once(seeds):
    lab = make_lab(rows=1536, n_features=16, d=8, mean_l0=2)
    g = grid.train_grid(lab, ("topk",), (2,), seeds, d_sae=16, total_tokens=512,
                        batch_size=256, heldout=512, n_resamples=5)
    assert g.table["seed"].tolist() == [0] and list(g.dictionaries) == [("topk", 2, 0)]
    summary = grid.summarize_runs(g.table, ["mcc", "fvu"])
    assert summary["n"].tolist() == [1] and summary["mcc_low"].isna().all()


# ---------------------------------------------------------------- a metric whose ideal is 1


def shrinkage_table(a, a_lo, a_hi, b, b_lo, b_hi) -> pd.DataFrame:
    return pd.DataFrame({"shrinkage": [a, b], "shrinkage_low": [a_lo, b_lo],
                         "shrinkage_high": [a_hi, b_hi]}, index=["a", "b"])


def test_shrinkage_is_not_better_for_being_higher():
    # 1.30 overshoots by 0.30, 0.99 undershoots by 0.01: b is the better one.
    table = shrinkage_table(1.30, 1.25, 1.35, 0.99, 0.98, 1.00)
    (verdict,) = compare(table, ["shrinkage"], grid.higher_is_better(["shrinkage"])).verdict
    assert "better" not in verdict and verdict == "a higher"
    (verdict,) = compare(table, ["shrinkage"], ideal=grid.IDEAL).verdict
    assert verdict == "b better"


def test_shrinkage_is_compared_by_its_distance_to_one():
    # Intervals apart on the value but not on the distance: |1.05 - 1| in [0.02, 0.08] and
    # |0.97 - 1| in [0.01, 0.05] overlap, so the difference is within the noise.
    table = shrinkage_table(1.05, 1.02, 1.08, 0.97, 0.95, 0.99)
    (row,) = compare(table, ["shrinkage"], ideal=grid.IDEAL).itertuples()
    assert row.verdict == "within noise"
    # An interval across 1 reaches distance 0: [0.9, 1.2] -> [0, 0.2] beside [0.25, 0.35].
    table = shrinkage_table(1.05, 0.9, 1.2, 0.7, 0.65, 0.75)
    assert compare(table, ["shrinkage"], ideal=grid.IDEAL).verdict.tolist() == ["a better"]
    table = shrinkage_table(1.4, 1.38, 1.42, 0.9, 0.88, 0.92)
    assert compare(table, ["shrinkage"], ideal=grid.IDEAL).verdict.tolist() == ["b better"]


def test_best_by_and_agreement_take_shrinkage_by_its_distance_to_one():
    s = pd.DataFrame({"architecture": ["a", "b"], "k": [1, 1], "shrinkage": [1.3, 0.99],
                      "shrinkage_low": [1.25, 0.98], "shrinkage_high": [1.35, 1.0]})
    assert grid.best_by(s, "shrinkage") == ("b k=1", True)
    runs = pd.DataFrame({"mcc": [0.1, 0.5, 0.9, 0.7], "shrinkage": [1.6, 0.7, 1.01, 1.2]})
    # distances 0.6, 0.3, 0.01, 0.2: ranks exactly opposite to mcc's, so rho = 1
    row = grid.agreement(runs, "mcc", ["shrinkage"]).iloc[0]
    assert row["spearman"] == pytest.approx(1.0) and row["oriented"] == "closer to 1 is better"
