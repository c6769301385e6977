"""The attribution graph's figure and widget on a graph of the tiny Llama: every node drawn where
the graph says (position, layer), exactly the pruned edges drawn, weights in width and colour,
hover text with the caption and the influence (against a brute-force influence), the card's
strongest edges (against a plain sort of the adjacency), pins, supernodes, the intervention
callback and its busy state, the JSON export and the static copy."""

from __future__ import annotations

import base64
import json
import re
import xml.dom.minidom

import pandas as pd
import pytest
import torch
from plotly.callbacks import Points

from sae_nb.circuits.attribute import attribute
from sae_nb.circuits.graph import prune
from sae_nb.circuits.transcoder_set import TranscoderSet
from sae_nb.util.errors import SaeNbError
from sae_nb.views.circuit_graph import CircuitGraphWidget, graph_figure

PROMPT = "We must work for peace"


@pytest.fixture(scope="module")
def graph(llama):
    return attribute(llama, TranscoderSet.random(llama, d_sae=64, k=4, skip=True, seed=5), PROMPT)


@pytest.fixture(scope="module")
def pruned(graph):
    return prune(graph)


def where(graph, i: int) -> tuple[str, int | None, int]:
    """(kind, layer, position) of node ``i`` from the layout's offsets, not from Graph.node."""
    n_f, T, L = graph.n_features, graph.n_pos, graph.n_layers
    if i < n_f:
        return "feature", int(graph.features[i, 0]), int(graph.features[i, 1])
    if i < n_f + L * T:
        layer, pos = divmod(i - n_f, T)
        return "error", layer, pos
    if i < n_f + L * T + T:
        return "embedding", None, i - n_f - L * T
    return "logit", L, T - 1


def drawn_nodes(fig) -> dict[int, tuple[float, float, str]]:
    """{node: (x, y, trace name)} of the node traces (those with customdata)."""
    return {int(i): (x, y, tr.name) for tr in fig.data if tr.customdata is not None
            and len(tr.customdata) for i, x, y in zip(tr.customdata, tr.x, tr.y)}


def drawn_edges(fig, nodes) -> list[tuple[int, int, str, float]]:
    """(source, target, colour, width) of every segment of the edge traces."""
    at = {(x, y): i for i, (x, y, _) in nodes.items()}
    out = []
    for tr in fig.data:
        if tr.mode != "lines":
            continue
        assert len(tr.x) % 3 == 0 and all(v is None for v in tr.x[2::3])
        for xs, ys, xt, yt in zip(tr.x[::3], tr.y[::3], tr.x[1::3], tr.y[1::3]):
            out.append((at[(xs, ys)], at[(xt, yt)], tr.line.color, tr.line.width))
    return out


def brute_influence(graph) -> torch.Tensor:
    """``w @ ((I - A)^-1 - I)`` with ``A`` the row-normalised |adjacency|, in float64."""
    a = graph.adjacency.double().abs()
    A = a / a.sum(1, keepdim=True).clamp(min=1e-10)
    eye = torch.eye(len(A), dtype=A.dtype)
    return graph.logit_vector().double() @ (torch.linalg.inv(eye - A) - eye)


def test_every_kept_node_is_drawn_at_its_position_and_layer(graph, pruned):
    fig = graph_figure(graph, pruned)
    nodes = drawn_nodes(fig)
    assert set(nodes) == set(pruned.node_mask.nonzero().flatten().tolist())
    assert graph.n_pos <= len(nodes) < graph.n_nodes  # pruned, with every embedding
    names = {"feature": "features", "error": "errors", "embedding": "embeddings",
             "logit": "logits"}
    for i, (x, y, trace) in nodes.items():
        kind, layer, pos = where(graph, i)
        assert trace == names[kind]
        if kind in ("feature", "error"):
            assert abs(x - pos) < 0.45 and abs(y - layer) <= 0.2, (i, x, y, pos, layer)
        elif kind == "embedding":
            assert (x, y) == (pos, -1)
        else:
            assert y == graph.n_layers
    assert len({(x, y) for x, y, _ in nodes.values()}) == len(nodes)  # no two on one spot
    ticks = fig.layout.xaxis.ticktext
    assert list(fig.layout.xaxis.tickvals) == list(range(graph.n_pos))
    assert ticks[3] == "·" and ticks[0] == "<bos>"  # the prompt's space, visible
    assert list(fig.layout.yaxis.ticktext) == ["embeddings", "layer 0", "layer 1", "layer 2",
                                               "logits"]
    symbols = {tr.name: tr.marker.symbol for tr in fig.data if tr.customdata is not None}
    assert symbols["features"] == "circle" and symbols["errors"] == "square"


