"""Notebook 08 and 09's figures drawn by plotly.js in chromium and measured as a person sees
them: the box plot's panel titles apart, the Pareto figure's point labels clear of the error
bars, the markers and each other. Screenshots go to the test's temporary folder."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from jupyter_browser import draw_figure, figure_browser  # noqa: F401 - the browser fixture

from sae_nb.views import plotting

pytestmark = pytest.mark.slow

BOXES = """sel => [...document.querySelectorAll(sel)].map(e => {
    const r = e.getBoundingClientRect();
    return {text: e.textContent, left: r.left, right: r.right, top: r.top, bottom: r.bottom};
})"""


def shared(a: dict, b: dict, slack: float = 1.0) -> float:
    """The area two boxes share, each shrunk by ``slack`` pixels (touching is not overlap)."""
    w = min(a["right"], b["right"]) - max(a["left"], b["left"]) - 2 * slack
    h = min(a["bottom"], b["bottom"]) - max(a["top"], b["top"]) - 2 * slack
    return max(w, 0.0) * max(h, 0.0)


def explanation_scores() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for name, methods in (("f1", ("rule", "rule:control")),
                          ("detection_auroc", ("rule", "rule:control", "llm", "llm:control")),
                          ("embedding_auroc", ("rule", "rule:control", "llm", "llm:control"))):
        for method in methods:
            for latent in range(20):
                rows.append({"latent": latent, "method": method, "score_name": name,
                             "score": float(rng.uniform(0.3, 0.9)), "explanation": "x",
                             "error": ""})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("width", [700, 900])
def test_box_plot_panel_titles_do_not_overlap(browser, tmp_path, width):
    page = draw_figure(browser, plotting.scores_box_figure(explanation_scores()),
                       tmp_path / f"boxes_{width}.png", width)
    titles = page.evaluate(BOXES, "#fig .annotation-text")
    assert len(titles) == 3
    for i, a in enumerate(titles):
        for b in titles[i + 1:]:
            assert a["right"] + 4 <= b["left"], (a, b)  # apart, with a gap


def main_job_grid() -> tuple[pd.DataFrame, dict]:
    """Notebook 09's real grid as the main job measured it (three architectures, k 16 and 32,
    two seeds), and the shipped default's reference point."""
    cols = ["architecture", "k", "fvu", "fvu_low", "fvu_high", "fvu_boot_low", "fvu_boot_high",
            "l0", "l0_low", "l0_high", "ce_loss_recovered", "ce_loss_recovered_low",
            "ce_loss_recovered_high", "ce_loss_recovered_boot_low", "ce_loss_recovered_boot_high"]
    m = "matryoshka_batchtopk"
    rows = [
        ("topk", 16, .509, .295, .724, .504, .516, 16.0, 16.0, 16.0, .754, .753, .755, .726,
         .785),
        ("topk", 32, .329, .175, .482, .322, .337, 32.0, 32.0, 32.0, .800, .726, .873, .776,
         .828),
        ("batchtopk", 16, .296, .202, .390, .283, .311, 14.57, .79, 28.3, .61, .33, .89, .59,
         .63),
        ("batchtopk", 32, .243, .180, .306, .232, .256, 27.05, 9.5, 44.6, .735, .655, .815,
         .71, .76),
        (m, 16, .317, .271, .363, .303, .331, 17.65, 0.0, 46.4, .615, .355, .875, .59, .64),
        (m, 32, .267, .250, .285, .256, .280, 32.23, 2.08, 62.4, .713, .325, 1.0, .655, .75)]
    reference = {"name": "shipped default", "l0": 32.0, "fvu": 0.0614,
                 "ce_loss_recovered": 0.987}
    return pd.DataFrame(rows, columns=cols), reference


@pytest.mark.parametrize("width", [900, 1000])
def test_pareto_point_labels_clear_of_bars_markers_and_each_other(browser, tmp_path, width):
    summary, reference = main_job_grid()
    page = draw_figure(browser, plotting.pareto_figure(summary, reference=reference),
                       tmp_path / f"pareto_{width}.png", width)
    labels = [b for b in page.evaluate(BOXES, "#fig .textpoint text") if b["text"] != ""]
    assert sorted(b["text"] for b in labels if b["text"].startswith("k=")) == (
        ["k=16"] * 6 + ["k=32"] * 6)
    bars = page.evaluate(BOXES, "#fig .errorbar path")
    markers = page.evaluate(BOXES, "#fig .point")
    assert len(bars) >= 24 and len(markers) >= 12
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            assert shared(a, b) == 0, ("labels overlap", a, b)
        for thing in bars + markers:
            assert shared(a, thing) == 0, ("label on a bar or marker", a, thing)
