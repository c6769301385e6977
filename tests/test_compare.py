"""compare: the grid's table holds each dictionary's own scores, the Pareto figure draws the
summarized table, the agreement is Spearman's rho by brute force, and a sweep over k draws
pareto.html from its gathered table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sae_nb.comparison import grid as compare
from sae_nb.comparison.recovery import score_recovery
from sae_nb.comparison.synthetic import make_lab
from sae_nb.views.plotting import pareto_figure


@pytest.fixture(scope="module")
def lab_grid():
    lab = make_lab(rows=3072, n_features=32, d=16, mean_l0=2, n_parents=2, children_per_parent=2)
    grid = compare.train_grid(lab, ("topk", "batchtopk"), (2, 4), (0, 1), d_sae=32,
                              total_tokens=4096, batch_size=256, heldout=1024, n_resamples=20,
                              lr=3e-3)
    return lab, grid


@pytest.mark.slow  # trains 8 small dictionaries (the module's fixture)
def test_grid_has_one_row_per_run_with_its_dictionarys_own_scores(lab_grid):
    lab, grid = lab_grid
    t = grid.table
    assert len(t) == 8 and not t.duplicated(["architecture", "k", "seed"]).any()
    assert set(grid.dictionaries) == set(zip(t["architecture"], t["k"], t["seed"]))
    held = slice(len(lab.acts) - 1024, len(lab.acts))
    for _, row in t.iterrows():
        sae = grid.dictionaries[(row["architecture"], row["k"], row["seed"])]
        x = lab.acts[held].astype(np.float64)
        with torch.no_grad():
            recon = sae(torch.from_numpy(lab.acts[held])).double().numpy()
            codes = sae.encode(torch.from_numpy(lab.acts[held])).numpy()
        fvu = ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        assert row["fvu"] == pytest.approx(fvu, rel=1e-5)
        assert row["l0"] == pytest.approx((codes != 0).sum(1).mean())
        assert row["fvu_boot_low"] <= row["fvu"] <= row["fvu_boot_high"]
        s = score_recovery(sae, lab, rows=held).summary
        for m in ("mcc", "mean_max_cos", "f1", "absorption"):
            assert row[m] == pytest.approx(s[m], nan_ok=True)
    # Seeds differ: the runs are separate trainings, not copies.
    a, b = (grid.dictionaries[("topk", 2, s)] for s in (0, 1))
    assert not np.allclose(a.W_dec.detach().numpy(), b.W_dec.detach().numpy())


@pytest.mark.slow  # the same fixture
def test_summary_and_pareto_figure_match_the_runs(lab_grid):
    _, grid = lab_grid
    s = compare.summarize_runs(grid.table, ["fvu", "l0", "mcc"])
    assert len(s) == 4 and (s["n"] == 2).all()
    for _, row in s.iterrows():
        part = grid.table[(grid.table["architecture"] == row["architecture"])
                          & (grid.table["k"] == row["k"])]
        v = part["fvu"].to_numpy()
        half = 12.706204736 * v.std(ddof=1) / np.sqrt(2)  # t(0.975, 1 dof)
        assert row["fvu"] == pytest.approx(v.mean())
        assert row["fvu_high"] - row["fvu"] == pytest.approx(half, rel=1e-6, abs=1e-12)
        assert row["fvu_boot_low"] == pytest.approx(part["fvu_boot_low"].mean())
    fig = pareto_figure(s, ys=("fvu",))
    main = [tr for tr in fig.data if tr.legendgroup in ("topk", "batchtopk")]
    assert [tr.name for tr in main] == ["topk", "batchtopk"]
    for tr in main:
        part = s[s["architecture"] == tr.name].sort_values("l0")
        np.testing.assert_allclose(tr.x, part["l0"])
        np.testing.assert_allclose(tr.y, part["fvu"])
        np.testing.assert_allclose(tr.error_y.array, part["fvu_high"] - part["fvu"], atol=1e-12)
        np.testing.assert_allclose(tr.error_y.arrayminus, part["fvu"] - part["fvu_low"], atol=1e-12)
    boot = [tr for tr in fig.data if tr.legendgroup == "bootstrap"][0]  # topk's, drawn first
    part = s[s["architecture"] == "topk"].sort_values("l0")
    np.testing.assert_allclose(boot.y, part["fvu"])
    np.testing.assert_allclose(boot.error_y.array, part["fvu_boot_high"] - part["fvu"], atol=1e-12)


def test_a_single_run_per_group_has_no_seed_interval():
    runs = pd.DataFrame({"architecture": ["a", "a", "b"], "k": [1, 1, 1], "fvu": [0.1, 0.3, 0.5]})
    s = compare.summarize_runs(runs, ["fvu"]).set_index("architecture")
    assert s.loc["a", "fvu"] == pytest.approx(0.2) and np.isfinite(s.loc["a", "fvu_low"])
    assert s.loc["b", "fvu"] == 0.5 and np.isnan(s.loc["b", "fvu_low"])
    with pytest.raises(compare.CompareError, match="no column"):
        compare.summarize_runs(runs, ["mcc"])


def test_seed_intervals_stay_inside_what_the_metric_can_take():
    # Two seeds: the t interval is mean +- 12.706 * |a - b| / 2, so L0 1 and 29 reach
    # 15 - 177.9 below 0, and F1 0.9 and 0.98 reach 0.94 + 0.51 above 1.
    runs = pd.DataFrame({"architecture": ["topk"] * 2, "k": [4, 4], "l0": [1.0, 29.0],
                         "f1": [0.9, 0.98], "loss": [-1.0, 1.0]})
    row = compare.summarize_runs(runs, ["l0", "f1", "loss"]).iloc[0]
    assert row["l0_low"] == 0.0 and row["l0_high"] == pytest.approx(15 + 12.706204736 * 14)
    assert row["f1_high"] == 1.0 and row["f1_low"] == pytest.approx(0.94 - 12.706204736 * 0.04)
    # A metric without a known range keeps the whole interval.
    assert row["loss_low"] == pytest.approx(-12.706204736)
    fig = pareto_figure(compare.summarize_runs(runs, ["l0", "f1"]).assign(fvu=0.3), ys=("fvu",))
    assert fig.data[0].customdata[0] == "15.0 [0.0, 192.9]"  # the hover's L0 stops at 0
    assert fig.layout.xaxis.title.text == "L0 (active latents per token)"
    assert fig.layout.yaxis.title.text.startswith("FVU")


def test_readable_writes_each_metric_as_its_mean_and_interval():
    runs = pd.DataFrame({"architecture": ["a", "a", "b"], "k": [4, 4, 8], "fvu": [0.1, 0.3, 0.5],
                         "fvu_boot_low": [0.05, 0.25, 0.45], "fvu_boot_high": [0.15, 0.35, 0.55]})
    t = compare.readable(compare.summarize_runs(runs, ["fvu"]), ["fvu"]).set_index("architecture")
    half = 12.706204736 * 0.1  # t(0.975, 1) * sd 0.1414 / sqrt 2
    assert t.loc["a", "fvu"] == f"0.200 [{max(0.2 - half, 0):.3f}, {0.2 + half:.3f}]"
    assert t.loc["a", "fvu bootstrap"] == "[0.150, 0.250]" and t.loc["a", "n"] == 2
    assert t.loc["b", "fvu"] == "0.500" and t.loc["b", "fvu bootstrap"] == "[0.450, 0.550]"
    assert list(t.columns) == ["k", "fvu", "fvu bootstrap", "n"]
    seeds_only = compare.readable(compare.summarize_runs(runs, ["fvu"]), ["fvu"], bootstrap=False)
    assert list(seeds_only.columns) == ["architecture", "k", "fvu", "n"]


def brute_spearman(a, b) -> float:
    """Pearson correlation of ranks, ranks by counting (no ties in the test's data)."""
    ra = np.array([(a < v).sum() for v in a], float)
    rb = np.array([(b < v).sum() for v in b], float)
    n = len(a)
    return 1 - 6 * ((ra - rb) ** 2).sum() / (n * (n ** 2 - 1))


def test_agreement_is_spearman_by_brute_force():
    rng = np.random.default_rng(3)
    runs = pd.DataFrame({"mcc": rng.random(9), "fvu": rng.random(9), "f1": rng.random(9)})
    t = compare.agreement(runs, "mcc", ["fvu", "f1"]).set_index("metric")
    # fvu is lower-is-better: its ranks are flipped before correlating.
    assert t.loc["fvu", "spearman"] == pytest.approx(
        brute_spearman(-runs["fvu"].to_numpy(), runs["mcc"].to_numpy()))
    assert t.loc["f1", "spearman"] == pytest.approx(
        brute_spearman(runs["f1"].to_numpy(), runs["mcc"].to_numpy()))
    runs["f1"] = runs["mcc"] * 2 + 1
    assert compare.agreement(runs, "mcc", ["f1"])["spearman"].iloc[0] == pytest.approx(1.0)
    with pytest.raises(compare.CompareError, match="at least 3 runs"):
        compare.agreement(runs.head(2), "mcc", ["f1"])


def test_l0_is_not_oriented():
    assert compare.higher_is_better(["fvu", "l0", "mcc"]) == {"fvu": False, "mcc": True}


def test_best_by_says_when_the_lead_is_within_noise():
    s = pd.DataFrame({"architecture": ["a", "b", "c"], "k": [1, 1, 1], "mcc": [0.9, 0.5, 0.85],
                      "mcc_low": [0.88, 0.4, 0.8], "mcc_high": [0.92, 0.6, 0.89]})
    assert compare.best_by(s, "mcc") == ("a k=1", False)  # c's interval reaches a's
    s.loc[2, "mcc_high"] = 0.87
    assert compare.best_by(s, "mcc") == ("a k=1", True)
    assert compare.best_by(s, "mcc", higher=False) == ("b k=1", True)
