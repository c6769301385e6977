"""Plotly figures of activation stores and trained dictionaries. Pure functions: they return
figures and never display.

Store figures read a random sample of rows through the store, a chunk at a time, so a store of
any size costs at most ``max_rows`` rows of work and a few MB of memory. Dictionary figures read
a training log or an evaluation's firing densities.

Past 500 lines: a shelf of independent figure functions, one per figure the notebooks show.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator, Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from sae_nb.activations.store import ActivationStore
from sae_nb.views import label_layout

CHUNK_ROWS = 8192  # rows read from the memory-mapped shards at a time
# Panels of the training curves: log column, title, log-scaled y axis.
TRAINING_PANELS = (("loss", "loss", True), ("l0", "L0 (active latents per token)", False),
                   ("fvu", "FVU (fraction of variance unexplained)", True),
                   ("dead_frac", "dead fraction (not fired within the window)", False))
DEAD_LOG10 = -9.0  # log10 densities below this are latents that never fired (log10(0 + eps))


def sample_rows(store: ActivationStore, max_rows: int = 20_000, seed: int = 0) -> np.ndarray:
    """Sorted row numbers of a uniform sample of at most ``max_rows`` rows (all rows if fewer)."""
    if max_rows < 1:
        raise ValueError(f"max_rows={max_rows}; pass a positive number of rows to sample.")
    if len(store) <= max_rows:
        return np.arange(len(store))
    return np.sort(np.random.default_rng(seed).choice(len(store), max_rows, replace=False))


def _read_chunks(store: ActivationStore, rows: np.ndarray) -> Iterator[np.ndarray]:
    """``(n, d)`` float32 arrays of ``rows``, ``CHUNK_ROWS`` at a time."""
    for start in range(0, len(rows), CHUNK_ROWS):
        yield store[rows[start : start + CHUNK_ROWS]]


def sample_norms(store: ActivationStore, max_rows: int = 20_000,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, norms)``: sampled row numbers and the L2 norm of each of those rows."""
    rows = sample_rows(store, max_rows, seed)
    norms = [np.linalg.norm(acts, axis=1) for acts in _read_chunks(store, rows)]
    return rows, np.concatenate(norms) if norms else np.zeros(0, dtype=np.float32)


