"""What the feature explorer lists and how it orders them, without any widget.

The slider's orders (:func:`latent_order`, dense and outlier latents last), the latents to
export (:func:`top_latents`), the latents firing most on a text (:func:`strongest_on_text`),
search over the text around each latent's top activations (:class:`LatentSearch`), a latent's
nearest latents by decoder direction (:func:`nearest_latents`), its family from notebook 05's
``clustering/latents.csv`` (:func:`load_families`), and each latent's caption with its best
explanation and score in front (:func:`explained_captions`).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from sae_nb.activations.corpora import token_strings
from sae_nb.dictionaries.architectures import Dictionary
from sae_nb.explanations.tables import (
    as_explanations,
    best_caption,
    best_explanations,
)

SORTS = ("index", "density", "max activation")
# A first look skips the latents that fire on more than this fraction of tokens: they say little
# about any one text, and sorted by density they would fill the first ranks.
DENSE = 0.05
# ... and those whose largest activation is an outlier among the alive latents: the robust
# z-score of log(max) (median and MAD) above this. On the default dictionary's smoke store 32
# latents sit 4.8-6.1 MADs above the median (max 0.76-1.37 against a median of 0.08; the next
# is at 3.9): near-copies that fire on the space before digits.
OUTLIER_Z = 4.5


def unusual_latents(stats, dense: float = DENSE, outlier_z: float = OUTLIER_Z) -> np.ndarray:
    """(F,) bool: latents that are dense (``density > dense``) or outliers of max activation
    (robust z-score of ``log(max_act)`` over the alive latents above ``outlier_z``)."""
    density = np.asarray(stats.density, dtype=np.float64)
    max_act = np.asarray(stats.max_act, dtype=np.float64)
    alive = max_act > 0
    log_max = np.log(np.where(alive, max_act, 1.0))
    center = np.median(log_max[alive]) if alive.any() else 0.0
    spread = 1.4826 * np.median(np.abs(log_max[alive] - center)) if alive.any() else 0.0
    outlier = alive & ((log_max - center) > outlier_z * max(spread, 1e-12))
    return (density > dense) | outlier


def latent_order(stats, sort: str, skip_unusual: bool = True) -> np.ndarray:
    """Latents in display order: by index, or by density / max activation, largest first.

    With ``skip_unusual`` the dense and outlier latents (:func:`unusual_latents`) come after all
    the others, in the same order among themselves."""
    if sort == "index":
        order = np.arange(stats.d_sae)
    else:
        key = {"density": stats.density, "max activation": stats.max_act}.get(sort)
        if key is None:
            raise ValueError(f"sort={sort!r}; choose one of {SORTS}.")
        order = np.argsort(-np.asarray(key, dtype=np.float64), kind="stable")
    if skip_unusual:
        order = order[np.argsort(unusual_latents(stats)[order], kind="stable")]
    return order


def strongest_on_text(codes: np.ndarray, max_act, n: int = 10
                      ) -> tuple[list[int], np.ndarray, np.ndarray]:
    """``(latents, peak, relative)``: the ``n`` latents firing most on a text's codes ``(T, F)``,
    ranked by their peak over their max in the store (``relative``, unclipped: above 1 is
    stronger than anywhere in the store; inf for a latent that never fired there, ranked last),
    ties by the peak. By raw value a few dense latents of large scale would top every text."""
    codes = np.asarray(codes, dtype=np.float64)
    max_act = np.asarray(max_act, dtype=np.float64)
    peak = codes.max(0) if len(codes) else np.zeros(len(max_act))  # (F,)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(max_act > 0, peak / np.where(max_act > 0, max_act, 1.0), np.inf)
    finite = np.where(np.isfinite(relative), relative, -1.0)  # never-fired latents last
    order = np.lexsort((-peak, -finite))
    return [int(i) for i in order if peak[i] > 0][:n], peak, relative


def top_latents(stats, n: int, sort: str = "max activation", skip_unusual: bool = True
                ) -> list[int]:
    """The first ``n`` latents that fired at least once, in ``sort`` order (see
    :func:`latent_order`): e.g. the latents to export to dashboards."""
    return [int(i) for i in latent_order(stats, sort, skip_unusual) if stats.density[i] > 0][:n]


# A caption whose commonest token is a word: a space, then 3 letters or more ("top tokens: ·tax").
WORD_CAPTION = re.compile(r"^top tokens: ·[A-Za-z]{3,}")


def opening_latent(order, captions: dict[int, str]) -> int:
    """The latent an explorer opens on: the first of ``order`` whose caption's commonest token
    is a word (:data:`WORD_CAPTION`), not a space, a digit or a word piece; else the first."""
    return next((int(i) for i in order if WORD_CAPTION.match(captions.get(int(i), ""))),
                int(order[0]))


class LatentSearch:
    """Finds latents by the text around their strongest activations.

    For each latent, the token at each top row scores 2 when it contains the query (case
    folded) and the ``window`` tokens before it plus that token score 1; a promoted output
    token (with logit effects) scores 1. Ties go to the more selective latent: the larger share
    of its top rows on exactly the query's token, then the better ``explanation_scores`` (per
    latent, NaN for none), then the fewer tokens it fires on. Built once, on the first query."""

    def __init__(self, stats, store, tokenizer, logit_effects=None, window: int = 4,
                 explanation_scores=None):
        rows = np.asarray(stats.top_rows)  # (F, n_top)
        valid = rows >= 0
        flat = np.where(valid, rows, 0).reshape(-1)
        around = flat[:, None] + np.arange(-window, 1)  # (F * n_top, window + 1)
        inside = around >= 0
        index = store.index(np.maximum(around, 0).reshape(-1)).reshape(around.shape)
        same = inside & (index["context"] == index["context"][:, -1:])  # last column: the row
        ids = np.where(same, index["token"], -1)
        uniq = [int(i) for i in np.unique(ids) if i >= 0]
        vocab = {i: s.lower() for i, s in zip(uniq, token_strings(tokenizer, uniq))}
        vocab[-1] = ""
        F, n_top = rows.shape
        self.centers = [[vocab[int(ids[f * n_top + j, -1])] for j in range(n_top) if valid[f, j]]
                        for f in range(F)]
        self.windows = [["".join(vocab[int(t)] for t in ids[f * n_top + j])
                         for j in range(n_top) if valid[f, j]] for f in range(F)]
        self.density = np.asarray(stats.density, dtype=np.float64)
        self.explanation_scores = (np.full(F, np.nan) if explanation_scores is None
                                   else np.asarray(explanation_scores, dtype=np.float64))
        self.promoted = [[] for _ in range(F)]
        if logit_effects is not None:
            top_ids = np.asarray(logit_effects.top_ids)
            self.promoted = [[s.lower() for s in token_strings(tokenizer, top_ids[f, :10])]
                             for f in range(F)]

    def __call__(self, query: str, limit: int = 20) -> list[tuple[int, int]]:
        """``(latent, score)`` of the best-matching latents, best first; [] for no query."""
        if not query.strip():
            return []
        q = query.lower()  # spaces kept: " con" finds word starts
        scores = [2 * sum(q in t for t in c) + sum(q in w for w in ws) + sum(q in p for p in ps)
                  for c, ws, ps in zip(self.centers, self.windows, self.promoted)]
        scores = np.asarray(scores)
        hits = np.nonzero(scores)[0]
        self.n_found = len(hits)  # all matches, before the limit
        exact = np.array([sum(t == q for t in self.centers[i]) / max(len(self.centers[i]), 1)
                          for i in hits])
        explained = np.nan_to_num(self.explanation_scores[hits], nan=-np.inf)
        best = hits[np.lexsort((self.density[hits], -explained, -exact, -scores[hits]))][:limit]
        return [(int(i), int(scores[i])) for i in best]


def unit_decoder_rows(dictionary: Dictionary) -> np.ndarray:
    """``(F, D)`` float32: the dictionary's decoder rows scaled to unit norm (0 rows stay 0)."""
    w = dictionary.W_dec.detach().float().cpu().numpy()  # (F, D)
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    return w / np.where(norms > 0, norms, 1.0)


