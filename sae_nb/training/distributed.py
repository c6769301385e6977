"""Data-parallel training over ``torch.distributed``: the ranks of a ``torchrun`` job as one group.

``torchrun --nproc_per_node N script.py`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` ... in their environment; :func:`setup` turns that into a process group (or
reuses one the caller initialised) and returns a :class:`Group`, whose collectives the trainer
calls. Outside such a job it returns a one-rank group whose collectives do nothing, so the
single-process path is unchanged.

Every rank holds the whole dictionary (plain data parallelism): each reads its own slice of
every global batch, gradients are summed by one all-reduce per step, and whatever depends on
the whole batch (dead latents, BatchTopK's threshold, AuxK's normaliser, the logged metrics)
is reduced, so the ranks stay identical and the result equals a one-process run on the same
global batches. :func:`rank_batches` reads a rank's slice of the store's shuffled batches.

Backends: gloo for CPU tensors; NCCL for CUDA tensors when every local rank has its own GPU,
else gloo (several ranks sharing one GPU, as tests/test_gpu.py does), with CUDA tensors staged
through the host for the collectives gloo lacks on CUDA.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sae_nb.util.checks import whole_number
from sae_nb.util.errors import SaeNbError

log = logging.getLogger(__name__)


class DistributedError(SaeNbError, ValueError):
    """The ranks of a job disagree (data, settings, files), or its batches cannot be shared out:
    the message names them and the fix."""


def torchrun_environment() -> bool:
    """Whether this process was started as one of several ranks (torchrun's variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _backend() -> str:
    """gloo for CPU tensors; NCCL for CUDA ones when each local rank has its own GPU."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if torch.cuda.is_available() and dist.is_nccl_available() and \
            torch.cuda.device_count() >= local_world:
        return "cpu:gloo,cuda:nccl"
    return "gloo"


class Group:
    """The ranks training together. With ``world == 1`` every collective returns its input."""

    def __init__(self, world: int = 1, rank: int = 0, backend: str = ""):
        self.world, self.rank, self.backend = world, rank, backend

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints and saves results."""
        return self.rank == 0

    def _run(self, tensor: torch.Tensor, op) -> torch.Tensor:
        """Apply collective ``op`` in place, through a host copy where gloo serves CUDA."""
        if tensor.is_cuda and "nccl" not in self.backend:
            host = tensor.cpu()
            op(host)
            return tensor.copy_(host)
        op(tensor)
        return tensor

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce ``tensor`` in place: the sum over ranks, identical on every rank."""
        if self.world > 1:
            self._run(tensor, lambda t: dist.all_reduce(t, dist.ReduceOp.SUM))
        return tensor

    def min_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            self._run(tensor, lambda t: dist.all_reduce(t, dist.ReduceOp.MIN))
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape on each) concatenated along dim 0, in rank order:
        the global batch when each rank holds its slice."""
        if self.world == 1:
            return tensor
        tensor = tensor.contiguous()
        staged = tensor.cpu() if tensor.is_cuda and "nccl" not in self.backend else tensor
        parts = [torch.empty_like(staged) for _ in range(self.world)]
        dist.all_gather(parts, staged)
        return torch.cat(parts).to(tensor.device)

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's picklable ``value``, in rank order."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def same_everywhere(self, what: str, value: Any, fix: str) -> None:
        """Raise :class:`DistributedError` on every rank unless all ranks hold the same
        ``value`` (JSON-able), naming the ranks that differ from rank 0 and ``fix``."""
        values = self.gather_objects(value)
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            shown = "; ".join(_difference(values[0], values[r], r) for r in differ[:3])
            raise DistributedError(f"The {self.world} ranks disagree on {what}: {shown}. {fix}")

    def average_gradients(self, params: list[torch.nn.Parameter],
                          extra: torch.Tensor | None = None) -> torch.Tensor | None:
        """Replace each parameter's gradient by its mean over ranks, in one all-reduce of one
        flat buffer; ``extra`` (float, summed rather than averaged) rides along and is returned
        summed, e.g. how many ranks saw each latent fire."""
        if self.world == 1:
            return extra
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads] + ([extra] if extra is not None else []))
        self.sum_(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g)).div_(self.world)
            offset += g.numel()
        return flat[offset:] if extra is not None else None

    def checksum(self, module: torch.nn.Module) -> list[float]:
        """Each tensor's sum and norm in float64 (no copy of the weights): equal on ranks
        holding the same weights."""
        with torch.no_grad():
            return [float(f(t.detach(), dtype=torch.float64)) for t in module.state_dict().values()
                    for f in (torch.sum, torch.linalg.vector_norm)]


