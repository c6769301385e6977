"""Files: atomic writes and folder swaps, tables, checksums, a writer's lock, safe names.

A file this package writes is either the old one or the complete new one, never half.

Every writer goes through :func:`atomic_open`: it writes to a temporary file in the same
folder, named after the target plus the writer's pid and a random suffix (so two writers of
one path never share a temporary file), flushes it to disk, and renames it over the target.
A reader opening the target sees the old file or the new one. A killed writer leaves only a
``*.tmp`` file, which the next writer of that folder may delete.

:func:`hold_lock` is the one-writer-at-a-time lock of a folder (an OS ``flock``, released
however the holder ends), and :func:`lock_holder` asks who holds it. :func:`atomic_folder`
does for a folder (a saved dictionary) what :func:`atomic_open` does for a file.

:func:`changed_file` tells whether a file still holds the bytes whose SHA-256 was recorded
when it was written, reading it only when its size or modification time (:func:`file_stamp`,
recorded with the hash) says it may have changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from stat import S_ISREG
from typing import IO, Any

import numpy as np

from sae_nb.util.errors import SaeNbError

try:
    import fcntl
except ImportError:  # Windows: no flock; locks are no-ops there
    fcntl = None

TMP_SUFFIX = ".tmp"  # every temporary name ends so; ``folder.glob("*.tmp")`` finds leftovers


def folder_name(name: str) -> str:
    """A safe file or folder name for a site, model or dictionary name (raw module paths may
    hold ':', hub names '/'): every character outside ``[A-Za-z0-9_.-]`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def temporary_name(path: str | Path) -> Path:
    """A fresh temporary name next to ``path``: ``name.<pid>.<random>.tmp``."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit, fsync it and rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable across a power cut (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, value: Any, indent: int | None = 1, **kwargs: Any) -> Path:
    """``json.dumps(value)`` written atomically (``kwargs`` go to ``json.dumps``, e.g. default)."""
    return atomic_write_text(path, json.dumps(value, indent=indent, **kwargs))


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary name; on a clean exit, swap it in for ``path`` (an old
    folder there is replaced), so ``path`` is always a complete folder or absent. On an
    exception the temporary folder is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    tmp.mkdir()
    try:
        yield tmp
        old = temporary_name(path.with_name(path.name + ".old"))
        if path.exists():  # swap in the new folder, then drop the old one
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_folder(path.parent)


def write_table(table, path: str | Path) -> Path:
    """A DataFrame as CSV at ``path`` (folders made as needed), written atomically: a notebook
    killed mid-write leaves the previous table or none, never half of one."""
    return atomic_write_text(path, table.to_csv(index=False))


def atomic_save_npy(path: str | Path, array: np.ndarray) -> Path:
    with atomic_open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
    return Path(path)


def atomic_save_npz(path: str | Path, compressed: bool = False, **arrays: np.ndarray) -> Path:
    """``np.savez`` (or ``savez_compressed``) of ``arrays`` written atomically."""
    save = np.savez_compressed if compressed else np.savez
    with atomic_open(path, "wb") as f:
        save(f, **arrays)
    return Path(path)


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, hex, read in chunks (any size, flat memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def file_stamp(path: str | Path) -> dict[str, int]:
    """A file's size in bytes and modification time in ns, from one ``stat``: what rewriting
    its bytes changes. Recorded beside a file's SHA-256 when it is written."""
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def changed_file(path: str | Path, sha256: str, stamp: dict | None = None,
                 record_mtime_ns: int | None = None) -> tuple[str | None, dict | None]:
    """Whether file ``path`` still holds the bytes whose SHA-256 ``sha256`` was recorded, read
    only when it must be: ``(problem, confirmed)``.

    ``stamp`` is the file's :func:`file_stamp` taken when ``sha256`` was recorded (a stamp that
    carries a ``sha256`` of other bytes is ignored). While size and mtime still match it, the
    file is trusted without a read, unless the stamp is not older than ``record_mtime_ns``, the
    mtime of the file holding the record: a change in the same clock tick as the record keeps
    the mtime (the "racy" case of git's index), so such a file is hashed. Any other case (no
    stamp, another mtime: a copy, a checkout, a changed file) is hashed; another size needs no
    hash. ``problem`` is None when the bytes match, else what is wrong ("is missing", "has
    changed ..."); ``confirmed`` is the file's stamp when a hash confirmed its bytes although
    its stamp did not match (a record worth refreshing), else None.

    Bytes changed by a writer that then puts the mtime back are not seen: a full hash
    (``stamp=None``) sees them.
    """
    try:
        stat = os.stat(path)
    except OSError:
        stat = None
    if stat is None or not S_ISREG(stat.st_mode):
        return "is missing", None
    now = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if not isinstance(stamp, dict) or stamp.get("sha256", sha256) != sha256:
        stamp = None  # no record (an older writer), or a record of other bytes
    same = stamp is not None and all(stamp.get(key) == now[key] for key in now)
    racy = same and record_mtime_ns is not None and now["mtime_ns"] >= record_mtime_ns
    if same and not racy:
        return None, None
    if stamp is not None and stamp.get("size") != now["size"]:
        return (f"has changed since it was written: it holds {now['size']:,} bytes, "
                f"{stamp.get('size')!r} were written"), None
    actual = file_sha256(path)
    if actual != sha256:
        return (f"has changed since it was written: its sha256 is {actual[:16]}..., the "
                f"checksum recorded then {str(sha256)[:16]}..."), None
    return None, (None if same else now)


class LockHeld(SaeNbError, OSError):
    """Another open file (in this process or another) holds the lock; ``holder`` names it."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def hold_lock(path: str | Path, patience_s: float = 0.5) -> IO | None:
    """Take the exclusive lock of file ``path`` (created if absent) and write the holder's
    pid, host and start time into it; the lock lasts until the returned file is closed or the
    process ends, however it ends. Raises :class:`LockHeld` naming the holder.

    Retries for ``patience_s``: :func:`lock_holder` holds a shared lock for an instant, which
    must not look like another holder. Returns None where the OS has no flock.
    """
    if fcntl is None:
        return None
    file = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="utf-8")
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:  # BlockingIOError
            if time.monotonic() > deadline:
                holder = file.read().strip() or "a process that has not yet written its name"
                file.close()
                raise LockHeld(holder) from None
            time.sleep(0.05)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    file.seek(0)
    file.truncate()
    file.write(f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n")
    file.flush()
    return file


def lock_holder(path: str | Path) -> str | None:
    """Who holds the lock of file ``path`` now (the line it wrote), or None when nobody."""
    if fcntl is None or not Path(path).is_file():
        return None
    with open(path, encoding="utf-8") as file:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return file.read().strip() or "a process that has not yet written its name"
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)
    return None


def jsonable(value: Any) -> Any:
    """``value`` with its tuples made lists, through dicts and lists: what a JSON round trip
    gives back, so a setting read from a file compares equal to the one in memory."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
