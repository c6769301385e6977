"""Notebook 06 in a real JupyterLab and chromium, right after the main job, as a person meets it.

The module runs the main job's notebook 01 with the smoke parameters into ``outputs/default``
of a temporary copy of the repository's notebooks, opens notebook 06 *as shipped* in JupyterLab
(the file browser open, a 1,400 x 1,000 window), runs all cells from the Run menu, then uses the
explorer: the number box, a reload, search, the text box, prev/next, and measures every element
of the widget for overflow. Expected values come from the store encoded here with the
dictionary, not from the widget. Screenshots go to the module's temporary folder; ``pytest -s``
prints their paths. The tests share one page and run in file order.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import papermill
import pytest
import torch
from jupyter_browser import Chromium, notebook_after_run_all

import sae_nb
from sae_nb.latents.contexts import latent_contexts
from sae_nb.latents.stats import FeatureStats, stats_folder
from sae_nb.running.notebooks import NOTEBOOKS_DIR

pytestmark = pytest.mark.slow
NOTEBOOK = "notebooks/06_visualize.ipynb"
SITE = "resid_out_layer6"  # the default dictionary's site, in the smoke store of notebook 01
EXPLORER = ".sae-nb-explorer"


@pytest.fixture(scope="module")
def main_job(tmp_path_factory) -> Path:
    """A copy of the notebooks beside ``outputs/default`` written by the main job (smoke size),
    or linked to the run folder ``SAE_NB_MAIN_RUN`` names (a whole main job run already made,
    e.g. by ``python -m sae_nb run --smoke --run /tmp/smoke``; notebook 06 writes into it)."""
    Chromium()  # skip (or fail under CI) before the long steps when there is no browser
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(NOTEBOOKS_DIR, root / "notebooks",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    if run := os.environ.get("SAE_NB_MAIN_RUN"):
        (root / "outputs").mkdir()
        (root / "outputs" / "default").symlink_to(Path(run).resolve(), target_is_directory=True)
        return root
    subprocess.run([sys.executable, "-m", "sae_nb", "run", "--smoke", "--only", "01",
                    "--outputs", str(root / "outputs")], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return root


@pytest.fixture(scope="module")
def page(main_job, tmp_path_factory):
    """Notebook 06 open in chromium after Run All."""
    with notebook_after_run_all(main_job, NOTEBOOK, tmp_path_factory.mktemp("lab"),
                                shot_opened=True) as page:
        yield page


@pytest.fixture(scope="module")
def truth(main_job):
    """The store, the dictionary's codes of every row (computed here), and the cached stats."""
    run_dir = main_job / "outputs" / "default"
    store = sae_nb.open_stores(run_dir)[SITE]
    sae = sae_nb.load_default_dictionary()
    with torch.no_grad():
        codes = torch.cat([sae.encode(torch.from_numpy(store[lo: lo + 512]).float())
                           for lo in range(0, len(store), 512)]).numpy()  # (N, F)
    stats = FeatureStats.load(stats_folder(run_dir, "topk_4608_k32"))
    return store, sae, codes, stats


def shown_latent(page) -> int:
    text = page.page.locator(f"{EXPLORER} .summary b").first.text_content() or ""
    return int(text.split()[-1]) if text.strip() else -1  # -1 before the widget is drawn


def histogram_y(page) -> list[float]:
    return page.page.evaluate(
        f"() => Array.from(document.querySelector('{EXPLORER} .js-plotly-plot').data[0].y)")


def brute_histogram(codes, stats, latent: int) -> list[int]:
    values = codes[:, latent][codes[:, latent] > 0]
    edges = stats.hist_edges[latent]
    counts = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0]
    return counts.tolist()


def test_notebook_06_runs_after_the_main_job(page, main_job):
    """As shipped, Run All after the main job reads outputs/default and says so."""
    assert page.error_outputs() == []
    code_cells = [c for c in nbformat.read(main_job / NOTEBOOK, as_version=4).cells
                  if c.cell_type == "code"]
    assert page.prompts() == [str(i + 1) for i in range(len(code_cells))]
    assert page.page.get_by_text("Run folder: ../outputs/default").count() == 1
    assert page.sidebar_open()
    page.page.get_by_text("Run folder: ../outputs/default").scroll_into_view_if_needed()
    page.screenshot("run_folder_note")
    scroll_to(page, EXPLORER)
    page.screenshot("explorer_after_run_all")


