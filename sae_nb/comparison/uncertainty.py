"""Error bars: bootstrap intervals over held-out rows, intervals over seeds, and a comparison
table that says which differences are within the noise.

Two sources of noise, kept apart:

- **evaluation noise** (which held-out tokens were scored): :func:`bootstrap_interval`
  resamples rows with replacement (or whole groups of rows, e.g. contexts, whose tokens are
  correlated: ``groups=``) and reports the percentile interval of the metric;
  :func:`paired_difference` resamples the same rows for two dictionaries, the tighter test of
  "is A better than B on these tokens";
- **training noise** (which seed): :func:`seed_interval` is the Student-t interval of the mean
  over seeds; :func:`summarize` gives it per configuration for a table of runs.

:func:`compare` reads a table of estimates with intervals (``m``, ``m_low``, ``m_high`` per
metric) and marks each pairwise difference "within noise" when the two intervals overlap, and
"no verdict" when a row has no interval (fewer than two distinct seeds);
:func:`compare_paired` does the same from per-row quantities of dictionaries scored on the same
rows, "within noise" when the paired interval of the difference contains 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
import torch
from scipy import stats

from sae_nb.dictionaries.architectures import Dictionary
from sae_nb.util.errors import SaeNbError


class UncertaintyError(SaeNbError, ValueError):
    """Too few samples or mismatched inputs; the message names them and the fix."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its interval at ``level`` (e.g. 0.95), from ``n`` samples."""

    estimate: float
    low: float
    high: float
    level: float
    method: str
    n: int

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def __str__(self) -> str:
        return f"{self.estimate:.4g} [{self.low:.4g}, {self.high:.4g}]"


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise UncertaintyError(f"level={level} must lie in (0, 1), e.g. 0.95.")


def resample_indices(n: int, n_resamples: int, rng: np.random.Generator,
                     groups=None) -> Iterable[np.ndarray]:
    """Row indices of ``n_resamples`` bootstrap resamples of ``n`` rows: rows drawn with
    replacement, or whole groups (``groups``: a label per row) drawn with replacement."""
    if groups is None:
        for _ in range(n_resamples):
            yield rng.integers(0, n, n)
        return
    labels = np.asarray(groups)
    if len(labels) != n:
        raise UncertaintyError(f"groups has {len(labels)} labels for {n} rows; give one per row.")
    order = np.argsort(labels, kind="stable")
    _, starts = np.unique(labels[order], return_index=True)
    members = np.split(order, starts[1:])
    if len(members) < 2:
        raise UncertaintyError("groups holds a single group: nothing to resample. Use more "
                               "contexts, or groups=None to resample rows.")
    for _ in range(n_resamples):
        yield np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])


def resample_weights(n: int, n_resamples: int, rng: np.random.Generator,
                     groups=None) -> Iterable[np.ndarray]:
    """The resamples of :func:`resample_indices` as ``(n,)`` counts, how often each row was
    drawn: a metric made of sums over rows takes them as weights instead of copying rows."""
    for idx in resample_indices(n, n_resamples, rng, groups):
        yield np.bincount(idx, minlength=n).astype(np.float64)


def bootstrap_interval(metric: Callable[..., float], *arrays, n_resamples: int = 1000,
                       level: float = 0.95, seed: int = 0, groups=None) -> Interval:
    """The percentile bootstrap interval of ``metric(*arrays)``, resampling the arrays' rows
    (axis 0, jointly) with replacement, or whole ``groups`` of rows.

    Pass per-row quantities for speed: the FVU of a dictionary is
    ``bootstrap_interval(lambda e, v: e.sum() / v.sum(), err_sq, dev_sq)`` with ``err_sq`` the
    rows' squared errors and ``dev_sq`` their squared deviations from the mean.
    """
    _check_level(level)
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    if n < 2 or any(len(a) != n for a in arrays):
        raise UncertaintyError(f"bootstrap needs arrays of one length >= 2; got "
                               f"{[len(a) for a in arrays]} rows.")
    rng = np.random.default_rng(seed)
    values = np.array([metric(*(a[idx] for a in arrays))
                       for idx in resample_indices(n, n_resamples, rng, groups)], dtype=float)
    low, high = np.nanquantile(values, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(metric(*arrays)), float(low), float(high), level,
                    "bootstrap" + (" (groups)" if groups is not None else ""), n)


