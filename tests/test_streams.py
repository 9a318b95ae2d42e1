"""The two directions of a bidirectional layer on CUDA side streams (``backend._streams``, the CuPy backend's
``run_concurrently`` where ``concurrent`` is on).

On the CPU: the fork/join order against a stand-in for CuPy's streams and events that logs every call, the
cuBLAS workspace each stream's GEMMs get, and the engine's pair jobs run in the order the side streams queue
them (and reversed) giving bit-identical results to one after the other, for every cell. On a device (gpu
marker): CuPy with the side streams against CuPy without them (bit-identical: the same kernels in another
schedule), with and without graphs, and against the NumPy float64 reference."""

from __future__ import annotations

import contextlib
import gc
import threading
from types import SimpleNamespace

import numpy as np
import pytest

import gpubptt
from gpubptt.backend import _cublas, _streams
from gpubptt.backend.numpy_backend import NumpyBackend

from .cuda_stand_ins import DevArray, Devices


class _RawAllocator:
    """``cupy.cuda.using_allocator()``: ``raw`` is True inside it (allocations outside every memory pool)."""

    raw = False

    @contextlib.contextmanager
    def __call__(self, allocator=None):
        assert allocator is None
        previous, _RawAllocator.raw = _RawAllocator.raw, True
        try:
            yield
        finally:
            _RawAllocator.raw = previous


def _empty(n, dtype):
    """``cupy.empty`` as a host array that answers ``.data.ptr``, remembering whether it came from a pool."""
    out = np.empty(n, dtype=dtype).view(DevArray)
    out.raw = _RawAllocator.raw
    return out


