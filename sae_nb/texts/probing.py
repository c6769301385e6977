"""Linear probes on pooled activations and on a dictionary's codes of them.

A probe asks how much of a label a representation holds linearly: logistic regression on the
raw pooled activations, on all latents, and on the k latents whose class means differ most
(chosen on the train split only). Held-out accuracy and ROC AUC sit beside the majority-class
baseline. The default data are the human-rated movie review snippets of Hutto & Gilbert,
"VADER" (ICWSM 2014), labeled by the sign of the mean rating.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sae_nb.activations.corpora import CorpusError, read_text_table
from sae_nb.activations.extract import pooled_activations
from sae_nb.activations.models import Model, hf_model, model_fingerprint
from sae_nb.activations.sites import n_layers
from sae_nb.dictionaries.architectures import Dictionary, dictionary_hash, dictionary_site
from sae_nb.texts.codes import pooled_token_codes
from sae_nb.util.io import atomic_save_npz, write_table
from sae_nb.util.threads import one_thread

logger = logging.getLogger(__name__)

VADER_SPEC = "vaderSentiment==3.3.2"
VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
MOVIE_FILE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
DEFAULT_CACHE = Path(__file__).resolve().parents[2] / "data" / "cache"
K_VALUES = (1, 2, 5, 10, 20, 50)


class LabelError(CorpusError):
    """A labeled data set that cannot be probed; the message says why and what to do."""


# ---------------------------------------------------------------- data


def fetch_vader(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """The vaderSentiment source distribution, downloaded once with pip into ``cache_dir``."""
    cache_dir = Path(cache_dir)
    sdist = cache_dir / VADER_SDIST
    if not sdist.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               VADER_SPEC, "-d", str(cache_dir)]
        logger.info("Downloading %s (source distribution) into %s", VADER_SPEC, cache_dir)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not sdist.exists():
            raise RuntimeError(f"Could not download {VADER_SPEC} with {' '.join(cmd)!r}:\n"
                               f"{done.stderr[-2000:]}\nPlace {VADER_SDIST} in {cache_dir} "
                               f"by hand, or pass a CSV with text and label columns.")
    return sdist


def parse_vader(sdist: str | Path, member: str = MOVIE_FILE) -> pd.DataFrame:
    """Rows of a ``*_GroundTruth.txt`` file inside the sdist: text, rating, label (by sign).

    Ratings of exactly zero carry no sentiment and are dropped."""
    with tarfile.open(sdist) as outer:
        inner_bytes = outer.extractfile(VADER_INNER).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        raw = inner.extractfile(member).read().decode("latin-1")
    rows = []
    for line in raw.splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or not parts[1].strip():
            continue
        rating = float(parts[1])
        if rating != 0:
            rows.append((parts[2].strip(), rating, "positive" if rating > 0 else "negative"))
    return pd.DataFrame(rows, columns=["text", "rating", "label"])


def load_labeled(source: str | Path = "movie_reviews", text_column: str = "text",
                 label_column: str = "label", cache_dir: str | Path = DEFAULT_CACHE,
                 encoding: str = "utf-8") -> pd.DataFrame:
    """Labeled texts as a DataFrame with columns ``text`` and ``label`` (strings).

    ``source`` is ``"movie_reviews"`` (the VADER snippets, fetched and parsed once, cached as a
    CSV) or a CSV file with a text and a label column, read by
    :func:`sae_nb.activations.corpora.read_text_table` (which names bad rows by file line)."""
    if str(source) == "movie_reviews":
        csv = Path(cache_dir) / "movie_reviews.csv"
        if not csv.exists():
            write_table(parse_vader(fetch_vader(cache_dir)), csv)  # atomic: never half a cache
        source, text_column, label_column, encoding = csv, "text", "label", "utf-8"
    if not Path(source).exists():
        raise LabelError(f"No labeled data at {str(source)!r}: pass 'movie_reviews' or a CSV "
                         f"file with text and label columns.")
    table = read_text_table(source, text_column, label_column, encoding)
    return check_labeled(table[["text", "label"]])


def check_labeled(df: pd.DataFrame, text_column: str = "text",
                  label_column: str = "label") -> pd.DataFrame:
    """Validate and normalise to columns ``text`` and ``label``; raise LabelError otherwise."""
    for kind, col in (("text", text_column), ("label", label_column)):
        if col not in df.columns:
            raise LabelError(f"No {kind} column {col!r}; the columns are {list(df.columns)}. "
                             f"Pass {kind}_column=... naming one of them.")
    missing = df.index[df[label_column].isna()].tolist()
    if missing:
        raise LabelError(f"{len(missing)} rows have no label in column {label_column!r} "
                         f"(rows {missing[:20]}); fill or drop them.")
    out = pd.DataFrame({"text": df[text_column].fillna("").astype(str),
                        "label": df[label_column].astype(str)}).reset_index(drop=True)
    counts = out["label"].value_counts()
    if len(counts) < 2:
        raise LabelError(f"Column {label_column!r} holds {len(counts)} class(es) "
                         f"({counts.to_dict()} rows per class); a probe needs two or more.")
    return out


def subsample(df: pd.DataFrame, n: int | None, seed: int = 0) -> pd.DataFrame:
    """At most ``n`` rows, stratified by label (all rows when ``n`` is None or large)."""
    if n is None or n >= len(df):
        return df.reset_index(drop=True)
    try:
        keep, _ = train_test_split(df, train_size=n, stratify=df["label"], random_state=seed)
    except ValueError as err:  # n below the number of classes, or a class of one row
        raise LabelError(f"Cannot draw a stratified subsample of n={n} from "
                         f"{_counts(df['label'])} rows per class ({err}); raise n or drop "
                         f"the smallest classes.") from None
    return keep.reset_index(drop=True)


def _counts(labels) -> dict[str, int]:
    values, counts = np.unique(np.asarray(labels).astype(str), return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}


def split_labeled(labels, test_size: float = 0.25, seed: int = 0,
                  min_per_class: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train and test row indices. Every class needs ``min_per_class`` rows."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise LabelError(f"The labels hold one class only ({_counts(labels)} rows); a probe "
                         f"needs two or more classes.")
    small = {str(c): int(n) for c, n in zip(classes, counts) if n < min_per_class}
    if small:
        raise LabelError(f"Too few rows per class for a train/test split: {small} "
                         f"(need {min_per_class} each); add rows or drop those classes.")
    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=test_size, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(test)


# ---------------------------------------------------------------- features


def probe_features(model: Model, dictionary: Dictionary, texts: list[str],
                   site: str | None = None, pool: str = "mean", cache: str | Path | None = None,
                   batch_size: int = 32, max_len: int = 128,
                   run_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pooled activations ``(N, D)`` at the site and pooled per-token codes ``(N, F)``: every
    token is encoded, then the codes are pooled (:func:`sae_nb.texts.codes.pooled_token_codes`).

    With ``run_dir`` they are cached under ``run_dir/probing/`` (one file per configuration,
    so switching back and forth between dictionaries reads each from disk); with ``cache`` at
    that ``.npz`` path. A cache is used only when everything the arrays depend on is the
    same: the model (:func:`sae_nb.activations.models.model_fingerprint`), the dictionary's
    weights (:func:`sae_nb.dictionaries.architectures.dictionary_hash`), site, pooling,
    truncation and the texts."""
    site = dictionary_site(dictionary, site)
    texts = _check_texts(texts)
    key = {"model": model_fingerprint(model), "dictionary": dictionary_hash(dictionary),
           "site": site, "pool": pool, "max_len": max_len, "prepend_bos": True}
    cache = cache or cache_path(run_dir, "features", key, texts)
    saved = _read_cache(cache, texts, key)
    if saved is not None:
        return saved["raw"], saved["codes"]
    with torch.no_grad():
        out = pooled_token_codes(model, dictionary, texts, site=site, pool=pool,
                                 batch_size=batch_size, max_len=max_len)
    raw, codes = out.acts.numpy(), out.codes.numpy()
    _write_cache(cache, texts, key, {"raw": raw, "codes": codes})
    return raw, codes