def test_the_drawn_edges_are_the_pruned_edges_with_weight_in_width_and_sign_in_colour(
        graph, pruned):
    fig = graph_figure(graph, pruned)
    edges = drawn_edges(fig, drawn_nodes(fig))
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    expected = set(zip(sources.tolist(), targets.tolist()))
    assert len(edges) == len(expected) == int(pruned.edge_mask.sum())
    assert {(s, t) for s, t, _, _ in edges} == expected
    by_width = sorted(edges, key=lambda e: abs(float(graph.adjacency[e[1], e[0]])))
    widths = [e[3] for e in by_width]
    assert widths == sorted(widths) and widths[0] < widths[-1]  # |weight| never thinner
    for s, t, colour, _ in edges:
        positive = float(graph.adjacency[t, s]) > 0
        assert colour.startswith("rgba(31,111,209" if positive else "rgba(209,64,31")


def test_hover_text_has_kind_position_activation_influence_and_caption(graph, pruned):
    feature = int(pruned.node_mask[:graph.n_features].nonzero()[0])
    layer, pos, latent = graph.features[feature].tolist()
    captions = {(layer, latent): {"tokens": "top tokens: ·peace, ·war",
                                  "explanation": "words of war and peace"}}
    fig = graph_figure(graph, pruned, captions)
    trace = next(tr for tr in fig.data if tr.name == "features")
    text = trace.hovertext[list(trace.customdata).index(feature)]
    assert "top tokens: ·peace, ·war" in text and "explanation: words of war and peace" in text
    assert f"layer: {layer}" in text and f"latent: {latent}" in text
    assert f"position: {pos}" in text and "kind: feature" in text
    activation = float(re.search(r"activation: ([-\d.e+]+)", text).group(1))
    assert activation == pytest.approx(float(graph.activations[feature]), rel=1e-3)
    influence = float(re.search(r"influence: ([-\d.e+]+)", text).group(1))
    assert influence == pytest.approx(float(brute_influence(graph)[feature]), rel=1e-3)
    other = trace.hovertext[1 if list(trace.customdata).index(feature) == 0 else 0]
    assert "top tokens" not in other  # only the latent that has a caption


def test_only_the_pinned_subgraph_with_every_edge_among_its_nodes(graph, pruned):
    kept = pruned.node_mask.nonzero().flatten().tolist()
    chosen = kept[:4] + kept[-3:]
    fig = graph_figure(graph, pruned, only=chosen, pinned=chosen[:2])
    nodes = drawn_nodes(fig)
    assert set(nodes) == set(chosen)
    expected = {(s, t) for t in chosen for s in chosen if graph.adjacency[t, s] != 0}
    assert {(s, t) for s, t, _, _ in drawn_edges(fig, nodes)} == expected
    full = drawn_nodes(graph_figure(graph, pruned))
    assert all(nodes[i][:2] == full[i][:2] for i in chosen)  # the same places as the full view
    rings = {int(i): w for tr in fig.data if tr.customdata is not None
             for i, w in zip(tr.customdata, tr.marker.line.width)}
    assert [i for i, w in rings.items() if w > 2] == sorted(chosen[:2])


@pytest.fixture
def calls():
    return []


