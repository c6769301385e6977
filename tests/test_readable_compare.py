"""Notebook 09's verdicts as tables, its metric definitions, the L0 caveat of its pairs, its
Pareto figure (labelled points, distinct bars, a reference point) and its grid's progress bar,
against hand-built summaries and brute force."""

from __future__ import annotations

from types import SimpleNamespace

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch

from sae_nb.comparison import grid
from sae_nb.comparison.synthetic import make_lab
from sae_nb.comparison.uncertainty import compare
from sae_nb.dictionaries.architectures import TopKSAE
from sae_nb.running.notebooks import NOTEBOOKS_DIR
from sae_nb.views.plotting import pareto_figure


def summary() -> pd.DataFrame:
    """Three configurations with seed intervals, built by hand."""
    return pd.DataFrame({
        "architecture": ["topk", "topk", "batchtopk"], "k": [16, 32, 16],
        "fvu": [0.50, 0.33, 0.30], "fvu_low": [0.45, 0.30, 0.28], "fvu_high": [0.55, 0.36, 0.32],
        "l0": [16.0, 32.0, 14.6], "l0_low": [16.0, 32.0, 0.8], "l0_high": [16.0, 32.0, 28.3],
        "mcc": [0.7, 0.6, 0.4], "mcc_low": [0.68, 0.55, 0.3], "mcc_high": [0.72, 0.65, 0.5],
        "ce_loss_recovered": [0.75, 0.8, 0.61], "ce_loss_recovered_low": [0.74, 0.73, 0.33],
        "ce_loss_recovered_high": [0.76, 0.87, 0.89],
        "fvu_boot_low": [0.49, 0.32, 0.29], "fvu_boot_high": [0.51, 0.34, 0.31],
        "n": [2, 2, 2]})


def test_verdict_table_names_the_best_and_who_is_within_its_noise():
    t = grid.verdict_table(summary(), ["mcc", "fvu"]).set_index("metric")
    assert t.loc["mcc", "best"] == "topk k=16" and t.loc["mcc", "better"] == "higher"
    assert t.loc["mcc", "mean [seed interval]"] == "0.700 [0.680, 0.720]"
    assert t.loc["mcc", "verdict"] == "ahead of every other beyond the seed noise"
    # fvu: batchtopk 0.30 [0.28, 0.32] overlaps topk k=32 [0.30, 0.36], not topk k=16
    assert t.loc["fvu", "best"] == "batchtopk k=16" and t.loc["fvu", "better"] == "lower"
    assert t.loc["fvu", "verdict"] == "within the seed noise of 1: topk k=32"


def test_pairs_say_when_the_two_differ_in_l0_and_are_counted():
    s = summary()
    pairs = grid.with_l0(compare(grid.labelled(s), ["fvu", "l0"], {"fvu": False}), s)
    fvu = pairs[pairs["metric"] == "fvu"].set_index(["a", "b"])
    # topk k=16 (L0 16) against topk k=32 (L0 32): seed intervals apart
    assert fvu.loc[("topk k=16", "topk k=32"), "differ_in_l0"]
    assert fvu.loc[("topk k=16", "topk k=32"), "verdict"].endswith(
        "at different L0 (16.0 vs 32.0): not like for like")
    # batchtopk's L0 interval [0.8, 28.3] holds 16: not told apart from topk k=16
    assert not fvu.loc[("topk k=16", "batchtopk k=16"), "differ_in_l0"]
    assert not pairs.loc[pairs["metric"] == "l0", "differ_in_l0"].any()
    counts = grid.pair_counts(pairs).set_index("metric")
    assert counts.loc["fvu", "pairs"] == 3
    assert counts.loc["fvu", "within noise"] + counts.loc["fvu", "told apart"] == 3
    assert counts.loc["fvu", "told apart"] == (~fvu["verdict"].str.startswith("within")).sum()


def test_every_metric_notebook_09_shows_is_defined():
    shown = [*grid.RECOVERY, "fvu", "l0", "ce_loss_recovered", "spearman", "p_value"]
    defined = grid.metric_definitions(shown)
    assert defined["metric"].tolist() == shown
    assert defined["definition"].str.len().min() > 20
    cells = [c.source for c in nbformat.read(NOTEBOOKS_DIR / "09_compare.ipynb", 4).cells]
    assert any("tables.definitions_view(grid.METRICS)" in c for c in cells)
    assert not any("print(\"\\n\".join(verdicts))" in c for c in cells)


