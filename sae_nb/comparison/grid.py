"""Which dictionary is better? A small grid of architectures x k x seeds, trained and scored
with its noise (notebook 09).

:func:`train_grid` trains every (architecture, k, seed) on a synthetic lab
(:class:`sae_nb.comparison.synthetic.Lab`) or on a real store's
:class:`sae_nb.activations.split.HeldoutSplit`, and returns a :class:`Grid`: the dictionaries
and a tidy table, one row per run, of

- on both: ``fvu`` and ``l0`` on the held-out rows, with each run's held-out bootstrap interval
  (``fvu_boot_low`` ...; resamples of whole contexts on a store);
- on a store, given the model: ``ce_loss_recovered`` on the held-out CE contexts, its bootstrap
  over those contexts (the clean and zero-ablated losses are computed once for the grid);
- on a lab: the recovery scores of :func:`sae_nb.comparison.recovery.score_recovery` on the
  held-out rows (``mcc``, ``mean_max_cos``, ``f1``, ``absorption``, ``shrinkage`` ...).

:func:`summarize_runs` turns it into one row per (architecture, k) with seed intervals (and the
mean of the runs' bootstrap bounds); :func:`sae_nb.comparison.uncertainty.compare` marks
differences within the noise; :func:`agreement` gives, across the grid's runs, the Spearman rank
correlation of each proxy metric with MCC on the lab.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy import stats
from tqdm.auto import tqdm

from sae_nb.activations.models import Model
from sae_nb.comparison.recovery import score_recovery
from sae_nb.comparison.synthetic import Lab
from sae_nb.comparison.uncertainty import (
    bootstrap_interval,
    distance_interval,
    n_seeds,
    per_row_reconstruction,
    row_intervals,
    seed_interval,
    seed_values,
)
from sae_nb.training.evaluate import splice_loss
from sae_nb.training.trainer import TrainConfig, train_dictionary
from sae_nb.util.errors import SaeNbError

log = logging.getLogger(__name__)

ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk")
RECOVERY = ("mcc", "mean_max_cos", "hungarian_cos", "f1", "absorption", "shrinkage")
# Higher is better for every metric except these (compare's verdict wording).
LOWER_IS_BETTER = ("fvu", "absorption", "dead_frac")
# Metrics whose best value is neither the highest nor the lowest: the closer, the better
# (shrinkage 1.30 overshoots by more than 0.99 undershoots).
IDEAL = {"shrinkage": 1.0}
L0_TOLERANCE = 0.1  # two L0s more than 10% apart are different sparsities (grid.with_l0)
# The values a metric can take: a seed interval is clipped to them (the true mean lies inside,
# so clipping keeps the interval's coverage; two seeds' t interval, 12.7 standard errors wide
# each side, otherwise reaches an L0 below 0).
SUPPORT = {"l0": (0.0, np.inf), "fvu": (0.0, np.inf), "shrinkage": (0.0, np.inf),
           "mcc": (-1.0, 1.0), "mean_max_cos": (-1.0, 1.0), "hungarian_cos": (-1.0, 1.0),
           "f1": (0.0, 1.0), "precision": (0.0, 1.0), "recall": (0.0, 1.0),
           "absorption": (0.0, 1.0), "dead_frac": (0.0, 1.0),
           # 0: no better than zeroing the site; 1: as good as the clean model
           "ce_loss_recovered": (0.0, 1.0)}
# What each column of the grid's tables means: the notebook shows this table.
METRICS = {
    "mcc": "mean correlation of each true feature with its best-matched latent (Hungarian "
           "matching of activations; 1 = every feature recovered exactly)",
    "mean_max_cos": "mean over true features of the largest cosine between its direction and "
                    "any decoder row",
    "hungarian_cos": "mean cosine of true feature and decoder row under a one-to-one matching",
    "f1": "F1 of each matched latent as a detector of its true feature firing, averaged",
    "absorption": "share of rows where parent and child both fire but the parent's latent is "
                  "silent (lower is better)",
    "shrinkage": "matched latents' activation over the true feature's (1 is ideal)",
    "fvu": "fraction of variance unexplained on held-out rows (lower is better)",
    "l0": "active latents per token on held-out rows (a choice, not a quality)",
    "ce_loss_recovered": "(CE zero-ablated - CE spliced) / (CE zero-ablated - CE clean) on "
                         "held-out contexts (1 = as good as the clean model)",
    "spearman": "rank correlation, across the grid's runs, of a metric with MCC",
    "p_value": "chance of a correlation this strong with no relation (two-sided)",
    "seed interval": "mean over seeds [95% t interval]; with 2 seeds the t quantile is 12.7",
    "bootstrap": "mean over seeds of each run's 95% bootstrap interval over held-out rows",
}


class CompareError(SaeNbError, ValueError):
    """A grid that cannot be trained or summarized as asked."""


@dataclass
class Grid:
    table: pd.DataFrame  # one row per (architecture, k, seed)
    dictionaries: dict = field(default_factory=dict)  # (architecture, k, seed) -> Dictionary


def higher_is_better(metrics) -> dict[str, bool]:
    """compare's orientation: L0 is a choice, not a quality, so it is left out (its pairs
    read "a higher"), as are the metrics of :data:`IDEAL`, which compare takes by their
    distance to the ideal value (``compare(..., ideal=IDEAL)``)."""
    return {m: m not in LOWER_IS_BETTER for m in metrics if m != "l0" and m not in IDEAL}


def _lab_batches(acts: np.ndarray, batch_size: int, seed: int):
    """Endless shuffled batches of ``acts`` (a fresh order each epoch)."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.ascontiguousarray(acts, dtype=np.float32))
    while True:
        order = torch.from_numpy(rng.permutation(len(x)))
        for lo in range(0, len(x) - batch_size + 1, batch_size):
            yield x[order[lo:lo + batch_size]]


