"""Notebook 07's steering widget in a real JupyterLab and chromium, as a person uses it.

A copy of notebook 07 with the smoke parameters (papermill's injected cell, as the main job
writes it) is opened in JupyterLab and run from the Run menu; then the widget is used: Generate,
the coefficient slider moved with the keyboard, Generate again, and an attributed latent's
ablate button. Expected texts are generated here, in the test's own process, with the latent
and coefficient the page shows. Screenshots go to the module's temporary folder.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from jupyter_browser import Chromium, notebook_after_run_all
from sae_nb.pipeline import NOTEBOOKS_DIR, SMOKE_PARAMETERS

pytestmark = pytest.mark.slow
NOTEBOOK = "notebooks/07_intervene.ipynb"
WIDGET = ".sae-nb-steering"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder with notebook 07 parameterised for the smoke run, and its run folder."""
    import papermill

    Chromium()  # skip (or fail under CI) before the long steps when there is no browser
    root = tmp_path_factory.mktemp("repo")
    (root / "notebooks").mkdir()
    params = {**SMOKE_PARAMETERS["07_intervene"], "run_dir": str(root / "outputs" / "smoke")}
    papermill.execute_notebook(str(NOTEBOOKS_DIR / "07_intervene.ipynb"), str(root / NOTEBOOK),
                               parameters=params, prepare_only=True, kernel_name="python3")
    return root


@pytest.fixture(scope="module")
def page(root, tmp_path_factory):
    with notebook_after_run_all(root, NOTEBOOK, tmp_path_factory.mktemp("lab")) as page:
        yield page


def texts(page) -> list[str]:
    return page.page.locator(f"{WIDGET} pre").all_text_contents()


def test_notebook_runs_without_errors(page):
    assert page.error_outputs() == []
    assert all(p.isdigit() for p in page.prompts()), page.prompts()
    assert page.page.locator(WIDGET).count() == 1
    page.screenshot("after_run_all", full_page=True)


def test_generate_slide_generate_and_ablate(page, root):
    import sae_nb
    from sae_nb.effects import generate, neutral_tokens
    from sae_nb.steering import latent_method, site_scale

    widget = page.page.locator(WIDGET)
    widget.locator("button", has_text="Generate").click()
    page.wait_for(lambda: len(texts(page)) == 2, 300, "the first generation")
    first_texts = texts(page)
    first_logits = widget.locator("table").first.inner_html()
    latent = int(widget.locator(".widget-inline-hbox input[type=number]").first.input_value())

    readout = widget.locator(".widget-readout").first
    coefficient = round(float(readout.inner_text()) + 8 * 0.05, 2)  # 8 steps of 0.05
    handle = widget.locator(".noUi-handle").first
    handle.focus()
    for _ in range(8):
        handle.press("ArrowRight")
    page.wait_for(lambda: readout.inner_text().strip() == f"{coefficient:.2f}", 30,
                  f"the slider's readout to show {coefficient:.2f}")
    widget.locator("button", has_text="Generate").click()
    page.wait_for(lambda: texts(page) != first_texts, 300, "the steered text to change")
    page.screenshot("after_slider")

    lm, sae = sae_nb.load_model(), sae_nb.load_default_dictionary()
    values = SMOKE_PARAMETERS["07_intervene"]
    scale = site_scale(lm, sae, neutral_tokens(lm, n_contexts=values["neutral_contexts"],
                                               ctx_len=values["neutral_ctx_len"]))
    nb = nbformat.read(NOTEBOOKS_DIR / "07_intervene.ipynb", as_version=4)
    prompt = next(line for line in nb.cells[1].source.splitlines()
                  if line.startswith("prompt ")).split('"')[1]
    expected = generate(lm, prompt, sae, latent_method(sae, latent, scale).edits(coefficient),
                        max_new_tokens=values["max_new_tokens"])[0]
    clean, steered = texts(page)
    assert clean == first_texts[0] and steered == expected != first_texts[1]
    assert widget.locator("table").first.inner_html() != first_logits  # the logit table updated

    widget.locator("button", has_text="ablate").first.click()
    page.wait_for(lambda: "ablated at position" in widget.inner_text(), 300, "the ablation")
    page.screenshot("after_ablate")
    assert page.errors == []