def dimension_stats(store: ActivationStore, max_rows: int = 20_000,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(mean_D, std_D)`` of every dimension over a sample of rows (float64 accumulation)."""
    total_D, squares_D, n = np.zeros(store.d), np.zeros(store.d), 0
    for acts_ND in _read_chunks(store, sample_rows(store, max_rows, seed)):
        acts_ND = acts_ND.astype(np.float64)
        total_D += acts_ND.sum(0)
        squares_D += (acts_ND**2).sum(0)
        n += len(acts_ND)
    mean_D = total_D / max(n, 1)
    return mean_D, np.sqrt(np.maximum(squares_D / max(n, 1) - mean_D**2, 0))


def activation_norms_figure(stores: Mapping[str, ActivationStore], max_rows: int = 20_000,
                            seed: int = 0, bins: int = 80) -> go.Figure:
    """Distribution of per-token L2 norms, one line per site, on a log axis.

    Residual streams carry a few tokens with norms ten times the bulk ("massive activations"),
    so the bins are log-spaced: both the bulk and the tail stay visible.
    """
    fig = go.Figure()
    for site, store in stores.items():
        _, norms = sample_norms(store, max_rows, seed)
        if len(norms) == 0:
            continue
        lo, hi = max(float(norms.min()), 1e-6), max(float(norms.max()), 1e-6)
        edges = np.geomspace(lo, hi * 1.0001, bins + 1)
        counts, _ = np.histogram(norms, bins=edges)
        centers = np.sqrt(edges[:-1] * edges[1:])  # geometric bin centers
        fig.add_trace(go.Scatter(
            x=centers, y=counts / len(norms), mode="lines", line_shape="hvh",
            name=f"{site} (median {np.median(norms):.3g}, n={len(norms):,})",
            hovertemplate="norm %{x:.3g}<br>fraction %{y:.3%}<extra>" + site + "</extra>",
        ))
    fig.update_layout(title="Per-token activation norms", xaxis_title="L2 norm (log scale)",
                      yaxis_title="fraction of sampled tokens", legend_title="site",
                      template="plotly_white")
    fig.update_xaxes(type="log")
    return fig


def top_dimensions_figure(stores: Mapping[str, ActivationStore], top: int = 20,
                          max_rows: int = 20_000, seed: int = 0) -> go.Figure:
    """The ``top`` dimensions with the largest standard deviation, one panel per site.

    A dashed line marks the median standard deviation over all dimensions: a few dimensions far
    above it dominate reconstruction losses unless the inputs are normalized.
    """
    fig = make_subplots(rows=len(stores), cols=1, subplot_titles=list(stores),
                        vertical_spacing=0.25 / max(len(stores), 1))
    for i, (site, store) in enumerate(stores.items(), start=1):
        mean_D, std_D = dimension_stats(store, max_rows, seed)
        dims = np.argsort(std_D)[::-1][:top]
        fig.add_trace(go.Bar(
            x=[str(d) for d in dims], y=std_D[dims], customdata=mean_D[dims], name=site,
            hovertemplate="dim %{x}<br>std %{y:.3g}<br>mean %{customdata:.3g}<extra></extra>",
        ), row=i, col=1)
        fig.add_hline(y=float(np.median(std_D)), line_dash="dash", row=i, col=1,
                      annotation_text="median std", annotation_position="top right")
        fig.update_xaxes(title_text="dimension", type="category", row=i, col=1)
        fig.update_yaxes(title_text="std", row=i, col=1)
    fig.update_layout(title=f"Top {top} dimensions by standard deviation", showlegend=False,
                      template="plotly_white", height=300 * max(len(stores), 1) + 100)
    return fig


def training_curves_figure(log: pd.DataFrame) -> go.Figure:
    """Loss, L0, FVU and the dead fraction of a training log against tokens seen, one panel
    each (``TrainResult.log``: columns ``tokens`` and those of ``TRAINING_PANELS``).

    The values are those of single training batches, so they are noisy; the held-out metrics
    are the ones to compare dictionaries by.
    """
    missing = [c for c in ("tokens",) + tuple(p[0] for p in TRAINING_PANELS) if c not in log]
    if missing or log.empty:
        raise ValueError(f"The training log is empty or lacks columns {missing}; pass "
                         f"TrainResult.log from sae_nb.train_dictionary.")
    fig = make_subplots(rows=2, cols=2, subplot_titles=[p[1] for p in TRAINING_PANELS],
                        horizontal_spacing=0.1, vertical_spacing=0.15)
    for i, (column, _, log_y) in enumerate(TRAINING_PANELS):
        row, col = i // 2 + 1, i % 2 + 1
        fig.add_trace(go.Scatter(
            x=log["tokens"], y=log[column], mode="lines", name=column,
            hovertemplate="%{x:,} tokens<br>" + column + " %{y:.4g}<extra></extra>",
        ), row=row, col=col)
        fig.update_xaxes(title_text="tokens" if row == 2 else None, row=row, col=col)
        if log_y and (log[column] > 0).all():
            fig.update_yaxes(type="log", row=row, col=col)
    fig.update_layout(title="Training curves (per batch)", showlegend=False,
                      template="plotly_white", height=600)
    return fig


def density_histogram_figure(log10_density: np.ndarray, bins: int = 50) -> go.Figure:
    """Histogram of each latent's log10 firing frequency, with the dead latents (never fired)
    as a separate red bar left of the rest (``Evaluation.log10_density()``).

    Healthy dictionaries have a bulk between 1e-4 and 1e-1; a bump near 1 marks latents that
    fire on almost every token, and a large dead bar a dictionary that wastes its width.
    """
    log10_density = np.asarray(log10_density, dtype=np.float64)
    dead = log10_density < DEAD_LOG10
    alive = log10_density[~dead]
    n, n_dead = len(log10_density), int(dead.sum())
    hi = max(float(alive.max()), 0.0) if len(alive) else 0.0  # log10(1 + eps) is just above 0
    lo = float(alive.min()) if len(alive) else -5.0
    edges = np.linspace(min(lo, hi - 1.0), hi, bins + 1)
    counts, _ = np.histogram(alive, bins=edges)
    width = edges[1] - edges[0]
    fig = go.Figure(go.Bar(
        x=(edges[:-1] + edges[1:]) / 2, y=counts, width=width, name="alive",
        hovertemplate="log10 density %{x:.2f}<br>%{y} latents<extra></extra>",
    ))
    dead_x = edges[0] - max(3 * width, 0.25)
    fig.add_trace(go.Bar(x=[dead_x], y=[n_dead], width=max(2 * width, 0.15), name="dead",
                         marker_color="crimson",
                         hovertemplate="never fired: %{y} latents<extra></extra>"))
    share = 100 * n_dead / max(n, 1)  # two significant digits below 1%: 1 of 4,608 is 0.022%
    shown = f"{share:.2g}%" if 0 < share < 1 else f"{share:.1f}%"
    fig.add_annotation(x=dead_x, y=n_dead, text=f"dead: {n_dead} ({shown})",
                       showarrow=False, yshift=12)
    fig.update_layout(title=f"Latent firing frequency on held-out tokens ({n - n_dead} alive, "
                            f"{n_dead} dead of {n})",
                      xaxis_title="log10 firing frequency", yaxis_title="latents",
                      template="plotly_white", bargap=0, showlegend=False)
    return fig


def codes_heatmap_figure(codes, texts: list[str], latents, max_chars: int = 60) -> go.Figure:
    """Sentences by latents: each sentence's code on the chosen latents (e.g. the strongest)."""
    z = np.asarray(codes)[:, np.asarray(latents)]
    labels = [t if len(t) <= max_chars else t[: max_chars - 1] + "…" for t in texts]
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"latent {int(i)}" for i in latents], y=labels, colorscale="Viridis",
        colorbar={"title": "code"},
        hovertemplate="%{y}<br>%{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title="Strongest latents per sentence", height=max(400, 18 * len(texts)),
                      yaxis={"autorange": "reversed"}, margin={"l": 10})
    return fig