class _FakeCuda:
    """CuPy's streams and events as a log: ``log`` holds ("record", event, stream), ("wait", stream, event) and
    ("job", name, current stream) in call order; ``with stream:`` makes it current for this thread."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.made: list[str] = []
        self.local = threading.local()
        fake = self

        class Stream:
            count = 0

            def __init__(self, non_blocking: bool = False) -> None:
                Stream.count += 1
                self.name = f"side{Stream.count}"
                self.ptr = 1000 + Stream.count
                fake.made.append(self.name)

            def wait_event(self, event):
                fake.log.append(("wait", self.name, event.name))

            def __enter__(self):
                self.previous = fake.current()
                fake.local.current = self

            def __exit__(self, *exc):
                fake.local.current = self.previous

        class Event:
            count = 0

            def __init__(self, disable_timing: bool = False) -> None:
                Event.count += 1
                self.name = f"event{Event.count}"

            def record(self, stream):
                fake.log.append(("record", self.name, stream.name))

        waits = lambda e: self.log.append(("wait", "origin", e.name))  # noqa: E731
        self.origin = SimpleNamespace(name="origin", ptr=7, wait_event=waits)
        self.cuda = SimpleNamespace(Stream=Stream, Event=Event, get_current_stream=self.current,
                                    Device=Devices(), using_allocator=_RawAllocator())  # fmt: skip

    def current(self):
        return getattr(self.local, "current", self.origin)

    def job(self, name: str, fail: bool = False):
        def run() -> None:
            self.log.append(("job", name, self.current().name))
            if fail:
                raise RuntimeError(f"{name} failed")

        return run


def test_side_streams_fork_after_the_origins_queued_work_and_join_before_its_next():
    cuda = _FakeCuda()
    added: list[int] = []
    sides = _streams.SideStreams(cuda, added.append)
    sides.run([cuda.job("a"), cuda.job("b"), cuda.job("c")])
    fork = cuda.log[0]
    assert fork[0] == "record" and fork[2] == "origin"  # the fork event, on the origin, before anything else
    for job, stream in (("b", "side1"), ("c", "side2")):
        at = cuda.log.index(("job", job, stream))  # each later job ran on a side stream of its own
        assert cuda.log.index(("wait", stream, fork[1])) < at  # which waited for the fork first
        (joined,) = [e for (kind, e, s) in cuda.log if kind == "record" and s == stream]
        assert cuda.log.index(("record", joined, stream)) > at
        assert cuda.log.index(("wait", "origin", joined)) > cuda.log.index(("record", joined, stream))
    assert ("job", "a", "origin") in cuda.log  # job 0 on the origin itself
    assert cuda.log[-1][:2] == ("wait", "origin") and cuda.current() is cuda.origin
    assert added == [1001, 1002]  # each side stream announced once, for its own cuBLAS workspace


def test_side_streams_are_made_once_per_thread_and_reused():
    cuda = _FakeCuda()
    added: list[int] = []
    sides = _streams.SideStreams(cuda, added.append)
    for _ in range(3):
        sides.run([cuda.job("a"), cuda.job("b")])
    assert cuda.made == ["side1"]
    other = threading.Thread(target=sides.run, args=([cuda.job("a"), cuda.job("b")],))
    other.start()
    other.join()
    assert cuda.made == ["side1", "side2"] and added == [1001, 1002]  # another thread: its own side stream
    assert cuda.cuda.Event.count == 4  # per thread one fork and one join event (a fork event was made every run)


def test_a_join_that_fails_after_a_jobs_error_does_not_hide_it():
    cuda = _FakeCuda()
    sides = _streams.SideStreams(cuda, lambda ptr: None)
    sides.run([cuda.job("a"), cuda.job("b")])  # makes the side stream and its join event

    def broken(event):
        raise RuntimeError("capture invalidated")

    cuda.origin.wait_event = broken
    with pytest.raises(RuntimeError, match="b failed"):
        sides.run([cuda.job("a"), cuda.job("b", fail=True)])
    with pytest.raises(RuntimeError, match="capture invalidated"):  # with no job error, the join's is raised
        sides.run([cuda.job("a"), cuda.job("b")])


@pytest.mark.parametrize("failing", ["b", "a"])
def test_a_job_that_raises_still_joins_every_forked_stream(failing):
    cuda = _FakeCuda()
    sides = _streams.SideStreams(cuda, lambda ptr: None)
    with pytest.raises(RuntimeError, match=f"{failing} failed"):
        sides.run([cuda.job("a", fail=failing == "a"), cuda.job("b", fail=failing == "b"), cuda.job("c")])
    ran = [name for (kind, name, _) in cuda.log if kind == "job"]
    assert ran == (["b"] if failing == "b" else ["b", "c", "a"])  # nothing is queued after the error
    forked = {s for (kind, s, e) in cuda.log if kind == "wait" and s != "origin"}
    joined = {e for (kind, e, s) in cuda.log if kind == "record" and s in forked}
    assert {e for (kind, s, e) in cuda.log if kind == "wait" and s == "origin"} == joined  # all joined
    assert len(joined) == len(forked) == (1 if failing == "b" else 2) and cuda.current() is cuda.origin


def _fake_cublas_lib(calls: list[tuple]) -> SimpleNamespace:
    ok = lambda *a: 0  # noqa: E731

    def set_stream(handle, stream):
        calls.append(("stream", stream))
        return 0

    def set_workspace(handle, ptr, nbytes):
        calls.append(("workspace", ptr, nbytes))
        return 0

    def sgemm(*args):
        calls.append(("gemm",))
        return 0

    return SimpleNamespace(cublasGemmEx=ok, cublasSgemm_v2=sgemm, cublasDgemm_v2=ok, cublasSetStream_v2=set_stream,
                           cublasSetWorkspace_v2=set_workspace, cublasCreate_v2=ok)  # fmt: skip


def test_each_side_stream_gets_a_cublas_workspace_of_its_own(monkeypatch):
    calls: list[tuple] = []
    monkeypatch.setattr(_cublas, "_load_cublas", lambda cp: _fake_cublas_lib(calls))
    current = SimpleNamespace(ptr=7)
    cp = SimpleNamespace(
        empty=_empty, uint8=np.uint8, ElementwiseKernel=lambda *a: None,
        cuda=SimpleNamespace(get_current_stream=lambda: current, using_allocator=_RawAllocator(), Device=Devices()),
    )  # fmt: skip
    matmul = _cublas.cublas_matmul(cp)
    shared = matmul.keepalive[1][0].workspace
    a, b, out = (np.ones(s, np.float32).view(DevArray) for s in ((2, 3), (3, 4), (2, 4)))
    matmul.add_stream(8)
    matmul.add_stream(8)  # once per stream
    own = matmul.keepalive[1][0].workspaces[8]
    for ptr in (7, 8, 8, 9, 7):
        current.ptr = ptr
        matmul(a, b, out, False)
    spaces = [c[1] for c in calls if c[0] == "workspace"]
    streams = [c[1] for c in calls if c[0] == "stream"]
    assert streams == [7, 8, 9, 7]  # set when the stream changes only
    assert spaces == [shared.data.ptr, own.data.ptr, shared.data.ptr, shared.data.ptr]
    assert own.nbytes == shared.nbytes and own.data.ptr != shared.data.ptr
    assert own.raw  # outside every memory pool: the warm-up before a capture runs under the graph's own pool
    assert [c for c in calls if c[0] == "gemm"] == [("gemm",)] * 5


def test_each_device_gets_a_cublas_handle_and_workspaces_made_on_it(monkeypatch):
    # a handle belongs to the device current at cublasCreate: one made on device 0 ran device 1's GEMMs (tensors on
    # cuda:1 through gpubptt.torch) with a workspace in device 0's memory
    devices = Devices()
    log: list[tuple] = []
    made_on: dict[int, int] = {}

    def create(ref):
        ref._obj.value = 100 + devices.current
        log.append(("create", devices.current))
        return 0

    def empty(n, dtype):
        out = _empty(n, dtype)
        made_on[out.data.ptr] = devices.current
        return out

    lib = _fake_cublas_lib([])
    lib.cublasCreate_v2 = create
    lib.cublasSetStream_v2 = lambda h, s: log.append(("stream", h.value, s, devices.current)) or 0
    lib.cublasSetWorkspace_v2 = lambda h, p, n: log.append(("workspace", h.value, made_on[p], devices.current)) or 0
    lib.cublasSgemm_v2 = lambda h, *a: log.append(("gemm", h.value, devices.current)) or 0
    monkeypatch.setattr(_cublas, "_load_cublas", lambda cp: lib)
    current = SimpleNamespace(ptr=7)
    cp = SimpleNamespace(
        empty=empty, uint8=np.uint8, ElementwiseKernel=lambda *a: None,
        cuda=SimpleNamespace(get_current_stream=lambda: current, using_allocator=_RawAllocator(), Device=devices),
    )  # fmt: skip
    matmul = _cublas.cublas_matmul(cp)  # made while device 0 is current
    a, b, out = (np.ones(s, np.float32).view(DevArray) for s in ((2, 3), (3, 4), (2, 4)))
    matmul(a, b, out, False)
    with devices(1):
        current.ptr = 9
        matmul.add_stream(10)
        matmul(a, b, out, False)
    current.ptr = 7
    matmul(a, b, out, False)  # back on device 0: its handle is still set to stream 7
    assert log == [
        ("create", 0),
        ("stream", 100, 7, 0), ("workspace", 100, 0, 0), ("gemm", 100, 0),
        ("create", 1),
        ("stream", 101, 9, 1), ("workspace", 101, 1, 1), ("gemm", 101, 1),
        ("gemm", 100, 0),
    ]  # fmt: skip
    states = matmul.keepalive[1]
    assert made_on[states[1].workspaces[10].data.ptr] == 1 and states[1].workspaces[10].raw


def test_cupy_backend_runs_jobs_on_side_streams_only_where_concurrent_is_set(monkeypatch):
    from gpubptt.backend.cupy_backend import CupyBackend

    cuda = _FakeCuda()
    monkeypatch.setattr(_cublas, "_load_cublas", lambda cp: _fake_cublas_lib([]))
    cp = SimpleNamespace(empty=_empty, uint8=np.uint8, ElementwiseKernel=lambda *a: None, cuda=cuda.cuda)
    be = CupyBackend(cp, "stand-in")
    assert be.concurrent is False  # not measured on a device yet: off by default
    be.run_concurrently([cuda.job("a"), cuda.job("b")])
    assert cuda.log == [("job", "a", "origin"), ("job", "b", "origin")]
    view = be.with_precision("tf32")
    view.concurrent = True  # one setting for the backend and its views
    assert be.concurrent is True
    cuda.log.clear()
    be.run_concurrently([cuda.job("a"), cuda.job("b")])
    assert ("job", "b", "side1") in cuda.log and ("job", "a", "origin") in cuda.log
    assert len(be._matmul.keepalive[1][0].workspaces) == 1  # the side stream's own workspace


def _in_order(order: str):
    """A NumPy backend whose ``run_concurrently`` runs the jobs one after the other, in the order given: "fork"
    as ``SideStreams`` queues them (jobs 1, 2, … then job 0), "reversed", or "sequential"."""
    be = NumpyBackend()

    def run(jobs):
        seq = {"fork": jobs[1:] + jobs[:1], "reversed": jobs[::-1], "sequential": jobs}[order]
        for job in seq:
            job()

    be.run_concurrently = run  # type: ignore[method-assign]
    return be


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bidirectional_pair_jobs_give_the_same_bits_in_any_order(cell, dtype):
    rng = np.random.default_rng(3)
    T, B, D, H, K = 9, 5, 6, 7, 8
    x, y = rng.normal(size=(T, B, D)), rng.integers(0, K, size=(T, B))
    ids, targets = rng.integers(0, D, size=(T, B)), rng.normal(size=(T, B, K))
    lengths = np.array([9, 4, 0, 1, 9])
    results = {}
    for order in ("sequential", "fork", "reversed"):
        m = gpubptt.RNN(D, H, K, cell=cell, num_layers=2, bidirectional=True, backend=_in_order(order), seed=2,
                        dtype=dtype, bias=True)  # fmt: skip
        out = []
        cases = ((x, y, {}), (x, y, {"lengths": lengths}), (ids, y, {"truncate": 3}), (x, targets, {"head": "mse"}))
        for inputs, want, kw in cases:  # the last one through the pullback (``vjp``) under an MSE head
            loss, grads, final = m.loss_and_grads(inputs, want, return_final_state=True, **kw)
            out.append((float(loss), {k: np.array(g) for k, g in grads.items()}, np.array(final)))
        probs = m.forward(x, lengths=lengths).probs
        results[order] = (out, np.array(probs))
    ref_out, ref_probs = results["sequential"]
    for order in ("fork", "reversed"):
        got_out, got_probs = results[order]
        np.testing.assert_array_equal(got_probs, ref_probs)
        for (l1, g1, f1), (l2, g2, f2) in zip(ref_out, got_out, strict=True):
            assert l1 == l2
            np.testing.assert_array_equal(f1, f2)
            for k in g1:
                np.testing.assert_array_equal(g1[k], g2[k], err_msg=f"{order} {k}")


def _host(final):
    """A final state (an LSTM's (h, c) tuple) on the host."""
    return tuple(map(gpubptt.to_numpy, final)) if isinstance(final, tuple) else (gpubptt.to_numpy(final),)


@pytest.mark.gpu
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_cupy_side_streams_match_cupy_in_turn_bitwise_and_numpy_float64(cupy_be, monkeypatch, cell):
    rng = np.random.default_rng(5)
    T, B, D, H, K = 12, 6, 20, 32, 15
    ref = gpubptt.RNN(D, H, K, cell=cell, num_layers=2, bidirectional=True, backend="numpy", dtype="float64",
                      seed=4, init="torch", bias=True)  # fmt: skip
    x, y = rng.normal(size=(T, B, D)), rng.integers(0, K, size=(T, B))
    lengths = np.array([12, 5, 0, 1, 12, 7])

    def run(dtype, graphs):
        gpu = gpubptt.RNN.from_params(ref.params, backend=cupy_be, dtype=dtype, cell=cell)
        gpu.use_graphs = graphs
        out = []
        for kw in ({}, {"lengths": cupy_be.asarray(lengths)}):
            for _ in range(2):  # the second call replays the captured graph
                loss, grads, final = gpu.loss_and_grads(cupy_be.asarray(x), cupy_be.asarray(y),
                                                        return_final_state=True, **kw)  # fmt: skip
            out.append((float(loss), {k: gpubptt.to_numpy(g) for k, g in grads.items()}, _host(final)))
        return out

    for dtype in ("float64", "float32"):
        runs = {}
        for concurrent in (True, False):  # side streams first, made in a graph's warm-up (its private pool)
            monkeypatch.setattr(cupy_be, "concurrent", concurrent)
            for graphs in (True, False):
                runs[concurrent, graphs] = run(dtype, graphs)
                gc.collect()  # that model, its graphs and their pools are gone: the side streams' memory is not
        for graphs in (True, False):
            for (l1, g1, f1), (l2, g2, f2) in zip(runs[False, graphs], runs[True, graphs], strict=True):
                assert l1 == l2
                for a, b in zip(f1, f2, strict=True):
                    np.testing.assert_array_equal(a, b)
                for k in g1:
                    np.testing.assert_array_equal(g1[k], g2[k], err_msg=f"{dtype} graphs={graphs} {k}")
        monkeypatch.setattr(cupy_be, "concurrent", True)
        assert run(dtype, True)[0][0] == runs[False, True][0][0]  # side streams again, after their first graph died
        tol = 1e-10 if dtype == "float64" else 1e-4
        for (l2, g2, _), kw in zip(runs[True, True], ({}, {"lengths": lengths}), strict=True):
            l1, g1 = ref.loss_and_grads(x, y, **kw)
            assert l2 == pytest.approx(float(l1), rel=tol)
            for k in g1:
                assert np.abs(g2[k] - g1[k]).max() <= tol * max(np.abs(g1[k]).max(), 1e-3), f"{dtype} {k}"


def test_device_scratch_buffers_are_allocated_outside_every_memory_pool():
    from gpubptt.backend.precision import Scratch

    xp = SimpleNamespace(empty=_empty, cuda=SimpleNamespace(using_allocator=_RawAllocator()))
    scratch = Scratch()
    first = scratch.get("a7", (3, 4), np.uint16, xp)
    scratch.get("a7", (5, 4), np.uint16, xp)  # outgrown: a bigger one, the first kept for a graph that reads it
    held = scratch._local.pools[("a7", np.dtype(np.uint16).str)]
    assert len(held) == 2 and all(buf.raw for buf in held) and first.shape == (3, 4)


def test_each_thread_captures_on_one_stream_of_its_own(monkeypatch):
    from gpubptt.backend import _graphs

    monkeypatch.setattr(_graphs, "_local", threading.local())  # no stream from another test's stand-in
    cuda = _FakeCuda()
    mine = _graphs._capture_stream(cuda)
    assert _graphs._capture_stream(cuda) is mine  # every capture of this thread: one stream, one bf16 scratch
    theirs = []
    other = threading.Thread(target=lambda: theirs.append(_graphs._capture_stream(cuda)))
    other.start()
    other.join()
    assert theirs[0] is not mine and cuda.made == [mine.name, theirs[0].name]


def test_a_capture_keeps_no_second_copy_of_the_warm_up_temporaries():
    # CuPy's pool keeps free blocks per stream: the warm-up's temporaries (freed on the caller's stream) were never
    # reused by the capture stream, and a graph's private pool held both copies (64 MiB of logits chunk twice)
    from gpubptt.backend import _graphs

    local = threading.local()

    class Stream:
        def __init__(self, name):
            self.name, self.ptr = name, id(self)

        def __enter__(self):
            self.previous = current()
            local.stream = self

        def __exit__(self, *exc):
            local.stream = self.previous

        def synchronize(self):
            pass

        def begin_capture(self):
            pass

        def end_capture(self):
            return SimpleNamespace(launch=lambda stream: None)

    origin = Stream("origin")
    current = lambda: getattr(local, "stream", origin)  # noqa: E731

    class Pool:  # cupy.cuda.MemoryPool: an arena of free blocks per stream; malloc reuses the current stream's
        def __init__(self):
            self.arenas, self.held = {}, 0

        def malloc(self, n):
            free = self.arenas.setdefault(current().name, [])
            if n in free:
                free.remove(n)
            else:
                self.held += n  # cudaMalloc
            return (current().name, n)

        def free(self, block):
            self.arenas.setdefault(block[0], []).append(block[1])

        def free_all_blocks(self, stream=None):
            assert stream is None
            self.held -= sum(sum(blocks) for blocks in self.arenas.values())
            self.arenas.clear()

    pools, allocator = [], [None]

    def memory_pool():
        pools.append(Pool())
        return pools[-1]

    @contextlib.contextmanager
    def using_allocator(a=None):
        previous, allocator[0] = allocator[0], a
        try:
            yield
        finally:
            allocator[0] = previous

    cuda = SimpleNamespace(MemoryPool=memory_pool, Stream=lambda non_blocking=False: Stream("capture"),
                           get_current_stream=current, using_allocator=using_allocator, Device=Devices())  # fmt: skip
    chunk = 64 << 20

    def fn():  # a forward+BPTT whose one temporary, the logits chunk, is freed as it returns
        pool = allocator[0].__self__
        pool.free(allocator[0](chunk))

    _graphs.capture(SimpleNamespace(cuda=cuda), fn)
    assert pools[0].held == chunk  # the capture's own copy only
