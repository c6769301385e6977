"""The attribution-graph widget in a real JupyterLab and chromium, as a person uses it.

A scratch notebook builds a graph of the tiny Llama (random transcoders) and shows the widget
with captions, top contexts and a plain intervention function; Run All runs it from the Run
menu. Then: hover the most influential feature (its caption in plotly's hover label), click it
(its card, with the strongest edges computed here from the same graph), pin two features, group
them into a supernode, ablate and scale it (the logit table changes), show only the pinned
subgraph and export the JSON. Last, the notebook run headless by papermill and opened unrun shows
the static copy: the graph as an image that the browser decodes. Screenshots go to the module's
temporary folder (``pytest -s`` prints them).
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import papermill
import pytest
from jupyter_browser import Chromium, notebook_after_run_all

from sae_nb.circuits.attribute import attribute
from sae_nb.circuits.graph import node_influence, prune
from sae_nb.circuits.transcoder_set import TranscoderSet
from sae_nb.views.circuit_graph import node_label

pytestmark = pytest.mark.slow
NOTEBOOK = "circuit_graph.ipynb"
WIDGET = ".sae-nb-circuit"
PROMPT = "We must work for peace"
CELLS = [
    "import pandas as pd\nimport torch\nimport sae_nb\n"
    "from sae_nb.circuits import attribute, transcoder_set\n"
    "from sae_nb.views.circuit_graph import CircuitGraphWidget\ntorch.set_num_threads(1)",
    "lm = sae_nb.load_model({folder!r}, device='cpu')\n"
    "tset = transcoder_set.TranscoderSet.random(lm, d_sae=64, k=4, skip=True, seed=5)\n"
    "graph = attribute.attribute(lm, tset, {prompt!r})",
    "def intervene(nodes, mode, factor):\n"
    "    # a stand-in: each logit moves by -0.1 per node ablated, times the factor when scaled\n"
    "    before = [float(w) for w in graph.logit_weights]\n"
    "    step = -0.1 * len(nodes) if mode == 'ablate' else 0.1 * (factor - 1) * len(nodes)\n"
    "    return pd.DataFrame({{'token': graph.logit_names, 'logit before': before,\n"
    "                         'logit after': [b + step for b in before],\n"
    "                         'predicted change': [step] * len(before),\n"
    "                         'measured change': [step] * len(before)}})",
    "captions = {{(int(f[0]), int(f[2])): {{'tokens': f'top tokens: tok{{int(f[2])}}',\n"
    "                                      'explanation': f'explained latent {{int(f[2])}}'}}\n"
    "            for f in graph.features}}\n"
    "contexts = lambda layer, latent: [dict(row=0, value=2.0, tokens=['We', ' must'],\n"
    "                                       acts=[0.5, 2.0], center=1)]\n"
    "CircuitGraphWidget(graph, lm, tset, captions=captions, contexts=contexts,\n"
    "                   intervene=intervene, export_path='exported.json')",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory, model_dirs) -> Path:
    Chromium()  # skip (or fail under CI) before the long steps when there is no browser
    root = tmp_path_factory.mktemp("scratch")
    cells = [c.format(folder=str(model_dirs["llama"]), prompt=PROMPT) for c in CELLS]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, root / NOTEBOOK)
    return root


@pytest.fixture(scope="module")
def graph(llama):
    """The notebook's graph, built here from the same model and transcoders."""
    return attribute(llama, TranscoderSet.random(llama, d_sae=64, k=4, skip=True, seed=5), PROMPT)


@pytest.fixture(scope="module")
def page(root, tmp_path_factory):
    with notebook_after_run_all(root, NOTEBOOK, tmp_path_factory.mktemp("lab"),
                                timeout=300) as page:
        yield page


POINT_JS = """([name, node]) => {
    const gd = document.querySelector('.sae-nb-circuit .js-plotly-plot');
    const tr = gd._fullData.find(t => t.name === name);
    const j = Array.from(tr.customdata).indexOf(node);
    const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect();
    return [r.left + xa._offset + xa.l2p(tr.x[j]), r.top + ya._offset + ya.l2p(tr.y[j])];
}"""


def point(page, node: int, name: str = "features") -> tuple[float, float]:
    return page.page.evaluate(POINT_JS, [name, node])


def click_node(page, graph, node: int) -> None:
    show_figure(page)
    x, y = point(page, node)
    page.page.mouse.move(x, y)
    page.page.mouse.click(x, y)
    page.wait_for(lambda: node_text(page) == node_label(graph, node), 30,
                  f"the card of node {node}")


def show_figure(page) -> None:
    page.page.locator(f"{WIDGET} .js-plotly-plot").evaluate(
        "e => e.scrollIntoView({block: 'start'})")
    page.page.wait_for_timeout(300)


def node_text(page) -> str:
    title = page.page.locator(f"{WIDGET} .sae-nb-card-title b")
    return title.first.inner_text() if title.count() else ""


def test_the_widget_draws_the_pruned_graph(page, graph):
    assert page.error_outputs() == [] and page.errors == []
    widget = page.page.locator(WIDGET)
    widget.locator(".js-plotly-plot").wait_for(timeout=60_000)
    widget.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.page.wait_for_timeout(1000)
    page.screenshot("graph_after_run_all")
    pruned = prune(graph)
    drawn = page.page.evaluate("""() => {
        const gd = document.querySelector('.sae-nb-circuit .js-plotly-plot');
        return gd._fullData.filter(t => t.customdata).flatMap(t => Array.from(t.customdata));
    }""")
    assert sorted(drawn) == pruned.node_mask.nonzero().flatten().tolist()
    ticks = widget.locator(".xtick text").all_text_contents()
    assert ticks[:4] == ["<bos>", "W", "e", "·"]
    labels = widget.locator(".ytick text").all_text_contents()
    assert labels[0] == "embeddings" and labels[-1] == "logits"