def probe_accuracy_figure(table: pd.DataFrame) -> go.Figure:
    """Held-out accuracy of the top-k sparse probes against k, with the raw-activation and
    all-latent probes and the majority baseline as horizontal reference lines.

    ``table`` is the table of :func:`sae_nb.texts.probing.run_probes`: columns probe, k,
    accuracy, majority_baseline."""
    sparse = table[table["k"].notna()].sort_values("k")
    fig = go.Figure(go.Scatter(x=sparse["k"], y=sparse["accuracy"], mode="lines+markers",
                               name="top-k latents"))
    refs = [(name, table.loc[table["probe"] == name, "accuracy"], dash)
            for name, dash in (("raw", "dash"), ("all latents", "dot"))]
    refs.append(("majority baseline", table["majority_baseline"].iloc[:1], "dashdot"))
    for name, value, dash in refs:
        if len(value):
            fig.add_hline(y=float(value.iloc[0]), line_dash=dash,
                          annotation_text=f"{name} {float(value.iloc[0]):.3f}")
    ks = [int(k) for k in sparse["k"]]  # a tick at each k probed, not log-axis minor digits
    fig.update_layout(xaxis_title="k (latents chosen on the train split)", xaxis_type="log",
                      xaxis={"tickvals": ks, "ticktext": [str(k) for k in ks]},
                      yaxis_title="held-out accuracy", title="Sparse probes")
    return fig


def layer_sweep_figure(sweep: pd.DataFrame) -> go.Figure:
    """Held-out accuracy and ROC AUC of the raw probe at each swept site, in sweep order, with
    the majority baseline: where along the model the property is linearly readable.

    ``sweep`` is the table of :func:`sae_nb.texts.probing.layer_sweep`: columns site,
    accuracy, roc_auc, majority_baseline."""
    # Sites of one kind (resid_out_layer0..29) are drawn at their layer number: 30 site names
    # on the axis would be rotated and unreadable.
    parts = sweep["site"].astype(str).str.extract(r"^(\w+?)_layer(\d+)$")
    one_kind = len(sweep) > 0 and parts[0].notna().all() and parts[0].nunique() == 1
    x = parts[1].astype(int) if one_kind else sweep["site"]
    x_title = f"layer ({parts[0].iloc[0]})" if one_kind else "site"
    fig = go.Figure([go.Scatter(x=x, y=sweep[col], mode="lines+markers", name=name,
                                text=sweep["site"], hovertemplate="%{text}: %{y:.3f}")
                     for col, name in (("accuracy", "accuracy"), ("roc_auc", "ROC AUC"))])
    if len(sweep):
        baseline = float(sweep["majority_baseline"].iloc[0])
        fig.add_hline(y=baseline, line_dash="dashdot",
                      annotation_text=f"majority baseline {baseline:.3f}")
    fig.update_layout(xaxis_title=x_title, yaxis_title="held-out score",
                      title="Raw-activation probe across the model")
    return fig


