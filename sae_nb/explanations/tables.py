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
from sae_nb.explanations.ranking import (
    CONTROL,
    MIN_EFFECT,
    bootstrap_interval,
    is_control,
    margins,
    score_label,
)
from sae_nb.explanations.results import (
    COLUMNS,
    ExplanationError,
    current_results,
    read_result_lines,
)
from sae_nb.util.io import atomic_write_json, folder_name, write_table

log = logging.getLogger(__name__)

EXPLANATIONS_DIR = "explanations"
COMMON = 0.01  # firing rate above which best_explained lists a latent after the others


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


def explanation_verdicts(table: pd.DataFrame, score_names: Sequence[str] | None = None,
                         min_score: float = 0.0, min_effect: float = MIN_EFFECT) -> pd.DataFrame:
    """One row per latent with a usable explanation: the one furthest beyond its own control
    (:mod:`sae_nb.explanations.ranking`: the largest ``effect``, margin over the control in
    noise units), and its ``verdict``: ``"explained"`` when that effect reaches ``min_effect``,
    else ``"unexplained"`` (no explanation of the latent beats its control beyond noise; the
    row keeps the closest candidate, for the record).

    Columns ``latent``, ``explanation``, ``method``, ``score``, ``score_name``, ``control``,
    ``margin``, ``noise``, ``effect``, ``verdict``; indexed by latent too. Control rows, failed
    rows (an error, an empty explanation or a NaN score) and scores not above ``min_score`` are
    never candidates; an explanation without a control is never beyond noise.
    ``score_names`` (e.g. ``["detection_auroc"]``) keeps only those scores. On a tie the row
    listed first in the table wins."""
    t = check_table(table)
    m = margins(t, min_effect)
    m = m[m["score"] > min_score]
    if score_names is not None:
        m = m[m["score_name"].isin(list(score_names))]
    m = m.assign(key=m["effect"].fillna(-np.inf))
    m = m.sort_values(["latent", "key"], ascending=[True, False], kind="stable")
    best = m.drop_duplicates("latent", keep="first")
    best = best.assign(verdict=np.where(best["beyond_noise"], "explained", "unexplained"))
    best = best.drop(columns=["key", "beyond_noise"])
    return best.set_index("latent", drop=False).rename_axis(None)


def best_explanations(table: pd.DataFrame, score_names: Sequence[str] | None = None,
                      min_score: float = 0.0, min_effect: float = MIN_EFFECT) -> pd.DataFrame:
    """Each latent's best explanation, only where it beats its own control beyond noise: the
    rows of :func:`explanation_verdicts` whose verdict is ``"explained"`` (``latent``,
    ``explanation``, ``method``, ``score``, ``score_name``, ``control``, ``margin``, ``noise``,
    ``effect``), indexed by latent. An unexplained latent has no row."""
    verdicts = explanation_verdicts(table, score_names, min_score, min_effect)
    return verdicts[verdicts["verdict"] == "explained"]


