"""Natural-language explanations of latents written by a language model, delphi-style.

For each latent the prompt shows its strongest contexts and contexts sampled from each
activation interval (notebook 06's :class:`~sae_nb.latents.stats.FeatureStats`), with the tokens
where the latent fires marked ``<<like this>>``, and the model names what they share: the chat
instruction for a capable model (``backend.chat``, e.g. behind an endpoint). A small model
(the embedded SmolLM2-135M) gets a few-shot *completion* prompt over the marked words of those
contexts (``Marked words: ... / Theme: ...``): asked in a chat it writes nonsense. See
EleutherAI's delphi (Paulo et al. 2024, "Automatically Interpreting Millions of Features in
Large Language Models").

Results are rows of the explanation table (``latent, method, explanation, score, score_name,
error``; method ``"llm"``), written per latent as they finish to a JSON-lines file under the
cache folder (``run_dir/explanations/<dictionary>/``), one file per identity (the dictionary,
the store, the backend and the settings; :mod:`sae_nb.explanations.results`), so another
explainer's labels are kept beside these: a rerun skips finished latents and retries failed
ones when asked. Each row records the store rows its explainer was shown (``shown_rows``),
which the scorers of :mod:`sae_nb.explanations.scoring` leave out.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from sae_nb.activations.store import IDENTITY, ActivationStore
from sae_nb.dictionaries.architectures import Dictionary, dictionary_hash
from sae_nb.explanations.backends import Backend, BackendError, LocalBackend
from sae_nb.explanations.results import COLUMNS, ExplanationError, ResultLog
from sae_nb.latents.contexts import latent_contexts

MARK_OPEN, MARK_CLOSE = "<<", ">>"


@dataclass(frozen=True)
class ExplainSettings:
    """What the explainer is shown: the marked words of these contexts (completion prompt),
    or the contexts themselves, their firing tokens marked (chat prompt)."""

    n_top: int = 8  # strongest contexts shown (stats.top_rows[:n_top])
    n_interval: int = 4  # interval-sampled contexts shown (the first sample of each interval)
    before: int = 8  # tokens shown before the firing token
    after: int = 2  # and after it
    n_words: int = 8  # distinct marked words listed on the "Marked words" line
    max_tokens: int = 16  # longest reply, in tokens (completion style; chat gets 3x)


# -- examples ---------------------------------------------------------------------------------
def marked_text(window: dict, mark: Sequence[bool] | None = None) -> str:
    """A window from :func:`~sae_nb.latents.contexts.latent_contexts` as one line, the tokens where
    ``mark`` is true (by default: where the latent fires) wrapped in ``<<>>``, their leading
    space outside the marks. Newlines and tabs become spaces."""
    if mark is None:
        mark = [a > 0 for a in window["acts"]]
    parts = []
    for token, marked in zip(window["tokens"], mark):
        token = re.sub(r"\s", " ", token)
        if marked and token.strip():
            core = token.lstrip(" ")
            parts.append(" " * (len(token) - len(core)) + MARK_OPEN + core + MARK_CLOSE)
        else:
            parts.append(token)
    return "".join(parts).strip()


def plain_text(window: dict) -> str:
    """A window as one unmarked line."""
    return marked_text(window, [False] * len(window["tokens"]))


def marked_words(windows: Iterable[dict], n: int) -> list[str]:
    """The ``n`` most frequent distinct tokens (stripped) where the latent fires, strongest
    activation first among equals."""
    count: dict[str, list[float]] = {}
    for w in windows:
        for token, act in zip(w["tokens"], w["acts"]):
            word = token.strip()
            if act > 0 and word:
                entry = count.setdefault(word, [0, 0.0])
                entry[0] += 1
                entry[1] = max(entry[1], act)
    return sorted(count, key=lambda w: (-count[w][0], -count[w][1]))[:n]


def explanation_rows(stats, latent: int, settings: ExplainSettings) -> np.ndarray:
    """The store rows shown to the explainer: the top ones, then the first sample of each
    activation interval (weakest interval first) that is not a top row."""
    top = stats.top_rows[latent][: settings.n_top]
    interval = stats.quantile_rows[latent][: settings.n_interval, 0]
    interval = interval[~np.isin(interval, top)]
    rows = np.concatenate([top, interval])
    return rows[rows >= 0]


def shown_rows(explanations: pd.DataFrame, stats,
               explain: ExplainSettings | None = None) -> dict[int, np.ndarray]:
    """Per latent of ``explanations``, the store rows its explainers were shown (which the
    scorers leave out): the union of the ``shown_rows`` its rows record (those of
    :func:`llm_explanations`), else the rows that ``explain`` (default
    :class:`ExplainSettings`) shows, :func:`explanation_rows`."""
    recorded: dict[int, set[int]] = {}
    if "shown_rows" in explanations.columns:
        for latent, cell in zip(explanations["latent"], explanations["shown_rows"]):
            rows = _row_list(cell)
            if rows is not None:
                recorded.setdefault(int(latent), set()).update(rows)
    out = {}
    for latent in sorted({int(f) for f in explanations["latent"]}):
        out[latent] = (np.array(sorted(recorded[latent]), dtype=np.int64) if latent in recorded
                       else explanation_rows(stats, latent, explain or ExplainSettings()))
    return out


def _row_list(cell) -> list[int] | None:
    """A ``shown_rows`` cell as a list of store rows: a list, an array or its JSON text (a
    table read back from CSV); None where nothing was recorded (NaN, None, "")."""
    value = cell
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else None
        except ValueError:
            value = cell
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        rows = [int(r) for r in value]
        whole = not isinstance(value, str) and all(float(r) == int(r) for r in value)
    except (TypeError, ValueError):
        whole = False
    if not whole:
        raise ExplanationError(f"shown_rows={cell!r} is not a list of store rows: pass the "
                               f"table llm_explanations returned, or drop its shown_rows "
                               f"column and pass explain= with the explainer's settings.")
    return rows


def explanation_windows(store: ActivationStore, dictionary: Dictionary, stats, latent: int,
                        tokenizer, settings: ExplainSettings) -> list[dict]:
    rows = explanation_rows(stats, latent, settings)
    return latent_contexts(store, dictionary, latent, rows, tokenizer, before=settings.before,
                           after=settings.after, stats=stats)


# -- prompts ----------------------------------------------------------------------------------
# Solved examples for the few-shot completion prompt. Five unlike themes: with three, the 135M
# model copied one onto unrelated latents ("animals" for the Pacific railways, the Philippines).
FEW_SHOT = (("tax, taxes, tariff", "taxes"), ("Monday, March, 1990", "dates"),
            ("not, never, no", "negation"), ("France, England, Mexico", "countries"),
            ("would, could, might", "modal verbs"))


def completion_prompt(windows: Sequence[dict], words: Sequence[str]) -> str:
    """The few-shot completion prompt for small models; the reply completes ``Theme:``.

    It lists the marked words only: with the marked snippets too, the 135M model's labels were
    no better (4 hand-checked latents) and the prompt three times longer. ``windows`` are
    unused here and kept for the signature shared with :func:`chat_prompt`."""
    blocks = ["Each block names the theme that the marked words share."]
    blocks += [f"Marked words: {w}\nTheme: {t}" for w, t in FEW_SHOT]
    blocks.append(f"Marked words: {', '.join(words)}\nTheme:")
    return "\n\n".join(blocks)


def chat_prompt(windows: Sequence[dict], words: Sequence[str]) -> str:
    """The instruction for capable chat models (delphi's explainer, shortened)."""
    lines = "\n".join(f"{i + 1}. {marked_text(w)}" for i, w in enumerate(windows))
    return ("You are studying one latent feature of a language model. Below are text excerpts "
            "where it activates; the tokens it activates on are marked <<like this>>. Say in a "
            "few words what the feature detects: the common theme or pattern of the marked "
            "tokens, taking their context into account. Reply with the explanation only, on "
            f"one line, without quotes.\n\nExcerpts:\n{lines}\n\nMost frequent marked tokens: "
            f"{', '.join(words)}")


def parse_explanation(reply: str) -> str:
    """The label in a reply: its first non-empty line, without an ``Explanation:``/``Theme:``
    prefix, quotes or a final period; a :class:`BackendError` when nothing with a letter is left."""
    line = next((ln.strip() for ln in reply.splitlines() if ln.strip()), "")
    line = re.sub(r"^(explanation|theme|answer)\s*:\s*", "", line, flags=re.IGNORECASE)
    line = line.strip(" \"'`*").rstrip(".").strip()[:120]
    if not re.search(r"[A-Za-z]", line):
        raise BackendError(f"nonsense reply: {reply[:80]!r}")
    return line


# -- the cache (sae_nb.explanations.results) --------------------------------------------------
def store_identity(store: ActivationStore) -> dict:
    """The store's rows as a cache key: its identity fields and row count, not its path."""
    return {"store_manifest": {k: store.manifest.get(k) for k in IDENTITY}, "rows": len(store)}


def text_key(*parts: Any) -> str:
    """A short key for a record (latent, method, explanation text ...)."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def run_cached(items: Sequence[Any], key: Callable[[Any], str], work: Callable[[Any], dict],
               log_: ResultLog | None, retry_failed: bool, progress: bool,
               desc: str) -> list[dict]:
    """``work(item)`` for each item not already finished in ``log_`` (or failed, when
    ``retry_failed``), each record appended as it finishes; records in the order of ``items``."""
    out = []
    for item in tqdm(items, desc=desc, disable=not progress):
        k = key(item)
        record = log_.get(k) if log_ is not None else None
        if record is None or (retry_failed and record.get("error")):
            record = {"key": k, **work(item)}
            if log_ is not None:
                log_.append(record)
        out.append(record)
    return out


def table(records: Sequence[dict]) -> pd.DataFrame:
    """The explanation table of ``records``: the contract's columns first, then extras."""
    df = pd.DataFrame([{k: v for k, v in r.items() if k != "key"} for r in records])
    if df.empty:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in
                             zip(COLUMNS, [int, str, str, float, str, str])})
    df["score"] = df["score"].astype(float)
    return df[[*COLUMNS, *(c for c in df.columns if c not in COLUMNS)]].reset_index(drop=True)


