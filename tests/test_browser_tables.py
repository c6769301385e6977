"""Notebook 09's tables, and notebook 08's labels and search results, in a real JupyterLab and
chromium at 1,400 x 1,000 with the file browser open, measured with the DOM as a person sees
them: no table wider than its output area, and no interval cell whose text spans more than one
line (the height of its text against its line height).

Notebook 09 runs from the Run menu with the smoke parameters on a smoke run of notebook 01
(``SAE_NB_MAIN_RUN`` names a run folder to reuse instead); a last cell shows the raw frame it
used to show (``grid.readable``), and the measurement finds that one's intervals wrapped, so it
can tell. Notebook 08's two tables are shown on frames of the main job's size with its longest
texts (a notebook of a few cells beside 09, in the same JupyterLab: 08 itself needs the
language models). Screenshots go to the tests' temporary folder."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from jupyter_browser import notebook_after_run_all, prepared_notebook

pytestmark = pytest.mark.slow
NOTEBOOK = "notebooks/09_compare.ipynb"
OLD_FRAME = "grid.readable(real_summary, real_metrics)  # the raw frame 09 used to show"

# Per output table of a cell: its width against the output area's, and each cell holding an
# interval "x [lo, hi]": how many lines its text takes (the height of its text's box over its
# line height, and the distinct tops of its line boxes).
MEASURE = """cell => [...cell.querySelectorAll(".jp-OutputArea-output")].map(area => {
    const box = area.getBoundingClientRect();
    const tables = [...area.querySelectorAll("table")].map(t => {
        const r = t.getBoundingClientRect();
        return {left: r.left, right: r.right, width: r.width};
    });
    const intervals = [...area.querySelectorAll("td, th")]
        .filter(e => /\\[[^\\]]+, [^\\]]+\\]/.test(e.textContent)).map(e => {
        const range = document.createRange();
        range.selectNodeContents(e);
        const style = getComputedStyle(e);
        const line = style.lineHeight === "normal" ? 1.2 * parseFloat(style.fontSize)
                                                   : parseFloat(style.lineHeight);
        const tops = new Set([...range.getClientRects()].map(q => Math.round(q.top)));
        return {text: e.textContent.trim(), height: range.getBoundingClientRect().height,
                line: line, tops: tops.size};
    });
    return {left: box.left, right: box.right, scroll: area.scrollWidth, client: area.clientWidth,
            tables: tables, intervals: intervals, text: area.innerText};
})"""


def open_file_browser(page) -> None:
    """The narrowest notebook a person has at 1,400 px: the file browser open beside it."""
    if not page.sidebar_open():
        page.page.locator(".jp-SideBar [data-id='filebrowser']").click()
    page.page.wait_for_timeout(500)


def measure(page, index: int) -> list[dict]:
    cell = page.page.locator(".jp-CodeCell").nth(index)
    cell.scroll_into_view_if_needed()
    return cell.evaluate(MEASURE)


def too_wide(outputs: list[dict]) -> list[tuple]:
    return [(t["width"], o["right"] - o["left"]) for o in outputs for t in o["tables"]
            if t["right"] > o["right"] + 0.5 or o["scroll"] > o["client"] + 1]


def wrapped(outputs: list[dict]) -> list[str]:
    """Interval cells whose text takes more than one line."""
    return [i["text"] for o in outputs for i in o["intervals"]
            if i["tops"] > 1 or i["height"] > 1.5 * i["line"]]


@pytest.fixture(scope="module")
def root09(tmp_path_factory) -> Path:
    """Notebook 09 with the smoke parameters (papermill's injected cell) and the old frame's
    cell at the end, on a smoke run of notebook 01."""
    root = tmp_path_factory.mktemp("repo")
    prepared_notebook(root, "09_compare", NOTEBOOK)
    nb = nbformat.read(root / NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(OLD_FRAME))
    nbformat.write(nb, root / NOTEBOOK)
    return root


@pytest.fixture(scope="module")
def page09(root09, tmp_path_factory):
    with notebook_after_run_all(root09, NOTEBOOK, tmp_path_factory.mktemp("lab09"),
                                timeout=900) as page:
        open_file_browser(page)
        yield page


def cell_index(page, text: str) -> int:
    sources = page.page.locator(".jp-CodeCell .jp-InputArea-editor").all_text_contents()
    found = [i for i, s in enumerate(sources) if text in s]
    assert found, (text, sources)
    return found[0]


def test_notebook_09s_tables_fit_and_no_interval_wraps(page09):
    assert page09.error_outputs() == []
    assert page09.sidebar_open()
    shown = {}
    for name, text in (("definitions", "definitions_view"), ("lab", "summary_view(lab_summary"),
                       ("verdict", "verdict_view"), ("lab_pairs", "pairs_view(lab_pairs"),
                       ("agreement", "agreement_view"), ("real", "summary_view(real_summary"),
                       ("reference", "reference_view"), ("real_pairs", "pairs_view(real_pairs")):
        shown[name] = measure(page09, cell_index(page09, text))
        page09.screenshot(f"09_{name}")
    for name, outputs in shown.items():
        assert any(o["tables"] for o in outputs), name
        assert too_wide(outputs) == [], (name, too_wide(outputs))
        assert wrapped(outputs) == [], (name, wrapped(outputs))
    # the intervals are there, whole: each summary has one per row and metric
    lab = [i["text"] for o in shown["lab"] for i in o["intervals"]]
    assert len(lab) == 6 * 6  # 3 architectures x 2 k, 6 metrics
    real = [i["text"] for o in shown["real"] for i in o["intervals"]]
    assert len(real) == 6 * 3 * 2  # 3 metrics, each its seed and its bootstrap interval
    assert len([i for o in shown["reference"] for i in o["intervals"]]) == 3
    text = "".join(o["text"] for o in shown["real_pairs"])
    assert "fvu: 15 pairs" in text and "L0 a / b" in text
    assert "each row over 2 distinct seeds" in "".join(o["text"] for o in shown["real"])


def test_the_measurement_finds_the_old_frames_intervals_wrapped(page09):
    old = measure(page09, cell_index(page09, OLD_FRAME.split("  #")[0]))
    page09.screenshot("09_old_frame")
    assert wrapped(old), [i["text"] for o in old for i in o["intervals"]]


LONG = ("tokens ' Commission', ' commission', ' authority', ' agencies', ' regulators', "
        "' regulatory', ' oversight', ' enforcement', ' compliance', ' inspection'")
BUILD = f'''import pandas as pd
from sae_nb.views import explanation_tables

long = {LONG!r}
label = "laws, way, weapons, our, will, world"
llm = pd.DataFrame({{"latent": range(20), "explanation": [label] * 19 + [""],
                     "error": [""] * 19 + ["nonsense reply: '7, 8, 9, 10, 11'"]}})
rules = pd.DataFrame({{"latent": range(20), "explanation": [long] * 20}})
results = pd.DataFrame({{"latent": range(4000, 4010), "score": [0.510097] * 10,
                        "explanation_similarity": [0.518348] * 10,
                        "context_similarity": [0.490846] * 10, "explanation": [long] * 10}})'''
CELLS_08 = [BUILD, "explanation_tables.labels_view(llm, rules)",
            "explanation_tables.search_view(results, 0.7)"]


@pytest.fixture(scope="module")
def page08(page09, root09):
    """The notebook of 08's two tables, opened and run in the same JupyterLab and chromium."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(code) for code in CELLS_08]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}  # no kernel dialog on opening
    nbformat.write(nb, root09 / "notebooks" / "tables08.ipynb")
    page09.open_notebook("notebooks/tables08.ipynb")
    page09.run_all(timeout=300)
    open_file_browser(page09)
    return page09


def test_notebook_08s_labels_and_search_fit_with_every_text_whole(page08):
    assert page08.error_outputs() == []
    for index, name in ((1, "labels"), (2, "search")):
        cell = page08.page.locator(".jp-NotebookPanel:visible .jp-CodeCell").nth(index)
        cell.scroll_into_view_if_needed()
        outputs = cell.evaluate(MEASURE)
        page08.screenshot(f"08_{name}")
        assert any(o["tables"] for o in outputs), name
        assert too_wide(outputs) == [], (name, too_wide(outputs))
        text = "".join(o["text"] for o in outputs)
        # every explanation whole (line breaks fall between its words only)
        assert " ".join(text.split()).count(" ".join(LONG.split())) >= 10, name
        assert "..." not in text
