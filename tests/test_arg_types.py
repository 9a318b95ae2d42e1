"""Argument types across the API beyond the model's calls: a string is not a bool, a float or a bool is not a count,
a negative number is not a seed — each refused with a gpubptt error before any work, the setting left as it was."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import gpubptt
from gpubptt import diagnostics
from gpubptt.diagnostics.gated import compare_cells
from gpubptt.distributed import LocalCommunicator
from gpubptt.distributed.parallel import DataParallel, ShardedData, shard_range
from gpubptt.errors import InputError, InputTypeError, ShapeError
from gpubptt.interop import to_torch_state

X = np.array([[0, 1], [2, 0], [1, 1], [0, 2]], dtype=np.int64)  # (T, B) = (4, 2)


def _elman():
    return gpubptt.RNN(3, 4, 3, backend="numpy", dtype="float64", seed=0)


def test_a_string_is_not_a_bool():
    model = _elman()
    with pytest.raises(InputTypeError, match="grads must be a bool, got str 'no'"):
        to_torch_state(model.params, grads="no")  # read as true: the parameters taken for gradients
    with pytest.raises(InputTypeError, match="keep_terms must be a bool"):
        diagnostics.contributions(model, X, X, keep_terms="no")  # read as true: (T, T, H, H) kept
    be = model.backend
    before = be.concurrent
    with pytest.raises(InputTypeError, match="concurrent must be a bool"):
        be.concurrent = "False"
    assert be.concurrent == before
    with pytest.raises(InputTypeError, match="use_graphs must be a bool"):
        model.use_graphs = "False"
    assert model.use_graphs is True


def test_recurrent_batch_first_must_be_a_bool():
    pytest.importorskip("torch")
    from gpubptt.torch import Recurrent

    with pytest.raises(InputTypeError, match="batch_first must be a bool, got str 'False'"):
        Recurrent(_elman(), batch_first="False")


def test_a_model_pickled_before_use_graphs_was_checked_loads_with_it():
    model = _elman()
    state = model.__getstate__()
    state["use_graphs"] = state.pop("_use_graphs")  # as pickled before: a plain attribute
    old = type(model).__new__(type(model))
    old.__setstate__(state)
    assert old.use_graphs is True and pickle.loads(pickle.dumps(old)).use_graphs is True


@pytest.mark.parametrize("bad", [2.5, True, "2"])
def test_the_data_parallel_batch_is_a_count(bad):
    with pytest.raises((InputError, InputTypeError), match="batch_size"):
        DataParallel(_elman(), LocalCommunicator(), batch_size=bad)
    with pytest.raises((InputError, InputTypeError), match="batch_size"):
        ShardedData(object(), batch_size=bad, lo=0, hi=1, comm=LocalCommunicator())
    with pytest.raises((InputError, InputTypeError), match="global batch"):
        shard_range(bad, 1, 0)


def test_the_wrappers_name_what_they_need():
    with pytest.raises(InputTypeError, match=r"comm must be a Communicator \(.*\), got str 'local'"):
        DataParallel(_elman(), "local", batch_size=2)
    with pytest.raises(InputError, match=r"0 ≤ lo < hi ≤ batch_size=4, got lo=3, hi=1"):
        ShardedData(object(), batch_size=4, lo=3, hi=1, comm=LocalCommunicator())
    assert shard_range(np.int64(5), 2, 1) == (3, 5)  # NumPy counts are counts


@pytest.mark.parametrize("seed", [-1, 2.5, True])
def test_a_seed_is_an_int_at_least_zero(seed):
    model = _elman()
    calls = []
    cases = [
        lambda: diagnostics.jacobian_products(model, X, seed=seed),
        lambda: diagnostics.vanish_report(model, X, X, seed=seed, progress=calls.append),
        lambda: diagnostics.vanish_sweep(model, X, X, [0.5], seed=seed),
        lambda: diagnostics.stack_report(model, X, X, seed=seed),
        lambda: diagnostics.text_windows(np.arange(20), 4, 2, seed=seed),
        lambda: compare_cells(["rnn"], 4, 3, 2, 3, seed=seed),
    ]
    for case in cases:
        with pytest.raises((InputError, InputTypeError), match="seed must be an int ≥ 0"):
            case()
    assert calls == []  # vanish_report refused before its first diagnostic


def test_vanish_report_checks_its_settings_before_the_first_diagnostic():
    calls = []
    with pytest.raises(InputError, match="threshold"):
        diagnostics.vanish_report(_elman(), X, X, threshold=-1.0, progress=calls.append)
    assert calls == []


@pytest.mark.parametrize("sizes", [{"T": 2.5}, {"B": True}, {"H": 0}, {"vocab": "3"}])
def test_random_problem_sizes_are_counts(sizes):
    args = {"T": 4, "H": 3, "B": 2, "vocab": 3, **sizes}
    with pytest.raises((InputError, InputTypeError), match=f"{next(iter(sizes))} must be an int ≥ 1"):
        diagnostics.random_problem(**args, backend="numpy")


def test_spectral_radius_needs_a_square_matrix():
    with pytest.raises(ShapeError, match=r"square matrix W \(H, H\), got shape \(3,\)"):
        diagnostics.spectral_radius(np.ones(3))
    assert diagnostics.spectral_radius(np.diag([0.5, -2.0])) == pytest.approx(2.0)


def test_data_parallel_takes_an_object_with_what_it_uses_of_a_communicator():
    class Comm:  # not a Communicator subclass: rank, size, allreduce and broadcast are what it needs
        rank, size = 0, 1

        def allreduce(self, buf):
            pass

        def broadcast(self, buf, root=0):
            pass

    dp = DataParallel(_elman(), Comm(), batch_size=2)
    assert dp.local_batch == 2

    class Partial:
        rank, size = 0, 1

    with pytest.raises(InputTypeError, match="which has no allreduce, broadcast"):
        DataParallel(_elman(), Partial(), batch_size=2)


def test_sharded_data_checks_its_communicator_and_gradcheck_its_model():
    with pytest.raises(InputTypeError, match=r"comm must be a Communicator .*which has no rank, size"):
        ShardedData(object(), batch_size=4, lo=0, hi=2, comm="not a communicator")
    with pytest.raises(InputTypeError, match=r"gradcheck checks a gpubptt\.RNN, got dict"):
        gpubptt.gradcheck({}, X, X)


def test_data_parallel_refuses_a_batch_that_is_not_the_ranks_share():
    from gpubptt.distributed import run_ranks

    x = np.zeros((3, 4), dtype=np.int64)  # the global batch of 4 streams, given whole to each of 2 ranks

    def rank(comm):
        dp = DataParallel(_elman(), comm, batch_size=4)
        try:
            dp.loss_and_grads(x, x)  # was: each rank trained every stream, its dropout masks another rank's
        except InputError as exc:
            message = str(exc)
        loss, _ = dp.loss_and_grads(x[:, dp.lo : dp.hi], x[:, dp.lo : dp.hi])  # its own share runs
        return message, float(loss)

    (m0, l0), (m1, l1) = run_ranks(2, rank)
    assert "x holds 4 streams, but rank 0 trains its 2 of the global batch of 4 (streams [0, 2))" in m0
    assert "x holds 4 streams, but rank 1 trains its 2 of the global batch of 4 (streams [2, 4))" in m1
    assert l0 == l1  # the loss of the whole batch on every rank


def test_gradcheck_takes_a_wrapper_of_a_model():
    dp = DataParallel(_elman(), LocalCommunicator(), batch_size=2)
    report = gpubptt.gradcheck(dp, X, X)
    assert report.max_rel_error < 1e-6