# ---------------------------------------------------------------- clusters and families


def _wrap(text: str, width: int = 60) -> str:
    """Hover text broken into lines of about ``width`` characters."""
    return "<br>".join(textwrap.wrap(str(text), width)) or " "


def silhouette_figure(table: pd.DataFrame, suggested: int | None = None) -> go.Figure:
    """Mean silhouette against the number of clusters
    (:func:`sae_nb.texts.clustering.silhouette_sweep`), with the suggested k marked. Higher is
    better separated; near 0 means no clear groups."""
    fig = go.Figure(go.Scatter(x=table["k"], y=table["silhouette"], mode="lines+markers",
                               name="silhouette",
                               hovertemplate="k %{x}<br>silhouette %{y:.3f}<extra></extra>"))
    if suggested is not None:
        fig.add_vline(x=suggested, line_dash="dash", annotation_text=f"suggested k {suggested}")
    fig.update_layout(title="Silhouette sweep", xaxis_title="number of clusters k",
                      yaxis_title="mean silhouette", template="plotly_white")
    return fig


def cluster_map_figure(table: pd.DataFrame, title: str = "Texts in latent space") -> go.Figure:
    """A 2-D map of texts (:func:`sae_nb.texts.clustering.text_cluster_table`: text, label,
    cluster, x, y), one trace per cluster, the text on hover. When the texts have labels, a
    second set of traces (one per label) is one button away: colour by cluster or by label."""
    fig = go.Figure()
    groups = [("cluster", sorted(table["cluster"].unique()))]
    has_labels = "label" in table and table["label"].notna().all()
    if has_labels:
        groups.append(("label", sorted(table["label"].astype(str).unique())))
    hover = table["text"].map(_wrap) + "<br>cluster " + table["cluster"].astype(str)
    if has_labels:
        hover = hover + " · label " + table["label"].astype(str)
    for g, (column, values) in enumerate(groups):
        for value in values:
            part = table[table[column].astype(str) == str(value)]
            fig.add_trace(go.Scatter(x=part["x"], y=part["y"], mode="markers",
                                     name=f"{column} {value}", text=hover[part.index].tolist(),
                                     visible=g == 0, hovertemplate="%{text}<extra></extra>"))
    if has_labels:
        n_c = len(groups[0][1])
        show = [[i < n_c for i in range(len(fig.data))], [i >= n_c for i in range(len(fig.data))]]
        # Buttons just above the plot, the title above them (both at the top covered it).
        fig.update_layout(margin={"t": 110}, updatemenus=[{
            "type": "buttons", "direction": "right", "x": 0, "y": 1.02, "xanchor": "left",
            "yanchor": "bottom", "buttons": [
            {"label": "colour by cluster", "method": "update", "args": [{"visible": show[0]}]},
            {"label": "colour by label", "method": "update", "args": [{"visible": show[1]}]}]}])
    fig.update_layout(title={"text": title, "y": 0.97, "yanchor": "top"},
                      xaxis_title="component 1", yaxis_title="component 2",
                      template="plotly_white", height=600)
    return fig