def resolve_tokenizer(tokenizer, backend: Backend, store: ActivationStore):
    """The tokenizer of the store's model: ``tokenizer``, else the local backend's when it
    runs the store's model."""
    if tokenizer is not None:
        return tokenizer
    if isinstance(backend, LocalBackend) and backend.name == f"local:{store.manifest['model']}":
        return backend.tokenizer
    raise ValueError(f"Pass tokenizer=, the tokenizer of the store's model "
                     f"{store.manifest['model']!r} (model.tokenizer), to decode its tokens.")


# -- explanations -----------------------------------------------------------------------------
def llm_explanations(store: ActivationStore, dictionary: Dictionary, stats,
                     latents: Iterable[int], tokenizer=None, backend: Backend | None = None,
                     cache: str | Path | None = None, seed: int = 0,
                     settings: ExplainSettings | None = None, retry_failed: bool = False,
                     progress: bool = False) -> pd.DataFrame:
    """An explanation of each latent in ``latents`` from ``backend`` (default: the embedded
    SmolLM2-135M, :class:`LocalBackend`), as explanation-table rows with method ``"llm"``.

    ``stats`` are the :func:`~sae_nb.latents.stats.feature_stats` of this dictionary and store;
    ``tokenizer`` the store's model's (taken from a local backend running that model when
    omitted). A failed latent (backend error, timeout, empty or nonsense reply) gets an
    ``error`` and an empty explanation; the run goes on. With ``cache`` (a folder, see
    :func:`sae_nb.explanations.tables.explanations_folder`) every latent's row is saved as it
    finishes and a rerun with the same dictionary, store, backend and settings skips it;
    failed ones are retried only with ``retry_failed``; another backend or other settings
    write a file of their own and leave these rows in place. ``seed`` orders the
    interval-sampled snippets. Extra columns: ``backend``, ``reply`` (the raw reply),
    ``n_examples``, ``shown_rows`` (the store rows shown, which the scorers leave out).
    """
    backend = backend if backend is not None else LocalBackend()
    tokenizer = resolve_tokenizer(tokenizer, backend, store)
    settings = settings or ExplainSettings()
    latents = [int(f) for f in latents]
    identity = {"dictionary": dictionary_hash(dictionary), **store_identity(store),
                "backend": backend.settings(), "settings": asdict(settings), "seed": seed}
    results = ResultLog(cache, "llm", identity) if cache is not None else None

    def work(latent: int) -> dict:
        return explain_latent(store, dictionary, stats, latent, tokenizer, backend, settings,
                              seed)

    records = run_cached(latents, lambda f: str(f), work, results, retry_failed, progress,
                         "explaining")
    return table(records)


