"""The NumPy backend: the host, OpenBLAS/MKL GEMMs, no graphs and no compiled kernels."""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError, InputError
from ..timing import sync_timer
from ._mkl import Mkl, PackedMatrix, PackSlot, load_mkl
from .base import Backend, TokenPlan, is_cupy_array
from .precision import Rounded, rounded_operands

__all__ = [
    "BLAS_CHOICES",
    "BLAS_THREADED_FLOPS",
    "BLAS_VAR",
    "MKL_MIN_FLOPS",
    "ONEHOT_MAX_VOCAB",
    "PACK_MIN_ROWS",
    "BlasThreads",
    "NumpyBackend",
    "most_threads",
    "wait_all",
]

#: The variable that picks the NumPy backend's GEMMs, read when the backend is made: "auto" (MKL where the
#: ``mkl`` extra is installed, else NumPy's own BLAS), "mkl" (an error where it is absent) or "numpy".
BLAS_VAR = "GPUBPTT_BLAS"
BLAS_CHOICES = ("auto", "mkl", "numpy")
#: each BLAS library's thread count when this process's first backend read it (``BlasThreads``), by file path
_FOUND_THREADS: dict[str, int] = {}
#: rows per block of ``NumpyBackend.sum_rows``'s first level
SUM_BLOCK = 128
MKL_HINT = "pip install mkl (x86-64 only; or, in gpubptt's source folder, pip install -e '.[mkl]')"

#: Under MKL, a GEMM of fewer FLOPs (2·m·n·k) runs on NumPy's own BLAS: MKL's fixed cost per call (and the
#: ctypes call's) loses there. One thread, a 2-core AVX-512 CPU (``benchmarks/blas_gemm.py``), µs per GEMM,
#: OpenBLAS / MKL: (1 × 100)·(100 × 100) 2.9 / 12; (16 × 128)·(128 × 128) 8.7 / 18; (32 × 256)·(256 × 256)
#: 61 / 54. ``pack`` packs a weight (MKL's packed B, reused by every step of a recurrence) from the same size.
#: 4 MFLOP, not 2: at (64 × 128)·(128 × 128) (2.1 MFLOP, the step of ``gpubptt bench``'s H = 128 sweep) the
#: packed steps ran 34 µs in the loop against OpenBLAS's 30, and the whole call 20 against 17 ms.
MKL_MIN_FLOPS = 1 << 22

#: A weight is packed for a loop whose GEMMs take this many rows in all (steps × rows per step), no fewer:
#: a pack costs about one plain GEMM of 32 rows and saves about a third of each packed one ((32 × 256)·(256 ×
#: 1024): pack 0.16 ms, GEMM 0.20 ms plain, 0.14 ms packed); one step at B = 1, H = 512 took 3.5 ms packed
#: against 0.6 ms plain (sampling). A GEMM that ``matmul`` splits over threads is not packed: split in two it
#: beat one packed thread on an idle 2-core VM, (128 × 1024)·(1024 × 4096) 6.2 against 9.4 ms, (64 × 512)·(512 ×
#: 2048) 1.1 against 1.3 ms (on a loaded one, the other way round: 9.5 against 6.8 ms).
PACK_MIN_ROWS = 256

#: A GEMM of fewer FLOPs (2·m·n·k) runs on one BLAS thread, a larger one on all the BLAS threads this
#: process may use. The per-step GEMMs (m = B rows) fall below it, the batched ones (input projection,
#: dW/dU, output layer: T·B rows) above. Below it a second thread buys little alone (OpenBLAS on a
#: 2-core CPU: ×1.0 at (32 × 256)·(256 × 256), ×1.3 at (32 × 256)·(256 × 1024)), and on a shared
#: machine every threaded call waits for a core the other process holds: two processes each took
#: 5–19× their time alone with per-step GEMMs threaded (``benchmarks/steady.py``).
BLAS_THREADED_FLOPS = 1 << 26

