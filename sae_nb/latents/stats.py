"""Feature statistics: what each latent of a dictionary fires on, from one activation store.

:func:`feature_stats` streams the store in chunks, encodes each chunk and keeps, per latent,
its firing count, sum and max, the ``n_top`` strongest rows, an activation histogram and a few
rows sampled from each activation interval, without ever holding the ``(N, F)`` code matrix.
TopK dictionaries are encoded sparsely (only the ``(B, k)`` active values); other dictionaries
densely per chunk, then reduced to their nonzeros. All per-latent updates are vectorised over
latents (sorting the chunk's nonzeros by latent), so no Python loop runs over latents.

The histogram and the interval samples need each latent's max before they can bin, so there
are two passes: the second reuses the first pass's sparse codes when they fit in memory
(``MAX_KEPT_NONZEROS``), else it encodes the store again. Interval samples follow SAEDashboard:
``n_quantiles`` equal-width intervals of ``(0, max_act]`` (not activation quantiles), so the
weak end of a latent shows next to its top examples. Sampling is uniform within an interval and
reproducible: each (row, latent) pair gets a hashed random key and the smallest keys win.

Results are saved in the run folder (:func:`stats_folder`) and reused while the dictionary
weights, the store and the settings are unchanged; the logit side lives in
:mod:`sae_nb.latents.logit_effects`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from sae_nb.activations.store import IDENTITY, ActivationStore
from sae_nb.dictionaries.architectures import Dictionary, TopKSAE, dictionary_hash
from sae_nb.latents.logit_effects import LogitEffects, logit_effects  # noqa: F401  (public here too)
from sae_nb.util.errors import SaeNbError
from sae_nb.util.io import atomic_save_npz, atomic_write_json, folder_name
from sae_nb.util.threads import one_thread

log = logging.getLogger(__name__)

STATS_FILE = "feature_stats.npz"  # the arrays and, inside, the identity: the file of record
SUMMARY_FILE = "feature_stats.json"  # the same identity and settings, for people to read
STATS_VERSION = 1
# Nonzeros of the first pass kept in memory for the second (row, latent, value: 12 bytes
# each, ~400 MB: a 1M-token store of a k=32 TopK); beyond that the second pass encodes again.
MAX_KEPT_NONZEROS = 32_000_000
_ARRAYS = ("density", "mean_act", "max_act", "top_rows", "top_values", "quantile_rows",
           "quantile_values", "quantile_bounds", "hist_edges", "hist_counts")


class FeatureStatsError(SaeNbError, RuntimeError):
    """A saved statistics file is missing or damaged."""


@dataclass
class FeatureStats:
    """Per-latent statistics of one dictionary over one activation store (F latents)."""

    model: str
    site: str
    d_sae: int
    n_tokens: int  # rows of the store seen
    density: np.ndarray  # (F,) fraction of tokens where the latent is > 0
    mean_act: np.ndarray  # (F,) mean activation over the tokens where it fires (0 if never)
    max_act: np.ndarray  # (F,)
    top_rows: np.ndarray  # (F, n_top) int64 rows, strongest first (ties: earlier row); -1 pads
    top_values: np.ndarray  # (F, n_top) float32, 0 where padded
    quantile_rows: np.ndarray  # (F, n_quantiles, per_quantile) int64 sampled rows; -1 pads
    quantile_values: np.ndarray  # (F, n_quantiles, per_quantile) float32, 0 where padded
    quantile_bounds: np.ndarray  # (F, n_quantiles + 1) equal-width interval edges over [0, max_act]
    hist_edges: np.ndarray  # (F, n_bins + 1) equal-width bin edges over [0, max_act]
    hist_counts: np.ndarray  # (F, n_bins) int64 counts of nonzero activations per bin
    identity: dict = field(default_factory=dict)  # dictionary hash, store, settings (the cache key)
    # (N, 2) float32, plain TopK only: each row's k-th and (k+1)-th largest pre-activation, so
    # latent_contexts can tell whether a latent is active from its own encoder column.
    row_bounds: np.ndarray | None = None

    def table(self) -> pd.DataFrame:
        """One row per latent, for sorting and filtering: latent, density, mean_act, max_act."""
        return pd.DataFrame({"latent": np.arange(self.d_sae), "density": self.density,
                             "mean_act": self.mean_act, "max_act": self.max_act})

    def save(self, folder: str | Path) -> Path:
        """Write ``feature_stats.npz`` (arrays + identity) atomically, and a json summary."""
        folder = Path(folder)
        meta = {k: getattr(self, k) for k in ("model", "site", "d_sae", "n_tokens", "identity")}
        meta["version"] = STATS_VERSION
        path = atomic_save_npz(folder / STATS_FILE, meta=np.array(json.dumps(meta)),
                               **self._arrays())
        atomic_write_json(folder / SUMMARY_FILE, meta)
        return path

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {k: getattr(self, k) for k in _ARRAYS}
        return arrays if self.row_bounds is None else {**arrays, "row_bounds": self.row_bounds}

    @classmethod
    def load(cls, folder: str | Path) -> FeatureStats:
        """Read what :meth:`save` wrote; :class:`FeatureStatsError` if missing or damaged."""
        path = Path(folder) / STATS_FILE
        if not path.exists():
            raise FeatureStatsError(f"No feature statistics at {str(path)!r}; compute them with "
                                    f"sae_nb.latents.stats.feature_stats(store, dictionary, "
                                    f"cache=...).")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                arrays = {k: data[k] for k in _ARRAYS}
                arrays["row_bounds"] = data["row_bounds"] if "row_bounds" in data else None
        except Exception as err:  # zip, json or missing-key errors all mean a damaged file
            raise FeatureStatsError(f"{str(path)!r} is damaged ({type(err).__name__}: {err}); "
                                    f"delete it and compute the statistics again.") from None
        if meta.pop("version", 0) > STATS_VERSION:
            raise FeatureStatsError(f"{str(path)!r} was written by a newer sae_nb (format "
                                    f"version > {STATS_VERSION}); upgrade sae_nb or delete it.")
        return cls(**meta, **arrays)


def stats_folder(run_dir: str | Path, dictionary_name_or_id: str) -> Path:
    """Where a run caches one dictionary's statistics: ``run_dir/features/<name>/``."""
    return Path(run_dir) / "features" / folder_name(str(dictionary_name_or_id))