def best_explained(best: pd.DataFrame, n: int | None = None, density=None,
                   max_density: float = COMMON) -> pd.DataFrame:
    """The rows of :func:`best_explanations` in the order a reader should see them, the first
    ``n`` when given: the order of notebook 08's best-explained table and of the latents its
    dashboard shows.

    Ranked by ``lift``, the explanation's margin over its control as a share of the way from
    the control's score to a perfect 1 (``margin / (1 - control)``: an F1 against a control
    near 0 and an AUROC against 0.5 on one scale), then by ``effect``, ties by latent. Not by
    ``effect`` alone: its noise shrinks as a latent fires more often, so a latent on every
    comma would lead. With ``density`` (each latent's firing rate, e.g. ``stats.density``) the
    table gains a ``density`` column, and latents firing on more than ``max_density`` of the
    tokens (mostly punctuation and function words, whose one-token rules are easy) come after
    the others."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = best["margin"] / (1.0 - best["control"])
    ranked = best.assign(lift=lift.where(np.isfinite(lift), best["margin"]))
    keys, ascending = ["lift", "effect", "latent"], [False, False, True]
    if density is not None:
        rate = np.asarray(density, dtype=float)[ranked["latent"].to_numpy(dtype=int)]
        ranked = ranked.assign(density=rate, common=rate > max_density)
        keys, ascending = ["common", *keys], [True, *ascending]
    ranked = ranked.sort_values(keys, ascending=ascending, kind="stable")
    ranked = ranked.drop(columns=["common"], errors="ignore")
    return ranked if n is None else ranked.head(int(n))


def explanation_caption(explanation: str, score: float, score_name: str, method: str = "",
                        max_chars: int | None = None, control: float = np.nan) -> str:
    """``'llm: tax words (detection AUROC 0.91, control 0.50)'``: the method that wrote the
    explanation, the explanation (cut to ``max_chars`` with an ellipsis when given), its score
    named for a reader and its control's score on the same latent."""
    if max_chars is not None and len(explanation) > max_chars:
        explanation = explanation[: max_chars - 1].rstrip() + "…"
    how = f"{method}: " if method else ""
    vs = f", control {float(control):.2f}" if np.isfinite(control) else ""
    return f"{how}{explanation} ({score_label(score_name)} {float(score):.2f}{vs})"


def best_caption(row, max_chars: int | None = None) -> str:
    """:func:`explanation_caption` of a row of :func:`best_explanations` (a namedtuple or a
    Series)."""
    get = row.get if hasattr(row, "get") else lambda k, d=None: getattr(row, k, d)
    return explanation_caption(str(get("explanation")), get("score"), str(get("score_name")),
                               str(get("method", "") or ""), max_chars,
                               float(get("control", np.nan)))


def explanation_captions(best: pd.DataFrame | None, max_chars: int | None = None
                         ) -> dict[int, str]:
    """Per latent in ``best`` (:func:`best_explanations`), its :func:`best_caption`."""
    if best is None or not len(best):
        return {}
    return {int(r.latent): best_caption(r, max_chars) for r in best.itertuples()}


def with_explanations(features: pd.DataFrame, best: pd.DataFrame | None) -> pd.DataFrame:
    """A per-latent table (e.g. ``FeatureStats.table()``, with a ``latent`` column) joined with
    each latent's best explanation (:func:`best_explanations`, or :func:`explanation_verdicts`
    to name the unexplained): columns ``explanation``, ``explanation_method``,
    ``explanation_score``, ``explanation_score_name``, ``explanation_control``,
    ``explanation_effect`` and ``explanation_verdict`` (``"explained"``, ``"unexplained"``: no
    explanation beyond noise, its explanation left empty, or ``"not scored"``)."""
    if "latent" not in features.columns:
        raise ExplanationError(f"The table to join needs a 'latent' column; it has "
                               f"{list(features.columns)}.")
    best = best if best is not None and len(best) else explanation_verdicts(empty_table())
    right = best.reset_index(drop=True)
    if "verdict" not in right.columns:
        right = right.assign(verdict="explained")
    for c in ("control", "effect"):
        if c not in right.columns:
            right = right.assign(**{c: np.nan})
    shown = right["verdict"] == "explained"
    right = right.assign(explanation=right["explanation"].where(shown, ""),
                         method=right["method"].where(shown, ""),
                         score_name=right["score_name"].where(shown, ""),
                         score=right["score"].where(shown), control=right["control"].where(shown))
    right = right[["latent", "explanation", "method", "score", "score_name", "control", "effect",
                   "verdict"]].rename(columns={c: f"explanation_{c}" for c in (
                       "method", "score", "score_name", "control", "effect", "verdict")})
    out = features.merge(right, on="latent", how="left")
    for c in ("explanation", "explanation_method", "explanation_score_name"):
        out[c] = out[c].fillna("")
    out["explanation_verdict"] = out["explanation_verdict"].fillna("not scored")
    return out


