"""Plotly figures of activation stores. Pure functions: they return figures and never display.

Figures read a random sample of rows through the store, a chunk at a time, so a store of any
size costs at most ``max_rows`` rows of work and a few MB of memory.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .store import ActivationStore

CHUNK_ROWS = 8192  # rows read from the memory-mapped shards at a time


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
