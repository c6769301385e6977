"""An attribution graph seen in JupyterLab: its plotly figure and a live widget to explore it.

:func:`graph_figure` draws the pruned graph (:func:`sae_nb.circuits.graph.prune`) as
circuit-tracer's front end lays it out: x the prompt's token positions (ticks are the tokens,
spaces shown as ·), y the layers, the token embeddings at the bottom and the logit nodes on top.
Features are circles sized by their influence on the logits, error nodes squares; an edge's width
and opacity follow its |weight| (relative to the strongest drawn) and its colour its sign.
Hovering a node shows its kind, layer, position, latent, activation, influence and caption.

:class:`CircuitGraphWidget` puts the figure in a widget: click a node for its card (caption, top
contexts, strongest edges in and out), pin nodes, show only the pinned subgraph, group pinned
nodes into a labelled supernode, ablate or scale a supernode through a given ``intervene``
callable, and export the graph JSON that circuit-tracer's and Neuronpedia's front end reads, with
the pins and supernodes in its ``qParams``. Every callback is a method (``select``, ``pin``,
``group``, ``run_intervention``, ``export``), so tests drive it without a browser. An executed
notebook keeps a static copy: the figure as an SVG image and the lists, no script needed.

Past 500 lines: the figure, its static SVG copy and the widget share one node layout and one
caption lookup; split, they would pass both between modules.
"""

from __future__ import annotations

import base64
import html
import json
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from sae_nb.circuits.graph import Graph, PruneResult, graph_scores, node_influence, prune
from sae_nb.circuits.transcoder_set import CircuitError
from sae_nb.util.io import atomic_write_text
from sae_nb.views.dashboard import contexts_html, token_label

WIDGET_CLASS = "sae-nb-circuit"
# Fill and symbol of each kind of node; edges are blue (positive) or red (negative).
KINDS = {"feature": ("#8c6bb1", "circle"), "error": ("#9e9e9e", "square"),
         "embedding": ("#4d4d4d", "diamond"), "logit": ("#2ca25f", "hexagon")}
EDGE_COLOURS = {1: (31, 111, 209), -1: (209, 64, 31)}
GROUP_COLOURS = ["#e6550d", "#3182bd", "#31a354", "#756bb1", "#d6616b", "#8c6d31"]
EDGE_LEVELS = 5  # edges drawn in this many width/opacity steps per sign (one trace each)
CELL = 0.8  # the share of a position's width its nodes of one layer spread over
MUTED = "color: #777"
TD = "text-align: left; padding: 1px 8px; vertical-align: top"


# -- what a node is ---------------------------------------------------------------------------
def shown_token(token: str) -> str:
    """A token read alone (:func:`sae_nb.views.dashboard.token_label`: spaces as ·), with any
    other control character as an escape (``\\x02``): visible, and valid in an SVG."""
    return "".join(f"\\x{ord(c):02x}" if unicodedata.category(c) in ("Cc", "Cs") else c
                   for c in token_label(token))


def caption_of(captions, layer: int, latent: int) -> tuple[str, str]:
    """``(top tokens, explanation)`` of a latent from ``captions``: a mapping or a callable
    ``(layer, latent)`` -> a string (the top tokens) or a dict with ``tokens`` and
    ``explanation``; empty strings where there is none."""
    if captions is None:
        return "", ""
    value = captions(layer, latent) if callable(captions) else captions.get((layer, latent))
    if isinstance(value, Mapping):
        return str(value.get("tokens") or ""), str(value.get("explanation") or "")
    return ("" if value is None else str(value)), ""


def node_label(graph: Graph, i: int) -> str:
    """A node's short name: ``L1/20 @3 ·w``, ``error L1 @3 ·w``, ``emb @3 ·w``, ``logit ·A``."""
    n = graph.node(i)
    if n["kind"] == "logit":
        return f"logit {shown_token(graph.logit_names[i - graph.logit_start])}"
    at = f"@{n['position']} {shown_token(graph.token_strings[n['position']])}"
    return {"feature": f"L{n['layer']}/{n['latent']} {at}", "error": f"error L{n['layer']} {at}",
            "embedding": f"emb {at}"}[n["kind"]]


