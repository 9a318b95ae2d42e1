"""MKL's GEMMs through ctypes, for the NumPy backend: ``cblas_?gemm`` and the packed-B pair
``cblas_?gemm_pack`` / ``cblas_?gemm_compute`` (B packed once, reused by every step of a recurrence).

MKL comes from the optional ``mkl`` extra (the ``mkl`` wheel puts ``libmkl_rt`` under the environment's
``lib``; there is no aarch64 wheel). Each call runs on one MKL thread of the calling thread's own
(``MKL_Set_Num_Threads_Local(1)``, set for the call and restored after it), except the large GEMMs that the
backend threads (``gemm_threaded``: on MKL's own OpenMP threads, with OpenMP's blocktime 0 for the call, so that
no thread spins after it on a shared machine). MKL's
process-wide settings are left as they are: the SEQUENTIAL threading layer would hold every other user of
this MKL to one thread (a torch imported afterwards binds its MKL calls to the library loaded first, and
sizes its own thread pool from it). ctypes releases the GIL during each call. Per call, only Python ints,
floats and raw addresses cross (argtypes set once).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["NO_TRANS", "TRANS", "Mkl", "PackSlot", "PackedMatrix", "load_mkl", "operand_layout"]

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
LP64 = 0  # MKL_INTERFACE_LP64: 32-bit ints, what every prototype here passes
ILP64 = 1  # MKL_INTERFACE_ILP64, a bit of the layer (GNU's is 2)
B_MATRIX, PACKED = 162, 151
#: MKL's Intel OpenMP threading layer, by the sonames MKL 2021–2026 load it under
INTEL_THREAD_LIBRARIES = ("libmkl_intel_thread.so.2", "libmkl_intel_thread.so.3", "libmkl_intel_thread.so")
#: the largest blocktime (ms) Intel OpenMP takes back without a warning; a larger one (infinite) is left alone
MAX_BLOCKTIME = 1407211164


def _loaded(name: str) -> bool:
    """Whether a shared library of this soname is loaded in the process already (nothing is loaded here)."""
    try:
        ctypes.CDLL(name, mode=os.RTLD_NOLOAD)
    except OSError:
        return False
    return True


def operand_layout(x: np.ndarray) -> tuple[int, int] | None:
    """How row-major cblas reads the 2-D x (p, q): (NO_TRANS, ld) for unit stride along rows, (TRANS, ld)
    for a transposed view (unit stride down columns), None for anything else (a copy would be needed)."""
    p, q = x.shape
    s0, s1 = x.strides
    size = x.itemsize
    if s1 == size or q == 1:
        ld = s0 // size if p > 1 else q
        if s0 % size == 0 and ld >= max(q, 1):
            return NO_TRANS, ld
    if s0 == size or p == 1:
        ld = s1 // size if q > 1 else p
        if s1 % size == 0 and ld >= max(p, 1):
            return TRANS, ld
    return None


class PackSlot:
    """A reusable buffer for packed matrices (one per thread of the backend): MKL's packed B takes at least
    ~7 MiB however small B is, too much to allocate at every call. Each pack into the slot bumps
    ``generation``; a handle made before is stale from then on (its GEMMs run unpacked, still right)."""

    def __init__(self) -> None:
        self.buf = np.empty(0, np.uint8)
        self.generation = 0

    def take(self, nbytes: int) -> int:
        """The 64-byte-aligned address of ``nbytes`` in the buffer (grown where needed); a new generation."""
        if self.buf.nbytes < nbytes + 64:
            self.buf = np.empty(nbytes + 64, np.uint8)
        self.generation += 1
        ptr = self.buf.ctypes.data
        return ptr + (-ptr % 64)


@dataclass(eq=False)
class PackedMatrix:
    """B (k, n) packed by MKL for GEMMs a (rows, k) × B, in ``slot`` at ``ptr``; valid while the slot's
    generation is still ``generation`` (no later pack in the same slot).

    ``b`` is the operand itself (a GEMM with another row count, or on a stale handle, runs unpacked on it);
    ``shape`` is b's.
    """

    b: np.ndarray
    rows: int
    slot: PackSlot = field(repr=False)
    generation: int = field(repr=False)
    ptr: int = field(repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.b.shape

    @property
    def dtype(self) -> np.dtype:
        return self.b.dtype


class Mkl:
    """One loaded libmkl_rt: GEMMs (``gemm``), B packed once (``packed``) and GEMMs on it (``compute``), in
    float32 and float64, through ctypes functions whose prototypes are set once."""

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self.lib = lib
        self.path = path
        # the prototypes below pass 32-bit ints (LP64): MKL must not read MKL_INTERFACE_LAYER=ILP64 on its first
        # call and take them for 64-bit ones (it crashed the process); OSError, MKL unused, where it cannot be set
        set_layer = getattr(lib, "MKL_Set_Interface_Layer", None)
        if set_layer is not None:
            set_layer.argtypes, set_layer.restype = [ctypes.c_int], ctypes.c_int
            layer = set_layer(LP64)  # the layer in force: LP64 now, or one set before (by an earlier MKL user)
            if layer < 0 or layer & ILP64:  # GNU (2) beside LP64 is fine: 32-bit ints all the same
                raise OSError(f"MKL's interface layer is {layer} (ILP64: 64-bit ints) and cannot be set to LP64")
        # each MKL call runs on one MKL thread of the calling thread's own (``_one_thread``), set for the call only
        lib.MKL_Set_Num_Threads_Local.argtypes = [ctypes.c_int]
        lib.MKL_Set_Num_Threads_Local.restype = ctypes.c_int
        i, p, size_t = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
        self._gemm: dict[str, Any] = {}
        self._pack_size: dict[str, Any] = {}
        self._pack: dict[str, Any] = {}
        self._compute: dict[str, Any] = {}
        for char, s, real in (("f", "s", ctypes.c_float), ("d", "d", ctypes.c_double)):
            gemm = getattr(lib, f"cblas_{s}gemm")
            gemm.argtypes = [i, i, i, i, i, i, real, p, i, p, i, real, p, i]
            gemm.restype = None
            get_size = getattr(lib, f"cblas_{s}gemm_pack_get_size")
            get_size.argtypes = [i, i, i, i]
            get_size.restype = size_t
            pack = getattr(lib, f"cblas_{s}gemm_pack")
            pack.argtypes = [i, i, i, i, i, i, real, p, i, p]
            pack.restype = None
            compute = getattr(lib, f"cblas_{s}gemm_compute")
            compute.argtypes = [i, i, i, i, i, i, p, i, p, i, real, p, i]
            compute.restype = None
            self._gemm[char], self._pack_size[char] = gemm, get_size
            self._pack[char], self._compute[char] = pack, compute
        self.address = _address_reader()
        self._loop_functions: dict[str, tuple[Any, Any, Any]] = {}
        text = ctypes.create_string_buffer(256)
        try:
            lib.MKL_Get_Version_String(text, len(text))
        except AttributeError:
            pass
        number = re.search(r"Version ([0-9.]+)", text.value.decode(errors="replace"))
        #: e.g. "MKL 2025.2"
        self.version = f"MKL {number.group(1)}" if number else "MKL"

    def gemm(self, a: Any, b: Any, out: Any, accumulate: bool) -> bool:
        """out = a @ b, or out += a @ b (beta = 1, no temporary), through cblas_?gemm; a (m, k), b (k, n), out (m, n).

        Where the operands allow it: NumPy arrays of one dtype (float32 or float64), a and b each with a
        unit stride along rows or down columns (a transposed view reads as op = T), out with a unit stride
        along rows, aligned, writeable and not overlapping a or b. Returns False, having done nothing, else.
        """
        call = self._operands(a, b, out)
        if call is None:
            return False
        previous = self._one_thread()
        try:  # a Ctrl-C raised as the call returns must not leave this thread's MKL on one thread
            self._cblas_gemm(call, a, out, accumulate)
        finally:
            self._restore(previous)
        return True

    def _cblas_gemm(self, call: tuple[int, ...], a: Any, out: Any, accumulate: bool) -> None:
        """cblas_?gemm on ``_operands``' ``call`` for a (m, k) and out (m, n), on the calling thread's MKL setting."""
        ta, lda, pa, tb, ldb, pb, ldc, pc = call
        m, k = a.shape
        self._gemm[out.dtype.char](
            ROW_MAJOR, ta, tb, m, out.shape[1], k, 1.0, pa, lda, pb, ldb, 1.0 if accumulate else 0.0, pc, ldc
        )

    def compute(self, a: Any, packed: PackedMatrix, out: Any, accumulate: bool) -> bool:
        """out (+)= a @ B with B packed for a's row count (cblas_?gemm_compute); False, nothing done, where the
        operands do not allow it (see ``gemm``), a's rows are not the ones B was packed for, or the pack is stale."""
        if a.shape[0] != packed.rows or packed.slot.generation != packed.generation:
            return False
        call = self._operands(a, packed.b, out)
        if call is None:
            return False
        ta, lda, pa, _, _, _, ldc, pc = call
        m, k = a.shape
        n = out.shape[1]
        previous = self._one_thread()
        try:
            self._compute[out.dtype.char](
                ROW_MAJOR, ta, PACKED, m, n, k, pa, lda, packed.ptr, n, 1.0 if accumulate else 0.0, pc, ldc
            )
        finally:
            self._restore(previous)
        return True

    def gemm_threaded(self, a: Any, b: Any, out: Any, accumulate: bool, threads: int) -> bool:
        """``gemm`` on ``threads`` (≥ 2) of MKL's own OpenMP threads, where MKL runs Intel's OpenMP (its default
        threading layer): the calling thread's MKL count set to ``threads`` and its OpenMP blocktime to 0 for the
        call (the team's threads sleep as soon as it ends instead of spinning for 200 ms, a core another process
        or gpubptt's own threads want), both put back after it. False, nothing done, where the operands do not
        allow it (see ``gemm``) or MKL runs another threading layer (the caller splits the GEMM itself).

        On the 2-core VM against the same GEMM split in two row blocks over gpubptt's threads (each one MKL
        thread): (2048 × 256)·(256 × 256) 245 against 207 GFLOP/s, (2048 × 1024)·(1024 × 1024) 267 against 256;
        whole models 0.94–1.0× the time (``NumpyBackend.matmul``)."""
        openmp = self.openmp
        if openmp is None:
            return False
        call = self._operands(a, b, out)
        if call is None:
            return False
        blocktime = openmp.kmp_get_blocktime()
        # the user's KMP_BLOCKTIME, or a blocktime beyond what can be set back (infinite), stays as it is
        mine = blocktime <= MAX_BLOCKTIME and "KMP_BLOCKTIME" not in os.environ
        previous = None
        try:  # every setting put back whatever raises, a Ctrl-C included
            if mine:
                openmp.kmp_set_blocktime(0)
            previous = self.lib.MKL_Set_Num_Threads_Local(threads)
            self._cblas_gemm(call, a, out, accumulate)
        finally:
            if previous is not None:
                self.lib.MKL_Set_Num_Threads_Local(previous)
            if mine:
                openmp.kmp_set_blocktime(blocktime)
        return True

    @functools.cached_property
    def openmp(self) -> Any:
        """The Intel OpenMP runtime (libiomp5) this MKL loaded for its threads, or None: MKL runs another threading
        layer (``MKL_THREADING_LAYER``: GNU, TBB, sequential; or GNU's because a library that loaded MKL first, such
        as torch, chose it), or the runtime lacks the blocktime calls. Asking MKL for its thread count loads its
        threading layer; MKL's Intel threading library and the runtime are then looked up among the libraries
        already loaded only (never another copy from the system's search path): a libiomp5 that something else
        loaded says nothing of MKL's layer."""
        self.lib.MKL_Get_Max_Threads()
        if not any(_loaded(name) for name in INTEL_THREAD_LIBRARIES):
            return None
        try:
            openmp = ctypes.CDLL("libiomp5.so", mode=os.RTLD_NOLOAD)
            openmp.kmp_get_blocktime.restype = ctypes.c_int
            openmp.kmp_get_blocktime.argtypes = []
            openmp.kmp_set_blocktime.restype = None
            openmp.kmp_set_blocktime.argtypes = [ctypes.c_int]
        except (OSError, AttributeError):
            return None
        return openmp

    def _one_thread(self) -> int:
        """The calling thread's MKL calls on one MKL thread (MKL's thread-local setting), so that gpubptt's own
        split never runs on top of MKL's threads and no MKL pool spins between steps; returns the thread's
        setting before (0: MKL's global one), which ``_restore`` puts back right after the call. Kept, the
        setting would reach whatever else runs MKL on this thread later: a torch whose thread pool starts
        after a gpubptt GEMM sizes it from this thread's MKL count, and ran on one thread."""
        return self.lib.MKL_Set_Num_Threads_Local(1)

    def _restore(self, previous: int) -> None:
        """The calling thread's MKL thread setting back as ``_one_thread`` found it."""
        if previous != 1:
            self.lib.MKL_Set_Num_Threads_Local(previous)

    def gemm_allowed(self, a: Any, b: Any, out: Any) -> bool:
        """Whether ``gemm`` runs a @ b into out (and so any block of rows or columns of it)."""
        return self._operands(a, b, out) is not None

    def _operands(self, a: Any, b: Any, out: Any) -> tuple[int, ...] | None:
        """(op(a), lda, a's address, op(b), ldb, b's address, ldc, out's address), or None where cblas cannot
        take these operands as they are."""
        if type(a) is not np.ndarray or type(b) is not np.ndarray or type(out) is not np.ndarray:
            return None
        char = out.dtype.char
        if char not in self._gemm or a.dtype.char != char or b.dtype.char != char:
            return None
        if a.ndim != 2 or b.ndim != 2 or out.ndim != 2 or not out.flags.writeable:
            return None
        m, k = a.shape
        n = b.shape[1]
        if b.shape[0] != k or out.shape != (m, n) or m == 0 or n == 0 or k == 0:
            return None  # NumPy's matmul raises for a mismatch, and does the empty products
        la, lb, lc = operand_layout(a), operand_layout(b), operand_layout(out)
        if la is None or lb is None or lc is None or lc[0] != NO_TRANS:
            return None
        size = out.itemsize
        pa, pb, pc = self.address(a), self.address(b), self.address(out)
        if pa % size or pb % size or pc % size:
            return None  # unaligned (strides are whole elements already: operand_layout)
        if np.may_share_memory(out, a) or np.may_share_memory(out, b):
            return None  # NumPy's matmul buffers an overlapping output; cblas would read what it writes
        return la[0], la[1], pa, lb[0], lb[1], pb, lc[1], pc

    def loop_functions(self, char: str) -> tuple[Any, Any, Any] | None:
        """(cblas_?gemm_compute, v?Tanh, v?Exp) for dtype char "f" or "d", as ctypes functions whose pointer
        arguments are integers (c_int64: the same registers as a pointer on x86-64 and aarch64), so that
        numba-compiled step loops call them with ``x.ctypes.data`` and never hold the GIL between steps. VML's
        default accuracy (high accuracy: within an ulp or two of the rounded result) is kept; v?Exp's overflow to
        inf is its result (VML's error status, not an exception). Call them inside ``on_one_thread``. None where
        this MKL lacks one of them."""
        if char not in self._loop_functions:
            s = "s" if char == "f" else "d"
            names = (f"cblas_{s}gemm_compute", f"v{s}Tanh", f"v{s}Exp")
            if not all(hasattr(self.lib, name) for name in names):
                return None
            i, i64 = ctypes.c_int, ctypes.c_int64
            real = ctypes.c_float if char == "f" else ctypes.c_double
            address = ctypes.cast(getattr(self.lib, names[0]), ctypes.c_void_p).value
            compute = ctypes.CFUNCTYPE(None, i, i, i, i, i, i, i64, i, i64, i, real, i64, i)(address)
            tanh, exp = (
                ctypes.CFUNCTYPE(None, i, i64, i64)(ctypes.cast(getattr(self.lib, name), ctypes.c_void_p).value)
                for name in names[1:]
            )
            self._loop_functions[char] = (compute, tanh, exp)
        return self._loop_functions[char]

    def on_one_thread(self, fn: Any, *args: Any) -> None:
        """fn(*args) with the calling thread's MKL calls on one MKL thread (MKL's thread-local setting, put back
        as it was afterwards): for compiled loops that call ``loop_functions`` themselves."""
        previous = self._one_thread()
        try:
            fn(*args)
        finally:
            self._restore(previous)

    def packed(self, b: np.ndarray, rows: int, slot: PackSlot) -> PackedMatrix | None:
        """B (k, n) float32/float64, C-ordered or a transposed view, packed into ``slot`` for a (rows, k) × B;
        None where its layout does not allow it."""
        layout = operand_layout(b)
        if layout is None or b.dtype.char not in self._gemm or min(rows, *b.shape) < 1:
            return None
        k, n = b.shape
        char = b.dtype.char
        ptr = slot.take(int(self._pack_size[char](B_MATRIX, rows, n, k)))
        previous = self._one_thread()
        try:
            self._pack[char](ROW_MAJOR, B_MATRIX, layout[0], rows, n, k, 1.0, self.address(b), layout[1], ptr)
        finally:
            self._restore(previous)
        return PackedMatrix(b=b, rows=rows, slot=slot, generation=slot.generation, ptr=ptr)


