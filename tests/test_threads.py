"""Concurrent calls on one model from several threads give the results of the same calls made one by one.

Each thread runs inputs of the SAME shape (so they meet in the same cached workspace and, on CuPy,
the same captured graph); the references are computed first, sequentially, on a separate copy of
the model. A race shows up as gradients that mix two threads' inputs: far off, not a rounding.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import gpubptt
from gpubptt import diagnostics

T, B, D, H, K = 12, 4, 9, 16, 9
THREADS, ROUNDS = 4, 15


def problems(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [(rng.integers(0, D, size=(T, B)), rng.integers(0, K, size=(T, B))) for _ in range(n)]


def run_threads(work, n: int) -> list[BaseException]:
    """Run work(i) for i < n in n threads started together; return what they raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def body(i: int) -> None:
        try:
            start.wait()
            work(i)
        except BaseException as exc:  # reported to the test, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def host(be, a):
    return be.to_numpy(a)


def close(a, b, what):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=what)


@pytest.mark.parametrize("truncate", [None, 3])
def test_concurrent_loss_and_grads_match_sequential_calls(be, truncate):
    model = gpubptt.RNN(D, H, K, backend=be, seed=0, bias=True)
    reference = gpubptt.RNN.from_params(model.params, backend=be)  # same weights, its own workspaces
    data = problems(THREADS)
    expected = []
    for x, y in data:
        loss, grads, final = reference.loss_and_grads(
            be.asarray(x), be.asarray(y), truncate=truncate, return_final_state=True
        )
        expected.append((float(loss), {k: host(be, g) for k, g in grads.items()}, host(be, final)))
    mismatches = []

    def work(i: int) -> None:
        x, y = be.asarray(data[i][0]), be.asarray(data[i][1])
        for r in range(ROUNDS):
            loss, grads, final = model.loss_and_grads(x, y, truncate=truncate, return_final_state=True)
            want_loss, want_grads, want_final = expected[i]
            got = {k: host(be, g) for k, g in grads.items()}
            bad = [k for k in got if not np.allclose(got[k], want_grads[k], rtol=1e-5, atol=1e-6)]
            if not np.isclose(float(loss), want_loss, rtol=1e-6) or bad or not np.allclose(host(be, final), want_final):
                mismatches.append((i, r, bad))

    assert run_threads(work, THREADS) == []
    assert mismatches == [], f"{len(mismatches)} of {THREADS * ROUNDS} concurrent calls differ: {mismatches[:5]}"


def test_forward_loss_grads_and_diagnostics_together_match_sequential_calls(be):
    model = gpubptt.RNN(D, H, K, backend=be, seed=1)
    reference = gpubptt.RNN.from_params(model.params, backend=be)
    x, y = (be.asarray(a) for a in problems(1)[0])
    want = {
        "probs": host(be, reference.forward(x).probs),
        "loss": float(reference.loss(x, y)),
        "dW": host(be, reference.loss_and_grads(x, y)[1]["W"]),
        "flow": diagnostics.step_gradients(reference, x, y).total,
    }
    calls = {
        "probs": lambda: host(be, model.forward(x).probs),
        "loss": lambda: float(model.loss(x, y)),
        "dW": lambda: host(be, model.loss_and_grads(x, y)[1]["W"]),
        "flow": lambda: diagnostics.step_gradients(model, x, y).total,
    }
    names = list(calls)
    got: dict[str, list] = {k: [] for k in names}

    def work(i: int) -> None:
        for _ in range(ROUNDS):
            for k in names[i % len(names) :] + names[: i % len(names)]:  # each thread its own order
                got[k].append(calls[k]())

    assert run_threads(work, THREADS) == []
    for k in names:
        assert len(got[k]) == THREADS * ROUNDS
        for v in got[k]:
            close(v, want[k], k)


def test_a_child_forked_while_another_thread_holds_the_models_lock_can_call_it():
    import os

    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    model = gpubptt.RNN(3, 4, 3, backend="numpy", seed=0)
    x = np.zeros((4, 2), dtype=np.int64)
    # the model's lock held as by a call in progress on another thread, which does not exist in the child
    assert _child_succeeds_while_held(model._lock, lambda: model.loss_and_grads(x, x))  # was: it hung on the lock


def _child_succeeds(child, seconds: float = 30) -> bool:
    """Fork; the child runs ``child()`` and exits 0 where it returns; True where it did so within ``seconds`` (a
    hung child is killed)."""
    import os
    import time

    pid = os.fork()
    if pid == 0:
        try:
            child()
            os._exit(0)
        except BaseException:
            os._exit(1)
    deadline = time.monotonic() + seconds
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return False
    return os.waitstatus_to_exitcode(done[1]) == 0


def _child_succeeds_while_held(lock, child) -> bool:
    """``_child_succeeds(child)``, forked while another thread holds ``lock``."""
    held, release = threading.Event(), threading.Event()

    def holder():
        with lock:
            held.set()
            release.wait()

    t = threading.Thread(target=holder)
    t.start()
    held.wait()
    try:
        return _child_succeeds(child)
    finally:
        release.set()
        t.join()


def test_a_child_forked_while_another_thread_compiles_can_compile():
    """numba compiles under one global lock: a child forked while another thread held it (a first call compiling
    its step loops, about 1 s) inherited it held for good, and its own first compile hung. The fork now waits
    for the compile to end."""
    import os
    import time

    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    numba = pytest.importorskip("numba", reason="numba unavailable: pip install numba")
    from numba.core.compiler_lock import global_compiler_lock as compiler

    from gpubptt.cells import _jit

    if _jit.compile_kernels(lambda: None, choice="numba") is None:
        pytest.skip("no compiled kernels here")
    held = threading.Event()

    def compiling():  # stands in for another thread's compile: holds the lock for a while
        with compiler:
            held.set()
            time.sleep(0.5)

    t = threading.Thread(target=compiling)
    t.start()
    held.wait()
    try:
        assert _child_succeeds(lambda: numba.njit(lambda a: a + 1)(1))  # was: the child hung on the lock
    finally:
        t.join()