def score_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per method and score (controls included): ``latents``, how many are ``scored`` and
    ``not_scored`` (no score: the explainer failed on the latent, it never fires where it is
    scored, the scorer failed; :func:`summary_notes` says why), and the score's mean, median,
    quartiles and the fraction above 0.5 and 0.8 over the scored rows. A method and score
    with no scored row did not run and is left out, and so are the language model's label
    rows, which have no score of their own (their scores are the detection and embedding
    rows): :func:`summary_notes` names both."""
    t = check_table(table)
    scored = (t["error"] == "") & np.isfinite(t["score"])
    rows = []
    for (method, name), group in t[t["score_name"] != ""].groupby(["method", "score_name"],
                                                                  sort=True):
        ok = group.loc[scored.loc[group.index], "score"]
        if not len(ok):
            continue
        rows.append({"method": method, "score_name": name, "latents": len(group),
                     "scored": len(ok), "not_scored": len(group) - len(ok),
                     "mean": ok.mean(), "median": ok.median(), "q25": ok.quantile(0.25),
                     "q75": ok.quantile(0.75), "above_0.5": (ok > 0.5).mean(),
                     "above_0.8": (ok > 0.8).mean()})
    return pd.DataFrame(rows, columns=["method", "score_name", "latents", "scored",
                                       "not_scored", "mean", "median", "q25", "q75",
                                       "above_0.5", "above_0.8"])


def unscored_reasons(group: pd.DataFrame, n: int = 2, max_chars: int = 80) -> str:
    """Why the rows of ``group`` have no score, the ``n`` commonest reasons first with their
    counts (``"never fires in the held-out rows (4)"``); each cut at ``max_chars``."""
    reasons = group["error"].where(group["error"] != "", "no score").value_counts()
    cut = [(r if len(r) <= max_chars else r[:max_chars - 1] + "…", c)
           for r, c in reasons.head(n).items()]
    words = [f"{r} ({c})" for r, c in cut]
    if len(reasons) > n:
        words.append(f"other reasons ({int(reasons.iloc[n:].sum())})")
    return "; ".join(words)


def summary_notes(table: pd.DataFrame) -> list[str]:
    """What :func:`score_summary` leaves out or cannot count, one sentence each: per method
    with label rows (no score of their own), how many latents got a label and why the others
    did not; each method and score that did not run (no scored row) and why; and why the
    unscored rows of the others have no score."""
    t = check_table(table)
    scored = (t["error"] == "") & np.isfinite(t["score"])
    notes = []
    with_scores = set(t.loc[t["score_name"] != "", "method"])
    for method, group in t[t["score_name"] == ""].groupby("method", sort=True):
        done = (group["error"] == "") & (group["explanation"] != "")
        missing = group[~done]
        note = f"{method} labels: {int(done.sum())} of {len(group)} latents have one"
        if len(missing):
            note += f"; without: {unscored_reasons(missing)}"
        notes.append(note + ("" if method in with_scores else
                             "; not run: no score of the labels (no detection or embedding "
                             "rows)"))
    for (method, name), group in t[t["score_name"] != ""].groupby(["method", "score_name"],
                                                                  sort=True):
        missing = group[~scored.loc[group.index]]
        if len(missing) == len(group):
            notes.append(f"{method} {name}: not run, none of {len(group)} latents scored: "
                         f"{unscored_reasons(missing)}")
        elif len(missing):
            notes.append(f"{method} {name}: {len(missing)} not scored: "
                         f"{unscored_reasons(missing)}")
    return notes


def method_comparison(table: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Methods side by side on each score, over the latents every method of that score has a
    usable score for: per ``score_name`` and method the mean and median score, the mean of the
    method's control on the same latents, the mean ``margin`` over it with its 95% bootstrap
    interval over the latents (``margin_low``, ``margin_high``; seeded), ``beyond_noise`` (the
    interval above 0), and its ``lead`` over the best other method (``lead_over``; the
    difference of margins paired per latent, with its interval ``lead_low``, ``lead_high``)."""
    t = check_table(table)
    t = t[(t["error"] == "") & np.isfinite(t["score"])]
    rows, paired = [], {}
    for name, group in t.groupby("score_name", sort=True):
        own = group[~is_control(group["method"])]
        methods = sorted(own["method"].unique())
        common = set.intersection(*[set(own.loc[own["method"] == m, "latent"]) for m in methods]
                                  ) if methods else set()
        for method in methods:
            mine = own[(own["method"] == method) & own["latent"].isin(common)]
            mine = mine.drop_duplicates("latent", keep="last").set_index("latent")["score"]
            ctrl = group[(group["method"] == method + CONTROL) & group["latent"].isin(common)]
            ctrl = ctrl.drop_duplicates("latent", keep="last").set_index("latent")["score"]
            diff = (mine - ctrl).dropna()
            paired[name, method] = diff
            low, high = bootstrap_interval(diff.to_numpy(), seed=seed)
            rows.append({"score_name": name, "method": method, "latents": len(mine),
                         "mean": mine.mean(), "median": mine.median(),
                         "control_mean": ctrl.loc[diff.index].mean(),
                         "margin": diff.mean() if len(diff) else np.nan, "margin_low": low,
                         "margin_high": high, "beyond_noise": bool(low > 0)})
    out = pd.DataFrame(rows, columns=["score_name", "method", "latents", "mean", "median",
                                      "control_mean", "margin", "margin_low", "margin_high",
                                      "beyond_noise"])
    leads = []
    for r in out.itertuples():
        others = out[(out["score_name"] == r.score_name) & (out["method"] != r.method)]
        others = others.dropna(subset=["margin"])
        if not len(others) or not np.isfinite(r.margin):
            leads.append(("", np.nan, np.nan, np.nan))
            continue
        other = others.loc[others["margin"].idxmax(), "method"]
        diff = (paired[r.score_name, r.method] - paired[r.score_name, other]).dropna()
        leads.append((other, diff.mean(), *bootstrap_interval(diff.to_numpy(), seed=seed)))
    lead = pd.DataFrame(leads, columns=["lead_over", "lead", "lead_low", "lead_high"])
    return pd.concat([out, lead], axis=1)