def nearest_latents(unit_rows: np.ndarray, latent: int, n: int = 5) -> list[tuple[int, float]]:
    """``(latent, cosine)`` of the ``n`` latents whose decoder directions are closest to
    ``latent``'s (``unit_rows`` from :func:`unit_decoder_rows`), closest first."""
    cos = unit_rows @ unit_rows[int(latent)]  # (F,)
    cos[int(latent)] = -np.inf
    best = np.argpartition(-cos, min(n, len(cos) - 1))[:n]
    best = best[np.argsort(-cos[best], kind="stable")]
    return [(int(i), float(cos[i])) for i in best]


def load_families(path: str | Path, column: str = "cofiring_family") -> dict[int, list[int]]:
    """Per latent, the members of its family (itself included, in the file's order), from
    notebook 05's ``clustering/latents.csv``; {} when the file is absent. Families of one latent
    are left out."""
    path = Path(path)
    if not path.exists():
        return {}
    table = pd.read_csv(path)
    missing = {"latent", column} - set(table.columns)
    if missing:
        raise ValueError(f"{str(path)!r} has no column {sorted(missing)}; pass notebook 05's "
                         f"clustering/latents.csv (columns latent, {column}, ...).")
    out: dict[int, list[int]] = {}
    for _, group in table.dropna(subset=[column]).groupby(column, sort=False):
        members = [int(m) for m in group["latent"]]
        if len(members) > 1:
            out.update({m: members for m in members})
    return out


def best_of(explanations) -> pd.DataFrame | None:
    """Each latent's best explanation (:func:`sae_nb.explanations.tables.best_explanations`)
    of a table or a folder of cached tables; None for None."""
    table = as_explanations(explanations)
    return None if table is None else best_explanations(table)


def scores_of(best: pd.DataFrame | None, d_sae: int) -> np.ndarray:
    """(F,) each latent's best explanation score (:func:`best_of`), NaN where it has none."""
    scores = np.full(d_sae, np.nan)
    if best is not None and len(best):
        scores[best["latent"].to_numpy(int)] = best["score"].to_numpy(float)
    return scores


def explained_captions(captions: dict[int, str], best: pd.DataFrame | None,
                       max_chars: int = 60) -> dict[int, str]:
    """``captions`` (top tokens) with each latent's best explanation (cut to ``max_chars``,
    so menus stay readable) and score in front: ``'tax words (f1 0.92) · " tax", " taxes"'``;
    latents without one keep their caption."""
    if best is None or not len(best):
        return dict(captions)
    out = dict(captions)
    for r in best.itertuples():
        if int(r.latent) in out:
            tokens = out[int(r.latent)]
            text = best_caption(r, max_chars)
            out[int(r.latent)] = f"{text} · {tokens}" if tokens else text
    return out