def explorer(page):
    return page.page.locator(EXPLORER)


def scroll_to(page, selector: str) -> None:
    """Scroll the notebook so the element is at the top of the window, for a screenshot."""
    page.page.locator(selector).first.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.page.wait_for_timeout(500)


def wait_for_latent(page, latent: int) -> None:
    page.wait_for(lambda: shown_latent(page) == latent, 30, f"the explorer to show {latent}")


def test_first_latent_shown_is_not_a_max_activation_outlier(page, truth):
    """The default order opens on an ordinary latent, not on the ~30 outliers of max
    activation (brute force: the largest activations of every latent over the store)."""
    _, _, codes, _ = truth
    max_act, density = codes.max(0), (codes > 0).mean(0)
    first = shown_latent(page)
    assert first not in set(np.argsort(-max_act)[:20].tolist())
    assert density[first] <= 0.05 and max_act[first] > 0


def select_text(locator) -> str:
    """The text a <select> shows: its selected option's, '' when none is selected."""
    text = locator.evaluate("s => s.selectedIndex < 0 ? '' : s.options[s.selectedIndex].text")
    return text.replace("\xa0", " ")  # ipywidgets writes options with no-break spaces


def test_search_shows_the_first_match_and_clears_when_leaving(page, truth):
    """Enter in the search box moves the panel to the best match, counts the matches, shows
    the first one in the menu; moving elsewhere clears the stale choice."""
    store, sae, codes, stats = truth
    tokenizer = sae_nb.load_model("smollm2-135m").tokenizer
    for latent in np.argsort(-(codes > 0).sum(0))[40:]:  # a word from an ordinary latent's top
        (top,) = latent_contexts(store, sae, int(latent), stats.top_rows[latent, :1], tokenizer)
        query = "".join(top["tokens"][max(top["center"] - 1, 0): top["center"] + 1])
        if query.replace(" ", "").isalpha() and len(query.strip()) >= 4:  # typeable, not "\n"
            break
    before = shown_latent(page)
    box = explorer(page).locator(".sae-nb-query input")
    box.fill(query)
    box.press("Enter")
    status = explorer(page).locator(".sae-nb-search-status")
    page.wait_for(lambda: "match" in status.text_content(), 120, "the search result")
    status = status.text_content()
    menu = explorer(page).locator(".sae-nb-matches select")
    n = menu.locator("option").count()
    assert n >= 1 and int(status.split()[0]) >= n and "match" in status
    best = shown_latent(page)
    assert select_text(menu).startswith(f"latent {best} ")
    contexts = explorer(page).locator(".sae-nb-contexts").text_content().lower()
    assert query.lower().strip() in contexts  # the latent shown fires around the query
    assert best != before or n == 1
    scroll_to(page, f"{EXPLORER} .sae-nb-query")
    page.screenshot("search_result")
    explorer(page).locator(".sae-nb-next-button").click()
    page.wait_for(lambda: shown_latent(page) != best, 30, "next to move on")
    assert select_text(menu) == ""  # the stale match is cleared; the menu keeps the matches
    assert menu.locator("option").count() == n


def test_meaning_search_lists_latents_with_similarities(page, truth, main_job):
    """A query in the meaning box fills its menu with latents and similarities, best first,
    and shows the best, the one the meaning index ranks first. The index is rebuilt here (no
    cache) from what notebook 06 reads: the top contexts, and notebook 08's explanations when
    the main job ran it on this run folder."""
    from sae_nb.explanations.meaning import meaning_index
    from sae_nb.explanations.tables import explanations_folder

    store, sae, codes, stats = truth
    tokenizer = sae_nb.load_model("smollm2-135m").tokenizer
    explained = explanations_folder(main_job / "outputs" / "default", "topk_4608_k32")
    expected = meaning_index(stats, store, tokenizer,
                             explained if explained.is_dir() else None).search("taxes", 20)
    box = explorer(page).locator(".sae-nb-meaning input")
    box.fill("taxes")
    box.press("Enter")
    status = explorer(page).locator(".sae-nb-meaning-status")
    page.wait_for(lambda: "closest in meaning" in status.text_content(), 600,
                  "the meaning search (embeds the latents' contexts once)")
    menu = explorer(page).locator(".sae-nb-meaning-matches select")
    options = [o.replace("\xa0", " ") for o in menu.locator("option").all_text_contents()]
    assert len(options) == len(expected) == 20
    best = int(expected["latent"].iloc[0])
    wait_for_latent(page, best)
    assert select_text(menu).startswith(f"latent {best} ")
    assert options[0].endswith(f"(similarity {expected['score'].iloc[0]:.2f})")
    shown = [float(o.rsplit("similarity ", 1)[1].rstrip(")")) for o in options]
    assert shown == sorted(shown, reverse=True)
    scroll_to(page, f"{EXPLORER} .sae-nb-meaning")
    page.screenshot("meaning_search")


