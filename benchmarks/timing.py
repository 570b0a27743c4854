"""The one timer of the benchmarks: seconds per call of `fn`.

On CUDA it is `triton.testing.do_bench` (CUDA events, the L2 cache flushed before every call, the
minimum over `rep` ms of repeats after `warmup` ms), as Liger-Kernel's benchmarks time their ops.
On CPU (no driver for do_bench) it is the best of `iters` wall-clock calls after `warmup_calls`.
"""

from __future__ import annotations

import time
from typing import Callable

import torch


def best_time(fn: Callable[[], object], warmup_calls: int = 1, iters: int = 3, warmup_ms: int = 25,
              rep_ms: int = 100) -> float:
    """Seconds of one call of `fn` (the fastest observed: the least disturbed)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="min") * 1e-3
    for _ in range(warmup_calls):
        fn()
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