def hover_text(graph: Graph, i: int, influence: float, captions=None) -> str:
    """A node's hover text (plotly's HTML subset): kind, layer, position and token, latent,
    activation, influence, and a feature's top tokens and explanation."""
    n = graph.node(i)
    lines = [f"<b>{html.escape(node_label(graph, i), quote=False)}</b>", f"kind: {n['kind']}"]
    if n["layer"] is not None and n["kind"] != "logit":
        lines.append(f"layer: {n['layer']}")
    if n["kind"] == "logit":
        k = i - graph.logit_start
        lines.append(f"weight (probability): {float(graph.logit_weights[k]):.4g}")
    else:
        token = html.escape(shown_token(graph.token_strings[n["position"]]), quote=False)
        lines.append(f"position: {n['position']} ({token})")
    if n["latent"] is not None:
        lines += [f"latent: {n['latent']}", f"activation: {n['activation']:.4g}"]
    lines.append(f"influence: {influence:.4g}")
    if n["kind"] == "feature":
        tokens, explanation = caption_of(captions, n["layer"], n["latent"])
        lines += [html.escape(t, quote=False)
                  for t in (tokens, explanation and f"explanation: {explanation}")
                  if t]
    return "<br>".join(lines)


def node_coordinates(graph: Graph, nodes: Sequence[int], influence: torch.Tensor
                     ) -> dict[int, tuple[float, float]]:
    """``{node: (x, y)}``: x within ``CELL / 2`` of the node's position, y its layer (every
    node of a crowded cell staggered by 0.18 up or down); embeddings at y = -1, logits at
    y = ``n_layers``, spread left of the last position, the most probable rightmost."""
    cells: dict[tuple[int, int], list[int]] = {}
    out = {}
    for i in sorted(nodes, key=lambda i: -float(influence[i])):
        n = graph.node(i)
        if n["kind"] == "embedding":
            out[i] = (float(n["position"]), -1.0)
        elif n["kind"] == "logit":
            k = i - graph.logit_start
            out[i] = (graph.n_pos - 1 - 1.0 * k, float(graph.n_layers))
        else:
            cells.setdefault((n["layer"], n["position"]), []).append(i)
    for (layer, pos), members in cells.items():
        m = len(members)
        offsets = np.linspace(-CELL / 2, CELL / 2, m) if m > 1 else [0.0]
        order = np.argsort(np.abs(offsets), kind="stable")  # the strongest nearest the centre
        for j, i in zip(order, members):
            stagger = 0.18 * (1 if j % 2 else -1) if m > 4 else 0.0
            out[i] = (pos + float(offsets[j]), layer + stagger)
    return out


def strongest_edges(graph: Graph, node: int, n: int = 5
                    ) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """The ``n`` strongest nonzero edges into and out of ``node`` by |weight|, as
    ``(other node, weight)``: its sources (row ``node`` of the adjacency) and its targets
    (column ``node``)."""
    def top(values: torch.Tensor) -> list[tuple[int, float]]:
        nz = values.nonzero().flatten()
        best = nz[values[nz].abs().argsort(descending=True, stable=True)][:n]
        return [(int(j), float(values[j])) for j in best]
    return top(graph.adjacency[node]), top(graph.adjacency[:, node])


