"""Explanation tables of latents: cache, merge, the best explanation per latent.

Every explainer (``rules``: executable rules; ``autointerp``: a language model's labels and
their detection, fuzzing and embedding scores) produces the same table, one row per
``(latent, method)``: ``latent``, ``method`` (``"rule"``, ``"llm"``; a control row, the
explanation of another random latent scored on this one, has ``"<method>:control"``),
``explanation`` ("" when the method failed), ``score`` in [0, 1] (NaN when failed),
``score_name`` (``"f1"``, ``"detection_auroc"``...) and ``error`` ("" or why it failed).

A run caches one file per method under ``run_dir/explanations/<dictionary>/``: ``<method>.csv``
and ``<method>.identity.json`` (the dictionary, the store and the settings); the same identity
reuses the table. The language model's labels and the scores are JSON-lines records, one file
per explainer or scorer identity (:mod:`sae_nb.explanations.results`).
:func:`best_explanations` keeps each latent's highest-scoring explanation, the one the
explorer, the dashboards and the feature table show beside the latent. The search by meaning
over these tables lives in :mod:`sae_nb.explanations.meaning`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from sae_nb.activations.models import Model
from sae_nb.explanations.backends import Backend, LocalBackend, OpenAIBackend
from sae_nb.explanations.results import (
    COLUMNS,
    ExplanationError,
    current_results,
    read_result_lines,
)
from sae_nb.util.io import atomic_write_json, folder_name, write_table

log = logging.getLogger(__name__)

CONTROL = ":control"  # suffix of a control row's method
EXPLANATIONS_DIR = "explanations"


# -- the table --------------------------------------------------------------------------------
def check_table(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with the contract's types (latent int, score float, text columns as str, ""
    for missing); raises :class:`ExplanationError` naming any missing column."""
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ExplanationError(f"An explanation table needs the columns {list(COLUMNS)}; this "
                               f"one lacks {missing} (it has {list(table.columns)}).")
    out = table.copy()
    out["latent"] = out["latent"].astype(np.int64)
    out["score"] = pd.to_numeric(out["score"], errors="coerce").astype(np.float64)
    for c in ("method", "explanation", "score_name", "error"):
        out[c] = out[c].fillna("").astype(str)
    return out.reset_index(drop=True)


def empty_table() -> pd.DataFrame:
    """An explanation table with no rows."""
    return check_table(pd.DataFrame({c: [] for c in COLUMNS}))


def merge_explanations(*tables: pd.DataFrame) -> pd.DataFrame:
    """One table of all rows; where two rows hold the same ``(latent, method, score_name)``
    (one explanation scored one way) the later one wins. Sorted by latent, then method."""
    tables = [check_table(t) for t in tables if t is not None and len(t)]
    if not tables:
        return empty_table()
    merged = pd.concat(tables, ignore_index=True)
    merged = merged.drop_duplicates(["latent", "method", "score_name"], keep="last")
    return merged.sort_values(["latent", "method"], kind="stable").reset_index(drop=True)


def is_control(method) -> pd.Series | bool:
    """Whether a method name (or a Series of them) is a control's."""
    if isinstance(method, pd.Series):
        return method.str.endswith(CONTROL)
    return str(method).endswith(CONTROL)


def best_explanations(table: pd.DataFrame, score_names: Sequence[str] | None = None,
                      min_score: float = 0.0) -> pd.DataFrame:
    """One row per latent with a usable explanation: the highest-scoring one (``latent``,
    ``explanation``, ``method``, ``score``, ``score_name``), indexed by latent too.

    Control rows, failed rows (an error, an empty explanation or a NaN score) and scores not
    above ``min_score`` (an F1 of 0 explains nothing) are ignored.
    Scores are compared as they are (each in [0, 1]); ``score_names`` (e.g.
    ``["detection_auroc"]``) keeps only those scores, so that methods are compared on one
    yardstick (an F1 and an AUROC, whose chance level is 0.5, are not the same). On a tie the
    row listed first in the table wins."""
    t = check_table(table)
    usable = (~is_control(t["method"]) & (t["error"] == "") & (t["explanation"].str.strip() != "")
              & np.isfinite(t["score"]) & (t["score"] > min_score))
    if score_names is not None:
        usable &= t["score_name"].isin(list(score_names))
    t = t[usable]
    t = t.sort_values(["latent", "score"], ascending=[True, False], kind="stable")
    best = t.drop_duplicates("latent", keep="first")
    best = best[["latent", "explanation", "method", "score", "score_name"]]
    return best.set_index("latent", drop=False).rename_axis(None)


def explanation_caption(explanation: str, score: float, score_name: str, method: str = "",
                        max_chars: int | None = None) -> str:
    """``'tax words (llm, detection_auroc 0.91)'``: an explanation with its score, the
    explanation cut to ``max_chars`` (with an ellipsis) when given."""
    how = f"{method}, " if method else ""
    if max_chars is not None and len(explanation) > max_chars:
        explanation = explanation[: max_chars - 1].rstrip() + "…"
    return f"{explanation} ({how}{score_name} {float(score):.2f})"