def test_text_box_busy_result_and_empty_text(page):
    """Run shows a busy state, then the shaded text; an empty box gets a message."""
    text = "The state of the union is strong, and taxes will fall in 2027."
    area = explorer(page).locator(".sae-nb-text textarea")
    run = explorer(page).locator(".sae-nb-run-button")
    area.fill(text)
    run.click()
    explorer(page).locator(".sae-nb-run-button:disabled").wait_for(timeout=10_000)
    assert "Running" in run.text_content()
    page.screenshot("text_box_busy")
    view = explorer(page).locator(".sae-nb-text-view")
    view.locator(".tok").first.wait_for(timeout=120_000)
    page.wait_for(lambda: run.is_enabled(), 30, "Run to be enabled again")
    assert "".join(view.locator(".tok").all_text_contents()) == text
    assert explorer(page).locator(".sae-nb-text-latents tr").count() > 1
    view.scroll_into_view_if_needed()
    page.screenshot("text_box_result")
    area.fill("")
    run.click()
    page.wait_for(lambda: "Type some text" in view.text_content(), 30, "the empty-text message")
    assert explorer(page).locator(".sae-nb-text-latents tr").count() == 0
    assert "CorpusError" not in explorer(page).text_content()
    page.screenshot("text_box_empty")


def test_latent_links_open_the_latent(page, truth):
    """Expected feature: a latent number listed in the explorer (the text box's table, the
    nearest latents) is a link; a click shows that latent, with its own histogram."""
    _, _, codes, stats = truth
    area = explorer(page).locator(".sae-nb-text textarea")
    area.fill("Congress will cut taxes and raise tariffs on steel in 2027.")
    explorer(page).locator(".sae-nb-run-button").click()
    table = explorer(page).locator(".sae-nb-text-latents")
    table.locator("a.latent-link").first.wait_for(timeout=120_000)
    links = table.locator("a.latent-link")
    target = int(links.nth(1).get_attribute("data-latent"))
    assert target != shown_latent(page)
    links.nth(1).click()
    wait_for_latent(page, target)
    expected = brute_histogram(codes, stats, target)
    page.wait_for(lambda: histogram_y(page) == expected, 20, "the histogram to follow the link")
    near = explorer(page).locator(".sae-nb-related a.latent-link")
    assert near.count() >= 1
    neighbour = int(near.first.get_attribute("data-latent"))
    w = truth[1].W_dec.detach().numpy()
    cos = (w / np.linalg.norm(w, axis=1, keepdims=True)) @ (w[target] / np.linalg.norm(w[target]))
    cos[target] = -np.inf
    assert neighbour == int(np.argmax(cos))  # brute force over every decoder row
    scroll_to(page, f"{EXPLORER} .sae-nb-summary")
    page.screenshot("after_latent_link")
    near.first.click()
    wait_for_latent(page, neighbour)


OVERFLOW_JS = """root => {
    const bad = [], box = root.getBoundingClientRect();
    for (const el of [root, ...root.querySelectorAll('*')]) {
        if (el instanceof SVGElement) continue;  // plotly's drawing, measured by its <div>
        if (String(el.className).startsWith('noUi-')) continue;  // the slider's handle, by design
        const r = el.getBoundingClientRect();
        if (r.width === 0) continue;
        const name = el.tagName.toLowerCase() + '.' + String(el.className).split(' ').join('.');
        // A slider's track and its container overflow by half a handle when the handle sits
        // at the far end (a dense latent ranks last): ipywidgets draws it so, nothing is cut.
        const track = /(^| )(noUi-target|slider-container)( |$)/.test(String(el.className));
        if (!track && el.scrollWidth > el.clientWidth + 1 && el.clientWidth > 0)
            bad.push(`${name}: scrollWidth ${el.scrollWidth} > clientWidth ${el.clientWidth}`);
        if (r.right > box.right + 1 || r.left < box.left - 1)
            bad.push(`${name}: [${r.left}, ${r.right}] outside [${box.left}, ${box.right}]`);
    }
    return bad;
}"""


