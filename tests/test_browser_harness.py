"""The real-browser harness itself (tests/jupyter_browser.py), on a notebook of two widgets:
JupyterLab starts, chromium opens the notebook, Run All runs it, and typing into a widget
reaches the kernel and comes back to the page."""

from __future__ import annotations

import nbformat
import pytest
from jupyter_browser import Chromium, JupyterLab

CELLS = [
    "import ipywidgets as widgets",
    "number = widgets.IntText(3, description='n')\n"
    "square = widgets.Label('9')\n"
    "number.observe(lambda c: setattr(square, 'value', str(c['new'] ** 2)), names='value')\n"
    "widgets.HBox([number, square])",
    "1 / 0",  # Run All stops here
    "'never run'",
]


@pytest.mark.slow
def test_harness_runs_a_notebook_and_drives_a_widget(tmp_path):
    chromium = Chromium()  # skips without chromium (fails under CI) before starting anything
    root = tmp_path / "root"
    root.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, root / "square.ipynb")
    with JupyterLab(root, tmp_path / "lab") as lab, chromium:
        page = chromium.new_page(lab, tmp_path / "screenshots")
        page.open_notebook("square.ipynb")
        page.run_all(timeout=120)
        assert page.prompts() == ["1", "2", "3", ""]
        (error,) = page.error_outputs()
        assert "ZeroDivisionError" in error
        box = page.page.locator(".jp-OutputArea .widget-text input")
        box.fill("12")
        box.press("Enter")
        label = page.page.locator(".jp-OutputArea div.widget-label", has_text="144")
        label.wait_for(timeout=20_000)  # computed by the kernel: 12 ** 2
        shot = page.screenshot("square_widget")
        assert shot.stat().st_size > 10_000
        assert page.errors == []