# -- the figure -------------------------------------------------------------------------------
def graph_figure(graph: Graph, pruned: PruneResult | None = None, captions=None, *,
                 pinned: Sequence[int] = (), supernodes: Mapping[str, Sequence[int]] | None = None,
                 only: Sequence[int] | None = None, influence: torch.Tensor | None = None
                 ) -> go.Figure:
    """The pruned graph as a plotly figure (module docstring); ``pruned`` defaults to
    ``prune(graph)``. ``pinned`` nodes get a black ring, each supernode's members a coloured
    ring and its label; ``only`` draws just those nodes and every nonzero edge among them.
    Node traces carry each point's node index in ``customdata``."""
    pruned = prune(graph) if pruned is None else pruned
    influence = node_influence(graph) if influence is None else influence
    supernodes = dict(supernodes or {})
    placed = sorted(set(pruned.node_mask.nonzero().flatten().tolist()) | set(pinned))
    xy = node_coordinates(graph, placed, influence)
    shown = placed if only is None else sorted(set(only))
    if only is None:
        targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    else:
        idx = torch.tensor(shown, dtype=torch.long)
        t, s = graph.adjacency[idx][:, idx].nonzero(as_tuple=True)
        targets, sources = idx[t], idx[s]
    fig = go.Figure()
    for trace in _edge_traces(graph, targets.tolist(), sources.tolist(), xy):
        fig.add_trace(trace)
    ring = {i: ("#111111", 2.5) for i in pinned}
    for g, (label, members) in enumerate(supernodes.items()):
        colour = GROUP_COLOURS[g % len(GROUP_COLOURS)]
        ring.update({i: (colour, 3.5) for i in members})
        drawn = [xy[i] for i in members if i in xy and i in shown]
        if drawn:
            x, y = np.mean(drawn, 0)
            fig.add_annotation(x=x, y=y, text=f"<b>{html.escape(label, quote=False)}</b>",
                               showarrow=True,
                               arrowcolor=colour, ax=0, ay=-34, font={"color": colour, "size": 13},
                               bgcolor="rgba(255,255,255,0.85)")
    top_inf = float(influence[: graph.token_start].max()) if graph.token_start else 1.0
    for kind, (fill, symbol) in KINDS.items():
        nodes = [i for i in shown if graph.node(i)["kind"] == kind]
        if not nodes:
            continue
        if kind in ("feature", "error"):
            rel = np.sqrt(np.clip([float(influence[i]) / max(top_inf, 1e-12) for i in nodes], 0, 1))
            sizes = (7 + 17 * rel).tolist()
        else:
            sizes = [13] * len(nodes)
        text = None
        if kind == "logit":
            text = [_logit_text(graph, i) for i in nodes]
        fig.add_trace(go.Scatter(
            x=[xy[i][0] for i in nodes], y=[xy[i][1] for i in nodes], customdata=nodes,
            mode="markers+text" if text else "markers", text=text, textposition="top center",
            textfont={"size": 12}, name=f"{kind}s", hovertemplate="%{hovertext}<extra></extra>",
            hovertext=[hover_text(graph, i, float(influence[i]), captions) for i in nodes],
            marker={"size": sizes, "color": fill, "symbol": symbol, "opacity": 0.95,
                    "line": {"color": [ring.get(i, ("white", 1))[0] for i in nodes],
                             "width": [ring.get(i, ("white", 1))[1] for i in nodes]}}))
    fig.add_trace(go.Scatter(x=[], y=[], mode="markers", name="selected", hoverinfo="skip",
                             marker={"size": 30, "symbol": "circle-open", "color": "#d62728",
                                     "line": {"width": 3}}, showlegend=False))
    return _layout(fig, graph, xy)


def _logit_text(graph: Graph, i: int) -> str:
    k = i - graph.logit_start
    name = html.escape(shown_token(graph.logit_names[k]), quote=False)
    weight = float(graph.logit_weights[k])
    return name if graph.logit_tokens[k] is None else f"{name}<br>{weight:.2f}"


def _edge_traces(graph: Graph, targets: list[int], sources: list[int],
                 xy: dict[int, tuple[float, float]]) -> list[go.Scatter]:
    """One trace per (sign, strength level): segments source -> target separated by None."""
    pairs = [(t, s) for t, s in zip(targets, sources) if t in xy and s in xy]
    weights = [float(graph.adjacency[t, s]) for t, s in pairs]
    top = max((abs(w) for w in weights), default=1.0) or 1.0
    buckets: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for (t, s), w in zip(pairs, weights):
        level = min(EDGE_LEVELS - 1, int(np.sqrt(abs(w) / top) * EDGE_LEVELS))
        buckets.setdefault((1 if w >= 0 else -1, level), []).append((t, s))
    traces = []
    for (sign, level), edges in sorted(buckets.items()):
        strength = (level + 0.5) / EDGE_LEVELS
        r, g, b = EDGE_COLOURS[sign]
        x, y = [], []
        for t, s in edges:
            x += [xy[s][0], xy[t][0], None]
            y += [xy[s][1], xy[t][1], None]
        traces.append(go.Scatter(
            x=x, y=y, mode="lines", hoverinfo="skip", legendgroup=str(sign),
            name="positive edge" if sign > 0 else "negative edge",
            showlegend=level == max(lv for sg, lv in buckets if sg == sign),
            line={"width": 0.6 + 3.4 * strength,
                  "color": f"rgba({r},{g},{b},{0.15 + 0.65 * strength:.2f})"}))
    return traces


def _layout(fig: go.Figure, graph: Graph, xy: dict[int, tuple[float, float]]) -> go.Figure:
    L, T = graph.n_layers, graph.n_pos
    row = max(28, min(90, 700 / (L + 2)))  # px per layer
    left = min([x for x, _ in xy.values()] + [0.0]) - 0.6
    ticks = [shown_token(t) for t in graph.token_strings]
    fig.update_layout(  # about 40 px a position, within a notebook's width
        width=int(min(980, max(640, 150 + 40 * (T - left)))), height=int(170 + row * (L + 2)),
        margin={"l": 90, "r": 20, "t": 50, "b": 90},
        plot_bgcolor="white", hovermode="closest", dragmode="pan",
        hoverlabel={"align": "left", "bgcolor": "white", "font": {"size": 12}},
        title={"text": f"Attribution graph: {html.escape(graph.prompt[-80:], quote=False)!s}",
               "y": 1, "yanchor": "top", "pad": {"t": 12}, "font": {"size": 15}},
        legend={"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom", "x": 1,
                "xanchor": "right", "font": {"size": 11}},
        xaxis={"tickvals": list(range(T)), "ticktext": ticks, "range": [left, T + 0.1],
               "showgrid": False, "zeroline": False, "tickfont": {"family": "monospace"},
               "side": "bottom"},
        yaxis={"tickvals": [-1, *range(L), L],
               "ticktext": ["embeddings", *(f"layer {i}" for i in range(L)), "logits"],
               "range": [-1.6, L + 0.9], "showgrid": True, "gridcolor": "#eeeeee",
               "zeroline": False})
    return fig


