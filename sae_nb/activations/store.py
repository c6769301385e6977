"""The on-disk activation store: sharded, memory-mapped, crash-safe.

One store per site, a folder::

    manifest.json              what the rows are (model, site, width, dtype, corpus, ...)
    shard_00000.npy            (rows, d) activations, float16 or float32
    shard_00000.index.npy      (rows,) per-row token id, document, position, context, offset
    stamps.json                each shard file's size and mtime (ns) when its SHA-256 was taken
    writer.lock                held by the one extraction writing the store; names it
    parts/part_<lo>_<hi>/      a multi-process extraction's part (units lo..hi), itself a store;
                               the merged manifest lists its shards as ``parts/<part>/shard_*``

A shard is written to a temporary name and renamed into place; the manifest is rewritten the
same way after each shard. Readers trust only the manifest, so a killed extraction leaves
complete shards or nothing, and a rerun resumes after the last shard the manifest lists. A
writer holds an OS lock on ``writer.lock`` while it writes; a second writer is refused.

A shard's name must be one of this store's (``shard_<n>``, ``parts/part_<lo>_<hi>/shard_<n>``):
a manifest naming a file elsewhere is refused, and :func:`shard_files` is the one list of files
the reader opens and every check reads. The manifest records each shard file's SHA-256, and
``stamps.json`` its size and modification time. Every open (a reader, a resumed or rerun
extraction) compares those with one ``stat`` per file and hashes only a file whose stamp
changed (a copy, a restore, changed bytes) or was taken in the same clock tick as the record;
a reader that hashes a file and finds it intact records its new stamp, so a copied store is
hashed once. :meth:`ActivationStore.verify` hashes every file (a full read), which also finds
bytes changed by a writer that put the mtime back.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sae_nb.activations.corpora import token_strings
from sae_nb.util.errors import SaeNbError
from sae_nb.util.io import (
    TMP_SUFFIX,
    LockHeld,
    atomic_save_npy,
    atomic_write_bytes,
    changed_file,
    file_sha256,
    file_stamp,
    hold_lock,
    lock_holder,
)

STORE_FORMAT = "sae_nb.activation_store"
STORE_VERSION = 1
MANIFEST = "manifest.json"
STAMPS = "stamps.json"  # {file: {size, mtime_ns, sha256}}: a cache; deleting it costs one hash
LOCK_FILE = "writer.lock"  # held (flock) by the one writer of a store; names it
PARTS = "parts"  # sub-folder of a multi-process extraction's parts (sae_nb.activations.shards)
# Every name a shard of a store may have: never a path out of the store's folder.
SHARD_NAME = re.compile(rf"(?:{PARTS}/part_[0-9]+_[0-9]+/)?shard_[0-9]+")
# Per row: the token id (-1 in sentence mode), its document and position in the document's
# tokens, and the context (token mode) or sentence (sentence mode) it belongs to, with its
# offset inside that context (-1 in sentence mode).
INDEX_DTYPE = np.dtype([("token", "<i4"), ("doc", "<i4"), ("pos", "<i4"),
                        ("context", "<i4"), ("offset", "<i4")])
# Fields that define what the rows are; a resumed run must agree on all of them.
IDENTITY = ("model", "site", "module", "io", "d", "dtype", "tokenizer", "mode", "pool",
            "ctx_len", "corpus", "text_column", "seed", "prepend_bos", "exclude_bos")


class StoreError(SaeNbError, RuntimeError):
    """A store is missing, damaged, or was written with other settings than asked for."""


def _lock_store(folder: Path):
    """Hold the store's writer lock for as long as the returned file stays open (the OS drops
    it when the writer closes it or dies, however it dies)."""
    try:
        return hold_lock(folder / LOCK_FILE)
    except LockHeld as held:
        raise StoreError(f"The store at {str(folder)!r} is being written by another extraction "
                         f"({held.holder}). Two writers would corrupt it: wait for that one to "
                         f"finish (or stop it), or extract into another run_dir.") from None


class StoreWriter:
    """Appends shards to one site's store and keeps its manifest current.

    ``done`` is the number of units (contexts in token mode, sentences in sentence mode) the
    manifest already covers; the extractor skips rows of units below it.

    A writer holds the store's lock from its creation to :meth:`finish` or :meth:`close` (or
    its process's end): a second writer of the same store gets a StoreError naming the first.

    ``first_unit`` is where a new store's units start (a part of a multi-process extraction
    holds units ``first_unit..``); ``world_size`` is the number of processes extracting: a store
    that an extraction on another number of processes left unfinished is refused.
    """

    def __init__(self, path: str | Path, header: dict[str, Any], overwrite: bool = False,
                 first_unit: int = 0, world_size: int = 1):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_store(self.path)  # before anything is read, deleted or written
        try:
            self._open(header, overwrite, first_unit, world_size)
        except BaseException:
            self.close()
            raise

    def _open(self, header: dict[str, Any], overwrite: bool, first_unit: int,
              world_size: int) -> None:
        for stale in self.path.glob(f"*{TMP_SUFFIX}"):  # leftovers of a killed write
            stale.unlink()
        old = self.path / MANIFEST
        if old.exists() and not overwrite:
            self.manifest = read_manifest(self.path)
            _check_identity(self.path, self.manifest, header)
            _check_world_size(self.path, self.manifest, world_size)
            # A resume would append to damaged shards, a rerun of a finished store would
            # return them as done: check them first (a stat per file, a hash where one changed).
            damaged, _ = check_shards(self.path, self.manifest)
            if damaged:
                what = "resumed" if not self.manifest["complete"] else "used or extended"
                raise StoreError(f"The store at {str(self.path)!r} is damaged and cannot be "
                                 f"{what}: {'; '.join(damaged)}. {REEXTRACT}")
            self.stamps = read_stamps(self.path)
            self.manifest["complete"] = False
        else:
            for shard in self.path.glob("shard_*.npy"):
                shard.unlink()
            shutil.rmtree(self.path / PARTS, ignore_errors=True)
            self.manifest = {"format": STORE_FORMAT, "version": STORE_VERSION, **header,
                             "rows": 0, "units": int(first_unit), "complete": False,
                             "shards": []}
            self.stamps = {}
            self._write_manifest()

    def close(self) -> None:
        """Release the store's lock (idempotent; the OS also releases it at process exit)."""
        if getattr(self, "_lock", None) is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def done(self) -> int:
        return int(self.manifest["units"])

    def write_shard(self, acts: np.ndarray, index: np.ndarray, units_end: int) -> None:
        """Persist one shard holding every row of units ``[done, units_end)``."""
        if len(acts) != len(index) or acts.ndim != 2 or acts.shape[1] != self.manifest["d"]:
            raise StoreError(f"Shard shape {acts.shape} / {len(index)} index rows does not fit "
                             f"a store of width {self.manifest['d']}.")
        name = f"shard_{len(self.manifest['shards']):05d}"
        atomic_save_npy(self.path / f"{name}.npy", acts.astype(self.manifest["dtype"], copy=False))
        atomic_save_npy(self.path / f"{name}.index.npy", index.astype(INDEX_DTYPE, copy=False))
        # Hash what landed on disk (from the page cache: no second disk read), for verify(),
        # and stamp it, so that an open compares sizes and mtimes instead of hashing.
        sha256 = {f: file_sha256(self.path / f) for f in (f"{name}.npy", f"{name}.index.npy")}
        self.stamps.update({f: {**file_stamp(self.path / f), "sha256": digest}
                            for f, digest in sha256.items()})
        self.manifest["shards"].append({"name": name, "rows": int(len(acts)),
                                        "units": [self.done, int(units_end)], "sha256": sha256})
        self.manifest["rows"] += int(len(acts))
        self.manifest["units"] = int(units_end)
        self._write_manifest()

    def set_units_total(self, units: int) -> None:
        """Record how many units the running extraction will hold, so that an interrupted
        store can say how far it got."""
        self.manifest["n_units_total"] = int(units)
        self._write_manifest()

    def record(self, **fields: Any) -> None:
        """Set manifest fields (None removes one) and write the manifest."""
        for key, value in fields.items():
            if value is None:
                self.manifest.pop(key, None)
            else:
                self.manifest[key] = value
        self._write_manifest()

    def finish(self, **extra: Any) -> None:
        """Mark the store complete and release its lock."""
        self.manifest.update(extra, complete=True)
        self._write_manifest()
        self.close()

    def _write_manifest(self) -> None:
        """The manifest, then the stamps (written after it: a shard the manifest lists but no
        stamp does is hashed on its next open, never trusted)."""
        data = json.dumps(self.manifest, indent=1).encode()
        atomic_write_bytes(self.path / MANIFEST, data)
        atomic_write_bytes(self.path / STAMPS, json.dumps(self.stamps, indent=1).encode())


