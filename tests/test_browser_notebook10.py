"""Notebook 10's attribution-graph widget in a real JupyterLab and chromium, as a person uses it.

A copy of notebook 10 with the smoke parameters (papermill's injected cell, as the main job
writes it) and a fresh run folder is opened in JupyterLab and run from the Run menu: it trains
its transcoder set, builds the graph and shows the widget wired to the real
``interventions.GraphIntervener``. Then: hover the most influential kept feature (its caption in
plotly's hover label), click it (its card), pin the two most influential features, group them
into a supernode and ablate it with the widget's button. The logit table the page shows is
checked against a ``GraphIntervener`` run here, in the test's own process, on the graph rebuilt
from the transcoder set the notebook saved; the clean probability of the top token against the
model's own forward pass (``targets.prompt_predictions``). Screenshots go to the module's
temporary folder (``pytest -s`` prints them).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from jupyter_browser import Chromium, notebook_after_run_all
from test_browser_circuits import WIDGET, node_text, point, show_figure

import sae_nb
from sae_nb.circuits import attribute, captions, graph, interventions, sets, targets
from sae_nb.running.notebooks import NOTEBOOKS_DIR, SMOKE_PARAMETERS
from sae_nb.views.circuit_graph import node_label

pytestmark = pytest.mark.slow
NOTEBOOK = "notebooks/10_circuits.ipynb"
VALUES = SMOKE_PARAMETERS["10_circuits"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder with notebook 10 parameterised for the smoke run, writing to a fresh run folder
    (notebook 10 needs no earlier notebook)."""
    import papermill  # the slow tests' dependency: imported where it is used, as in the others

    Chromium()  # skip (or fail under CI) before the long steps when there is no browser
    root = tmp_path_factory.mktemp("repo")
    (root / "notebooks").mkdir()
    params = {**VALUES, "run_dir": str(root / "outputs" / "smoke")}
    papermill.execute_notebook(str(NOTEBOOKS_DIR / "10_circuits.ipynb"), str(root / NOTEBOOK),
                               parameters=params, prepare_only=True, kernel_name="python3")
    return root


@pytest.fixture(scope="module")
def page(root, tmp_path_factory):
    # One thread in the kernel: kind to the shared cores, and the same arithmetic as here.
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        with notebook_after_run_all(root, NOTEBOOK, tmp_path_factory.mktemp("lab"),
                                    timeout=1800) as page:
            yield page
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved


@pytest.fixture(scope="module")
def rebuilt(page, root):
    """The notebook's model, its saved transcoder set and its graph, rebuilt here."""
    lm = sae_nb.load_model("smollm2-135m")
    folder = (root / "outputs" / "smoke" / "transcoders" /
              f"{VALUES['d_sae']}_k{VALUES['k']}_{VALUES['n_tokens']}")
    tset = sets.load_transcoder_set(folder)
    (prompt,) = VALUES["prompts"]
    g = attribute.attribute(lm, tset, prompt, max_feature_nodes=VALUES["max_feature_nodes"])
    return lm, tset, g


def reveal(page, node: int) -> tuple[float, float]:
    """Scroll until ``node`` sits inside the window and stays there; returns its point. The
    notebook is long: JupyterLab lays out the cells above on the first scroll, which moves the
    figure, and the figure is taller than the window."""
    show_figure(page)
    for _ in range(10):
        x, y = point(page, node)
        if 150 < y < page.page.viewport_size["height"] - 100:
            page.page.wait_for_timeout(300)
            if point(page, node) == [x, y]:
                return x, y
        else:
            page.page.evaluate("dy => document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)"
                               " .jp-WindowedPanel-outer').scrollBy(0, dy)", y - 500)
        page.page.wait_for_timeout(500)
    raise TimeoutError(f"node {node} stays outside the window, at {point(page, node)}")


def click_node(page, g, node: int) -> None:
    x, y = reveal(page, node)
    page.page.mouse.move(x, y)
    page.page.mouse.click(x, y)
    page.wait_for(lambda: node_text(page) == node_label(g, node), 30, f"the card of node {node}")


def hover_label(page, x: float, y: float, wanted: str) -> str:
    """Move the mouse to (x, y); the hover label's text once it contains ``wanted``."""
    page.page.mouse.move(x, y)
    hover = page.page.locator(".hoverlayer .hovertext")
    page.wait_for(lambda: hover.count() > 0 and wanted in hover.first.text_content(), 30,
                  f"the hover label with {wanted!r}")
    return hover.first.text_content()