def method_verdict(comparison: pd.DataFrame) -> pd.DataFrame:
    """Which method explains best, as a small table with one row per score: the ``top``
    method (largest margin over its control), its ``margin`` and 95% interval, the ``best``
    (a method; ``"tie"`` when two are beyond noise but within noise of each other; ``"none"``
    when no method is beyond noise of its control) and the ``verdict`` in a few words (short,
    so that a notebook shows it whole)."""
    rows = []
    for name, group in comparison.groupby("score_name", sort=True):
        group = group[group["latents"] > 0].sort_values("margin", ascending=False,
                                                        na_position="last")
        if not len(group):
            continue
        beyond = group[group["beyond_noise"]]
        shown = beyond.iloc[0] if len(beyond) else group.iloc[0]
        rest = ", ".join(m for m in group["method"] if m != shown["method"])
        if not np.isfinite(shown["margin"]):
            best, verdict = "none", "no control: its noise is unknown"
        elif not len(beyond):
            best, verdict = "none", "no method beyond noise of its control"
        elif len(beyond) == 1:
            best = shown["method"]
            verdict = (f"{best} beyond noise; {rest} within noise" if rest
                       else f"{best} beyond noise (the only method)")
        elif shown["lead_low"] > 0:
            best, verdict = shown["method"], (f"{shown['method']} ahead of "
                                              f"{shown['lead_over']} beyond noise")
        else:
            best = "tie"
            verdict = f"{' and '.join(beyond['method'])} within noise of each other"
        rows.append({"score_name": name, "latents": int(shown["latents"]),
                     "top": shown["method"], "margin": shown["margin"],
                     "margin_low": shown["margin_low"], "margin_high": shown["margin_high"],
                     "best": best, "verdict": verdict})
    return pd.DataFrame(rows, columns=["score_name", "latents", "top", "margin", "margin_low",
                                       "margin_high", "best", "verdict"])


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
