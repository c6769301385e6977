"""Groups of texts in latent space: KMeans over sentence-level codes (and raw activations).

A first map of what a dictionary sees: which texts land together. Each text is one vector,
usually its per-token codes pooled over the text
(:func:`sae_nb.texts.codes.pooled_token_codes`); the pooled raw activations are clustered the
same way for comparison. KMeans (Lloyd, 1982; scikit-learn's ``k-means++`` start, ten
restarts) groups them; a silhouette sweep (Rousseeuw, 1987) suggests a number of clusters;
the adjusted Rand index (Hubert & Arabie, 1985) says how well the clusters agree with labels
when the texts have them. Latent families (groups of latents rather than of texts) live in
:mod:`sae_nb.latents.families`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA, TruncatedSVD
from sklearn.manifold import TSNE
from sklearn.metrics import adjusted_rand_score, silhouette_score

from sae_nb.activations.corpora import read_text_table
from sae_nb.util.errors import SaeNbError
from sae_nb.util.threads import one_thread

Scale = Literal["none", "standardize", "l2", "idf", "lsa_idf"]
Projection = Literal["pca", "tsne"]
SCALES = ("none", "standardize", "l2", "idf", "lsa_idf")
LSA_COMPONENTS = 20
PROJECTIONS = ("pca", "tsne")


class ClusteringError(SaeNbError, ValueError):
    """Inputs that cannot be clustered; the message names the bad value and the fix."""


# ---------------------------------------------------------------- inputs


def load_texts(path: str | Path, text_column: str = "sentence",
               label_column: str | None = None, encoding: str = "utf-8") -> pd.DataFrame:
    """Columns ``text`` and ``label`` (None everywhere when ``label_column`` is empty) of a
    CSV, read by :func:`sae_nb.activations.corpora.read_text_table` (which names bad rows by
    file line)."""
    table = read_text_table(path, text_column, label_column or None, encoding)
    out = table[["text"]].copy()
    out["label"] = table["label"] if label_column else None
    return out


def check_rows(X, n_clusters: int | None = None) -> np.ndarray:
    """``X`` as a 2-D float array, refusing empty input and more clusters than rows."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ClusteringError(f"Got an array of shape {X.shape}; clustering needs rows of "
                              f"features (N, D) with N and D at least 1. Check that the texts "
                              f"or the store are not empty.")
    if n_clusters is not None and not 1 <= n_clusters <= len(X):
        raise ClusteringError(f"n_clusters={n_clusters} but there are {len(X)} rows; choose "
                              f"n_clusters between 1 and {len(X)}.")
    return X


def scale_rows(X, scale: Scale = "l2") -> np.ndarray:
    """Put features on a footing where Euclidean distance means something.

    ``l2`` (the default, for codes) scales each row to unit length: cosine geometry, so a text
    with strong codes everywhere is not far from all others. ``standardize`` (per feature: zero
    mean, unit variance) stops the few huge dimensions of a residual stream from deciding
    every distance: the choice for raw activations, a poor one for sparse codes, where a latent
    that fires on one text gets a huge z-score. ``idf`` treats a text's codes as a bag of
    token features: 1 where a latent fired, weighted by its inverse document frequency
    (:func:`inverse_document_frequency`, 0 for a latent firing in every text), unit rows.
    ``lsa_idf`` (latent semantic analysis of those rows) projects the ``idf`` rows on their
    top ``LSA_COMPONENTS`` right singular vectors (fewer for fewer rows), unit rows. On the
    shipped dictionary (``benchmarks/bench_tasks.py``, mean ARI over 5 KMeans seeds) the topic
    ARI of ``data/sentences.csv`` goes from -0.005 (``l2``) to 0.28 (``idf``) and 0.31
    (``lsa_idf``; raw activations standardised 0.34), that of VADER's four source domains
    from 0.02 to 0.16 and 0.27 (raw 0.31): notebook 05 clusters codes with ``lsa_idf``.
    ``none`` leaves ``X`` as it is."""
    X = check_rows(X)
    if scale == "none":
        return X
    if scale == "idf":
        return scale_rows((X > 0) * inverse_document_frequency(X), "l2")
    if scale == "lsa_idf":
        weighted = scale_rows(X, "idf")
        if not weighted.any():  # every column positive in every row: no idf weight is left
            warnings.warn("scale='lsa_idf': every latent fires in every text, so every idf "
                          "weight is 0; using l2 rows instead.", UserWarning, stacklevel=2)
            return scale_rows(X, "l2")
        with one_thread():
            return scale_rows(fit_lsa(weighted).transform(weighted), "l2")
    if scale == "standardize":
        std = X.std(0)
        return (X - X.mean(0)) / np.where(std > 0, std, 1.0)
    if scale == "l2":
        norms = np.linalg.norm(X, axis=1, keepdims=True)
        return X / np.where(norms > 0, norms, 1.0)
    raise ClusteringError(f"Unknown scale {scale!r}; choose one of {SCALES}.")


