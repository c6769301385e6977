"""Freed memory kept for reuse while a training loop runs.

A training step allocates and frees the same tensors every step: activations and gradients of
a few to a few tens of MB. glibc's allocator hands each allocation above its mmap threshold
(dynamic, at most 32 MiB) fresh pages from the kernel and trims the heap's free top above its trim
threshold (twice the mmap threshold), so the next step pays the page faults again: ~2 ms for
every 10 MB tensor. Raising both thresholds for the loop's duration keeps those pages: a TopK
step (4,096 x 4,608, 2 cores) went from 167-184 to 150-166 ms, at the same peak resident set.

glibc only (elsewhere, or where ``mallopt`` is missing, :func:`kept_heap` does nothing).
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest: allocations up to it come from the heap
TRIM_DURING = 1 << 30  # free heap top kept while the loop runs
TRIM_AFTER = 2 * MMAP_THRESHOLD  # what glibc's own dynamic rule gives once it has grown

_lock = threading.Lock()
_depth = 0


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc, not musl (whose mallopt does nothing)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):
        return None


@contextmanager
def kept_heap() -> Iterator[None]:
    """Keep freed memory in the heap for reuse inside the block; nested uses share it.

    On leaving the outermost block the free heap above ``TRIM_AFTER`` is returned to the system
    (``malloc_trim``). The mmap threshold stays at 32 MiB afterwards, where glibc's own rule would
    have raised it: setting a threshold turns that rule off for the process, and a small fixed
    threshold would make every later large tensor pay its page faults."""
    global _depth
    libc = _glibc()
    with _lock:
        _depth += 1
        if _depth == 1 and libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_DURING)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and libc is not None:
                libc.mallopt(M_TRIM_THRESHOLD, TRIM_AFTER)
                libc.malloc_trim(ctypes.c_size_t(0))
