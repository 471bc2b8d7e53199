"""Split element-wise CPU work over voxel ranges, one range per thread.

numpy's element-wise loops and casts and torch's CPU kernels release the GIL, so plain
threads run them in parallel; with large outputs they also fault in fresh pages in
parallel, which is much of the cost of returning big arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import TypeVar

T = TypeVar("T")

#: Elements per range boundary (ranges are multiples of it, so chunked loops line up).
ALIGN = 1 << 18


def in_threads(n: int, work: Callable[[int, int], T], *, align: int = ALIGN) -> list[T]:
    """Run ``work(lo, hi)`` over ``[0, n)`` split into ``align``-aligned ranges, one per
    thread (``torch.get_num_threads()`` of them, so ``torch.set_num_threads`` bounds
    this too). Inputs smaller than two ranges run in the calling thread.

    Returns:
        The results in range order.
    """
    import torch

    workers = max(1, min(torch.get_num_threads(), n // (2 * align)))
    if workers == 1:
        return [work(0, n)]
    bounds = [n * i // workers // align * align for i in range(workers)] + [n]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(work, lo, hi) for lo, hi in pairwise(bounds)]
        return [f.result() for f in futures]
