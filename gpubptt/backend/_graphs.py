"""CUDA graph capture and CUDA-event timing for the CuPy backend."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["capture", "timer"]


def timer(cp: ModuleType) -> Callable[[Callable[[], Any]], float]:
    start, stop = cp.cuda.Event(), cp.cuda.Event()

    def run(fn: Callable[[], Any]) -> float:
        stream = cp.cuda.get_current_stream()
        stream.synchronize()  # earlier queued work is not fn's
        start.record(stream)
        fn()
        stop.record(stream)
        stop.synchronize()
        return cp.cuda.get_elapsed_time(start, stop) / 1e3  # ms → s

    return run


def _capture_stream(cp: ModuleType) -> Any:
    """This thread's stream for captures on the current device, made once: what is kept per stream (the bf16
    scratch of ``precision.Scratch``, allocated outside the pools and never freed) is made once per thread, not
    once per capture."""
    streams = _local.__dict__.setdefault("streams", {})
    device = cp.cuda.Device().id
    if device not in streams:
        streams[device] = cp.cuda.Stream(non_blocking=True)
    return streams[device]


_local = threading.local()


def capture(cp: ModuleType, fn: Callable[[], None]) -> Callable[[], None]:
    pool = cp.cuda.MemoryPool()
    stream = _capture_stream(cp)
    current = cp.cuda.get_current_stream()
    with cp.cuda.using_allocator(pool.malloc):
        # The warm-up runs on the caller's stream, in order with all other work there: it shares the one
        # cuBLAS workspace with every GEMM of the process, so it must not run beside them on a stream of
        # its own (another thread's GEMM on the default stream would race it for that workspace).
        fn()  # compiles kernels, makes the buffers fn keeps (its workspaces), on the caller's stream
        current.synchronize()
        # CuPy's pool keeps free blocks per stream: the warm-up's temporaries, freed on the caller's stream, are
        # never reused by the capture's stream; held, they would stay beside the capture's own for the graph's life
        pool.free_all_blocks()
        with stream:  # capture records, it does not run: the replays run on the caller's stream
            stream.begin_capture()
            try:
                fn()
            except BaseException:
                with contextlib.suppress(Exception):
                    stream.end_capture()  # leave capture mode; the original error is the one to see
                raise
            graph = stream.end_capture()

    def replay() -> None:
        graph.launch(cp.cuda.get_current_stream())

    replay.keepalive = (pool, stream, graph)  # type: ignore[attr-defined]
    return replay