#: Elementwise work over fewer values (the output layer's softmax and cross-entropy over a chunk's logits) runs
#: in one thread, more in two halves of the rows at once (``NumpyBackend.row_blocks``). The softmax-xent gradient
#: of a chunk on the 2-core VM, halves ÷ one thread: 1.62 at 2^15 values, 1.38 at 2^16, 0.95 at 2^17, 0.86 at
#: 2^18, 0.79 at 2^19 (the thread hand-off costs ~0.1 ms); whole Elman models 0.92–0.98× the time with K = 256
#: to 8000 (in-process alternating calls).
ROW_SPLIT_MIN_ELEMENTS = 1 << 18

#: Variables by which a user sizes the BLAS threads; where one is set, the threads it asks for are the most
#: a GEMM uses (never more), and MPI ranks are not divided further.
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
#: How launchers tell a process how many ranks share its host (MPICH's Hydra, Open MPI, Slurm).
LOCAL_RANK_VARIABLES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")


def most_threads(library_threads: int, cores: int, environ: Mapping[str, str]) -> int:
    """The BLAS threads a large GEMM may take in this process: where the user set one of ``THREAD_VARIABLES``,
    ``library_threads`` (the BLAS's own count, which honours its own variables) or fewer where another of them
    asks for fewer (``MKL_NUM_THREADS=1`` under MKL);
    else the usable cores divided among the ranks that the MPI launcher says share this host.
    """
    if any(name in environ for name in THREAD_VARIABLES):
        asked = []  # MKL reads none of OpenBLAS's variables: the fewest threads any of them asks for counts
        for name in THREAD_VARIABLES:
            with contextlib.suppress(KeyError, ValueError):
                asked.append(int(environ[name]))
        return max(1, min([library_threads, *(n for n in asked if n > 0)]))
    ranks = 1
    for name in LOCAL_RANK_VARIABLES:
        with contextlib.suppress(KeyError, ValueError):
            ranks = max(1, int(environ[name]))
            break
    return max(1, min(library_threads, cores) // ranks)


def _renew_after_fork() -> None:
    """In a forked child: another thread's GEMM (holding a count's lock, or counted in flight) does not exist there."""
    for threads in list(_ALL_THREADS):
        threads._lock = threading.Lock()
        threads._in_flight = 0


#: every ``BlasThreads``, for ``_renew_after_fork``
_ALL_THREADS: weakref.WeakSet[BlasThreads] = weakref.WeakSet()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_after_fork)


