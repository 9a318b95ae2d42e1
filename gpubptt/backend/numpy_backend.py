"""The NumPy backend: the host, OpenBLAS/MKL GEMMs, no graphs and no compiled kernels."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Callable
from typing import Any

import numpy as np

from ..timing import sync_timer
from .base import Backend, TokenPlan, is_cupy_array

__all__ = ["ONEHOT_MAX_VOCAB", "NumpyBackend"]

#: Up to this vocabulary size the NumPy scatter-add is a one-hot GEMM (D, N) × (N, H): 2·D·N·H
#: FLOPs at the BLAS rate beat N·H adds through ``np.add.reduceat``, which ran at only ~0.15 G
#: adds/s (measured on a 2-core AVX-512 CPU: D = 256, N = 4096, H = 1024 took 7 ms against 28 ms;
#: at D = 8000 the GEMM lost, 15 ms against 1.7 ms).
ONEHOT_MAX_VOCAB = 512


class NumpyBackend(Backend):
    """NumPy on the host."""

    name = "numpy"
    xp = np

    def __init__(self) -> None:
        super().__init__()
        cpu = platform.processor() or platform.machine()
        self.device = f"CPU ({cpu}, {os.cpu_count()} logical cores)"

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        if is_cupy_array(a):
            a = a.get()
        return np.asarray(a, dtype=dtype)

    def timer(self) -> Callable[[Callable[[], Any]], float]:
        """``time.perf_counter`` around fn (nothing to synchronise on the host)."""
        return sync_timer(self.synchronize)

    def data_ptr(self, a: Any) -> int:
        return int(a.__array_interface__["data"][0])

    def available_memory(self) -> int | None:
        """Available host RAM: ``MemAvailable`` of /proc/meminfo (free plus reclaimable caches), else the
        free physical pages; None where the OS does not say. An estimate to refuse impossible sizes early.
        """
        with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, OSError, ValueError):
            return None

    def matmul(self, a: Any, b: Any, out: Any, accumulate: bool = False) -> None:
        if accumulate:
            out += a @ b  # a temporary: used once per output chunk, never per time step
        else:
            np.matmul(a, b, out=out)

    def take_rows(self, src: Any, index: Any, out: Any) -> Any:
        """NumPy's ``take`` into ``out``: with mode "clip" it writes in place; the default mode buffers the
        whole output first (so that a bad index leaves ``out`` untouched), a copy the size of ``out``."""
        return np.take(src, index, axis=0, out=out, mode="clip")

    def _stable_argsort(self, ids: Any) -> Any:
        return np.argsort(ids, kind="stable")

    def token_scatter_add(self, dUT: Any, plan: TokenPlan, rows: Any) -> None:
        D, N = dUT.shape[0], rows.shape[0]
        if D <= ONEHOT_MAX_VOCAB:
            onehot = np.zeros((D, N), dtype=rows.dtype)  # (D, N): column n is onehot(ids[n])
            onehot[np.repeat(np.arange(D), np.diff(plan.offsets)), plan.perm] = 1
            dUT += onehot @ rows
            return
        starts = plan.offsets[:-1]
        present = plan.offsets[1:] > starts
        if not present.any():
            return
        sums = np.add.reduceat(rows[plan.perm], starts[present], axis=0)
        dUT[np.flatnonzero(present)] += sums