# -- a static copy ----------------------------------------------------------------------------
def figure_svg(fig: go.Figure, width: int = 1100) -> str:
    """The graph figure's edges, nodes, labels and axes as a standalone SVG (no script), for
    the executed notebook's static copy."""
    height = int(fig.layout.height or 600)
    m = fig.layout.margin
    # Plain numbers: a plotly property read costs microseconds, and the maps below run once per
    # point (thousands of edges; the properties made the static copy of one graph take 20 s).
    left, right, top, bottom = (float(v) for v in (m.l, m.r, m.t, m.b))
    (x0, x1), (y0, y1) = fig.layout.xaxis.range, fig.layout.yaxis.range
    sx, sy = (width - left - right) / (x1 - x0), (height - top - bottom) / (y1 - y0)
    px = lambda x: left + (x - x0) * sx  # noqa: E731
    py = lambda y: height - bottom - (y - y0) * sy  # noqa: E731
    esc = lambda s: html.escape(html.unescape(str(s)))  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" '
           f'fill="white"/>']
    for v, t in zip(fig.layout.yaxis.tickvals, fig.layout.yaxis.ticktext):
        out.append(f'<line x1="{m.l}" x2="{width - m.r}" y1="{py(v):.1f}" y2="{py(v):.1f}" '
                   f'stroke="#eee"/><text x="{m.l - 6}" y="{py(v) + 4:.1f}" '
                   f'text-anchor="end">{esc(t)}</text>')
    for v, t in zip(fig.layout.xaxis.tickvals, fig.layout.xaxis.ticktext):
        out.append(f'<text x="{px(v):.1f}" y="{height - m.b + 16}" text-anchor="middle" '
                   f'font-family="monospace">{esc(t)}</text>')
    for tr in fig.data:
        if tr.mode == "lines":
            pts = list(zip(tr.x, tr.y))
            stroke = f'stroke="{tr.line.color}" stroke-width="{tr.line.width:.2f}"/>'
            for (xa, ya), (xb, yb) in zip(pts[::3], pts[1::3]):
                out.append(f'<line x1="{px(xa):.1f}" y1="{py(ya):.1f}" x2="{px(xb):.1f}" '
                           f'y2="{py(yb):.1f}" {stroke}')
        elif tr.x:
            out += _svg_markers(tr, px, py, esc)
    for a in fig.layout.annotations:
        out.append(f'<text x="{px(a.x):.1f}" y="{py(a.y) - 30:.1f}" text-anchor="middle" '
                   f'font-weight="bold" fill="{a.font.color}">{esc(a.text)}</text>')
    out.append(f'<text x="{m.l}" y="22" font-size="14">{esc(fig.layout.title.text)}</text></svg>')
    return "".join(out)


def _svg_markers(tr, px, py, esc) -> list[str]:
    xs, ys, texts, marker = tr.x, tr.y, tr.text, tr.marker  # read once: see figure_svg
    size, symbol, fill = marker.size, marker.symbol, marker.color
    sizes = size if isinstance(size, (list, tuple)) else [size] * len(xs)
    colours, widths = marker.line.color, marker.line.width
    out = []
    for j, (x, y) in enumerate(zip(xs, ys)):
        r, cx, cy = sizes[j] / 2, px(x), py(y)
        ring = (f'stroke="{colours[j]}" stroke-width="{widths[j]}"'
                if isinstance(colours, (list, tuple)) else 'stroke="white"')
        shape = (f'<rect x="{cx - r:.1f}" y="{cy - r:.1f}" width="{2 * r:.1f}" '
                 f'height="{2 * r:.1f}"' if symbol in ("square", "diamond") else
                 f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r:.1f}"')
        turn = f' transform="rotate(45 {cx:.1f} {cy:.1f})"' if symbol == "diamond" else ""
        out.append(f'{shape} fill="{fill}" {ring}{turn}/>')
        lines = str(texts[j]).split("<br>") if texts else []
        for k, line in enumerate(reversed(lines)):  # the last line just above the marker
            out.append(f'<text x="{cx:.1f}" y="{cy - r - 4 - 13 * k:.1f}" text-anchor="middle">'
                       f"{esc(line)}</text>")
    return out