class BlasThreads:
    """The BLAS thread count per GEMM shape, through ``threadpoolctl`` (one ctypes call, ~2 µs, on a change).

    ``most``: the threads a large GEMM takes: the BLAS's own count (which honours the user's thread
    variables), or, where no such variable is set, the usable cores divided among the MPI ranks on
    this host. Small GEMMs take one. The count is process-wide, so it changes only while no other
    GEMM of this backend runs (threads sharing the backend keep whatever count is in force). Without a
    BLAS that threadpoolctl can steer, or with ``enabled`` False, the BLAS keeps its own count.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set: Callable[[int], Any] | None = None
        self._in_flight = 0
        _ALL_THREADS.add(self)
        self._jobs = threading.local()  # .inside: this Python thread runs a job of ``run_concurrently``
        self._most = 1
        self.enabled = True
        self.library = "unknown"
        self.current = 0
        try:
            from threadpoolctl import ThreadpoolController

            libs = ThreadpoolController().select(user_api="blas").lib_controllers
        except Exception:  # no threadpoolctl, or it cannot read this process's libraries: leave the BLAS be
            libs = []
        # NumPy's own BLAS: the library in NumPy's folder, else one that is not the MKL gpubptt may have loaded
        others = [c for c in libs if c.internal_api != "mkl"] or libs
        lib = next((c for c in libs if "numpy" in (c.filepath or "")), others[0] if others else None)
        if lib is None:
            return
        self.library = f"{lib.internal_api} {lib.version} ({lib.threading_layer})"
        self.current = int(lib.num_threads)
        # the library's own count as this process found it: another backend's GEMMs may have lowered it since
        found = _FOUND_THREADS.setdefault(lib.filepath or self.library, self.current)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.most = most_threads(found, cores, os.environ)
        # threadpoolctl ≥ 3.8 lets only the first Python thread that sets an OpenBLAS limit set later ones;
        # the in-flight count below already keeps a change away from running GEMMs, so every thread may set it
        self._set = getattr(lib, "_real_set_num_threads", lib.set_num_threads)

    @property
    def most(self) -> int:
        """The threads a large GEMM takes (see the class); 1 in a Python thread running a job of
        ``run_concurrently`` (``inside_job``): the jobs are the parallelism there. Other threads sharing the
        backend meanwhile keep the full count."""
        return 1 if getattr(self._jobs, "inside", False) else self._most

    @most.setter
    def most(self, threads: int) -> None:
        self._most = threads

    @contextlib.contextmanager
    def inside_job(self) -> Iterator[None]:
        """The calling Python thread counts as running one of ``run_concurrently``'s jobs for the block."""
        before = getattr(self._jobs, "inside", False)
        self._jobs.inside = True
        try:
            yield
        finally:
            self._jobs.inside = before

    def for_gemm(self, m: int, n: int, k: int) -> int:
        """The threads an (m, k) × (k, n) GEMM runs on: 1 below ``BLAS_THREADED_FLOPS``, else ``most``."""
        return self.most if 2 * m * n * k >= BLAS_THREADED_FLOPS else 1

    def enter(self, threads: int) -> None:
        """Before a GEMM: set the count to ``threads`` unless it is that already or another GEMM runs."""
        if self._set is None:
            return
        entered = getattr(self._jobs, "entered", 0)  # read before: no call between the two counts below
        with self._lock:
            if self._in_flight == 0 and threads != self.current and self.enabled:
                self._set(threads)
                self.current = threads
            # counted here and for this thread together (no call between them: a Ctrl-C cannot split them)
            self._in_flight += 1
            self._jobs.entered = entered + 1

    def leave(self) -> None:
        """After the GEMM that ``enter`` preceded; nothing where this thread's ``enter`` never counted (a Ctrl-C
        raised before it did), so an interrupted GEMM never leaves the count held for good."""
        if self._set is None:
            return
        entered = getattr(self._jobs, "entered", 0)
        with self._lock:
            if entered > 0:
                self._in_flight -= 1
                self._jobs.entered = entered - 1

    def use(self, threads: int) -> None:
        """Set the count to ``threads`` now (unless a GEMM runs), e.g. before timing a library call of one's own."""
        try:
            self.enter(threads)
        finally:
            self.leave()


#: Up to this vocabulary size the NumPy scatter-add is a one-hot GEMM (D, N) × (N, H): 2·D·N·H
#: FLOPs at the BLAS rate beat N·H adds through ``np.add.reduceat``, which ran at only ~0.15 G
#: adds/s (measured on a 2-core AVX-512 CPU: D = 256, N = 4096, H = 1024 took 7 ms against 28 ms;
#: at D = 8000 the GEMM lost, 15 ms against 1.7 ms).
ONEHOT_MAX_VOCAB = 512


def wait_all(futures: list[Future[Any]]) -> list[BaseException | None]:
    """Each future's error (None where it returned), after every one has finished, also where a KeyboardInterrupt
    (Ctrl-C) ends a wait: that is raised after the last one. A job left running would go on writing into the
    buffers the next call reuses (a call interrupted while it waited for its other half, then run again, gave
    wrong gradients)."""
    errors: list[BaseException | None] = []
    interrupted: KeyboardInterrupt | None = None
    for future in futures:
        while True:
            try:
                errors.append(future.exception())
                break
            except KeyboardInterrupt as exc:  # keep waiting: the job cannot be stopped, only waited for
                interrupted = exc
    if interrupted is not None:
        raise interrupted
    return errors


