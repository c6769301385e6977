"""Recovery scores: how well a trained dictionary found the true features of a synthetic lab.

Definitions (all signed: the lab's codes are non-negative, so a latent anti-aligned with a
feature is no detector of it):

- **mean max cosine**: for each true direction, the largest cosine with any decoder row,
  averaged over true features (Sharkey et al.'s MMCS, taken over the ground truth).
- **Hungarian cosine**: the mean cosine of a one-to-one matching of decoder rows to true
  directions that maximises the total (``scipy.optimize.linear_sum_assignment``); a true
  feature left unmatched (fewer latents than features) counts 0.
- **MCC**: the mean Pearson correlation, over true features, between each true feature's code
  and the activation of the latent matched to it one-to-one so as to maximise the total
  correlation, as in the identifiability literature (Khemakhem et al. 2020, and SAE papers that
  follow it); unmatched features count 0.
- **precision / recall / F1** of the latent matched to a feature by decoder direction (the
  Hungarian cosine's matching), as a detector of it: precision P(feature on | latent fires),
  recall P(latent fires | feature on). In :func:`score_recovery` a latent fires on a row when
  its contribution to the reconstruction, activation x decoder norm, exceeds ``threshold``
  (default 1% of the lab's mean magnitude): a TopK must pick k latents per row, and those
  beyond the row's true features come out tiny (1e-7 from float rounding even for the true
  dictionary), which a threshold of 0 would count as false alarms.
- **shrinkage**: the mean over rows of ``|x_hat - b| / |x - b|`` (``b`` the lab's offset):
  1 is none, below 1 is the L1-style shrinkage.
- **absorption**: for each planted (parent, child) pair, the fraction of rows where both fire
  but the parent's latent (by decoder matching) is silent; beside it the parent latent's miss
  rate where the parent fires without any child, so absorption shows as the difference.

:func:`expected_max_cosine` gives the chance level of the first two for random directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scipy import integrate
from scipy.optimize import linear_sum_assignment
from scipy.stats import beta

from .dictionary import Dictionary
from .synthetic import Lab


def unit_rows(matrix) -> np.ndarray:
    """``(n, d)`` float64 rows scaled to unit norm (zero rows stay zero)."""
    m = np.asarray(matrix.detach().cpu() if isinstance(matrix, torch.Tensor) else matrix,
                   dtype=np.float64)
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return m / np.where(norms > 0, norms, 1.0)


def cosine_matrix(learned, true) -> np.ndarray:
    """``(m, n)`` cosines between ``m`` learned rows and ``n`` true rows (both ``(., d)``)."""
    return unit_rows(learned) @ unit_rows(true).T


def mean_max_cosine(learned, true) -> float:
    """For each true direction the largest cosine with a learned row; their mean."""
    return float(cosine_matrix(learned, true).max(axis=0).mean())


def hungarian(similarity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)``: the one-to-one matching of rows to columns maximising the total
    similarity (``min(m, n)`` pairs)."""
    return linear_sum_assignment(np.asarray(similarity, dtype=np.float64), maximize=True)


def matched_mean(similarity: np.ndarray) -> float:
    """The Hungarian-matched total divided by the number of columns (true features): a column
    left unmatched counts 0, so a too-small dictionary cannot score 1."""
    rows, cols = hungarian(similarity)
    return float(similarity[rows, cols].sum() / similarity.shape[1])


def hungarian_cosine(learned, true) -> float:
    """The mean cosine of the best one-to-one matching of learned rows to true directions."""
    return matched_mean(cosine_matrix(learned, true))


def _as_sparse(a) -> sp.csc_matrix:
    return a.tocsc() if sp.issparse(a) else sp.csc_matrix(np.asarray(a))


def correlation_matrix(latents, codes) -> np.ndarray:
    """``(m, n)`` Pearson correlations between the columns of ``latents`` ``(N, m)`` and of
    ``codes`` ``(N, n)`` (dense or scipy sparse); 0 where a column is constant."""
    a, t = _as_sparse(latents).astype(np.float64), _as_sparse(codes).astype(np.float64)
    n = a.shape[0]
    if t.shape[0] != n:
        raise ValueError(f"latents have {n} rows but codes {t.shape[0]}; score the same rows.")
    cross = np.asarray((a.T @ t).todense()) / n  # (m, n) E[a t]
    mean_a, mean_t = np.asarray(a.mean(0)).ravel(), np.asarray(t.mean(0)).ravel()
    sd_a = np.sqrt(np.maximum(np.asarray(a.multiply(a).mean(0)).ravel() - mean_a ** 2, 0))
    sd_t = np.sqrt(np.maximum(np.asarray(t.multiply(t).mean(0)).ravel() - mean_t ** 2, 0))
    cov = cross - np.outer(mean_a, mean_t)
    denom = np.outer(sd_a, sd_t)
    return np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 1e-12)


