"""Recomputation (``loss_and_grads(recompute=...)``): the gradient is the stored path's (the stored path,
itself checked against central differences and torch elsewhere, is the reference), the memory it holds
is what ``memory_estimate`` says (tracemalloc on NumPy, the memory pool on CuPy), it grows as √T, and
every bad input or impossible budget is refused before any work."""

from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gpubptt
from gpubptt.backend import get_backend
from gpubptt.engine.memory import InsufficientMemoryError
from gpubptt.errors import InputError, InputTypeError


def build(D, H, K, *, layers=1, bias=True, backend="numpy", dtype="float64", seed=0, **kw):
    return gpubptt.RNN(D, H, K, num_layers=layers, bias=bias, backend=backend, dtype=dtype, seed=seed, **kw)


def batch(rng, T, B, D, K, *, tokens, lengths, s0_states, H):
    x = rng.integers(0, D, size=(T, B)) if tokens else rng.normal(size=(T, B, D))
    y = rng.integers(0, K, size=(T, B))
    lens = rng.integers(0, T + 1, size=B) if lengths else None
    s0 = rng.normal(size=(s0_states, B, H)) * 0.5 if s0_states else None
    return x, y, s0, lens


def rel_err(a, b) -> float:
    a, b = gpubptt.to_numpy(a), gpubptt.to_numpy(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def assert_same_as_stored(model, x, y, s0, lens, reduction, recompute, tol=1e-12):
    want_loss, want, want_final = model.loss_and_grads(
        x, y, s0, lengths=lens, reduction=reduction, return_final_state=True
    )
    loss, got, final = model.loss_and_grads(
        x, y, s0, lengths=lens, reduction=reduction, return_final_state=True, recompute=recompute
    )
    assert set(got) == set(want)
    assert rel_err(loss, want_loss) <= tol
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert rel_err(got[k], want[k]) <= tol, (k, rel_err(got[k], want[k]))
    assert final.shape == want_final.shape
    assert rel_err(final, want_final) <= tol


@given(
    T=st.integers(1, 30),
    B=st.integers(1, 4),
    layers=st.integers(1, 3),
    c=st.one_of(st.integers(1, 35), st.just("sqrt")),
    tokens=st.booleans(),
    lengths=st.booleans(),
    s0=st.booleans(),
    bias=st.booleans(),
    reduction=st.sampled_from(["sum", "mean"]),
    nonlinearity=st.sampled_from(["tanh", "relu"]),
    seed=st.integers(0, 2**16),
)
def test_recompute_matches_the_stored_path_over_random_shapes_and_segmentations(
    T, B, layers, c, tokens, lengths, s0, bias, reduction, nonlinearity, seed
):
    rng = np.random.default_rng(seed)
    D, H, K = 5, 4, 6
    model = build(D, H, K, layers=layers, bias=bias, nonlinearity=nonlinearity, seed=seed)
    x, y, s0_, lens = batch(rng, T, B, D, K, tokens=tokens, lengths=lengths, s0_states=layers if s0 else 0, H=H)
    if reduction == "mean" and lens is not None and lens.sum() == 0:
        lens[0] = T
    assert_same_as_stored(model, x, y, s0_, lens, reduction, c)


@pytest.mark.parametrize("c", [1, 3, 7, 10, 11, 50])  # c = 1; segments not dividing T; c dividing T; c ≥ T
def test_recompute_matches_the_stored_path_for_each_segment_length(be, c):
    rng = np.random.default_rng(c)
    model = build(6, 5, 7, layers=2, backend=be)
    x, y, s0, _ = batch(rng, 40, 3, 6, 7, tokens=True, lengths=False, s0_states=2, H=5)
    assert_same_as_stored(model, be.asarray(x), be.asarray(y), be.asarray(s0), None, "sum", c)


def test_lengths_shorter_than_one_segment_match_the_stored_path():
    rng = np.random.default_rng(3)
    model = build(4, 6, 5)
    x, y, s0, _ = batch(rng, 60, 4, 4, 5, tokens=False, lengths=False, s0_states=1, H=6)
    lens = np.array([0, 1, 7, 9])  # all inside the first segment of 10 steps
    assert_same_as_stored(model, x, y, s0[0], lens, "mean", 10)
    assert_same_as_stored(model, x, y, s0[0], lens, "sum", "sqrt")


def test_one_segment_is_bitwise_the_stored_path():
    """c ≥ T runs the same kernels in the same order as the stored path: equal to the last bit."""
    rng = np.random.default_rng(4)
    model = build(5, 8, 6, dtype="float32")
    x, y, _, lens = batch(rng, 25, 3, 5, 6, tokens=True, lengths=True, s0_states=0, H=8)
    want_loss, want = model.loss_and_grads(x, y, lengths=lens)
    for c in (25, 26, 10**6):
        loss, got = model.loss_and_grads(x, y, lengths=lens, recompute=c)
        assert float(loss) == float(want_loss)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_recompute_gradient_matches_central_differences():
    """An independent check of the recomputed gradient itself (float64, h = 1e-6), not only against stored."""
    rng = np.random.default_rng(5)
    model = build(3, 4, 3, layers=2, init="torch")
    x, y, s0, lens = batch(rng, 9, 2, 3, 3, tokens=False, lengths=True, s0_states=2, H=4)
    lens = np.array([9, 5])
    _, grads = model.loss_and_grads(x, y, s0, lengths=lens, recompute=2)
    h = 1e-6
    for name in ("W", "U_l1", "b", "V"):
        p = model.params[name]
        for idx in [(0,) * p.ndim, tuple(s - 1 for s in p.shape)]:
            old = p[idx]
            p[idx] = old + h
            up = float(model.loss(x, y, s0, lengths=lens))
            p[idx] = old - h
            down = float(model.loss(x, y, s0, lengths=lens))
            p[idx] = old
            assert abs((up - down) / (2 * h) - grads[name][idx]) <= 1e-7 * max(1.0, abs(grads[name][idx]))


# -- memory ------------------------------------------------------------------------------------------
def traced_peak(model, x, y, **kw) -> int:
    """Peak bytes one call allocates on a fresh copy of the model (no cached workspace), traced on the host."""
    fresh = gpubptt.RNN.from_params(model.params, backend="numpy")
    tracemalloc.start()
    try:
        fresh.loss_and_grads(x, y, **kw)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def warm():
    """One small call of each kind first, so lazy imports inside NumPy and the first compile (or cache load) of the
    LSTM's float32 step kernels are not traced as the call's memory."""
    m = build(3, 3, 3)
    x = np.zeros((4, 2), dtype=np.int64)
    lstm = build(3, 3, 3, dtype="float32", cell="lstm")
    for r in (None, 2):
        m.loss_and_grads(x, x, lengths=np.array([4, 1]), recompute=r)
        lstm.loss_and_grads(np.zeros((4, 2, 3), np.float32), x, recompute=r)


MEMORY_CASES = [
    # T, B, D, H, K, tokens, layers, lengths, recompute
    (1024, 8, 64, 128, 64, True, 1, False, "sqrt"),
    (1024, 8, 64, 128, 64, True, 1, False, None),
    (1024, 8, 16, 128, 64, False, 1, True, 5),
    (600, 4, 600, 32, 50, True, 1, True, "sqrt"),  # D > 512: the gather path of the token scatter
    (500, 8, 32, 64, 500, True, 2, False, 16),
    (500, 8, 32, 64, 64, False, 2, True, None),
    (300, 4, 32, 64, 64, True, 3, False, 1),
]


def estimate_and_peak(T, B, D, H, K, tokens, layers, lengths, recompute):
    rng = np.random.default_rng(T + B)
    model = build(D, H, K, layers=layers, dtype="float32")
    x, y, _, lens = batch(rng, T, B, D, K, tokens=tokens, lengths=lengths, s0_states=0, H=H)
    if not tokens:
        x = x.astype(np.float32)
    est = model.memory_estimate(T, B, tokens=tokens, lengths=lengths, recompute=recompute).total
    return est, traced_peak(model, x, y, lengths=lens, recompute=recompute)


@pytest.mark.parametrize("T,B,D,H,K,tokens,layers,lengths,recompute", MEMORY_CASES)
def test_memory_estimate_is_within_10_percent_of_the_traced_peak(
    warm, monkeypatch, T, B, D, H, K, tokens, layers, lengths, recompute
):
    """On NumPy's own BLAS (GPUBPTT_BLAS=numpy), whose accumulating GEMMs make the temporaries the estimate
    counts; MKL's add in place (the next test)."""
    monkeypatch.setattr(get_backend("numpy"), "mkl", None)
    est, peak = estimate_and_peak(T, B, D, H, K, tokens, layers, lengths, recompute)
    assert abs(est - peak) <= 0.10 * peak, (est, peak)


@pytest.mark.skipif(get_backend("numpy").mkl is None, reason="MKL unavailable: pip install mkl")
@pytest.mark.parametrize("T,B,D,H,K,tokens,layers,lengths,recompute", MEMORY_CASES[-3:])
def test_memory_estimate_covers_the_traced_peak_under_mkl(warm, T, B, D, H, K, tokens, layers, lengths, recompute):
    """Under MKL an accumulating GEMM makes no temporary (beta = 1): the peak is at most NumPy's BLAS's (10 % lower
    in one of these cases, equal in the others), so the estimate errs on the safe side, by at most 20 %."""
    est, peak = estimate_and_peak(T, B, D, H, K, tokens, layers, lengths, recompute)
    assert 0.9 * peak <= est <= 1.2 * peak, (est, peak)


def test_recompute_peak_grows_as_sqrt_T_and_is_an_eighth_of_stored_at_4096(warm):
    model = build(16, 64, 16, dtype="float32")
    rng = np.random.default_rng(6)
    peaks = {}
    for T in (1024, 4096):
        x = rng.integers(0, 16, size=(T, 4))
        peaks[T] = traced_peak(model, x, x, recompute="sqrt")
    stored = traced_peak(model, x, x)
    assert peaks[4096] <= stored / 8, (peaks[4096], stored)
    assert peaks[4096] <= 2.5 * peaks[1024], peaks  # 4× T: √4 = 2× the T-dependent part, plus fixed parts


def test_auto_keeps_every_state_when_it_fits_and_recomputes_when_not():
    rng = np.random.default_rng(7)
    model = build(8, 16, 8)
    x = rng.integers(0, 8, size=(400, 2))
    stored = model.memory_estimate(400, 2).total
    model.loss_and_grads(x, x, recompute="auto", max_memory=stored)
    assert "recompute" not in model.workspaces()[-1]
    _, grads = model.loss_and_grads(x, x, recompute="auto", max_memory=stored - 1)
    chosen = model.workspaces()[-1]["recompute"]
    assert model.memory_estimate(400, 2, recompute=chosen).total <= stored - 1
    segments = -(-400 // chosen)
    fewer = [c for c in range(1, 401) if -(-400 // c) < segments]  # every policy with fewer segments: none fits
    assert all(model.memory_estimate(400, 2, recompute=c).total > stored - 1 for c in fewer)
    _, want = model.loss_and_grads(x, x)
    for k in want:
        assert rel_err(grads[k], want[k]) <= 1e-12


def test_a_budget_below_the_minimum_is_refused_before_any_work_naming_the_minimum():
    model = build(8, 16, 8)
    x = np.zeros((400, 2), dtype=np.int64)
    minimum = min(model.memory_estimate(400, 2, recompute=c).total for c in range(1, 401))
    for policy in ("auto", None, "sqrt", 20):
        with pytest.raises(InsufficientMemoryError, match=f"smallest budget that works is {minimum} bytes"):
            model.loss_and_grads(x, x, recompute=policy, max_memory=minimum - 1)
    assert model.workspaces() == []  # nothing was allocated or run
    model.loss_and_grads(x, x, recompute="auto", max_memory=minimum)  # the minimum itself fits


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"recompute": 0}, InputError, "must be ≥ 1"),
        ({"recompute": -3}, InputError, "must be ≥ 1"),
        ({"recompute": 2.5}, InputTypeError, "int ≥ 1"),
        ({"recompute": True}, InputTypeError, "got bool"),
        ({"recompute": "half"}, InputError, "unknown recompute 'half'"),
        ({"recompute": "auto"}, InputError, "needs max_memory"),
        ({"max_memory": 0}, InputError, "max_memory must be a finite number of bytes ≥ 1"),
        ({"max_memory": -5}, InputError, "max_memory must be a finite number of bytes ≥ 1"),
        ({"max_memory": 0.5}, InputError, "max_memory must be a finite number of bytes ≥ 1"),  # was: 0 bytes
        ({"max_memory": float("inf")}, InputError, "max_memory must be a finite"),
        ({"max_memory": "8G"}, InputTypeError, "max_memory must be None or a number"),
        ({"recompute": 3, "truncate": 2}, InputError, "truncate cannot be combined with recompute"),
    ],
)
def test_bad_recompute_arguments_are_refused_naming_what_was_expected(kwargs, error, match):
    model = build(4, 4, 4)
    x = np.zeros((6, 2), dtype=np.int64)
    with pytest.raises(error, match=match):
        model.loss_and_grads(x, x, **kwargs)
    assert model.workspaces() == []