def _check_texts(texts) -> list[str]:
    texts = list(texts)
    if not texts:
        raise LabelError("Got no texts to pool; pass a list of at least one string.")
    return texts


def _key_json(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def cache_path(run_dir: str | Path | None, kind: str, key: dict,
               texts: list[str]) -> Path | None:
    """``run_dir/probing/<kind>_<hash>.npz``: a file name that changes with everything the
    cached arrays depend on (``key`` and the texts); None without a run folder."""
    if run_dir is None:
        return None
    h = hashlib.sha256(_key_json(key).encode())
    for text in texts:
        h.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return Path(run_dir) / "probing" / f"{kind}_{h.hexdigest()[:16]}.npz"


def _read_cache(cache: str | Path | None, texts: list[str], key: dict) -> dict | None:
    """The arrays saved at ``cache`` for these texts and this key, or None when there is no
    cache file, it holds something else, or it cannot be read (then it is recomputed)."""
    if not cache or not Path(cache).exists():
        return None
    try:
        with np.load(cache, allow_pickle=False) as saved:
            arrays = dict(saved)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        logger.warning("The cache at %s cannot be read (%s); recomputing", cache, err)
        return None
    if ("key" in arrays and str(arrays["key"]) == _key_json(key)
            and list(arrays["texts"]) == list(texts)):
        return arrays
    logger.info("The cache at %s is for another model, dictionary, texts or settings; "
                "recomputing", cache)
    return None


def _write_cache(cache: str | Path | None, texts: list[str], key: dict,
                 arrays: dict[str, np.ndarray]) -> None:
    """Save ``arrays`` with the texts and key at ``cache`` (atomically), if a path is given."""
    if cache:
        atomic_save_npz(cache, texts=np.array(list(texts), dtype=str),
                        key=np.array(_key_json(key)), **arrays)


# ---------------------------------------------------------------- probes


@dataclass
class ProbeResult:
    """One fitted probe: its held-out scores and the pipeline (scaler + logistic regression)."""

    name: str
    accuracy: float
    auc: float
    pipeline: object
    columns: np.ndarray | None = None  # the feature columns it reads (None: all)


def fit_probe(X_train: np.ndarray, y_train, X_test: np.ndarray, y_test, name: str = "probe",
              columns: np.ndarray | None = None, seed: int = 0) -> ProbeResult:
    """StandardScaler + LogisticRegressionCV on the train split, scored on the test split."""
    if columns is not None:
        X_train, X_test = X_train[:, columns], X_test[:, columns]
    train_counts = _counts(y_train)
    if len(train_counts) < 2 or min(train_counts.values()) < 2:
        raise LabelError(f"Probe {name!r}: the train split has {train_counts} rows per class; "
                         f"it needs two or more classes with at least 2 rows each.")
    if len(y_test) == 0:
        raise LabelError(f"Probe {name!r}: the test split is empty; give it rows.")
    n_min = min(train_counts.values())
    # Six strengths of an L2 penalty, chosen by 3-fold log loss on the train split only.
    clf = LogisticRegressionCV(Cs=6, cv=max(2, min(3, n_min)), max_iter=2000, l1_ratios=(0.0,),
                               scoring="neg_log_loss", use_legacy_attributes=False,
                               random_state=seed)
    with one_thread():  # small matrices: a BLAS pool made each fit 60x slower here
        pipe = make_pipeline(StandardScaler(), clf).fit(X_train, y_train)
    proba = pipe.predict_proba(X_test)
    if proba.shape[1] == 2:
        auc = roc_auc_score(y_test, proba[:, 1])
    else:
        auc = roc_auc_score(y_test, proba, multi_class="ovr", average="macro",
                            labels=pipe.classes_)
    return ProbeResult(name, float(accuracy_score(y_test, pipe.predict(X_test))), float(auc),
                       pipe, columns)


def class_mean_difference(codes: np.ndarray, labels, standardize: bool = True) -> np.ndarray:
    """Per latent, the largest |mean in a class - mean outside it| over classes ``(F,)``.

    With ``standardize`` (the default) each latent is first divided by its standard deviation,
    as the probes' own StandardScaler does: otherwise a dense latent of large magnitude ranks
    first on a difference that is small beside its spread (on 2,000 movie snippets the top
    raw-difference latent scored 0.46 held-out, the top standardized one 0.55). Latents that
    never vary score 0."""
    labels = np.asarray(labels)
    codes = np.asarray(codes, dtype=np.float64)
    if standardize:
        std = codes.std(0)
        codes = codes / np.where(std > 0, std, np.inf)
    diffs = [np.abs(codes[labels == c].mean(0) - codes[labels != c].mean(0))
             for c in np.unique(labels)]
    return np.max(diffs, axis=0)


def top_latents(codes: np.ndarray, labels, k: int, standardize: bool = True) -> np.ndarray:
    """The ``k`` latents with the largest class-mean difference, best first."""
    score = class_mean_difference(codes, labels, standardize)
    return np.argsort(-score, kind="stable")[:k]


def majority_baseline(y_train, y_test) -> float:
    """Held-out accuracy of always answering the train split's most common class."""
    values, counts = np.unique(y_train, return_counts=True)
    return float(np.mean(np.asarray(y_test) == values[counts.argmax()]))


def run_probes(raw: np.ndarray, codes: np.ndarray, labels, train: np.ndarray,
               test: np.ndarray, k_values=K_VALUES, seed: int = 0,
               ) -> tuple[pd.DataFrame, dict[str, ProbeResult]]:
    """Raw, all-latent and top-k sparse probes; a table of held-out scores and the probes."""
    y = np.asarray(labels)
    results = [fit_probe(raw[train], y[train], raw[test], y[test], "raw", seed=seed),
               fit_probe(codes[train], y[train], codes[test], y[test], "all latents", seed=seed)]
    order = top_latents(codes[train], y[train], max(k_values, default=0))
    for k in k_values:
        if k <= codes.shape[1]:
            results.append(fit_probe(codes[train], y[train], codes[test], y[test],
                                     f"top {k} latents", columns=order[:k], seed=seed))
    baseline = majority_baseline(y[train], y[test])
    table = pd.DataFrame([{"probe": r.name, "k": len(r.columns) if r.columns is not None
                           else None, "accuracy": r.accuracy, "roc_auc": r.auc,
                           "majority_baseline": baseline} for r in results])
    return table, {r.name: r for r in results}


def probe_weights(probe: ProbeResult) -> pd.DataFrame:
    """A fitted probe's weights on its (standardised) columns, one column per class.

    For two classes scikit-learn keeps one weight vector, for the second class; the first
    class gets its negative. A positive weight means "this latent speaks for this class"."""
    clf = probe.pipeline[-1]
    classes = [str(c) for c in clf.classes_]
    coef = clf.coef_  # (1, k) for two classes, (n_classes, k) beyond
    if len(classes) == 2:
        coef = np.vstack([-coef[0], coef[0]])
    columns = probe.columns if probe.columns is not None else np.arange(coef.shape[1])
    return pd.DataFrame(coef.T, index=pd.Index(columns, name="latent"), columns=classes)


def class_latents(probe: ProbeResult, codes_train: np.ndarray, y_train, codes_test: np.ndarray,
                  y_test, texts_test: list[str], top: int = 5,
                  n_examples: int = 3) -> pd.DataFrame:
    """Per class, the latents that speak for it: the sparse probe's largest positive weights
    for the class, with the latent's class-mean difference on the train split, its firing
    rates on the held-out split (overall and within the class) and the held-out texts where it
    fires most.

    Use a sparse probe (``probes["top 20 latents"]``): its latents were chosen by class-mean
    difference, so a latent that fires once or twice in the train split, which a standardised
    all-latent probe can weight heavily, is not among them."""
    y_train, y_test = np.asarray(y_train).astype(str), np.asarray(y_test).astype(str)
    weights = probe_weights(probe)
    rows = []
    for c in weights.columns:
        inside, outside = codes_train[y_train == c], codes_train[y_train != c]
        for latent, weight in weights[c].sort_values(ascending=False).head(top).items():
            if weight <= 0:
                break
            acts = codes_test[:, latent]
            best = np.argsort(-acts, kind="stable")[:n_examples]
            rows.append({"class": c, "latent": int(latent), "weight": float(weight),
                         "mean_difference": float(inside[:, latent].mean()
                                                  - outside[:, latent].mean()),
                         "firing_rate": float((acts > 0).mean()),
                         "firing_rate_in_class": float((acts[y_test == c] > 0).mean()),
                         "top_texts": [texts_test[i] for i in best if acts[i] > 0]})
    return pd.DataFrame(rows)


def sweep_sites(model: Model, sites: str | list[str]) -> list[str]:
    """Site names for a layer sweep: a list as given, or a site kind (``"resid_out"``,
    ``"mlp_out"``, ...) for that site at every layer of the model."""
    if not isinstance(sites, str):
        return list(sites)
    kinds = ("resid_out", "attn_out", "mlp_out", "mlp_in")
    if sites not in kinds:
        raise ValueError(f"Sweep {sites!r}: pass a list of site names or one of the kinds "
                         f"{kinds} (that site at every layer).")
    return [f"{sites}_layer{i}" for i in range(n_layers(hf_model(model)))]


def layer_sweep(model: Model, texts: list[str], labels, train: np.ndarray, test: np.ndarray,
                sites: str | list[str], pool: str = "mean", seed: int = 0,
                batch_size: int = 32, cache: str | Path | None = None,
                run_dir: str | Path | None = None) -> pd.DataFrame:
    """Raw-probe held-out accuracy and ROC AUC at several sites (a list, or a site kind for
    every layer: :func:`sweep_sites`), all read in one forward pass over the texts.

    The pooled activations are cached as :func:`sweep_activations` says."""
    names = sweep_sites(model, sites)
    acts = sweep_activations(model, texts, names, pool, batch_size, cache=cache,
                             run_dir=run_dir)
    y = np.asarray(labels)
    rows = []
    for site in names:
        X = acts[site]
        r = fit_probe(X[train], y[train], X[test], y[test], site, seed=seed)
        rows.append({"site": site, "accuracy": r.accuracy, "roc_auc": r.auc,
                     "majority_baseline": majority_baseline(y[train], y[test])})
    return pd.DataFrame(rows)


def sweep_activations(model: Model, texts: list[str], sites: list[str], pool: str = "mean",
                      batch_size: int = 32, max_len: int = 128,
                      cache: str | Path | None = None,
                      run_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """``{site: (N, D)}`` pooled activations, one forward pass for all sites. Cached under
    ``run_dir/probing/`` or at ``cache`` (an ``.npz`` path), keyed by the model's
    fingerprint, the sites, pooling, truncation and the texts."""
    texts = _check_texts(texts)
    key = {"model": model_fingerprint(model), "sites": list(sites), "pool": pool,
           "max_len": max_len, "prepend_bos": True}
    cache = cache or cache_path(run_dir, "sweep", key, texts)
    saved = _read_cache(cache, texts, key)
    if saved is not None:
        return {site: saved[f"site_{i}"] for i, site in enumerate(sites)}
    acts = pooled_activations(model, texts, sites, pool=pool, batch_size=batch_size,
                              max_len=max_len)
    acts = {site: acts[site].numpy() for site in sites}
    _write_cache(cache, texts, key, {f"site_{i}": acts[site] for i, site in enumerate(sites)})
    return acts
