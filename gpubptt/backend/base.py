"""The backend interface: what the engine, the cells and the losses may ask of an array library.

Shape-agnostic; each method's docstring gives its shapes. One subclass per library
(``NumpyBackend``, ``CupyBackend``); nothing outside this package branches on which one runs.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import BackendMismatchError, InputTypeError
from .precision import Scratch, check_precision

__all__ = ["Backend", "TokenPlan"]


@dataclass(frozen=True)
class TokenPlan:
    """Token ids sorted once so that the scatter-add into dU is deterministic.

    perm (N,) row order that sorts the ids; offsets (D+1,) start of each id's run in that order.
    """

    perm: Any
    offsets: Any


def is_cupy_array(a: Any) -> bool:
    """True for a CuPy array, without importing CuPy."""
    return type(a).__module__.split(".")[0] == "cupy"


def to_numpy(a: Any) -> np.ndarray:
    """Return any array (NumPy, CuPy, 0-d) as a NumPy array; a host sync point for CuPy."""
    if is_cupy_array(a):
        return a.get()
    return np.asarray(a)


class Backend:
    """One array library: ``xp`` plus the few operations that differ between libraries.

    Attributes: ``name`` ("numpy" | "cupy"), ``xp`` (the array module), ``device`` (a description),
    ``chunk_elements`` (the default output-layer chunk, in logits), ``supports_graphs``,
    ``compiles_kernels`` (whether ``elementwise``/``raw_kernels`` return device kernels).
    """

    name: str = "?"
    xp: ModuleType
    device: str = "?"
    #: Logits per output-layer chunk (rows·K, at least one time step): on a 2-core CPU at K = 8000,
    #: B = 32, 2^22 (16 MiB in float32) took 61 ms, 2^21 63, 2^20 72 and 2^23 65 (the GEMMs want a
    #: few hundred rows); a GPU takes 2^24 (each chunk is a dozen launches, memory is plentiful).
    #: A model whose own ``chunk_elements`` is None reads this one at each call.
    chunk_elements: int = 1 << 22
    #: Entries per block of a chain of elementwise passes (the dropout hash): on the CPU blocks that
    #: stay in cache (2^15 uint64: 256 KiB) ran 2–3× faster than whole arrays; a GPU takes whole arrays.
    block_elements: int = 1 << 15
    #: How recurrence steps run where kernels are compiled (CuPy), for models that do not set their
    #: own ``step_kernels``: "auto" (timed per shape), "cublas", "fused" or "persistent".
    step_kernels: str = "auto"
    supports_graphs: bool = False
    compiles_kernels: bool = False
    #: the library behind ``matmul`` described (version, threading), where the backend says; None where not
    blas_library: str | None = None
    #: The precision of ``matmul``'s operands: "fp32" here; "tf32" or "bf16" on the views that
    #: ``with_precision`` returns (``gpubptt.backend.precision``).
    precision: str = "fp32"
    #: ``concurrent``'s value until it is set: whether ``run_concurrently`` runs its jobs at once (NumPy: in
    #: threads; CuPy: on side streams, off until measured on a device)
    concurrent_default: bool = False

    def __init__(self) -> None:
        self._choices: dict[str, dict[Hashable, bool]] = {}
        self._choices_lock = threading.RLock()  # a measurement may ask for another one (it nests)

    def __repr__(self) -> str:
        extra = "" if self.precision == "fp32" else f", precision={self.precision!r}"
        return f"Backend(name={self.name!r}, device={self.device!r}{extra})"

    def with_precision(self, precision: str) -> Backend:
        """This backend with every ``matmul``'s two operands rounded to ``precision`` ("tf32", "bf16"; products
        accumulated in float32), or the float32 backend itself for "fp32".

        A view: one per backend and precision, sharing everything else (arrays, kernels, measured
        choices, BLAS threads) with the float32 backend, whose ``precision`` stays "fp32". The token
        scatter-add into dU is a sum, not a product, and stays exact.
        """
        precision = check_precision(precision)
        exact = self.exact
        if precision == "fp32":
            return exact
        with exact._choices_lock:
            views = exact.__dict__.setdefault("_precision_views", {})
            if precision not in views:
                view = copy.copy(exact)  # shares every attribute's object: choices, locks, cuBLAS handle
                view.precision = precision
                view._exact = exact
                view._scratch = Scratch()  # rounded operands, per thread, reused
                view.token_scatter_add = exact.token_scatter_add  # type: ignore[method-assign]
                views[precision] = view
            return views[precision]

    @property
    def concurrent(self) -> bool:
        """Whether ``run_concurrently`` may run its jobs at once (the two directions of a bidirectional layer);
        one setting for this backend and its ``with_precision`` views."""
        return self.exact.__dict__.get("_concurrent", self.concurrent_default)

    @concurrent.setter
    def concurrent(self, value: bool) -> None:
        if not isinstance(value, (bool, np.bool_)):  # as validation.check_bool (which imports the backends)
            raise InputTypeError(f"concurrent must be a bool, got {type(value).__name__} {value!r}")
        self.exact.__dict__["_concurrent"] = bool(value)

    @property
    def exact(self) -> Backend:
        """The float32 backend behind a ``with_precision`` view (this backend itself where it is one)."""
        return self.__dict__.get("_exact", self)

    # -- host <-> device boundary -------------------------------------------------------------
    def is_native(self, a: Any) -> bool:
        """True when ``a`` is an array of this backend (not a list, not another library's array)."""
        return isinstance(a, self.xp.ndarray)

    def check_native(self, a: Any, what: str) -> None:
        """Raise BackendMismatchError if ``a`` is an array of another backend."""
        if self.is_native(a) or isinstance(a, (list, tuple, int, float, np.generic)):
            return
        if is_cupy_array(a) or isinstance(a, np.ndarray) or hasattr(a, "__array__"):
            kind = "a CuPy array" if is_cupy_array(a) else f"a {type(a).__module__}.{type(a).__name__}"
            raise BackendMismatchError(
                f"{what} is {kind}, but the model runs on the {self.name} backend; {self.conversion_hint}"
            )

    conversion_hint: str = "convert it with gpubptt.to_numpy(...)"

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        """Copy or view ``a`` (NumPy, CuPy or list) as an array of this backend."""
        raise NotImplementedError

    def to_numpy(self, a: Any) -> np.ndarray:
        """Return ``a`` as a NumPy array (a device-to-host copy on CuPy; a host sync point)."""
        return to_numpy(a)

    def external_stream(self, handle: int | None, device: int | None = None) -> Any:
        """A context in which this backend's work runs on another library's stream (a CUDA stream
        pointer, as torch's ``current_stream().cuda_stream``; 0 is the legacy default stream, None keeps
        the current one) of CUDA device ``device`` (None: the current device); a no-op on the host."""
        return contextlib.nullcontext()

    def placement(self) -> Any:
        """Where work queued now runs, as a hashable: (device id, stream pointer) on a GPU, None on the host.
        Buffers reused under the same placement need no sync: work on one stream runs in order."""
        return None

    def synchronize(self) -> None:
        """Wait until all queued device work is done (no-op on the host)."""

    def empty_pinned(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A host array for staging this backend's buffers (page-locked on a device, so copies run at full speed)."""
        return np.empty(shape, dtype=dtype)

    def copy_to_host(self, a: Any, out: np.ndarray) -> None:
        """out[...] = a, from this backend's array ``a`` into the host array ``out`` of the same shape."""
        np.copyto(out, to_numpy(a))

    def copy_from_host(self, host: np.ndarray, out: Any) -> None:
        """out[...] = host, from a host array into this backend's array ``out`` of the same shape."""
        out[...] = host

    def timer(self) -> Callable[[Callable[[], Any]], float]:
        """A function that runs fn() once and returns its time in seconds, synchronised with the device."""
        raise NotImplementedError

    def data_ptr(self, a: Any) -> int:
        """The address of a's first element (identifies the memory a captured graph reads)."""
        raise NotImplementedError

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Record fn's device work once and return a function that replays it (fn itself where no graphs).

        fn must read and write only arrays that outlive the graph, and do no host sync.
        """
        return fn

    def available_memory(self) -> int | None:
        """Bytes that new arrays can still take on this backend's device, or None where unknown.

        An estimate, used to refuse sizes that cannot fit before any work; not a promise.
        """
        return None

    def peak_bytes(self, fn: Callable[[], Any]) -> int:
        """Run fn() once; the most bytes it held at any moment beyond what was held before (tracemalloc
        on the host; on a device, the memory pool's allocations and frees, counted by a hook)."""
        import tracemalloc

        started = not tracemalloc.is_tracing()
        if started:
            tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            fn()
            return max(0, tracemalloc.get_traced_memory()[1] - base)
        finally:
            if started:
                tracemalloc.stop()

    # -- random numbers (dropout masks) ---------------------------------------------------------
    def random_generator(self, seed: int | None) -> Any:
        """A generator of uniform numbers on this backend, seeded (None: fresh entropy)."""
        return np.random.default_rng(seed)

    def fill_uniform(self, generator: Any, out: Any) -> None:
        """Fill ``out`` (any shape, float32 or float64) with uniform numbers in [0, 1) from ``generator``."""
        generator.random(out=out, dtype=out.dtype)

    # -- compute ------------------------------------------------------------------------------
    def matmul(self, a: Any, b: Any, out: Any, accumulate: bool = False) -> None:
        """out = a @ b, or out += a @ b with ``accumulate``; a (m, k), b (k, n), out (m, n).

        a and b may be transposed views (b may be a ``pack`` handle); out must have unit stride along its rows.
        """
        raise NotImplementedError

    def pack(self, b: Any, rows: int, steps: int | None = None, *, loop: bool = False) -> Any:
        """b (k, n) prepared for ``steps`` (None: many) ``matmul(a, handle, out)`` with a (rows, k), e.g. the
        recurrent weight of every step; b itself where the backend has nothing to prepare (the default) or
        the steps would not repay it. ``loop``: for a step loop that may run as one compiled call (no Python
        between steps), where smaller GEMMs repay it. A handle is valid until b changes: make it per call,
        never keep it across calls."""
        return b

    def row_blocks(self, n: int, elements: int) -> list[slice]:
        """Blocks of n rows for elementwise work over ``elements`` values in all, to run as ``run_concurrently``'s
        jobs: here one block (a device runs each kernel over all rows at once)."""
        return [slice(0, n)]

    def run_concurrently(self, jobs: list[Callable[[], None]]) -> None:
        """Run independent pieces of work (no buffer shared between them), here one after the other in order.

        A backend whose library releases the GIL may run them at once (``NumpyBackend``)."""
        for job in jobs:
            job()

    def take_rows(self, src: Any, index: Any, out: Any) -> Any:
        """out[i] = src[index[i]] for 2-d src and out, index valid (checked by the caller); no temporary."""
        return self.xp.take(src, index, axis=0, out=out)

    def sum_rows(self, a: Any, out: Any = None) -> Any:
        """Σ over the rows of a (n, K) → (K,) (into ``out`` where given): a bias's gradient over every step and
        example. The library's reduction (a tree on the GPU); NumPy's adds row after row, see ``NumpyBackend``."""
        return self.xp.sum(a, axis=0, out=out)

    def token_plan(self, ids: Any, vocab: int) -> TokenPlan:
        """Sort the flat token ids (N,) once; the plan drives ``token_scatter_add``."""
        xp = self.xp
        perm = self._stable_argsort(ids)
        sorted_ids = ids[perm]
        offsets = xp.searchsorted(sorted_ids, xp.arange(vocab + 1, dtype=ids.dtype))
        return TokenPlan(perm=perm, offsets=offsets)

    def _stable_argsort(self, ids: Any) -> Any:
        return self.xp.argsort(ids)

    def token_scatter_add(self, dUT: Any, plan: TokenPlan, rows: Any) -> None:
        """dUT[ids[n]] += rows[n] for every n; dUT (D, H), rows (N, H).

        Deterministic: each id's rows are summed in a fixed order (no atomics).
        """
        raise NotImplementedError

    # -- kernels a cell brings (device backends only) -----------------------------------------
    def elementwise(self, in_params: str, out_params: str, body: str, name: str) -> Callable[..., Any] | None:
        """An elementwise kernel compiled from C ``body``, or None where the backend compiles none."""
        return None

    def raw_kernels(self, source: str, names: tuple[str, ...], dtype: Any) -> dict[str, Any] | None:
        """Kernels ``names`` compiled from CUDA ``source`` with ``T`` defined as dtype's C type; None on the host."""
        return None

    def device_limits(self) -> dict[str, int]:
        """{"shared_memory_per_block": bytes (opt-in), "multiprocessors": count}; empty on the host."""
        return {}

    def choice(self, family: str, key: Hashable, measure: Callable[[], bool]) -> bool:
        """The measured choice ``key`` of ``family`` (e.g. "fused", ("forward", B, H, dtype)): ``measure()``
        runs once per key and process, under a lock, so two threads meeting a new shape time it once.
        """
        table = self._choices.get(family)
        if table is not None and key in table:  # measured already: no lock on the step path
            return table[key]
        with self._choices_lock:
            table = self._choices.setdefault(family, {})
            if key not in table:
                table[key] = bool(measure())
            return table[key]

    def kernel_choices(self) -> dict[str, dict[str, bool]]:
        """The measured choices so far, e.g. {"fused": {"forward B=16 H=128 float32": True}, "persistent": {...}}.

        Keys of (kind, B, H, dtype) read as "kind B=.. H=.. dtype". Empty where nothing is measured (NumPy).
        """
        with self._choices_lock:
            out: dict[str, dict[str, bool]] = {"fused": {}, "persistent": {}}
            for family, table in self._choices.items():
                out[family] = {_describe_key(k): v for k, v in table.items()}
            return out

    def graph_time(self, fn: Callable[[], Any]) -> float:
        """Median seconds of a few replays of fn captured as a graph (what a kernel choice is measured by)."""
        timer = self.timer()
        replay = self.capture(fn)
        return float(np.median([timer(replay) for _ in range(5)]))


def _describe_key(key: Hashable) -> str:
    if isinstance(key, tuple) and len(key) == 4:
        kind, B, H, dtype = key
        return f"{kind} B={B} H={H} {dtype}"
    return str(key)
