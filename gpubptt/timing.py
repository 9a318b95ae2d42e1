"""Timing: a Timer runs fn() once and returns its seconds, synchronised with the device; repeated and
interleaved runs; robust summaries (median, IQR, spread). The backends' timers and the benchmarks share it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["NOISY_SPREAD", "Timer", "is_noisy", "summarize", "sync_timer", "time_fn", "time_interleaved"]

#: A function that runs fn() once and returns its wall time in seconds, synchronised with the device.
Timer = Callable[[Callable[[], Any]], float]
#: A timing whose IQR / median exceeds this is flagged noisy: runs that far apart make the median unreliable.
NOISY_SPREAD = 0.1


def sync_timer(synchronize: Callable[[], None]) -> Timer:
    """A Timer built on a device sync and ``time.perf_counter``: sync, start, fn(), sync, stop.

    Syncing before starting keeps earlier queued work out of the measurement; syncing after makes the
    time include all the device work fn() queued (launches return before the kernels finish).
    """

    def run(fn: Callable[[], Any]) -> float:
        synchronize()
        t0 = time.perf_counter()
        fn()
        synchronize()
        return time.perf_counter() - t0

    return run


def time_fn(fn: Callable[[], Any], *, timer: Timer, warmup: int = 1, repeats: int = 5) -> list[float]:
    """Run fn ``warmup`` times untimed, then ``repeats`` timed runs; returns the times in seconds."""
    for _ in range(warmup):
        timer(fn)
    return [timer(fn) for _ in range(repeats)]


def time_interleaved(
    fns: dict[str, tuple[Callable[[], Any], Timer]], *, warmup: int = 1, repeats: int = 5
) -> dict[str, list[float]]:
    """Time several functions in rounds (one run of each per round); returns {name: times in seconds}.

    Each function runs ``warmup`` times untimed first. Interleaving makes slow drifts and bursts of
    load from elsewhere hit every function alike, so ratios between them stay meaningful.
    """
    for _ in range(warmup):
        for fn, timer in fns.values():
            timer(fn)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (fn, timer) in fns.items():
            times[name].append(timer(fn))
    return times


def summarize(times: Sequence[float]) -> dict[str, Any]:
    """Median (headline), min, interquartile range, spread (IQR / median; None for a zero median) and the
    raw times (seconds) of repeated runs."""
    a = np.asarray(times, dtype=float)
    q25, q75 = np.percentile(a, [25, 75])
    median, iqr = float(np.median(a)), float(q75 - q25)
    return {
        "median_s": median,
        "min_s": float(a.min()),
        "iqr_s": iqr,
        "spread": iqr / median if median > 0 else None,
        "times_s": [float(t) for t in a],
    }


def is_noisy(summary: dict[str, Any]) -> bool:
    """Whether a ``summarize`` result spreads more than NOISY_SPREAD (IQR / median); works on older results too."""
    median, iqr = summary["median_s"], summary["iqr_s"]
    return median > 0 and iqr / median > NOISY_SPREAD
