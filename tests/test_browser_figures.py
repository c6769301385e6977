"""Notebooks 04 and 05's figures drawn by plotly.js in chromium, measured as a person sees them:
the cluster map's title clear of its colour buttons, the sparse-probe plot's log axis labelled
at the k values probed, the layer sweep's sites as unrotated layer numbers. Screenshots go to
the test's temporary folder."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from jupyter_browser import draw_figure, figure_browser  # noqa: F401 - the browser fixture

from sae_nb.views import plotting

pytestmark = pytest.mark.slow


def box(page, selector: str) -> dict:
    return page.locator(selector).first.evaluate(
        "e => { const r = e.getBoundingClientRect(); "
        "return {left: r.left, right: r.right, top: r.top, bottom: r.bottom}; }")


def overlap(a: dict, b: dict) -> bool:
    return a["left"] < b["right"] and b["left"] < a["right"] and a["top"] < b["bottom"] \
        and b["top"] < a["bottom"]


def test_cluster_map_title_is_clear_of_its_buttons(browser, tmp_path):
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"text": [f"text {i}" for i in range(45)], "x": rng.normal(size=45),
                          "y": rng.normal(size=45), "cluster": rng.integers(0, 9, 45),
                          "label": rng.choice(["politics", "sports", "food"], 45)})
    page = draw_figure(browser, plotting.cluster_map_figure(table, "Texts by their codes (pca)"),
                       tmp_path / "cluster_map.png")
    title = box(page, "#fig .gtitle")
    buttons = [box(page, f"#fig .updatemenu-button >> nth={i}") for i in range(2)]
    assert not any(overlap(title, b) for b in buttons), (title, buttons)
    plot = box(page, "#fig .nsewdrag")
    assert all(b["bottom"] <= plot["top"] + 1 for b in buttons)  # and clear of the points


def tick_labels(page, axis: str) -> list[str]:
    return [t.replace("\u2212", "-") for t in
            page.locator(f"#fig .{axis}tick text").all_text_contents()]


def test_probe_plot_labels_its_log_axis_at_the_k_probed(browser, tmp_path):
    ks = [1, 2, 5, 10, 20, 50, 100, 200, 500]
    table = pd.DataFrame({"probe": ["raw", "all latents"] + [f"top {k} latents" for k in ks],
                          "k": [None, None] + ks,
                          "accuracy": [0.8, 0.7] + list(np.linspace(0.55, 0.75, len(ks))),
                          "majority_baseline": 0.5})
    page = draw_figure(browser, plotting.probe_accuracy_figure(table), tmp_path / "probes.png")
    assert tick_labels(page, "x") == [str(k) for k in ks]


def test_layer_sweep_shows_layers_unrotated(browser, tmp_path):
    sweep = pd.DataFrame({"site": [f"resid_out_layer{i}" for i in range(30)],
                          "accuracy": np.linspace(0.6, 0.8, 30), "roc_auc": 0.7,
                          "majority_baseline": 0.5})
    page = draw_figure(browser, plotting.layer_sweep_figure(sweep), tmp_path / "layer_sweep.png")
    labels = tick_labels(page, "x")
    assert labels and all(label.isdigit() for label in labels), labels
    assert len(labels) <= 16
    rotated = page.locator("#fig .xtick text").evaluate_all(
        "ts => ts.filter(t => (t.getAttribute('transform') || '').includes('rotate'))"
        ".length")
    assert rotated == 0
    title = page.locator("#fig .g-xtitle").text_content()
    assert "resid_out" in title and "layer" in title


def test_pareto_figure_keeps_its_legend_and_axis_titles_inside_a_notebooks_width(browser, tmp_path):
    # Notebook 09's figure in a 900 px output area (JupyterLab with the file browser open): the
    # legend once sat past the right edge and the y title past the left one, both cut off.
    rows = [{"architecture": a, "k": k, "l0": k * f, "fvu": 0.5 / k ** 0.5, "fvu_low": 0.05,
             "fvu_high": 0.6, "l0_low": 0.0, "l0_high": 3 * k, "ce_loss_recovered": 0.7,
             "ce_loss_recovered_low": 0.3, "ce_loss_recovered_high": 1.1}
            for a, f in (("topk", 1.0), ("batchtopk", 0.9), ("matryoshka_batchtopk", 1.1))
            for k in (16, 32)]
    page = draw_figure(browser, plotting.pareto_figure(pd.DataFrame(rows)), tmp_path / "pareto.png")
    figure = box(page, "#fig")  # the 900 px output area, not the figure's own svg
    assert figure["right"] - figure["left"] == pytest.approx(900)
    names = page.locator("#fig .legendtext").all_text_contents()
    assert names == ["topk", "batchtopk", "matryoshka_batchtopk"]
    parts = [box(page, f"#fig .legendtext >> nth={i}") for i in range(3)]
    parts += [box(page, f"#fig .g-{axis}title") for axis in ("y", "y2", "x", "x2")]
    parts.append(box(page, "#fig .gtitle"))  # the title, once longer than the 900 px
    for part in parts:
        assert figure["left"] <= part["left"] and part["right"] <= figure["right"], (part, figure)
        assert part["bottom"] <= figure["bottom"], (part, figure)
    plots = [box(page, f"#fig .nsewdrag >> nth={i}") for i in range(2)]
    assert not any(overlap(p, q) for p in plots for q in parts[:3])  # legend clear of the data
