"""Data parallelism as one process computes it, and a failing job that says what happened.

Each test failed before its fix: ``reduction="mean"`` divided by the per-step softmax's count under every head and
read a ``batch_first`` x as time-major; ranks started with different options got a dump of their own settings, not
what differs; a rank stopped by an error could be ended by the launcher before its message was forwarded; an
interrupted ``--distributed`` run named the step of its last save as the one interrupted.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import gpubptt
from gpubptt.cli import _distributed
from gpubptt.distributed import ABORT_GRACE_S, DataParallel, LocalCommunicator, run_ranks
from gpubptt.errors import InputError

T, B, D, K = 6, 4, 3, 3


def _model() -> gpubptt.RNN:
    return gpubptt.RNN(D, 4, K, backend="numpy", dtype="float64", seed=1)


def _targets(head: str, rng: np.random.Generator) -> np.ndarray:
    return {
        "softmax": rng.integers(0, K, (T, B)),
        "last_softmax": rng.integers(0, K, B),
        "mse": rng.normal(size=(T, B, K)),
        "last_mse": rng.normal(size=(B, K)),
    }[head]


@pytest.mark.parametrize("head", ["softmax", "last_softmax", "mse", "last_mse"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_a_mean_over_ranks_is_the_one_process_mean_for_every_head_and_layout(head, batch_first):
    rng = np.random.default_rng(0)
    x, y, lengths = rng.integers(0, D, (T, B)), _targets(head, rng), np.array([6, 3, 5, 1])
    one = _model()
    one.head, one.batch_first = head, batch_first
    xs = x.T if batch_first else x
    ys = np.swapaxes(y, 0, 1) if batch_first and head in ("softmax", "mse") else y
    want_loss, want = one.loss_and_grads(xs, ys, lengths=lengths, reduction="mean")

    def rank(comm):
        m = _model()
        m.head, m.batch_first = head, batch_first
        dp = DataParallel(m, comm, batch_size=B)
        cols = slice(dp.lo, dp.hi)
        xr = xs[cols] if batch_first else xs[:, cols]
        yr = ys[cols] if (batch_first or head in ("last_softmax", "last_mse")) else ys[:, cols]
        return dp.loss_and_grads(xr, yr, lengths=lengths[cols], reduction="mean")

    for loss, grads in run_ranks(2, rank):
        assert float(loss) == pytest.approx(float(want_loss), rel=1e-12)
        for name in one.params:
            np.testing.assert_allclose(grads[name], want[name], rtol=1e-10, atol=1e-14)
    loss, _ = DataParallel(one, LocalCommunicator(), batch_size=B).loss_and_grads(
        xs, ys, lengths=lengths, reduction="mean"
    )
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-12)


def test_ranks_started_with_different_options_are_told_what_differs():
    def rank(comm):
        seed = 0 if comm.rank == 0 else 1
        return DataParallel(_model(), comm, batch_size=B, fingerprint=f"lr=0.01|seed={seed}|task='text'")

    with pytest.raises(InputError) as info:
        run_ranks(2, rank)
    said = str(info.value)
    assert "ranks [1] were started with options" in said
    assert "rank 1: seed: 1 against rank 0's 0" in said and "lr" not in said.split("(", 1)[1]


def test_a_stopping_rank_gives_the_launcher_time_to_forward_its_message(monkeypatch, capsys):
    events = []

    class Comm:
        rank, size = 1, 2

        def abort(self, code):
            events.append(("abort", code))

    monkeypatch.setattr(_distributed.time, "sleep", lambda s: events.append(("sleep", s)))
    monkeypatch.setattr(_distributed, "_active", [Comm()])
    _distributed._abort(3)
    assert events == [("sleep", ABORT_GRACE_S), ("abort", 3)]
    assert "rank 1 of 2 stopped (exit status 3): ending the job" in capsys.readouterr().err


def test_an_interrupted_distributed_run_names_the_step_it_was_at(tmp_path, monkeypatch, capsys):
    import typer

    from gpubptt.cli import train as cli_train
    from gpubptt.training.loop import TrainState
    from gpubptt.training.run import new_run

    run = new_run({"hidden": 8, "batch": 4, "chunk": 8}, backend="numpy", steps=5000)

    class Reporter:
        local_state = None

        def start(self):
            pass

        def stop(self):
            pass

        def kept(self):
            return "no checkpoint was saved"

    reporter = Reporter()

    def interrupted(dp, run, reporter, train_loop, **kw):
        reporter.local_state = TrainState(step=999)  # this rank's own state; run.state moves at saves only
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_train, "train_data_parallel", interrupted)
    with pytest.raises(typer.Exit):
        cli_train._train_or_exit(
            run, object(), reporter, tmp_path / "ck.npz", run.model.backend, budget=None, early_stop=None
        )
    assert "interrupted during step 1000, before it finished" in capsys.readouterr().err
    assert run.state.step == 0


def test_ranks_with_different_dtypes_or_sizes_are_told_which():
    def rank(comm):
        H, dtype = (4, "float64") if comm.rank == 0 else (5, "float32")
        return DataParallel(gpubptt.RNN(D, H, K, backend="numpy", dtype=dtype, seed=1), comm, batch_size=B)

    with pytest.raises(InputError) as info:
        run_ranks(2, rank)
    said = str(info.value)
    assert "dtype: float32 against rank 0's float64" in said and "shapes: U(5, 3)" in said and "none" not in said


def test_a_setting_made_on_the_wrappers_reaches_what_they_wrap():
    """Reads of a name the wrapper lacks were the model's, writes stayed on the wrapper: ``dp.dropout = 0.5`` trained
    without dropout and read back 0.5."""
    from gpubptt.distributed import ShardedData

    model = gpubptt.RNN(D, 5, K, num_layers=2, backend="numpy", dtype="float64", seed=0)
    dp = DataParallel(model, LocalCommunicator(), batch_size=2)
    dp.dropout = 0.5
    dp.batch_first = True
    new = {k: np.full_like(v, 0.1) for k, v in model.params.items()}
    dp.params = new
    assert model.dropout == 0.5 and dp.dropout == 0.5 and model.batch_first and dp.batch_first
    assert all(np.array_equal(model.params[k], v) for k, v in new.items())
    assert "dropout" not in vars(dp) and "params" not in vars(dp)
    dp.check_every = 7  # the wrapper's own fields stay its own
    assert dp.check_every == 7 and not hasattr(model, "check_every")
    with pytest.raises(AttributeError):
        dp.local_batch = 3  # a property of the wrapper's, without a setter

    class Data:  # what ShardedData wraps: any data set (here one setting)
        chance = 1.0

    data = Data()
    sharded = ShardedData(data, batch_size=2, lo=0, hi=1, comm=LocalCommunicator())
    sharded.chance = 2.0  # a name the wrapper lacks: the data set's
    assert data.chance == 2.0 and "chance" not in vars(sharded)
    sharded.lo = 1  # its own field
    assert sharded.lo == 1 and not hasattr(data, "lo")


def test_a_patch_on_the_wrapper_is_undone_on_the_model_and_a_failed_call_draws_no_masks(monkeypatch):
    from unittest import mock

    model = gpubptt.RNN(D, 5, K, num_layers=2, dropout=0.5, backend="numpy", dtype="float64", seed=0)
    dp = DataParallel(model, LocalCommunicator(), batch_size=B)
    with mock.patch.object(dp, "init", "patched"):  # a plain attribute of the model's
        assert model.init == "patched"
    assert model.init == "wildml" and "init" not in vars(dp)
    dp.extra = 1  # a name neither has: set on the model, and deleted there
    del dp.extra
    assert not hasattr(model, "extra")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(T, B, D)), rng.integers(0, K, (T, B))
    never = DataParallel(copy.deepcopy(model), LocalCommunicator(), batch_size=B)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpubptt.engine.stack.Workspace, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dp.loss_and_grads(x, y)  # the key was drawn from the model's generator before the failure
    monkeypatch.undo()
    with pytest.raises(gpubptt.InputError, match="every length of the global batch"):
        dp.loss_and_grads(x, y, lengths=np.zeros(B, dtype=np.int64), reduction="mean")  # refused after the draw
    (loss, grads), (ref, ref_grads) = dp.loss_and_grads(x, y), never.loss_and_grads(x, y)
    assert float(loss) == float(ref) and all(np.array_equal(grads[k], ref_grads[k]) for k in ref_grads)
