"""Notebook 07's steering widget in a real JupyterLab and chromium, as a person uses it.

A copy of notebook 07 with the smoke parameters (papermill's injected cell, as the main job
writes it) is opened in JupyterLab and run from the Run menu; its tables of texts are checked
for full, left-aligned text and its long cells for a finished progress bar. Then the widget is
used as a person would: a latent found by token search, a second latent added, a temperature,
a seed and three samples set, Generate, a strength moved with the keyboard and Generate again
(the time from the click to the new text is measured and printed, not asserted), an attributed
latent ablated, and a latent number clicked to open it in the explorer. Expected texts are
generated here, in the test's own process, with the latents and strengths the page shows.
Screenshots go to the module's temporary folder.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from jupyter_browser import notebook_after_run_all, prepared_notebook

from sae_nb.running.notebooks import NOTEBOOKS_DIR, SMOKE_PARAMETERS

pytestmark = pytest.mark.slow
NOTEBOOK = "notebooks/07_intervene.ipynb"
WIDGET = ".sae-nb-steering"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder with notebook 07 parameterised for the smoke run, and its run folder: the one
    ``SAE_NB_MAIN_RUN`` names (a main job already made), else a fresh smoke run of notebook 01,
    whose store gives the widget its token search."""
    root = tmp_path_factory.mktemp("repo")
    run_dir = prepared_notebook(root, "07_intervene", NOTEBOOK)
    (root / "run_dir").write_text(str(run_dir))
    return root


@pytest.fixture(scope="module")
def page(root, tmp_path_factory):
    with notebook_after_run_all(root, NOTEBOOK, tmp_path_factory.mktemp("lab")) as page:
        yield page


def continuations(page, kind: str) -> list[str]:
    return page.page.locator(f"{WIDGET} .sae-nb-steer-texts .continuation.{kind}"
                             ).all_text_contents()


def status(widget) -> str:
    return widget.locator(".sae-nb-steer-status").inner_text()


def test_notebook_runs_without_errors(page, root):
    import pandas as pd

    assert page.error_outputs() == []
    assert all(p.isdigit() for p in page.prompts()), page.prompts()
    assert page.page.locator(WIDGET).count() == 1
    page.screenshot("after_run_all", full_page=True)
    # the generation table: every continuation in full, left-aligned, not cut by pandas
    run_dir = Path((root / "run_dir").read_text())
    table = pd.read_csv(run_dir / "intervene" / "generations.csv", keep_default_na=False)
    for text in table["edited"].tolist() + table["clean"].tolist():
        cell = page.page.locator(".jp-OutputArea-output td", has_text=text.strip()).first
        assert cell.text_content() == text  # full, whitespace kept
        assert cell.evaluate("e => getComputedStyle(e).textAlign") == "left"
    # the sweep's and the generations' progress bars, as they ended (tqdm: "desc: 100%")
    bars = [b.replace("\u2007", " ") for b in page.page.locator(
        ".jp-OutputArea-output .widget-html-content").all_text_contents()]
    for name in ("steering sweep", "generations"):
        assert any(b.startswith(f"{name}: 100%") for b in bars), bars


# Each ablate button with the line beside it, in the widget narrowed to ``width`` pixels (0:
# its own width): the button's label width against its box, and the line's height in lines.
# ``flex`` lays both out another way for the measurement ("" keeps the widget's own layout,
# which ipywidgets writes as inline styles: they are saved and put back).
ABLATE_ROWS = """([root, width, flex]) => {
    const widget = document.querySelector(root);
    widget.style.width = width ? width + "px" : "";
    const buttons = [...widget.querySelectorAll("button")]
        .filter(b => /^ablate \\d+$/.test(b.textContent.trim()));
    for (const e of buttons.flatMap(b => [b, b.nextElementSibling])) {
        if (e.dataset.flex === undefined) {
            e.dataset.flex = e.style.flex; e.dataset.minWidth = e.style.minWidth;
        }
        e.style.flex = flex || e.dataset.flex;
        e.style.minWidth = flex ? "auto" : e.dataset.minWidth;
    }
    return buttons.map(b => {
        const line = b.nextElementSibling, lh = parseFloat(getComputedStyle(line).lineHeight);
        return {label: b.textContent.trim(), scroll: b.scrollWidth, client: b.clientWidth,
                lines: Math.round(line.getBoundingClientRect().height / (lh || 17))};
    });
}"""