def read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.exists():
        raise StoreError(f"No activation store at {str(path)!r} (no {MANIFEST}). Run notebook 01 "
                         f"(sae_nb.extract_activations) to create it.")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise StoreError(f"{str(file)!r} is not valid JSON ({err}); delete the store and "
                         f"extract again.") from None
    if manifest.get("format") != STORE_FORMAT:
        raise StoreError(f"{str(file)!r} is not an sae_nb activation store manifest.")
    if manifest.get("version", 0) > STORE_VERSION:
        raise StoreError(f"Store {str(path)!r} has format version {manifest['version']}; this "
                         f"sae_nb reads up to {STORE_VERSION}. Upgrade sae_nb.")
    return manifest


def _check_world_size(path: Path, manifest: dict, world_size: int) -> None:
    """Refuse to resume an extraction that another number of processes left unfinished: its
    parts split the units for that number (``pending``), a single process leaves none."""
    if manifest["complete"]:
        return
    before = int(manifest.get("pending", {}).get("world_size", 1))
    if before != world_size:
        how = ("with a single process (python -m sae_nb extract, or notebook 01)" if before == 1
               else f"on {before} processes (torchrun --nproc_per_node {before} -m sae_nb "
                    f"extract ...)")
        raise StoreError(f"The store at {str(path)!r} holds an extraction that {before} "
                         f"process(es) left unfinished; this one runs on {world_size}. Resume it "
                         f"{how} with the same settings, or pass overwrite=True (--overwrite) to "
                         f"extract it afresh.")