def mcc(latents, codes) -> float:
    """Mean correlation between true codes and their one-to-one matched latents."""
    return matched_mean(correlation_matrix(latents, codes))


def expected_max_cosine(d: int, n: int) -> float:
    """E[max of the cosines between a fixed unit vector and ``n`` independent uniform random
    unit vectors in ``d`` dimensions]. A cosine ``t`` has ``(t + 1) / 2 ~ Beta((d-1)/2,
    (d-1)/2)``, so ``E[max] = 1 - integral_{-1}^{1} F(t)^n dt``. Also the chance level of a
    correlation between independent Gaussian columns of ``N`` rows, with ``d = N - 1``."""
    a = (d - 1) / 2
    cdf = lambda t: beta.cdf((t + 1) / 2, a, a) ** n  # noqa: E731
    points = np.linspace(-1, 1, 41)
    total = sum(integrate.quad(cdf, lo, hi, limit=200)[0] for lo, hi in zip(points, points[1:]))
    return float(1 - total)


@torch.no_grad()
def latent_codes(dictionary: Dictionary, acts, batch_size: int = 4096) -> tuple[sp.csr_matrix, np.ndarray]:
    """``(latents (N, F) sparse, x_hat (N, D))``: the dictionary's codes and reconstructions of
    ``acts`` in batches (the codes kept sparse: a wide dictionary over many rows would not fit
    dense)."""
    x_all = torch.as_tensor(np.asarray(acts, dtype=np.float32))
    device = next(dictionary.parameters()).device
    codes, recon = [], []
    for x in x_all.split(batch_size):
        f, x_hat = dictionary.encode_and_reconstruct(x.to(device))
        codes.append(sp.csr_matrix(f.float().cpu().numpy()))
        recon.append(x_hat.float().cpu().numpy())
    return sp.vstack(codes, format="csr"), np.concatenate(recon)


def detection(latents, codes, latent_of: np.ndarray, threshold: float = 0.0) -> pd.DataFrame:
    """Per true feature ``i``: precision, recall and F1 of latent ``latent_of[i]`` (-1: none)
    as a detector of feature ``i`` (fires when its activation exceeds ``threshold``)."""
    a, t = _as_sparse(latents), _as_sparse(codes)
    on = (t > 0).astype(np.float64)  # (N, n)
    have = latent_of >= 0
    fires = (a[:, np.where(have, latent_of, 0)] > threshold).astype(np.float64)  # (N, n)
    both = np.asarray(fires.multiply(on).sum(0)).ravel()
    n_fire, n_on = np.asarray(fires.sum(0)).ravel(), np.asarray(on.sum(0)).ravel()
    precision = np.divide(both, n_fire, out=np.zeros_like(both), where=n_fire > 0)
    recall = np.divide(both, n_on, out=np.zeros_like(both), where=n_on > 0)
    pr = precision + recall
    f1 = np.divide(2 * precision * recall, pr, out=np.zeros_like(pr), where=pr > 0)
    return pd.DataFrame({"precision": precision * have, "recall": recall * have,
                         "f1": f1 * have, "support": n_on.astype(int)})


def shrinkage(acts, recon, center=None) -> float:
    """Mean over rows of ``|recon - center| / |acts - center|`` (rows with a zero input left
    out); ``center`` defaults to 0."""
    x, x_hat = np.asarray(acts, np.float64), np.asarray(recon, np.float64)
    c = 0.0 if center is None else np.asarray(center, np.float64)
    nx, nr = np.linalg.norm(x - c, axis=1), np.linalg.norm(x_hat - c, axis=1)
    keep = nx > 1e-12
    return float((nr[keep] / nx[keep]).mean())