def explanation_captions(best: pd.DataFrame | None) -> dict[int, str]:
    """Per latent in ``best`` (:func:`best_explanations`), its :func:`explanation_caption`."""
    if best is None or not len(best):
        return {}
    return {int(r.latent): explanation_caption(r.explanation, r.score, r.score_name, r.method)
            for r in best.itertuples()}


def with_explanations(features: pd.DataFrame, best: pd.DataFrame | None) -> pd.DataFrame:
    """A per-latent table (e.g. ``FeatureStats.table()``, with a ``latent`` column) joined with
    each latent's best explanation: columns ``explanation``, ``explanation_method``,
    ``explanation_score``, ``explanation_score_name`` ("" and NaN where a latent has none)."""
    if "latent" not in features.columns:
        raise ExplanationError(f"The table to join needs a 'latent' column; it has "
                               f"{list(features.columns)}.")
    best = best if best is not None and len(best) else best_explanations(empty_table())
    right = best.reset_index(drop=True).rename(columns={
        "method": "explanation_method", "score": "explanation_score",
        "score_name": "explanation_score_name"})
    out = features.merge(right, on="latent", how="left")
    for c in ("explanation", "explanation_method", "explanation_score_name"):
        out[c] = out[c].fillna("")
    return out


def score_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per method (controls included): latents scored, failed, and the score's mean, median,
    quartiles and the fraction above 0.5 and 0.8, over the rows that did not fail."""
    t = check_table(table)
    failed = (t["error"] != "") | ~np.isfinite(t["score"])
    rows = []
    for (method, name), group in t.groupby(["method", "score_name"], sort=True):
        ok = group.loc[~failed.loc[group.index], "score"]
        rows.append({"method": method, "score_name": name, "latents": len(group),
                     "failed": int(failed.loc[group.index].sum()),
                     "mean": ok.mean(), "median": ok.median(), "q25": ok.quantile(0.25),
                     "q75": ok.quantile(0.75), "above_0.5": (ok > 0.5).mean(),
                     "above_0.8": (ok > 0.8).mean()})
    return pd.DataFrame(rows)


def method_comparison(table: pd.DataFrame) -> pd.DataFrame:
    """Methods side by side on each score: per ``score_name`` and method, over the latents that
    every method of that score has a usable score for, the mean score, the mean score of the
    method's control on the same latents, and the margin between them."""
    t = check_table(table)
    t = t[(t["error"] == "") & np.isfinite(t["score"])]
    rows = []
    for name, group in t.groupby("score_name", sort=True):
        own = group[~is_control(group["method"])]
        methods = sorted(own["method"].unique())
        common = set.intersection(*[set(own.loc[own["method"] == m, "latent"]) for m in methods]
                                  ) if methods else set()
        for method in methods:
            mine = own[(own["method"] == method) & own["latent"].isin(common)]
            ctrl = group[(group["method"] == method + CONTROL) & group["latent"].isin(common)]
            mean, control = mine["score"].mean(), ctrl["score"].mean() if len(ctrl) else np.nan
            rows.append({"score_name": name, "method": method, "latents": len(mine),
                         "mean": mean, "median": mine["score"].median(),
                         "control_mean": control, "margin": mean - control})
    return pd.DataFrame(rows, columns=["score_name", "method", "latents", "mean", "median",
                                       "control_mean", "margin"])


def method_verdict(comparison: pd.DataFrame) -> str:
    """Which method explains best, in words with the numbers of :func:`method_comparison`:
    on each score that two or more methods share, the method with the largest margin over its
    control (a method without a control is judged by its mean)."""
    lines = []
    for name, group in comparison.groupby("score_name", sort=True):
        group = group[group["latents"] > 0]
        parts = "; ".join(
            f"{r.method} {r.mean:.3f}" + (f" (control {r.control_mean:.3f}, margin {r.margin:+.3f})"
                                          if np.isfinite(r.control_mean) else " (no control)")
            for r in group.itertuples())
        if len(group) < 2:
            lines.append(f"{name}: only {parts} over {int(group['latents'].sum())} latents.")
            continue
        key = group["margin"].where(np.isfinite(group["margin"]), group["mean"])
        best = group.loc[key.idxmax()]
        lines.append(f"{name}, over the {int(best['latents'])} latents every method has: "
                     f"{parts}. Best: {best['method']}.")
    return "\n".join(lines) if lines else "No scored explanations to compare."


def explainer_backend(explainer: str = "", model: Model | None = None,
                      endpoint_model: str = "") -> Backend:
    """The language model that writes and scores explanations: ``""`` for ``model`` (an already
    loaded model, e.g. the notebook's; else the embedded SmolLM2-135M), a local model folder, or
    an OpenAI-compatible endpoint URL (``http://127.0.0.1:8000/v1``) serving ``endpoint_model``
    (see ``sae_nb.explanations.backends``)."""
    explainer = str(explainer or "")
    if explainer.startswith(("http://", "https://")):
        if not endpoint_model:
            raise ExplanationError(f"explainer={explainer!r} is an endpoint: name the model "
                                   f"it serves with explainer_model, e.g. 'Qwen2.5-7B-Instruct'.")
        return OpenAIBackend(explainer, endpoint_model)
    if explainer:
        return LocalBackend(explainer)
    return LocalBackend(model) if model is not None else LocalBackend()