def test_no_element_of_the_widget_overflows_its_box(page):
    """At 1,400 x 1,000 with the file browser open, nothing is clipped; the logit table says
    what its numbers are."""
    assert page.sidebar_open()
    assert page.page.viewport_size == {"width": 1400, "height": 1000}
    root = explorer(page)
    root.scroll_into_view_if_needed()
    overflowing = root.evaluate(OVERFLOW_JS)
    assert not overflowing, "\n".join(overflowing)
    table = root.locator(".sae-nb-logits table")
    assert table.count() == 1 and table.evaluate("t => t.getBoundingClientRect().width") > 200
    note = root.locator(".sae-nb-logits .logit-note").text_content()
    assert "mean activation when firing" in note and "nats" in note and "unembedding" in note
    scroll_to(page, f"{EXPLORER} .sae-nb-summary")
    page.screenshot("histogram_and_logits")


# Per control of the widget: the width its text needs (the shown option of a menu, the
# placeholder of an empty box, a button's label), measured in its own font, and the width it has.
TEXT_FIT_JS = """root => {
    const ctx = document.createElement('canvas').getContext('2d'), out = [];
    const need = (el, text) => { ctx.font = getComputedStyle(el).font;
                                 return ctx.measureText(text).width; };
    const inner = el => { const c = getComputedStyle(el);
        return el.clientWidth - parseFloat(c.paddingLeft) - parseFloat(c.paddingRight); };
    for (const s of root.querySelectorAll('select'))
        for (const o of s.options)  // every option a menu can show, not only the current one
            out.push({what: 'menu option ' + o.text, need: need(s, o.text) + 20,
                      has: inner(s)});
    for (const i of root.querySelectorAll('input[placeholder], textarea[placeholder]'))
        if (i.placeholder) out.push({what: 'placeholder ' + i.placeholder,
                                     need: need(i, i.placeholder), has: inner(i)});
    for (const b of root.querySelectorAll('button'))
        out.push({what: 'button ' + b.textContent, need: need(b, b.textContent.trim()),
                  has: inner(b)});
    return out;
}"""


def test_menus_placeholders_buttons_and_slider_show_their_whole_text(page, truth):
    """Measured in the browser: every menu option (after a search fills the menu), every
    placeholder and every button label fits its control; the slider's track is a usable
    width; the histogram's plotly toolbar does not cover its title."""
    root = explorer(page)
    root.locator(".sae-nb-query input").fill(" the")
    root.locator(".sae-nb-query input").press("Enter")
    page.wait_for(lambda: root.locator(".sae-nb-matches select option").count() > 0, 60,
                  "the search to fill its menu")
    scroll_to(page, f"{EXPLORER} .sae-nb-query")
    page.screenshot("menus_and_placeholders")
    short = [f"{m['what']!r}: needs {m['need']:.0f} px, has {m['has']:.0f}"
             for m in root.evaluate(TEXT_FIT_JS) if m["need"] > m["has"] + 1]
    assert not short, "\n".join(short)
    track = root.locator(".sae-nb-slider .slider-container").first.evaluate(
        "e => e.getBoundingClientRect().width")
    assert track >= 250, f"the slider's track is {track:.0f} px"
    plot = root.locator(".js-plotly-plot").first
    plot.hover()
    page.page.wait_for_timeout(500)
    boxes = plot.evaluate("""p => ['.modebar', '.gtitle'].map(s => {
        const e = p.querySelector(s); if (!e) return null;
        const r = e.getBoundingClientRect();
        return {left: r.left, right: r.right, top: r.top, bottom: r.bottom}; })""")
    scroll_to(page, f"{EXPLORER} .sae-nb-summary")
    page.screenshot("histogram_hovered")
    bar, title = boxes
    assert title is not None
    assert bar is None or not (bar["left"] < title["right"] and title["left"] < bar["right"]
                               and bar["top"] < title["bottom"] and title["top"] < bar["bottom"])