# -- identity (the cache key) ---------------------------------------------------------------
def _identity(store: ActivationStore, dictionary: Dictionary, settings: dict) -> dict:
    """What cached statistics must agree on: the dictionary's encoder, the store's rows (its
    identity fields and shard list, not its path: a moved run folder keeps its cache) and the
    settings."""
    m = store.manifest
    shards = [(s["name"], s["rows"]) for s in m["shards"]]
    return {"dictionary": dictionary_hash(dictionary),
            "store_manifest": {k: m.get(k) for k in IDENTITY}, "rows": len(store),
            "shards": hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16], **settings}


def _cached(folder: Path, identity: dict) -> FeatureStats | None:
    """The stats in ``folder`` if they match ``identity``; a damaged file warns and is ignored."""
    if not (folder / STATS_FILE).exists():
        return None
    try:
        stats = FeatureStats.load(folder)
    except FeatureStatsError as err:
        warnings.warn(f"{err} Recomputing.", stacklevel=3)
        return None
    if json.loads(json.dumps(stats.identity)) != json.loads(json.dumps(identity)):
        log.info("Cached statistics in %s are for another dictionary, store or settings; "
                 "recomputing.", folder)
        return None
    return stats


# -- encoding a chunk into its nonzeros ---------------------------------------------------
@dataclass
class _Nonzeros:
    """The positive codes of a chunk, row-major (rows ascending): ``(M,)`` each."""

    row: torch.Tensor  # int64 store rows
    latent: torch.Tensor  # int64
    value: torch.Tensor  # float32
    bounds: torch.Tensor | None = None  # (B, 2) plain TopK: k-th and (k+1)-th pre-activation


@torch.no_grad()
def _encode_nonzeros(dictionary: Dictionary, x: torch.Tensor, first_row: int,
                     scratch: dict) -> _Nonzeros:
    """Encode ``x`` (B, D) and keep only the positive codes: a plain TopK dictionary by the
    fast path below, another TopK by its ``sparse_encode``, anything else densely."""
    folded = dictionary.folded_encoder() if type(dictionary) is TopKSAE else None
    if folded is not None:
        return _topk_nonzeros(folded, dictionary.k, x, first_row, scratch)
    if isinstance(dictionary, TopKSAE):
        code = dictionary.sparse_encode(x)  # (B, k) each
        with one_thread():
            return _flat_nonzeros(code.values, code.indices, first_row)
    codes = dictionary.encode(x)  # (B, F)
    with one_thread():
        r, c = torch.nonzero(codes > 0, as_tuple=True)
        return _Nonzeros(r + first_row, c, codes[r, c].float())


