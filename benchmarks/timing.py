"""The one timing loop of the benchmarks: warm-up, then the median of synchronised calls."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, args, warmup: int, iters: int) -> float:
    """Median seconds of `iters` calls of fn(*args), each waited for with block_until_ready,
    after `warmup` untimed calls (which absorb compilation)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