def table_html(frame: pd.DataFrame, digits: int = 4) -> str:
    """A small table with inline styles (kept by an untrusted notebook): tokens in a column
    named ``token`` with their spaces visible, numbers to ``digits`` significant digits."""
    head = "".join(f'<th style="{TD}">{html.escape(str(c))}</th>' for c in frame.columns)

    def cell(column, value) -> str:
        if column == "token":
            token = html.escape(shown_token(str(value)))
            text = f'<span style="font-family: monospace">{token}</span>'
        elif isinstance(value, (float, np.floating)):
            text = f"{value:+.{digits}g}" if "change" in str(column) else f"{value:.{digits}g}"
        else:
            text = html.escape(str(value))
        return f'<td style="{TD}">{text}</td>'
    body = "".join("<tr>" + "".join(cell(c, v) for c, v in zip(frame.columns, row)) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f'<table class="sae-nb-table"><tr>{head}</tr>{body}</table>'


# -- the widget -------------------------------------------------------------------------------
class CircuitGraphWidget(widgets.VBox):
    """Explore an attribution graph: click, pin, group, intervene, export (module docstring).

    ``captions``: as :func:`caption_of`. ``contexts``: a callable ``(layer, latent)`` returning
    a latent's top contexts as HTML or as the dicts of
    :func:`sae_nb.latents.contexts.latent_contexts`. ``intervene``: a callable
    ``(nodes, mode, factor)`` (node indices; ``"ablate"`` with factor 0 or ``"scale"``) that
    returns a table of the top logits before and after, with the predicted and measured change.
    ``model`` and ``transcoders`` are kept for the caller (``widget.model``); the graph is
    pruned at ``node_threshold`` and ``edge_threshold`` with at most ``max_feature_nodes``
    features, and exported to ``export_path``.
    """

    def __init__(self, graph: Graph, model=None, transcoders=None, captions=None,
                 contexts: Callable | None = None, intervene: Callable | None = None,
                 node_threshold: float = 0.8, edge_threshold: float = 0.98,
                 max_feature_nodes: int | None = None, n_edges: int = 5,
                 export_path: str | Path = "graph.json"):
        super().__init__()
        self.graph, self.model, self.transcoders = graph, model, transcoders
        self.captions, self.contexts, self.intervene = captions, contexts, intervene
        self.thresholds = (node_threshold, edge_threshold)
        self.n_edges = n_edges
        self.pruned = prune(graph, node_threshold, edge_threshold, max_feature_nodes)
        self.influence = node_influence(graph)
        self.scores = graph_scores(graph)
        self.selected: int | None = None
        self.pinned: list[int] = []
        self.supernodes: dict[str, list[int]] = {}
        self.last_table: pd.DataFrame | None = None
        self.figure = go.FigureWidget()
        self.card = widgets.HTML('<span style="color: #777">Click a node to see its card.</span>')
        self.pin_button = widgets.Button(description="pin", disabled=True,
                                         tooltip="add the node to the pinned subgraph")
        self.pinned_view = widgets.HTML()
        self.only_pinned = widgets.Checkbox(False, description="show only the pinned subgraph",
                                            indent=False, layout={"width": "auto"})
        self.label = widgets.Text(placeholder="a label, e.g. say Austin",
                                  description="supernode", layout={"width": "300px"})
        self.group_button = widgets.Button(description="group pinned",
                                           tooltip="group the pinned nodes not yet in a "
                                                   "supernode under the label")
        self.supernode_view = widgets.HTML()
        self.target = widgets.Dropdown(options=[], description="intervene on",
                                       style={"description_width": "initial"},
                                       layout={"width": "360px"})
        self.factor = widgets.FloatText(2.0, description="factor", layout={"width": "160px"})
        self.ablate_button = widgets.Button(description="ablate", button_style="warning")
        self.scale_button = widgets.Button(description="scale")
        self.status = widgets.HTML()
        self.result = widgets.HTML()
        self.export_path = widgets.Text(str(export_path), description="JSON",
                                        layout={"width": "420px"})
        self.export_button = widgets.Button(description="export graph JSON")
        self.export_status = widgets.HTML()
        self.pin_button.on_click(lambda _: self.toggle_pin(self.selected))
        self.only_pinned.observe(lambda _: self.redraw(), names="value")
        self.group_button.on_click(lambda _: self._on_group())
        self.ablate_button.on_click(lambda _: self.run_intervention("ablate"))
        self.scale_button.on_click(lambda _: self.run_intervention("scale"))
        self.export_button.on_click(lambda _: self._on_export())
        self._build()
        self.redraw()

    def _build(self) -> None:
        wrap = {"flex_flow": "row wrap", "align_items": "center", "grid_gap": "4px 12px"}
        if self.intervene is None:
            actions = widgets.HTML(f'<span style="{MUTED}">Interventions: pass intervene=... '
                                   f"(a callable of the nodes, the mode and the factor).</span>")
        else:
            actions = widgets.HBox([self.target, self.ablate_button, self.factor,
                                    self.scale_button, self.status], layout=wrap)
        side = widgets.VBox([
            widgets.HTML("<b>Pinned nodes</b>"), self.pinned_view, self.only_pinned,
            widgets.HBox([self.label, self.group_button], layout=wrap),
            widgets.HTML("<b>Supernodes</b>"), self.supernode_view],
            layout={"flex": "1 1 320px", "min_width": "0"})
        card = widgets.VBox([self.card, self.pin_button],
                            layout={"flex": "1 1 420px", "min_width": "0"})
        replacement, completeness = self.scores
        g = self.graph
        self.children = [
            widgets.HTML(f"<div><b>{html.escape(g.prompt)}</b> <span style=\"{MUTED}\">"
                         f"{g.n_features} active features, {int(self.pruned.node_mask.sum())} of "
                         f"{g.n_nodes} nodes and {int(self.pruned.edge_mask.sum())} edges kept; "
                         f"replacement score {replacement:.3f}, completeness "
                         f"{completeness:.3f}</span></div>"),
            self.figure, widgets.HBox([card, side], layout={**wrap, "align_items": "flex-start"}),
            actions, self.result,
            widgets.HBox([self.export_path, self.export_button, self.export_status],
                         layout=wrap)]
        self.add_class(WIDGET_CLASS)
        for name in ("card", "pin_button", "pinned_view", "only_pinned", "label", "group_button",
                     "supernode_view", "target", "factor", "ablate_button", "scale_button",
                     "status", "result", "export_button", "export_status"):  # for tests
            getattr(self, name).add_class(f"sae-nb-{name.replace('_', '-')}")

    # -- drawing ----------------------------------------------------------------------------
    def redraw(self) -> None:
        """Draw the figure again from the state: pins, supernodes, the pinned-only view."""
        only = self.pinned if self.only_pinned.value else None
        fig = graph_figure(self.graph, self.pruned, self.captions, pinned=self.pinned,
                           supernodes=self.supernodes, only=only, influence=self.influence)
        with self.figure.batch_update():
            self.figure.data = []
            self.figure.add_traces(fig.data)
            self.figure.layout = fig.layout
        for trace in self.figure.data:
            if trace.customdata is not None:
                trace.on_click(self._on_click)
        self._mark_selected()
        self.pinned_view.value = self._list_html(self.pinned, "nothing pinned yet: click a node, "
                                                              "then pin")
        self.supernode_view.value = "".join(
            f'<div class="sae-nb-supernode"><b>{html.escape(label)}</b>: '
            f"{html.escape(', '.join(node_label(self.graph, i) for i in members))}</div>"
            for label, members in self.supernodes.items()) or (
            f'<span style="{MUTED}">none yet: pin nodes, type a label, group</span>')
        self._update_targets()

    def _mark_selected(self) -> None:
        ring = self.figure.data[-1]
        placed = {i: (x, y) for tr in self.figure.data if tr.customdata is not None
                  for i, x, y in zip(tr.customdata, tr.x, tr.y)}
        at = placed.get(self.selected)
        ring.x, ring.y = ([at[0]], [at[1]]) if at else ([], [])
        # A reloaded page builds the figure from these synced traits, not from the messages
        # above: keep them on what is shown (plotly sets them only when displayed).
        self.figure._widget_data = deepcopy(self.figure._data)
        self.figure._widget_layout = deepcopy(self.figure._layout_obj._props)

    def _list_html(self, nodes: Sequence[int], empty: str) -> str:
        if not nodes:
            return f'<span style="{MUTED}">{empty}</span>'
        return "<ul style=\"margin: 2px 0\">" + "".join(
            f'<li data-node="{i}">{html.escape(node_label(self.graph, i))}</li>'
            for i in nodes) + "</ul>"

    # -- a node's card -----------------------------------------------------------------------
    def _on_click(self, trace, points, state) -> None:
        if points.point_inds:
            self.select(int(trace.customdata[points.point_inds[0]]))

    def select(self, node: int) -> None:
        """Show ``node``'s card and ring it in the figure."""
        node = int(node)
        if not 0 <= node < self.graph.n_nodes:
            raise CircuitError(f"node={node} is not in 0..{self.graph.n_nodes - 1}.")
        self.selected = node
        self.card.value = self.card_html(node)
        self.pin_button.disabled = False
        self.pin_button.description = "unpin" if node in self.pinned else "pin"
        self._mark_selected()
        self._update_targets()

    def card_html(self, node: int) -> str:
        """A node's card: what it is, its caption, top contexts, strongest edges in and out."""
        g, n = self.graph, self.graph.node(node)
        parts = [f'<div class="sae-nb-card-title" style="font-size: 14px"><b>'
                 f"{html.escape(node_label(g, node))}</b> <span style=\"{MUTED}\">"
                 f"{n['kind']}, influence {float(self.influence[node]):.4g}"
                 + (f", activation {n['activation']:.4g}" if n["activation"] is not None else "")
                 + "</span></div>"]
        if n["kind"] == "feature":
            tokens, explanation = caption_of(self.captions, n["layer"], n["latent"])
            if explanation:
                parts.append(f"<div>explanation: <b>{html.escape(explanation)}</b></div>")
            if tokens:
                parts.append(f'<div style="{MUTED}">{html.escape(tokens)}</div>')
            if self.contexts is not None:
                shown = self.contexts(n["layer"], n["latent"])
                if not isinstance(shown, str):
                    shown = list(shown)
                    shown = contexts_html(shown, max((c["value"] for c in shown), default=1.0))
                parts.append(f'<details open><summary>top contexts</summary>{shown}</details>')
        incoming, outgoing = strongest_edges(g, node, self.n_edges)
        for title, edges, cls in (("strongest inputs", incoming, "in"),
                                  ("strongest outputs", outgoing, "out")):
            rows = "".join(f'<tr data-node="{j}"><td style="{TD}">'
                           f"{html.escape(node_label(g, j))}</td><td style=\"{TD}; "
                           f'font-family: monospace">{w:+.4g}</td></tr>' for j, w in edges)
            parts.append(f'<div><b>{title}</b> <span style="{MUTED}">(direct effect)</span>'
                         f'<table class="sae-nb-edges-{cls}">{rows}</table></div>' if rows else
                         f'<div style="{MUTED}">no {title.split()[1]}</div>')
        return "".join(parts)

    # -- pins and supernodes -----------------------------------------------------------------
    def pin(self, node: int) -> None:
        if node not in self.pinned:
            self.pinned.append(int(node))
        self._after_pins()

    def unpin(self, node: int) -> None:
        if node in self.pinned:
            self.pinned.remove(node)
        for label in list(self.supernodes):
            self.supernodes[label] = [i for i in self.supernodes[label] if i != node]
            if not self.supernodes[label]:
                del self.supernodes[label]
        self._after_pins()

    def toggle_pin(self, node: int | None) -> None:
        """The pin button: pin the selected node, or unpin it when pinned."""
        if node is not None:
            (self.unpin if node in self.pinned else self.pin)(node)

    def _after_pins(self) -> None:
        self.redraw()
        if self.selected is not None:
            self.pin_button.description = "unpin" if self.selected in self.pinned else "pin"

    def group(self, label: str) -> list[int]:
        """Group the pinned nodes not yet in a supernode under ``label``; returns them."""
        label = label.strip()
        if not label:
            raise CircuitError("The supernode needs a label: type one, e.g. 'say Austin'.")
        if label in self.supernodes:
            raise CircuitError(f"A supernode is already labelled {label!r}; choose another label.")
        grouped = {i for members in self.supernodes.values() for i in members}
        members = [i for i in self.pinned if i not in grouped]
        if not members:
            raise CircuitError("No pinned node is left outside a supernode: pin nodes first.")
        self.supernodes[label] = members
        self.redraw()
        self.target.value = tuple(members)
        return members

    def _on_group(self) -> None:
        try:
            self.group(self.label.value)
            self.label.value = ""
        except CircuitError as err:
            self.supernode_view.value += f'<p style="color: crimson">{html.escape(str(err))}</p>'

    def _update_targets(self) -> None:
        options = [(f"supernode {label} ({len(m)} nodes)", tuple(m))
                   for label, m in self.supernodes.items()]
        if self.selected is not None:
            options.append((f"node {node_label(self.graph, self.selected)}", (self.selected,)))
        value = self.target.value if self.target.value in [v for _, v in options] else None
        self.target.options = options
        self.target.value = value if value is not None else (options[0][1] if options else None)

    # -- interventions and export ------------------------------------------------------------
    def run_intervention(self, mode: str, nodes: Sequence[int] | None = None,
                         factor: float | None = None) -> pd.DataFrame | None:
        """Call ``intervene`` on ``nodes`` (default: the chosen target) with ``mode``
        ("ablate": factor 0; "scale": the factor box) and show its table."""
        nodes = list(self.target.value or ()) if nodes is None else list(nodes)
        factor = 0.0 if mode == "ablate" else float(self.factor.value if factor is None else factor)
        if self.intervene is None or not nodes:
            self.status.value = f'<span style="{MUTED}">Pin and group nodes, or click one.</span>'
            return None
        buttons = (self.ablate_button, self.scale_button)
        clicked = buttons[mode != "ablate"]
        label = clicked.description
        for b in buttons:
            b.disabled = True
        clicked.description = "running..."
        what = html.escape(next((t for t, v in self.target.options if list(v) == nodes),
                                f"{len(nodes)} nodes"))
        self.status.value = f'<span style="{MUTED}">{mode} {what} (x {factor:g})...</span>'
        try:
            table = self.intervene(nodes, mode, factor)
        except Exception as err:  # shown in the widget: a callback's exception is lost otherwise
            self.status.value = (f'<span style="color: crimson">{type(err).__name__}: '
                                 f"{html.escape(str(err))}</span>")
            return None
        finally:
            for b in buttons:
                b.disabled = False
            clicked.description = label
        self.last_table = table
        self.status.value = f"done: {mode} {what} (x {factor:g})"
        self.result.value = (f'<div class="sae-nb-intervention"><b>Top logits: {mode} {what} '
                             f"(x {factor:g})</b>{table_html(table)}</div>")
        return table

    def export(self, path: str | Path | None = None) -> dict:
        """Write the graph JSON (circuit-tracer's and Neuronpedia's front end) to ``path`` (the
        box's by default), with the pinned nodes and supernodes in its ``qParams``."""
        path = Path(self.export_path.value if path is None else path)
        out = self.graph.to_json(None, slug=path.stem, node_threshold=self.thresholds[0],
                                 edge_threshold=self.thresholds[1])
        ids = {n["node_id"] for n in out["nodes"]}
        json_id = {i: self.graph.node_id(i) for i in self.pinned}
        out["qParams"]["pinnedIds"] = [json_id[i] for i in self.pinned if json_id[i] in ids]
        out["qParams"]["supernodes"] = [[label, *(json_id[i] for i in m if json_id[i] in ids)]
                                        for label, m in self.supernodes.items()]
        atomic_write_text(path, json.dumps(out, indent=1))
        return out

    def _on_export(self) -> None:
        try:
            out = self.export()
            self.export_status.value = (f"wrote {len(out['nodes'])} nodes and "
                                        f"{len(out['links'])} links to "
                                        f"{html.escape(self.export_path.value)}")
        except OSError as err:
            self.export_status.value = (f'<span style="color: crimson">{html.escape(str(err))}'
                                        f"</span>")

    # -- the static copy ---------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs):
        """The widget, plus a static HTML copy and a plain-text line: an executed notebook
        opened later (untrusted, or without the kernel) shows the graph and the lists."""
        bundle = super()._repr_mimebundle_(**kwargs)
        bundle["text/html"] = self.snapshot_html()
        bundle["text/plain"] = (f"CircuitGraphWidget of {self.graph.prompt!r}: a live widget; "
                                f"run this cell in JupyterLab to use it.")
        return bundle

    def snapshot_html(self) -> str:
        """The figure as an SVG image (a data URI: the notebook sanitizer keeps it), the card,
        the pinned nodes, the supernodes and the last intervention's table."""
        fig = go.Figure(self.figure)
        svg = base64.b64encode(figure_svg(fig).encode()).decode()
        return (f'<div class="{WIDGET_CLASS}-snapshot"><p style="{MUTED}"><b>Attribution graph '
                f"(a static copy).</b> The live graph is a widget: run this cell with a kernel "
                f"to hover, click, pin and group.</p>{self.children[0].value}"
                f'<img alt="the attribution graph" style="max-width: 100%" '
                f'src="data:image/svg+xml;base64,{svg}"/>'
                f'<div style="display: flex; flex-wrap: wrap; gap: 2em"><div>{self.card.value}'
                f"</div><div><div><b>Pinned nodes</b></div>{self.pinned_view.value}<div><b>"
                f"Supernodes</b></div>{self.supernode_view.value}</div></div>"
                f"{self.result.value}</div>")

