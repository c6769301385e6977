"""Notebook 08's score summary, method comparison and verdict tables in a real JupyterLab and
chromium at 1,400 x 1,000 with the file browser open, measured as a person sees them: every
header and cell inside its output area (none cut at the right edge, no scroll bar), the legend
and notes under them. A notebook of a few cells builds an explanation table the size of the
main job's (4,608 rule rows, 20 latents scored by detection and embedding, one language-model
label failed) and shows each table as notebook 08 does; the wide frame notebook 08 used to
show (``method_comparison`` as it is) is measured too, and found cut, so the measurement can
tell. Screenshots go to the test's temporary folder."""

from __future__ import annotations

import nbformat
import pytest
from jupyter_browser import notebook_after_run_all

pytestmark = pytest.mark.slow
NOTEBOOK = "explain_tables.ipynb"

BUILD = '''import numpy as np
import pandas as pd

import sae_nb
from sae_nb.views import explanation_tables

rng = np.random.default_rng(0)
rows = []
for f in range(4608):  # every latent's rule and its control, by held-out F1
    err = "never fires in the held-out rows: nothing to score" if f < 4 else ""
    for method, top in (("rule", 1.0), ("rule:control", 0.02)):
        score = np.nan if err else float(rng.uniform(0, top))
        rows.append((f, method, "tokens ' tax', ' taxes'", score, "f1", err))
sample = sorted(rng.choice(4608, 20, replace=False).tolist())
for f in sample:  # the language model's labels: one failed
    err = "nonsense reply: '7, 8, 9, 10, 11'" if f == sample[3] else ""
    rows.append((f, "llm", "" if err else "tax words", np.nan, "", err))
    for name in ("detection_auroc", "embedding_auroc"):
        for method in ("rule", "rule:control", "llm", "llm:control"):
            if err and method == "llm":
                rows.append((f, method, "", np.nan, name, f"no explanation to score ({err})"))
            else:
                rows.append((f, method, "x", float(rng.uniform(0.3, 0.9)), name, ""))
table = pd.DataFrame(rows, columns=["latent", "method", "explanation", "score", "score_name",
                                    "error"])
comparison = sae_nb.method_comparison(table)'''
CELLS = [BUILD,
         "explanation_tables.score_summary_view(table)",
         "explanation_tables.comparison_view(comparison)",
         "sae_nb.method_verdict(comparison)",
         "comparison  # the wide frame, as notebook 08 showed it before"]

# Per output table of the cell: its headers' and cells' right edges and the output area's.
MEASURE = """cell => {
    const area = cell.querySelector(".jp-OutputArea-output");
    const box = area.getBoundingClientRect();
    const cells = [...area.querySelectorAll("table th, table td")].map(e => {
        const r = e.getBoundingClientRect();
        return {text: e.textContent.trim(), right: r.right,
                scroll: e.scrollWidth, client: e.clientWidth};
    });
    return {right: box.right, scroll: area.scrollWidth, client: area.clientWidth, cells: cells,
            text: area.innerText};
}"""


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(code) for code in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}  # no kernel dialog on opening
    nbformat.write(nb, root / NOTEBOOK)
    with notebook_after_run_all(root, NOTEBOOK, tmp_path_factory.mktemp("lab"),
                                timeout=300) as page:
        if not page.sidebar_open():  # the narrowest notebook a person has: the browser open
            page.page.locator(".jp-SideBar [data-id='filebrowser']").click()
        page.page.wait_for_timeout(500)
        yield page


def measure(page, index: int) -> dict:
    cell = page.page.locator(".jp-CodeCell").nth(index)
    cell.scroll_into_view_if_needed()
    return cell.evaluate(MEASURE)


def cut(shown: dict) -> list[str]:
    """Headers and cells that end past the output area's right edge or overflow their box."""
    return [c["text"] for c in shown["cells"]
            if c["right"] > shown["right"] + 0.5 or c["scroll"] > c["client"] + 1]


def test_the_tables_fit_at_1400_px_with_the_file_browser_open(page):
    assert page.error_outputs() == []
    assert page.sidebar_open()
    summary, comparison, verdict = (measure(page, i) for i in (1, 2, 3))
    page.page.locator(".jp-CodeCell").nth(1).scroll_into_view_if_needed()
    page.screenshot("summary")
    page.page.locator(".jp-CodeCell").nth(2).scroll_into_view_if_needed()
    page.screenshot("comparison_and_verdict")
    for name, shown in (("summary", summary), ("comparison", comparison),
                        ("verdict", verdict)):
        assert shown["cells"], name
        assert cut(shown) == [], (name, cut(shown))
        assert shown["scroll"] <= shown["client"] + 1, (name, shown["scroll"], shown["client"])
    headers = [c["text"] for c in summary["cells"]]
    assert headers[:11] == ["method", "score", "latents", "scored", "not scored", "mean",
                            "median", "q25", "q75", ">0.5", ">0.8"]
    assert {"lead [95%]", "over", "margin [95%]"} <= {c["text"] for c in comparison["cells"]}
    # the legend and the notes under the summary, the failed label among them
    assert "share of them scoring above 0.5, 0.8" in summary["text"]
    assert "llm labels: 19 of 20 latents have one" in summary["text"]
    assert "rule f1: 4 not scored" in summary["text"]
    assert "NaN" not in summary["text"] and "nan" not in summary["text"]


def test_the_measurement_finds_the_wide_frame_cut(page):
    wide = measure(page, 4)
    page.screenshot("wide_frame")
    assert "lead_high" in cut(wide), cut(wide)
