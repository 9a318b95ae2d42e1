"""Memory budgets honoured where they were dropped or undercounted, and sampling independent of the model's head.

Each test failed before its fix: ``max_memory`` ignored under the non-softmax heads and by ``DataParallel`` without
``recompute``; a no-op ``truncate`` (a window over every step) blocking recomputation; the finiteness check of a long
dense input holding a mask of the whole input; the call's own copies of the caller's inputs uncounted; the training
memory check ignoring ``--max-memory``; a gated model's sampling reading the model's head instead of the softmax.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import gpubptt
from gpubptt.backend.numpy_backend import NumpyBackend
from gpubptt.distributed import DataParallel, LocalCommunicator
from gpubptt.engine.memory import InsufficientMemoryError
from gpubptt.errors import InputError
from gpubptt.params import FINITE_BLOCK, finite_in
from gpubptt.training.data import Vocab
from gpubptt.training.run import new_run
from gpubptt.training.sample import sample_chars, sample_text


def _tokens(T: int, B: int, D: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, D, (T, B)), rng.integers(0, D, (T, B))


@pytest.mark.parametrize("head", ["last_softmax", "mse", "last_mse"])
def test_max_memory_is_refused_under_the_other_heads(head):
    model = gpubptt.RNN(4, 5, 4, backend="numpy", seed=0)
    model.head = head
    x, _ = _tokens(6, 2, 4)
    y = {"last_softmax": np.zeros(2, np.int64), "mse": np.zeros((6, 2, 4)), "last_mse": np.zeros((2, 4))}[head]
    with pytest.raises(InputError, match=rf"max_memory=1 runs under the 'softmax' head only, not head '{head}'"):
        model.loss_and_grads(x, y, max_memory=1)


def test_data_parallel_keeps_max_memory_without_recompute():
    model = gpubptt.RNN(4, 5, 4, backend="numpy", seed=0)
    x, y = _tokens(6, 2, 4)
    with pytest.raises(InsufficientMemoryError, match="max_memory is 1 bytes"):
        DataParallel(model, LocalCommunicator(), batch_size=2).loss_and_grads(x, y, max_memory=1)


def test_a_window_over_every_step_recomputes_as_full_bptt():
    model = gpubptt.RNN(4, 5, 4, backend="numpy", dtype="float64", seed=0)
    x, y = _tokens(7, 3, 4)
    loss, want = model.loss_and_grads(x, y)
    for truncate in (6, 50):
        got_loss, got = model.loss_and_grads(x, y, truncate=truncate, recompute=2)
        assert got_loss == pytest.approx(loss, rel=1e-13)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-14)
    with pytest.raises(InputError, match="truncate cannot be combined with recompute"):
        model.loss_and_grads(x, y, truncate=5, recompute=2)  # a real window still cannot


def test_the_finiteness_check_of_a_long_input_holds_one_block_at_a_time():
    a = np.ones((4 * FINITE_BLOCK // 64, 4, 16), np.float32)  # 4 blocks
    tracemalloc.start()
    _, ok = finite_in(a, np.dtype(np.float32), xp=np)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert bool(ok) and peak < 2 * FINITE_BLOCK  # a whole-input mask would be 4 blocks
    for where in (0, a.shape[0] // 2, -1):  # a bad value in the first, a middle and the last block
        b = a.copy()
        b[where, 3, 15] = np.nan
        assert not bool(finite_in(b, np.dtype(np.float32), xp=np)[1])
    big = np.full((3, 2), 1e300)  # finite in float64, not in float32
    assert not bool(finite_in(np.tile(big, (FINITE_BLOCK, 1)), np.dtype(np.float32), xp=np)[1])


def test_the_calls_copies_of_the_inputs_count_against_max_memory():
    model = gpubptt.RNN(16, 8, 4, backend="numpy", seed=0)
    T, B = 512, 2
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(T, B, 16)).astype(np.float32), rng.integers(0, 4, (T, B))
    budget = model.memory_estimate(T, B, tokens=False, recompute="sqrt").total
    model.loss_and_grads(x, y, recompute="auto", max_memory=budget)  # float32 x: no copy, fits
    copy = x.astype(np.float64).astype(np.float32).nbytes  # the float32 copy of a float64 x
    with pytest.raises(InsufficientMemoryError, match="any policy"):
        model.loss_and_grads(x.astype(np.float64), y, recompute="auto", max_memory=budget)
    model.loss_and_grads(x.astype(np.float64), y, recompute="auto", max_memory=budget + copy)


def test_the_training_memory_check_counts_the_budget_not_the_stored_plan(monkeypatch):
    from gpubptt.training import sizing

    settings = {"task": "recall", "delay": 2000, "chunk": 0, "hidden": 128, "batch": 32, "dtype": "float32"}
    budget = 8 << 20
    seen = []
    monkeypatch.setattr(sizing, "check_fits", lambda estimate, available, what: seen.append(estimate))
    new_run(settings, backend="numpy", steps=1)
    new_run(settings, backend="numpy", steps=1, max_memory=budget)
    stored, capped = seen
    assert stored.parts["forward+BPTT workspaces"] > 4 * budget  # the stored plan alone would not fit below
    assert capped.parts["forward+BPTT workspaces"] == budget
    monkeypatch.undo()
    room = capped.total + (1 << 20)
    monkeypatch.setattr(NumpyBackend, "available_memory", lambda self: room)
    with pytest.raises(InsufficientMemoryError, match="forward\\+BPTT workspaces"):
        new_run(settings, backend="numpy", steps=1)
    assert new_run(settings, backend="numpy", steps=1, max_memory=budget).config.chunk is None


@pytest.mark.parametrize("cell", ["gru", "lstm", "indrnn"])
def test_sampling_reads_the_softmax_whatever_the_models_head(cell):
    vocab = Vocab("abcdefgh")
    model = gpubptt.RNN(8, 16, 8, cell=cell, backend="numpy", seed=3)
    want = sample_text(model, vocab, length=12, greedy=True, prime="ab")
    drawn = sample_text(model, vocab, length=12, seed=1, prime="ab")
    for head in ("last_softmax", "mse", None):
        model.head = head
        assert sample_text(model, vocab, length=12, greedy=True, prime="ab") == want
        assert sample_text(model, vocab, length=12, seed=1, prime="ab") == drawn
        assert "".join(sample_chars(model, vocab, length=12, prime="ab", greedy=True)) == want


def test_the_finiteness_check_goes_down_an_axis_whose_rows_are_too_large():
    a = np.ones((2, 64, 4096), np.float32)  # one leading row is 4 blocks
    tracemalloc.start()
    _, ok = finite_in(a, np.dtype(np.float32), xp=np)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert bool(ok) and peak < 2 * FINITE_BLOCK
    a[1, 63, 4095] = np.inf
    assert not bool(finite_in(a, np.dtype(np.float32), xp=np)[1])
    assert not bool(finite_in(a.transpose(2, 0, 1)[:, :, ::-1], np.dtype(np.float32), xp=np)[1])  # any layout


def test_memory_estimate_takes_a_window_over_every_step_as_full_bptt():
    model = gpubptt.RNN(4, 5, 4, backend="numpy", seed=0)
    T, B = 12, 3
    want = model.memory_estimate(T, B, recompute=2).total
    assert model.memory_estimate(T, B, recompute=2, truncate=T - 1).total == want
    with pytest.raises(InputError, match="truncate cannot be combined with recompute"):
        model.memory_estimate(T, B, recompute=2, truncate=T - 2)


@pytest.mark.parametrize(("budget", "error"), [("8G", "InputTypeError"), (0.5, "InputError"), (-1, "InputError")])
def test_a_training_run_checks_its_memory_budget(budget, error):
    settings = {"task": "recall", "delay": 20, "hidden": 8, "batch": 4}
    with pytest.raises((InputError, TypeError), match="max_memory must be") as info:
        new_run(settings, backend="numpy", steps=1, max_memory=budget)
    assert type(info.value).__name__ == error
