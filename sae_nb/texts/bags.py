"""Pooled codes as bags of token features: TF-IDF, binary, idf, LSA, dense-latent treatments.

A text's pooled codes are a bag of token features: which latents fired on its tokens and how
strongly. Text mining has long treated bags this way, and this module tries those treatments
on codes: TF-IDF weighting (the inverse document frequency of each latent's firing, so a latent
that fires in every text weighs nothing), binary firing, LSA (a truncated SVD of the TF-IDF
matrix, Deerwester et al. 1990), dropping dense latents (those firing in more than a share of
rows), and spherical KMeans (unit rows, then KMeans) for clustering. :func:`treatment_table`
scores every treatment by k-sparse probing and by clustering ARI beside the raw activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score

from sae_nb.texts.clustering import (
    ClusteringError,
    fit_lsa,
    inverse_document_frequency,
    kmeans,
    scale_rows,
)
from sae_nb.texts.probing import fit_probe, majority_baseline, top_latents

TREATMENTS = ("none", "l2", "tfidf", "binary", "idf", "lsa", "lsa_idf", "drop_dense")
BAG_K_VALUES = (1, 5, 50)


def firing_density(codes) -> np.ndarray:
    """Per latent, the share of rows ``(N, F)`` where it fires (code > 0): ``(F,)``."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] == 0:
        raise ClusteringError(f"Got codes of shape {codes.shape}; pass a (rows, latents) array "
                              f"with at least one row.")
    return (codes > 0).mean(0)


def dense_latents(density, threshold: float) -> np.ndarray:
    """The latents whose firing density is strictly above ``threshold``, in index order."""
    if not 0 <= threshold <= 1:
        raise ClusteringError(f"threshold={threshold} is not a share of rows; pass a value in "
                              f"[0, 1] (e.g. 0.5: latents firing in more than half the rows).")
    return np.nonzero(np.asarray(density) > threshold)[0]


