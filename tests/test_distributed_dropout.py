"""Dropout under data parallelism: the masks belong to the global example, so N ranks train the model of one process.

Each mask entry is a hash of (seed, layer, step, global example, unit) (``gpubptt.dropout``); these
tests check the runs against one process, and the masks' statistics against the binomial law.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpubptt
from gpubptt.distributed import DataParallel, run_ranks, shard_range
from gpubptt.engine.stack import Stack
from gpubptt.training.loop import train
from gpubptt.training.run import new_run, resume_run, save_run

SETTINGS = {"hidden": 12, "batch": 7, "chunk": 12, "dtype": "float64", "layers": 2, "dropout": 0.4}


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-300))


def _single(steps, settings=SETTINGS):
    run = new_run(settings, backend="numpy", steps=steps, eval_every=0)
    train(run.model, run.data, run.optimizer, run.config, state=run.state, history=run.history)
    return run


def _ranked(comm, run):
    dp = DataParallel(run.model, comm, batch_size=run.config.batch_size)
    local = dp.local_state(run.state)
    train(dp, dp.shard_data(run.data), run.optimizer, dp.local_config(run.config), state=local, history=run.history)
    run.state = dp.global_state(local)
    return run


def _assert_same_model(run, ref):
    for k in ref.model.params:
        assert _rel(run.model.params[k], ref.model.params[k]) <= 1e-9, k
    assert _rel(run.state.s, ref.state.s) <= 1e-9
    assert _rel(run.history.loss, ref.history.loss) <= 1e-9


@pytest.mark.parametrize("size", [2, 3])
def test_dropout_training_over_fake_ranks_gives_the_model_of_one_process(size):
    ref = _single(6)
    plain = _single(6, {**SETTINGS, "dropout": 0.0})  # the masks matter: without them the run differs
    assert _rel(plain.model.params["W"], ref.model.params["W"]) > 1e-3
    runs = run_ranks(size, lambda comm: _ranked(comm, new_run(SETTINGS, backend="numpy", steps=6, eval_every=0)))
    for run in runs:
        _assert_same_model(run, ref)


def test_a_dropout_run_resumed_under_another_rank_count_continues_the_same_run(tmp_path):
    ref = _single(6)
    path = tmp_path / "ck.npz"

    def part1(comm):
        run = _ranked(comm, new_run(SETTINGS, backend="numpy", steps=3, eval_every=0))
        if comm.rank == 0:
            save_run(path, run)
        comm.barrier()

    run_ranks(2, part1)
    runs = run_ranks(3, lambda comm: _ranked(comm, resume_run(path, backend="numpy", steps=6, eval_every=0)))
    _assert_same_model(runs[-1], ref)
    one = resume_run(path, backend="numpy", steps=6, eval_every=0)  # and in one process
    train(one.model, one.data, one.optimizer, one.config, state=one.state, history=one.history)
    _assert_same_model(one, ref)


def _model(seed=1, **kw):
    kw = {"num_layers": 3, "dropout": 0.4, "bidirectional": True, **kw}
    return gpubptt.RNN(5, 6, 5, backend="numpy", dtype="float64", seed=seed, **kw)


def _masks(model, T, B, key, offset=0):
    stack = Stack(model, T, B, dropout=True)
    stack.draw_masks(key, model.dropout, offset)
    return [M.copy() for M in stack.M]


@pytest.mark.parametrize("B,size", [(7, 2), (7, 3), (5, 5)])
def test_each_example_gets_its_global_masks_however_the_batch_is_split(B, size):
    model = _model()
    whole = _masks(model, 9, B, key=11)
    for rank in range(size):
        lo, hi = shard_range(B, size, rank)
        part = _masks(model, 9, hi - lo, key=11, offset=lo)
        for M, W in zip(part, whole, strict=True):
            np.testing.assert_array_equal(M, W[:, lo:hi])
    assert not np.array_equal(whole[0], _masks(model, 9, B, key=12)[0])  # another seed, other masks
    assert not np.array_equal(whole[0], whole[1])  # another layer, other masks


def test_data_parallel_without_a_seed_draws_the_masks_of_one_process_from_rank_zeros_generator():
    rng = np.random.default_rng(0)
    T, B = 6, 5
    x, y = rng.integers(0, 5, (T, B)), rng.integers(0, 5, (T, B))
    ref = _model(seed=4)
    want = [ref.loss_and_grads(x, y) for _ in range(2)]  # two calls: two draws of the model's generator

    def work(comm):
        dp = DataParallel(_model(seed=4 + comm.rank), comm, batch_size=B)  # rank 0's weights and generator rule
        return [dp.loss_and_grads(x[:, dp.lo : dp.hi], y[:, dp.lo : dp.hi]) for _ in range(2)]

    for got in run_ranks(3, work):
        for (loss, grads), (loss1, grads1) in zip(got, want, strict=True):
            assert _rel(loss, loss1) <= 1e-12
            for k in ref.params:
                assert _rel(grads[k], grads1[k]) <= 1e-12, k
    assert float(want[0][0]) != float(want[1][0])


def test_a_seed_and_an_offset_fix_the_masks_of_loss_and_of_loss_and_grads():
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 5, (6, 3)), rng.integers(0, 5, (6, 3))
    model = _model()
    a = model.loss_and_grads(x, y, dropout_seed=5, dropout_offset=4)
    assert float(a[0]) == pytest.approx(float(model.loss(x, y, dropout_seed=5, dropout_offset=4)), rel=1e-12)
    assert float(a[0]) != pytest.approx(float(model.loss(x, y, dropout_seed=5)), rel=1e-9)  # offset 0: other masks
    with pytest.raises(gpubptt.InputError, match=r"dropout_offset must be an int in \[0, 2\^63\)"):
        model.loss_and_grads(x, y, dropout_seed=5, dropout_offset=-1)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_masks_zero_a_binomial_fraction_p_and_keep_the_rest_at_one_over_one_minus_p(p, dtype):
    model = gpubptt.RNN(4, 50, 4, num_layers=3, dropout=p, backend="numpy", dtype=dtype, seed=0)
    T, B = 40, 30
    masks = _masks(model, T, B, key=3, offset=1000)
    n = T * B * 50
    sd = np.sqrt(p * (1 - p) / n)
    for M in masks:
        assert M.dtype == np.dtype(dtype)
        zero = M == 0
        np.testing.assert_array_equal(M[~zero], np.asarray(1 / (1 - p), dtype=dtype))  # inverted dropout
        assert abs(zero.mean() - p) < 5 * sd  # binomial: 5 standard deviations
        for axis in (0, 1, 2):  # no step, example or unit is favoured: each slice's fraction within 5 sd of its own
            per = zero.mean(axis=tuple(a for a in range(3) if a != axis))
            m = n // per.size
            assert np.abs(per - p).max() < 5 * np.sqrt(p * (1 - p) / m) + 1e-12, axis
        # neighbours are independent: both of two adjacent units zero with probability p²
        both = (zero[..., 1:] & zero[..., :-1]).mean()
        assert abs(both - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / zero[..., 1:].size)
    both_layers = (masks[0] == 0) & (masks[1] == 0)
    assert abs(both_layers.mean() - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / n)


def test_dropout_on_two_mpi_processes_trains_the_model_of_one_process(tmp_path):
    from .test_distributed_mpi import TINY, _assert_same_run, _cli, _one_process, _skip_reason, mpiexec

    if _skip_reason():
        pytest.skip(_skip_reason())
    deep = [*TINY, "--layers", 2, "--dropout", 0.4, "--steps", 6, "--eval-every", 3]
    _one_process(*deep, "--checkpoint", tmp_path / "one.npz")
    two = _cli(*deep, "--checkpoint", "two.npz", "--distributed", "mpi")
    result = mpiexec(two, two, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    _assert_same_run(tmp_path / "two.npz", tmp_path / "one.npz", rtol=1e-9)


def test_the_masks_do_not_depend_on_the_block_size_of_the_hash(monkeypatch):
    model = _model()
    blocked = _masks(model, 9, 7, key=2, offset=3)
    monkeypatch.setattr(model.backend, "block_elements", 1 << 62)  # whole arrays, as on a GPU
    for M, W in zip(_masks(model, 9, 7, key=2, offset=3), blocked, strict=True):
        np.testing.assert_array_equal(M, W)
    monkeypatch.setattr(model.backend, "block_elements", 5)  # fewer entries than one row: a row per block
    for M, W in zip(_masks(model, 9, 7, key=2, offset=3), blocked, strict=True):
        np.testing.assert_array_equal(M, W)


def test_dropout_set_after_construction_is_checked_and_an_offset_past_the_hash_refused():
    """model.dropout = 1.0 divided by zero in the masks; −0.1 and NaN ran without dropout; an offset of 2^64 was a raw
    OverflowError, and one just below it wrapped onto example 0's masks."""
    model = gpubptt.RNN(5, 6, 5, num_layers=2, backend="numpy", dtype="float64", seed=4)
    x = np.zeros((4, 3), np.int64)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(gpubptt.InputError, match=r"dropout must lie in \[0, 1\)"):
            model.dropout = bad
    with pytest.raises(TypeError, match="dropout must be a number"):
        model.dropout = "0.3"
    model.dropout = 0.3
    built = gpubptt.RNN(5, 6, 5, num_layers=2, backend="numpy", dtype="float64", seed=4, dropout=0.3)
    assert model.loss(x, x, dropout_seed=5) == built.loss(x, x, dropout_seed=5)
    for offset in (2**63, 2**64, 2**64 - 2):
        with pytest.raises(gpubptt.InputError, match=r"dropout_offset must be an int in \[0, 2\^63\)"):
            model.loss(x, x, dropout_seed=1, dropout_offset=offset)
    import pickle

    state = model.__getstate__()
    state["dropout"] = state.pop("_dropout")  # as pickled before dropout was a property
    old = type(model).__new__(type(model))
    old.__setstate__(state)
    assert old.dropout == 0.3 and pickle.loads(pickle.dumps(model)).dropout == 0.3