def inverse_document_frequency(X) -> np.ndarray:
    """``log((1 + N) / (1 + df))`` per column, ``df`` the number of rows where it is positive
    (a latent's firing). Smoothed like scikit-learn's, but without its ``+ 1``: a latent that
    fires in every row gets weight 0, the point for codes, where some latents fire everywhere."""
    X = np.asarray(X)
    return np.log((1.0 + len(X)) / (1.0 + (X > 0).sum(0)))


def fit_lsa(weighted, n_components: int = LSA_COMPONENTS):
    """Latent semantic analysis: a truncated SVD (``sklearn``'s, ARPACK, seeded) fitted on the
    weighted rows, keeping ``n_components`` (fewer when the matrix is smaller)."""
    weighted = np.asarray(weighted)
    n = min(n_components, weighted.shape[0] - 1, weighted.shape[1] - 1)
    if n < 1:
        raise ClusteringError(f"LSA needs at least 2 rows and 2 columns; got {weighted.shape}. "
                              f"Use scale='idf' or 'l2'.")
    with one_thread():
        return TruncatedSVD(n, algorithm="arpack", random_state=0).fit(weighted)


# ---------------------------------------------------------------- KMeans


@dataclass
class Clusters:
    """One KMeans fit: a cluster per row and each row's distance to its own centroid."""

    labels: np.ndarray  # (N,) cluster ids 0..K-1
    distance: np.ndarray  # (N,) Euclidean distance to the row's centroid, in the scaled space
    inertia: float

    @property
    def n_clusters(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0


def kmeans(X, n_clusters: int, seed: int = 0, scale: Scale = "l2") -> Clusters:
    """KMeans with ten ``k-means++`` restarts on the scaled rows of ``X``."""
    X = scale_rows(check_rows(X, n_clusters), scale)
    with one_thread():
        fit = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(X)
    distance = np.linalg.norm(X - fit.cluster_centers_[fit.labels_], axis=1)
    return Clusters(fit.labels_.astype(int), distance, float(fit.inertia_))


def silhouette_sweep(X, k_values=range(2, 13), seed: int = 0,
                     scale: Scale = "l2") -> tuple[pd.DataFrame, int]:
    """Mean silhouette (and inertia) of KMeans for each k; the k with the best silhouette.

    The silhouette is defined for 2 <= k <= N - 1 only; other k are left out."""
    X = scale_rows(check_rows(X), scale)
    ks = [int(k) for k in k_values if 2 <= k <= len(X) - 1]
    if not ks:
        raise ClusteringError(f"No k in {list(k_values)} lies in 2..{len(X) - 1} (N={len(X)} "
                              f"rows); the silhouette needs 2 <= k < N. Widen the range or "
                              f"add rows.")
    rows = []
    for k in ks:
        fit = kmeans(X, k, seed=seed, scale="none")
        found = len(np.unique(fit.labels))  # duplicate rows can leave a centroid empty
        with one_thread():
            score = silhouette_score(X, fit.labels) if 1 < found < len(X) else float("nan")
        rows.append({"k": k, "silhouette": float(score), "inertia": fit.inertia})
    table = pd.DataFrame(rows)
    best = int(table.loc[table["silhouette"].fillna(-1.0).idxmax(), "k"])
    return table, best


# ---------------------------------------------------------------- describing clusters


def cluster_sizes(labels, names=None) -> pd.DataFrame:
    """Rows per cluster, largest first; with ``names`` (e.g. true labels) their commonest one."""
    labels = np.asarray(labels)
    rows = []
    for c in np.unique(labels):
        row = {"cluster": int(c), "size": int((labels == c).sum())}
        if names is not None:
            values, counts = np.unique(np.asarray(names)[labels == c], return_counts=True)
            row.update(top_label=str(values[counts.argmax()]),
                       top_label_share=float(counts.max() / counts.sum()))
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["size", "cluster"], ascending=[False, True],
                                          ignore_index=True)


