"""Memory estimates refuse sizes that cannot fit, with the numbers, before anything is allocated."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from gpubptt.backend import get_backend
from gpubptt.cli import app

runner = CliRunner()
GB = 10**9


def test_train_memory_counts_parameters_gradients_and_adam_slots():
    from gpubptt.engine.memory import parameter_count, train_memory

    P = parameter_count(10, 100, 10)
    assert P == 100 * 10 + 100 * 100 + 10 * 100 + 100 + 10
    adam = train_memory(10, 100, 10, T=8, B=4, itemsize=4, slots=2)
    sgd = train_memory(10, 100, 10, T=8, B=4, itemsize=4, slots=0)
    key = "parameters, gradients and optimizer state"
    assert adam.parts[key] == P * 4 * 4 and sgd.parts[key] == P * (8 + 4)  # the float64 host draw dominates
    longer = train_memory(10, 100, 10, T=80, B=4, itemsize=4, slots=2)
    assert longer.parts["forward+BPTT workspaces"] > 9 * adam.parts["forward+BPTT workspaces"]


def test_vanish_memory_grows_with_the_square_of_T():
    from gpubptt.engine.memory import vanish_memory

    small = vanish_memory(4, 8, 4, T=10_000, B=1, itemsize=8)
    large = vanish_memory(4, 8, 4, T=100_000, B=1, itemsize=8)
    assert large.parts["states and gradient terms"] > 50 * small.parts["states and gradient terms"]  # the (T, T) table


def test_check_fits_names_the_total_its_parts_and_what_is_available():
    from gpubptt.engine.memory import InsufficientMemoryError, MemoryEstimate, check_fits
    from gpubptt.errors import InputError

    est = MemoryEstimate({"parameters": 40 * GB, "workspaces": 40 * GB})
    with pytest.raises(
        InsufficientMemoryError,
        match=r"^H=9 needs about 80\.0 GB \(parameters 40\.0 GB, workspaces 40\.0 GB\), but 21\.3 GB is available$",
    ):
        check_fits(est, int(21.3 * GB), "H=9")
    assert issubclass(InsufficientMemoryError, InputError)
    check_fits(est, None, "H=9")  # unknown: no check
    check_fits(est, 80 * GB, "H=9")


def test_numpy_backend_reports_available_host_memory():
    avail = get_backend("numpy").available_memory()
    assert isinstance(avail, int) and avail > 0


@pytest.fixture
def little_memory(monkeypatch):
    """The NumPy backend reports 2 GB available."""
    monkeypatch.setattr(type(get_backend("numpy")), "available_memory", lambda self: 2 * GB)


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--hidden", "1000000"], "--hidden 1000000"),
        (["--task", "recall", "--batch", "100000000000"], "--batch 100000000000"),
        (["--task", "copy", "--delay", "100000000", "--hidden", "8", "--batch", "4"], "task sequences"),
    ],
)
def test_train_sizes_that_cannot_fit_are_refused_with_the_numbers(tmp_path, little_memory, args, flag):
    ck = tmp_path / "ck.npz"
    result = runner.invoke(app, ["train", "--backend", "numpy", "--checkpoint", str(ck), *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and flag in result.output
    assert "needs about" in result.output and "but 2.0 GB is available" in result.output
    assert "Traceback" not in result.output and not ck.exists()


@pytest.mark.parametrize(
    "args",
    [["--seq-len", "100000000000"], ["--hidden", "10000000"], ["--batch", "100000000000"]],
)
def test_vanish_sizes_that_cannot_fit_are_refused_with_the_numbers(little_memory, args):
    result = runner.invoke(app, ["vanish", "--backend", "numpy", *args])
    assert result.exit_code == 2, result.output
    assert "error: diagnosing T=" in result.output and "but 2.0 GB is available" in result.output
    assert "choose a smaller --seq-len" in result.output and "Traceback" not in result.output
    small = runner.invoke(app, ["vanish", "--backend", "numpy", "--seq-len", "6", "--scale", "1.0"])
    assert small.exit_code == 0, small.output  # the same 2 GB is plenty for a small diagnosis


def test_memory_error_during_vanish_is_a_clear_message(monkeypatch):
    from gpubptt import diagnostics

    def sweep(*args, **kwargs):
        raise MemoryError("Unable to allocate 64.0 GiB for an array")

    monkeypatch.setattr(diagnostics, "vanish_sweep", sweep)
    result = runner.invoke(app, ["vanish", "--backend", "numpy", "--seq-len", "6"])
    assert result.exit_code == 1
    assert "error: ran out of memory: Unable to allocate 64.0 GiB" in result.output and "Traceback" not in result.output


def test_memory_error_during_training_is_a_clear_message(tmp_path, monkeypatch):
    import gpubptt.cli.train

    def loop(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(gpubptt.cli.train, "train_loop", loop)
    ck = tmp_path / "ck.npz"
    args = ["--task", "recall", "--delay", "2", "--hidden", "4", "--steps", "3", "--checkpoint", str(ck)]
    result = runner.invoke(app, ["train", "--backend", "numpy", *args])
    assert result.exit_code == 1 and "error: ran out of memory" in result.output
    assert "Traceback" not in result.output and not ck.exists()


def test_format_bytes_uses_decimal_units():
    from gpubptt.engine.memory import format_bytes

    assert [format_bytes(n) for n in (512, 21.3e9, 8e18, 8e21)] == ["512 B", "21.3 GB", "8.0 EB", "8.0e+21 B"]


def test_a_resumed_run_that_cannot_fit_here_is_refused_with_the_numbers(tmp_path, monkeypatch):
    ck = tmp_path / "ck.npz"
    args = ["--task", "recall", "--delay", "2", "--hidden", "4", "--steps", "2", "--checkpoint", str(ck)]
    assert runner.invoke(app, ["train", "--backend", "numpy", *args]).exit_code == 0
    before = ck.read_bytes()
    monkeypatch.setattr(type(get_backend("numpy")), "available_memory", lambda self: 1000)  # a smaller machine
    result = runner.invoke(app, ["train", "--backend", "numpy", "--resume", "--steps", "4", "--checkpoint", str(ck)])
    assert result.exit_code == 2, result.output
    assert "needs about" in result.output and "but 1.0 kB is available" in result.output
    assert "Traceback" not in result.output and ck.read_bytes() == before


def test_the_estimate_uses_what_training_runs_not_what_was_typed(little_memory):
    from gpubptt.training.run import new_run

    # a window past the sequence is full BPTT, and a chunk past the sequence is the whole sequence:
    # neither costs more than the sequence itself (both were estimated at 10**9 steps)
    run = new_run({"task": "recall", "delay": 2, "hidden": 4, "truncate": 10**9}, backend="numpy", steps=1)
    assert run.config.truncate == 10**9
    run = new_run({"task": "recall", "delay": 2, "hidden": 4, "chunk": 10**9}, backend="numpy", steps=1)
    assert run.config.chunk == 10**9


def test_a_workspace_dropped_from_the_cache_is_freed_at_once_not_by_the_cycle_collector():
    import gc

    import numpy as np

    from gpubptt import RNN
    from gpubptt.engine.stack import Workspace

    model = RNN(4, 6, 4, backend="numpy", seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 4, (12, 3)), rng.integers(0, 4, (12, 3))
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()  # what reference counting alone frees
    try:
        for k in range(1, 12):  # a workspace per truncation window; the model keeps the last few
            model.loss_and_grads(x, y, truncate=k)
        alive = [o for o in gc.get_objects() if type(o) is Workspace and o.model is model]  # no dead proxy touched
    finally:
        if enabled:
            gc.enable()
    assert len(alive) <= 4, len(alive)


def _traced_training(settings: dict, monkeypatch) -> tuple[int, int]:
    """(the run's memory estimate, the traced peak of building and training it for two steps with evaluation)."""
    import gc
    import tracemalloc

    from gpubptt.training import sizing
    from gpubptt.training.loop import train
    from gpubptt.training.run import new_run

    seen = []
    real = sizing.check_fits
    monkeypatch.setattr(
        sizing, "check_fits", lambda est, available, what: (seen.append(est.total), real(est, available, what))
    )
    warm = new_run(settings, backend="numpy", steps=2, eval_every=1)  # imports, compiled kernels: outside the trace
    train(warm.model, warm.data, warm.optimizer, warm.config)
    del warm
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    run = new_run(settings, backend="numpy", steps=2, eval_every=1)
    train(run.model, run.data, run.optimizer, run.config)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return seen[-1], peak


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_the_training_estimate_counts_a_gated_cells_evaluation(cell, monkeypatch):
    """Evaluation's forward keeps the gated cell's buffers for the held-out batch: they were left out (3-4x)."""
    estimate, peak = _traced_training(
        {"task": "copy", "hidden": 16, "batch": 8, "delay": 10, "cell": cell}, monkeypatch
    )
    assert peak <= 1.2 * estimate, (peak, estimate)


def test_the_training_estimate_counts_the_corpus_and_its_streams(tmp_path, monkeypatch):
    """A text run holds the corpus's int64 ids and each epoch's whole-stream x and y: they were left out."""
    corpus = tmp_path / "big.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 9000, encoding="utf-8")  # 405 000 characters
    settings = {"task": "text", "hidden": 16, "batch": 8, "chunk": 20, "data": str(corpus)}
    estimate, peak = _traced_training(settings, monkeypatch)
    assert peak <= 1.2 * estimate, (peak, estimate)