def _address_reader() -> Any:
    """A function x → the address of ndarray x's first element. ``x.ctypes.data`` costs ~1.8 µs a call (a
    third of a small step GEMM for three operands); reading the ``data`` field of NumPy's array struct, which
    sits right after the object header (NumPy's C API, ``PyArrayObject_fields``), costs ~0.3 µs. Checked
    here against ``ctypes.data`` on a few views; where they disagree (another interpreter's layout), the
    slow, documented way is used."""
    offset = object.__basicsize__
    read = ctypes.c_void_p.from_address

    def fast(x: np.ndarray) -> int:
        return read(id(x) + offset).value or 0

    base = np.zeros((7, 9))
    probes = (base, base[2:, 3:], base.T, base[::2, 1:].T, np.zeros(3, np.float32)[1:])
    if all(fast(x) == x.ctypes.data for x in probes):
        return fast
    return lambda x: x.ctypes.data


def _candidates() -> list[str]:
    lib = os.path.join(sys.prefix, "lib")
    paths = [os.path.join(lib, name) for name in ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so")]
    found = ctypes.util.find_library("mkl_rt")
    return [p for p in paths if os.path.exists(p)] + ([found] if found else [])


@functools.cache
def load_mkl() -> tuple[Mkl | None, str]:
    """Open libmkl_rt once per process (the environment's ``lib``, then the system's library path), its
    process-wide settings untouched. Returns (Mkl, its path) or (None, why not)."""
    candidates = _candidates()
    if not candidates:
        return None, f"no libmkl_rt in {os.path.join(sys.prefix, 'lib')} or on the library path"
    if os.environ.get("MKL_THREADING_LAYER", "").strip().lower() == "tbb":
        # MKL's TBB layer needs libtbb, which the mkl wheel installs beside it but the loader does not search
        # there: without it MKL ends the process at its first call ("Cannot load libmkl_tbb_thread")
        tbb = os.path.join(sys.prefix, "lib", "libtbb.so.12")
        if os.path.exists(tbb):
            try:
                ctypes.CDLL(tbb, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                pass  # MKL says what it misses
    errors = []
    for path in candidates:
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
            return Mkl(lib, path), path
        except (OSError, AttributeError) as exc:
            errors.append(f"{path}: {exc}")
    return None, "; ".join(errors)