def paired_difference(metric: Callable[..., float], arrays_a, arrays_b, n_resamples: int = 1000,
                      level: float = 0.95, seed: int = 0, groups=None) -> Interval:
    """The bootstrap interval of ``metric(*arrays_a) - metric(*arrays_b)`` with the same rows
    resampled for both (two dictionaries scored on the same held-out tokens): the noise
    the two share cancels, so this is tighter than comparing two separate intervals."""
    a, b = [np.asarray(x) for x in arrays_a], [np.asarray(x) for x in arrays_b]
    k = len(a)
    if len(b) != k:
        raise UncertaintyError(f"arrays_a has {k} arrays but arrays_b {len(b)}; give the same "
                               f"per-row quantities for both.")
    return bootstrap_interval(lambda *xs: metric(*xs[:k]) - metric(*xs[k:]), *a, *b,
                              n_resamples=n_resamples, level=level, seed=seed, groups=groups)


def seed_interval(values, level: float = 0.95) -> Interval:
    """The Student-t interval of the mean of ``values`` (one per training seed)."""
    _check_level(level)
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        raise UncertaintyError(f"An interval over seeds needs at least 2 finite values; got "
                               f"{len(v)}. Train more seeds.")
    mean, sem = float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v)))
    half = float(stats.t.ppf((1 + level) / 2, len(v) - 1)) * sem
    return Interval(mean, mean - half, mean + half, level, "seeds (t)", len(v))


def seed_values(part: pd.DataFrame, metric: str, seed: str | None = "seed") -> np.ndarray:
    """The finite values of ``metric`` in ``part``, one per distinct training seed: where
    ``part`` has a ``seed`` column, the rows of one seed (the same run repeated) are averaged
    first, so ``seeds=[0, 0]`` counts as one seed, not as two runs that agree."""
    values = part[metric].astype(float)
    if seed is not None and seed in part.columns:
        values = values.groupby(part[seed].to_numpy()).mean()  # NaN rows skipped
    v = values.to_numpy(dtype=float)
    return v[np.isfinite(v)]


def n_seeds(part: pd.DataFrame, seed: str | None = "seed") -> int:
    """How many distinct seeds ``part`` holds (its rows where it has no ``seed`` column)."""
    return int(part[seed].nunique()) if seed is not None and seed in part.columns else len(part)


def summarize(runs: pd.DataFrame, by, metrics: list[str], level: float = 0.95,
              seed: str | None = "seed") -> pd.DataFrame:
    """One row per configuration (``by``: a column or columns of ``runs``, one run a row, e.g.
    one per seed): each metric's mean over the distinct seeds (:func:`seed_values`) and its
    seed interval as ``m``, ``m_low``, ``m_high`` (NaN bounds with fewer than 2 distinct
    seeds: :func:`compare` then gives no verdict), and ``n`` distinct seeds (rows where
    ``runs`` has no ``seed`` column)."""
    missing = [c for c in ([by] if isinstance(by, str) else list(by)) + list(metrics)
               if c not in runs.columns]
    if missing:
        raise UncertaintyError(f"runs has no column(s) {missing}; it has {list(runs.columns)}.")
    rows = []
    for key, part in runs.groupby(by, sort=False):
        row = dict(zip([by] if isinstance(by, str) else by,
                       key if isinstance(key, tuple) else (key,)))
        for m in metrics:
            v = seed_values(part, m, seed)
            if len(v) >= 2:
                iv = seed_interval(v, level)
                row.update({m: iv.estimate, f"{m}_low": iv.low, f"{m}_high": iv.high})
            else:
                row.update({m: float(v.mean()) if len(v) else np.nan, f"{m}_low": np.nan,
                            f"{m}_high": np.nan})
        row["n"] = n_seeds(part, seed)
        rows.append(row)
    return pd.DataFrame(rows).set_index(by)