def test_notebook_10_hover_click_pin_group_and_ablate(page, rebuilt):
    lm, tset, g = rebuilt
    assert page.error_outputs() == [] and page.errors == []
    assert all(p.isdigit() for p in page.prompts()), page.prompts()
    widget = page.page.locator(WIDGET)
    assert widget.count() == 1
    widget.locator(".js-plotly-plot").wait_for(timeout=60_000)

    # the two most influential features the pruned graph keeps, from the rebuilt graph
    kept = graph.prune(g).node_mask[:g.n_features].nonzero().flatten()
    influence = graph.node_influence(g)
    first, second = kept[influence[kept].argsort(descending=True)[:2]].tolist()
    layer, _, latent = (int(v) for v in g.features[first])
    caption = captions.graph_captions(lm, tset, g)[(layer, latent)]

    x, y = reveal(page, first)
    page.screenshot("graph_after_run_all")
    text = hover_label(page, x, y, f"latent: {latent}")
    assert node_label(g, first) in text and f"layer: {layer}" in text
    assert caption in text, (caption, text)
    page.screenshot("hover")

    click_node(page, g, first)
    card = widget.locator(".sae-nb-card").inner_text()
    assert caption in card and "top contexts" in card and "strongest inputs" in card
    widget.locator(".sae-nb-card").scroll_into_view_if_needed()
    page.screenshot("card")

    pinned = widget.locator(".sae-nb-pinned-view li")
    for n, node in enumerate((first, second)):
        click_node(page, g, node)
        widget.locator(".sae-nb-pin-button").click()
        page.wait_for(lambda: pinned.count() == n + 1, 30, "the pin")  # noqa: B023
    assert pinned.all_text_contents() == [node_label(g, first), node_label(g, second)]
    widget.locator(".sae-nb-label input").fill("top two")
    widget.locator(".sae-nb-group-button").click()
    supernode = widget.locator(".sae-nb-supernode")
    page.wait_for(lambda: supernode.count() == 1, 30, "the supernode")
    assert supernode.inner_text() == f"top two: {node_label(g, first)}, {node_label(g, second)}"
    chosen = widget.locator(".sae-nb-target select option:checked").inner_text().replace(
        "\xa0", " ")  # ipywidgets draws spaces in options as no-break spaces
    assert chosen == "supernode top two (2 nodes)"
    page.page.locator(".annotation-text", has_text="top two").wait_for(timeout=30_000)
    reveal(page, first)
    page.screenshot("pinned_and_grouped")

    widget.locator(".sae-nb-ablate-button").click()
    page.wait_for(lambda: "done: ablate" in widget.locator(".sae-nb-status").inner_text(), 300,
                  "the ablation in the real model")
    result = widget.locator(".sae-nb-result table")
    header = result.locator("tr").first.locator("th").all_text_contents()
    assert header == ["token", "before", "after", "predicted change", "measured change"]
    shown = [r.locator("td").all_text_contents() for r in result.locator("tr").all()[1:]]
    result.scroll_into_view_if_needed()
    page.screenshot("after_ablate", full_page=True)

    expected = interventions.GraphIntervener(lm, tset, g)([first, second], "ablate", 0.0)
    assert len(shown) == len(expected) == g.n_logits
    assert [row[0] for row in shown] == [node_label(g, g.logit_start + k).removeprefix("logit ")
                                         for k in range(g.n_logits)]
    for column in ("before", "after", "predicted change", "measured change"):
        j = header.index(column)
        page_values = [float(row[j]) for row in shown]
        scale = float(expected[column].abs().max())
        assert page_values == pytest.approx(expected[column].tolist(), rel=2e-3,
                                            abs=2e-3 * scale), column
    # the clean probability of the top token is the model's own; the ablation moved it
    clean = targets.prompt_predictions(lm, VALUES["prompts"])
    assert clean["top token"].iloc[0] == g.logit_names[0] == shown[0][0].replace("·", " ")
    before, after, measured = (float(shown[0][header.index(c)])
                               for c in ("before", "after", "measured change"))
    assert before == pytest.approx(float(clean["probability"].iloc[0]), rel=2e-3)
    assert after != before and abs(measured) > 1e-3
    assert page.errors == []


def test_a_caption_with_a_double_quote_shows_the_quote(page, rebuilt):
    lm, tset, g = rebuilt
    labels = captions.graph_captions(lm, tset, g)
    kept = graph.prune(g).node_mask[:g.n_features].nonzero().flatten().tolist()
    quoted = [i for i in kept if '"' in labels[tuple(int(v) for v in g.features[i, [0, 2]])]]
    if not quoted:
        pytest.skip("no kept feature's caption has a double quote in this run")
    node = quoted[0]
    layer, _, latent = (int(v) for v in g.features[node])
    x, y = reveal(page, node)
    text = hover_label(page, x, y, f"latent: {latent}")
    page.screenshot("hover_with_a_double_quote")
    assert labels[(layer, latent)] in text, text
