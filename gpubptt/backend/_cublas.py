"""GEMMs through cuBLAS itself, opened with ctypes, with a handle and a workspace of gpubptt's own per device.

CuPy's own cuBLAS bindings refuse to run while a stream is being captured; cuBLAS itself supports
capture. A cuBLAS handle belongs to the device current when it was made, so each device gets its own
handle and workspace (``_OnDevice``), made the first time a GEMM runs there (a model on the tensors'
own GPU, ``gpubptt.torch``). A device's handle is shared by the process: its stream and each GEMM are
set and queued under one lock, so threads on different streams never send a GEMM to another thread's
stream. The one workspace is safe while device work is ordered (CuPy's default stream orders every
thread's work); a side stream that runs beside it (``_streams``) gets a workspace of its own
(``matmul.add_stream``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from .precision import BF16_ROUND_BODY

__all__ = ["col_major", "cublas_matmul"]

# cuBLAS and CUDA enum values (cublas_api.h, library_types.h)
CUDA_R_32F, CUDA_R_16BF = 0, 14
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
CUBLAS_GEMM_DEFAULT = -1
#: each workspace's size (cuBLAS's own default on Hopper is 32 MiB)
WORKSPACE_BYTES = 32 << 20


def col_major(M: Any) -> tuple[bool, int] | None:
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


def cublas_matmul(cp: ModuleType) -> Callable[..., None]:
    lib = _load_cublas(cp)
    c_int, c_void_p = ctypes.c_int, ctypes.c_void_p
    for name in ("cublasSgemm_v2", "cublasDgemm_v2"):
        fn = getattr(lib, name)
        fn.argtypes = [c_void_p, c_int, c_int, c_int, c_int, c_int, c_void_p, c_void_p, c_int]
        fn.argtypes += [c_void_p, c_int, c_void_p, c_void_p, c_int]
        fn.restype = c_int
    lib.cublasGemmEx.argtypes = [c_void_p, c_int, c_int, c_int, c_int, c_int, c_void_p, c_void_p, c_int, c_int]
    lib.cublasGemmEx.argtypes += [c_void_p, c_int, c_int, c_void_p, c_void_p, c_int, c_int, c_int, c_int]
    lib.cublasGemmEx.restype = c_int
    lib.cublasSetStream_v2.argtypes = [c_void_p, c_void_p]
    lib.cublasSetWorkspace_v2.argtypes = [c_void_p, c_void_p, ctypes.c_size_t]

    def check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    states: dict[int, _OnDevice] = {}  # by device id
    lock = threading.Lock()
    gemm = {
        np.dtype(np.float32): (lib.cublasSgemm_v2, ctypes.c_float),
        np.dtype(np.float64): (lib.cublasDgemm_v2, ctypes.c_double),
    }
    scalars = {dt: (ctype(1.0), ctype(0.0)) for dt, (_, ctype) in gemm.items()}
    N, T = 0, 1  # CUBLAS_OP_N, CUBLAS_OP_T
    to_bf16 = cp.ElementwiseKernel("float32 x", "uint16 y", BF16_ROUND_BODY, "gpubptt_round_bf16")
    f32 = (ctypes.c_float(1.0), ctypes.c_float(0.0))

    def matmul(a: Any, b: Any, out: Any, accumulate: bool, precision: str = "fp32", scratch: Any = None) -> None:
        """out = a @ b (or +=); ``precision`` "tf32"/"bf16" (float32 a, b, out only) through cublasGemmEx."""
        m, k = a.shape
        n = b.shape[1]
        if m == 0 or n == 0:
            return
        if k == 0:
            if not accumulate:
                out.fill(0)
            return
        in_type = CUDA_R_32F
        if precision != "fp32":
            if a.dtype != np.float32 or b.dtype != np.float32 or out.dtype != np.float32:
                raise ValueError(
                    f"precision={precision!r} needs float32 operands, got {a.dtype}, {b.dtype}, {out.dtype}"
                )
            if precision == "bf16":  # bfloat16 bit patterns, rounded to nearest even, C-ordered in scratch
                stream = cp.cuda.get_current_stream().ptr  # scratch per thread and stream: never shared in flight
                a = to_bf16(a, scratch.get(f"a{stream}", a.shape, np.uint16, cp))
                b = to_bf16(b, scratch.get(f"b{stream}", b.shape, np.uint16, cp))
                in_type = CUDA_R_16BF
        la, lb, lc = col_major(a), col_major(b), col_major(out)
        if la is None:
            a, la = cp.ascontiguousarray(a), (False, k)
        if lb is None:
            b, lb = cp.ascontiguousarray(b), (False, n)
        if lc is None or lc[0]:
            raise ValueError(f"matmul: out must have unit stride along rows, got strides {out.strides}")
        fn, _ = gemm[out.dtype]
        one, zero = scalars[out.dtype]
        stream = cp.cuda.get_current_stream().ptr  # per thread: each thread's GEMM must go to its own stream
        with lock:  # one handle per device for the process: its stream and the GEMM are set and queued together
            on = on_device()
            handle = on.handle
            if stream != on.stream:  # cublasSetStream also resets the workspace: set ours again
                check(lib.cublasSetStream_v2(handle, stream), "cublasSetStream")
                space = on.workspaces.get(stream, on.workspace)
                check(lib.cublasSetWorkspace_v2(handle, space.data.ptr, space.nbytes), "cublasSetWorkspace")
                on.stream = stream
            # row-major out = a @ b  is column-major outᵀ = bᵀ aᵀ
            if precision != "fp32":  # float32 output and accumulation; tensor-core inputs
                compute = CUBLAS_COMPUTE_32F_FAST_TF32 if precision == "tf32" else CUBLAS_COMPUTE_32F
                status = lib.cublasGemmEx(
                    handle, T if lb[0] else N, T if la[0] else N, n, m, k,
                    ctypes.byref(f32[0]), b.data.ptr, in_type, lb[1], a.data.ptr, in_type, la[1],
                    ctypes.byref(f32[0] if accumulate else f32[1]), out.data.ptr, CUDA_R_32F, lc[1],
                    compute, CUBLAS_GEMM_DEFAULT,
                )  # fmt: skip
            else:
                status = fn(
                    handle, T if lb[0] else N, T if la[0] else N, n, m, k,
                    ctypes.byref(one), b.data.ptr, lb[1], a.data.ptr, la[1],
                    ctypes.byref(one if accumulate else zero), out.data.ptr, lc[1],
                )  # fmt: skip
        check(status, "gemm")

    def on_device() -> _OnDevice:
        """The current device's handle and workspaces, made on it the first time (under ``lock``)."""
        device = cp.cuda.Device().id
        on = states.get(device)
        if on is None:
            handle = c_void_p()
            with cp.cuda.Device(device):
                check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
                with cp.cuda.using_allocator():  # its own memory, outside any pool (see add_stream)
                    # a workspace of our own, so cuBLAS never allocates while a graph is being captured
                    on = states[device] = _OnDevice(handle, cp.empty(WORKSPACE_BYTES, dtype=cp.uint8))
        return on

    def add_stream(stream: int) -> None:
        """A workspace of its own for the stream with pointer ``stream`` (of the current device), for GEMMs in
        flight beside those of other streams; made at once, with memory of its own (the warm-up before a capture,
        which makes the side streams, allocates from the graph's private pool, freed with the graph), never during
        a capture. Kept for the process's life, also after its stream is gone: a graph captured with it holds its
        address."""
        with lock:
            on = on_device()
            if stream not in on.workspaces:
                with cp.cuda.using_allocator():  # its own memory, outside any pool: a graph's private pool can die
                    on.workspaces[stream] = cp.empty(WORKSPACE_BYTES, dtype=cp.uint8)

    with lock:
        on_device()  # the handle of the device current now, made with the backend (an error surfaces here)
    matmul.add_stream = add_stream  # type: ignore[attr-defined]
    matmul.keepalive = (lib, states)  # type: ignore[attr-defined]
    return matmul


class _OnDevice:
    """One device's cuBLAS handle, its default workspace, side streams' own workspaces (by stream pointer) and
    the stream the handle is set to now."""

    def __init__(self, handle: Any, workspace: Any) -> None:
        self.handle = handle
        self.workspace = workspace
        self.workspaces: dict[int, Any] = {}
        self.stream: int | None = None