def family_heatmap_figure(families, tokens: Mapping[int, list[str]] | None = None,
                          show: list[int] | None = None, max_latents: int = 60) -> go.Figure:
    """The similarity between the members of some families
    (:class:`sae_nb.latents.families.Families`), latents ordered by family and, within one, by
    the dendrogram, so families show as bright blocks on the diagonal. ``show`` lists family
    ids; by default the largest ones that fit ``max_latents``."""
    if show is None:
        show, total = [], 0
        for f in range(int(families.family.max()) + 1):
            size = int((families.family == f).sum())
            if size < 2 or (show and total + size > max_latents):
                break
            show, total = show + [f], total + size
        show = show or [0]
    members = np.concatenate([families.members(f) for f in show])[:max_latents]
    where = {int(m): i for i, m in enumerate(families.latents)}
    pos = np.array([where[int(m)] for m in members])
    fam = {int(m): int(f) for f in show for m in families.members(f)}
    names = [f"{int(m)} (f{fam[int(m)]})" for m in members]
    tok = [" ".join((tokens or {}).get(int(m), [])[:3]) for m in members]
    hover = [[f"latent {members[i]}: {tok[i]}<br>latent {members[j]}: {tok[j]}"
              for j in range(len(members))] for i in range(len(members))]
    fig = go.Figure(go.Heatmap(z=families.similarity[np.ix_(pos, pos)], x=names, y=names,
                               text=hover, colorscale="Viridis", colorbar={"title": "similarity"},
                               hovertemplate="%{text}<br>similarity %{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"{families.name} similarity within families {show}",
                      xaxis={"type": "category"}, template="plotly_white",
                      yaxis={"type": "category", "autorange": "reversed"},
                      height=max(450, 14 * len(members) + 150))
    return fig


# ---------------------------------------------------------------- latents (the explorer)


def latent_histogram_figure(edges: np.ndarray, counts: np.ndarray,
                            title: str = "Activation histogram (nonzero activations)") -> go.Figure:
    """Bar histogram of one latent's nonzero activations from precomputed ``edges`` (n_bins + 1)
    and ``counts`` (n_bins), e.g. ``FeatureStats.hist_edges[i]`` and ``hist_counts[i]``.

    The bars keep their bin widths, so a figure widget can swap in another latent's bins."""
    x, width, y = histogram_bars(edges, counts)
    fig = go.Figure(go.Bar(x=x, y=y, width=width, marker_color="darkorange", name="tokens",
                           hovertemplate="activation %{x:.3g}<br>%{y:,} tokens<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="activation", yaxis_title="tokens",
                      template="plotly_white", bargap=0, showlegend=False, height=280,
                      margin={"l": 50, "r": 10, "t": 40, "b": 40})
    return fig


def histogram_bars(edges, counts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(centers, widths, counts)`` of the bars of a histogram given by its bin edges."""
    edges = np.asarray(edges, dtype=np.float64)
    counts = np.asarray(counts)
    if edges.ndim != 1 or len(edges) != len(counts) + 1:
        raise ValueError(f"A histogram needs n + 1 edges for n counts; got {edges.shape} edges "
                         f"and {counts.shape} counts.")
    return (edges[:-1] + edges[1:]) / 2, np.diff(edges), counts


def density_max_figure(density: np.ndarray, max_act: np.ndarray,
                       latents: np.ndarray | None = None) -> go.Figure:
    """Each latent's firing frequency (log axis) against its largest activation, one point per
    alive latent; hovering names the latent. Dense, weak latents sit bottom right, rare strong
    ones top left. ``latents`` (optional) are marked in red, e.g. those exported to dashboards."""
    density, max_act = np.asarray(density, np.float64), np.asarray(max_act, np.float64)
    alive = np.nonzero(density > 0)[0]
    fig = go.Figure(go.Scattergl(
        x=density[alive], y=max_act[alive], mode="markers", customdata=alive, name="latents",
        marker={"size": 4, "opacity": 0.5},
        hovertemplate="latent %{customdata}<br>density %{x:.2e}<br>max %{y:.3g}<extra></extra>"))
    if latents is not None and len(latents):
        latents = np.asarray(latents)
        fig.add_trace(go.Scattergl(
            x=density[latents], y=max_act[latents], mode="markers", customdata=latents,
            name="chosen", marker={"size": 8, "color": "crimson"},
            hovertemplate="latent %{customdata}<br>density %{x:.2e}<br>max %{y:.3g}"
                          "<extra></extra>"))
    fig.update_layout(title=f"Firing frequency and largest activation ({len(alive)} alive latents)",
                      xaxis_title="firing frequency (log scale)", yaxis_title="max activation",
                      template="plotly_white", showlegend=False)
    fig.update_xaxes(type="log")
    return fig


def steering_figure(table: pd.DataFrame, target: str = "sentiment shift") -> go.Figure:
    """A steering sweep (:func:`sae_nb.interventions.steering.steering_sweep`): the target's
    shift against the KL to the clean model on neutral text (left) and against the CE increase
    (right), one curve per method, points labelled by coefficient, with bars of two standard
    errors of the shift when the table has ``shift_se``. Up and to the left is better."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("against KL(clean || steered)",
                                                        "against the CE increase"))
    colors = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
    for i, (method, rows) in enumerate(table.groupby("method", sort=False)):
        rows = rows.sort_values("coefficient")
        error = ({"type": "data", "array": 2 * rows["shift_se"].fillna(0), "thickness": 1}
                 if "shift_se" in rows else None)  # two standard errors over the prompts
        for col, x in ((1, "kl"), (2, "ce_increase")):
            fig.add_trace(go.Scatter(
                x=rows[x], y=rows["shift"], mode="lines+markers", name=str(method),
                legendgroup=str(method), showlegend=col == 1, customdata=rows["coefficient"],
                line={"color": colors[i % len(colors)]}, error_y=error,
                hovertemplate=f"{method}<br>coefficient %{{customdata}}<br>{x} %{{x:.3f}}<br>"
                              f"shift %{{y:+.3f}}<extra></extra>"), row=1, col=col)
    fig.update_xaxes(title_text="KL (nats per token)", row=1, col=1)
    fig.update_xaxes(title_text="CE increase (nats per token)", row=1, col=2)
    fig.update_yaxes(title_text=target, row=1, col=1)
    fig.update_layout(title=f"Steering: {target} against side effects", template="plotly_white")
    return fig


def attribution_scatter_figure(table: pd.DataFrame) -> go.Figure:
    """Attribution (activation x gradient) against the measured ablation effect of the same
    (position, latent) pairs (:func:`sae_nb.interventions.attribution.ablation_check`), with the
    diagonal."""
    a, b = table["attribution"].to_numpy(float), table["ablation_effect"].to_numpy(float)
    lo, hi = float(min(a.min(), b.min(), 0)), float(max(a.max(), b.max(), 0))
    fig = go.Figure([
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x",
                   line={"color": "gray", "dash": "dot"}),
        go.Scatter(x=a, y=b, mode="markers", name="latent at a position",
                   customdata=np.stack([table["latent"], table["position"],
                                        table["token"].astype(str)], 1),
                   hovertemplate="latent %{customdata[0]} at %{customdata[1]} "
                                 "(%{customdata[2]})<br>attribution %{x:.3f}<br>"
                                 "ablation %{y:.3f}<extra></extra>")])
    fig.update_layout(title="Attribution against the true ablation effect",
                      xaxis_title="attribution (activation x gradient)",
                      yaxis_title="measured effect of ablating it", template="plotly_white")
    return fig