def _boot(per_row: dict, groups, n_resamples: int, seed: int) -> dict:
    """A run's held-out FVU and L0 with their bootstrap bounds."""
    out = {}
    for name, iv in row_intervals(per_row, groups, n_resamples, seed=seed).items():
        out.update({name: iv.estimate, f"{name}_boot_low": iv.low, f"{name}_boot_high": iv.high})
    return out


def ce_pieces(model: Model, site: str, tokens: torch.Tensor, replace=None, bos_token_id=None,
              batch_size: int = 8) -> np.ndarray:
    """Per CE context, the summed next-token cross-entropy with the site replaced by
    ``replace`` (None: clean; ``torch.zeros_like``: zero ablation)."""
    sums = []
    for lo in range(0, len(tokens), batch_size):
        ce, _ = splice_loss(model, site, tokens[lo:lo + batch_size], replace,
                            bos_token_id=bos_token_id)
        sums.append(ce.double().sum(1).cpu().numpy())
    return np.concatenate(sums)


def loss_recovered(zero, spliced, clean) -> float:
    """(zero - spliced) / (zero - clean) of summed losses: the ratio of
    :func:`sae_nb.training.evaluate.ce_metrics`."""
    z, s, c = float(np.sum(zero)), float(np.sum(spliced)), float(np.sum(clean))
    return (z - s) / (z - c) if z != c else float("nan")


