"""Compiled step kernels for the cells on the NumPy backend: the choice ``GPUBPTT_JIT`` (auto | numba | numpy) and
compiling a cell's kernel functions and step loops with numba (the optional ``jit`` extra; the Elman cell has
step loops only, ``cells._loops``).

A cell writes its compiled kernels as plain Python loops over (B, H) beside its NumPy twins; ``compile_kernels``
turns them into numba functions (``nogil``, cached on disk, no fastmath: the same float operations as written)
where the choice says numba, else returns None and the cell runs its NumPy twins. The transcendentals stay
NumPy calls on whole blocks (NumPy's tanh is vectorised; numba's scalar tanh is not, without SVML).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from .._io import sigint_deferred
from ..errors import BackendUnavailableError, InputError

__all__ = ["JIT_CHOICES", "JIT_VAR", "compile_kernels", "compile_loops", "jit_choice", "jit_in_use", "jit_library"]

JIT_VAR = "GPUBPTT_JIT"
JIT_CHOICES = ("auto", "numba", "numpy")
JIT_HINT = "pip install numba (or, in gpubptt's source folder, pip install -e '.[jit]')"


def _numba() -> tuple[Any, str]:
    """numba, or None and why it does not import."""
    try:
        import numba
    except Exception as exc:  # ImportError, or a numba built for another NumPy
        return None, f"{type(exc).__name__}: {exc}"
    return numba, ""


def jit_choice(choice: str | None = None) -> str:
    """The choice, checked and lower-cased: ``choice``, or None to read ``GPUBPTT_JIT`` (default "auto").
    InputError, naming the variable or argument and the choices, for a value not in JIT_CHOICES."""
    what = "jit" if choice is not None else JIT_VAR  # the argument, or the variable it came from
    if choice is None:
        choice = os.environ.get(JIT_VAR, "").strip() or "auto"
    if not isinstance(choice, str) or choice.lower() not in JIT_CHOICES:
        raise InputError(f"{what}={choice!r} is not a step-kernel choice; expected one of {', '.join(JIT_CHOICES)}")
    return choice.lower()


def jit_in_use(choice: str | None = None) -> str:
    """The step kernels the choice runs: "numba" or "numpy". ``choice`` None reads ``GPUBPTT_JIT`` (default
    "auto": numba where it imports). InputError for a value not in JIT_CHOICES; BackendUnavailableError for
    "numba" where numba does not import."""
    what = "jit" if choice is not None else JIT_VAR
    choice = jit_choice(choice)
    if choice == "numpy":
        return "numpy"
    numba, why = _numba()
    if numba is None:
        if choice == "numba":
            raise BackendUnavailableError(
                f"{what}=numba asks for compiled step kernels, but numba does not import ({why}); install it with "
                f"{JIT_HINT}, or use auto or numpy"
            )
        return "numpy"
    return "numba"


def jit_library(backend_name: str) -> str:
    """What runs the cells' step kernels (with MKL, their whole step loops) on a backend: "numba X.Y" or "numpy"
    (the NumPy twins) by ``GPUBPTT_JIT`` on the NumPy backend, "cuda" (fused ElementwiseKernels) on CuPy."""
    if backend_name != "numpy":
        return "cuda"
    if jit_in_use() == "numpy":
        return "numpy"
    return f"numba {_numba()[0].__version__}"


def compile_loops(factory: Callable[..., tuple[Callable[..., None], ...]], key: Any, char: str,
                  *functions: Any) -> tuple[Callable[..., None], ...]:  # fmt: skip
    """The functions ``factory(*functions)`` returns, compiled by numba (nogil), once per process for (factory,
    key, char): whole step loops that call ``functions`` (ctypes functions of a library loaded by this
    process, and compiled kernels) directly. Not cached on disk: the ctypes addresses are this process's."""
    numba, _ = _numba()
    with _lock:
        _guard_forks()
        slot = (factory, id(key), char)
        if slot not in _loops:
            _loops[slot] = tuple(numba.njit(nogil=True)(fn) for fn in factory(*functions))
        return _loops[slot]