# Readable names of explanation scores, with the chance level a reader compares them to.
SCORE_TITLES = {"f1": "rule F1 (chance about 0)", "detection_auroc": "detection AUROC (chance 0.5)",
                "fuzzing_auroc": "fuzzing AUROC (chance 0.5)",
                "embedding_auroc": "embedding AUROC (chance 0.5)"}


def scores_box_figure(table: pd.DataFrame, methods=("rule", "rule:control", "llm",
                                                    "llm:control")) -> go.Figure:
    """Explanation scores (notebook 08's table: method, score, score_name) as a box per method
    with its points, one panel per score titled by :data:`SCORE_TITLES` (not
    ``score_name=detection_auroc``), each with its own y axis: an F1 and an AUROC differ."""
    names = [n for n in dict.fromkeys(table["score_name"]) if isinstance(n, str)]
    # each title on two lines, its chance level under the score's name: side by side in one
    # line they run into each other in a 700 px output
    titles = [SCORE_TITLES.get(n, n.replace("_", " ")).replace(" (", "<br>(", 1) for n in names]
    fig = make_subplots(rows=1, cols=max(len(names), 1), horizontal_spacing=0.08,
                        subplot_titles=titles)
    order = [m for m in methods if m in set(table["method"])] + sorted(
        set(table["method"]) - set(methods))
    for j, name in enumerate(names):
        part = table[(table["score_name"] == name) & table["score"].notna()]
        for i, method in enumerate(order):
            rows = part[part["method"] == method]
            if len(rows):
                fig.add_trace(go.Box(y=rows["score"], name=method, boxpoints="all",
                                     marker_color=PARETO_COLORS[i % len(PARETO_COLORS)],
                                     showlegend=False), row=1, col=j + 1)
    fig.update_layout(title="Explanation scores per method against their controls",
                      template="plotly_white", height=450, margin={"t": 110})
    return fig