def train_grid(data, architectures=ARCHITECTURES, ks=(8, 16), seeds=(0, 1), d_sae: int = 1024,
               total_tokens: int = 65536, batch_size: int = 1024, heldout: int = 4096,
               model: Model | None = None, n_resamples: int = 200, device: str = "cpu",
               progress: bool = True, **config) -> Grid:
    """Train every (architecture, k, seed) on ``data`` and score each run (module docstring).

    ``data``: a :class:`~sae_nb.comparison.synthetic.Lab` (its last ``heldout`` rows held out)
    or a :class:`~sae_nb.activations.split.HeldoutSplit` of a real store (its own held-out rows;
    ``model`` given: CE loss recovered on its CE contexts). ``config``: further TrainConfig
    fields. A seed given twice is trained once: the same seed is the same run, not a second
    sample of the training noise (seed intervals need 2 distinct seeds). ``progress``: a bar
    over the runs, with the time left."""
    if not architectures or not ks or not seeds:
        raise CompareError("train_grid needs at least one architecture, one k and one seed; "
                           f"got {architectures!r}, {ks!r}, {seeds!r}.")
    distinct = list(dict.fromkeys(seeds))
    if len(distinct) < len(seeds):
        log.warning("seeds=%r repeat a seed; training the distinct seeds %r once each.",
                    list(seeds), distinct)
    seeds = distinct
    is_lab = isinstance(data, Lab)
    if is_lab:
        n = len(data.acts)
        if not 0 < heldout < n - batch_size:
            raise CompareError(f"heldout={heldout} must leave at least batch_size={batch_size} "
                               f"of the lab's {n} rows for training; lower it.")
        train_rows, held_rows = data.acts[:n - heldout], slice(n - heldout, n)
        held_acts, groups = data.acts[held_rows], None
    else:
        held_acts = data.heldout_acts.numpy()
        groups = data.store.index(data.heldout_rows)["context"]
    ce = None
    if model is not None and not is_lab and data.ce_tokens is not None:
        tokens, site, bos = data.ce_tokens, data.store.site, data.bos_token_id
        ce = {"clean": ce_pieces(model, site, tokens, None, bos),
              "zero": ce_pieces(model, site, tokens, torch.zeros_like, bos)}
    rows, dictionaries = [], {}
    runs = [(a, k, s) for a in architectures for k in ks for s in seeds]
    bar = tqdm(runs, desc=f"{'lab' if is_lab else 'store'} grid runs", disable=not progress)
    for arch, k, seed in bar:
        bar.set_postfix_str(f"{arch} k={k} seed={seed}", refresh=False)
        cfg = TrainConfig(architecture=arch, d_sae=d_sae, k=k, total_tokens=total_tokens,
                          seed=seed, device=device, log_every=10 ** 9, **config)
        batches = (_lab_batches(train_rows, batch_size, seed) if is_lab
                   else data.train_batches(batch_size, seed))
        sae = train_dictionary(batches, cfg, progress=False).dictionary.eval()
        dictionaries[(arch, k, seed)] = sae
        row = {"architecture": arch, "k": k, "seed": seed}
        row.update(_score(sae, held_acts, groups, n_resamples, seed, model, data, ce))
        if is_lab:
            s = score_recovery(sae, data, rows=held_rows).summary
            row.update({m: s[m] for m in (*RECOVERY, "precision", "recall", "dead_frac")})
        rows.append(row)
    return Grid(pd.DataFrame(rows), dictionaries)


def _score(sae, held_acts, groups, n_resamples: int, seed: int, model, data, ce) -> dict:
    """A dictionary's held-out FVU and L0 with their bootstrap bounds, and with ``ce`` (the
    clean and zero-ablated pieces) its CE loss recovered and bounds."""
    row = _boot(per_row_reconstruction(sae, held_acts), groups, n_resamples, seed)
    if ce is not None:
        tokens, site, bos = data.ce_tokens, data.store.site, data.bos_token_id
        spliced = ce_pieces(model, site, tokens,
                            lambda a, s=sae: s.reconstruct(a.float()).to(a.dtype), bos)
        iv = bootstrap_interval(loss_recovered, ce["zero"], spliced, ce["clean"],
                                n_resamples=n_resamples, seed=seed)
        row.update(ce_loss_recovered=iv.estimate, ce_loss_recovered_boot_low=iv.low,
                   ce_loss_recovered_boot_high=iv.high)
    return row


def score_reference(dictionary, split, model: Model | None = None, n_resamples: int = 200,
                    name: str = "reference") -> dict:
    """One ready dictionary (e.g. the shipped default) scored as :func:`train_grid` scores its
    runs on ``split`` (a :class:`~sae_nb.activations.split.HeldoutSplit`): ``fvu``, ``l0``
    and, given ``model``, ``ce_loss_recovered``, with their bootstrap bounds, and ``name``;
    a reference point for :func:`sae_nb.views.plotting.pareto_figure`."""
    if dictionary.d_in != split.heldout_acts.shape[1]:
        raise CompareError(f"The dictionary reads d_in={dictionary.d_in} but the store's rows "
                           f"are {split.heldout_acts.shape[1]} wide; pass a dictionary of the "
                           f"store's site.")
    ce = None
    if model is not None and split.ce_tokens is not None:
        tokens, site, bos = split.ce_tokens, split.store.site, split.bos_token_id
        ce = {"clean": ce_pieces(model, site, tokens, None, bos),
              "zero": ce_pieces(model, site, tokens, torch.zeros_like, bos)}
    groups = split.store.index(split.heldout_rows)["context"]
    with torch.no_grad():
        row = _score(dictionary.eval(), split.heldout_acts.numpy(), groups, n_resamples, 0,
                     model, split, ce)
    return {"name": name, **row}