def sample_latents(stats, n: int, seed: int = 0, min_fires: int = 5) -> list[int]:
    """``n`` latents drawn at random (seeded) among those firing on at least ``min_fires``
    tokens of the store, in increasing order: a fair sample for the costly explainers."""
    fires = np.rint(np.asarray(stats.density, dtype=np.float64) * stats.n_tokens)
    alive = np.nonzero(fires >= min_fires)[0]
    if n <= 0 or not len(alive):
        return []
    chosen = np.random.default_rng(seed).choice(alive, size=min(n, len(alive)), replace=False)
    return sorted(int(i) for i in chosen)


# -- the cache --------------------------------------------------------------------------------
def explanations_folder(run_dir: str | Path, dictionary_name: str) -> Path:
    """Where a run caches one dictionary's explanation tables:
    ``run_dir/explanations/<dictionary name>/``."""
    return Path(run_dir) / EXPLANATIONS_DIR / folder_name(str(dictionary_name))


def explanation_identity(stats, **settings) -> dict:
    """A cache key: the statistics' identity (dictionary weights, store, statistics settings)
    and the method's ``settings`` (JSON-able)."""
    return json.loads(json.dumps({"stats": stats.identity, **settings}, default=str))


def save_explanations(table: pd.DataFrame, folder: str | Path, method: str,
                      identity: dict) -> Path:
    """Write ``table`` as ``folder/<method>.csv`` and its ``identity`` beside it, atomically."""
    folder = Path(folder)
    name = folder_name(method)
    path = write_table(check_table(table), folder / f"{name}.csv")
    atomic_write_json(folder / f"{name}.identity.json", identity)
    return path


def cached_explanations(folder: str | Path, method: str, identity: dict) -> pd.DataFrame | None:
    """The table saved for ``method`` in ``folder`` when its identity equals ``identity``,
    else None (absent, another dictionary, store or settings, or unreadable)."""
    folder, name = Path(folder), folder_name(method)
    csv, key = folder / f"{name}.csv", folder / f"{name}.identity.json"
    if not (csv.exists() and key.exists()):
        return None
    try:
        saved = json.loads(key.read_text())
        table = pd.read_csv(csv, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as err:
        log.warning("Ignoring the cached %s explanations in %s (%s).", method, folder, err)
        return None
    if saved != json.loads(json.dumps(identity, default=str)):
        log.info("Cached %s explanations in %s are for another dictionary, store or settings.",
                 method, folder)
        return None
    return check_table(table)


def explain_cached(folder: str | Path, method: str, identity: dict,
                   compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """The cached ``method`` table for ``identity``, or ``compute()``'s, saved for next time."""
    table = cached_explanations(folder, method, identity)
    if table is None:
        table = check_table(compute())
        save_explanations(table, folder, method, identity)
    return table


def read_records(path: str | Path) -> pd.DataFrame:
    """A JSON-lines file of explanation rows (:mod:`sae_nb.explanations.results`: one record
    per line, appended as each finishes) as a table; a line that is not a record is skipped,
    with a warning naming the file and the line."""
    records = read_result_lines(path, key=False)
    table = pd.DataFrame([{k: v for k, v in r.items() if k != "key"} for r in records])
    return table if len(table) else empty_table()


def load_explanations(folder: str | Path) -> pd.DataFrame:
    """Every explanation table cached in ``folder`` merged into one: the ``*.csv`` tables
    (``rule.csv``...) and the JSON-lines records of the language-model explainer and scorers,
    for each kind (``llm``, ``detection``...) those of the explainer or scorer run last
    (:func:`~sae_nb.explanations.results.current_results`). Files without the table's
    columns are skipped; empty when there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        return empty_table()
    tables = []
    for path in sorted(folder.glob("*.csv")) + current_results(folder):
        table = (pd.read_csv(path, keep_default_na=False, na_values=[""])
                 if path.suffix == ".csv" else read_records(path))
        if set(COLUMNS) <= set(table.columns):
            tables.append(table)
        else:
            log.info("%s is not an explanation table; skipped.", path)
    return merge_explanations(*tables)


def as_explanations(explanations) -> pd.DataFrame | None:
    """``explanations`` as a table: a DataFrame as it is, a folder loaded with
    :func:`load_explanations`, None as None."""
    if explanations is None or isinstance(explanations, pd.DataFrame):
        return explanations
    if isinstance(explanations, (str, Path)):
        return load_explanations(explanations)
    raise ExplanationError(f"explanations={type(explanations).__name__}: pass an explanation "
                           f"table (a DataFrame) or its folder (explanations_folder(...)).")