@pytest.fixture
def widget(graph, calls):
    table = pd.DataFrame({"token": [" war", "peace"], "logit before": [1.5, 0.25],
                          "logit after": [0.5, 0.75], "predicted change": [-0.9, 0.4],
                          "measured change": [-1.0, 0.5]})

    def intervene(nodes, mode, factor):
        w = calls[0] if calls and isinstance(calls[0], CircuitGraphWidget) else None
        busy = None if w is None else (w.ablate_button.disabled, w.scale_button.disabled,
                                       w.status.value)
        calls.append((list(nodes), mode, factor, busy))
        if factor == 7.0:
            raise ValueError("no such factor")
        return table.assign(**{"logit after": table["logit after"] * (factor or 1)})

    captions = {tuple(f[[0, 2]].tolist()): f"top tokens: t{int(f[2])}" for f in graph.features}
    w = CircuitGraphWidget(graph, captions=captions, intervene=intervene,
                           contexts=lambda layer, latent: [
                               {"row": 0, "value": 2.0, "tokens": ["a", " b"], "acts": [0.0, 2.0],
                                "center": 1}])
    calls.append(w)
    return w


def click(widget, node: int) -> None:
    """What plotly's front end sends on a click on ``node``: the trace's click callback."""
    for index, trace in enumerate(widget.figure.data):
        if trace.customdata is not None and node in list(trace.customdata):
            j = list(trace.customdata).index(node)
            trace._dispatch_on_click(Points([j], [trace.x[j]], [trace.y[j]], trace.name, index),
                                     None)
            return
    raise AssertionError(f"node {node} is not drawn")


def test_a_click_shows_the_card_with_the_strongest_edges(widget, graph, pruned):
    feature = int(pruned.node_mask[:graph.n_features].nonzero()[-1])
    click(widget, feature)
    assert widget.selected == feature
    ring = widget.figure.data[-1]
    trace = next(tr for tr in widget.figure.data if tr.name == "features")
    j = list(trace.customdata).index(feature)
    assert (ring.x[0], ring.y[0]) == (trace.x[j], trace.y[j])
    card = widget.card.value
    layer, pos, latent = graph.features[feature].tolist()
    assert f"L{layer}/{latent} @{pos}" in card and f"top tokens: t{latent}" in card
    assert 'class="tok center"' in card  # the top contexts
    dense = graph.adjacency.tolist()
    for cls, pairs in (("in", [(s, dense[feature][s]) for s in range(graph.n_nodes)]),
                       ("out", [(t, dense[t][feature]) for t in range(graph.n_nodes)])):
        top = sorted([p for p in pairs if p[1] != 0], key=lambda p: -abs(p[1]))[:5]
        table = re.search(f'<table class="sae-nb-edges-{cls}">(.*?)</table>', card).group(1)
        shown = [(int(n), float(v)) for n, v in re.findall(
            r'data-node="(\d+)">.*?font-family: monospace">([-+\d.e]+)</td>', table)]
        assert [n for n, _ in shown] == [n for n, _ in top]
        assert [v for _, v in shown] == pytest.approx([v for _, v in top], rel=1e-3)
    with pytest.raises(SaeNbError, match="node=9999"):
        widget.select(9999)


def test_pin_group_and_list_supernodes(widget, graph, pruned):
    kept = pruned.node_mask[:graph.n_features].nonzero().flatten().tolist()
    a, b, c = kept[:3]
    for node in (a, b):
        click(widget, node)
        widget.pin_button.click()
    assert widget.pinned == [a, b] and widget.pin_button.description == "unpin"
    assert widget.pinned_view.value.count("<li") == 2
    widget.only_pinned.value = True
    assert set(drawn_nodes(widget.figure)) == {a, b}
    widget.label.value = "say peace"
    widget.group_button.click()
    assert widget.supernodes == {"say peace": [a, b]} and widget.label.value == ""
    assert "say peace" in widget.supernode_view.value
    assert widget.target.value == (a, b)
    assert any(ann.text == "<b>say peace</b>" for ann in widget.figure.layout.annotations)
    widget.group_button.click()  # no label: the message says what to do
    assert "needs a label" in widget.supernode_view.value
    with pytest.raises(SaeNbError, match="No pinned node"):
        widget.group("again")
    widget.pin(c)
    with pytest.raises(SaeNbError, match="already labelled 'say peace'"):
        widget.group("say peace")
    assert widget.group("third") == [c]
    widget.only_pinned.value = False
    assert len(drawn_nodes(widget.figure)) == int(pruned.node_mask.sum())
    widget.unpin(c)
    assert "third" not in widget.supernodes and widget.pinned == [a, b]


