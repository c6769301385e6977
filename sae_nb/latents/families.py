"""Families of latents: latents that point the same way, or that fire on the same tokens.

Two similarities between latents, each clustered hierarchically into families:

- **decoder cosine**: the cosine of two latents' decoder directions (rows of ``W_dec``). Near 1
  means they write almost the same vector: duplicates, or a feature split into variants.
- **co-firing (Jaccard)**: over the rows of an activation store, the number of tokens on which
  both latents fire divided by the number on which either fires, ``c_ij / (f_i + f_j - c_ij)``.
  Jaccard rather than ``c_ij / min(f_i, f_j)``: it is 1 only when two latents fire on exactly
  the same tokens, and a latent that fires almost everywhere does not join every family.

The co-firing counts come from one streaming pass (:func:`co_firing`): a chunk of store rows at
a time is encoded, binarised (code > 0) and its pair counts ``B^T B`` added through a sparse
product, so the ``(N, F)`` code matrix is never held. The same pass keeps each latent's top
activating rows, whose tokens label the families. Families come from average-linkage
hierarchical clustering (scipy) on ``1 - similarity``, cut at a distance or into a number of
families.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from scipy.cluster.hierarchy import fcluster, leaves_list, linkage
from scipy.spatial.distance import squareform

from sae_nb.activations.corpora import token_strings
from sae_nb.activations.store import ActivationStore
from sae_nb.dictionaries.architectures import Dictionary
from sae_nb.util.errors import SaeNbError

logger = logging.getLogger(__name__)
MAX_COUNT_BYTES = 4 * 2**30  # the (F, F) int32 pair counts: 85 MB at F = 4608, 4 GiB at 32768


class FamilyError(SaeNbError, ValueError):
    """Inputs that cannot be grouped into families; the message names the bad value and fix."""


def check_width(dictionary: Dictionary, store: ActivationStore) -> None:
    """Refuse a dictionary whose input width is not the store's row width."""
    if dictionary.d_in != store.d:
        site = (getattr(dictionary, "metadata", None) or {}).get("site", "its own site")
        raise FamilyError(f"The dictionary reads {dictionary.d_in}-wide activations but the store "
                          f"at {str(store.path)!r} (site {store.site!r}) holds {store.d}-wide "
                          f"rows. Open the store of the dictionary's site ({site}) of the same "
                          f"model, or load the dictionary trained on this store.")


# ---------------------------------------------------------------- the streaming pass


@dataclass
class CoFiring:
    """What one pass over a store found: pair counts, firing counts and top rows per latent."""

    counts: np.ndarray  # (F, F) int32: rows on which both latents fire; diagonal equals fires
    fires: np.ndarray  # (F,) int64: rows on which each latent fires
    rows: int  # store rows streamed
    top_rows: np.ndarray  # (F, n_top) int64: the rows with each latent's largest codes, -1 pad
    top_values: np.ndarray  # (F, n_top) float32: those codes, largest first
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.rows / max(self.seconds, 1e-9)