def explain_latent(store: ActivationStore, dictionary: Dictionary, stats, latent: int,
                   tokenizer, backend: Backend, settings: ExplainSettings, seed: int) -> dict:
    """One latent's explanation row; a backend failure is recorded in ``error``."""
    windows = explanation_windows(store, dictionary, stats, latent, tokenizer, settings)
    row = {"latent": latent, "method": "llm", "explanation": "", "score": math.nan,
           "score_name": "", "error": "", "backend": backend.name, "reply": "",
           "n_examples": len(windows), "shown_rows": sorted(w["row"] for w in windows)}
    if not windows:
        row["error"] = "the latent never fires in this store"
        return row
    top, rest = windows[: settings.n_top], windows[settings.n_top :]
    rest = [rest[i] for i in np.random.default_rng([seed, latent]).permutation(len(rest))]
    windows = top + rest
    words = marked_words(windows, settings.n_words)
    if backend.chat:
        prompt, max_tokens = chat_prompt(windows, words), 3 * settings.max_tokens
    else:
        prompt, max_tokens = completion_prompt(windows, words), settings.max_tokens
    try:
        row["reply"] = backend.complete(prompt, max_tokens=max_tokens, stop=("\n",))
        row["explanation"] = parse_explanation(row["reply"])
    except BackendError as err:
        row["error"] = str(err)
    return row