def _topk_nonzeros(folded: tuple[torch.Tensor, torch.Tensor], k: int, x: torch.Tensor,
                   first_row: int, scratch: dict) -> _Nonzeros:
    """One ``addmm`` into a reused (B, F) buffer (a fresh 75 MB tensor per chunk costs more in
    page faults than the matmul's tail), then the top k + 1: k codes and the row's bounds."""
    W, bias = folded  # (D, F), (F,): Dictionary.folded_encoder
    buf = scratch.get("pre")
    if buf is None or buf.shape[0] < x.shape[0]:
        buf = scratch["pre"] = torch.empty(x.shape[0], W.shape[1], dtype=W.dtype, device=W.device)
    pre = torch.addmm(bias, x, W, out=buf[: x.shape[0]])  # (B, F), on every thread
    with one_thread():
        values, latents = pre.topk(min(k + 1, W.shape[1]), dim=1, sorted=True)  # (B, k + 1)
        nz = _flat_nonzeros(values[:, :k], latents[:, :k], first_row)
        below = values[:, k] if k < W.shape[1] else torch.full_like(values[:, 0], -np.inf)
        nz.bounds = torch.stack([values[:, k - 1], below], dim=1).float()  # (B, 2)
    return nz


def _flat_nonzeros(values: torch.Tensor, latents: torch.Tensor, first_row: int) -> _Nonzeros:
    """(B, k) codes as row-major nonzeros."""
    B, k = values.shape
    rows = torch.arange(first_row, first_row + B, device=values.device).repeat_interleave(k)
    values, latents = values.reshape(-1).float(), latents.reshape(-1)
    keep = values > 0
    return _Nonzeros(rows[keep].cpu(), latents[keep].cpu(), values[keep].cpu())


def _chunk_nonzeros(store: ActivationStore, dictionary: Dictionary, batch_size: int,
                    progress: bool, desc: str) -> Iterator[_Nonzeros]:
    scratch: dict = {}
    dtype = dictionary.W_enc.dtype
    chunks = store.chunks(batch_size)
    total = -(-len(store) // batch_size)
    for first, array in tqdm(chunks, total=total, disable=not progress, desc=desc):
        x = torch.from_numpy(array).to(dictionary.W_enc.device, dtype)
        nz = _encode_nonzeros(dictionary, x, first, scratch)
        yield _Nonzeros(nz.row.cpu(), nz.latent.cpu(), nz.value.cpu(),
                        None if nz.bounds is None else nz.bounds.cpu())


# -- the running "n best per group" buffers ---------------------------------------------------
@dataclass
class _Best:
    """The ``n`` highest-scoring (row, value) pairs of each of ``G`` groups seen so far.

    Updated with a chunk's candidates in a few vectorised sorts: rank the candidates within
    their group, keep each group's first ``n``, then merge those with the buffer. Among equal
    scores the earlier row wins (candidates arrive in row order, the buffer before them).
    """

    score: torch.Tensor  # (G, n) float64, -inf pads
    row: torch.Tensor  # (G, n) int64, -1 pads
    value: torch.Tensor  # (G, n) float32, 0 pads

    @classmethod
    def empty(cls, groups: int, n: int) -> _Best:
        return cls(torch.full((groups, n), -np.inf, dtype=torch.float64),
                   torch.full((groups, n), -1, dtype=torch.int64),
                   torch.zeros(groups, n, dtype=torch.float32))

    def update(self, group: torch.Tensor, score: torch.Tensor, row: torch.Tensor,
               value: torch.Tensor) -> None:
        """Offer candidates ``(M,)`` each, in ascending row order."""
        G, n = self.score.shape
        beat = score > self.score[group, -1]  # cannot enter a full group otherwise
        group, score, row, value = group[beat], score[beat], row[beat], value[beat]
        if group.numel() == 0:
            return
        order = torch.sort(-score, stable=True).indices  # by score, row order among ties
        order = order[torch.sort(group[order], stable=True).indices]  # then by group
        group, score, row, value = group[order], score[order], row[order], value[order]
        sizes = torch.bincount(group, minlength=G)
        rank = torch.arange(group.numel()) - (torch.cumsum(sizes, 0) - sizes)[group]  # in group
        keep = rank < n
        new = _Best.empty(G, n)
        flat = group[keep] * n + rank[keep]
        new.score.view(-1)[flat], new.row.view(-1)[flat] = score[keep], row[keep]
        new.value.view(-1)[flat] = value[keep]
        self._merge(new)

    def _merge(self, new: _Best) -> None:
        n = self.score.shape[1]
        score = torch.cat([self.score, new.score], dim=1)  # (G, 2n): older rows first
        pick = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :n]
        self.score = score.gather(1, pick)
        self.row = torch.cat([self.row, new.row], dim=1).gather(1, pick)
        self.value = torch.cat([self.value, new.value], dim=1).gather(1, pick)