def l2_rows(X) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero)."""
    return scale_rows(X, "l2")


@dataclass
class BagTransform:
    """One treatment, fitted on some rows (a train split) and applied to any rows.

    ``none`` the codes as they are (what :mod:`sae_nb.texts.probing` probes); ``l2`` unit rows;
    ``tfidf`` codes times the idf (:func:`sae_nb.texts.clustering.inverse_document_frequency`) of
    the fitted rows, then unit rows; ``binary`` 1 where a latent fired, then unit rows; ``idf``
    binary firing times the idf, unit rows (``sae_nb.texts.clustering.scale_rows(X, "idf")``
    when fitted on the same rows); ``lsa`` the TF-IDF rows projected on the top
    ``n_components`` right singular vectors of the fitted TF-IDF matrix, then unit rows;
    ``lsa_idf`` the same of the ``idf`` rows; ``drop_dense`` the codes without the latents
    whose density (``density`` when given, e.g. over a store's tokens, else over the fitted
    rows) is above ``threshold``, then unit rows."""

    treatment: str = "l2"
    threshold: float = 0.5
    n_components: int = 20
    density: np.ndarray | None = None
    seed: int = 0
    idf: np.ndarray | None = field(default=None, init=False)
    keep: np.ndarray | None = field(default=None, init=False)
    svd: object = field(default=None, init=False)

    def fit(self, codes) -> BagTransform:
        if self.treatment not in TREATMENTS:
            raise ClusteringError(f"Unknown treatment {self.treatment!r}; choose one of "
                                  f"{TREATMENTS}.")
        codes = np.asarray(codes, dtype=np.float64)
        if self.treatment in ("tfidf", "idf", "lsa", "lsa_idf"):
            self.idf = inverse_document_frequency(codes)
        if self.treatment in ("lsa", "lsa_idf"):
            weighted = self._weighted(codes)
            if not weighted.any():
                raise ClusteringError("Every latent fires in every row, so every idf weight is "
                                      "0 and LSA has nothing to fit; use 'binary' or 'l2'.")
            self.svd = fit_lsa(weighted, self.n_components)
        if self.treatment == "drop_dense":
            density = firing_density(codes) if self.density is None else self.density
            if len(density) != codes.shape[1]:
                raise ClusteringError(f"density has {len(density)} entries for "
                                      f"{codes.shape[1]} latents; pass one per latent.")
            dense = dense_latents(density, self.threshold)
            self.keep = np.setdiff1d(np.arange(codes.shape[1]), dense)
        return self

    def _weighted(self, codes) -> np.ndarray:
        tf = (codes > 0).astype(np.float64) if self.treatment in ("idf", "lsa_idf") else codes
        return l2_rows(tf * self.idf)

    def transform(self, codes) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.float64)
        if self.treatment == "none":
            return codes
        if self.treatment == "l2":
            return l2_rows(codes)
        if self.treatment == "binary":
            return l2_rows((codes > 0).astype(np.float64))
        if self.treatment in ("tfidf", "idf"):
            return self._weighted(codes)
        if self.treatment in ("lsa", "lsa_idf"):
            return l2_rows(self.svd.transform(self._weighted(codes)))
        return l2_rows(codes[:, self.keep])

    def fit_transform(self, codes) -> np.ndarray:
        return self.fit(codes).transform(codes)


def treat(codes, treatment: str = "l2", **options) -> np.ndarray:
    """``codes`` under one treatment, fitted on all rows (for clustering): see BagTransform."""
    return BagTransform(treatment, **options).fit_transform(codes)


def spherical_kmeans(X, n_clusters: int, seed: int = 0) -> np.ndarray:
    """Cluster ids of KMeans on unit rows (cosine geometry; ten k-means++ restarts)."""
    return kmeans(l2_rows(X), n_clusters, seed, scale="none").labels


def _probe_row(X, y, train, test, k_values, seed) -> dict[str, float]:
    row = {}
    order = top_latents(X[train], y[train], max(k_values, default=0))
    for k in k_values:
        if k < X.shape[1]:
            row[f"top {k}"] = fit_probe(X[train], y[train], X[test], y[test],
                                        columns=order[:k], seed=seed).accuracy
        else:
            row[f"top {k}"] = np.nan
    row["all"] = fit_probe(X[train], y[train], X[test], y[test], seed=seed).accuracy
    return row


def treatment_table(raw, codes, labels, train, test, treatments=TREATMENTS,
                    k_values=BAG_K_VALUES, n_clusters: int | None = None, seed: int = 0,
                    threshold: float = 0.5, n_components: int = 20,
                    density=None, n_seeds: int = 1) -> pd.DataFrame:
    """Held-out probing accuracy (top-k columns chosen by class-mean difference on the train
    split, and all columns) and clustering ARI against the labels, for the pooled raw
    activations and for the codes under each treatment.

    Probing fits each treatment on the train split only (idf, SVD, densities); clustering
    fits it on all rows and runs spherical KMeans with ``n_clusters`` (default: the number of
    classes). The raw activations are probed as they are and clustered standardised (as
    notebook 05 does) and as unit rows; their "top k" are raw dimensions. ARI is the mean over
    ``n_seeds`` KMeans seeds (``ari_sd`` their standard deviation): on a few dozen texts one
    seed's ARI moves by 0.1. One row each, with the majority-class baseline."""
    raw, codes, y = np.asarray(raw, np.float64), np.asarray(codes, np.float64), np.asarray(labels)
    n_clusters = n_clusters or len(np.unique(y))
    options = dict(threshold=threshold, n_components=n_components, density=density, seed=seed)
    rows = []
    raw_row = {"representation": "raw", "treatment": "as is",
               **_probe_row(raw, y, train, test, k_values, seed)}
    seeds = range(seed, seed + max(1, n_seeds))

    def ari(cluster) -> dict[str, float]:
        values = [adjusted_rand_score(y, cluster(s)) for s in seeds]
        return {"ari": float(np.mean(values)), "ari_sd": float(np.std(values))}

    raw_row.update(ari(lambda s: kmeans(raw, n_clusters, s, "standardize").labels))
    raw_row["ari_l2"] = ari(lambda s: spherical_kmeans(raw, n_clusters, s))["ari"]
    rows.append(raw_row)
    for t in treatments:
        fitted = BagTransform(t, **options).fit(codes[train])
        X = fitted.transform(codes)
        row = {"representation": "codes", "treatment": t,
               **_probe_row(X, y, train, test, k_values, seed)}
        treated = treat(codes, t, **options)
        row.update(ari(lambda s, X=treated: spherical_kmeans(X, n_clusters, s)))
        row["columns"] = X.shape[1]
        rows.append(row)
    rows[0]["columns"] = raw.shape[1]
    table = pd.DataFrame(rows)
    table["majority_baseline"] = majority_baseline(y[train], y[test])
    return table