def test_ablate_and_scale_a_supernode_through_the_callback(widget, graph, pruned, calls):
    kept = pruned.node_mask[:graph.n_features].nonzero().flatten().tolist()
    widget.pin(kept[0])
    widget.pin(kept[1])
    widget.group("pair")
    widget.ablate_button.click()
    nodes, mode, factor, busy = calls[1]
    assert (nodes, mode, factor) == (kept[:2], "ablate", 0.0)
    assert busy[0] and busy[1] and "ablate supernode pair" in busy[2]  # busy while it ran
    assert not widget.ablate_button.disabled and widget.ablate_button.description == "ablate"
    assert "·war" in widget.result.value and "-0.9" in widget.result.value
    widget.factor.value = 3.0
    widget.scale_button.click()
    assert calls[2][:3] == (kept[:2], "scale", 3.0)
    assert widget.last_table["logit after"].tolist() == [1.5, 2.25]
    assert "2.25" in widget.result.value
    widget.factor.value = 7.0
    widget.scale_button.click()
    assert "ValueError: no such factor" in widget.status.value
    assert "2.25" in widget.result.value  # the last table stays


def test_export_writes_the_graph_json_with_pins_and_supernodes(widget, graph, pruned, tmp_path):
    plain = graph.to_json(None)
    ids = [n["node_id"] for n in plain["nodes"]]
    kept = pruned.node_mask[:graph.n_features].nonzero().flatten().tolist()
    own = [i for i in kept if ids.count("{}_{}_{}".format(*graph.features[i][[0, 2, 1]].tolist()))
           == 1][:3]  # features whose id names one node of the JSON
    assert len(own) == 3
    for i in own:
        widget.pin(i)
    widget.group("group one")
    widget.export_path.value = str(tmp_path / "texas.json")
    widget.export_button.click()
    loaded = json.loads((tmp_path / "texas.json").read_text())
    assert loaded["nodes"] == plain["nodes"] and loaded["links"] == plain["links"]
    assert f"wrote {len(plain['nodes'])} nodes" in widget.export_status.value
    pinned = loaded["qParams"]["pinnedIds"]
    assert len(pinned) == 3 and loaded["qParams"]["supernodes"] == [["group one", *pinned]]
    assert loaded["metadata"]["slug"] == "texas"
    by_id = {n["node_id"]: n for n in loaded["nodes"]}
    for node_id, i in zip(pinned, own):  # each pinned id is that node in the JSON
        layer, pos, latent = graph.features[i].tolist()
        n = by_id[node_id]
        assert (n["feature_type"], n["layer"], n["ctx_idx"]) == ("cross layer transcoder",
                                                                 str(layer), pos)
        assert n["activation"] == pytest.approx(float(graph.activations[i]))


def test_the_static_copy_draws_the_figure_as_an_svg_image(widget, graph, pruned):
    kept = pruned.node_mask[:graph.n_features].nonzero().flatten().tolist()
    widget.pin(kept[0])
    widget.select(kept[0])
    bundle = widget._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert PROMPT in bundle["text/plain"]
    snapshot = bundle["text/html"]
    assert "<script" not in snapshot and "static copy" in snapshot
    svg = base64.b64decode(re.search(r'src="data:image/svg\+xml;base64,([^"]+)"',
                                     snapshot).group(1)).decode()
    doc = xml.dom.minidom.parseString(svg)  # well-formed
    nodes = drawn_nodes(widget.figure)
    kinds = [where(graph, i)[0] for i in nodes]
    circles = doc.getElementsByTagName("circle")
    assert len(circles) == kinds.count("feature") + kinds.count("logit") + 1  # and the ring
    rects = doc.getElementsByTagName("rect")
    assert len(rects) == kinds.count("error") + kinds.count("embedding") + 1  # and the page
    segments = [e for e in doc.getElementsByTagName("line") if e.getAttribute("stroke") != "#eee"]
    assert len(segments) == int(pruned.edge_mask.sum())
    assert "L{}/{}".format(*graph.features[kept[0]][[0, 2]].tolist()) in snapshot  # pinned list