def _check_identity(path: Path, manifest: dict, header: dict) -> None:
    diffs = [f"{k}={manifest.get(k)!r} (stored) vs {header.get(k)!r} (asked)"
             for k in IDENTITY if manifest.get(k) != header.get(k)]
    if diffs:
        raise StoreError(f"The store at {str(path)!r} was written with other settings: "
                         f"{'; '.join(diffs)}. Use another run_dir, or overwrite=True to "
                         f"replace it.")


REEXTRACT = ("Extract it again: rerun notebook 01 (sae_nb.extract_activations) with "
             "overwrite=True, or delete the store's folder first.")


def shard_files(path: Path, manifest: dict) -> list[tuple[str, str]]:
    """The ``(activations, index)`` file names of every shard the manifest lists, relative to
    the store: the one list the reader opens and every check reads. A name that is not one of
    a store's shard names (``../..``, an absolute path) raises :class:`StoreError` naming it."""
    files = []
    for i, shard in enumerate(manifest["shards"]):
        name = shard.get("name") if isinstance(shard, dict) else None
        if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
            raise StoreError(f"{str(path / MANIFEST)!r}: shard {i} is named {name!r}, a file "
                             f"outside the store's shards (shard_<n>, or {PARTS}/part_<lo>_<hi>/"
                             f"shard_<n>); a manifest naming files elsewhere is refused. "
                             f"{REEXTRACT}")
        files.append((f"{name}.npy", f"{name}.index.npy"))
    return files


