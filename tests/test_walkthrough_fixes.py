"""What a user meets on the documented paths, each failing before its fix: a closed stdout lost train's summary with
exit 0; a new run named like another run's best-model file was told to --force over that run's last checkpoint;
NaN in padded steps' regression targets was refused; the examples accepted sizes they cannot run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import gpubptt
from gpubptt.cli import app

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--steps", "2", "--hidden", "8", "--batch", "4", "--chunk", "8", "--eval-every", "2", "--backend", "numpy"]


def test_a_closed_stdout_is_an_error_and_train_says_its_checkpoint_was_saved(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "gpubptt", "train", *TINY, "--checkpoint", "ck.npz"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, capture_output=False,
                         stderr=subprocess.PIPE, text=True, timeout=300, close_fds=True,
                         preexec_fn=lambda: os.close(1))  # fmt: skip  # stdout closed, as `>&-` leaves it
    assert run.returncode == 3 and "stdout is closed; the checkpoint 'ck.npz' was saved at step 2" in run.stderr
    assert (tmp_path / "ck.npz").exists()
    info = subprocess.run([sys.executable, "-m", "gpubptt", "info"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=300, preexec_fn=lambda: os.close(1))  # fmt: skip
    assert info.returncode == 1 and "could not write to stdout: stdout is closed" in info.stderr


def test_a_new_run_may_not_take_another_runs_best_model_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["train", *TINY, "--checkpoint", "m.best.npz"])
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert "a name ending in .best.npz is where the run at --checkpoint 'm.npz' keeps its best model" in said
    assert not list(tmp_path.iterdir())
    assert runner.invoke(app, ["train", *TINY, "--checkpoint", "m.npz"]).exit_code == 0
    assert (tmp_path / "m.best.npz").exists()  # the name is the run's own best model


def test_regression_targets_of_padded_steps_may_hold_nan():
    rng = np.random.default_rng(0)
    model = gpubptt.RNN(3, 6, 4, backend="numpy", dtype="float64", seed=0)
    x, lengths = rng.normal(size=(5, 2, 3)), np.array([3, 5])
    y = rng.normal(size=(5, 2, 4))
    want_loss, want = model.loss_and_grads(x, y, lengths=lengths, head="mse")
    y[3:, 0] = np.nan  # sequence 0 has 3 steps: its targets past them are padding
    loss, got = model.loss_and_grads(x, y, lengths=lengths, head="mse")
    assert loss == want_loss and all(np.array_equal(got[k], want[k]) for k in want)
    y[2, 0, 1] = np.nan  # a counted step's target is still checked
    with pytest.raises(gpubptt.InputError, match="targets y contains NaN"):
        model.loss_and_grads(x, y, lengths=lengths, head="mse")


@pytest.mark.parametrize(("name", "args"), [("sequence_classification", ["--steps", "-1"]),
                                            ("torch_long_sequence", ["--T", "0"])])  # fmt: skip
def test_the_examples_refuse_sizes_they_cannot_run(name, args, capsys):
    if name == "torch_long_sequence":
        pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as info:
        module.main(args)
    assert info.value.code == 2 and "must be at least 1" in capsys.readouterr().err
