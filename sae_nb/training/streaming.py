"""Training without a store: activations streamed from the model through a shuffle buffer.

:class:`ActivationStream` packs the corpus into contexts exactly as token-mode extraction does
(same :class:`sae_nb.activations.extract.ExtractConfig`, same documents, contexts and BOS
handling), runs the model over them a few contexts at a time, and keeps the rows in a buffer as
dictionary_learning's ``ActivationBuffer`` does: refilled when half empty, batches drawn from it
at random without replacement (seeded). Iterating it yields training batches, so
``train_dictionary(stream, config)`` trains with no store on disk. The stream's position (the
contexts consumed), its sampling RNG and the rows still in the buffer go in the trainer's
checkpoint, so a resumed run continues exactly as an uninterrupted one.

Several sites read in one forward pass give one row per token per site (the same tokens, the
same order); :func:`train_sites` trains one dictionary per site on them in lockstep, each with
its own optimiser and state, so a layer-wise suite costs one forward pass per batch and equals
separate runs on the same rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from sae_nb.activations.corpora import load_corpus, pack_contexts
from sae_nb.activations.extract import ExtractConfig, check_ctx_len, resolve_sites, run_sites
from sae_nb.activations.models import Model, hf_model, model_name, resolve_device
from sae_nb.training.distributed import setup
from sae_nb.training.trainer import (
    TrainConfig,
    Training,
    TrainingError,
    TrainResult,
    check_checkpoint,
    check_same_data,
    data_identity,
    lock_checkpoint_dir,
    read_checkpoint,
)
from sae_nb.util.errors import SaeNbError
from sae_nb.util.heap import kept_heap
from sae_nb.util.io import atomic_open, jsonable

log = logging.getLogger(__name__)
SITES_CHECKPOINT = "sites_checkpoint.pt"  # train_sites: every site's state and the stream's


class StreamError(SaeNbError, ValueError):
    """Stream settings that cannot work; the message names the value and the fix."""


class ActivationStream:
    """Batches of ``batch_rows`` activation rows, computed from the model as they are needed.

    Yields ``(batch_rows, d)`` tensors for one site, ``{site: (batch_rows, d)}`` for several
    (the same tokens in every site). ``config`` (or keyword ``options``) says which contexts,
    as for token-mode extraction: ``n_tokens`` fed to the model, ``ctx_len``, ``batch_size``
    contexts per forward pass, ``seed`` for the document order, ``prepend_bos``/``exclude_bos``
    and ``dtype``, the precision rows are kept in (as a store would hold them). The buffer holds
    ``buffer_rows`` rows; with ``shuffle=False`` rows come out in corpus order, the order of a
    store extracted with the same config. The rows left over at the end (fewer than a batch)
    are dropped.
    """

    def __init__(self, model: Model, config: ExtractConfig | None = None, batch_rows: int = 4096,
                 buffer_rows: int = 65536, shuffle: bool = True, buffer_seed: int = 0,
                 **options):
        self.config = ExtractConfig(**{**(asdict(config) if config else {}), **options})
        if self.config.mode != "tokens":
            raise StreamError(f"mode={self.config.mode!r}: a stream yields token rows; use "
                              f"mode='tokens' (pooled sentences fit in a store).")
        self.batch_rows, self.buffer_rows = _positive("batch_rows", batch_rows), _positive(
            "buffer_rows", buffer_rows)
        if self.buffer_rows < self.batch_rows:
            raise StreamError(f"buffer_rows={buffer_rows} is smaller than one batch "
                              f"(batch_rows={batch_rows}); set buffer_rows >= batch_rows "
                              f"(dictionary_learning uses hundreds of batches).")
        self.shuffle, self.buffer_seed = bool(shuffle), int(buffer_seed)
        self.model = model
        check_ctx_len(model, self.config)
        self.sites = resolve_sites(model, self.config.sites)
        corpus = load_corpus(self.config.corpus, self.config.text_column)
        self.contexts = pack_contexts(corpus, model.tokenizer, self.config.ctx_len,
                                      -(-self.config.n_tokens // self.config.ctx_len),
                                      self.config.seed, self.config.prepend_bos)
        self.dtype = getattr(torch, self.config.dtype)
        self.device = next(hf_model(model).parameters()).device
        self.rng = torch.Generator().manual_seed(self.buffer_seed)
        self.next_context = 0  # contexts already run through the model
        self.yielded = 0  # batches
        self.buffer: dict[str, torch.Tensor] = {}  # site -> (n, d) rows
        self.read = torch.zeros(0, dtype=torch.bool)  # (n,): yielded already (dropped at refill)

    @property
    def names(self) -> list[str]:
        """The site names, in execution order (the keys of a multi-site batch)."""
        return [s.name for s in self.sites]

    def settings(self) -> dict[str, Any]:
        """What defines the batches: a checkpoint of another stream is refused."""
        return {"model": model_name(self.model), **jsonable(asdict(self.config)),
                "sites": self.names, "batch_rows": self.batch_rows,
                "buffer_rows": self.buffer_rows, "shuffle": self.shuffle,
                "buffer_seed": self.buffer_seed}

    def __iter__(self):
        return self

    def __next__(self):
        if self._unread() < max(self.buffer_rows // 2, self.batch_rows) and \
                self.next_context < len(self.contexts.tokens):
            self._refill()  # dictionary_learning's rule: refill when half empty
        n = self._unread()
        if n < self.batch_rows and not self.yielded:  # refilled: the corpus is spent
            raise StreamError(f"The {len(self.contexts.tokens)} contexts of corpus "
                              f"{self.config.corpus!r} give {n} rows, fewer than one batch "
                              f"(batch_rows={self.batch_rows}); raise n_tokens or lower "
                              f"batch_rows.")
        if n < self.batch_rows:
            raise StopIteration
        self.yielded += 1
        unread = (~self.read).nonzero()[:, 0]  # (n,) in buffer order
        pick = unread[torch.randperm(n, generator=self.rng)[: self.batch_rows] if self.shuffle
                      else slice(self.batch_rows)]  # (B,)
        self.read[pick] = True  # marked, not removed: no copy of the buffer per batch
        batch = {name: rows[pick.to(rows.device)].float() for name, rows in self.buffer.items()}
        return batch[self.names[0]] if len(self.sites) == 1 else batch  # (B, d) each

    def _unread(self) -> int:
        return int((~self.read).sum())

    def _unread_rows(self) -> dict[str, torch.Tensor]:
        keep = ~self.read
        return {name: rows[keep.to(rows.device)] for name, rows in self.buffer.items()}

    def _refill(self) -> None:
        """Run the model over the next contexts until the buffer holds ``buffer_rows`` rows."""
        ctx, cfg = self.contexts, self.config
        new: dict[str, list[torch.Tensor]] = {s.name: [] for s in self.sites}
        have = self._unread()
        while have < self.buffer_rows and self.next_context < len(ctx.tokens):
            lo, hi = self.next_context, min(self.next_context + cfg.batch_size, len(ctx.tokens))
            ids = torch.from_numpy(ctx.tokens[lo:hi].astype("int64"))  # (b, T)
            keep = torch.from_numpy(ctx.pos[lo:hi] != -1) if cfg.exclude_bos else \
                torch.ones(ids.shape, dtype=torch.bool)  # (b, T): BOS rows are attention sinks
            for site, acts in zip(self.sites, run_sites(self.model, self.sites, ids,
                                                        torch.ones_like(ids))):
                new[site.name].append(acts[keep.to(acts.device)].to(self.dtype))  # (rows, d)
            have += int(keep.sum())
            self.next_context = hi
        old = self._unread_rows()
        for name, parts in new.items():
            self.buffer[name] = torch.cat(([old[name]] if name in old else []) + parts)
        self.read = torch.zeros(have, dtype=torch.bool)

    def state_dict(self) -> dict[str, Any]:
        """The stream's position: contexts consumed, sampling RNG, rows still in the buffer."""
        return {"settings": self.settings(), "next_context": self.next_context,
                "yielded": self.yielded,
                "rng": self.rng.get_state(),
                "buffer": {name: rows.cpu() for name, rows in self._unread_rows().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where :meth:`state_dict` was taken, refusing another stream's state."""
        mine = self.settings()
        differ = [f"{k}={state['settings'].get(k)!r} (checkpoint) vs {mine[k]!r} (now)"
                  for k in mine if state["settings"].get(k) != mine[k]]
        if differ:
            raise StreamError(f"The checkpoint's stream had other settings: {'; '.join(differ)}. "
                              f"Use the same stream settings, or delete the checkpoint.")
        self.next_context, self.yielded = int(state["next_context"]), int(state["yielded"])
        self.rng.set_state(state["rng"])
        self.buffer = {name: rows.to(self.device) for name, rows in state["buffer"].items()}
        self.read = torch.zeros(len(next(iter(self.buffer.values()), [])), dtype=torch.bool)


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StreamError(f"{name}={value!r}; use a whole number of rows, at least 1.")
    return value


def train_sites(batches: Iterable, config: TrainConfig | None = None, progress: bool = True,
                resume: bool = True, dictionaries: dict[str, str | tuple[str, str]] | None = None,
                **options) -> dict[str, TrainResult]:
    """Several dictionaries trained in lockstep on ``{site: (B, d)}`` batches (an
    :class:`ActivationStream` over several sites): each result equals ``train_dictionary`` on
    its rows alone. ``dictionaries`` names what to train, ``{name: site}`` (an SAE) or
    ``{name: (input_site, target_site)}`` (a transcoder, e.g. ``("mlp_in_layer3",
    "mlp_out_layer3")``); None: an SAE at every site of the batches, named by its site.
    Every dictionary gets ``config`` (its metadata gains ``site`` and, for a transcoder,
    ``target_site``); with ``checkpoint_dir`` one checkpoint holds them all and the stream's
    position, and training resumes from it, refusing other data (as ``train_dictionary``
    does); the run holds the checkpoint folder's lock. One process only for now (not under
    torchrun).
    """
    cfg = TrainConfig(**{**(asdict(config) if config else {}), **options})
    if setup().world > 1:
        raise TrainingError("train_sites runs in one process; under torchrun train one site "
                            "per job with train_dictionary.")
    lock = lock_checkpoint_dir(cfg.checkpoint_dir)
    try:
        with kept_heap():  # the steps reuse freed memory instead of faulting in fresh pages
            return _train_sites(batches, cfg, progress, resume, dictionaries)
    finally:
        if lock is not None:
            lock.close()


def _pairs(dictionaries: dict | None, sites: list[str]) -> dict[str, tuple[str, str]]:
    """``{name: (input_site, target_site)}``, each site checked against the batches'."""
    if dictionaries is None:
        return {site: (site, site) for site in sites}
    if not isinstance(dictionaries, dict) or not dictionaries:
        raise TrainingError(f"dictionaries={dictionaries!r}; give a dict {{name: site}} or "
                            f"{{name: (input_site, target_site)}}, e.g. {{'tc3': "
                            f"('mlp_in_layer3', 'mlp_out_layer3')}}.")
    pairs = {}
    for name, what in dictionaries.items():
        pair = (what, what) if isinstance(what, str) else tuple(what)
        if len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            raise TrainingError(f"dictionaries[{name!r}]={what!r}; give a site or a pair "
                                f"(input_site, target_site).")
        missing = [p for p in pair if p not in sites]
        if missing:
            raise TrainingError(f"dictionaries[{name!r}] reads site {missing[0]!r}, which the "
                                f"batches do not hold (they hold {', '.join(sites)}); add it "
                                f"to the stream's sites.")
        pairs[name] = pair
    return pairs


def _site_batch(batch: dict, pair: tuple[str, str]):
    return batch[pair[0]] if pair[0] == pair[1] else (batch[pair[0]], batch[pair[1]])


def _train_sites(batches: Iterable, cfg: TrainConfig, progress: bool, resume: bool,
                 dictionaries: dict | None = None) -> dict[str, TrainResult]:
    """:func:`train_sites` once the checkpoint folder is held."""
    device = resolve_device(cfg.device)
    stream = batches if callable(getattr(batches, "load_state_dict", None)) else None
    ckpt = Path(cfg.checkpoint_dir) / SITES_CHECKPOINT if cfg.checkpoint_dir else None
    saved = read_checkpoint(ckpt, cfg) if resume and ckpt is not None and ckpt.exists() else None
    if saved is not None and stream is not None:
        stream.load_state_dict(saved["source"])
    it = iter(batches)
    first = next(it, None)
    if not isinstance(first, dict) or not first:
        raise TrainingError("train_sites needs batches {site: (B, d)} (an ActivationStream "
                            f"over several sites); got {type(first).__name__}. For one site "
                            "use train_dictionary.")
    pairs = _pairs(dictionaries, list(first))
    runs = {}
    for name, (site, target) in pairs.items():
        meta = {**cfg.metadata, "site": site, **({"target_site": target} if target != site
                                                  else {})}
        x, y = first[site], first[target]
        runs[name] = Training(x, y, replace(cfg, metadata=meta), device=device,
                              progress=progress)
        # each dictionary's rows, by content
        runs[name].data = data_identity(batches, x, y, replayed=stream is None)
    if saved is not None:
        _restore(runs, saved, ckpt)
        if stream is None:
            for _ in range(next(iter(runs.values())).state["step"] - 1):
                next(it, None)
            first = None
    lead = next(iter(runs.values()))
    while not lead.done:
        batch = first if first is not None else next(it, None)
        first = None
        if batch is None:
            log.warning("Batches ran out after %d of %d steps.", lead.state["step"], lead.steps)
            break
        for name, run in runs.items():
            run.step(_site_batch(batch, pairs[name]))
        every = cfg.checkpoint_every
        if ckpt is not None and every and not lead.state["step"] % every:
            _save(ckpt, cfg, runs, stream)
    if ckpt is not None:
        _save(ckpt, cfg, runs, stream)
    return {name: run.finish() for name, run in runs.items()}


def _save(path: Path, cfg: TrainConfig, runs: dict[str, Training], stream) -> None:
    """Every site and the stream in one file, written atomically: they cannot disagree."""
    payload = {"config": jsonable(asdict(cfg)),
               "sites": {name: run.payload() for name, run in runs.items()}}
    if stream is not None:
        payload["source"] = stream.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        torch.save(payload, f)


def _restore(runs: dict[str, Training], saved: dict, path: Path) -> None:
    if set(saved["sites"]) != set(runs):
        raise TrainingError(f"The checkpoint {str(path)!r} holds sites {sorted(saved['sites'])}, "
                            f"the batches {sorted(runs)}; delete it to train afresh.")
    for name, run in runs.items():
        check_checkpoint(path, saved["sites"][name], run.cfg)
        check_same_data(path.parent, saved["sites"][name].get("data"), run.data,
                        f"site {name!r}'s batches")
        run.restore(saved["sites"][name], path)
