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
:mod:`sae_nb.logit_effects`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .codes import dictionary_site
from .corpora import sentence_batches
from .dictionary import Dictionary, TopKSAE
from .extract import resolve_sites, run_sites
from .logit_effects import LogitEffects, logit_effects  # noqa: F401  (public here too)
from .store import IDENTITY, ActivationStore, site_dirname

log = logging.getLogger(__name__)

STATS_FILE = "feature_stats.npz"  # the arrays and, inside, the identity: the file of record
SUMMARY_FILE = "feature_stats.json"  # the same identity and settings, for people to read
STATS_VERSION = 1
# Nonzeros of the first pass kept in memory for the second (row, latent, value: 12 bytes
# each, ~300 MB); beyond that the second pass encodes the store again.
MAX_KEPT_NONZEROS = 25_000_000
_ARRAYS = ("density", "mean_act", "max_act", "top_rows", "top_values", "quantile_rows",
           "quantile_values", "quantile_bounds", "hist_edges", "hist_counts")


class FeatureStatsError(RuntimeError):
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
    top_rows: np.ndarray  # (F, n_top) int64 store rows, strongest first (ties: earlier row); -1 pads
    top_values: np.ndarray  # (F, n_top) float32, 0 where padded
    quantile_rows: np.ndarray  # (F, n_quantiles, per_quantile) int64 rows sampled per interval; -1 pads
    quantile_values: np.ndarray  # (F, n_quantiles, per_quantile) float32, 0 where padded
    quantile_bounds: np.ndarray  # (F, n_quantiles + 1) equal-width interval edges over [0, max_act]
    hist_edges: np.ndarray  # (F, n_bins + 1) equal-width bin edges over [0, max_act]
    hist_counts: np.ndarray  # (F, n_bins) int64 counts of nonzero activations per bin
    identity: dict = field(default_factory=dict)  # dictionary hash, store, settings (the cache key)

    def table(self) -> pd.DataFrame:
        """One row per latent, for sorting and filtering: latent, density, mean_act, max_act."""
        return pd.DataFrame({"latent": np.arange(self.d_sae), "density": self.density,
                             "mean_act": self.mean_act, "max_act": self.max_act})

    def save(self, folder: str | Path) -> Path:
        """Write ``feature_stats.npz`` (arrays + identity) atomically, and a json summary."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {k: getattr(self, k) for k in ("model", "site", "d_sae", "n_tokens", "identity")}
        meta["version"] = STATS_VERSION
        path = folder / STATS_FILE
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **{k: getattr(self, k) for k in _ARRAYS})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        summary = folder / SUMMARY_FILE
        summary.with_name(summary.name + ".tmp").write_text(json.dumps(meta, indent=1))
        os.replace(summary.with_name(summary.name + ".tmp"), summary)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "FeatureStats":
        """Read what :meth:`save` wrote; :class:`FeatureStatsError` if missing or damaged."""
        path = Path(folder) / STATS_FILE
        if not path.exists():
            raise FeatureStatsError(f"No feature statistics at {str(path)!r}; compute them with "
                                    f"sae_nb.features.feature_stats(store, dictionary, cache=...).")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                arrays = {k: data[k] for k in _ARRAYS}
        except Exception as err:  # zip, json or missing-key errors all mean a damaged file
            raise FeatureStatsError(f"{str(path)!r} is damaged ({type(err).__name__}: {err}); "
                                    f"delete it and compute the statistics again.") from None
        meta.pop("version", None)
        return cls(**meta, **arrays)


def stats_folder(run_dir: str | Path, dictionary_name_or_id: str) -> Path:
    """Where a run caches one dictionary's statistics: ``run_dir/features/<name>/``."""
    return Path(run_dir) / "features" / site_dirname(str(dictionary_name_or_id))