def _difference(first: Any, other: Any, rank: int) -> str:
    """``key=a (rank 0) vs b (rank r)`` for the keys of two dicts that differ, else the values."""
    if isinstance(first, dict) and isinstance(other, dict):
        keys = [k for k in sorted(set(first) | set(other), key=str) if first.get(k) != other.get(k)]
        return ", ".join(f"{k}={_short(first.get(k))} (rank 0) vs {_short(other.get(k))} "
                         f"(rank {rank})" for k in keys)
    return f"{_short(first)} (rank 0) vs {_short(other)} (rank {rank})"


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value
    return text if len(text) < 200 else text[:200] + "..."


ONE_PROCESS = Group()
_created_here = False


def setup() -> Group:
    """The group of this job: an already initialised default process group, else one made from
    torchrun's environment variables, else :data:`ONE_PROCESS`."""
    global _created_here
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_world_size(), dist.get_rank(), str(dist.get_backend()))
    if not (dist.is_available() and torchrun_environment()):
        return ONE_PROCESS
    backend = _backend()
    if "nccl" in backend:
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    dist.init_process_group(backend)
    _created_here = True
    atexit.register(shutdown)
    log.info("Rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return Group(dist.get_world_size(), dist.get_rank(), backend)


def shutdown() -> None:
    """Destroy the process group if :func:`setup` created it (called at exit), after a barrier:
    a rank that tore its gloo connections down while another still talked to it aborted
    ("terminate called without an active exception") once rank 0 saved while rank 1 exited."""
    global _created_here
    if _created_here and dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # a peer is gone (it failed, torchrun stops us): just tear down
            pass
        dist.destroy_process_group()
    _created_here = False


def is_main_process() -> bool:
    """True outside a distributed job and on rank 0 of one: the process that saves results."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def rank_device(device: torch.device, group: Group) -> torch.device:
    """A CUDA device per local rank (``cuda:LOCAL_RANK`` modulo the GPUs present)."""
    if device.type == "cuda" and group.world > 1 and device.index is None:
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return device


def batch_metrics(out, y: torch.Tensor, group: Group) -> dict[str, float]:
    """Loss, MSE, L0 and FVU of the global batch (this rank's rows are a slice of it)."""
    if group.world == 1:
        return {"loss": float(out.loss.detach()), "mse": float(out.mse), "l0": out.l0,
                "fvu": out.fvu}
    with torch.no_grad():
        means = torch.stack([out.loss.detach().double(), out.mse.double(),
                             torch.tensor(out.l0, dtype=torch.float64, device=y.device)])
        loss, mse, l0 = (group.sum_(means) / group.world).tolist()  # means of equal slices
        rows = len(y) * group.world
        centre = group.sum_(y.double().sum(0)) / rows  # (D,)
        spread = float(group.sum_((y.double() - centre).pow(2).sum()))
    return {"loss": loss, "mse": mse, "l0": l0, "fvu": mse * rows / max(spread, 1e-12)}


def rank_slice(i: int, x: torch.Tensor, y: torch.Tensor, group: Group):
    """This rank's rows of global batch ``i``: the ``rank``-th of ``world`` equal parts."""
    if group.world == 1:
        return x, y
    if len(x) % group.world:
        raise DistributedError(f"Batch {i} has {len(x)} rows, which {group.world} ranks cannot "
                               f"share evenly. Use a batch size divisible by {group.world} (and "
                               f"drop_last=True, so that the last batch is whole too), or a number "
                               f"of ranks that divides {len(x)}.")
    part = len(x) // group.world
    lo = group.rank * part
    return x[lo:lo + part], y[lo:lo + part]


def first_global_batch(group: Group, settings: dict, batches, local: bool, x, y):
    """The whole first global batch on every rank (initialisation and input scale use it),
    after checking that the ranks train the same thing on the same data."""
    group.same_everywhere("the training settings", settings,
                          "Launch every rank with the same configuration.")
    if local:
        group.same_everywhere("the data", getattr(batches, "identity", None),
                              "Every rank must read the same store (same extraction, rows, "
                              "batch size and seed); point all ranks at one run folder.")
        group.same_everywhere("the rows per rank", len(x), "Every rank needs equal slices.")
        return group.gather(x), group.gather(y)
    group.same_everywhere("the first global batch (shape, SHA-256)", [list(x.shape),
                                                                      batch_digest(x, y)],
                          "Every rank must iterate over the same global batches (same store, "
                          "seed and batch size); each takes its own slice of each.")
    return x, y


def batch_digest(x: torch.Tensor, y: torch.Tensor) -> str:
    """The first 16 hex digits of the SHA-256 of a batch's float32 bytes, input then target."""
    return hashlib.sha256(x.detach().float().cpu().numpy().tobytes()
                          + y.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def check_batch_size(batch_size) -> int:
    """``batch_size`` as an int of at least one row, else :class:`DistributedError` naming it
    (0 once surfaced as a ZeroDivisionError, a negative one as an endless empty epoch)."""
    return whole_number("batch_size", batch_size, 1, DistributedError,
                        example="--batch-size 4096 (batch_size=4096 in Python)")


class RankBatches:
    """This rank's slice of every batch ``store.batches(batch_size, shuffle=True, seed=seed,
    rows=rows, epochs=epochs, drop_last=True)`` yields: the same global batches, each rank
    reading only its ``batch_size / world`` rows of each. ``train_dictionary`` recognises it
    (``rank_local``) and checks that every rank reads the same store (``identity``)."""

    rank_local = True

    def __init__(self, store, batch_size: int, seed: int = 0, rows=None, epochs: int | None = None,
                 group: Group | None = None):
        self.group = group or setup()
        batch_size = check_batch_size(batch_size)
        if batch_size % self.group.world:
            raise DistributedError(f"batch_size={batch_size} cannot be split over "
                                   f"{self.group.world} ranks; use a multiple of "
                                   f"{self.group.world} (e.g. "
                                   f"{max(1, batch_size // self.group.world) * self.group.world}).")
        self.store, self.batch_size, self.seed, self.rows, self.epochs = \
            store, batch_size, seed, rows, epochs
        self.subset = np.arange(len(store))[rows] if rows is not None else np.arange(len(store))
        if len(self.subset) < batch_size:
            raise DistributedError(f"The store at {str(store.path)!r} has {len(self.subset)} rows "
                                   f"to batch, fewer than one batch of {batch_size}; lower "
                                   f"batch_size or extract more.")
        self.identity = store_identity(store, rows, batch_size, seed)

    def __iter__(self) -> Iterator[torch.Tensor]:
        # The permutation of ActivationStore.batches (tests/test_distributed.py checks it).
        rng = np.random.default_rng(self.seed)
        b = self.batch_size // self.group.world
        lo = self.group.rank * b
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            epoch += 1
            order = self.subset[rng.permutation(len(self.subset))]
            for start in range(0, len(order) - len(order) % self.batch_size, self.batch_size):
                yield torch.from_numpy(self.store[order[start + lo:start + lo + b]])


def rank_batches(store, batch_size: int, seed: int = 0, rows=None,
                 epochs: int | None = None) -> RankBatches:
    """This rank's part of the store's shuffled global batches of ``batch_size`` rows (the
    whole batches outside a distributed job); see :class:`RankBatches`."""
    return RankBatches(store, batch_size, seed, rows, epochs)


def store_identity(store, rows, batch_size: int, seed: int) -> dict[str, Any]:
    """What makes two ranks' batches the same: the manifest's identity and shard checksums,
    the rows used, batch size and seed."""
    m = store.manifest
    shards = [(s["rows"], sorted(s.get("sha256", {}).values())) for s in m["shards"]]
    digest = hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]
    return {"model": m.get("model"), "site": m.get("site"), "corpus": m.get("corpus"),
            "rows": len(store), "shard_checksums": digest, "used_rows": str(rows),
            "batch_size": batch_size, "seed": seed}