class NumpyBackend(Backend):
    """NumPy on the host."""

    name = "numpy"
    xp = np
    concurrent_default = True  # jobs in Python threads: BLAS, ufuncs and the compiled loops release the GIL

    def __init__(self, blas: str | None = None) -> None:
        """``blas``: "auto" | "mkl" | "numpy", which library runs the GEMMs; None reads ``GPUBPTT_BLAS`` (default
        "auto"). "mkl" where MKL cannot be loaded raises BackendUnavailableError."""
        super().__init__()
        cpu = platform.processor() or platform.machine()
        self.device = f"CPU ({cpu}, {os.cpu_count()} logical cores)"
        self.mkl = _choose_mkl(blas)
        self.blas_threads = BlasThreads()
        #: which library runs the GEMMs: "mkl" or "numpy" (NumPy's own BLAS)
        self.blas = "numpy" if self.mkl is None else "mkl"
        #: the GEMM library described: NumPy's BLAS as threadpoolctl reports it, or MKL's version string with how
        #: it threads: one MKL thread per GEMM below ``BLAS_THREADED_FLOPS`` (every step GEMM); larger ones on
        #: MKL's OpenMP threads, or split over the backend's own where MKL runs another threading layer (``matmul``)
        self.blas_library = self.blas_threads.library
        if self.mkl is not None:
            large = "MKL's OpenMP threads" if self.mkl.openmp is not None else "gpubptt's threads"
            self.blas_library = f"{self.mkl.version} (one thread per small GEMM, large GEMMs on {large})"
        self._pool: tuple[int, ThreadPoolExecutor] | None = None  # (the pid that made it, the pool)
        self._gemm_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool): split MKL GEMMs
        self._pack_slots = threading.local()  # .slots: {dtype char: PackSlot}, one set per thread

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
        """out = a @ b (or +=). Under MKL (``blas`` "mkl"), a GEMM of ``MKL_MIN_FLOPS`` or more runs through
        cblas_?gemm where the operands allow (``Mkl.gemm``; ``b`` may be a ``pack`` handle), one of
        ``BLAS_THREADED_FLOPS`` or more on ``BlasThreads.most`` of MKL's OpenMP threads (``Mkl.gemm_threaded``),
        or, where MKL runs another threading layer, split into blocks over as many threads; the rest runs
        on NumPy's matmul, on as many BLAS threads as the shape pays for (``BlasThreads.for_gemm``). Under
        tf32/bf16 (``with_precision``) the operands are rounded first (a pack is read unpacked)."""
        if self.precision != "fp32":  # emulated tf32/bf16: the operands rounded exactly, then the float32 GEMM
            b = b.b if type(b) is PackedMatrix else b  # the raw weight: a pack holds it unrounded
            a, b = rounded_operands(self._scratch, a, b, self.precision)  # a ``pack`` of b: rounded already
        elif type(b) is Rounded:
            b = b.b
        mkl = self.mkl
        if mkl is not None and len(a.shape) == 2 and len(b.shape) == 2:
            flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
            if flops >= MKL_MIN_FLOPS:
                threads = self.blas_threads
                split = flops >= BLAS_THREADED_FLOPS and threads.most >= 2 and threads.enabled
                if type(b) is PackedMatrix:
                    if not split and mkl.compute(a, b, out, accumulate):
                        return
                    b = b.b
                if not split:
                    if mkl.gemm(a, b, out, accumulate):
                        return
                elif mkl.gemm_threaded(a, b, out, accumulate, threads.most):
                    return
                elif mkl.gemm_allowed(a, b, out):  # MKL without its OpenMP threads: the backend's own split
                    self._gemm_blocks(mkl, a, b, out, accumulate, threads.most)
                    return
        if type(b) is PackedMatrix:
            b = b.b
        self._numpy_matmul(a, b, out, accumulate)

    def _numpy_matmul(self, a: Any, b: Any, out: Any, accumulate: bool) -> None:
        threads = self.blas_threads
        try:  # enter inside: a Ctrl-C as it returns still reaches leave
            threads.enter(threads.for_gemm(a.shape[0], b.shape[1], a.shape[1]))
            if accumulate:
                out += a @ b  # a temporary: used once per output chunk, never per time step
            else:
                np.matmul(a, b, out=out)
        finally:
            threads.leave()

    def _gemm_blocks(self, mkl: Mkl, a: Any, b: Any, out: Any, accumulate: bool, parts: int) -> None:
        """out (+)= a @ b as ``parts`` (≥ 2) GEMMs at once: blocks of rows, or of columns where there are fewer
        rows than 8 per thread (each block an MKL GEMM in one of the backend's threads; ctypes releases the GIL)."""
        m, n = out.shape
        by_rows = m >= 8 * parts or m >= n
        edges = np.linspace(0, m if by_rows else n, parts + 1).astype(int)
        blocks = [
            (a[i:j], b, out[i:j]) if by_rows else (a, b[:, i:j], out[:, i:j])
            for i, j in itertools.pairwise(edges)
            if j > i
        ]
        home = self.exact  # the pools are the float32 backend's, shared with its precision views
        pool = home._gemm_pool
        if pool is None or pool[0] != os.getpid() or pool[1] < parts - 1:  # a forked child has no threads
            if pool is not None and pool[0] == os.getpid():
                pool[2].shutdown(wait=False)  # its threads end once idle
            pool = home._gemm_pool = (os.getpid(), parts - 1, ThreadPoolExecutor(parts - 1, "gpubptt-gemm"))

        def run(block: tuple[Any, Any, Any]) -> None:
            if not mkl.gemm(*block, accumulate):  # cannot happen (a block of allowed operands is allowed)
                self._numpy_matmul(*block, accumulate)

        others = [pool[2].submit(run, block) for block in blocks[1:]]
        try:
            run(blocks[0])
        finally:
            errors = wait_all(others)
        for error in errors:
            if error is not None:
                raise error

    def pack(self, b: Any, rows: int, steps: int | None = None, *, loop: bool = False) -> Any:
        """b (k, n) packed for many GEMMs a (rows, k) @ b (MKL's packed B) where MKL runs, the operand allows it,
        the GEMM is large enough to gain (``MKL_MIN_FLOPS``) but not so large that ``matmul`` splits it, and it
        runs often enough to repay the pack (``steps`` times, None: many; ``PACK_MIN_ROWS`` rows in all); else
        b itself. With ``loop`` (a step loop that may run as one compiled call), any GEMM MKL takes, used twice or
        more: with no Python between steps, MKL's packed steps beat NumPy's loop from the smallest shapes (the
        Elman forward over T = 32, B = 16, H = 128: 0.22 against 0.60 ms; T = 100, B = 1, H = 100: 0.10 against
        0.51 ms, 2-core VM). The handle holds a copy of
        b, in a buffer this thread reuses: make it after b's last change and use it until this thread's next
        ``pack`` (a handle used after that runs unpacked: right, only slower). Under tf32/bf16, b rounded once
        (``precision.Rounded``, for NumPy and MKL alike) where the steps repay it."""
        if self.precision != "fp32":
            if type(b) is not np.ndarray or b.dtype != np.float32 or (steps is not None and steps < 2):
                return b
            return Rounded(b, self.precision)
        if self.mkl is None or type(b) is not np.ndarray or b.ndim != 2:
            return b
        flops = 2 * rows * b.shape[0] * b.shape[1]
        if loop:
            if steps is not None and steps < 2:
                return b
        elif flops < MKL_MIN_FLOPS or (steps is not None and steps * rows < PACK_MIN_ROWS):
            return b
        if flops >= BLAS_THREADED_FLOPS and self.blas_threads.most >= 2 and self.blas_threads.enabled:
            return b  # ``matmul`` splits such a GEMM over threads, unpacked: faster alone (see ``PACK_MIN_ROWS``)
        slots = getattr(self._pack_slots, "slots", None)
        if slots is None:
            slots = self._pack_slots.slots = {}
        slot = slots.get(b.dtype.char)
        if slot is None:
            slot = slots[b.dtype.char] = PackSlot()
        packed = self.mkl.packed(b, rows, slot)
        return b if packed is None else packed

    def row_blocks(self, n: int, elements: int) -> list[slice]:
        """Two halves of the n rows where their elementwise work (NumPy's ufuncs and reductions release the GIL)
        runs at once in ``run_concurrently``'s threads: this process may use two cores or more (``BlasThreads.most``,
        1 inside a job), ``concurrent`` is on and the work has ``ROW_SPLIT_MIN_ELEMENTS`` values or more; else one
        block."""
        if n < 2 or elements < ROW_SPLIT_MIN_ELEMENTS or self.blas_threads.most < 2 or not self.concurrent:
            return [slice(0, n)]
        half = (n + 1) // 2
        return [slice(0, half), slice(half, n)]

    def run_concurrently(self, jobs: list[Callable[[], None]]) -> None:
        """Run independent jobs at once in Python threads (BLAS and NumPy's ufuncs release the GIL), every GEMM
        on one BLAS thread meanwhile: the jobs are the parallelism. Only where this process may use ≥ 2
        cores (``BlasThreads.most``) and ``concurrent`` is on; else one after the other. The first error raised
        by a job is raised here, after every job has finished. Every job runs under the caller's NumPy error
        settings (``np.errstate``: they belong to the calling thread, and would not reach the pool's)."""
        threads = self.blas_threads
        if len(jobs) < 2 or threads.most < 2 or not self.concurrent:
            super().run_concurrently(jobs)
            return
        home = self.exact  # the pools are the float32 backend's, shared with its precision views
        if home._pool is None or home._pool[0] != os.getpid():  # a forked child has none of its parent's threads
            home._pool = (os.getpid(), ThreadPoolExecutor(len(jobs) - 1, thread_name_prefix="gpubptt"))

        err = np.geterr()

        def run(job: Callable[[], None]) -> None:  # per-step and batched GEMMs alike: one BLAS thread per job
            with threads.inside_job(), np.errstate(**err):
                job()

        threads.use(1)
        others = [home._pool[1].submit(run, job) for job in jobs[1:]]
        try:
            run(jobs[0])
        finally:
            errors = wait_all(others)
        for error in errors:
            if error is not None:
                raise error

    def sum_rows(self, a: Any, out: Any = None) -> Any:
        """``Backend.sum_rows`` in two levels: NumPy sums a (n, K) array's axis 0 row after row, a rounding error
        growing as n (3e-6 relative in float32 at n = 128 000, 20 times torch's); sums of blocks of SUM_BLOCK rows,
        then of the blocks' sums (recursively), grow as SUM_BLOCK + n / SUM_BLOCK. The same additions, one (n /
        SUM_BLOCK, K) temporary."""
        n = a.shape[0]
        if n <= SUM_BLOCK or a.ndim != 2:
            return np.sum(a, axis=0, out=out)
        full = n - n % SUM_BLOCK
        blocks = a[:full].reshape(full // SUM_BLOCK, SUM_BLOCK, a.shape[1]).sum(axis=1)  # a view where a's rows are
        total = self.sum_rows(blocks)
        if full < n:
            total += a[full:].sum(axis=0)
        if out is None:
            return total
        out[...] = total
        return out

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
            self.matmul(onehot, rows, dUT, accumulate=True)
            return
        starts = plan.offsets[:-1]
        present = plan.offsets[1:] > starts
        if not present.any():
            return
        sums = np.add.reduceat(rows[plan.perm], starts[present], axis=0)
        dUT[np.flatnonzero(present)] += sums


def _choose_mkl(blas: str | None) -> Mkl | None:
    """The MKL to run GEMMs on for the choice ``blas`` (None: ``GPUBPTT_BLAS``, default "auto"), or None."""
    what = "blas" if blas is not None else BLAS_VAR  # the argument, or the variable it came from
    if blas is None:
        blas = os.environ.get(BLAS_VAR, "").strip() or "auto"
    if not isinstance(blas, str) or blas.lower() not in BLAS_CHOICES:
        raise InputError(f"{what}={blas!r} is not a BLAS choice; expected one of {', '.join(BLAS_CHOICES)}")
    blas = blas.lower()
    if blas == "numpy":
        return None
    mkl, why = load_mkl()
    if mkl is None and blas == "mkl":
        raise BackendUnavailableError(
            f"{what}=mkl asks for MKL's GEMMs, but MKL could not be loaded ({why}); install it with "
            f"{MKL_HINT}, or use auto or numpy"
        )
    return mkl