def absorption(latents, codes, parent: np.ndarray, latent_of: np.ndarray,
               threshold: float = 0.0) -> pd.DataFrame:
    """One row per (parent, child) pair of the hierarchy ``parent`` (``parent[child]``, -1 for
    none): ``absorbed`` = P(parent's latent silent | parent and child fire), beside
    ``missed_alone`` = P(parent's latent silent | parent fires, none of its children does)."""
    a, t = _as_sparse(latents), _as_sparse(codes)
    rows = []
    for par in np.unique(parent[parent >= 0]):
        kids = np.nonzero(parent == par)[0]
        on_par = (t[:, par] > 0).toarray().ravel()
        any_kid = np.asarray((t[:, kids] > 0).sum(1)).ravel() > 0
        lat = latent_of[par]
        silent = ~((a[:, lat] > threshold).toarray().ravel()) if lat >= 0 else np.ones_like(on_par)
        alone = on_par & ~any_kid
        missed = float(silent[alone].mean()) if alone.any() else np.nan
        for kid in kids:
            both = on_par & (t[:, kid] > 0).toarray().ravel()
            rows.append({"parent": int(par), "child": int(kid), "parent_latent": int(lat),
                         "rows": int(both.sum()),
                         "absorbed": float(silent[both].mean()) if both.any() else np.nan,
                         "missed_alone": missed})
    return pd.DataFrame(rows, columns=["parent", "child", "parent_latent", "rows", "absorbed",
                                       "missed_alone"])


@dataclass
class Recovery:
    summary: dict  # the headline scores (see the module docstring)
    features: pd.DataFrame  # one row per true feature: its matched latents and scores
    absorption: pd.DataFrame  # one row per planted (parent, child) pair


def score_recovery(dictionary: Dictionary, lab: Lab, rows=None, threshold: float | None = None,
                   batch_size: int = 4096) -> Recovery:
    """Every recovery score of ``dictionary`` against ``lab`` on ``rows`` of it (a slice or
    index array, e.g. the held-out rows; all by default). A latent fires where activation x
    decoder norm exceeds ``threshold`` (None: 1% of ``lab.config.magnitude_mean``)."""
    pick = np.arange(len(lab.acts))[rows] if rows is not None else np.arange(len(lab.acts))
    acts, codes = lab.acts[pick], lab.codes[pick]
    latents, recon = latent_codes(dictionary, acts, batch_size)
    cos = cosine_matrix(dictionary.W_dec, lab.directions)  # (m, n)
    corr = correlation_matrix(latents, codes)  # (m, n)
    n = lab.directions.shape[0]
    latent_of = np.full(n, -1)
    r, c = hungarian(cos)
    latent_of[c] = r
    by_corr = np.full(n, -1)
    r2, c2 = hungarian(corr)
    by_corr[c2] = r2
    if threshold is None:
        threshold = 0.01 * lab.config.magnitude_mean
    norms = dictionary.W_dec.detach().cpu().double().norm(dim=1).numpy()  # (m,)
    contrib = (latents @ sp.diags(norms)).tocsr()  # (N, m) each latent's reconstruction norm
    det = detection(contrib, codes, latent_of, threshold)
    feats = pd.DataFrame({"feature": np.arange(n), "probability": lab.probabilities,
                          "parent": lab.parent, "latent": latent_of,
                          "cosine": np.where(latent_of >= 0, cos[latent_of, np.arange(n)], 0.0),
                          "max_cosine": cos.max(0), "latent_by_corr": by_corr,
                          "correlation": np.where(by_corr >= 0, corr[by_corr, np.arange(n)], 0.0)})
    feats = pd.concat([feats, det], axis=1)
    absorbed = absorption(contrib, codes, lab.parent, latent_of, threshold)
    err = ((acts - recon) ** 2).sum()
    summary = {"mcc": float(feats["correlation"].sum() / n), "mean_max_cos": float(cos.max(0).mean()),
               "hungarian_cos": float(feats["cosine"].sum() / n),
               "precision": float(det["precision"].mean()), "recall": float(det["recall"].mean()),
               "f1": float(det["f1"].mean()), "shrinkage": shrinkage(acts, recon, lab.bias),
               "absorption": float(absorbed["absorbed"].mean()) if len(absorbed) else np.nan,
               "missed_alone": float(absorbed["missed_alone"].mean()) if len(absorbed) else np.nan,
               "fvu": float(err / ((acts - acts.mean(0)) ** 2).sum()),
               "l0": float(latents.getnnz(axis=1).mean()),
               "dead_frac": float((latents.getnnz(axis=0) == 0).mean()),
               "chance_max_cos": expected_max_cosine(lab.config.d, dictionary.d_sae)}
    return Recovery(summary, feats, absorbed)