_loops: dict[tuple[Any, int, str], tuple[Callable[..., None], ...]] = {}


def compile_kernels(*fns: Callable[..., None], choice: str | None = None) -> tuple[Callable[..., None], ...] | None:
    """``fns`` compiled by numba (nogil, cached) where ``jit_in_use(choice)`` is "numba", else None. Each
    compiles on its first call per argument types (dtype, layout); the disk cache keeps it for later processes."""
    if jit_in_use(choice) != "numba":
        return None
    numba, _ = _numba()
    with _lock:  # one dispatcher per function for every backend object (each compiles once per signature)
        _guard_forks()
        for fn in fns:
            if fn not in _compiled:
                _compiled[fn] = _njit(numba, fn)
        return tuple(_compiled[fn] for fn in fns)


def _njit(numba: Any, fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` compiled nogil with numba's disk cache (beside the module, else the user's cache folder, else
    ``NUMBA_CACHE_DIR``); where none of them can be written (a read-only install and home), numba refuses to
    cache, and ``fn`` compiles in memory only, once per process."""
    try:
        return numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError:  # "cannot cache function …: no locator available"
        return numba.njit(nogil=True)(fn)


_compiled: dict[Callable[..., None], Callable[..., None]] = {}
_lock = threading.Lock()
_guarded: list[bool] = []


def _guard_forks() -> None:
    """Once per process, before the first compile (under ``_lock``): a fork waits for a compile running in
    another thread to end. numba compiles under one global lock; a child forked while another thread held it
    inherits it held by a thread it does not have, and its first compile waited for good. The child also gets a
    fresh ``_lock``. (A fork during another thread's very first call, while it still imports numba or builds a
    backend's kernels, is not covered: fork once the first call has returned.)"""
    if _guarded or not hasattr(os, "register_at_fork"):
        return
    _guarded.append(True)
    try:
        from numba.core.compiler_lock import global_compiler_lock as compiler
    except ImportError:  # a numba without it: nothing to guard
        compiler = None
    forking = threading.local()  # .held: this thread's fork took the compiler lock (hooks added mid-fork did not)

    def before() -> None:
        if compiler is not None:
            compiler.acquire()
            forking.held = True

    def after() -> None:
        if getattr(forking, "held", False):
            forking.held = False
            compiler.release()

    def after_in_child() -> None:
        global _lock
        _lock = threading.Lock()
        after()

    os.register_at_fork(before=before, after_in_parent=after, after_in_child=after_in_child)
    _hold_sigint_while_compiling()


def _hold_sigint_while_compiling() -> None:
    """Once per process (from ``_guard_forks``): while the main thread holds numba's compiler lock, a Ctrl-C is held
    back and delivered when the lock is let go. numba compiles inside LLVM callbacks that drop an exception raised
    in them, so a KeyboardInterrupt raised mid-compile was lost and the run went on (the step loops compile on
    every process's first call)."""
    try:
        from numba.core import event
        from numba.core.compiler_lock import global_compiler_lock as compiler
    except ImportError:  # a numba without compile events: as before
        return

    class Hold(event.Listener):
        def __init__(self) -> None:
            self.held: list[Any] = []  # the main thread's open deferrals, one per nested hold of the lock

        def on_start(self, ev: Any) -> None:
            if threading.current_thread() is threading.main_thread():
                while self.held and not compiler.is_locked():  # left open by a start whose lock was never taken
                    self.held.pop().__exit__(None, None, None)  # (another listener raised): deliver what it held
                deferral = sigint_deferred()
                deferral.__enter__()
                self.held.append(deferral)

        def on_end(self, ev: Any) -> None:
            if threading.current_thread() is threading.main_thread() and self.held:
                self.held.pop().__exit__(None, None, None)  # the outermost delivers a held Ctrl-C

    event.register("numba:compiler_lock", Hold())