def test_ablate_buttons_show_their_full_label_when_the_rows_wrap(page):
    """Narrowed to 420 px, every attributed row's line wraps; each ablate button still shows
    "ablate <latent>" whole (its label no wider than its box). The same measurement on the
    layout before the buttons were kept from shrinking (button and line both "0 1 auto")
    finds cut labels, so it can tell."""
    widget = page.page.locator(WIDGET)
    try:
        rows = page.page.evaluate(ABLATE_ROWS, [WIDGET, 420, ""])
        widget.locator("button", has_text="ablate").first.scroll_into_view_if_needed()
        page.screenshot("ablate_rows_at_420px")
        assert len(rows) >= 3, rows
        assert all(r["lines"] >= 2 for r in rows), rows  # the rows do wrap at this width
        for r in rows:
            assert r["scroll"] <= r["client"], r  # "ablate 4329" in full, not "ablate 43..."
        old = page.page.evaluate(ABLATE_ROWS, [WIDGET, 420, "0 1 auto"])
        page.screenshot("ablate_rows_at_420px_shrinking_layout")
        assert any(r["scroll"] > r["client"] for r in old), old
    finally:
        page.page.evaluate(ABLATE_ROWS, [WIDGET, 0, ""])


def test_steer_two_latents_sample_ablate_and_open_the_explorer(page, root):
    import time

    import sae_nb
    from sae_nb.interventions.effects import neutral_tokens
    from sae_nb.interventions.session import Sampling, SteeringSession
    from sae_nb.interventions.steering import site_scale

    widget = page.page.locator(WIDGET)
    rows = widget.locator(".sae-nb-row")
    first = search_for_a_latent(page, widget, rows.nth(0).locator("input[type=number]"), root)
    widget.locator(".sae-nb-steer-add-button").click()
    page.wait_for(lambda: rows.count() == 2, 30, "a second latent row")
    second = 100 if first != 100 else 101
    box = rows.nth(1).locator("input[type=number]")
    box.fill(str(second))
    box.press("Enter")
    press(rows.nth(1).locator(".noUi-handle"), "ArrowLeft", 10)  # 0.25 -> -0.25
    press(widget.locator(".sae-nb-steer-temperature .noUi-handle"), "ArrowRight", 16)  # 0 -> 0.8
    for name, value in (("seed", "3"), ("samples", "3")):
        field = widget.locator(f".sae-nb-steer-{name} input")
        field.fill(value)
        field.press("Enter")
    readouts = lambda: [slider_value(r) for r in widget.locator(  # noqa: E731
        ".sae-nb-row .widget-readout").all()]
    page.wait_for(lambda: readouts()[1] == -0.25 and widget.locator(
        ".sae-nb-steer-temperature .widget-readout").inner_text().strip() == "0.80", 30,
        "the strength and the temperature")
    widget.locator(".sae-nb-steer-generate-button").click()
    page.wait_for(lambda: "seeds [3, 4, 5]" in status(widget), 300, "three samples")
    widget.locator(".sae-nb-steer-texts").scroll_into_view_if_needed()
    page.screenshot("after_generate_three_samples")

    lm, sae = sae_nb.load_model(), sae_nb.load_default_dictionary()
    values = SMOKE_PARAMETERS["07_intervene"]
    scale = site_scale(lm, sae, neutral_tokens(lm, n_contexts=values["neutral_contexts"],
                                               ctx_len=values["neutral_ctx_len"]))
    nb = nbformat.read(NOTEBOOKS_DIR / "07_intervene.ipynb", as_version=4)
    prompt = next(line for line in nb.cells[1].source.splitlines()
                  if line.startswith("prompt ")).split('"')[1]

    # the widget decodes in bfloat16 (tests/test_steering_session.py checks that against
    # hand-written bfloat16 decodes); here a session of its own in the same precision
    session = SteeringSession(lm, sae, scale, precision="bfloat16")

    def expected(strengths):
        sampling = Sampling(temperature=0.8, seed=3, samples=3,
                            max_new_tokens=values["max_new_tokens"])
        return (session.clean(prompt, sampling).texts,
                session.steered(prompt, strengths, sampling).texts)

    strengths = list(zip((first, second), readouts()))
    clean, steered = expected(strengths)
    assert continuations(page, "clean") == clean and continuations(page, "steered") == steered
    for text in widget.locator(".sae-nb-steer-texts .sae-nb-text").all():  # never cut
        assert text.evaluate("e => e.scrollWidth <= e.clientWidth + 1"), text.inner_text()
        assert text.evaluate("e => getComputedStyle(e).textAlign") == "left"

    press(rows.nth(0).locator(".noUi-handle"), "ArrowRight", 4)  # a new strength: clean cached
    page.wait_for(lambda: readouts()[0] != strengths[0][1], 30, "the first strength to move")
    start = time.monotonic()
    widget.locator(".sae-nb-steer-generate-button").click()
    page.wait_for(lambda: f"x {readouts()[0]:g}" in status(widget)
                  and "answered" in status(widget), 300, "the second generation")
    seconds = time.monotonic() - start
    print(f"second Generate: {seconds:.2f} s from the click to the new text in the page; "
          f"the kernel says: {status(widget)}")
    (page.shots / "second_generate_seconds.txt").write_text(f"{seconds:.3f}\n{status(widget)}\n")
    assert "clean run cached" in status(widget)
    assert "continuations decoded in bfloat16" in status(widget)
    strengths = list(zip((first, second), readouts()))
    clean, steered = expected(strengths)
    assert continuations(page, "steered") == steered and continuations(page, "clean") == clean
    widget.locator(".sae-nb-steer-logits").scroll_into_view_if_needed()
    page.screenshot("after_second_generate")

    widget.locator("button", has_text="ablate").first.click()
    page.wait_for(lambda: "ablated at position" in widget.locator(".sae-nb-steer-ablation")
                  .inner_text(), 300, "the ablation")
    shown = widget.locator(".sae-nb-steer-ablation").inner_text()
    assert "without the steering edit" in shown and "predicted" in shown and "measured" in shown
    assert widget.locator(".sae-nb-steer-ablation .continuation.clean").count() == 3  # beside clean
    widget.locator(".sae-nb-steer-ablation").scroll_into_view_if_needed()
    page.screenshot("after_ablate")

    link = widget.locator(".sae-nb-steer-ablation a.latent-link").first
    target = int(link.get_attribute("data-latent"))
    link.click()
    number = widget.locator(".sae-nb-explorer .sae-nb-number input")
    page.wait_for(lambda: number.is_visible() and number.input_value() == str(target), 60,
                  f"the explorer to open latent {target}")
    number.scroll_into_view_if_needed()
    page.screenshot("after_open_in_explorer")
    assert page.errors == []


def slider_value(readout) -> float:
    """A slider's readout as a number (d3-format writes a minus sign, not a hyphen)."""
    return float(readout.inner_text().strip().replace("\u2212", "-"))


def press(locator, key: str, times: int) -> None:
    locator.focus()
    for _ in range(times):
        locator.press(key)


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
    box = widget.locator("input[placeholder='a token, e.g. great']")
    box.fill(query)
    box.press("Enter")
    page.wait_for(lambda: number.input_value() == str(best), 120,
                  f"the search to pick latent {best}")
    caption = latent_captions(stats, store, lm.tokenizer, latents=[best])[best]
    page.wait_for(lambda: caption in widget.inner_text(), 30, "the latent's caption")
    assert "match" in widget.inner_text()
    page.screenshot("after_search")
    return best