def test_ce_loss_recovered_seed_intervals_stay_within_0_and_1():
    runs = pd.DataFrame({"architecture": "topk", "k": 8, "seed": [0, 1],
                         "ce_loss_recovered": [0.95, 0.60]})
    s = grid.summarize_runs(runs, ["ce_loss_recovered"])
    # unclipped, the 2-seed t interval is 0.775 +- 12.71 * 0.175
    assert s.loc[0, "ce_loss_recovered_low"] == 0.0 and s.loc[0, "ce_loss_recovered_high"] == 1.0


def test_pareto_figure_labels_points_and_keeps_bars_apart():
    s = summary()
    reference = {"name": "shipped default", "l0": 32.0, "fvu": 0.2, "ce_loss_recovered": 0.9}
    fig = pareto_figure(s, reference=reference)
    main = [t for t in fig.data if t.mode == "lines+markers+text"]
    assert sorted(tuple(t.text) for t in main if t.name == "topk") == [("k=16", "k=32")] * 2
    assert all(t.error_x.array is None for t in main)  # L0's wide seed bars are not drawn
    assert {t.error_y.thickness for t in main} == {3}
    boot = [t for t in fig.data if t.legendgroup == "bootstrap"]
    assert boot and all(t.error_y.color == "grey" for t in boot)
    topk = next(t for t in boot if list(t.y) == [0.50, 0.33])
    assert np.all(np.asarray(topk.x) > np.array([16.0, 32.0]))  # just right of the points
    stars = [t for t in fig.data if t.legendgroup == "reference"]
    assert len(stars) == 2 and stars[0].marker.symbol == "star"
    assert (stars[0].x[0], stars[0].y[0], stars[1].y[0]) == (32.0, 0.2, 0.9)


def test_grid_shows_a_progress_bar_over_its_runs(capsys):
    lab = make_lab(rows=1536, n_features=16, d=8, mean_l0=2, n_parents=1, children_per_parent=2)
    grid.train_grid(lab, ("topk",), (2,), (0, 1), d_sae=16, total_tokens=512, batch_size=128,
                    heldout=512, n_resamples=5)
    err = capsys.readouterr().err
    assert "lab grid runs" in err and "2/2" in err and "topk k=2 seed=1" in err


def test_reference_dictionary_is_scored_like_the_grid_runs():
    torch.manual_seed(0)
    acts = torch.randn(64, 8)
    store = SimpleNamespace(index=lambda rows: {"context": np.asarray(rows) // 8})
    split = SimpleNamespace(heldout_acts=acts, heldout_rows=np.arange(64), ce_tokens=None,
                            store=store)
    sae = TopKSAE(8, 16, k=3)
    row = grid.score_reference(sae, split, name="default")
    with torch.no_grad():
        recon = sae(acts).double().numpy()
        codes = sae.encode(acts).numpy()
    x = acts.double().numpy()
    fvu = ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert row["name"] == "default" and row["fvu"] == pytest.approx(fvu, rel=1e-5)
    assert row["l0"] == pytest.approx((codes != 0).sum(1).mean())
    with pytest.raises(grid.CompareError, match="d_in=4"):
        grid.score_reference(TopKSAE(4, 8, k=2), split)


def test_score_box_plot_titles_its_panels_in_words():
    from sae_nb.views.plotting import scores_box_figure

    table = pd.DataFrame({"method": ["rule", "rule:control", "llm", "llm:control", "llm"],
                          "score_name": ["f1", "f1", "detection_auroc", "detection_auroc",
                                         "detection_auroc"],
                          "score": [0.8, 0.1, 0.7, 0.5, np.nan]})
    fig = scores_box_figure(table)
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["rule F1<br>(chance about 0)", "detection AUROC<br>(chance 0.5)"]
    assert not any("=" in t for t in titles)
    boxes = {(t.name, t.xaxis): list(t.y) for t in fig.data}
    assert boxes == {("rule", "x"): [0.8], ("rule:control", "x"): [0.1], ("llm", "x2"): [0.7],
                     ("llm:control", "x2"): [0.5]}  # the NaN score is left out
    assert fig.layout.yaxis2.matches is None  # F1 and AUROC keep their own axes