# -- identity (the cache key) ---------------------------------------------------------------
def dictionary_hash(dictionary: Dictionary) -> str:
    """A short hash of everything that decides the codes: class, k and encoder-side tensors."""
    h = hashlib.sha256(f"{type(dictionary).__name__}:{getattr(dictionary, 'k', None)}".encode())
    for name, tensor in sorted(dictionary.state_dict().items()):
        if name != "W_dec":  # the decoder does not change the codes
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _identity(store: ActivationStore, dictionary: Dictionary, settings: dict) -> dict:
    m = store.manifest
    shards = [(s["name"], s["rows"]) for s in m["shards"]]
    return {"dictionary": dictionary_hash(dictionary), "store_manifest": {k: m.get(k) for k in IDENTITY}, "rows": len(store),
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


# -- encoding a chunk into its nonzeros -------------------------------------------------------
@dataclass
class _Nonzeros:
    """The positive codes of a chunk, row-major (rows ascending): ``(M,)`` each."""

    row: torch.Tensor  # int64 store rows
    latent: torch.Tensor  # int64
    value: torch.Tensor  # float32


def _plain_pre_acts(dictionary: Dictionary) -> bool:
    return type(dictionary).pre_acts is Dictionary.pre_acts


@torch.no_grad()
def _encode_nonzeros(dictionary: Dictionary, x: torch.Tensor, first_row: int,
                     scratch: dict) -> _Nonzeros:
    """Encode ``x`` (B, D) and keep only the positive codes.

    A plain TopK dictionary takes the fast path: one ``addmm`` into a reused (B, F) buffer (a
    fresh 75 MB tensor per chunk costs more in page faults than the matmul's tail) and a top-k.
    """
    B = x.shape[0]
    if isinstance(dictionary, TopKSAE):
        if _plain_pre_acts(dictionary):
            W = dictionary.W_enc  # (D, F)
            bias = dictionary.b_enc - (dictionary.b_dec @ W if dictionary.apply_b_dec_to_input else 0)
            buf = scratch.get("pre")
            if buf is None or buf.shape[0] < B:
                buf = scratch["pre"] = torch.empty(B, W.shape[1], dtype=W.dtype)
            pre = torch.addmm(bias, x, W, out=buf[:B])  # (B, F)
            values, latents = pre.topk(dictionary.k, dim=1, sorted=False)  # (B, k)
        else:
            code = dictionary.sparse_encode(x)
            values, latents = code.values, code.indices  # (B, k)
        rows = torch.arange(first_row, first_row + B).repeat_interleave(values.shape[1])
        values, latents = values.reshape(-1).float(), latents.reshape(-1)
        keep = values > 0
        return _Nonzeros(rows[keep], latents[keep], values[keep])
    codes = dictionary.encode(x)  # (B, F)
    r, c = torch.nonzero(codes > 0, as_tuple=True)
    return _Nonzeros(r + first_row, c, codes[r, c].float())


def _chunk_nonzeros(store: ActivationStore, dictionary: Dictionary, batch_size: int,
                    progress: bool, desc: str) -> Iterator[_Nonzeros]:
    scratch: dict = {}
    dtype = dictionary.W_enc.dtype
    chunks = store.chunks(batch_size)
    total = -(-len(store) // batch_size)
    for first, array in tqdm(chunks, total=total, disable=not progress, desc=desc):
        x = torch.from_numpy(array).to(dictionary.W_enc.device, dtype)
        nz = _encode_nonzeros(dictionary, x, first, scratch)
        yield _Nonzeros(nz.row.cpu(), nz.latent.cpu(), nz.value.cpu())


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
    def empty(cls, groups: int, n: int) -> "_Best":
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
        starts = torch.cumsum(torch.bincount(group, minlength=G), 0) - torch.bincount(group, minlength=G)
        rank = torch.arange(group.numel()) - starts[group]
        keep = rank < n
        new = _Best.empty(G, n)
        flat = group[keep] * n + rank[keep]
        new.score.view(-1)[flat], new.row.view(-1)[flat] = score[keep], row[keep]
        new.value.view(-1)[flat] = value[keep]
        self._merge(new)

    def _merge(self, new: "_Best") -> None:
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


@torch.no_grad()
def _compute(store: ActivationStore, dictionary: Dictionary, s: _Settings, batch_size: int,
             progress: bool) -> FeatureStats:
    F = dictionary.d_sae
    count = torch.zeros(F, dtype=torch.int64)
    total = torch.zeros(F, dtype=torch.float64)
    peak = torch.zeros(F, dtype=torch.float32)
    top = _Best.empty(F, s.n_top)
    kept: list[_Nonzeros] | None = []
    n_kept = 0
    for nz in _chunk_nonzeros(store, dictionary, batch_size, progress, "feature stats"):
        count += torch.bincount(nz.latent, minlength=F)
        total.index_add_(0, nz.latent, nz.value.double())
        peak.scatter_reduce_(0, nz.latent, nz.value, reduce="amax")
        top.update(nz.latent, nz.value.double(), nz.row, nz.value)
        n_kept += nz.value.numel()
        if kept is not None:
            kept = None if n_kept > MAX_KEPT_NONZEROS else kept + [nz]
    max_act = peak.numpy()
    hist_edges, bounds = _edges(max_act, s.n_bins), _edges(max_act, s.n_quantiles)
    hist = np.zeros(F * s.n_bins, dtype=np.int64)
    samples = _Best.empty(F * s.n_quantiles, s.per_quantile)
    second = kept if kept is not None else _chunk_nonzeros(store, dictionary, batch_size,
                                                           progress, "feature stats, pass 2")
    for nz in second:
        lat, val, row = nz.latent.numpy(), nz.value.numpy(), nz.row.numpy()
        hist += np.bincount(lat * s.n_bins + _bin(lat, val, hist_edges), minlength=F * s.n_bins)
        group = lat * s.n_quantiles + _bin(lat, val, bounds)
        key = _sample_keys(row, lat, s.seed)
        samples.update(torch.from_numpy(group), torch.from_numpy(-key), nz.row, nz.value)
    n = len(store)
    density = (count.double() / max(n, 1)).numpy()
    mean = (total / count.clamp_min(1)).numpy()
    Q = (F, s.n_quantiles, s.per_quantile)
    return FeatureStats(
        model=str(store.manifest.get("model")), site=store.site, d_sae=F, n_tokens=n,
        density=density, mean_act=mean, max_act=max_act,
        top_rows=top.row.numpy(), top_values=top.value.numpy(),
        quantile_rows=samples.row.numpy().reshape(Q), quantile_values=samples.value.numpy().reshape(Q),
        quantile_bounds=bounds, hist_edges=hist_edges,
        hist_counts=hist.reshape(F, s.n_bins))


# -- contexts of one latent -------------------------------------------------------------------
def _windows(store: ActivationStore, rows: np.ndarray, before: int, after: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """``(R, W)`` store rows around each of ``rows`` and a mask of those in the same context.

    Rows of one context are stored consecutively and in order, so the window is the rows
    ``row - before .. row + after`` that share the row's context."""
    offsets = np.arange(-before, after + 1)
    window = rows[:, None] + offsets[None, :]  # (R, W)
    inside = (window >= 0) & (window < len(store))
    window = np.clip(window, 0, len(store) - 1)
    context = store.index(window.reshape(-1))["context"].reshape(window.shape)
    same = inside & (context == context[:, before : before + 1])
    return window, same


@torch.no_grad()
def _latent_acts(dictionary: Dictionary, x: torch.Tensor, latent: int) -> torch.Tensor:
    """One latent's activation on each row of ``x`` (B, D)."""
    if isinstance(dictionary, TopKSAE):
        code = dictionary.sparse_encode(x)  # (B, k)
        hit = code.indices == latent
        return (code.values * hit).sum(1).float()  # (B,)
    return dictionary.encode(x)[:, latent].float()


def latent_contexts(store: ActivationStore, dictionary: Dictionary, latent: int, rows,
                    tokenizer, before: int = 16, after: int = 4) -> list[dict]:
    """The token window around each store row in ``rows``, with ``latent``'s activation at every
    token: what the explorer shows for a latent's top or interval examples.

    A window never crosses into another context. All windows are encoded in one batch. Each
    dict holds ``row``, ``tokens`` (decoded strings), ``token_ids``, ``acts``, ``center`` (the
    row's index in the window) and ``value`` (the activation at the row). Rows of -1 (padding
    in :class:`FeatureStats`) are skipped.
    """
    if store.manifest.get("mode") != "tokens":
        raise ValueError(f"latent_contexts needs a token-mode store; {str(store.path)!r} holds "
                         f"{store.manifest.get('mode')!r} rows, which have no neighbours.")
    if not 0 <= latent < dictionary.d_sae:
        raise IndexError(f"latent={latent} is out of range for a dictionary of "
                         f"d_sae={dictionary.d_sae} latents.")
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    rows = rows[rows >= 0]
    if rows.size == 0:
        return []
    window, same = _windows(store, rows, before, after)
    needed, inverse = np.unique(window[same], return_inverse=True)
    x = torch.from_numpy(store[needed]).to(dictionary.W_enc.device, dictionary.W_enc.dtype)
    acts = _latent_acts(dictionary, x, latent).cpu().numpy()[inverse]
    ids = store.index(needed)["token"][inverse]
    names = _token_strings(tokenizer, ids)
    out, start = [], 0
    for i, row in enumerate(rows):
        n = int(same[i].sum())
        center = int(same[i, :before].sum())
        sl = slice(start, start + n)
        out.append({"row": int(row), "tokens": names[sl], "token_ids": ids[sl].tolist(),
                    "acts": acts[sl].tolist(), "center": center, "value": float(acts[sl][center])})
        start += n
    return out


def _token_strings(tokenizer, ids: np.ndarray) -> list[str]:
    """Each id decoded on its own (`` the``, not ``Ġthe``), decoding each distinct id once."""
    uniq, inverse = np.unique(ids, return_inverse=True)
    names = tokenizer.batch_decode([[int(i)] for i in uniq])
    return [names[j] for j in inverse]


@torch.no_grad()
def text_activations(model, dictionary: Dictionary, text: str, site: str | None = None,
                     max_len: int = 1024) -> tuple[list[str], torch.Tensor]:
    """The tokens of ``text`` (BOS excluded) and their codes ``(T, F)`` at the dictionary's site:
    what the explorer's text box shows."""
    site = dictionary_site(dictionary, site)
    sites = resolve_sites(model, [site])
    _, ids, mask = next(sentence_batches([text], model.tokenizer, 1, max_len=max_len))
    acts = run_sites(model, sites, torch.from_numpy(ids), torch.from_numpy(mask))[0][0, 1:]  # (T, D)
    if acts.shape[-1] != dictionary.d_in:
        raise ValueError(f"Site {site!r} is {acts.shape[-1]} wide but the dictionary reads "
                         f"d_in={dictionary.d_in}: wrong model or site.")
    codes = dictionary.encode(acts.to(dictionary.W_enc.device, dictionary.W_enc.dtype))  # (T, F)
    return _token_strings(model.tokenizer, ids[0, 1:]), codes.float().cpu()