def test_a_ctrl_c_during_a_compile_lands_once_the_compile_has_ended():
    """numba compiles inside LLVM callbacks that drop an exception raised in them: a Ctrl-C arriving mid-compile (a
    process's first call compiles its step loops) was lost, and training went on to the end. It is now held while
    the compiler lock is, and delivered after."""
    import signal

    numba = pytest.importorskip("numba", reason="numba unavailable: pip install numba")
    from numba.core import event

    from gpubptt.cells import _jit

    if _jit.compile_kernels(lambda: None, choice="numba") is None:  # sets up the hold, once per process
        pytest.skip("no compiled kernels here")
    fired = []

    class Press(event.Listener):  # a Ctrl-C as the compile takes the lock
        def on_start(self, ev):
            if not fired:
                fired.append(True)
                signal.raise_signal(signal.SIGINT)

        def on_end(self, ev):
            pass

    f = numba.njit(lambda a: a + 1)
    with event.install_listener("numba:compiler_lock", Press()):
        with pytest.raises(KeyboardInterrupt):
            f(1)
    assert fired and f.signatures  # was: interrupted before it compiled (or, inside LLVM, dropped)
    assert f(2) == 3


def test_a_ctrl_c_held_by_a_compile_that_never_took_the_lock_lands_at_the_next():
    """A compile whose lock was never taken (another listener raised first) left its hold open, and Ctrl-C stayed
    held for good; the next compile now delivers it."""
    import signal

    numba = pytest.importorskip("numba", reason="numba unavailable: pip install numba")
    from numba.core import event

    from gpubptt.cells import _jit

    if _jit.compile_kernels(lambda: None, choice="numba") is None:
        pytest.skip("no compiled kernels here")

    class Broken(event.Listener):
        def on_start(self, ev):
            raise RuntimeError("a listener failed")

        def on_end(self, ev):
            pass

    with event.install_listener("numba:compiler_lock", Broken()):
        with pytest.raises(RuntimeError, match="a listener failed"):
            numba.njit(lambda a: a + 2)(1)
    signal.raise_signal(signal.SIGINT)  # held by the hold the failed compile left open
    with pytest.raises(KeyboardInterrupt):
        numba.njit(lambda a: a + 3)(1)  # was: never delivered
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_child_forked_while_another_thread_counts_blas_threads_can_run_a_gemm():
    import os

    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    from gpubptt.backend.numpy_backend import NumpyBackend

    threads = NumpyBackend(blas="numpy").blas_threads
    if threads._set is None:
        pytest.skip("threadpoolctl steers no BLAS here")
    # the count's lock held as by another thread inside BlasThreads.enter
    assert _child_succeeds_while_held(threads._lock, lambda: threads.use(1))  # was: the child hung on the lock


def test_ctrl_c_while_waiting_for_the_other_half_still_waits_for_it():
    """A Ctrl-C that ended the wait for the other job returned while that job still ran: it went on writing
    into the workspace the next call reused (wrong gradients). The KeyboardInterrupt now comes after it ends."""
    import signal
    import time

    from gpubptt.backend.numpy_backend import NumpyBackend

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("a signal reaches the main thread only")
    be = NumpyBackend()
    be.blas_threads.most = 2
    finished = threading.Event()

    def other():  # ends only after the Ctrl-C has reached the waiting main thread, however loaded the machine
        timer.finished.wait(10)
        time.sleep(0.3)
        finished.set()

    timer = threading.Timer(0.15, signal.pthread_kill, args=(threading.main_thread().ident, signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            be.run_concurrently([lambda: None, other])
        assert finished.is_set()
    finally:
        timer.cancel()


@pytest.mark.parametrize("how", ["deepcopy", "to", "to_torch"])
def test_a_copy_taken_during_an_optimizer_step_waits_for_the_step(how):
    """The optimizer commits under the model's lock, as a copy reads under it: copies taken while another thread
    trained had mixed two steps' parameters."""
    import copy

    if how == "to_torch":
        pytest.importorskip("torch", reason="torch unavailable: pip install torch")
    take = {"deepcopy": copy.deepcopy, "to": lambda m: m.to(m.backend), "to_torch": lambda m: m.to_torch()}[how]

    from gpubptt.training.optim import SGD

    model = gpubptt.RNN(D, H, K, backend="numpy", seed=1, dtype="float64")
    inside, release, copies = threading.Event(), threading.Event(), []

    class SlowSGD(SGD):
        @property
        def t(self):
            return self._t

        @t.setter
        def t(self, value):  # the step count: the commit's last act, still under the lock: hold it there a while
            self._t = value
            if value:
                inside.set()
                release.wait(10)

    opt = SlowSGD(model, lr=0.1)
    _, grads = model.loss_and_grads(*problems(1)[0])
    stepper = threading.Thread(target=opt.step, args=(grads,))
    stepper.start()
    inside.wait(10)
    copier = threading.Thread(target=lambda: copies.append(take(model)))
    copier.start()
    copier.join(0.3)
    blocked = copier.is_alive()
    release.set()
    stepper.join()
    copier.join()
    assert blocked  # was: the copy was taken in the middle of the step
    if how != "to_torch":
        for k, v in model.params.items():
            np.testing.assert_array_equal(copies[0].params[k], v, err_msg=k)
