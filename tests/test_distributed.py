"""Data parallelism on fake ranks (threads, in one process): the same gradients and the same model as one process."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from gpubptt import RNN
from gpubptt.cli import app
from gpubptt.distributed import (
    DataParallel,
    FakeGroup,
    LocalCommunicator,
    ParameterDivergenceError,
    make_communicator,
    run_ranks,
    shard_range,
)
from gpubptt.errors import InputError
from gpubptt.training.loop import train
from gpubptt.training.run import new_run, resume_run, save_run

SETTINGS = {"hidden": 16, "batch": 7, "chunk": 16, "dtype": "float64", "clip": 0.5}  # clip: the guard runs too


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-300))


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_fake_allreduce_and_broadcast_equal_numpy_sums_on_every_rank(size):
    bufs = [np.random.default_rng(r).standard_normal(11) for r in range(size)]

    def work(comm):
        a, b = bufs[comm.rank].copy(), bufs[comm.rank].copy()
        comm.allreduce(a)
        comm.broadcast(b, root=size - 1)
        return a, b

    for a, b in run_ranks(size, work):
        np.testing.assert_allclose(a, np.sum(bufs, axis=0), rtol=1e-15)
        assert np.array_equal(b, bufs[size - 1])


@pytest.mark.parametrize("B,size", [(7, 1), (7, 2), (7, 3), (7, 4), (4, 4), (10, 3)])
def test_shards_cover_the_batch_once_in_order_and_differ_by_at_most_one(B, size):
    ranges = [shard_range(B, size, r) for r in range(size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == B
    assert all(ranges[r][1] == ranges[r + 1][0] for r in range(size - 1))
    widths = [hi - lo for lo, hi in ranges]
    assert max(widths) - min(widths) <= 1 and min(widths) >= 1


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grads_over_fake_ranks_match_one_process_with_uneven_splits_and_lengths(size, reduction):
    rng = np.random.default_rng(size)
    T, B, D, H, K = 6, 7, 5, 8, 4
    x, y = rng.integers(0, D, (T, B)), rng.integers(0, K, (T, B))
    s0, lengths = rng.standard_normal((B, H)), rng.integers(0, T + 1, B)
    lengths[0] = T  # at least one counted step
    ref = RNN(D, H, K, backend="numpy", dtype="float64", bias=True, seed=1)
    loss1, grads1, final1 = ref.loss_and_grads(
        x, y, s0, lengths=lengths, reduction=reduction, truncate=3, return_final_state=True
    )

    def work(comm):
        model = RNN(D, H, K, backend="numpy", dtype="float64", bias=True, seed=1 + comm.rank)  # rank 0's weights win
        dp = DataParallel(model, comm, batch_size=B, check_every=1)
        lo, hi = dp.lo, dp.hi
        out = dp.loss_and_grads(
            x[:, lo:hi], y[:, lo:hi], s0[lo:hi], lengths=lengths[lo:hi], reduction=reduction, truncate=3,
            return_final_state=True,
        )  # fmt: skip
        return (lo, hi), out

    results = run_ranks(size, work)
    s0_grad = np.concatenate([out[1]["s0"] for _, out in results])
    final = np.concatenate([out[2] for _, out in results])
    for _, (loss, grads, _) in results:
        assert loss.shape == () and _rel(loss, loss1) <= 1e-12
        for k in ref.params:
            assert _rel(grads[k], grads1[k]) <= 1e-12, k
    assert _rel(s0_grad, grads1["s0"]) <= 1e-12 and _rel(final, final1) <= 1e-12


def _single(steps, settings=SETTINGS):
    run = new_run(settings, backend="numpy", steps=steps, eval_every=10)
    train(run.model, run.data, run.optimizer, run.config, state=run.state, history=run.history)
    return run


def _ranked(comm, run):
    dp = DataParallel(run.model, comm, batch_size=run.config.batch_size, check_every=5)
    local = dp.local_state(run.state)
    config = dp.local_config(run.config)
    train(dp, dp.shard_data(run.data), run.optimizer, config, state=local, history=run.history, evaluator=dp.evaluate)
    run.state = dp.global_state(local)
    return run


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_training_over_fake_ranks_gives_the_model_of_one_process(size):
    ref = _single(40)
    runs = run_ranks(size, lambda comm: _ranked(comm, new_run(SETTINGS, backend="numpy", steps=40, eval_every=10)))
    for run in runs:
        for k in ref.model.params:
            assert _rel(run.model.params[k], ref.model.params[k]) <= 1e-9, k
        assert _rel(run.state.s, ref.state.s) <= 1e-9  # the carried state of all B streams, in order
        assert _rel(run.history.loss, ref.history.loss) <= 1e-9
        assert _rel(run.history.eval_loss, ref.history.eval_loss) <= 1e-9  # evaluation split over ranks
        assert run.history.eval_step == ref.history.eval_step and run.state.step == ref.state.step


@pytest.mark.parametrize("first,then", [(2, 3), (3, 1), (1, 4)])
def test_a_run_saved_by_n_ranks_resumes_under_m_ranks_as_one_run(tmp_path, first, then):
    ref = _single(40)
    path = tmp_path / "ck.npz"

    def part1(comm):
        run = _ranked(comm, new_run(SETTINGS, backend="numpy", steps=20, eval_every=10))
        if comm.rank == 0:
            save_run(path, run)
        comm.barrier()

    run_ranks(first, part1)
    runs = run_ranks(then, lambda comm: _ranked(comm, resume_run(path, backend="numpy", steps=40, eval_every=10)))
    for k in ref.model.params:
        assert _rel(runs[-1].model.params[k], ref.model.params[k]) <= 1e-9, k
    assert _rel(runs[-1].state.s, ref.state.s) <= 1e-9


def test_more_ranks_than_streams_are_refused_naming_both_numbers():
    def work(comm):
        DataParallel(RNN(3, 4, 3, backend="numpy", seed=0), comm, batch_size=2)

    with pytest.raises(InputError, match=r"3 ranks need at least 3 streams.*B=2"):
        run_ranks(3, work)


def test_ranks_with_different_options_are_refused_before_training():
    def work(comm):
        DataParallel(RNN(3, 4, 3, backend="numpy", seed=0), comm, batch_size=4, fingerprint=f"lr={comm.rank}")

    with pytest.raises(InputError, match=r"ranks \[1\] were started with options"):
        run_ranks(2, work)


def test_rank_zero_parameters_are_broadcast_and_a_drifted_rank_is_caught():
    def work(comm):
        model = RNN(3, 4, 3, backend="numpy", dtype="float64", seed=comm.rank)  # different weights on each rank
        dp = DataParallel(model, comm, batch_size=4, check_every=1)
        start = {k: v.copy() for k, v in model.params.items()}
        dp.check_parameters()  # identical after the broadcast: no error
        if comm.rank == 1:
            model.params["W"][0, 0] += 1e-12  # what a rank that updated differently would hold
        dp.check_parameters()
        return start

    ref = RNN(3, 4, 3, backend="numpy", dtype="float64", seed=0).params
    with pytest.raises(ParameterDivergenceError, match=r"ranks \[1\] differ from rank 0"):
        run_ranks(2, work)

    def fresh(comm):
        dp = DataParallel(RNN(3, 4, 3, backend="numpy", dtype="float64", seed=comm.rank), comm, batch_size=4)
        return {k: v.copy() for k, v in dp.params.items()}

    starts = run_ranks(2, fresh)
    for s in starts:
        assert all(np.array_equal(s[k], ref[k]) for k in ref)


def test_a_fake_rank_that_raises_does_not_leave_the_others_waiting():
    def work(comm):
        if comm.rank == 1:
            raise ValueError("rank one broke")
        comm.allreduce(np.zeros(3))  # would wait for rank 1 forever without the broken barrier

    with pytest.raises(ValueError, match="rank one broke"):
        run_ranks(3, work)


@pytest.mark.parametrize(
    "buf,match",
    [(np.zeros((2, 2)), "1-d"), (np.zeros(3, dtype=np.int64), "float32 or float64"), (np.zeros(6)[::2], "contiguous")],
)
def test_a_bad_buffer_is_refused_naming_what_was_expected(buf, match):
    with pytest.raises(InputError, match=match):
        LocalCommunicator().allreduce(buf)
    with pytest.raises(InputError, match=match):
        FakeGroup(1).comm(0).allreduce(buf)


def test_an_unknown_distributed_kind_is_refused():
    with pytest.raises(InputError, match="expected one of none, mpi, nccl"):
        make_communicator("gloo")


def test_cli_refuses_distributed_none_under_an_mpi_launcher(tmp_path):
    result = CliRunner().invoke(
        app, ["train", "--steps", "1", "--checkpoint", str(tmp_path / "c.npz")], env={"PMI_SIZE": "2"}
    )
    assert result.exit_code == 2 and "--distributed is none" in result.output and not (tmp_path / "c.npz").exists()


def _nccl_or_skip():
    from .conftest import cupy_unavailable_reason

    reason = cupy_unavailable_reason()
    if reason:
        pytest.skip(f"cupy backend unavailable: {reason}")
    from gpubptt.distributed.nccl import NCCLCommunicator

    try:
        return NCCLCommunicator()  # size 1: the unique id is drawn locally, no MPI
    except InputError as exc:
        pytest.skip(str(exc))


@pytest.mark.gpu
def test_nccl_at_size_one_keeps_cupy_and_numpy_buffers_and_broadcasts():
    comm = _nccl_or_skip()
    import cupy

    for dtype in (cupy.float32, cupy.float64):
        x = cupy.random.default_rng(0).standard_normal(1001).astype(dtype)
        y = x.copy()
        comm.allreduce(y)  # the sum over one rank
        comm.broadcast(y, root=0)
        assert bool((y == x).all())
    h = np.random.default_rng(1).standard_normal(7)
    g = h.copy()
    comm.allreduce(g)  # a host buffer is staged through the device
    assert np.array_equal(g, h)


@pytest.mark.gpu
def test_data_parallel_over_nccl_at_size_one_trains_the_model_of_plain_training_on_the_gpu():
    comm = _nccl_or_skip()
    settings = {**SETTINGS, "batch": 5}

    def plain():
        run = new_run(settings, backend="cupy", steps=20, eval_every=10)
        train(run.model, run.data, run.optimizer, run.config, state=run.state, history=run.history)
        return run

    def parallel():
        run = new_run(settings, backend="cupy", steps=20, eval_every=10)
        dp = DataParallel(run.model, comm, batch_size=5, check_every=5)
        config = dp.local_config(run.config)
        train(dp, dp.shard_data(run.data), run.optimizer, config, history=run.history, evaluator=dp.evaluate)
        return run

    ref, got = plain(), parallel()
    for k in ref.model.params:
        a, b = ref.model.backend.to_numpy(ref.model.params[k]), got.model.backend.to_numpy(got.model.params[k])
        assert _rel(b, a) <= 1e-9, k
    assert len(ref.history.eval_loss) == 3  # evaluations at steps 0, 10 and 20
    assert _rel(got.history.eval_loss, ref.history.eval_loss) <= 1e-9


def test_a_deep_model_trains_over_fake_ranks_as_in_one_process():
    settings = {**SETTINGS, "layers": 2}  # the carried state is (L, B, H): streams on axis −2
    ref = _single(20, settings)
    assert ref.state.s.ndim == 3
    runs = run_ranks(3, lambda comm: _ranked(comm, new_run(settings, backend="numpy", steps=20, eval_every=10)))
    for run in runs:
        for k in ref.model.params:
            assert _rel(run.model.params[k], ref.model.params[k]) <= 1e-9, k
        assert _rel(run.state.s, ref.state.s) <= 1e-9


def test_an_lstm_trains_over_fake_ranks_as_in_one_process_and_its_h_c_state_is_gathered():
    settings = {**SETTINGS, "cell": "lstm"}
    ref = _single(20, settings)
    assert isinstance(ref.state.s, tuple)  # the carried (h, c)
    runs = run_ranks(2, lambda comm: _ranked(comm, new_run(settings, backend="numpy", steps=20, eval_every=10)))
    for run in runs:
        for k in ref.model.params:
            assert _rel(run.model.params[k], ref.model.params[k]) <= 1e-9, k
        for got, want in zip(run.state.s, ref.state.s, strict=True):
            assert _rel(got, want) <= 1e-9


def test_mean_reduction_scales_an_lstms_c0_gradient_like_s0():
    rng = np.random.default_rng(3)
    T, B, D, H, K = 4, 4, 5, 3, 4
    x, y = rng.integers(0, D, (T, B)), rng.integers(0, K, (T, B))
    h0, c0 = rng.standard_normal((B, H)), rng.standard_normal((B, H))
    ref = RNN(D, H, K, cell="lstm", backend="numpy", dtype="float64", seed=2)
    _, want = ref.loss_and_grads(x, y, (h0, c0), reduction="mean")

    def work(comm):
        dp = DataParallel(RNN(D, H, K, cell="lstm", backend="numpy", dtype="float64", seed=2), comm, batch_size=B)
        lo, hi = dp.lo, dp.hi
        return (lo, hi), dp.loss_and_grads(x[:, lo:hi], y[:, lo:hi], (h0[lo:hi], c0[lo:hi]), reduction="mean")[1]

    results = run_ranks(2, work)
    for key in ("s0", "c0"):
        got = np.concatenate([grads[key] for _, grads in results])
        assert _rel(got, want[key]) <= 1e-12, key


def test_the_memory_budget_reaches_every_ranks_training_loop():
    from gpubptt.cli._distributed import train_data_parallel

    seen = {}

    def loop(*args, **kwargs):
        seen.update(kwargs)

    run = new_run(SETTINGS, backend="numpy", steps=2, eval_every=1)
    dp = run_ranks(1, lambda comm: DataParallel(run.model, comm, batch_size=run.config.batch_size))[0]

    class Reporter:
        on_step = None

    train_data_parallel(dp, run, Reporter(), loop, max_memory=12345)
    assert seen["max_memory"] == 12345


def test_a_global_batch_with_nothing_counted_is_refused_under_mean_as_in_one_process():
    T, B = 4, 5
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 3, (T, B)), rng.integers(0, 3, (T, B))

    def work(comm, lengths):
        dp = DataParallel(RNN(3, 4, 3, backend="numpy", dtype="float64", seed=0), comm, batch_size=B)
        return dp.loss_and_grads(x[:, dp.lo : dp.hi], y[:, dp.lo : dp.hi], lengths=lengths[dp.lo : dp.hi],
                                 reduction="mean")  # fmt: skip

    with pytest.raises(InputError, match="every length of the global batch is 0"):  # was: NaN on every rank
        run_ranks(2, lambda comm: work(comm, np.zeros(B, dtype=int)))
    some = np.array([0, 0, 0, 2, 0])  # nothing on rank 0, something on rank 1: the global mean is fine
    losses = [float(loss) for loss, _ in run_ranks(2, lambda comm: work(comm, some))]
    ref = RNN(3, 4, 3, backend="numpy", dtype="float64", seed=0).loss(x, y, lengths=some, reduction="mean")
    assert losses == pytest.approx([float(ref)] * 2, rel=1e-12)


def test_shard_range_refuses_a_size_or_rank_that_names_no_rank():
    ranks = r"rank must be an int in \[0, 2\)"
    for size, rank, message in [(0, 0, "size must be an int ≥ 1"), (-1, 0, "size must be an int ≥ 1"),
                                (2, 2, ranks), (2, -1, ranks)]:  # fmt: skip
        with pytest.raises(InputError, match=message):
            shard_range(5, size, rank)