def interval_columns(table: pd.DataFrame) -> list[str]:
    """The metrics of ``table`` that carry an interval (``m`` with ``m_low`` and ``m_high``)."""
    return [c for c in table.columns
            if f"{c}_low" in table.columns and f"{c}_high" in table.columns]


def compare(table: pd.DataFrame, metrics: list[str] | None = None,
            higher_is_better: dict[str, bool] | None = None,
            ideal: dict[str, float] | None = None) -> pd.DataFrame:
    """Every pair of ``table``'s rows (dictionaries, configurations) on every metric with an
    interval: the difference ``a - b`` and a verdict, "within noise" when the two intervals
    overlap, else which is better (by ``higher_is_better[metric]``, default True; a metric
    missing from it is named "a higher" / "b higher").

    A metric in ``ideal`` (metric -> its ideal value, e.g. shrinkage 1) is compared by its
    distance to that value: both intervals become intervals of ``|m - ideal|`` and the closer
    row is the better. A pair in which a row has no interval (NaN bounds) or, in a table with
    an ``n`` column (:func:`summarize`), fewer than 2 distinct seeds reads "no verdict: " and
    the reason."""
    metrics = metrics or interval_columns(table)
    if not metrics:
        raise UncertaintyError("table has no metric with an interval (columns m, m_low, m_high);"
                               " build it with summarize() or add the interval columns.")
    better, ideal = higher_is_better or {}, ideal or {}
    rows = []
    for m in metrics:
        for a, b in combinations(table.index, 2):
            ra, rb = table.loc[a], table.loc[b]
            diff = float(ra[m] - rb[m])
            missing = [r for r in (_no_interval(a, ra, m), _no_interval(b, rb, m)) if r]
            if missing:
                verdict = "no verdict: " + "; ".join(missing)
            elif m in ideal:
                (la, ha), (lb, hb) = (distance_interval(r[f"{m}_low"], r[f"{m}_high"], ideal[m])
                                      for r in (ra, rb))
                closer = abs(ra[m] - ideal[m]) - abs(rb[m] - ideal[m])
                verdict = _verdict(a, b, closer, la <= hb and lb <= ha, False)
            else:
                overlap = ra[f"{m}_low"] <= rb[f"{m}_high"] and rb[f"{m}_low"] <= ra[f"{m}_high"]
                verdict = _verdict(a, b, diff, bool(overlap), better.get(m))
            rows.append({"metric": m, "a": a, "b": b, "a_value": float(ra[m]),
                         "b_value": float(rb[m]), "difference": diff, "verdict": verdict})
    return pd.DataFrame(rows)


def _no_interval(name, row: pd.Series, metric: str) -> str | None:
    """Why ``row`` can take no part in a verdict on ``metric``; None when it can."""
    if "n" in row.index and np.isfinite(row["n"]) and row["n"] < 2:
        n = int(row["n"])
        return (f"{name} has {n} distinct seed{'' if n == 1 else 's'} (at least 2 are needed "
                f"for an interval; train more seeds)")
    if not (np.isfinite(row[f"{metric}_low"]) and np.isfinite(row[f"{metric}_high"])):
        return (f"{name} has no interval for {metric} (fewer than 2 distinct seeds or finite "
                f"values; at least 2 are needed)")
    return None


def distance_interval(low: float, high: float, target: float) -> tuple[float, float]:
    """The interval of ``|m - target|`` over ``m`` in ``[low, high]`` (from 0 when it holds
    ``target``)."""
    near, far = sorted((abs(low - target), abs(high - target)))
    return (0.0 if low <= target <= high else near), far