def read_stamps(path: Path) -> dict[str, dict]:
    """The store's recorded file stamps; none when the file is absent or unreadable (a store
    written before stamps, a damaged cache): those files are then hashed on open."""
    try:
        stamps = json.loads((path / STAMPS).read_text())
    except (OSError, ValueError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def check_shards(path: Path, manifest: dict,
                 full: bool = False) -> tuple[list[str], dict[str, dict]]:
    """``(damaged, confirmed)``: what is wrong with each shard file the manifest lists (missing,
    changed since it was written, or without a recorded checksum), and the fresh stamps of the
    files a hash found intact although their stamps had changed.

    Without ``full``, a file whose size and mtime match its stamp is not read (see
    :func:`sae_nb.util.io.changed_file`); with ``full``, every file is hashed. A store written
    before checksums is checked for missing files only."""
    files = shard_files(path, manifest)
    stamps, stamped_ns = {}, None
    if not full:
        stamps = read_stamps(path)
        try:
            stamped_ns = (path / STAMPS).stat().st_mtime_ns
        except OSError:
            stamps = {}
    damaged, confirmed = [], {}
    for shard, names in zip(manifest["shards"], files):
        recorded = shard.get("sha256")
        for name in names:
            if recorded is None:  # written before checksums: only its presence can be checked
                if not (path / name).is_file():
                    damaged.append(f"{name} is missing")
                continue
            digest = recorded.get(name) if isinstance(recorded, dict) else None
            if not isinstance(digest, str):
                damaged.append(f"{name} (shard {shard['name']!r}) has no checksum recorded in "
                               f"the manifest, so what it holds cannot be checked")
                continue
            problem, fresh = changed_file(path / name, digest, stamps.get(name), stamped_ns)
            if problem:
                damaged.append(f"{name} {problem}")
            elif fresh is not None:
                confirmed[name] = {**fresh, "sha256": digest}
    return damaged, confirmed


def _refresh_stamps(path: Path, confirmed: dict[str, dict]) -> None:
    """Record the stamps of files a hash just found intact (a copied or restored store), so
    that the next open reads none of them. Best effort: a store that cannot be written (a
    read-only disk) is simply hashed again next time. Stamps are bound to the checksum they
    were confirmed against, so one written beside another writer's never vouches for other
    bytes; a lost update costs a hash, never trust."""
    stamps = read_stamps(path)
    stamps.update(confirmed)
    try:
        atomic_write_bytes(path / STAMPS, json.dumps(stamps, indent=1).encode())
    except OSError:
        pass


def _incomplete_message(path: Path, manifest: dict) -> tuple[str, str]:
    """How far an interrupted (or running) extraction got, in rows and units of how many; and
    what to do about it."""
    unit = "contexts" if manifest["mode"] == "tokens" else "texts"
    rows, done, total = manifest["rows"], manifest["units"], manifest.get("n_units_total")
    pending = manifest.get("pending")
    if pending:  # a multi-process extraction: its parts hold the rows until the merge
        n = int(pending["world_size"])
        parts = [read_manifest(f.parent) for f in sorted((path / PARTS).glob(f"*/{MANIFEST}"))]
        got = (f"{sum(p['rows'] for p in parts):,} rows in the parts of its {n} processes, "
               f"{sum(p['units'] - p['shards'][0]['units'][0] for p in parts if p['shards']):,}"
               f" of {pending['units_total']:,} {unit}; the store lists {rows:,} rows until "
               f"the parts are merged")
        if lock_holder(path / LOCK_FILE):
            return (f"The store at {str(path)!r} is still being written by {n} processes; "
                    f"{got}.", "Wait for it to finish.")
        return (f"The store at {str(path)!r} is incomplete: its extraction on {n} processes "
                f"stopped with {got}.", f"Finish it by running the same extraction again on "
                f"{n} processes (torchrun --nproc_per_node {n} -m sae_nb extract ...): each "
                f"resumes its part. Or pass allow_partial=True to use the merged rows only.")
    if total:
        about = f" (about {round(rows * total / done):,} rows when complete)" if done else ""
        got = f"{rows:,} rows from {done:,} of {total:,} {unit}{about}"
    else:
        got = f"{rows:,} rows from {done:,} {unit} (the total was not recorded)"
    writer = lock_holder(path / LOCK_FILE)
    if writer:
        return (f"The store at {str(path)!r} is still being written ({writer}); it holds {got} "
                f"so far.", "Wait for it to finish, or pass allow_partial=True to use the rows "
                            "it has now.")
    return (f"The store at {str(path)!r} is incomplete: its extraction stopped with {got}.",
            "Finish it by running notebook 01 again (or sae_nb.extract_activations with the "
            "same settings): it resumes where it stopped. Or pass allow_partial=True to use the "
            "rows it has.")


class ActivationStore:
    """Read one site's store: random access and shuffled batches, all memory-mapped.

    An incomplete store (an extraction that was interrupted, or is still running) is refused
    unless ``allow_partial=True``, which opens the rows it has with a warning. A shard file
    changed since it was written is refused (a ``stat`` per file; a hash only where one changed,
    see the module docstring).
    """

    def __init__(self, path: str | Path, allow_partial: bool = False):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest["complete"]:
            state, advice = _incomplete_message(self.path, self.manifest)
            if not allow_partial:
                raise StoreError(f"{state} {advice}")
            warnings.warn(f"{state} Using the rows it has (allow_partial=True).", UserWarning,
                          stacklevel=2)
        damaged, confirmed = check_shards(self.path, self.manifest)
        if damaged:
            raise StoreError(f"The store at {str(self.path)!r} is damaged: {'; '.join(damaged)}."
                             f" {REEXTRACT}")
        if confirmed:
            _refresh_stamps(self.path, confirmed)
        self._acts, self._index, sizes = [], [], []
        dtype = np.dtype(self.manifest["dtype"])
        for shard, (acts_file, index_file) in zip(self.manifest["shards"],
                                                  shard_files(self.path, self.manifest)):
            acts = self._open(acts_file, shard["rows"], dtype, self.manifest["d"])
            index = self._open(index_file, shard["rows"], INDEX_DTYPE)
            self._acts.append(acts)
            self._index.append(index)
            sizes.append(shard["rows"])
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def _open(self, name: str, rows: int, dtype: np.dtype, width: int | None = None) -> np.ndarray:
        """Memory-map one shard file, checking its rows, width and dtype against the manifest."""
        file = self.path / name
        try:
            if file.is_file() and file.stat().st_size == 0:
                raise ValueError("it is empty, 0 bytes")
            array = np.load(file, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise StoreError(f"Shard {str(file)!r} is missing or damaged ({err}). "
                             f"{REEXTRACT}") from None
        problem = None
        if len(array) != rows:
            problem = f"holds {len(array)} rows; the manifest says {rows}"
        elif width is not None and (array.ndim != 2 or array.shape[1] != width):
            got = array.shape[1] if array.ndim == 2 else array.shape
            problem = f"holds rows of width {got}; the store's width is {width}"
        elif array.dtype != dtype:
            problem = f"holds {array.dtype} values; the store holds {dtype}"
        if problem:
            raise StoreError(f"Shard {str(file)!r} {problem}: it was not written by this "
                             f"store's extraction. {REEXTRACT}")
        return array

    def verify(self) -> int:
        """Read every shard file and compare it with the SHA-256 recorded when it was written.

        A full read of the store, so not done on every open (an open trusts a file whose size
        and mtime are those recorded): call it when in doubt (a disk error, a file that may have
        been changed with its mtime put back). Returns the number of files checked against a
        checksum; raises :class:`StoreError` naming every damaged file.
        """
        damaged, _ = check_shards(self.path, self.manifest, full=True)
        if damaged:
            raise StoreError(f"The store at {str(self.path)!r} is damaged: {'; '.join(damaged)}. "
                             f"{REEXTRACT}")
        return sum(2 for shard in self.manifest["shards"] if shard.get("sha256") is not None)

    # -- what is stored --------------------------------------------------------------------
    @property
    def d(self) -> int:
        return int(self.manifest["d"])

    @property
    def site(self) -> str:
        return str(self.manifest["site"])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:
        m = self.manifest
        return (f"ActivationStore({m['model']!r}, {m['site']!r}, rows={len(self)}, d={self.d}, "
                f"dtype={m['dtype']})")

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        size = sum((self.path / acts).stat().st_size for acts, _ in shard_files(self.path, m))
        return {"site": m["site"], "model": m["model"], "rows": len(self), "d": self.d,
                "dtype": m["dtype"], "mode": m["mode"], "ctx_len": m["ctx_len"],
                "corpus": m["corpus"], "shards": len(m["shards"]), "MB": round(size / 2**20, 1),
                "complete": m["complete"]}

    # -- reading ---------------------------------------------------------------------------
    def __getitem__(self, rows) -> np.ndarray:
        """Rows by int, slice or integer array, as a float32 array (an array in any order)."""
        return self._gather(rows, self._acts).astype(np.float32, copy=False)

    def index(self, rows=slice(None)) -> np.ndarray:
        """The per-row metadata (token, doc, pos, context, offset) of ``rows``."""
        return self._gather(rows, self._index)

    def _gather(self, rows, arrays: list[np.ndarray]) -> np.ndarray:
        if isinstance(rows, (int, np.integer)):
            rows = int(rows) + len(self) if rows < 0 else int(rows)
            if not 0 <= rows < len(self):
                raise IndexError(f"Row {rows} is out of range for a store of {len(self)} rows.")
            shard = int(np.searchsorted(self._starts, rows, side="right") - 1)
            return np.asarray(arrays[shard][rows - self._starts[shard]])
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(len(self)))
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"Rows must lie in 0..{len(self) - 1}.")
        shard_of = np.searchsorted(self._starts, rows, side="right") - 1
        out = (np.empty((len(rows),) + arrays[0].shape[1:], dtype=arrays[0].dtype) if arrays
               else None)
        for shard in np.unique(shard_of):
            pick = np.nonzero(shard_of == shard)[0]
            local = rows[pick] - self._starts[shard]
            order = np.argsort(local, kind="stable")  # read each shard front to back
            out[pick[order]] = arrays[shard][local[order]]
        return out

    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0, epochs: int = 1,
                drop_last: bool = False, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, rows=None) -> Iterator[torch.Tensor]:
        """Yield ``(batch_size, d)`` tensors; shuffled across all shards when ``shuffle``.

        ``rows`` (a slice or index array) restricts the batches to part of the store, e.g. a
        training split; ``epochs=None`` repeats forever (a fresh shuffle each epoch).
        """
        subset = np.arange(len(self))[rows] if rows is not None else np.arange(len(self))
        if len(subset) == 0:
            raise StoreError(f"Store {str(self.path)!r} has no rows to batch.")
        if drop_last and len(subset) < batch_size:  # would yield nothing, forever if epochs=None
            raise StoreError(f"Store {str(self.path)!r} has {len(subset)} rows to batch, fewer "
                             f"than one batch of {batch_size}; lower batch_size or extract more.")
        rng = np.random.default_rng(seed)
        epoch = 0
        while epochs is None or epoch < epochs:
            epoch += 1
            order = subset[rng.permutation(len(subset))] if shuffle else subset
            stop = len(order) - (len(order) % batch_size if drop_last else 0)
            for start in range(0, stop, batch_size):
                pick = order[start : start + batch_size]
                batch = torch.from_numpy(self._gather(pick, self._acts))  # (B, d)
                yield batch.to(device=device, dtype=dtype)

    def chunks(self, rows_per_chunk: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """Sequential ``(first_row, array)`` chunks, for streaming passes over the store."""
        for start in range(0, len(self), rows_per_chunk):
            yield start, self[start : min(start + rows_per_chunk, len(self))]

    def context_tokens(self, contexts) -> np.ndarray:
        """Token mode: the full ``(n, ctx_len)`` token ids of stored contexts, e.g. held-out
        contexts for a cross-entropy evaluation. Positions not stored (BOS) get the BOS id."""
        m = self.manifest
        if m["mode"] != "tokens":
            raise StoreError("context_tokens needs a token-mode store.")
        index = self.index()
        starts = np.searchsorted(index["context"], contexts, side="left")
        ends = np.searchsorted(index["context"], contexts, side="right")
        out = np.full((len(starts), m["ctx_len"]), m["bos_token_id"], dtype=np.int64)
        for i, (lo, hi) in enumerate(zip(starts, ends)):
            if lo == hi:
                raise StoreError(f"Context {contexts[i]} is not in this store.")
            out[i, index["offset"][lo:hi]] = index["token"][lo:hi]
        return out

    def context(self, row: int, before: int = 16, after: int = 4,
                tokenizer=None) -> pd.DataFrame:
        """The stored tokens around ``row`` in its own context (rows are stored in order), with
        each row's activation norm, and each token as text when a ``tokenizer`` is given."""
        lo, hi = max(0, row - before), min(len(self), row + after + 1)
        idx = self.index(slice(lo, hi))
        same = idx["context"] == self.index(row)["context"]
        df = pd.DataFrame(idx[same])
        rows = np.arange(lo, hi)[same]
        df.insert(0, "row", rows)
        if tokenizer is not None:
            df["text"] = token_strings(tokenizer, df["token"].to_numpy())
        df["norm"] = np.linalg.norm(self[rows].astype(np.float64), axis=1).round(2)
        return df


def paired_batches(inputs: ActivationStore, targets: ActivationStore, batch_size: int,
                   **options) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` batches of the same rows from two sites, for training transcoders
    (e.g. ``mlp_in_layer3`` -> ``mlp_out_layer3``). Both stores must come from one extraction;
    ``options`` are those of :meth:`ActivationStore.batches`."""
    if len(inputs) != len(targets) or not np.array_equal(inputs.index(), targets.index()):
        raise StoreError(f"Stores {inputs.site!r} ({len(inputs)} rows) and {targets.site!r} "
                         f"({len(targets)} rows) do not hold the same tokens; extract both sites "
                         f"in one run (sites=[{inputs.site!r}, {targets.site!r}]).")
    yield from zip(inputs.batches(batch_size, **options), targets.batches(batch_size, **options))


def store_folders(run_dir: str | Path) -> dict[str, Path]:
    """The folder of every site store under ``run_dir/activations``, keyed by site name
    (reads only the manifests)."""
    root = Path(run_dir) / "activations"
    folders = {}
    for folder in sorted(root.glob("*")):
        if (folder / MANIFEST).exists():
            folders[str(read_manifest(folder)["site"])] = folder
    if not folders:
        raise StoreError(f"No activation stores under {str(root)!r}. Run notebook 01 first, or "
                         f"python -m sae_nb extract --run-dir {str(Path(run_dir))!r} ...")
    return folders


def open_stores(run_dir: str | Path, allow_partial: bool = False) -> dict[str, ActivationStore]:
    """Every site store under ``run_dir/activations``, keyed by site name; an incomplete one
    is refused unless ``allow_partial`` (see :class:`ActivationStore`)."""
    return {site: ActivationStore(folder, allow_partial=allow_partial)
            for site, folder in store_folders(run_dir).items()}


def open_store(run_dir: str | Path, site: str, model: str | None = None,
               allow_partial: bool = False) -> ActivationStore:
    """The store of ``site`` under ``run_dir/activations``; ``model`` must be the one it holds.

    An incomplete store (an interrupted extraction) is refused unless ``allow_partial``.
    """
    folders = store_folders(run_dir)
    folder = folders.get(site) or next((f for f in folders.values() if f.name == site), None)
    if folder is None:
        raise StoreError(f"No store for site {site!r} under {str(Path(run_dir) / 'activations')!r};"
                         f" it holds {sorted(folders)}. Pick one of those, or add the site to "
                         f"notebook 01's sites and run it again.")
    store = ActivationStore(folder, allow_partial=allow_partial)
    if model is not None and store.manifest["model"] != model:
        raise StoreError(f"The store at {str(store.path)!r} holds activations of model "
                         f"{store.manifest['model']!r}, not {model!r}: the spliced cross-entropy "
                         f"would run the wrong model. Set model to {store.manifest['model']!r}.")
    return store