def test_hover_click_pin_group_intervene_and_export(page, graph, root):
    widget = page.page.locator(WIDGET)
    pruned = prune(graph)
    influence = node_influence(graph)
    kept = pruned.node_mask[:graph.n_features].nonzero().flatten()
    first, second = kept[influence[kept].argsort(descending=True)[:2]].tolist()
    layer, pos, latent = graph.features[first].tolist()

    show_figure(page)
    x, y = point(page, first)
    page.page.mouse.move(x, y)
    hover = page.page.locator(".hoverlayer .hovertext")
    page.wait_for(lambda: hover.count() > 0 and f"tok{latent}" in hover.first.text_content(),
                  30, "the hover label")
    text = hover.first.text_content()
    assert f"explained latent {latent}" in text and f"layer: {layer}" in text
    page.screenshot("hover")

    click_node(page, graph, first)
    card = widget.locator(".sae-nb-card").inner_text()
    assert f"explained latent {latent}" in card and "top contexts" in card
    row = graph.adjacency[first]
    top = [int(j) for j in row.abs().argsort(descending=True)[:5] if row[j] != 0]
    shown = widget.locator(".sae-nb-edges-in tr").evaluate_all(
        "rows => rows.map(r => +r.dataset.node)")
    assert shown == top
    page.screenshot("card")

    pinned = widget.locator(".sae-nb-pinned-view li")
    for n, node in enumerate((first, second)):
        click_node(page, graph, node)
        widget.locator(".sae-nb-pin-button").click()
        page.wait_for(lambda: pinned.count() == n + 1, 30, "the pin")  # noqa: B023
        assert widget.locator(".sae-nb-pin-button").inner_text() == "unpin"
    assert pinned.all_text_contents() == [node_label(graph, first), node_label(graph, second)]
    widget.locator(".sae-nb-label input").fill("peace words")
    widget.locator(".sae-nb-group-button").click()
    supernode = widget.locator(".sae-nb-supernode")
    page.wait_for(lambda: supernode.count() == 1, 30, "the supernode")
    assert supernode.inner_text() == (f"peace words: {node_label(graph, first)}, "
                                      f"{node_label(graph, second)}")
    chosen = widget.locator(".sae-nb-target select option:checked").inner_text().replace(
        "\xa0", " ")  # ipywidgets draws spaces in options as no-break spaces
    assert chosen == "supernode peace words (2 nodes)"
    page.page.locator(".annotation-text", has_text="peace words").wait_for(timeout=30_000)
    page.screenshot("pinned_and_grouped")

    result = widget.locator(".sae-nb-result")
    widget.locator(".sae-nb-ablate-button").click()
    page.wait_for(lambda: "done: ablate" in widget.locator(".sae-nb-status").inner_text(), 60,
                  "the ablation")
    weights = [float(w) for w in graph.logit_weights]
    ablated = result.locator("tr").nth(1).locator("td").all_text_contents()
    assert float(ablated[2]) == pytest.approx(weights[0] - 0.2, abs=1e-3)
    assert ablated[3] == "-0.2"
    widget.locator(".sae-nb-factor input").fill("3")
    widget.locator(".sae-nb-factor input").press("Enter")
    widget.locator(".sae-nb-scale-button").click()
    page.wait_for(lambda: "done: scale" in widget.locator(".sae-nb-status").inner_text(), 60,
                  "the scaling")
    scaled = result.locator("tr").nth(1).locator("td").all_text_contents()
    assert float(scaled[2]) == pytest.approx(weights[0] + 0.4, abs=1e-3) and scaled != ablated
    result.scroll_into_view_if_needed()
    page.screenshot("after_scale", full_page=True)

    widget.locator(".sae-nb-only-pinned input").check()
    page.wait_for(lambda: page.page.evaluate("""() => document.querySelector(
        '.sae-nb-circuit .js-plotly-plot')._fullData.filter(t => t.customdata)
        .flatMap(t => Array.from(t.customdata)).length""") == 2, 30, "the pinned subgraph")
    widget.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.page.wait_for_timeout(800)
    page.screenshot("only_pinned")

    widget.locator(".sae-nb-export-button").click()
    page.wait_for(lambda: "wrote" in widget.locator(".sae-nb-export-status").inner_text(), 30,
                  "the export")
    exported = json.loads((root / "exported.json").read_text())
    assert len(exported["qParams"]["pinnedIds"]) == 2
    assert exported["qParams"]["supernodes"][0][0] == "peace words"
    assert page.errors == []


def test_the_headless_run_shows_a_static_copy(page, root):
    output = root / "executed.ipynb"
    papermill.execute_notebook(str(root / NOTEBOOK), str(output), kernel_name="python3",
                               cwd=str(root), progress_bar=False)
    page.open_notebook(output.name)
    panel = page.page.locator(".jp-NotebookPanel:visible")
    snapshot = panel.locator(".sae-nb-circuit-snapshot")
    snapshot.first.wait_for(timeout=60_000)
    snapshot.scroll_into_view_if_needed()
    image = snapshot.locator("img")
    page.wait_for(lambda: image.evaluate("i => i.complete && i.naturalWidth > 0"), 30,
                  "the graph image to decode")
    assert image.evaluate("i => i.naturalWidth") == 1100
    assert "static copy" in snapshot.inner_text()
    page.page.wait_for_timeout(1000)
    page.screenshot("static_copy")
