"""Array backends: the one module that imports or names CuPy.

Everything above this module is written once against ``backend.xp`` (NumPy or CuPy). A backend is a
small object with one-line methods; all branching on which library runs lives here. CuPy is
imported lazily, so a CPU-only install never touches it.

The fused elementwise kernels of the recurrences live here too, each with its NumPy twin:

    matmul(a, b, out, accumulate)  out (+)= a @ b for 2-d views, transposed views included (cuBLAS
                                   called directly on CuPy, so it can be captured in a CUDA graph)
    tanh_step(pre, hw, out)        out = tanh(pre + hw)                (hw may be clobbered)
    backprop_tanh(carry, d, g)     g   = (g + carry) * d,  d = 1 − s²     (carry may be clobbered)
    token_scatter_add(dUT, ...)    dUT[ids[n]] += rows[n]  for every n, deterministically

One step of each recurrence, composed from those (the NumPy path), or on CuPy one fused kernel
where that is measured faster for the shape:

    forward_step(s_prev, W, pre, out, scratch)    out = tanh(pre + s_prev @ W.T)
    backward_step(d_next, W, d, g, scratch)       g   = (g + d_next @ W) * d

and, on CuPy only, all steps of a recurrence in one persistent kernel that keeps W in shared memory
(``forward_recurrence``, ``backward_recurrence``; they return False where they do not apply).
``kernel_choices()`` reports what was measured; ``step_kernels`` forces a choice.

``capture(fn)`` records fn's device work once as a CUDA graph and returns a function that replays
it (on NumPy it returns fn itself): the whole forward+BPTT then costs one launch instead of several
per time step. ``timer()`` times a function synchronised with the device (CUDA events on CuPy).

    >>> be = get_backend("numpy")
    >>> be.name, be.xp.__name__
    ('numpy', 'numpy')
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from .errors import BackendMismatchError, BackendUnavailableError, InputError

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "TokenPlan",
    "available_backends",
    "get_backend",
    "to_numpy",
]

BACKEND_NAMES = ("auto", "numpy", "cupy")
ENV_VAR = "GPUBPTT_BACKEND"
INSTALL_HINT = "install CuPy with `pip install 'gpubptt[cuda12]'` (CUDA 12) or `'gpubptt[cuda13]'` (CUDA 13)"


@dataclass(frozen=True)
class TokenPlan:
    """Token ids sorted once so that the scatter-add into dU is deterministic.

    perm (N,) row order that sorts the ids; offsets (D+1,) start of each id's run in that order.
    """

    perm: Any
    offsets: Any


@dataclass(eq=False)
class Backend:
    """One array library: ``xp`` plus the few operations that differ between NumPy and CuPy.

    Shape-agnostic; each kernel's docstring gives its shapes.
    """

    name: str
    xp: ModuleType
    device: str
    _kernels: dict[str, Callable[..., Any]] = field(default_factory=dict, repr=False)
    #: Logits per output-layer chunk (rows·K, at least one time step): on a 2-core CPU at K = 8000,
    #: B = 32, 2^22 (16 MiB in float32) took 61 ms, 2^21 63, 2^20 72 and 2^23 65 (the GEMMs want a
    #: few hundred rows); a GPU takes 2^24 (each chunk is a dozen launches, memory is plentiful).
    chunk_elements: int = 1 << 22

    def __repr__(self) -> str:
        return f"Backend(name={self.name!r}, device={self.device!r})"

    # -- host <-> device boundary -------------------------------------------------------------
    def is_native(self, a: Any) -> bool:
        """True when ``a`` is an array of this backend (not a list, not another library's array)."""
        return isinstance(a, self.xp.ndarray)

    def check_native(self, a: Any, what: str) -> None:
        """Raise BackendMismatchError if ``a`` is an array of another backend."""
        if self.is_native(a) or isinstance(a, (list, tuple, int, float, np.generic)):
            return
        if _is_cupy_array(a) or isinstance(a, np.ndarray) or hasattr(a, "__array__"):
            kind = "a CuPy array" if _is_cupy_array(a) else f"a {type(a).__module__}.{type(a).__name__}"
            hint = (
                "convert it with backend.asarray(...)"
                if self.name == "cupy"
                else "convert it with gpubptt.to_numpy(...)"
            )
            raise BackendMismatchError(f"{what} is {kind}, but the model runs on the {self.name} backend; {hint}")

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        """Copy or view ``a`` (NumPy, CuPy or list) as an array of this backend."""
        if self.name == "cupy" and _is_cupy_array(a):
            return a if dtype is None else a.astype(dtype, copy=False)
        if self.name == "numpy" and _is_cupy_array(a):
            a = a.get()
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a: Any) -> np.ndarray:
        """Return ``a`` as a NumPy array (a device-to-host copy on CuPy; a host sync point)."""
        return to_numpy(a)

    def synchronize(self) -> None:
        """Wait until all queued device work is done (no-op on NumPy)."""
        if self.name == "cupy":
            self.xp.cuda.get_current_stream().synchronize()

    def timer(self) -> Callable[[Callable[[], Any]], float]:
        """A function that runs fn() once and returns its time in seconds, synchronised with the device.

        CuPy: CUDA events recorded on the current stream around fn, after a sync so earlier work is
        left out; NumPy: ``time.perf_counter`` around fn.
        """
        return self._kernels["timer"]()

    @property
    def supports_graphs(self) -> bool:
        """Whether ``capture`` records a replayable graph (CuPy) or just returns fn (NumPy)."""
        return self.name == "cupy"

    def data_ptr(self, a: Any) -> int:
        """The address of a's first element (identifies the memory a captured graph reads)."""
        return int(a.data.ptr) if self.name == "cupy" else int(a.__array_interface__["data"][0])

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Record fn's device work once and return a function that replays it.

        fn must read and write only arrays that outlive the graph, and do no host sync. On CuPy it
        runs once to warm up (compile kernels, size the graph's private memory pool), is captured
        on a side stream, and each replay is ONE graph launch on the current stream. Temporaries
        fn allocates come from a memory pool owned by the graph, so nothing else can reuse them.
        """
        return self._kernels["capture"](fn)

    # -- fused kernels ------------------------------------------------------------------------
    def matmul(self, a: Any, b: Any, out: Any, accumulate: bool = False) -> None:
        """out = a @ b, or out += a @ b with ``accumulate``; a (m, k), b (k, n), out (m, n).

        a and b may be transposed views; out must have unit stride along its rows.
        """
        self._kernels["matmul"](a, b, out, accumulate)

    def forward_step(self, s_prev: Any, W: Any, pre: Any, out: Any, scratch: Any) -> None:
        """One step of the forward recurrence: out = tanh(pre + s_prev @ W.T), all (B, H), W (H, H).

        A GEMM and the fused tanh; on CuPy, small shapes for which cuBLAS is measured slower use
        one fused dot+tanh kernel instead (chosen once per shape by timing both).
        """
        if self._use_fused("forward", W, s_prev, pre, out):
            self._kernels["fused_forward"](s_prev, W, pre, out)
            return
        self.matmul(s_prev, W.T, scratch)  # W.T is a view: BLAS reads it transposed
        self.tanh_step(pre, scratch, out)

    def backward_step(self, d_next: Any, W: Any, d: Any, g: Any, scratch: Any) -> None:
        """One step of the backward recursion: g = (g + d_next @ W) * d, all (B, H), d = 1 − s_t².

        g enters as the direct term ∂E_t/∂s_t and leaves as δ_t; d_next is δ_{t+1}.
        """
        if self._use_fused("backward", W, d_next, d, g):
            self._kernels["fused_backward"](d_next, W, d, g)
            return
        self.matmul(d_next, W, scratch)  # the through-time term δ_{t+1} @ W
        self.backprop_tanh(scratch, d, g)

    def forward_recurrence(self, pre: Any, W: Any, S: Any) -> bool:
        """Run every forward step in ONE kernel that keeps W on chip, where that is measured faster.

        pre (T, B, H), W (H, H), S (T+1, B, H) with S[0] = s0: writes S[1:] as ``forward_step``
        would. Returns False (doing nothing) where the backend has no such kernel or it loses.
        """
        if not self._use_persistent("forward", W, S, pre):
            return False
        self._kernels["persistent_forward"](pre, W, S)
        return True

    def backward_recurrence(self, G: Any, W: Any, Dt: Any) -> bool:
        """Run backward steps t = T−2 … 0 in ONE kernel that keeps W on chip, where measured faster.

        G (T, B, H) with G[T−1] already δ_{T−1}, Dt (T, B, H) = 1 − s_t²: turns G[t] into δ_t as
        ``backward_step`` would. Returns False (doing nothing) where not available or slower.
        """
        if not self._use_persistent("backward", W, G, Dt):
            return False
        self._kernels["persistent_backward"](G, W, Dt)
        return True

    #: How recurrence steps run on CuPy. "auto": per shape, the fastest of cuBLAS + a fused
    #: elementwise kernel, one fused step kernel, or one persistent kernel for all steps (timed
    #: once); "cublas", "fused" or "persistent" forces one (persistent only where W fits on chip).
    step_kernels: str = "auto"

    def kernel_choices(self) -> dict[str, dict[str, bool]]:
        """The measured choices so far: {"fused": {"forward B=16 H=128 float32": True, ...}, "persistent": {...}}.

        "fused": one fused kernel per step beat cuBLAS + elementwise; "persistent": one kernel for all
        steps beat per-step launches. Empty on NumPy.
        """
        out = {}
        for name in ("fused", "persistent"):
            get = self._kernels.get(f"{name}_choices")
            out[name] = {f"{k} B={B} H={H} {dt}": v for (k, B, H, dt), v in get().items()} if get else {}
        return out

    def _use_fused(self, kind: str, W: Any, a: Any, *more: Any) -> bool:
        choose = self._kernels.get("choose_step")
        dense = all(m.flags.c_contiguous for m in (W, a, *more))  # the kernels index dense rows
        if choose is None or self.step_kernels == "cublas" or not dense or a.size == 0:
            return False
        return self.step_kernels in ("fused", "persistent") or choose(kind, a.shape[0], W.shape[0], W.dtype)

    def _use_persistent(self, kind: str, W: Any, a: Any, *more: Any) -> bool:
        choose = self._kernels.get("choose_persistent")
        dense = all(m.flags.c_contiguous for m in (W, a, *more))
        if choose is None or self.step_kernels in ("cublas", "fused") or not dense or a.size == 0:
            return False
        step = self.forward_step if kind == "forward" else self.backward_step  # what it competes with
        return choose(kind, a.shape[1], W.shape[0], W.dtype, step, forced=self.step_kernels == "persistent")

    def tanh_step(self, pre: Any, hw: Any, out: Any) -> None:
        """out = tanh(pre + hw), all (B, H); ``hw`` may be overwritten."""
        self._kernels["tanh_step"](pre, hw, out)

    def backprop_tanh(self, carry: Any, d: Any, g: Any) -> None:
        """g = (g + carry) * d in place, all (B, H), where d = 1 − s_t² is tanh's derivative.

        g enters as ∂E/∂s_t (direct term; carry is the through-time term), leaves as δ_t.
        """
        self._kernels["backprop_tanh"](carry, d, g)

    def token_plan(self, ids: Any, vocab: int) -> TokenPlan:
        """Sort the flat token ids (N,) once; the plan drives ``token_scatter_add``."""
        xp = self.xp
        perm = xp.argsort(ids, kind="stable") if self.name == "numpy" else xp.argsort(ids)
        sorted_ids = ids[perm]
        offsets = xp.searchsorted(sorted_ids, xp.arange(vocab + 1, dtype=ids.dtype))
        return TokenPlan(perm=perm, offsets=offsets)

    def token_scatter_add(self, dUT: Any, plan: TokenPlan, rows: Any) -> None:
        """dUT[ids[n]] += rows[n] for every n; dUT (D, H), rows (N, H).

        Deterministic: each id's rows are summed in a fixed order (no atomics).
        """
        self._kernels["token_scatter_add"](dUT, plan, rows)

    def available_memory(self) -> int | None:
        """Bytes that new arrays can still take: free device memory on CuPy, available RAM on NumPy.

        CuPy: the device's free memory plus what CuPy's own pool holds but does not use (a host sync
        point); NumPy: ``MemAvailable`` of /proc/meminfo, else the free physical pages. None where the
        OS does not say. An estimate to refuse impossible sizes early, not a promise. (Running out
        anyway raises MemoryError; CuPy's OutOfMemoryError is a MemoryError too.)
        """
        if self.name == "cupy":
            free, _total = self.xp.cuda.runtime.memGetInfo()
            pool = self.xp.get_default_memory_pool()
            return int(free + pool.free_bytes())
        return _host_available_memory()


def _host_available_memory() -> int | None:
    """Available host RAM in bytes (MemAvailable: free plus reclaimable caches), or None if unknown."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


# -- NumPy twins --------------------------------------------------------------------------------
def _np_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray, accumulate: bool) -> None:
    if accumulate:
        out += a @ b  # a temporary: used once per output chunk, never per time step
    else:
        np.matmul(a, b, out=out)


def _np_capture(fn: Callable[[], None]) -> Callable[[], None]:
    return fn


def _np_timer() -> Callable[[Callable[[], Any]], float]:
    def run(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def _np_tanh_step(pre: np.ndarray, hw: np.ndarray, out: np.ndarray) -> None:
    np.add(hw, pre, out=hw)
    np.tanh(hw, out=out)


def _np_backprop_tanh(carry: np.ndarray, d: np.ndarray, g: np.ndarray) -> None:
    np.add(g, carry, out=g)
    np.multiply(g, d, out=g)


#: Up to this vocabulary size the NumPy scatter-add is a one-hot GEMM (D, N) × (N, H): 2·D·N·H
#: FLOPs at the BLAS rate beat N·H adds through ``np.add.reduceat``, which ran at only ~0.15 G
#: adds/s (measured on a 2-core AVX-512 CPU: D = 256, N = 4096, H = 1024 took 7 ms against 28 ms;
#: at D = 8000 the GEMM lost, 15 ms against 1.7 ms).
ONEHOT_MAX_VOCAB = 512


def _np_token_scatter_add(dUT: np.ndarray, plan: TokenPlan, rows: np.ndarray) -> None:
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


_NUMPY_KERNELS = {
    "matmul": _np_matmul,
    "capture": _np_capture,
    "timer": _np_timer,
    "tanh_step": _np_tanh_step,
    "backprop_tanh": _np_backprop_tanh,
    "token_scatter_add": _np_token_scatter_add,
}


# -- CuPy kernels -------------------------------------------------------------------------------
def _cupy_kernels(cp: ModuleType) -> dict[str, Callable[..., Any]]:
    tanh_step = cp.ElementwiseKernel("T pre, T hw", "T out", "out = tanh(pre + hw)", "gpubptt_tanh_step")
    backprop_tanh = cp.ElementwiseKernel("T carry, T d", "T g", "g = (g + carry) * d", "gpubptt_backprop_tanh")
    # One thread per (id, h): sums that id's rows in sorted order, so the result is bitwise
    # reproducible (an atomic scatter-add is not).
    scatter = cp.ElementwiseKernel(
        "raw T rows, raw I perm, raw I offsets, int64 H",
        "T dUT",
        """
        const long long d = i / H, h = i % H;
        T acc = 0;
        for (long long j = offsets[d]; j < offsets[d + 1]; ++j) acc += rows[perm[j] * H + h];
        dUT += acc;
        """,
        "gpubptt_token_scatter_add",
    )

    def token_scatter_add(dUT: Any, plan: TokenPlan, rows: Any) -> None:
        scatter(rows, plan.perm, plan.offsets, dUT.shape[1], dUT)

    kernels = {
        "tanh_step": tanh_step,
        "backprop_tanh": backprop_tanh,
        "token_scatter_add": token_scatter_add,
        "matmul": _cublas_matmul(cp),
        "capture": lambda fn: _cupy_capture(cp, fn),
        "timer": lambda: _cupy_timer(cp),
    }
    kernels.update(_fused_step_kernels(cp, kernels))
    kernels.update(_persistent_kernels(cp))
    return kernels


# One step of each recurrence in ONE kernel, for the small (B, H) where cuBLAS picks slow kernels
# (measured on an H100: a (16, 128) × (128, 128) product took ~50 µs inside a graph, a fused step ~3).
_STEP_SOURCE = r"""
extern "C" __global__ void fwd(const T* __restrict__ s_prev, const T* __restrict__ W,
                                 const T* __restrict__ pre, T* __restrict__ out, int B, int H) {
    // one warp per output (b, h): lanes stride over j, so rows of s_prev and W load coalesced
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= (long long)B * H) return;  // whole warps leave together
    long long b = warp / H, h = warp % H;
    const T* s_row = s_prev + b * H;
    const T* w_row = W + h * H;
    T acc = 0;
    for (int j = lane; j < H; j += 32) acc += s_row[j] * w_row[j];
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if (lane == 0) out[b * H + h] = tanh(pre[b * H + h] + acc);
}
extern "C" __global__ void bwd(const T* __restrict__ d_next, const T* __restrict__ W,
                                 const T* __restrict__ d, T* __restrict__ g, int B, int H) {
    // one thread per output (b, h): neighbours read neighbouring columns of W (coalesced)
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * H) return;
    long long b = i / H, h = i % H;
    const T* d_row = d_next + b * H;
    T acc = 0;
    for (int j = 0; j < H; ++j) acc += d_row[j] * W[(long long)j * H + h];
    g[i] = (g[i] + acc) * d[i];  // d = 1 - s^2
}
"""


# Every step of a recurrence in ONE launch: each block owns R rows of the batch (rows are independent
# in both recurrences, so blocks never wait for each other) and keeps W in shared memory for all T
# steps; the state rows ping-pong between two shared buffers, one barrier per step. Each output is
# a dot product split over L lanes (two accumulators each, then a shuffle reduction), so a step
# costs a few hundred cycles, not H dependent shared-memory loads. W's rows are padded to H + 1
# words so the lanes of a warp hit different banks whether they read a row (forward) or a column
# (backward).
_PERSISTENT_SOURCE = r"""
__device__ __forceinline__ T group_sum(T acc, int L) {
    for (int o = L / 2; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o, L);
    return acc;
}
__device__ __forceinline__ void load(T* Ws, T* buf, const T* W, const T* rows0, int H, int n) {
    const int Hp = H + 1;
    for (int i = threadIdx.x; i < H * H; i += blockDim.x) Ws[(i / H) * Hp + i % H] = W[i];
    for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = rows0[i];
    __syncthreads();
}
extern "C" __global__ void fwd(const T* __restrict__ pre, const T* __restrict__ W, T* __restrict__ S,
                               int steps, int B, int H, int R, int L) {
    extern __shared__ unsigned char smem[];
    const int Hp = H + 1, b0 = blockIdx.x * R, n = min(R, B - b0) * H;
    T* Ws = (T*)smem;
    T* buf = Ws + H * Hp;
    load(Ws, buf, W, S + (long long)b0 * H, H, n);
    const int lane = threadIdx.x % L, groups = blockDim.x / L;
    const int n_pad = (n + groups - 1) / groups * groups;  // the same trip count in every warp
    for (int t = 0; t < steps; ++t) {
        const T* cur = buf + (t & 1) * R * H;
        T* nxt = buf + ((t + 1) & 1) * R * H;
        for (int o = threadIdx.x / L; o < n_pad; o += groups) {
            const bool valid = o < n;
            const int r = valid ? o / H : 0, h = valid ? o % H : 0;
            const long long g = ((long long)t * B + b0 + r) * H + h;
            const T p = (valid && lane == 0) ? pre[g] : (T)0;
            const T* s_row = cur + r * H;
            const T* w_row = Ws + h * Hp;  // row h of W: s_t = tanh(pre + W s_{t-1})
            T a0 = 0, a1 = 0;
            for (int j = lane; j < H; j += 2 * L) {
                a0 += s_row[j] * w_row[j];
                if (j + L < H) a1 += s_row[j + L] * w_row[j + L];
            }
            const T acc = group_sum(valid ? a0 + a1 : (T)0, L);
            if (valid && lane == 0) {
                const T v = tanh(p + acc);
                nxt[o] = v;
                S[g + (long long)B * H] = v;  // S[t + 1]
            }
        }
        __syncthreads();
    }
}
extern "C" __global__ void bwd(T* __restrict__ G, const T* __restrict__ W, const T* __restrict__ Dt,
                               int steps, int B, int H, int R, int L) {
    // G[steps] holds delta of the last step on entry; `steps` = T - 1 backward steps follow
    extern __shared__ unsigned char smem[];
    const int Hp = H + 1, b0 = blockIdx.x * R, n = min(R, B - b0) * H;
    T* Ws = (T*)smem;
    T* buf = Ws + H * Hp;
    load(Ws, buf, W, G + ((long long)steps * B + b0) * H, H, n);
    const int lane = threadIdx.x % L, groups = blockDim.x / L;
    const int n_pad = (n + groups - 1) / groups * groups;
    for (int k = 0; k < steps; ++k) {
        const int t = steps - 1 - k;
        const T* cur = buf + (k & 1) * R * H;
        T* nxt = buf + ((k + 1) & 1) * R * H;
        for (int o = threadIdx.x / L; o < n_pad; o += groups) {
            const bool valid = o < n;
            const int r = valid ? o / H : 0, h = valid ? o % H : 0;
            const long long g = ((long long)t * B + b0 + r) * H + h;
            const T direct = (valid && lane == 0) ? G[g] : (T)0;
            const T d = (valid && lane == 0) ? Dt[g] : (T)0;
            const T* delta = cur + r * H;
            T a0 = 0, a1 = 0;  // column h of W: (delta W)[h] = sum_j delta[j] W[j, h]
            for (int j = lane; j < H; j += 2 * L) {
                a0 += delta[j] * Ws[j * Hp + h];
                if (j + L < H) a1 += delta[j + L] * Ws[(j + L) * Hp + h];
            }
            const T acc = group_sum(valid ? a0 + a1 : (T)0, L);
            if (valid && lane == 0) {
                const T v = (direct + acc) * d;
                nxt[o] = v;
                G[g] = v;
            }
        }
        __syncthreads();
    }
}
"""


def _persistent_kernels(cp: ModuleType) -> dict[str, Callable[..., Any]]:
    device = cp.cuda.Device()
    smem_limit = int(device.attributes.get("MaxSharedMemoryPerBlockOptin", 48 << 10))
    n_sm = int(device.attributes["MultiProcessorCount"])
    funcs = {}
    for dt, ctype in ((np.dtype(np.float32), "float"), (np.dtype(np.float64), "double")):
        src = f"#define T {ctype}\n" + _PERSISTENT_SOURCE
        funcs[dt] = (cp.RawKernel(src, "fwd"), cp.RawKernel(src, "bwd"))

    def layout(B: int, H: int, dtype: Any) -> tuple[int, int, int, int, int] | None:
        """(rows per block R, blocks, lanes per output L, threads, shared bytes); None if W does not fit."""
        R = max(1, -(-B // n_sm))  # one block per SM at most
        nbytes = (H * (H + 1) + 2 * R * H) * np.dtype(dtype).itemsize
        if B == 0 or nbytes > smem_limit:
            return None
        L = 4  # lanes per output: measured best on an H100 among 2..32 (1.9 µs/step at B=64, H=128)
        while L > 1 and R * H * L > 1024:
            L //= 2
        threads = min(1024, max(32, -(-R * H * L // 32) * 32))
        return R, -(-B // R), L, threads, nbytes

    def launch(which: int, a: Any, W: Any, b: Any, c: Any, steps: int) -> None:
        B, H = a.shape[1], a.shape[2]
        R, blocks, L, threads, nbytes = layout(B, H, W.dtype)
        fn = funcs[W.dtype][which]
        if fn.max_dynamic_shared_size_bytes < nbytes:
            fn.max_dynamic_shared_size_bytes = nbytes
        sizes = (np.int32(steps), np.int32(B), np.int32(H), np.int32(R), np.int32(L))
        fn((blocks,), (threads,), (a, W, b if which == 0 else c, *sizes), shared_mem=nbytes)

    def persistent_forward(pre: Any, W: Any, S: Any) -> None:
        launch(0, pre, W, S, None, pre.shape[0])

    def persistent_backward(G: Any, W: Any, Dt: Any) -> None:
        launch(1, G, W, None, Dt, G.shape[0] - 1)

    choices: dict[tuple, bool] = {}

    def choose_persistent(kind: str, B: int, H: int, dtype: Any, step: Callable, forced: bool = False) -> bool:
        """True when the persistent kernel fits and (unless forced) beats per-step launches of ``step``."""
        if layout(B, H, dtype) is None:
            return False
        if forced:
            return True
        key = (kind, B, H, np.dtype(dtype))
        if key not in choices:
            persistent = persistent_forward if kind == "forward" else persistent_backward
            choices[key] = _time_persistent_vs_steps(cp, kind, B, H, dtype, persistent, step)
        return choices[key]

    return {
        "persistent_forward": persistent_forward,
        "persistent_backward": persistent_backward,
        "choose_persistent": choose_persistent,
        "persistent_choices": lambda: dict(choices),
    }


def _time_persistent_vs_steps(
    cp: ModuleType, kind: str, B: int, H: int, dtype: Any, persistent_fn: Callable, step: Callable
) -> bool:
    """Time 16 steps as one persistent kernel and as per-step launches (each captured); True if persistent wins."""
    T = 16
    rng = np.random.default_rng(0)
    a = cp.asarray(rng.uniform(-1, 1, size=(T + 1, B, H)), dtype=dtype)
    b = cp.asarray(rng.uniform(0, 1, size=(T + 1, B, H)), dtype=dtype)
    W = cp.asarray(rng.uniform(-1, 1, size=(H, H)) / np.sqrt(H), dtype=dtype)
    scratch = cp.empty((B, H), dtype=dtype)
    if kind == "forward":
        persistent = lambda: persistent_fn(b[:T], W, a)  # noqa: E731
        steps = lambda: [step(a[t], W, b[t], a[t + 1], scratch) for t in range(T)]  # noqa: E731
    else:
        persistent = lambda: persistent_fn(a, W, b)  # noqa: E731
        steps = lambda: [step(a[t + 1], W, b[t], a[t], scratch) for t in range(T - 1, -1, -1)]  # noqa: E731
    return _graph_time(cp, persistent) < _graph_time(cp, steps)


def _graph_time(cp: ModuleType, fn: Callable[[], Any]) -> float:
    """Median milliseconds of 5 replays of fn captured as a graph."""
    replay = _cupy_capture(cp, fn)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(5):
        start.record()
        replay()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def _fused_step_kernels(cp: ModuleType, kernels: dict[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
    modules = {}
    for dt, ctype in ((np.dtype(np.float32), "float"), (np.dtype(np.float64), "double")):
        module = cp.RawModule(code=f"#define T {ctype}\n" + _STEP_SOURCE)
        modules[dt] = (module.get_function("fwd"), module.get_function("bwd"))

    def fused_forward(s_prev: Any, W: Any, pre: Any, out: Any) -> None:
        B, H = out.shape
        threads = 256
        blocks = (B * H * 32 + threads - 1) // threads
        modules[W.dtype][0]((blocks,), (threads,), (s_prev, W, pre, out, np.int32(B), np.int32(H)))

    def fused_backward(d_next: Any, W: Any, d: Any, g: Any) -> None:
        B, H = g.shape
        threads = 128
        blocks = (B * H + threads - 1) // threads
        modules[W.dtype][1]((blocks,), (threads,), (d_next, W, d, g, np.int32(B), np.int32(H)))

    choices: dict[tuple, bool] = {}

    def choose_step(kind: str, B: int, H: int, dtype: np.dtype) -> bool:
        """True when the fused kernel beats cuBLAS + elementwise for this step shape (timed once)."""
        key = (kind, B, H, np.dtype(dtype))
        if key not in choices:
            choices[key] = _time_fused_vs_cublas(cp, kernels, fused_forward, fused_backward, *key)
        return choices[key]

    return {
        "fused_forward": fused_forward,
        "fused_backward": fused_backward,
        "choose_step": choose_step,
        "fused_choices": lambda: dict(choices),
    }


def _time_fused_vs_cublas(
    cp: ModuleType,
    kernels: dict,
    fused_forward: Callable,
    fused_backward: Callable,
    kind: str,
    B: int,
    H: int,
    dtype: Any,
) -> bool:
    """Time 16 steps of each variant, each captured as a graph, and return True if fused wins."""
    rng = np.random.default_rng(0)
    a, pre, out, scratch = (cp.asarray(rng.uniform(-1, 1, size=(B, H)), dtype=dtype) for _ in range(4))
    W = cp.asarray(rng.uniform(-1, 1, size=(H, H)) / np.sqrt(H), dtype=dtype)
    if kind == "forward":
        variants = {
            "cublas": lambda: (kernels["matmul"](a, W.T, scratch, False), kernels["tanh_step"](pre, scratch, out)),
            "fused": lambda: fused_forward(a, W, pre, out),
        }
    else:
        variants = {
            "cublas": lambda: (kernels["matmul"](a, W, scratch, False), kernels["backprop_tanh"](scratch, pre, out)),
            "fused": lambda: fused_backward(a, W, pre, out),
        }
    best = {name: _graph_time(cp, lambda step=step: [step() for _ in range(16)]) for name, step in variants.items()}
    return best["fused"] < best["cublas"]


def _col_major(M: Any) -> tuple[bool, int] | None:
    """Describe the row-major matrix M (p, q) as cuBLAS sees its memory: (transposed?, ld).

    A C-ordered M is, read column-major, Mᵀ with ld = row stride (no transpose needed to get Mᵀ);
    a transposed view is M itself column-major, so Mᵀ needs op = T. None: neither (copy first).
    """
    p, q = M.shape
    s0, s1 = (st // M.itemsize for st in M.strides)
    if s1 == 1 or q == 1:
        ld = s0 if p > 1 else q
        if ld >= max(q, 1):
            return False, ld
    if s0 == 1 or p == 1:
        ld = s1 if q > 1 else p
        if ld >= max(p, 1):
            return True, ld
    return None


def _load_cublas(cp: ModuleType) -> Any:
    """The libcublas that CuPy loaded, opened through ctypes.

    CuPy's own cuBLAS bindings refuse to run while a stream is being captured; cuBLAS itself
    supports capture. So GEMMs go straight to the library, with a handle and workspace of ours.
    """
    cp.cuda.device.get_cublas_handle()  # make CuPy load libcublas
    path = None
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            name = line.rsplit(" ", 1)[-1].strip()
            if "libcublas.so" in name and "libcublasLt" not in name:
                path = name
                break
    candidates = [path] if path else []
    candidates += [ctypes.util.find_library("cublas"), "libcublas.so.13", "libcublas.so.12", "libcublas.so"]
    for cand in candidates:
        if cand:
            with contextlib.suppress(OSError):
                return ctypes.CDLL(cand)
    raise OSError("libcublas could not be opened")


def _cublas_matmul(cp: ModuleType) -> Callable[..., None]:
    lib = _load_cublas(cp)
    c_int, c_void_p = ctypes.c_int, ctypes.c_void_p
    for name in ("cublasSgemm_v2", "cublasDgemm_v2"):
        fn = getattr(lib, name)
        fn.argtypes = [c_void_p, c_int, c_int, c_int, c_int, c_int, c_void_p, c_void_p, c_int]
        fn.argtypes += [c_void_p, c_int, c_void_p, c_void_p, c_int]
        fn.restype = c_int
    lib.cublasSetStream_v2.argtypes = [c_void_p, c_void_p]
    lib.cublasSetWorkspace_v2.argtypes = [c_void_p, c_void_p, ctypes.c_size_t]

    def check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    handle = c_void_p()
    check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
    # a workspace of our own, so cuBLAS never allocates while a graph is being captured
    workspace = cp.empty(32 << 20, dtype=cp.uint8)
    current = [None]  # the stream the handle is set to
    gemm = {
        np.dtype(np.float32): (lib.cublasSgemm_v2, ctypes.c_float),
        np.dtype(np.float64): (lib.cublasDgemm_v2, ctypes.c_double),
    }
    scalars = {dt: (ctype(1.0), ctype(0.0)) for dt, (_, ctype) in gemm.items()}
    N, T = 0, 1  # CUBLAS_OP_N, CUBLAS_OP_T

    def matmul(a: Any, b: Any, out: Any, accumulate: bool) -> None:
        m, k = a.shape
        n = b.shape[1]
        if m == 0 or n == 0:
            return
        if k == 0:
            if not accumulate:
                out.fill(0)
            return
        la, lb, lc = _col_major(a), _col_major(b), _col_major(out)
        if la is None:
            a, la = cp.ascontiguousarray(a), (False, k)
        if lb is None:
            b, lb = cp.ascontiguousarray(b), (False, n)
        if lc is None or lc[0]:
            raise ValueError(f"matmul: out must have unit stride along rows, got strides {out.strides}")
        fn, _ = gemm[out.dtype]
        one, zero = scalars[out.dtype]
        stream = cp.cuda.get_current_stream().ptr
        if stream != current[0]:  # cublasSetStream also resets the workspace: set ours again
            check(lib.cublasSetStream_v2(handle, stream), "cublasSetStream")
            check(lib.cublasSetWorkspace_v2(handle, workspace.data.ptr, workspace.nbytes), "cublasSetWorkspace")
            current[0] = stream
        # row-major out = a @ b  is column-major outᵀ = bᵀ aᵀ
        status = fn(
            handle, T if lb[0] else N, T if la[0] else N, n, m, k,
            ctypes.byref(one), b.data.ptr, lb[1], a.data.ptr, la[1],
            ctypes.byref(one if accumulate else zero), out.data.ptr, lc[1],
        )  # fmt: skip
        check(status, "gemm")

    matmul.keepalive = (lib, handle, workspace)  # type: ignore[attr-defined]
    return matmul


def _cupy_timer(cp: ModuleType) -> Callable[[Callable[[], Any]], float]:
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


def _cupy_capture(cp: ModuleType, fn: Callable[[], None]) -> Callable[[], None]:
    pool = cp.cuda.MemoryPool()
    stream = cp.cuda.Stream(non_blocking=True)
    cp.cuda.get_current_stream().synchronize()  # inputs written on the current stream are ready
    with cp.cuda.using_allocator(pool.malloc), stream:
        fn()  # warm-up: compiles kernels and caches every temporary in the private pool
        stream.synchronize()
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


# -- selection ----------------------------------------------------------------------------------
_CACHE: dict[str, Backend] = {}


def _is_cupy_array(a: Any) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def _numpy_backend() -> Backend:
    cpu = platform.processor() or platform.machine()
    device = f"CPU ({cpu}, {os.cpu_count()} logical cores)"
    return Backend("numpy", np, device, dict(_NUMPY_KERNELS))


def _cupy_backend() -> Backend:
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
        kernels = _cupy_kernels(cp)
    except Exception as exc:
        raise BackendUnavailableError(f"CuPy could not use the CUDA device ({exc}); {INSTALL_HINT}") from exc
    return Backend("cupy", cp, f"{name} (CUDA device {cp.cuda.Device().id})", kernels, chunk_elements=1 << 24)


def get_backend(name: str | Backend | None = None) -> Backend:
    """Return the backend called ``name``: "numpy", "cupy" or "auto".

    ``None`` reads the ``GPUBPTT_BACKEND`` environment variable, else "auto" (CuPy when it imports
    and a CUDA device answers, else NumPy). Asking for "cupy" where it cannot run raises
    BackendUnavailableError; there is never a silent fallback.
    """
    if isinstance(name, Backend):
        return name
    if name is None:
        name = os.environ.get(ENV_VAR, "").strip() or "auto"
    if not isinstance(name, str) or name.lower() not in BACKEND_NAMES:
        raise InputError(f"unknown backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}")
    name = name.lower()
    if name == "auto":
        try:
            return get_backend("cupy")
        except BackendUnavailableError:
            return get_backend("numpy")
    if name not in _CACHE:
        _CACHE[name] = _numpy_backend() if name == "numpy" else _cupy_backend()
    return _CACHE[name]


def available_backends() -> list[str]:
    """Names of the backends that can run here, NumPy first."""
    names = ["numpy"]
    try:
        get_backend("cupy")
        names.append("cupy")
    except BackendUnavailableError:
        pass
    return names


def to_numpy(a: Any) -> np.ndarray:
    """Return any array (NumPy, CuPy, 0-d) as a NumPy array; a host sync point for CuPy."""
    if _is_cupy_array(a):
        return a.get()
    return np.asarray(a)