def _pair_counts(fired: torch.Tensor, n_latents: int) -> sparse.coo_matrix:
    """``B^T B`` of a boolean ``(n, F)`` chunk as a sparse matrix of unique (i, j) counts."""
    n = fired.shape[0]
    r, c = (t.cpu().numpy() for t in fired.nonzero(as_tuple=True))  # row-major: r ascending
    indptr = np.zeros(n + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(np.bincount(r, minlength=n))
    B = sparse.csr_matrix((np.ones(len(r), np.float32), c, indptr), shape=(n, n_latents))
    # Exact while a chunk has fewer than 2**24 rows; a sparse product's entries are unique.
    return (B.T.tocsr() @ B).tocoo()


def _merge_top(top_vals: torch.Tensor, top_rows: torch.Tensor, codes: torch.Tensor,
               first_row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k per latent, ``(F, n_top)``: the largest of the kept codes and a chunk's."""
    n_top = top_vals.shape[1]
    vals, idx = codes.T.contiguous().topk(min(n_top, codes.shape[0]), dim=1)  # (F, k)
    all_vals = torch.cat([top_vals, vals], dim=1)
    all_rows = torch.cat([top_rows, idx + first_row], dim=1)
    best = all_vals.topk(n_top, dim=1)
    return best.values, all_rows.gather(1, best.indices)


@torch.no_grad()
def co_firing(dictionary: Dictionary, store: ActivationStore, chunk_rows: int = 8192,
              max_rows: int | None = None, n_top: int = 5) -> CoFiring:
    """Stream the first ``max_rows`` rows of ``store`` (all when None or 0) through the
    dictionary, ``chunk_rows`` at a time: pair counts, firing counts and top rows per latent."""
    check_width(dictionary, store)
    n_rows = min(max_rows or len(store), len(store))
    if n_rows == 0:
        raise FamilyError(f"The store at {str(store.path)!r} has no rows; run notebook 01.")
    if chunk_rows < 1 or n_top < 1:
        raise FamilyError(f"chunk_rows={chunk_rows} and n_top={n_top} must both be positive.")
    F, device, dtype = dictionary.d_sae, dictionary.W_enc.device, dictionary.W_enc.dtype
    if F * F * 4 > MAX_COUNT_BYTES:
        need, allowed = F * F * 4 / 2**30, MAX_COUNT_BYTES / 2**30
        raise FamilyError(f"d_sae={F}: the ({F}, {F}) pair counts would take {need:.1f} GiB, "
                          f"more than the {allowed:.0f} GiB allowed "
                          f"(sae_nb.latents.families.MAX_COUNT_BYTES); raise it if the memory "
                          f"is there.")
    counts = np.zeros((F, F), dtype=np.int32)
    top_vals = torch.full((F, n_top), -torch.inf)
    top_rows = torch.full((F, n_top), -1, dtype=torch.int64)
    start = time.perf_counter()
    for lo in range(0, n_rows, chunk_rows):
        x = torch.from_numpy(store[lo : min(lo + chunk_rows, n_rows)]).to(device, dtype)
        codes = dictionary.encode(x).float().cpu()  # (n, F), one chunk only
        fired = codes > 0
        C = _pair_counts(fired, F)
        counts[C.row, C.col] += C.data.astype(np.int32)  # (i, j) unique: a plain add is exact
        top_vals, top_rows = _merge_top(top_vals, top_rows, codes, lo)
    seconds = time.perf_counter() - start
    logger.info("Co-firing pass: %d rows in %.1f s (%.0f tokens/s)", n_rows, seconds,
                n_rows / max(seconds, 1e-9))
    top_rows[~(top_vals > 0)] = -1  # a latent that fired fewer than n_top times
    top_vals = top_vals.clamp_min(0)
    fires = np.diag(counts).astype(np.int64)  # a latent co-fires with itself when it fires
    return CoFiring(counts, fires, n_rows, top_rows.numpy(), top_vals.numpy(), seconds)


def select_latents(cofiring: CoFiring, min_fires: int = 10, max_latents: int = 1000) -> np.ndarray:
    """Latent ids (ascending) that fired at least ``min_fires`` times, at most ``max_latents`` of
    them, the most frequent first. Rare latents have too few tokens for a co-firing estimate,
    and average linkage over thousands of latents gets slow."""
    alive = np.nonzero(cofiring.fires >= max(min_fires, 1))[0]
    keep = alive[np.argsort(-cofiring.fires[alive], kind="stable")][:max_latents]
    if len(keep) < 2:
        raise FamilyError(f"Only {len(keep)} latents fired at least {min_fires} times in "
                          f"{cofiring.rows} rows; families need 2 or more. Lower min_fires or "
                          f"stream more rows.")
    return np.sort(keep)


# ---------------------------------------------------------------- similarities


def decoder_similarity(dictionary: Dictionary, latents) -> np.ndarray:
    """``(M, M)`` cosine similarity of the chosen latents' decoder directions."""
    W = dictionary.W_dec.detach().float().cpu()[torch.as_tensor(np.asarray(latents))]  # (M, D)
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (W @ W.T).numpy().astype(np.float64)


def cofiring_similarity(cofiring: CoFiring, latents) -> np.ndarray:
    """``(M, M)`` Jaccard similarity of the chosen latents' firing sets (1 on the diagonal)."""
    latents = np.asarray(latents)
    both = cofiring.counts[np.ix_(latents, latents)].astype(np.float64)
    f = cofiring.fires[latents].astype(np.float64)
    union = f[:, None] + f[None, :] - both
    sim = np.divide(both, union, out=np.zeros_like(both), where=union > 0)
    np.fill_diagonal(sim, 1.0)
    return sim


# ---------------------------------------------------------------- hierarchical families


@dataclass
class Families:
    """Latents grouped by one similarity. Family 0 is the largest."""

    name: str  # which similarity, e.g. "decoder" or "cofiring"
    latents: np.ndarray  # (M,) latent ids
    family: np.ndarray  # (M,) family of each latent
    similarity: np.ndarray  # (M, M)
    order: np.ndarray  # (M,) positions into latents in dendrogram leaf order

    def members(self, family: int) -> np.ndarray:
        """Latent ids of one family, in dendrogram order (similar latents side by side)."""
        pos = self.order[self.family[self.order] == family]
        return self.latents[pos]


def find_families(similarity: np.ndarray, latents, name: str = "similarity",
                  threshold: float = 0.7, n_families: int = 0) -> Families:
    """Average-linkage clustering on ``1 - similarity``, cut where merges pass ``threshold``
    (a distance: 0.7 joins latents whose mean similarity exceeds 0.3), or into ``n_families``
    families when that is positive."""
    latents, S = np.asarray(latents), np.asarray(similarity, dtype=np.float64)
    if S.shape != (len(latents), len(latents)) or len(latents) < 2:
        raise FamilyError(f"Need a square similarity of 2 or more latents matching "
                          f"{len(latents)} latent ids; got shape {S.shape}.")
    if n_families > len(latents):
        raise FamilyError(f"n_families={n_families} but only {len(latents)} latents; choose at "
                          f"most {len(latents)}, or 0 to cut at the distance threshold.")
    D = np.clip(1.0 - (S + S.T) / 2, 0.0, None)
    np.fill_diagonal(D, 0.0)
    Z = linkage(squareform(D, checks=False), method="average")
    if n_families > 0:
        raw = fcluster(Z, t=n_families, criterion="maxclust")
    else:
        raw = fcluster(Z, t=threshold, criterion="distance")
    ids, sizes = np.unique(raw, return_counts=True)
    first = np.array([np.nonzero(raw == i)[0][0] for i in ids])
    rank = {int(ids[j]): r for r, j in enumerate(np.lexsort((first, -sizes)))}
    family = np.array([rank[int(r)] for r in raw])
    return Families(name, latents, family, S, leaves_list(Z))


# ---------------------------------------------------------------- what the members fire on


def token_text(tokenizer, token_id: int) -> str:
    """One token as readable text, quoted so leading spaces and newlines show."""
    return repr(token_strings(tokenizer, [token_id])[0]) if token_id >= 0 else "(sentence row)"


def top_tokens(cofiring: CoFiring, store: ActivationStore, tokenizer,
               latents) -> dict[int, list[str]]:
    """Per latent, the tokens of its top activating store rows, strongest first."""
    cache: dict[int, str] = {}
    out = {}
    for latent in np.asarray(latents):
        rows = cofiring.top_rows[latent]
        rows = rows[rows >= 0]
        ids = store.index(rows)["token"] if len(rows) else []
        out[int(latent)] = [cache.setdefault(int(t), token_text(tokenizer, int(t))) for t in ids]
    return out


def top_context(store: ActivationStore, row: int, tokenizer, before: int = 10) -> str:
    """The text before a store row and the row's own token in [[brackets]]."""
    if row < 0:
        return ""
    ctx = store.context(int(row), before=before, after=0)
    if (ctx["token"] < 0).any():  # sentence-mode rows carry no token ids
        return f"(sentence {int(ctx['context'].iloc[-1])})"
    ids = ctx["token"].tolist()
    return tokenizer.decode(ids[:-1]) + "[[" + tokenizer.decode(ids[-1:]) + "]]"


def family_table(families: Families, tokens: dict[int, list[str]] | None = None,
                 min_size: int = 2, n_tokens: int = 3) -> pd.DataFrame:
    """One row per family of at least ``min_size`` latents: size, mean similarity between its
    members, the members (dendrogram order) and each member's top tokens."""
    where = {int(m): i for i, m in enumerate(families.latents)}
    rows = []
    for f in np.unique(families.family):
        members = families.members(int(f))
        if len(members) < min_size:
            continue
        pos = np.array([where[int(m)] for m in members])
        block = families.similarity[np.ix_(pos, pos)]
        mean = (block.sum() - np.trace(block)) / max(len(pos) * (len(pos) - 1), 1)
        labels = [f"{m}: {' '.join((tokens or {}).get(int(m), [])[:n_tokens])}" for m in members]
        rows.append({"family": int(f), "size": len(members),
                     "mean_similarity": float(mean) if len(pos) > 1 else float("nan"),
                     "members": " ".join(str(int(m)) for m in members),
                     "top_tokens": " | ".join(labels)})
    return pd.DataFrame(rows, columns=["family", "size", "mean_similarity", "members",
                                       "top_tokens"])


def latent_table(cofiring: CoFiring, groupings: list[Families], store: ActivationStore,
                 tokenizer, tokens: dict[int, list[str]]) -> pd.DataFrame:
    """One row per grouped latent: firing count and rate, its family under each grouping, its
    top tokens and the context of its strongest row."""
    latents = groupings[0].latents
    df = pd.DataFrame({"latent": latents, "fires": cofiring.fires[latents],
                       "firing_rate": cofiring.fires[latents] / cofiring.rows})
    for g in groupings:
        df[f"{g.name}_family"] = pd.Series(g.family, index=g.latents).reindex(latents).values
    df["top_tokens"] = [" ".join(tokens.get(int(m), [])) for m in latents]
    df["top_context"] = [top_context(store, int(cofiring.top_rows[m, 0]), tokenizer)
                         for m in latents]
    return df