# -- binning and sampling keys ----------------------------------------------------------------
def _edges(max_act: np.ndarray, n: int) -> np.ndarray:
    """``(F, n + 1)`` equal-width edges over ``[0, max_act]`` (float64)."""
    return max_act.astype(np.float64)[:, None] * np.linspace(0.0, 1.0, n + 1)[None, :]


def _bin(latent: np.ndarray, value: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The bin of each value among its latent's edges, as ``np.histogram`` assigns it: bin i is
    ``[e_i, e_{i+1})``, the last one closed. An arithmetic guess, then corrected by comparing
    with the edges themselves so rounding never moves a value across an edge."""
    n = edges.shape[1] - 1
    v = value.astype(np.float64)
    top = edges[latent, -1]
    idx = np.floor(np.divide(v, top, out=np.zeros_like(v), where=top > 0) * n).astype(np.int64)
    idx = np.clip(idx, 0, n - 1)
    idx -= v < edges[latent, idx]
    idx += (v >= edges[latent, idx + 1]) & (idx != n - 1)
    return idx


def _sample_keys(row: np.ndarray, latent: np.ndarray, seed: int) -> np.ndarray:
    """A uniform float in [0, 1) per (row, latent): splitmix64 of the pair, so a sample does not
    depend on chunk size or order."""
    with np.errstate(over="ignore"):
        z = (row.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             + latent.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03) + np.uint64(seed))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


# -- the statistics pass ----------------------------------------------------------------------
@dataclass
class _Settings:
    n_top: int = 20  # strongest rows kept per latent
    n_quantiles: int = 5  # equal-width activation intervals sampled per latent
    per_quantile: int = 5  # rows sampled per interval
    n_bins: int = 40  # histogram bins over (0, max_act]
    seed: int = 0  # for the interval samples

    def __post_init__(self):
        for f in fields(self):
            if f.name != "seed" and int(getattr(self, f.name)) < 1:
                raise ValueError(f"{f.name}={getattr(self, f.name)} must be a positive integer.")


def feature_stats(store: ActivationStore, dictionary: Dictionary, n_top: int = 20,
                  n_quantiles: int = 5, per_quantile: int = 5, n_bins: int = 40,
                  batch_size: int = 4096, cache: str | Path | None = None,
                  progress: bool = True, seed: int = 0) -> FeatureStats:
    """Per-latent statistics of ``dictionary`` over every row of ``store``, streamed.

    Two passes: the first counts, sums, takes maxima and the top rows; the second, which needs
    each latent's max, fills the histogram and samples ``per_quantile`` rows uniformly from each
    of ``n_quantiles`` equal-width intervals of ``(0, max_act]``. The second pass reuses the
    first's sparse codes when they fit in memory, else reads and encodes the store again.

    ``cache`` is a folder (see :func:`stats_folder`): statistics saved there are returned as they
    are when they were computed for the same dictionary weights, store and settings; otherwise
    they are computed and saved there. A damaged cache file warns and is recomputed.
    """
    if store.d != dictionary.d_in:
        raise ValueError(f"The store {str(store.path)!r} holds {store.d}-wide activations but "
                         f"the dictionary reads d_in={dictionary.d_in}: pick the store of the "
                         f"dictionary's site ({_meta(dictionary).get('site')!r}).")
    settings = _Settings(n_top, n_quantiles, per_quantile, n_bins, seed)
    identity = _identity(store, dictionary, asdict(settings))
    if cache is not None and (stats := _cached(Path(cache), identity)) is not None:
        return stats
    stats = _compute(store, dictionary, settings, batch_size, progress)
    stats.identity = identity
    if cache is not None:
        stats.save(cache)
    return stats


def _meta(dictionary: Dictionary) -> dict:
    return getattr(dictionary, "metadata", None) or {}


@dataclass
class _Totals:
    """The first pass's running per-latent sums: count, sum, max and the strongest rows."""

    count: torch.Tensor  # (F,) int64
    total: torch.Tensor  # (F,) float64
    peak: torch.Tensor  # (F,) float32
    top: _Best  # (F, n_top)
    bounds: list[torch.Tensor]  # (B, 2) per chunk, plain TopK only

    @classmethod
    def empty(cls, F: int, n_top: int) -> _Totals:
        return cls(torch.zeros(F, dtype=torch.int64), torch.zeros(F, dtype=torch.float64),
                   torch.zeros(F, dtype=torch.float32), _Best.empty(F, n_top), [])

    def add(self, nz: _Nonzeros) -> None:
        self.count += torch.bincount(nz.latent, minlength=len(self.count))
        self.total.index_add_(0, nz.latent, nz.value.double())
        self.peak.scatter_reduce_(0, nz.latent, nz.value, reduce="amax")
        self.top.update(nz.latent, nz.value.double(), nz.row, nz.value)
        if nz.bounds is not None:
            self.bounds.append(nz.bounds)


def _first_pass(chunks: Iterator[_Nonzeros], F: int, n_top: int
                ) -> tuple[_Totals, list[_Nonzeros] | None]:
    """Totals over all chunks, and the chunks themselves while they fit in memory (compacted
    to int32 rows and latents: 12 bytes a nonzero), else None."""
    totals = _Totals.empty(F, n_top)
    kept: list[_Nonzeros] | None = []
    n_kept = 0
    for nz in chunks:
        n_kept += nz.value.numel()
        if kept is not None and n_kept > MAX_KEPT_NONZEROS:
            kept = None
        with one_thread():
            totals.add(nz)
            if kept is not None:
                kept.append(_Nonzeros(nz.row.int(), nz.latent.int(), nz.value))
    return totals, kept


def _second_pass(chunks, max_act: np.ndarray, s: _Settings) -> tuple[np.ndarray, _Best]:
    """Histogram counts ``(F * n_bins,)`` and the interval samples ``(F * n_quantiles, per)``."""
    F = len(max_act)
    hist_edges, bounds = _edges(max_act, s.n_bins), _edges(max_act, s.n_quantiles)
    hist = np.zeros(F * s.n_bins, dtype=np.int64)
    samples = _Best.empty(F * s.n_quantiles, s.per_quantile)
    for nz in chunks:
        lat = nz.latent.numpy().astype(np.int64)
        val, row = nz.value.numpy(), nz.row.numpy().astype(np.int64)
        hist += np.bincount(lat * s.n_bins + _bin(lat, val, hist_edges), minlength=F * s.n_bins)
        group = lat * s.n_quantiles + _bin(lat, val, bounds)
        key = _sample_keys(row, lat, s.seed)  # the smallest keys of a group are its sample
        with one_thread():
            samples.update(torch.from_numpy(group), torch.from_numpy(-key),
                           torch.from_numpy(row), nz.value)
    return hist, samples


@torch.no_grad()
def _compute(store: ActivationStore, dictionary: Dictionary, s: _Settings, batch_size: int,
             progress: bool) -> FeatureStats:
    F, n = dictionary.d_sae, len(store)
    chunks = _chunk_nonzeros(store, dictionary, batch_size, progress, "feature stats")
    totals, kept = _first_pass(chunks, F, s.n_top)
    if kept is None:
        log.info("The codes of %d rows do not fit in memory; encoding them again.", n)
        kept = _chunk_nonzeros(store, dictionary, batch_size, progress, "feature stats, pass 2")
    max_act = totals.peak.numpy()
    hist, samples = _second_pass(kept, max_act, s)
    Q = (F, s.n_quantiles, s.per_quantile)
    return FeatureStats(
        model=str(store.manifest.get("model")), site=store.site, d_sae=F, n_tokens=n,
        density=(totals.count.double() / max(n, 1)).numpy(),
        mean_act=(totals.total / totals.count.clamp_min(1)).numpy(), max_act=max_act,
        top_rows=totals.top.row.numpy(), top_values=totals.top.value.numpy(),
        quantile_rows=samples.row.numpy().reshape(Q),
        quantile_values=samples.value.numpy().reshape(Q),
        quantile_bounds=_edges(max_act, s.n_quantiles), hist_edges=_edges(max_act, s.n_bins),
        hist_counts=hist.reshape(F, s.n_bins),
        row_bounds=torch.cat(totals.bounds).numpy() if totals.bounds else None)
