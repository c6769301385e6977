"""One thread for small work.

On a busy 2-core machine, thread pools that spin while they wait make small operations 10-100x
slower: a logistic-regression fit of 1,500 x 576 took 16.7 s with a BLAS pool and 0.28 s on one
thread; a KMeans fit of 44 texts 14 s against 0.07 s; sorts and scatters over ~10^5 elements in
the statistics pass alike. Big matmuls gain from threads and stay outside this context.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from threadpoolctl import threadpool_limits


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's intra-op work and the BLAS/OpenMP pools (numpy, scipy, scikit-learn) on one
    thread, restoring the previous settings afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)
