"""kept_heap: glibc's thresholds raised for a training loop and the heap trimmed after."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sae_nb.util import heap


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad.value))
        return 1


def test_thresholds_are_raised_once_for_nested_blocks_and_the_heap_trimmed_after(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(heap, "_glibc", lambda: libc)
    with heap.kept_heap():
        assert libc.calls == [("mallopt", -3, 32 << 20), ("mallopt", -1, 1 << 30)]
        with heap.kept_heap():  # train_sites inside a caller's block: nothing changes
            pass
        assert len(libc.calls) == 2
    assert libc.calls[2:] == [("mallopt", -1, 64 << 20), ("malloc_trim", 0)]
    with pytest.raises(RuntimeError), heap.kept_heap():  # an error in the loop still trims
        raise RuntimeError
    assert libc.calls[-1] == ("malloc_trim", 0) and len(libc.calls) == 8


def test_without_glibc_nothing_is_called(monkeypatch):
    monkeypatch.setattr(heap.sys, "platform", "darwin")
    assert heap._glibc() is None
    with heap.kept_heap():
        pass


# Three 30 MB tensors allocated, written and freed, six times: the minor page faults (the
# kernel's fresh pages) of the last five rounds, inside kept_heap and without it. (Inside, a
# round now and then places a tensor past a hole the alignment left, and faults its pages once.)
FAULTS = """
import resource, torch
from sae_nb.util.heap import kept_heap
def rounds():
    for i in range(6):
        if i == 1:
            start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ts = [torch.empty(30 << 18).fill_(1.0) for _ in range(3)]
        del ts
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
if KEPT:
    with kept_heap():
        print(rounds())
else:
    print(rounds())
"""


@pytest.mark.skipif(heap._glibc() is None, reason="glibc's allocator only")
def test_freed_tensors_come_back_without_fresh_pages():
    def faults(kept: bool) -> int:
        out = subprocess.run([sys.executable, "-c", f"KEPT = {kept}\n" + FAULTS],
                             capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    pages = 3 * (30 << 20) // 4096  # one round's
    assert faults(False) > pages  # glibc's defaults: rounds fault their pages in again (1.3-3.7x)
    assert faults(True) < pages // 2  # 0, or one tensor's 7,680