def summarize_runs(runs: pd.DataFrame, metrics, by=("architecture", "k"),
                   level: float = 0.95) -> pd.DataFrame:
    """One row per ``by`` group: each metric's mean over the distinct seeds (rows of one seed,
    the same run repeated, averaged first) with its seed interval ``m_low``, ``m_high`` (NaN
    with fewer than 2 distinct seeds, so that compare gives no verdict; clipped to the
    metric's :data:`SUPPORT`), and where the runs carry bootstrap bounds, their means
    ``m_boot_low``, ``m_boot_high``; ``n`` distinct seeds (rows where ``runs`` has no
    ``seed`` column)."""
    by = list(by)
    missing = [c for c in by + list(metrics) if c not in runs.columns]
    if missing:
        raise CompareError(f"runs has no column(s) {missing}; it has {list(runs.columns)}.")
    out = []
    for key, part in runs.groupby(by, sort=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        for m in metrics:
            values = seed_values(part, m)
            if len(values) >= 2:
                iv = seed_interval(values, level)
                lo, hi = SUPPORT.get(m, (-np.inf, np.inf))
                row.update({m: iv.estimate, f"{m}_low": max(iv.low, lo),
                            f"{m}_high": min(iv.high, hi)})
            else:
                row.update({m: float(values.mean()) if len(values) else np.nan,
                            f"{m}_low": np.nan, f"{m}_high": np.nan})
            for b in ("boot_low", "boot_high"):
                if f"{m}_{b}" in part.columns:
                    row[f"{m}_{b}"] = float(part[f"{m}_{b}"].mean())
        row["n"] = n_seeds(part)
        out.append(row)
    return pd.DataFrame(out)


def readable(summary: pd.DataFrame, metrics, by=("architecture", "k"), digits: int = 3,
             bootstrap: bool = True) -> pd.DataFrame:
    """``summary`` as a person reads it: one column per metric, ``mean [low, high]`` (the seed
    interval; the mean alone for a group of one distinct seed), then ``m bootstrap``
    ``[low, high]`` for the metrics whose runs carry held-out bootstrap bounds (unless
    ``bootstrap`` is False), and ``n`` distinct seeds."""
    def interval(lo, hi) -> str:
        return f"[{lo:.{digits}f}, {hi:.{digits}f}]"

    out = summary[list(by)].copy()
    for m in metrics:
        out[m] = [f"{r[m]:.{digits}f}" + (f" {interval(r[f'{m}_low'], r[f'{m}_high'])}"
                                          if np.isfinite(r[f"{m}_low"]) else "")
                  for _, r in summary.iterrows()]
    for m in metrics:
        if bootstrap and f"{m}_boot_low" in summary.columns:
            out[f"{m} bootstrap"] = [interval(r[f"{m}_boot_low"], r[f"{m}_boot_high"])
                                     for _, r in summary.iterrows()]
    out["n"] = summary["n"].to_numpy()
    return out


def labelled(summary: pd.DataFrame, by=("architecture", "k")) -> pd.DataFrame:
    """``summary`` indexed by one readable name per row (``topk k=8``), for
    :func:`sae_nb.comparison.uncertainty.compare`."""
    names = summary[list(by)].astype(str).agg(lambda r: " ".join(
        f"{c}={v}" if c != "architecture" else v for c, v in zip(by, r)), axis=1)
    return summary.drop(columns=list(by)).set_axis(names.to_numpy(), axis=0)


def agreement(runs: pd.DataFrame, target: str = "mcc", proxies=None) -> pd.DataFrame:
    """Across the grid's runs, the Spearman rank correlation of each proxy metric with
    ``target`` (higher is better for both after flipping the lower-is-better ones, and taking
    the metrics of :data:`IDEAL` by minus their distance to the ideal): one row per proxy,
    ``spearman``, its two-sided ``p_value`` (never below :func:`p_floor`, the smallest a rank
    test over these runs can give: scipy's approximation says 0 for a perfect rank
    agreement), the number of ``runs`` and ``agrees`` (positive and p < 0.05).
    :func:`readable_agreement` prints it."""
    proxies = list(proxies or [c for c in ("fvu", "f1", "mean_max_cos", "hungarian_cos",
                                           "absorption", "shrinkage") if c in runs.columns])
    if target not in runs.columns:
        raise CompareError(f"runs has no {target!r} column; train the grid on a lab.")
    if len(runs) < 3:
        raise CompareError(f"A rank correlation needs at least 3 runs; the grid has {len(runs)}.")
    out = []
    for p in proxies:
        values = runs[p].to_numpy(float)
        if p in IDEAL:
            values, oriented = -np.abs(values - IDEAL[p]), f"closer to {IDEAL[p]:g} is better"
        elif p in LOWER_IS_BETTER:
            values, oriented = -values, "lower is better"
        else:
            oriented = "higher is better"
        rho, pval = stats.spearmanr(values, runs[target].to_numpy(float))
        out.append({"metric": p, "oriented": oriented,
                    "spearman": float(rho), "p_value": max(float(pval), p_floor(len(runs))),
                    "runs": len(runs), "agrees": bool(rho > 0 and pval < 0.05)})
    return pd.DataFrame(out)


def p_floor(n: int) -> float:
    """The smallest two-sided p-value of a rank correlation over ``n`` runs: 2 / n!, the
    chance under no relation of one of the two perfectly (anti-)ordered rankings."""
    return 2.0 / math.factorial(int(n))


def p_text(p: float, n: int) -> str:
    """A p-value as a reader should see it: ``'3.95e-03'``, or ``'< 1e-08'`` at the floor a
    rank test over ``n`` runs can resolve (:func:`p_floor`), never ``0.000e+00``."""
    floor = p_floor(n)
    if not np.isfinite(p):
        return "n/a"
    if p <= floor * (1 + 1e-9):
        return f"< 1e{math.ceil(math.log10(floor)):03d}"
    return f"{p:.2e}"


def readable_agreement(table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """:func:`agreement`'s table to print: ``spearman`` rounded, ``p_value`` as text
    (:func:`p_text`)."""
    out = table.copy()
    out["spearman"] = out["spearman"].round(digits)
    out["p_value"] = [p_text(p, n) for p, n in zip(table["p_value"], table["runs"])]
    return out.drop(columns=["runs"])


def best_by(summary: pd.DataFrame, metric: str, higher: bool = True,
            by=("architecture", "k")) -> tuple[str, bool]:
    """The best row of ``summary`` on ``metric`` by name, and whether its seed interval clears
    every other row's (False: the lead is within the noise). A metric of :data:`IDEAL` is
    ranked by its distance to the ideal value, whatever ``higher`` says."""
    s = labelled(summary, by)
    if metric in IDEAL:
        target = IDEAL[metric]
        order = (s[metric] - target).abs().sort_values()
        best, rest = order.index[0], order.index[1:]
        far = {r: distance_interval(s.loc[r, f"{metric}_low"], s.loc[r, f"{metric}_high"],
                                    target) for r in s.index}
        return best, bool(all(far[best][1] < far[r][0] for r in rest))
    order = s[metric].sort_values(ascending=not higher)
    best, rest = order.index[0], order.index[1:]
    if higher:
        clear = all(s.loc[best, f"{metric}_low"] > s.loc[r, f"{metric}_high"] for r in rest)
    else:
        clear = all(s.loc[best, f"{metric}_high"] < s.loc[r, f"{metric}_low"] for r in rest)
    return best, bool(clear)



def verdict_table(summary: pd.DataFrame, metrics, by=("architecture", "k")) -> pd.DataFrame:
    """Per metric, one row a person reads: which way is better, the best configuration, its
    ``mean [seed interval]``, and the verdict: ahead of every other beyond the seed noise, or
    within it of the configurations named (:func:`best_by`)."""
    s = labelled(summary, by)
    out = []
    for m in metrics:
        higher = m not in LOWER_IS_BETTER
        best, clear = best_by(summary, m, higher, by)
        if m in IDEAL:
            far = {r: distance_interval(s.loc[r, f"{m}_low"], s.loc[r, f"{m}_high"], IDEAL[m])
                   for r in s.index}
            close = [r for r in s.index if r != best and far[r][0] <= far[best][1]]
        elif higher:
            close = [r for r in s.index if r != best and s.loc[r, f"{m}_high"] >= s.loc[best,
                                                                                       f"{m}_low"]]
        else:
            close = [r for r in s.index if r != best and s.loc[r, f"{m}_low"] <= s.loc[best,
                                                                                      f"{m}_high"]]
        r = s.loc[best]
        out.append({"metric": m,
                    "better": (f"closer to {IDEAL[m]:g}" if m in IDEAL
                               else "higher" if higher else "lower"),
                    "best": best,
                    "mean [seed interval]": f"{r[m]:.3f} [{r[f'{m}_low']:.3f}, "
                                            f"{r[f'{m}_high']:.3f}]",
                    "verdict": ("ahead of every other beyond the seed noise" if clear else
                                f"within the seed noise of {len(close)}: {', '.join(close)}")})
    return pd.DataFrame(out)


def pair_counts(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per metric of :func:`sae_nb.comparison.uncertainty.compare`'s pairs: how many pairs,
    how many within noise, told apart, and without a verdict."""
    v = pairs["verdict"]
    table = pd.DataFrame({"metric": pairs["metric"], "within noise": v.str.startswith("within"),
                          "no verdict": v.str.startswith("no verdict"),
                          "pairs": 1})
    table["told apart"] = ~table["within noise"] & ~table["no verdict"]
    return (table.groupby("metric", sort=False)[["pairs", "within noise", "told apart",
                                                 "no verdict"]].sum().reset_index())


def with_l0(pairs: pd.DataFrame, summary: pd.DataFrame, by=("architecture", "k"),
            x: str = "l0", tolerance: float = L0_TOLERANCE) -> pd.DataFrame:
    """``pairs`` with each side's L0 and whether the two differ in it: their L0s more than
    ``tolerance`` apart (a share of the larger), or their seed intervals apart. A lower FVU at
    a higher L0 is not a better dictionary, only a denser one, whatever the noise: the verdict
    of such a pair says so. Not by the seed intervals alone: two seeds make a t interval so
    wide (t = 12.7) that L0 16 and L0 32 would pass for the same sparsity. The pairs of the
    L0 metric itself keep ``differ_in_l0`` False; a "within noise" verdict of one that differs
    this way says how far apart the two are."""
    s = labelled(summary, by)
    out = pairs.copy()
    out["a_l0"] = [float(s.loc[a, x]) for a in pairs["a"]]
    out["b_l0"] = [float(s.loc[b, x]) for b in pairs["b"]]

    def apart(a, b) -> bool:
        la, ha, lb, hb = (s.loc[a, f"{x}_low"], s.loc[a, f"{x}_high"], s.loc[b, f"{x}_low"],
                          s.loc[b, f"{x}_high"])
        ma, mb = float(s.loc[a, x]), float(s.loc[b, x])
        if abs(ma - mb) > tolerance * max(abs(ma), abs(mb)):
            return True
        if not np.isfinite([la, ha, lb, hb]).all():
            return bool(ma != mb)
        return bool(ha < lb or hb < la)

    differ = np.array([apart(a, b) for a, b in zip(pairs["a"], pairs["b"])], dtype=bool)
    own = (pairs["metric"] == x).to_numpy()
    out["differ_in_l0"] = differ & ~own
    out.loc[out["differ_in_l0"], "verdict"] = [
        f"{v}; at different L0 ({la:.1f} vs {lb:.1f}): not like for like"
        for v, la, lb in out.loc[out["differ_in_l0"], ["verdict", "a_l0", "b_l0"]].to_numpy()]
    noisy = differ & own & out["verdict"].str.startswith("within").to_numpy()
    out.loc[noisy, "verdict"] = [
        f"{v}, but {la:.1f} vs {lb:.1f} is a different sparsity (more than "
        f"{tolerance:.0%} apart)"
        for v, la, lb in out.loc[noisy, ["verdict", "a_l0", "b_l0"]].to_numpy()]
    return out


def metric_definitions(columns) -> pd.DataFrame:
    """The definitions (:data:`METRICS`) of the metrics among ``columns`` (a table's columns,
    or several tables' columns together), in the order given."""
    seen = [c for c in dict.fromkeys(columns) if c in METRICS]
    return pd.DataFrame({"metric": seen, "definition": [METRICS[c] for c in seen]})
