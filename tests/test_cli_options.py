"""`gpubptt train` refuses options it would ignore and speaks in flags, not library argument names."""

from __future__ import annotations

import math
import warnings

import pytest
from typer.testing import CliRunner

import gpubptt.training.loop
import gpubptt.training.optim
import gpubptt.training.run
from gpubptt.cli import app
from gpubptt.errors import InputError

runner = CliRunner()
BASE = ["train", "--backend", "numpy", "--hidden", "8", "--batch", "4"]
QUICK = [*BASE, "--steps", "2"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optimizer", "adam", "--momentum", "0.9"], "--momentum applies to --optimizer sgd"),
        (["--optimizer", "adagrad", "--momentum", "0.5"], "--momentum applies to --optimizer sgd"),
        (["--delay", "5"], "--delay applies to --task copy or recall, not --task text"),
        (["--symbols", "4"], "--symbols applies to --task copy or recall"),
        (["--task", "recall", "--copy-length", "3"], "--copy-length applies to --task copy"),
        (["--accept-changed-data"], "--accept-changed-data applies to --resume only"),
    ],
)
def test_options_the_run_would_ignore_are_refused_by_flag(tmp_path, args, message):
    ck = tmp_path / "ck.npz"
    result = runner.invoke(app, [*QUICK, "--checkpoint", str(ck), *args])
    assert result.exit_code == 2 and f"error: {message}" in result.output, result.output
    assert not ck.exists()


def test_new_run_refuses_momentum_with_adam_and_keeps_it_with_sgd(tmp_path):
    from gpubptt.training.run import new_run

    run = new_run({"optimizer": "sgd", "momentum": 0.9, "hidden": 4}, backend="numpy", steps=1)
    assert run.optimizer.momentum == 0.9
    with pytest.raises(InputError, match="--momentum applies to --optimizer sgd"):
        new_run({"optimizer": "adam", "momentum": 0.9, "hidden": 4}, backend="numpy", steps=1)


@pytest.mark.parametrize(
    "args, message, library_name",
    [
        (["--clip", "-1"], "--clip must be a finite number ≥ 0 (0: off), got -1.0", "max_norm"),
        (["--hidden", "0"], "--hidden must be an int ≥ 1, got 0", "hidden_size"),
        (["--batch", "0"], "--batch must be an int ≥ 1, got 0", "batch_size"),
        (["--warmup", "-2"], "--warmup must be an int ≥ 0, got -2", "error: warmup"),
        (["--eval-every", "-1"], "--eval-every must be an int ≥ 0, got -1", "eval_every"),
        (["--task", "copy", "--epochs", "2"], "--epochs applies to --task text only", "epochs needs"),
        (["--steps", str(2**64)], f"--steps must be at most {2**63 - 1}", "OverflowError"),
        (["--seed", str(2**63)], f"--seed must be at most {2**63 - 1}", "CheckpointError"),
    ],
)
def test_messages_name_the_flag_not_the_library_argument(tmp_path, args, message, library_name):
    steps = [] if "--epochs" in args else ["--steps", "2"]
    result = runner.invoke(app, [*BASE, *steps, "--checkpoint", str(tmp_path / "ck.npz"), *args])
    assert result.exit_code == 2 and f"error: {message}" in result.output, result.output
    assert library_name not in result.output


def _overflowing(tmp_path, *extra):
    args = ["--lr", "1e38", "--optimizer", "sgd", "--clip", "0", "--hidden", "16", "--batch", "4", "--steps", "4"]
    with pytest.MonkeyPatch.context() as mp:  # an lr past LR_MAX, refused up front since, overflows on purpose
        for module in (
            gpubptt.training.run,
            gpubptt.training.loop,
            gpubptt.training.optim,
            gpubptt.training._optim_settings,
        ):
            mp.setattr(module, "LR_MAX", math.inf)
        return runner.invoke(
            app, ["train", "--backend", "numpy", *args, "--checkpoint", str(tmp_path / "ck.npz"), *extra]
        )


def test_nonfinite_step_message_names_the_flags(tmp_path):
    result = _overflowing(tmp_path)
    assert result.exit_code == 1
    assert "clip the gradients (--clip)" in result.output and "(--on-nonfinite skip)" in result.output
    assert "max_norm" not in result.output and "on_nonfinite" not in result.output


def test_numpy_runtime_warnings_stay_out_of_train_and_vanish(tmp_path):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        skipped = _overflowing(tmp_path, "--on-nonfinite", "skip")
        table = runner.invoke(
            app, ["vanish", "--backend", "numpy", "--hidden", "3", "--seq-len", "4", "--scale", "1e300"]
        )
    assert skipped.exit_code == 0 and "steps were skipped for a non-finite loss" in skipped.stdout
    assert table.exit_code == 0 and "inf" in table.stdout  # the overflow is still reported, in the table
    assert [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)] == []


def test_flags_replace_whole_names_only_never_parts_of_a_path():
    from gpubptt.cli._common import in_flags

    message = "max_norm must be > 0 (on_nonfinite='skip'); 'runs/hidden_size_64/max_norm.npz' is missing"
    assert (
        in_flags(message) == "--clip must be > 0 (--on-nonfinite skip); 'runs/hidden_size_64/max_norm.npz' is missing"
    )


def test_train_with_relu_and_a_resume_that_asks_for_tanh_is_refused(tmp_path):
    ck = tmp_path / "ck.npz"
    result = runner.invoke(app, [*QUICK, "--checkpoint", str(ck), "--nonlinearity", "relu"])
    assert result.exit_code == 0, result.output
    assert "nonlinearity='relu'" in result.output
    again = runner.invoke(app, [*BASE, "--steps", "3", "--checkpoint", str(ck), "--resume", "--nonlinearity", "tanh"])
    assert again.exit_code == 2 and "--nonlinearity tanh differs from the checkpoint (relu)" in again.output