@pytest.mark.parametrize(
    "kw,match",
    [({"bidirectional": True}, "bidirectional"), ({"layers": 2, "dropout": 0.5}, "dropout=0.5 between layers")],
)
def test_models_that_cannot_recompute_say_why(kw, match):
    model = build(4, 4, 4, **kw)
    x = np.zeros((6, 2), dtype=np.int64)
    with pytest.raises(InputError, match=match):
        model.loss_and_grads(x, x, recompute="sqrt")
    with pytest.raises(InputError, match=match):
        model.memory_estimate(6, 2, recompute=2)
    model.loss_and_grads(x, x, recompute="auto", max_memory=10**9)  # auto may still keep every state


def test_a_cell_that_does_not_declare_extra_state_is_refused(monkeypatch):
    model = build(4, 4, 4)
    monkeypatch.delattr(type(model.cell), "extra_state")
    with pytest.raises(InputError, match="does not declare extra_state"):
        model.loss_and_grads(np.zeros((6, 2), dtype=np.int64), np.zeros((6, 2), dtype=np.int64), recompute=2)


# -- CuPy ----------------------------------------------------------------------------------------------
def test_cupy_recompute_matches_numpy_stored_path(cupy_be):
    rng = np.random.default_rng(8)
    host = build(7, 32, 9, layers=2)
    dev = host.to(cupy_be)
    x, y, s0, lens = batch(rng, 37, 5, 7, 9, tokens=True, lengths=True, s0_states=2, H=32)
    _, want = host.loss_and_grads(x, y, s0, lengths=lens)
    for c in (1, 6, "sqrt", 40):
        _, got = dev.loss_and_grads(
            *(cupy_be.asarray(a) for a in (x, y, s0)), lengths=cupy_be.asarray(lens), recompute=c
        )
        for k in want:
            assert rel_err(got[k], want[k]) <= 1e-10, (c, k)


