"""Activation extraction with nnsight, into the on-disk store or into memory.

One forward pass reads every requested site and stops right after the last one the model
reaches, so extracting ``resid_out_layer3`` of a 30-layer model runs 4 blocks, not 30 plus the
49k-token unembedding. Batches are right-padded with an attention mask; padding, and BOS when
``exclude_bos``, never reach the store or a pooled vector.

Under ``torchrun`` (a process group of N > 1), each process extracts its own block of units
into a part of the same store, and rank 0 merges the parts into a store that reads exactly like
a single-process one (see :mod:`sae_nb.activations.shards`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_nb.activations import shards
from sae_nb.activations.corpora import (
    Corpus,
    document_separator,
    load_corpus,
    pack_contexts,
    sentence_batches,
)
from sae_nb.activations.models import Model, hf_model, max_positions, model_name
from sae_nb.activations.sites import Site, execution_order, resolve_site
from sae_nb.activations.store import INDEX_DTYPE, ActivationStore, StoreError, StoreWriter
from sae_nb.util.checks import whole_number
from sae_nb.util.errors import SaeNbError
from sae_nb.util.io import folder_name

log = logging.getLogger(__name__)


class ExtractionError(SaeNbError, ValueError):
    """Extraction settings that cannot work: not a whole number, a context too long for the
    model."""


@dataclass
class ExtractConfig:
    """What to extract. Everything but ``n_tokens`` and ``batch_size`` defines the rows, so a
    rerun with other values of those two resumes or extends the same store."""

    sites: tuple[str, ...] = ("resid_out_layer3",)
    """Where to read, by site name (see sae_nb.valid_sites); one store per site."""
    corpus: str = "sotu"
    """The texts: sotu (State of the Union addresses), a CSV, a .txt file or a folder of them."""
    text_column: str = "sentence"
    """The column holding the text when corpus is a CSV."""
    mode: Literal["tokens", "sentences"] = "tokens"
    """tokens: a row per token; sentences: a row per text, its tokens pooled."""
    pool: Literal["mean", "max"] = "mean"
    """Sentence mode: how a text's tokens become its one row."""
    n_tokens: int = 100_000
    """Token mode: tokens fed to the model, rounded up to whole contexts.

    A rerun with more tokens extends the store."""
    ctx_len: int = 128
    """Tokens per context, the opening BOS included (sentence mode: the truncation length)."""
    batch_size: int = 16
    """Contexts (or texts, in sentence mode) per forward pass."""
    dtype: Literal["float16", "float32"] = "float16"
    """Storage dtype; the model runs in its own.

    float16 halves the disk and is plenty for SAEs."""
    seed: int = 0
    """Shuffles the document order before packing."""
    prepend_bos: bool = True
    """Every context (or text) starts with the document separator."""
    exclude_bos: bool = True
    """Leave BOS rows out of the store: they are attention sinks with huge norms."""
    shard_mb: int = 64
    """Target size of a shard on disk, in MiB."""
    shard_rows: int | None = None
    """Rows per shard, overriding shard_mb; None: from shard_mb (tests use tiny shards)."""

    def __post_init__(self):
        self.sites = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        if not self.sites:
            raise ExtractionError("sites is empty; name at least one, e.g. "
                                  "sites=['resid_out_layer3'].")
        if self.mode not in ("tokens", "sentences"):
            raise ExtractionError(f"mode={self.mode!r}; use 'tokens' or 'sentences'.")
        if self.pool not in ("mean", "max"):
            raise ExtractionError(f"pool={self.pool!r}; use 'mean' or 'max'.")
        if self.dtype not in ("float16", "float32"):
            raise ExtractionError(f"dtype={self.dtype!r}; use 'float16' or 'float32'.")
        for name in ("n_tokens", "ctx_len", "batch_size", "shard_mb", "shard_rows", "seed"):
            value = getattr(self, name)
            if value is None and name == "shard_rows":
                continue
            setattr(self, name, whole_number(name, value, 0 if name == "seed" else 1,
                                             ExtractionError))


def check_ctx_len(model: Model, config: ExtractConfig) -> None:
    """Refuse a ``ctx_len`` beyond the positions the model has embeddings for: GPT-2 would fail
    with an index error, rotary models would run on positions they never saw."""
    limit = max_positions(model)
    if limit is not None and config.ctx_len > limit:
        what = "context length" if config.mode == "tokens" else "truncation length"
        raise ExtractionError(f"ctx_len={config.ctx_len} (the {what}) exceeds the {limit} "
                              f"positions of model {model_name(model)!r}; set ctx_len={limit} "
                              f"or lower.")