def _verdict(a: str, b: str, diff: float, noise: bool, higher_is_better: bool | None) -> str:
    if noise:
        return "within noise"
    if higher_is_better is None:
        return f"{a if diff > 0 else b} higher"
    return f"{a if (diff > 0) == higher_is_better else b} better"


def compare_paired(name: str, metric: Callable[..., float], per_row: dict[str, list],
                   higher_is_better: bool | None = True, n_resamples: int = 1000,
                   level: float = 0.95, seed: int = 0, groups=None) -> pd.DataFrame:
    """Every pair of the dictionaries in ``per_row`` (name -> the per-row arrays ``metric``
    reads, all on the same held-out rows) by :func:`paired_difference`: the difference
    ``a - b``, its interval, and "within noise" when the interval contains 0."""
    rows = []
    for a, b in combinations(per_row, 2):
        d = paired_difference(metric, per_row[a], per_row[b], n_resamples, level, seed, groups)
        rows.append({"metric": name, "a": a, "b": b, "a_value": float(metric(*per_row[a])),
                     "b_value": float(metric(*per_row[b])), "difference": d.estimate,
                     "low": d.low, "high": d.high,
                     "verdict": _verdict(a, b, d.estimate, d.contains(0.0), higher_is_better)})
    return pd.DataFrame(rows)


def per_row_reconstruction(dictionary: Dictionary, acts,
                           batch_size: int = 4096) -> dict[str, np.ndarray]:
    """Per held-out row of ``acts`` ``(N, D)``: ``err`` the squared reconstruction error,
    ``dev`` the squared deviation from the rows' mean and ``l0`` the active latents, the
    pieces :func:`reconstruction_intervals` (and :func:`paired_difference`) resample."""
    x_all = torch.as_tensor(np.asarray(acts, dtype=np.float32))
    device, dtype = dictionary.W_dec.device, dictionary.W_dec.dtype
    mean = x_all.double().mean(0)
    out = {"err": [], "dev": [], "l0": []}
    with torch.no_grad():
        for x in x_all.split(batch_size):
            f, x_hat = dictionary.encode_and_reconstruct(x.to(device, dtype))
            out["err"].append((x.double() - x_hat.double().cpu()).pow(2).sum(1).numpy())
            out["dev"].append((x.double() - mean).pow(2).sum(1).numpy())
            out["l0"].append((f != 0).sum(1).cpu().numpy().astype(np.float64))
    return {k: np.concatenate(v) for k, v in out.items()}


def fvu_of(err: np.ndarray, dev: np.ndarray) -> float:
    """The fraction of variance unexplained from per-row pieces: sum(err) / sum(dev)."""
    return float(err.sum() / dev.sum())


def row_intervals(rows: dict, groups=None, n_resamples: int = 1000, level: float = 0.95,
                  seed: int = 0) -> dict[str, Interval]:
    """``{"fvu": ..., "l0": ...}`` bootstrap intervals from :func:`per_row_reconstruction`'s
    pieces (resampling whole ``groups`` when given)."""
    return {"fvu": bootstrap_interval(fvu_of, rows["err"], rows["dev"], n_resamples=n_resamples,
                                      level=level, seed=seed, groups=groups),
            "l0": bootstrap_interval(np.mean, rows["l0"], n_resamples=n_resamples,
                                     level=level, seed=seed, groups=groups)}


def reconstruction_intervals(dictionary: Dictionary, acts, groups=None,
                             n_resamples: int = 1000, level: float = 0.95,
                             seed: int = 0) -> pd.DataFrame:
    """Bootstrap intervals of a dictionary's FVU and L0 over its held-out rows ``acts`` (or
    whole ``groups`` of them: pass the rows' context ids, as tokens of one context are
    correlated). One row per metric: estimate, low, high."""
    found = row_intervals(per_row_reconstruction(dictionary, acts), groups, n_resamples,
                          level, seed)
    return pd.DataFrame([{"metric": k, "estimate": v.estimate, "low": v.low, "high": v.high,
                          "level": level, "method": v.method} for k, v in found.items()])
