"""Notebook 07's steering widget in a real JupyterLab and chromium, as a person uses it.

A copy of notebook 07 with the smoke parameters (papermill's injected cell, as the main job
writes it) is opened in JupyterLab and run from the Run menu; then the widget is used: Generate,
the coefficient slider moved with the keyboard, Generate again, and an attributed latent's
ablate button. Expected texts are generated here, in the test's own process, with the latent
and coefficient the page shows. Screenshots go to the module's temporary folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_browser import Chromium, notebook_after_run_all

from sae_nb.running.notebooks import NOTEBOOKS_DIR, SMOKE_PARAMETERS

pytestmark = pytest.mark.slow
NOTEBOOK = "notebooks/07_intervene.ipynb"
WIDGET = ".sae-nb-steering"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder with notebook 07 parameterised for the smoke run, and its run folder: the one
    ``SAE_NB_MAIN_RUN`` names (a main job already made), else a fresh smoke run of notebook 01,
    whose store gives the widget its token search."""
    import papermill

    Chromium()  # skip (or fail under CI) before the long steps when there is no browser
    root = tmp_path_factory.mktemp("repo")
    (root / "notebooks").mkdir()
    run_dir = root / "outputs" / "smoke"
    if run := os.environ.get("SAE_NB_MAIN_RUN"):
        run_dir = Path(run).resolve()
    else:
        subprocess.run([sys.executable, "-m", "sae_nb", "run", "--smoke", "--only", "01",
                        "--run", str(run_dir)], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    params = {**SMOKE_PARAMETERS["07_intervene"], "run_dir": str(run_dir)}
    papermill.execute_notebook(str(NOTEBOOKS_DIR / "07_intervene.ipynb"), str(root / NOTEBOOK),
                               parameters=params, prepare_only=True, kernel_name="python3")
    (root / "run_dir").write_text(str(run_dir))
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
    from sae_nb.interventions.effects import generate, neutral_tokens
    from sae_nb.interventions.steering import latent_method, site_scale

    widget = page.page.locator(WIDGET)
    number = widget.locator(".widget-inline-hbox input[type=number]").first
    latent = search_for_a_latent(page, widget, number, root)
    widget.locator("button", has_text="Generate").click()
    page.wait_for(lambda: len(texts(page)) == 2, 300, "the first generation")
    first_texts = texts(page)
    first_logits = widget.locator("table").first.inner_html()
    assert int(number.input_value()) == latent

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
    # shown together with the texts: the logit table is new by the time the texts are
    assert widget.locator("table").first.inner_html() != first_logits

    widget.locator("button", has_text="ablate").first.click()
    page.wait_for(lambda: "ablated at position" in widget.inner_text(), 300, "the ablation")
    page.screenshot("after_ablate")
    assert page.errors == []


def search_for_a_latent(page, widget, number, root) -> int:
    """Type a token into "find latent", press Enter: the steered latent becomes the search's
    best match (computed here from the same store and statistics) and its caption shows."""
    import sae_nb
    from sae_nb.latents.stats import FeatureStats, stats_folder
    from sae_nb.views.dashboard import dictionary_label, latent_captions
    from sae_nb.views.explorer_data import LatentSearch

    run_dir = Path((root / "run_dir").read_text())
    sae, lm = sae_nb.load_default_dictionary(), sae_nb.load_model()
    store = sae_nb.open_store(run_dir, sae_nb.dictionary_site(sae))
    stats = FeatureStats.load(stats_folder(run_dir, dictionary_label(sae)))
    query = " the"
    best = LatentSearch(stats, store, lm.tokenizer)(query)[0][0]
    box = widget.locator("input[placeholder^='a token']")
    box.fill(query)
    box.press("Enter")
    page.wait_for(lambda: number.input_value() == str(best), 120,
                  f"the search to pick latent {best}")
    caption = latent_captions(stats, store, lm.tokenizer, latents=[best])[best]
    page.wait_for(lambda: caption in widget.inner_text(), 30, "the latent's caption")
    assert "match" in widget.inner_text()
    page.screenshot("after_search")
    return best