AXIS_TITLES = {"l0": "L0 (active latents per token)", "fvu": "FVU",
               "ce_loss_recovered": "CE loss recovered"}
# A Pareto panel's plot area in pixels in a 900 px wide notebook output (two panels, 500 px
# high, the margins below): where the point labels are placed from.
PANEL_PX = (333.0, 290.0)
PARETO_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _bar(row: pd.Series, m: str, low: str, high: str) -> tuple[float, float]:
    """(plus, minus) error-bar lengths of ``row[m]`` from its ``low`` / ``high`` columns (0
    where absent or NaN)."""
    if low not in row.index or high not in row.index:
        return 0.0, 0.0
    up, down = row[high] - row[m], row[m] - row[low]
    return (float(up) if np.isfinite(up) else 0.0), (float(down) if np.isfinite(down) else 0.0)


def _pareto_label_positions(groups, x: str, y: str, point: str, offset: float,
                            reference: Mapping | None):
    """The ``textposition`` of each group's points in the ``y`` panel (``{group: [...]}``,
    :func:`sae_nb.views.label_layout.place_labels`) and the panel's x and y ranges, fixed so
    that the placement's pixel estimate holds."""
    points, bars, xs, yvals = [], [], [], []
    for name, part in groups:
        for _, r in part.sort_values(x).iterrows():
            text = f"{point}={r[point]}" if point in r.index else ""
            points.append((float(r[x]), float(r[y]), text, str(name)))
            for low, high, shift, half in ((f"{y}_low", f"{y}_high", 0.0, 2.5),
                                           (f"{y}_boot_low", f"{y}_boot_high", offset, 6.0)):
                up, down = _bar(r, y, low, high)  # the grey bars' caps: 5 px each side
                bars.append((float(r[x]) + shift, float(r[y]) - down, float(r[y]) + up, half))
            xs.append(float(r[x]))
            yvals += [bars[-2][1], bars[-2][2], bars[-1][1], bars[-1][2]]
    has_ref = reference is not None and x in reference and y in reference
    if has_ref:
        xs.append(float(reference[x]))
        yvals.append(float(reference[y]))
    x_pad = 0.08 * (max(xs) - min(xs) or 1.0)
    y_pad = 0.08 * (max(yvals) - min(yvals) or 1.0)
    x_range = [min(xs) - x_pad - 0.25 * (max(xs) - min(xs)) * has_ref, max(xs) + x_pad]
    y_range = [min(yvals) - y_pad, max(yvals) + y_pad]
    obstacles = []
    if has_ref:  # the star and its name, to its left
        sx, sy = label_layout.to_pixels(float(reference[x]), float(reference[y]), x_range,
                                        y_range, PANEL_PX)
        name = str(reference.get("name", "reference"))
        obstacles = [(sx - 8, sx + 8, sy - 8, sy + 8),
                     (sx - 10 - label_layout.CHAR_PX * len(name), sx - 8, sy - 8, sy + 8)]
    chosen = label_layout.place_labels([p[:3] for p in points], bars, x_range, y_range,
                                       PANEL_PX, obstacles)
    where: dict[str, list[str]] = {}
    for (_, _, _, name), position in zip(points, chosen):
        where.setdefault(name, []).append(position)
    return where, x_range, y_range


