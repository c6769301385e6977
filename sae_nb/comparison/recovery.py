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
  follow it); unmatched features count 0. Activations are taken in the lab's own units
  (:func:`input_unit_codes`: a normalised TopK's codes times each row's sigma), as the true
  codes are.
- **precision / recall / F1** of the latent matched to a feature by decoder direction (the
  Hungarian cosine's matching), as a detector of it: precision P(feature on | latent fires),
  recall P(latent fires | feature on). In :func:`score_recovery` a latent fires on a row when
  its contribution to the reconstruction, activation (in the lab's units) x decoder norm,
  exceeds ``threshold``
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

from sae_nb.comparison.synthetic import Lab
from sae_nb.comparison.uncertainty import resample_weights
from sae_nb.dictionaries.architectures import Dictionary


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
def input_unit_codes(dictionary: Dictionary,
                     x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(f, codes, base)`` of ``x`` ``(B, D)``: the codes ``f`` ``(B, F)``, the codes in
    ``x``'s units ``f * dictionary.output_scale(x)`` and what the reconstruction holds with
    every latent silent ``(B, D)`` (the decoder bias; for a normalised dictionary
    ``b_dec * sigma + mu``, with a skip connection plus the skip term), so that
    ``reconstruct(x) == base + codes @ W_dec``."""
    f, x_hat = dictionary.encode_and_reconstruct(x)
    codes = f * dictionary.output_scale(x)
    return f, codes, x_hat - codes @ dictionary.W_dec


@torch.no_grad()
def latent_codes(dictionary: Dictionary, acts,
                 batch_size: int = 4096) -> tuple[sp.csr_matrix, np.ndarray]:
    """``(latents (N, F) sparse, x_hat (N, D))``: the dictionary's codes and reconstructions of
    ``acts`` in batches (the codes kept sparse: a wide dictionary over many rows would not fit
    dense)."""
    x_all = torch.as_tensor(np.asarray(acts, dtype=np.float32))
    device, dtype = dictionary.W_dec.device, dictionary.W_dec.dtype
    codes, recon = [], []
    for x in x_all.split(batch_size):
        f, x_hat = dictionary.encode_and_reconstruct(x.to(device, dtype))
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


def absorption_rows(latents, codes, parent: np.ndarray, latent_of: np.ndarray,
                    threshold: float = 0.0) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The (parent, child) pairs of the hierarchy ``parent`` and four ``(N, pairs)`` boolean
    row masks: ``both`` (parent and child fire), ``both_silent`` (and the parent's latent is
    silent), ``alone`` (the parent fires, none of its children) and ``alone_silent``."""
    a, t = _as_sparse(latents), _as_sparse(codes)
    pairs, masks = [], {k: [] for k in ("both", "both_silent", "alone", "alone_silent")}
    for par in np.unique(parent[parent >= 0]):
        kids = np.nonzero(parent == par)[0]
        on_par = (t[:, par] > 0).toarray().ravel()
        alone = on_par & ~(np.asarray((t[:, kids] > 0).sum(1)).ravel() > 0)
        lat = latent_of[par]
        silent = ~((a[:, lat] > threshold).toarray().ravel()) if lat >= 0 else np.ones_like(on_par)
        for kid in kids:
            both = on_par & (t[:, kid] > 0).toarray().ravel()
            pairs.append({"parent": int(par), "child": int(kid), "parent_latent": int(lat)})
            for key, mask in (("both", both), ("both_silent", both & silent), ("alone", alone),
                              ("alone_silent", alone & silent)):
                masks[key].append(mask)
    n = t.shape[0]
    return (pd.DataFrame(pairs, columns=["parent", "child", "parent_latent"]),
            {k: np.stack(v, 1) if v else np.zeros((n, 0), bool) for k, v in masks.items()})


def _rates(masks: dict[str, np.ndarray], w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, with row weights ``w``: (absorbed, missed_alone) rates, NaN with no rows."""
    sums = {k: w @ m for k, m in masks.items()}
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums["both_silent"] / sums["both"], sums["alone_silent"] / sums["alone"]


def absorption(latents, codes, parent: np.ndarray, latent_of: np.ndarray,
               threshold: float = 0.0) -> pd.DataFrame:
    """One row per (parent, child) pair of the hierarchy ``parent`` (``parent[child]``, -1 for
    none): ``absorbed`` = P(parent's latent silent | parent and child fire), beside
    ``missed_alone`` = P(parent's latent silent | parent fires, none of its children does)."""
    pairs, masks = absorption_rows(latents, codes, parent, latent_of, threshold)
    absorbed, missed = _rates(masks, np.ones(masks["both"].shape[0]))
    return pairs.assign(rows=masks["both"].sum(0).astype(int), absorbed=absorbed,
                        missed_alone=missed)


@dataclass
class Recovery:
    summary: dict  # the headline scores (see the module docstring)
    features: pd.DataFrame  # one row per true feature: its matched latents and scores
    absorption: pd.DataFrame  # one row per planted (parent, child) pair


def _evaluate(dictionary: Dictionary, lab: Lab, rows, threshold: float | None,
              batch_size: int) -> dict:
    """Codes, reconstructions and both matchings of ``dictionary`` on ``rows`` of ``lab``."""
    pick = np.arange(len(lab.acts))[rows] if rows is not None else np.arange(len(lab.acts))
    acts, codes = lab.acts[pick], lab.codes[pick]
    latents, recon = latent_codes(dictionary, acts, batch_size)
    # The codes in the activations' units (a normalised TopK's times each row's sigma), which
    # the true codes are in: what correlates with them and what fires above the threshold.
    scale = dictionary.output_scale(torch.as_tensor(acts, dtype=torch.float64))  # (N, 1)
    scaled = (sp.diags(scale.numpy().ravel()) @ latents).tocsr()  # (N, m)
    cos = cosine_matrix(dictionary.W_dec, lab.directions)  # (m, n)
    corr = correlation_matrix(scaled, codes)  # (m, n)
    n = lab.directions.shape[0]
    latent_of, by_corr = np.full(n, -1), np.full(n, -1)  # by decoder, by correlation
    r, c = hungarian(cos)
    latent_of[c] = r
    r, c = hungarian(corr)
    by_corr[c] = r
    if threshold is None:
        threshold = 0.01 * lab.config.magnitude_mean
    norms = dictionary.W_dec.detach().cpu().double().norm(dim=1).numpy()  # (m,)
    contrib = (scaled @ sp.diags(norms)).tocsr()  # (N, m) each latent's reconstruction norm
    return {"acts": acts, "codes": codes, "latents": latents, "scaled": scaled, "recon": recon,
            "cos": cos,
            "corr": corr, "latent_of": latent_of, "by_corr": by_corr, "contrib": contrib,
            "threshold": threshold}


def score_recovery(dictionary: Dictionary, lab: Lab, rows=None, threshold: float | None = None,
                   batch_size: int = 4096) -> Recovery:
    """Every recovery score of ``dictionary`` against ``lab`` on ``rows`` of it (a slice or
    index array, e.g. the held-out rows; all by default). A latent fires where activation x
    decoder norm exceeds ``threshold`` (None: 1% of ``lab.config.magnitude_mean``)."""
    e = _evaluate(dictionary, lab, rows, threshold, batch_size)
    acts, codes, latents, recon, cos = e["acts"], e["codes"], e["latents"], e["recon"], e["cos"]
    latent_of, by_corr, n = e["latent_of"], e["by_corr"], lab.directions.shape[0]
    det = detection(e["contrib"], codes, latent_of, e["threshold"])
    feats = pd.DataFrame({"feature": np.arange(n), "probability": lab.probabilities,
                          "parent": lab.parent, "latent": latent_of,
                          "cosine": np.where(latent_of >= 0, cos[latent_of, np.arange(n)], 0.0),
                          "max_cosine": cos.max(0), "latent_by_corr": by_corr,
                          "correlation": np.where(by_corr >= 0,
                                                  e["corr"][by_corr, np.arange(n)], 0.0)})
    feats = pd.concat([feats, det], axis=1)
    absorbed = absorption(e["contrib"], codes, lab.parent, latent_of, e["threshold"])
    x = acts.astype(np.float64)
    err = ((x - recon) ** 2).sum()
    summary = {"mcc": float(feats["correlation"].sum() / n),
               "mean_max_cos": float(cos.max(0).mean()),
               "hungarian_cos": float(feats["cosine"].sum() / n),
               "precision": float(det["precision"].mean()), "recall": float(det["recall"].mean()),
               "f1": float(det["f1"].mean()), "shrinkage": shrinkage(acts, recon, lab.bias),
               "absorption": float(absorbed["absorbed"].mean()) if len(absorbed) else np.nan,
               "missed_alone": float(absorbed["missed_alone"].mean()) if len(absorbed) else np.nan,
               "fvu": float(err / ((x - x.mean(0)) ** 2).sum()),
               "l0": float(latents.getnnz(axis=1).mean()),
               "dead_frac": float((latents.getnnz(axis=0) == 0).mean()),
               "chance_max_cos": expected_max_cosine(lab.config.d, dictionary.d_sae)}
    return Recovery(summary, feats, absorbed)


def _matched(matrix, columns: np.ndarray) -> sp.csc_matrix:
    """``matrix[:, columns]`` as sparse, with a zero column where ``columns`` is -1."""
    m = _as_sparse(matrix)[:, np.maximum(columns, 0)]
    return (m @ sp.diags((columns >= 0).astype(np.float64))).tocsc()


def recovery_intervals(dictionary: Dictionary, lab: Lab, rows=None, n_resamples: int = 200,
                       level: float = 0.95, seed: int = 0, groups=None,
                       threshold: float | None = None, batch_size: int = 4096) -> pd.DataFrame:
    """Bootstrap intervals of MCC, precision, recall, F1, shrinkage, absorption and FVU over
    resamples of ``rows`` (or of whole ``groups`` of them, e.g. the store's contexts), the two
    matchings found once on all the rows and held fixed (the interval is the evaluation noise
    of these scores, not of the matching; FVU's variance is taken about the mean of all the
    rows). One row per metric: estimate, low, high."""
    e = _evaluate(dictionary, lab, rows, threshold, batch_size)
    n_rows, n = e["acts"].shape[0], lab.directions.shape[0]
    a = _matched(e["scaled"], e["by_corr"]).astype(np.float64)
    t = _as_sparse(e["codes"]).astype(np.float64)
    parts = {"a": a, "t": t, "aa": a.multiply(a).tocsc(), "tt": t.multiply(t).tocsc(),
             "at": a.multiply(t).tocsc()}
    fire = (_matched(e["contrib"], e["latent_of"]) > e["threshold"]).astype(np.float64)
    on = (t > 0).astype(np.float64)
    parts.update(fire=fire, on=on, hit=fire.multiply(on).tocsc())
    x, c = e["acts"].astype(np.float64), lab.bias.astype(np.float64)
    nx, nr = np.linalg.norm(x - c, axis=1), np.linalg.norm(e["recon"] - c, axis=1)
    ratio = np.divide(nr, nx, out=np.zeros_like(nr), where=nx > 1e-12)
    err, dev = ((x - e["recon"]) ** 2).sum(1), ((x - x.mean(0)) ** 2).sum(1)
    _, masks = absorption_rows(e["contrib"], e["codes"], lab.parent, e["latent_of"], e["threshold"])
    masks = {k: m.astype(np.float64) for k, m in masks.items()}

    def scores(w: np.ndarray) -> dict[str, float]:
        s = {k: v.T @ w for k, v in parts.items()}
        W = w.sum()
        cov = s["at"] / W - s["a"] * s["t"] / W ** 2
        var = (s["aa"] / W - (s["a"] / W) ** 2) * (s["tt"] / W - (s["t"] / W) ** 2)
        corr = np.divide(cov, np.sqrt(np.maximum(var, 0)), out=np.zeros(n), where=var > 1e-24)
        prec = np.divide(s["hit"], s["fire"], out=np.zeros(n), where=s["fire"] > 0)
        rec = np.divide(s["hit"], s["on"], out=np.zeros(n), where=s["on"] > 0)
        f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros(n), where=prec + rec > 0)
        absorbed, missed = _rates(masks, w)
        nan_mean = lambda v: float(np.nanmean(v)) if np.isfinite(v).any() else np.nan  # noqa: E731
        return {"mcc": float(corr.sum() / n), "precision": float(prec.mean()),
                "recall": float(rec.mean()), "f1": float(f1.mean()),
                "shrinkage": float(w[nx > 1e-12] @ ratio[nx > 1e-12] / w[nx > 1e-12].sum()),
                "absorption": nan_mean(absorbed), "missed_alone": nan_mean(missed),
                "fvu": float(w @ err / (w @ dev))}

    rng = np.random.default_rng(seed)
    draws = pd.DataFrame([scores(w) for w in resample_weights(n_rows, n_resamples, rng, groups)])
    estimate = scores(np.ones(n_rows))
    lo, hi = draws.quantile((1 - level) / 2), draws.quantile((1 + level) / 2)
    return pd.DataFrame({"metric": list(estimate), "estimate": list(estimate.values()),
                         "low": lo[list(estimate)].to_numpy(),
                         "high": hi[list(estimate)].to_numpy(),
                         "level": level, "resamples": n_resamples})
