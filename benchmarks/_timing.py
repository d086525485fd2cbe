"""Interleaved, median timing of several variants in one process."""

from __future__ import annotations

import statistics
import time


def interleaved(fns: dict, repeats: int = 15, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each fn, calling the variants round-robin so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