def module_envoy(model: Model, module_path: str):
    """The nnsight envoy of a dotted module path (``model.layers.3``), inside a trace."""
    envoy = model
    for part in module_path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def run_sites(model: Model, sites: list[Site], input_ids: torch.Tensor,
              attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """One forward pass returning each site's ``(B, T, d)`` activations, stopping after the last.

    ``sites`` must be in execution order (:func:`sae_nb.activations.sites.execution_order`).
    """
    device = next(hf_model(model).parameters()).device
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    saved: list[torch.Tensor] = []
    with torch.no_grad():
        with model.trace(inputs) as tracer:
            for site in sites:
                envoy = module_envoy(model, site.module)
                value = envoy.output if site.io == "output" else envoy.input
                if isinstance(value, tuple):  # attention modules return (out, weights)
                    value = value[0]
                saved.append(value.save())
            tracer.stop()
    return saved


def resolve_sites(model: Model, names) -> list[Site]:
    """Resolve site names and sort them in execution order."""
    names = [names] if isinstance(names, str) else list(names)
    sites = [resolve_site(hf_model(model), n) for n in names]
    unique = list({s.name: s for s in sites}.values())
    return execution_order(hf_model(model), unique)


def extract_activations(model: Model, run_dir: str | Path, config: ExtractConfig | None = None,
                        overwrite: bool = False, progress: bool = True,
                        **options) -> dict[str, ActivationStore]:
    """Extract ``config.sites`` over ``config.corpus`` into stores under ``run_dir/activations``.

    Resumes a store that an earlier (possibly killed) run left behind, and extends it when
    ``n_tokens`` grew. Keyword ``options`` override fields of ``config``. Inside a process
    group of several processes (``torchrun``), each extracts its own part of the units.
    """
    config = ExtractConfig(**{**(asdict(config) if config else {}), **options})
    check_ctx_len(model, config)
    sites = resolve_sites(model, config.sites)
    corpus = load_corpus(config.corpus, config.text_column)
    d_by_site = site_widths(model, sites)
    headers = {s.name: _header(model, s, d_by_site[s.name], config) for s in sites}
    paths = {s.name: Path(run_dir) / "activations" / folder_name(s.name) for s in sites}
    if shards.rank_and_world()[1] > 1:
        return _extract_sharded(model, sites, headers, paths, corpus, config, overwrite, progress)
    with contextlib.ExitStack() as locks:  # each writer locks its store until it is done
        writers = {name: locks.enter_context(StoreWriter(paths[name], headers[name],
                                                         overwrite=overwrite))
                   for name in paths}
        units, per_unit, batches = _units(model, corpus, config)
        for w in writers.values():
            w.set_units_total(units)
        start = min(w.done for w in writers.values())
        _run(model, sites, writers, batches(start, units), units, per_unit, config, progress)
        for w in writers.values():
            w.finish(n_units_total=units)
    return {name: ActivationStore(w.path) for name, w in writers.items()}


def _units(model: Model, corpus: Corpus, config: ExtractConfig):
    """``(units, tokens per unit or None, batches(start, stop))`` of this extraction."""
    tok = model.tokenizer
    if config.mode == "tokens":
        ctx = pack_contexts(corpus, tok, config.ctx_len, -(-config.n_tokens // config.ctx_len),
                            config.seed, config.prepend_bos)
        return (len(ctx.tokens), config.ctx_len,
                lambda start, stop: _token_batches(ctx, config, start, stop))
    return (len(corpus.texts), None,
            lambda start, stop: _sentence_batches(corpus, tok, config, start, stop))


def _extract_sharded(model: Model, sites, headers, paths, corpus, config, overwrite, progress):
    """This process's part of a multi-process extraction; rank 0 plans and merges."""
    rank, world = shards.rank_and_world()
    shards.agree({"config": asdict(config), "headers": headers, "overwrite": overwrite,
                  "stores": {k: str(p.resolve()) for k, p in paths.items()}},
                 "extraction settings")
    units, per_unit, batches = _units(model, corpus, config)
    with contextlib.ExitStack() as locks:
        mains, plan, error = {}, None, None
        if rank == 0:  # rank 0 locks every store for the whole run and records the plan
            try:
                mains = {name: locks.enter_context(StoreWriter(paths[name], headers[name],
                                                               overwrite, world_size=world))
                         for name in paths}
                start = min(w.done for w in mains.values())
                plans = [shards.plan(w, start, units, config.batch_size, world)
                         for w in mains.values()]
                plan = (plans[0], {name: w.done for name, w in mains.items()})
            except StoreError as err:
                error = str(err)
        bounds, done = shards.share(plan) or (None, None)
        shards.gather_errors(error)
        error = None
        try:
            parts = {}
            for s in sites:
                lo, hi = shards.part_range(bounds, rank, done[s.name])
                if lo < hi:
                    parts[s.name] = locks.enter_context(shards.open_part(paths[s.name],
                                                                         headers[s.name], lo, hi))
            mine = [s for s in sites if s.name in parts]
            if mine:
                start = min(w.done for w in parts.values())
                stop = max(shards.part_range(bounds, rank, d)[1] for d in done.values())
                _run(model, mine, parts, batches(start, stop), stop, per_unit, config,
                     progress and rank == 0)
                for w in parts.values():
                    w.finish(n_units_total=int(w.manifest["units"]))
        except StoreError as err:
            error = str(err)
        shards.gather_errors(error)
        try:
            for name, w in mains.items():  # rank 0 only
                shards.merge(w, bounds, done[name])
        except StoreError as err:
            error = str(err)
        shards.gather_errors(error)  # every process returns the merged stores
    return {name: ActivationStore(path) for name, path in paths.items()}


def site_widths(model: Model, sites: list[Site]) -> dict[str, int]:
    """Each site's activation width, from one forward pass on two tokens."""
    ids = torch.zeros(1, 2, dtype=torch.long)
    outs = run_sites(model, sites, ids, torch.ones_like(ids))
    return {s.name: int(o.shape[-1]) for s, o in zip(sites, outs)}


def _header(model: Model, site: Site, d: int, config: ExtractConfig) -> dict:
    tok = model.tokenizer
    csv = str(config.corpus).endswith((".csv", ".tsv"))
    return {"model": model_name(model), "site": site.name, "module": site.module, "io": site.io,
            "d": d, "dtype": config.dtype,
            "tokenizer": getattr(tok, "name_or_path", "") or type(tok).__name__,
            "mode": config.mode, "pool": config.pool if config.mode == "sentences" else None,
            "ctx_len": config.ctx_len, "corpus": str(config.corpus),
            "text_column": config.text_column if csv else None,
            "seed": config.seed, "prepend_bos": config.prepend_bos,
            "exclude_bos": config.exclude_bos, "bos_token_id": document_separator(tok)}


def _token_batches(ctx, config: ExtractConfig, start: int, stop: int):
    """Batches of packed contexts ``start..stop``: (first_unit, ids, mask, index, keep)."""
    sep_rows = ctx.pos == -1
    for lo in range(start, stop, config.batch_size):
        hi = min(lo + config.batch_size, stop)
        ids = torch.from_numpy(ctx.tokens[lo:hi].astype(np.int64))
        keep = ~(sep_rows[lo:hi]) if config.exclude_bos else np.ones_like(sep_rows[lo:hi])
        index = np.empty(ids.shape, dtype=INDEX_DTYPE)
        index["token"], index["doc"] = ctx.tokens[lo:hi], ctx.doc[lo:hi]
        index["pos"] = ctx.pos[lo:hi]
        index["context"] = np.arange(lo, hi, dtype=np.int32)[:, None]
        index["offset"] = np.arange(ids.shape[1], dtype=np.int32)[None, :]
        yield lo, ids, torch.ones_like(ids), index, keep


def _sentence_batches(corpus: Corpus, tok, config: ExtractConfig, start: int, stop: int):
    texts = corpus.texts[start:stop]
    for rows, ids, mask in sentence_batches(texts, tok, config.batch_size, config.ctx_len,
                                            config.prepend_bos, sort_by_length=False):
        keep = mask.astype(bool)
        if config.prepend_bos and config.exclude_bos:
            keep[:, 0] = False
        index = np.empty(len(rows), dtype=INDEX_DTYPE)
        index["token"], index["pos"], index["offset"] = -1, -1, -1
        index["doc"] = index["context"] = rows + start
        yield int(rows[0]) + start, torch.from_numpy(ids), torch.from_numpy(mask), index, keep


def pool_rows(acts: torch.Tensor, keep: torch.Tensor, pool: str) -> torch.Tensor:
    """Pool ``(B, T, d)`` activations over the positions ``keep`` marks: ``(B, d)``."""
    keep = keep.to(acts.device)
    if pool == "max":
        return acts.masked_fill(~keep[..., None], float("-inf")).amax(dim=1)
    weights = keep.to(acts.dtype)
    return (acts * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1)


class _ShardBuffer:
    """Rows waiting for the next shard of one site, in one preallocated array (no growing
    lists, no concatenation copy at flush: memory stays flat however long the run)."""

    def __init__(self, capacity: int, d: int, dtype: str):
        self.acts = np.empty((capacity, d), dtype=dtype)
        self.index = np.empty(capacity, dtype=INDEX_DTYPE)
        self.n = 0

    def add(self, acts: np.ndarray, index: np.ndarray) -> None:
        if self.n + len(acts) > len(self.acts):  # a batch larger than planned: grow once
            grow = max(len(self.acts), self.n + len(acts))
            more = grow - self.n
            self.acts = np.concatenate([self.acts[: self.n],
                                        np.empty((more, self.acts.shape[1]), self.acts.dtype)])
            self.index = np.concatenate([self.index[: self.n], np.empty(more, INDEX_DTYPE)])
        self.acts[self.n : self.n + len(acts)] = acts
        self.index[self.n : self.n + len(acts)] = index
        self.n += len(acts)

    def flush(self, writer: StoreWriter, unit_end: int) -> None:
        if self.n and unit_end > writer.done:
            writer.write_shard(self.acts[: self.n], self.index[: self.n], unit_end)
        self.n = 0


def _run(model: Model, sites, writers, batches, units, per_unit, config, progress) -> None:
    d_max = max(w.manifest["d"] for w in writers.values())
    rows_per_shard = config.shard_rows or max(
        1, config.shard_mb * 2**20 // (d_max * np.dtype(config.dtype).itemsize))
    batch_rows = config.batch_size * (config.ctx_len if per_unit else 1)
    buffers = {s.name: _ShardBuffer(rows_per_shard + batch_rows, writers[s.name].manifest["d"],
                                    config.dtype) for s in sites}
    store_dtype = torch.float32 if config.dtype == "float32" else torch.float16
    start = min(w.done for w in writers.values())
    bar = tqdm(total=max(0, units - start) * (per_unit or 1), unit="tok" if per_unit else "text",
               unit_scale=True, disable=not progress, desc="extract")
    t0, seen, unit_end = time.perf_counter(), 0, start
    for lo, ids, mask, index, keep in batches:
        outs = run_sites(model, sites, ids, mask)
        unit_end = lo + len(ids)
        keep_t = torch.from_numpy(keep)
        for site, acts in zip(sites, outs):
            done = writers[site.name].done
            if unit_end <= done:  # this site's store already holds these units
                continue
            fresh = index["context"] >= done
            if config.mode == "tokens":
                rows = keep & fresh  # (B, T): real, non-BOS tokens not yet stored
                vals, meta = acts[torch.from_numpy(rows).to(acts.device)], index[rows]
            else:
                pooled = pool_rows(acts, keep_t, config.pool)  # (B, d)
                vals, meta = pooled[torch.from_numpy(fresh).to(acts.device)], index[fresh]
            buffers[site.name].add(vals.to(store_dtype).cpu().numpy(), meta)
        step = int(mask.sum()) if per_unit else len(ids)
        seen += step
        bar.update(step)
        if max(b.n for b in buffers.values()) >= rows_per_shard:
            for site in sites:
                buffers[site.name].flush(writers[site.name], unit_end)
    for site in sites:
        buffers[site.name].flush(writers[site.name], unit_end)
    bar.close()
    log.info("Extracted %d %s in %.1f s", seen, "tokens" if per_unit else "texts",
             time.perf_counter() - t0)


def pooled_activations(model: Model, texts: list[str], sites, pool: str = "mean",
                       batch_size: int = 32, max_len: int = 128, prepend_bos: bool = True,
                       progress: bool = False) -> dict[str, torch.Tensor]:
    """Sentence-level activations in memory: ``{site: (len(texts), d)}``, BOS and padding
    excluded from the pool. For a few thousand texts; use sentence-mode extraction beyond."""
    sites = resolve_sites(model, sites)
    out: dict[str, list] = {s.name: [None] * len(texts) for s in sites}
    batches = sentence_batches(list(texts), model.tokenizer, batch_size, max_len, prepend_bos)
    for rows, ids, mask in tqdm(batches, disable=not progress, desc="pool",
                                total=-(-len(texts) // batch_size)):
        keep = torch.from_numpy(mask.astype(bool))
        if prepend_bos:
            keep[:, 0] = False
        outs = run_sites(model, sites, torch.from_numpy(ids), torch.from_numpy(mask))
        for site, acts in zip(sites, outs):
            pooled = pool_rows(acts, keep, pool).float().cpu()
            for j, r in enumerate(rows):
                out[site.name][r] = pooled[j]
    return {name: torch.stack(vals) for name, vals in out.items()}