def test_cupy_peak_is_bounded_by_the_estimate(cupy_be):
    """On CuPy, the most pool memory one call on a fresh model holds at once (``Backend.peak_bytes``: a
    memory hook on every malloc and free; graphs off, so only the call's own buffers count) lies between
    the estimate's persistent parts and its total, ±10 %. (The estimate's transient part is NumPy's:
    ``take`` buffers its output and the scatter-add of tokens is a one-hot GEMM there; CuPy's kernels
    need neither.)"""
    model = build(64, 256, 64, dtype="float32", backend=cupy_be)
    T, B = 4096, 8
    x = cupy_be.asarray(np.random.default_rng(9).integers(0, 64, size=(T, B)))
    for recompute in ("sqrt", None):  # warm: kernel choices are timed once per shape, cuBLAS's workspace made
        model.loss_and_grads(x, x, recompute=recompute)
    for recompute in ("sqrt", None):
        fresh = model.to(cupy_be)
        fresh.use_graphs = False
        held = cupy_be.peak_bytes(
            lambda fresh=fresh, recompute=recompute: fresh.loss_and_grads(x, x, recompute=recompute)
        )
        est = fresh.memory_estimate(T, B, recompute=recompute)
        persistent = est.total - est.parts["output-layer chunk or token scatter"]
        assert 0.9 * persistent <= held <= 1.1 * est.total, (recompute, persistent, held, est.total)