def nearest_texts(clusters: Clusters, texts: list[str], n: int = 3) -> pd.DataFrame:
    """Per cluster, the ``n`` texts nearest its centroid: the cluster's most typical members."""
    rows = []
    for c in range(clusters.n_clusters):
        members = np.nonzero(clusters.labels == c)[0]
        order = members[np.argsort(clusters.distance[members], kind="stable")][:n]
        rows += [{"cluster": c, "rank": r, "text": texts[i],
                  "distance": float(clusters.distance[i])} for r, i in enumerate(order)]
    return pd.DataFrame(rows)


def distinguishing_latents(codes, labels, top: int = 5) -> pd.DataFrame:
    """Per cluster, the latents whose mean code in the cluster most exceeds their mean over
    the other texts (only positive differences), with both means."""
    codes, labels = check_rows(codes), np.asarray(labels)
    rows = []
    for c in np.unique(labels):
        inside = codes[labels == c].mean(0)  # (F,)
        outside = codes[labels != c].mean(0) if (labels != c).any() else np.zeros_like(inside)
        diff = inside - outside
        for latent in np.argsort(-diff, kind="stable")[:top]:
            if diff[latent] <= 0:
                break
            rows.append({"cluster": int(c), "latent": int(latent), "mean_in": float(inside[latent]),
                         "mean_out": float(outside[latent]), "difference": float(diff[latent])})
    return pd.DataFrame(rows, columns=["cluster", "latent", "mean_in", "mean_out", "difference"])


def agreement(true_labels, assignments: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Adjusted Rand index of each named clustering against the labels (1 is perfect, about 0
    is chance), plus the ARI between each pair of clusterings."""
    rows = [{"clustering": name, "against": "labels", "ari": adjusted_rand_score(true_labels, a)}
            for name, a in assignments.items() if true_labels is not None]
    names = list(assignments)
    rows += [{"clustering": a, "against": b,
              "ari": adjusted_rand_score(assignments[a], assignments[b])}
             for i, a in enumerate(names) for b in names[i + 1 :]]
    return pd.DataFrame(rows, columns=["clustering", "against", "ari"])


# ---------------------------------------------------------------- 2-D map


def project_2d(X, method: Projection = "pca", seed: int = 0, perplexity: float = 30.0,
               scale: Scale = "l2") -> np.ndarray:
    """``(N, 2)`` coordinates for a map: PCA (fast, distances between groups mean something) or
    t-SNE (neighbourhoods only). t-SNE's perplexity is lowered below N / 3 for small N."""
    if method not in PROJECTIONS:
        raise ClusteringError(f"Unknown projection {method!r}; choose one of {PROJECTIONS}.")
    X = scale_rows(check_rows(X), scale)
    if len(X) < 3:
        raise ClusteringError(f"A 2-D map needs at least 3 rows; got {len(X)}.")
    if method == "pca":
        xy = PCA(n_components=min(2, X.shape[1]), random_state=seed).fit_transform(X)
        return np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))  # a 1-D input gets y = 0
    perplexity = float(min(perplexity, max(1.0, (len(X) - 1) / 3)))
    with one_thread():
        return TSNE(n_components=2, perplexity=perplexity, init="pca",
                    random_state=seed).fit_transform(X)


def text_cluster_table(texts: list[str], labels, clusters: Clusters,
                       xy: np.ndarray) -> pd.DataFrame:
    """One row per text: text, label, cluster, distance to centroid, map coordinates."""
    return pd.DataFrame({"text": list(texts), "label": labels if labels is not None else None,
                         "cluster": clusters.labels, "distance": clusters.distance,
                         "x": xy[:, 0], "y": xy[:, 1]})