def pareto_figure(summary: pd.DataFrame, x: str = "l0",
                  ys: tuple[str, ...] = ("fvu", "ce_loss_recovered"),
                  by: str = "architecture", point: str = "k",
                  reference: Mapping | None = None) -> go.Figure:
    """L0 against each of ``ys`` (one panel each), one trace per ``by`` value with a point per
    ``point`` value, labelled (``k=16``), from the table of
    :func:`sae_nb.comparison.grid.summarize_runs`. Thick coloured bars: the seed interval
    (``m_low``, ``m_high``); thin grey bars just right of each point: the mean held-out
    bootstrap interval of the runs (``m_boot_low``, ``m_boot_high``). L0's seed interval is in
    the hover, not drawn: its bars would span the panel. ``reference`` (a dict of
    :func:`sae_nb.comparison.grid.score_reference`, e.g. the shipped default dictionary) is a
    black star."""
    ys = [y for y in ys if y in summary.columns]
    if x not in summary.columns or not ys:
        raise ValueError(f"pareto_figure needs {x!r} and one of the y metrics in the table; it "
                         f"has {list(summary.columns)}.")
    axis = {m: AXIS_TITLES.get(m, m.replace("_", " ")) for m in [x, *ys]}
    titles = [f"{axis[x].split(' (')[0]} against {axis[y].split(' (')[0]}" for y in ys]
    fig = make_subplots(rows=1, cols=len(ys), subplot_titles=titles)
    groups = list(summary.groupby(by, sort=False) if by in summary.columns
                  else [("all", summary)])
    offset = 0.012 * float(summary[x].max() - summary[x].min() or 1.0)  # the grey bars' shift
    where = {y: _pareto_label_positions(groups, x, y, point, offset, reference) for y in ys}
    for i, (name, part) in enumerate(groups):
        part = part.sort_values(x)
        color = PARETO_COLORS[i % len(PARETO_COLORS)]
        labels = ([f"{point}={v}" for v in part[point]] if point in part.columns
                  else [""] * len(part))
        l0 = [f"{r[x]:.1f}" + (f" [{r[f'{x}_low']:.1f}, {r[f'{x}_high']:.1f}]"
                               if np.isfinite(r.get(f"{x}_low", np.nan)) else "")
              for _, r in part.iterrows()]
        for j, y in enumerate(ys):
            seed_bars = [_bar(r, y, f"{y}_low", f"{y}_high") for _, r in part.iterrows()]
            fig.add_trace(go.Scatter(
                x=part[x], y=part[y], mode="lines+markers+text", name=str(name),
                legendgroup=str(name), showlegend=j == 0, text=labels, customdata=l0,
                textposition=where[y][0][str(name)], textfont={"size": 11, "color": color},
                line={"color": color},
                error_y={"type": "data", "symmetric": False, "array": [b[0] for b in seed_bars],
                         "arrayminus": [b[1] for b in seed_bars], "thickness": 3, "width": 0},
                hovertemplate=f"%{{text}}<br>{x} %{{customdata}}<br>{y} %{{y:.4f}}"
                              f"<extra>{name}</extra>",
            ), row=1, col=j + 1)
            if f"{y}_boot_low" in part.columns:
                boot = [_bar(r, y, f"{y}_boot_low", f"{y}_boot_high") for _, r in part.iterrows()]
                fig.add_trace(go.Scatter(
                    x=part[x] + offset, y=part[y], mode="markers",
                    name="held-out bootstrap (grey)", legendgroup="bootstrap",
                    showlegend=i == 0 and j == 0, marker={"color": "grey", "size": 3},
                    error_y={"type": "data", "symmetric": False, "array": [b[0] for b in boot],
                             "arrayminus": [b[1] for b in boot], "thickness": 1.2, "width": 5,
                             "color": "grey"},
                    hoverinfo="skip"), row=1, col=j + 1)
            fig.update_xaxes(title_text=axis[x], range=where[y][1], row=1, col=j + 1)
            fig.update_yaxes(title_text=axis[y], range=where[y][2], row=1, col=j + 1)
    if reference is not None:
        for j, y in enumerate(ys):
            if y in reference and x in reference:
                fig.add_trace(go.Scatter(
                    x=[reference[x]], y=[reference[y]], mode="markers+text",
                    name=str(reference.get("name", "reference")), legendgroup="reference",
                    showlegend=j == 0, text=[str(reference.get("name", "reference"))],
                    textposition="middle left",
                    marker={"symbol": "star", "size": 14, "color": "black",
                            "line": {"color": "white", "width": 1}},
                    hovertemplate=f"%{{text}}<br>{x} %{{x:.1f}}<br>{y} %{{y:.4f}}<extra></extra>"),
                    row=1, col=j + 1)
    fig.update_layout(title="Sparsity against reconstruction (thick: seed intervals; grey: "
                            "held-out bootstrap)", height=500,
                      # No fixed width: the figure fills the notebook's output area, and the
                      # legend sits below the panels rather than past their right edge.
                      legend={"orientation": "h", "x": 0, "y": -0.22, "yanchor": "top",
                              "itemsizing": "constant"},  # the grey marker as big as others
                      margin={"b": 110})
    return fig