def test_prev_and_next_buttons_step_one_rank(page):
    """One click moves one rank (the slider alone moves about 40 ranks per pixel)."""
    rank = lambda: int(explorer(page).locator(".sae-nb-slider .widget-readout")  # noqa: E731
                       .first.text_content())
    start, latent = rank(), shown_latent(page)
    explorer(page).locator(".sae-nb-next-button").click()
    page.wait_for(lambda: rank() == start + 1, 30, "next")
    assert shown_latent(page) != latent
    explorer(page).locator(".sae-nb-prev-button").click()
    page.wait_for(lambda: rank() == start, 30, "prev")
    wait_for_latent(page, latent)
    page.screenshot("prev_next")


def test_number_box_and_reload_keep_the_histogram_on_the_latent(page, truth):
    """After a reload the histogram is the latent's, not the first latent's. Last: the reload
    re-creates every widget view."""
    _, _, codes, stats = truth
    first = shown_latent(page)
    counts = (codes > 0).sum(0)
    latent = next(int(i) for i in np.argsort(-counts)[40:]  # an ordinary, often-firing latent
                  if brute_histogram(codes, stats, i) != brute_histogram(codes, stats, first))
    box = explorer(page).locator(".sae-nb-number input")
    box.fill(str(latent))
    box.press("Enter")
    wait_for_latent(page, latent)
    expected = brute_histogram(codes, stats, latent)
    page.wait_for(lambda: histogram_y(page) == expected, 20, "the histogram to update")
    scroll_to(page, f"{EXPLORER} .sae-nb-summary")
    page.screenshot("latent_by_number")
    page.save()
    page.reload()
    page.page.locator(f"{EXPLORER} .js-plotly-plot").first.wait_for(timeout=60_000)
    wait_for_latent(page, latent)
    scroll_to(page, f"{EXPLORER} .sae-nb-summary")
    page.page.wait_for_timeout(1000)  # let plotly draw
    page.screenshot("after_reload")
    assert histogram_y(page) == expected
    title = page.page.locator(f"{EXPLORER} .js-plotly-plot .gtitle").first.text_content()
    assert f"latent {latent}" in title


def test_executed_notebook_06_shows_the_explorer_without_running_it(page, main_job):
    """The main job's executed copy of notebook 06, opened later and not run, shows a
    snapshot of the explorer (its summary, shaded contexts and first latents), not the
    widget's repr text: JupyterLab draws widgets only for a trusted notebook with the kernel
    that made them."""
    output = main_job / "outputs" / "default" / "06_visualize.ipynb"
    papermill.execute_notebook(str(main_job / NOTEBOOK), str(output),
                               parameters={"run_dir": str(output.parent)}, kernel_name="python3",
                               cwd=str(main_job / "notebooks"), progress_bar=False)
    page.open_notebook(str(output.relative_to(main_job)))
    panel = page.page.locator(".jp-NotebookPanel:visible")
    panel.locator(".jp-OutputArea-output").first.wait_for(timeout=60_000)
    outputs = " ".join(panel.locator(".jp-OutputArea-output").all_text_contents())
    assert "VBox(children" not in outputs
    snapshot = panel.locator(".sae-nb-explorer-snapshot")
    snapshot.first.wait_for(timeout=60_000)
    assert snapshot.count() == 1
    text = snapshot.text_content()
    assert "static snapshot" in text and "run this cell" in text
    shown = int(snapshot.locator(".summary b").first.text_content().split()[-1])
    executed = nbformat.read(output, as_version=4)
    widget_cells = [c for c in executed.cells if "FeatureExplorer(" in c.source]
    assert len(widget_cells) == 1  # and its output still holds the widget for a live kernel
    bundle = widget_cells[0].outputs[0]["data"]
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert f"latent {shown}" in bundle["text/plain"]
    assert snapshot.locator(".tok").count() > 10  # shaded contexts
    shaded = snapshot.locator(".tok.center").first.evaluate("e => getComputedStyle(e)"
                                                            ".backgroundColor")
    assert shaded.replace("rgba", "rgb").startswith("rgb(255, 140, 0"), shaded  # orange
    snapshot.scroll_into_view_if_needed()
    page.page.wait_for_timeout(5000)  # JupyterLab draws the cells scrolled into view lazily
    page.screenshot("executed_copy_not_run")
