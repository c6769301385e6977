"""Notebook 09's tables as a reader sees them: pairs at different L0 named so whatever the seed
noise, p-values never printed as 0, the shipped default's reference point as a small table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from sae_nb.comparison import grid
from sae_nb.comparison.uncertainty import compare


def two_seed_summary() -> pd.DataFrame:
    """Notebook 09's real grid as the main job measured it (two seeds: L0 seed intervals as
    wide as t = 12.7 makes them), FVU and L0 only."""
    return pd.DataFrame({
        "architecture": ["topk", "matryoshka_batchtopk", "batchtopk"], "k": [16, 32, 32],
        "fvu": [0.509, 0.267, 0.243], "fvu_low": [0.295, 0.250, 0.180],
        "fvu_high": [0.724, 0.285, 0.306],
        "l0": [16.0, 32.229, 30.5], "l0_low": [16.0, 2.085, 10.0], "l0_high": [16.0, 62.374, 51.0],
        "n": [2, 2, 2]})


def test_fvu_pairs_at_l0_16_and_32_say_they_differ_in_l0_though_the_seed_intervals_overlap():
    s = two_seed_summary()
    pairs = grid.with_l0(compare(grid.labelled(s), ["fvu", "l0"], {"fvu": False, "l0": True}), s)
    fvu = pairs[pairs["metric"] == "fvu"].set_index(["a", "b"])
    # 16 against 32.2: the L0 seed interval [2.1, 62.4] holds 16, yet half the latents fire
    pair = fvu.loc[("topk k=16", "matryoshka_batchtopk k=32")]
    assert pair["differ_in_l0"]
    assert "at different L0 (16.0 vs 32.2): not like for like" in pair["verdict"]
    # 32.2 against 30.5 (5% apart): the same sparsity, compared like for like
    same = fvu.loc[("matryoshka_batchtopk k=32", "batchtopk k=32")]
    assert not same["differ_in_l0"] and "L0" not in same["verdict"]
    # the L0 metric's own pair: within the seed noise, and said to be 2x apart
    l0 = pairs[pairs["metric"] == "l0"].set_index(["a", "b"])
    own = l0.loc[("topk k=16", "matryoshka_batchtopk k=32"), "verdict"]
    assert own.startswith("within") and "16.0 vs 32.2 is a different sparsity" in own
    assert "different sparsity" not in l0.loc[("matryoshka_batchtopk k=32", "batchtopk k=32"),
                                              "verdict"]


def test_a_perfect_rank_agreement_prints_its_p_value_as_below_the_tests_floor():
    rng = np.random.default_rng(0)
    mcc = rng.uniform(0.3, 0.9, 12)
    runs = pd.DataFrame({"mcc": mcc, "f1": mcc + 0.01, "fvu": rng.uniform(0.1, 0.5, 12)})
    agree = grid.agreement(runs, "mcc", ["f1", "fvu"]).set_index("metric")
    assert stats.spearmanr(runs["f1"], runs["mcc"]).pvalue == 0.0  # what used to be printed
    # by hand: of the 12! orderings of 12 runs, 2 are perfectly (anti-)ordered
    assert agree.loc["f1", "p_value"] == pytest.approx(2 / math.factorial(12))
    shown = grid.readable_agreement(grid.agreement(runs, "mcc", ["f1", "fvu"])).set_index(
        "metric")
    assert shown.loc["f1", "p_value"] == "< 1e-08"  # 2 / 12! = 4.2e-09
    p = stats.spearmanr(-runs["fvu"], runs["mcc"]).pvalue
    assert shown.loc["fvu", "p_value"] == f"{p:.2e}" and p > 1e-3
    assert shown.loc["f1", "spearman"] == 1.0 and "runs" not in shown.columns
