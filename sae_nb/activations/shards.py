"""Sharded extraction: N processes write one store, each its own part, merged in one step.

Under ``torchrun --nproc_per_node N`` every process runs the model on its own block of units
(contexts in token mode, texts in sentence mode). The blocks are consecutive and start at batch
boundaries, so every forward pass sees exactly the batch a single process would have run::

    activations/<site>/manifest.json                 rank 0: the plan while running, then all
    activations/<site>/parts/part_<lo>_<hi>/         rank r's units lo..hi, a store of its own

Rank 0 holds the store's lock for the whole run and records the plan (``pending``: the number
of processes and the block bounds) before any part is written. After every part is complete,
rank 0 rewrites the manifest once, atomically, listing the parts' shards in unit order. The
merged store reads exactly like a single-process one: the same rows in the same order, the same
index, the same manifest except ``shards`` (their names, ``parts/<part>/shard_*``, sizes and
checksums); its ``stamps.json`` holds the parts' stamps under those names. A killed run
resumes with the same number of processes: each part resumes as a single-process store does.
Another number of processes is refused, naming the one to use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist

from sae_nb.activations.store import PARTS, StoreError, StoreWriter, read_manifest, read_stamps


class ShardError(StoreError):
    """The processes of a multi-process extraction disagree, or a part is missing."""


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def agree(value: Any, what: str) -> None:
    """Raise :class:`ShardError` on every process unless all hold the same ``value`` (a dict
    of settings), naming the settings that differ and the ranks holding them."""
    rank, world = rank_and_world()
    if world == 1:
        return
    values: list[Any] = [None] * world
    dist.all_gather_object(values, flatten(value))
    diffs = []
    for r, other in enumerate(values[1:], start=1):
        keys = sorted(set(values[0]) | set(other), key=str)
        diffs += [f"{k}={values[0].get(k)!r} on rank 0 vs {other.get(k)!r} on rank {r}"
                  for k in keys if values[0].get(k) != other.get(k)]
    if diffs:
        raise ShardError(f"The {world} processes were started with different {what}: "
                         f"{'; '.join(diffs)}. Start every process with the same command line "
                         f"(torchrun passes the same arguments to all).")


def flatten(value: dict, prefix: str = "") -> dict:
    """Nested dicts as one: ``{"config": {"n_tokens": 5}}`` -> ``{"config.n_tokens": 5}``."""
    flat = {}
    for key, item in value.items():
        if isinstance(item, dict) and item:
            flat.update(flatten(item, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = item
    return flat


def share(value: Any, src: int = 0) -> Any:
    """``value`` of process ``src``, on every process."""
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_errors(error: str | None) -> None:
    """Raise on every process when any process reports an error (a string), naming its rank;
    a barrier otherwise."""
    rank, world = rank_and_world()
    errors: list[str | None] = [None] * world
    dist.all_gather_object(errors, error)
    failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
    if failed:
        raise ShardError(f"Extraction failed on {len(failed)} of {world} processes: "
                         f"{' | '.join(failed)}")


def block_bounds(start: int, total: int, batch_size: int, world_size: int) -> list[int]:
    """``world_size + 1`` bounds splitting units ``start..total`` into consecutive blocks of
    whole batches (the last block takes the rest), as evenly as whole batches allow."""
    n_batches = -(-(total - start) // batch_size) if total > start else 0
    bounds = [min(total, start + (n_batches * r // world_size) * batch_size)
              for r in range(world_size)]
    return bounds + [total]


def part_name(lo: int, hi: int) -> str:
    return f"part_{lo:09d}_{hi:09d}"


def plan(writer: StoreWriter, start: int, total: int, batch_size: int,
         world_size: int) -> list[int]:
    """Rank 0: the block bounds of this run, recorded in the store's manifest as ``pending``
    before any part is written; a resumed run must find the same plan."""
    pending = writer.manifest.get("pending")
    if pending is not None and not writer.manifest["complete"]:
        if int(pending["units_total"]) != total:
            unit = "contexts" if writer.manifest["mode"] == "tokens" else "texts"
            raise ShardError(f"The store at {str(writer.path)!r} holds an unfinished extraction "
                             f"of {pending['units_total']} {unit}; this run asks for {total}. "
                             f"Finish that one first (the same n_tokens), then extend it, or "
                             f"pass overwrite=True (--overwrite) to start afresh.")
        return [int(b) for b in pending["bounds"]]
    bounds = block_bounds(start, total, batch_size, world_size)
    writer.record(pending={"world_size": world_size, "bounds": bounds, "units_total": total})
    return bounds


def part_range(bounds: list[int], rank: int, done: int) -> tuple[int, int]:
    """Units ``lo..hi`` of process ``rank``'s part for a site whose store already holds
    ``done`` units; empty (``lo == hi``) when the store has them all."""
    return max(bounds[rank], done), max(bounds[rank + 1], done)


def part_path(store_path: str | Path, lo: int, hi: int) -> Path:
    return Path(store_path) / PARTS / part_name(lo, hi)


def open_part(store_path: str | Path, header: dict, lo: int, hi: int) -> StoreWriter:
    """The writer of one part (a store of units ``lo..hi``), resuming a part a killed run left."""
    return StoreWriter(part_path(store_path, lo, hi), header, first_unit=lo)


def merge(writer: StoreWriter, bounds: list[int], done: int) -> None:
    """Rank 0, after every part is complete: list the parts' shards in the store's manifest in
    unit order and mark it complete, in one atomic write."""
    shards, rows, units = list(writer.manifest["shards"]), int(writer.manifest["rows"]), done
    for rank in range(len(bounds) - 1):
        lo, hi = part_range(bounds, rank, done)
        if lo == hi:
            continue
        folder = part_path(writer.path, lo, hi)
        part = read_manifest(folder)
        if not part["complete"] or int(part["units"]) != hi or units != lo:
            raise ShardError(f"Part {str(folder)!r} holds units up to {part['units']} of "
                             f"{lo}..{hi} (complete: {part['complete']}); run the extraction "
                             f"again with the same settings to finish it.")
        prefix = f"{PARTS}/{folder.name}/"
        for shard in part["shards"]:
            shards.append({**shard, "name": prefix + shard["name"],
                           "sha256": {prefix + f: h for f, h in shard.get("sha256", {}).items()}})
            rows += int(shard["rows"])
        writer.stamps.update({prefix + f: s for f, s in read_stamps(folder).items()})
        units = hi
    writer.manifest.update(shards=shards, rows=rows, units=units)
    writer.manifest.pop("pending", None)
    writer.finish(n_units_total=units)
