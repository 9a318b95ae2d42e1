"""`gpubptt train` and `gpubptt sample` end to end on tiny sizes, through Typer's CliRunner."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from gpubptt.cli import app
from gpubptt.training.data import Vocab

from .images import assert_png_drawn

runner = CliRunner()
TEXT = "to be or not to be, that is the question. " * 40
TINY = ["--hidden", "12", "--batch", "4", "--chunk", "8", "--backend", "numpy"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _train(*args):
    return runner.invoke(app, ["train", *TINY, *map(str, args)])


def test_train_then_sample_end_to_end(tmp_path, corpus):
    ck = tmp_path / "ck.npz"
    result = _train("--data", corpus, "--steps", 60, "--eval-every", 20, "--checkpoint", ck)
    assert result.exit_code == 0, result.output
    assert ck.exists()
    assert f"chance {math.log(len(set(TEXT))):.3f}" in result.stdout and "held-out loss" in result.stdout
    out = runner.invoke(app, ["sample", "--checkpoint", str(ck), "--length", "80", "--seed", "3"])
    assert out.exit_code == 0, out.output
    text = out.stdout.rstrip("\n")
    assert len(text) == 80 and set(text) <= set(Vocab.from_text(TEXT).chars)
    again = runner.invoke(app, ["sample", "--checkpoint", str(ck), "--length", "80", "--seed", "3"])
    assert again.stdout == out.stdout  # the seed fixes the sample
    primed = runner.invoke(app, ["sample", "--checkpoint", str(ck), "--length", "5", "--prime", "to be"])
    assert primed.exit_code == 0 and primed.stdout.startswith("to be")


def test_existing_checkpoint_is_not_overwritten_without_resume_or_force(tmp_path, corpus):
    ck = tmp_path / "ck.npz"
    assert _train("--data", corpus, "--steps", 5, "--checkpoint", ck).exit_code == 0
    raw = ck.read_bytes()
    result = _train("--data", corpus, "--steps", 5, "--checkpoint", ck)
    assert result.exit_code == 2 and "--resume" in result.output
    assert ck.read_bytes() == raw


def test_resume_continues_and_refuses_changed_settings(tmp_path, corpus):
    ck = tmp_path / "ck.npz"
    assert _train("--data", corpus, "--steps", 10, "--eval-every", 5, "--checkpoint", ck).exit_code == 0
    raw = ck.read_bytes()
    bad = runner.invoke(app, ["train", "--resume", "--checkpoint", str(ck), "--hidden", "16", "--steps", "20"])
    assert bad.exit_code == 2 and "--hidden 16 differs" in bad.output and ck.read_bytes() == raw
    ok = runner.invoke(app, ["train", "--resume", "--checkpoint", str(ck), "--steps", "20", "--backend", "numpy"])
    assert ok.exit_code == 0, ok.output
    assert "step 20:" in ok.stdout


def test_corrupt_checkpoint_is_a_usage_error_and_left_alone(tmp_path):
    ck = tmp_path / "ck.npz"
    ck.write_bytes(b"PK\x03\x04 not really a zip")
    for args in (["sample", "--checkpoint", str(ck)], ["train", "--resume", "--checkpoint", str(ck)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "not a readable gpubptt checkpoint" in result.output
    assert ck.read_bytes() == b"PK\x03\x04 not really a zip"


def test_recall_task_reports_its_chance_level(tmp_path):
    ck = tmp_path / "task.npz"
    result = runner.invoke(
        app,
        [
            "train",
            "--task",
            "recall",
            "--delay",
            "3",
            "--symbols",
            "4",
            "--hidden",
            "8",
            "--steps",
            "20",
            "--backend",
            "numpy",
            "--checkpoint",
            str(ck),
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"chance {math.log(4):.3f} = log 4" in result.stdout and "accuracy" in result.stdout
    out = runner.invoke(app, ["sample", "--checkpoint", str(ck)])
    assert out.exit_code == 2 and "recall task" in out.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hidden", "0"], "--hidden must be an int ≥ 1"),
        (["--chunk", "-1"], "--chunk"),
        (["--lr", "-1"], "lr"),
        (["--optimizer", "lbfgs"], "lbfgs"),
        (["--data", "/no/such/file.txt"], "does not exist"),
        (["--task", "copy", "--data", "x.txt"], "--data applies to --task text only"),
        (["--steps", "5", "--epochs", "1"], "not both"),
    ],
)
def test_bad_options_are_usage_errors(tmp_path, args, message):
    result = runner.invoke(app, ["train", "--backend", "numpy", "--checkpoint", str(tmp_path / "ck.npz"), *args])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "ck.npz").exists()


def test_plot_writes_a_png(tmp_path, corpus):
    pytest.importorskip("matplotlib")
    png = tmp_path / "loss.png"
    result = _train(
        "--data", corpus, "--steps", 10, "--eval-every", 5, "--checkpoint", tmp_path / "ck.npz", "--plot", png
    )
    assert result.exit_code == 0, result.output
    assert_png_drawn(png, 770, 440)  # figsize (7, 4) at 110 dpi


def test_a_task_chunk_that_would_drop_the_targets_is_refused(tmp_path):
    from typer.testing import CliRunner

    from gpubptt.cli import app

    args = ["train", "--task", "recall", "--delay", "3", "--hidden", "8", "--steps", "2", "--backend", "numpy"]
    result = CliRunner().invoke(app, [*args, "--chunk", "2", "--checkpoint", str(tmp_path / "a.npz")])
    assert result.exit_code == 2 and "--chunk 2 does not divide the recall task's sequence of 5 steps" in result.output
    assert not (tmp_path / "a.npz").exists()
    for chunk in ("5", "0", "9"):  # a divisor, whole sequences, longer than the sequence: every target trains
        result = CliRunner().invoke(app, [*args, "--chunk", chunk, "--checkpoint", str(tmp_path / f"{chunk}.npz")])
        assert result.exit_code == 0, result.output