# -- gpubptt train --max-memory ----------------------------------------------------------------------
def test_train_whole_sequences_recompute_when_the_stored_plan_exceeds_max_memory(tmp_path):
    """--chunk 0 on 302-step sequences: the stored plan needs more than the budget, so the run recomputes;
    a budget below the smallest possible is refused before training, naming that minimum."""
    from typer.testing import CliRunner

    from gpubptt.cli import app

    args = ["train", "--task", "recall", "--delay", "300", "--chunk", "0", "--hidden", "16", "--batch", "4"]
    args += ["--steps", "2", "--eval-every", "2", "--backend", "numpy", "--checkpoint", str(tmp_path / "ck.npz")]
    model = build(10, 16, 9, dtype="float32")
    stored = model.memory_estimate(302, 4).total
    out = CliRunner().invoke(app, [*args, "--max-memory", str(stored // 2)])
    assert out.exit_code == 0, out.output
    assert "302-step batches recompute states in segments of" in out.output
    out = CliRunner().invoke(app, [*args, "--force", "--max-memory", "1K"])
    assert out.exit_code != 0
    assert "the smallest budget that works is" in out.output
    out = CliRunner().invoke(app, [*args, "--force", "--max-memory", "lots"])
    assert out.exit_code != 0 and "--max-memory must be a size" in out.output


# -- gated cells: the GRU, and the LSTM whose cell state c is kept at boundaries and carried back ------
@pytest.mark.parametrize(
    "cell,layers,c,tokens,lengths,s0",
    [
        ("lstm", 1, 3, False, True, True),
        ("lstm", 2, "sqrt", True, False, True),
        ("lstm", 3, 1, False, True, False),
        ("lstm", 1, 4, True, True, False),
        ("gru", 2, 3, False, True, True),
        ("gru", 1, "sqrt", True, False, False),
    ],
)
def test_gated_recompute_matches_the_stored_path(cell, layers, c, tokens, lengths, s0):
    rng = np.random.default_rng(layers)
    T, B, D, H, K = 10, 3, 5, 4, 6
    model = build(D, H, K, layers=layers, cell=cell)
    x, y, h0, lens = batch(rng, T, B, D, K, tokens=tokens, lengths=lengths, s0_states=layers if s0 else 0, H=H)
    if lengths:
        lens[0] = 0  # a sequence of length 0: its final state is s0
    state = None if h0 is None else (h0, rng.normal(size=h0.shape)) if cell == "lstm" else h0
    want_loss, want, want_final = model.loss_and_grads(x, y, state, lengths=lens, return_final_state=True)
    loss, got, final = model.loss_and_grads(x, y, state, lengths=lens, return_final_state=True, recompute=c)
    assert set(got) == set(want)
    assert rel_err(loss, want_loss) <= 1e-12
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert rel_err(got[k], want[k]) <= 1e-12, (k, rel_err(got[k], want[k]))
    pairs = zip(final if cell == "lstm" else (final,), want_final if cell == "lstm" else (want_final,), strict=True)
    for a, b in pairs:
        assert a.shape == b.shape and rel_err(a, b) <= 1e-12


def test_lstm_memory_estimate_is_within_10_percent_of_the_traced_peak(warm):
    T, B, D, H, K = 600, 8, 32, 64, 64
    rng = np.random.default_rng(0)
    model = build(D, H, K, layers=2, dtype="float32", cell="lstm")
    x, y, _, _ = batch(rng, T, B, D, K, tokens=False, lengths=False, s0_states=0, H=H)
    x = x.astype(np.float32)
    for recompute in ("sqrt", None):
        est = model.memory_estimate(T, B, tokens=False, recompute=recompute).total
        peak = traced_peak(model, x, y, lengths=None, recompute=recompute)
        assert abs(est - peak) <= 0.10 * peak, (recompute, est, peak)


def test_auto_keeps_a_large_w_within_the_smallest_budget_and_a_split_gated_batch_is_estimated(warm):
    # W (H, H) large beside B·c: each later segment's share of dW is made once, not once per segment and layer
    model = build(8, 512, 8, dtype="float64")
    x = np.random.default_rng(0).integers(0, 8, (64, 2))
    model.loss_and_grads(x, x, recompute=4)  # untraced: this thread's MKL pack buffer grows to W's size once
    with pytest.raises(gpubptt.InputError, match=r"the smallest budget that works is (\d+) bytes") as info:
        model.loss_and_grads(x, x, recompute="auto", max_memory=10**6)
    smallest = int(re.search(r"the smallest budget that works is (\d+) bytes", str(info.value)).group(1))
    assert traced_peak(model, x, x, recompute="auto", max_memory=smallest) <= 1.02 * smallest  # was 1.42×
    # a gated cell whose steps run as two batch halves (B·H ≥ 8192) keeps a second Wᵀ: counted
    for cell in ("gru", "lstm"):
        gated = build(8, 257, 8, cell=cell)
        xs = np.random.default_rng(1).integers(0, 8, (2, 33))
        gated.loss_and_grads(xs, xs)  # untraced, as above (and the halves' threads)
        est = gated.memory_estimate(2, 33, tokens=True).total
        assert abs(est - traced_peak(gated, xs, xs)) <= 0.10 * est, cell  # was 13-15 % under
    # ... but not for a one-step last segment, which never splits (T = 8 in segments of 7: the last is 1 step)
    lstm = build(8, 256, 8, cell="lstm", dtype="float32")
    xs = np.random.default_rng(2).integers(0, 8, (8, 32))
    lstm.loss_and_grads(xs, xs, recompute=7)
    est = lstm.memory_estimate(8, 32, tokens=True, recompute=7).total
    assert abs(est - traced_peak(lstm, xs, xs, recompute=7)) <= 0.10 * est
