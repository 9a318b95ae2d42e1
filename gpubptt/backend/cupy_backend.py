"""The CuPy backend: CUDA arrays, cuBLAS GEMMs, CUDA graphs and the kernels cells compile through it.

CuPy is imported only when this backend is asked for, so a CPU-only install never touches it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError
from . import _graphs
from ._cublas import cublas_matmul
from ._streams import SideStreams
from .base import Backend, TokenPlan, is_cupy_array

__all__ = ["INSTALL_HINT", "CupyBackend", "make_cupy_backend"]

INSTALL_HINT = (
    "install CuPy with `pip install cupy-cuda12x` (CUDA 12) or `pip install cupy-cuda13x` (CUDA 13) (or, in gpubptt's "
    "source folder, `pip install -e '.[cuda12]'` or `'.[cuda13]'`)"
)

_C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

# One thread per (id, h): sums that id's rows in sorted order, so the result is bitwise
# reproducible (an atomic scatter-add is not).
_SCATTER_BODY = """
const long long d = i / H, h = i % H;
T acc = 0;
for (long long j = offsets[d]; j < offsets[d + 1]; ++j) acc += rows[perm[j] * H + h];
dUT += acc;
"""


class CupyBackend(Backend):
    """CuPy on one CUDA device."""

    name = "cupy"
    chunk_elements = 1 << 24
    block_elements = 1 << 62  # whole arrays: one launch per pass
    supports_graphs = True
    compiles_kernels = True
    conversion_hint = "convert it with backend.asarray(...)"

    def __init__(self, cp: Any, device: str) -> None:
        super().__init__()
        self.xp = cp
        self.device = device
        self._matmul = cublas_matmul(cp)
        self._sides = SideStreams(cp, self._matmul.add_stream)  # type: ignore[attr-defined]
        self._scatter = cp.ElementwiseKernel(
            "raw T rows, raw I perm, raw I offsets, int64 H", "T dUT", _SCATTER_BODY, "gpubptt_token_scatter_add"
        )

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        if is_cupy_array(a):
            return a if dtype is None else a.astype(dtype, copy=False)
        return self.xp.asarray(a, dtype=dtype)

    def synchronize(self) -> None:
        self.xp.cuda.get_current_stream().synchronize()

    def empty_pinned(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        import cupyx  # ships with CuPy

        return cupyx.empty_pinned(shape, dtype=dtype)

    def copy_to_host(self, a: Any, out: np.ndarray) -> None:
        a.get(out=out)

    def copy_from_host(self, host: np.ndarray, out: Any) -> None:
        out.set(host)

    def external_stream(self, handle: int | None, device: int | None = None) -> Any:
        """Run on device ``device`` (None: the current one) and the CUDA stream ``handle`` there (another
        library's, e.g. torch's current stream; 0 is the legacy default stream, None the current stream),
        without a sync. The device comes first: the stream and every array made inside belong to it."""
        stack = contextlib.ExitStack()
        if device is not None:
            stack.enter_context(self.xp.cuda.Device(device))
        if handle is not None:
            stack.enter_context(self.xp.cuda.ExternalStream(handle, -1 if device is None else device))
        return stack

    def placement(self) -> tuple[int, int]:
        """(current device id, current stream pointer): buffers reused under it follow earlier work in order."""
        cuda = self.xp.cuda
        return cuda.Device().id, cuda.get_current_stream().ptr

    def timer(self) -> Callable[[Callable[[], Any]], float]:
        """CUDA events recorded on the current stream around fn, after a sync so earlier work is left out."""
        return _graphs.timer(self.xp)

    def data_ptr(self, a: Any) -> int:
        return int(a.data.ptr)

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        """fn runs once to warm up (compile kernels, make the buffers it keeps), is captured on a side stream,
        and each replay is ONE graph launch on the current stream. Temporaries fn allocates during the capture
        come from a memory pool owned by the graph, so nothing else can reuse them; the warm-up's freed ones are
        released before the capture.
        """
        return _graphs.capture(self.xp, fn)

    def available_memory(self) -> int | None:
        """The device's free memory plus what CuPy's pool holds but does not use (a host sync point).

        Running out anyway raises CuPy's OutOfMemoryError, a MemoryError.
        """
        free, _total = self.xp.cuda.runtime.memGetInfo()
        return int(free + self.xp.get_default_memory_pool().free_bytes())

    def peak_bytes(self, fn: Callable[[], Any]) -> int:
        """Run fn() once (synchronised); the most bytes of CuPy's memory pools it held at any moment beyond
        what was held before, from a memory hook on every pool malloc and free of this thread."""
        cp = self.xp

        class Peak(cp.cuda.MemoryHook):
            name = "gpubptt_peak_bytes"

            def __init__(self) -> None:
                self.now = self.peak = 0

            def malloc_postprocess(self, **kw: Any) -> None:
                self.now += kw["mem_size"]
                self.peak = max(self.peak, self.now)

            def free_postprocess(self, **kw: Any) -> None:
                self.now -= kw["mem_size"]

        hook = Peak()
        self.synchronize()
        with hook:
            fn()
            self.synchronize()
        return hook.peak

    def random_generator(self, seed: int | None) -> Any:
        """``cupy.random.RandomState(seed)``: numbers drawn on the device."""
        return self.xp.random.RandomState(seed)

    def fill_uniform(self, generator: Any, out: Any) -> None:
        out[...] = generator.random_sample(out.shape)  # float64 draws, cast on assignment

    def matmul(self, a: Any, b: Any, out: Any, accumulate: bool = False) -> None:
        if self.precision == "fp32":
            self._matmul(a, b, out, accumulate)
        else:  # tensor cores: tf32 by cuBLAS's compute type, bf16 operands rounded into scratch first
            self._matmul(a, b, out, accumulate, self.precision, self._scratch)

    def run_concurrently(self, jobs: list[Callable[[], None]]) -> None:
        """Where ``concurrent`` is on, job 0 on the current stream and each other job on a side stream of its own,
        forked from and joined back to the current stream (``_streams.SideStreams``; also inside a graph capture:
        parallel branches of the graph); else one after the other on the current stream. ``concurrent`` is off
        by default here (``concurrent_default``): built and checked against stand-ins on the CPU, not yet timed
        on a device. Set it before a shape's first call: its captured graph keeps the schedule it was recorded
        with."""
        if len(jobs) < 2 or not self.concurrent:
            super().run_concurrently(jobs)
            return
        self._sides.run(jobs)

    def token_scatter_add(self, dUT: Any, plan: TokenPlan, rows: Any) -> None:
        self._scatter(rows, plan.perm, plan.offsets, dUT.shape[1], dUT)

    def elementwise(self, in_params: str, out_params: str, body: str, name: str) -> Callable[..., Any]:
        return self.xp.ElementwiseKernel(in_params, out_params, body, name)

    def raw_kernels(self, source: str, names: tuple[str, ...], dtype: Any) -> dict[str, Any]:
        """``cupy.RawKernel`` objects: called as kernel((blocks,), (threads,), args, shared_mem=bytes)."""
        code = f"#define T {_C_TYPES[np.dtype(dtype)]}\n" + source
        return {n: self.xp.RawKernel(code, n) for n in names}

    def device_limits(self) -> dict[str, int]:
        attrs = self.xp.cuda.Device().attributes
        return {
            "shared_memory_per_block": int(attrs.get("MaxSharedMemoryPerBlockOptin", 48 << 10)),
            "multiprocessors": int(attrs["MultiProcessorCount"]),
        }


def make_cupy_backend() -> CupyBackend:
    """The CuPy backend, or BackendUnavailableError saying why it cannot run here."""
    try:
        import cupy as cp
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the cupy backend needs CuPy, which is not installed ({exc}); {INSTALL_HINT}"
        ) from exc
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError, driver missing: anything CuPy raises here
        raise BackendUnavailableError(
            f"CuPy is installed but no CUDA device answers (driver error: {exc}); check `nvidia-smi`, "
            f"or that the CuPy wheel matches the CUDA version ({INSTALL_HINT})"
        ) from exc
    if n == 0:
        raise BackendUnavailableError(f"CuPy is installed but found no CUDA device; {INSTALL_HINT}")
    try:
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        _ = cp.RawKernel('extern "C" __global__ void gpubptt_probe() {}', "gpubptt_probe").kernel  # NVRTC compiles
        return CupyBackend(cp, f"{name} (CUDA device {cp.cuda.Device().id})")
    except Exception as exc:
        raise BackendUnavailableError(f"CuPy could not use the CUDA device ({exc}); {INSTALL_HINT}") from exc
