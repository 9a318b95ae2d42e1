"""Hardening, round two, on the command line: outputs that are one file, bench's options honoured or
refused, one --layers limit, overlong names, looping links, a stdout that cannot be written, and
extreme sampling temperatures.

Each test checks the exit code, the one-line message, and that nothing was trained, measured or
changed. Where a real stdout is needed (``> /dev/full``, ``>> checkpoint``) the command runs in a
subprocess; everything else uses typer's CliRunner.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import gpubptt
from gpubptt import plots
from gpubptt.cli import app
from gpubptt.training.data import Vocab
from gpubptt.training.optim import make_optimizer
from gpubptt.training.run import new_run, save_run
from gpubptt.training.sample import sample_text

runner = CliRunner()
TINY = ["--hidden", "6", "--batch", "4", "--chunk", "8", "--backend", "numpy", "--steps", "2", "--eval-every", "1"]
VANISH = ["vanish", "--backend", "numpy", "--seq-len", "4", "--hidden", "3", "--batch", "2", "--vocab", "4"]
BENCH = ["bench", "--backend", "numpy", "--seq-lens", "4", "--hidden-sizes", "4", "--batch", "2", "--vocab", "5"]
BENCH += ["--repeats", "1", "--warmup", "0"]
LONG = ["bench", "--backend", "numpy", "--recompute", "none,sqrt", "--seq-lens", "6,9", "--fixed-hidden", "4"]
LONG += ["--batch", "2", "--vocab", "5", "--quiet"]
LONG_NAME = "n" * 300  # one path component of 300 bytes: more than the 255 a file system takes


def _checkpoint(path: Path, **model) -> Path:
    """A text run at step 0 saved at ``path`` (the built-in corpus); ``model``: RNN options that replace its model."""
    run = new_run({"hidden": 6, "batch": 4, "chunk": 8}, backend="numpy", steps=1, eval_every=1)
    if model:
        m = gpubptt.RNN(run.model.input_size, 6, run.model.output_size, backend="numpy", dtype="float32", **model)
        run = dataclasses.replace(run, model=m, optimizer=make_optimizer("adam", m, lr=1e-3))
    save_run(path, run)
    return path


def _one_line_error(result, *needles: str) -> None:
    """Exit 2, no traceback (the exception is typer's exit), and an ``error:`` line holding every needle."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    line = next(line for line in result.output.splitlines() if line.startswith("error:"))
    for needle in needles:
        assert needle in line, line


@pytest.fixture
def no_plot_check(monkeypatch):
    """--plot accepted without asking matplotlib (the refusals tested here come first)."""
    monkeypatch.setattr(plots, "plot_unavailable_reason", lambda: None)


def _run(args: list[str], *, stdout, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m gpubptt args`` with a real stdout (a file, /dev/full); stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "gpubptt", *args], stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=cwd,
        timeout=120, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


# -- 1: two outputs (or an output and an input, or stdout) that are one file ----------------------------
@pytest.mark.usefixtures("no_plot_check")
def test_train_checkpoint_and_plot_naming_one_file_are_refused_before_training(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.png").symlink_to(tmp_path / "run.png")
    for plot in (tmp_path / "sub" / ".." / "run.png", tmp_path / "link.png"):  # by `..` and by a link
        args = ["train", *TINY, "--checkpoint", str(tmp_path / "run.png"), "--plot", str(plot)]
        result = runner.invoke(app, args)
        _one_line_error(result, "--checkpoint and --plot name the same file")
        assert "step " not in result.output and not (tmp_path / "run.png").exists()


def test_train_checkpoint_that_is_the_training_text_is_refused_and_the_text_kept(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("to be or not to be " * 50, encoding="utf-8")
    result = runner.invoke(app, ["train", *TINY, "--data", str(text), "--checkpoint", str(text), "--force"])
    _one_line_error(result, "--data and --checkpoint name the same file", "would destroy")
    assert text.read_text(encoding="utf-8") == "to be or not to be " * 50


@pytest.mark.usefixtures("no_plot_check")
def test_vanish_plot_that_is_its_checkpoint_is_refused_and_the_checkpoint_kept(tmp_path):
    ck = _checkpoint(tmp_path / "ck.npz")
    before = ck.read_bytes()
    (tmp_path / "ck.png").symlink_to(ck)
    result = runner.invoke(
        app, ["vanish", "--backend", "numpy", "--checkpoint", str(ck), "--plot", str(tmp_path / "ck.png")]
    )
    _one_line_error(result, "--checkpoint and --plot name the same file")
    assert ck.read_bytes() == before


@pytest.mark.parametrize("command", [["sample", "--length", "20"], ["info"]])
def test_stdout_appending_to_the_checkpoint_read_is_refused(tmp_path, command):
    ck = _checkpoint(tmp_path / "ck.npz")
    before = ck.read_bytes()
    with open(ck, "ab") as out:
        done = _run([*command, "--checkpoint", str(ck)], stdout=out, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "error: --checkpoint and stdout name the same file" in done.stderr and "Traceback" not in done.stderr
    assert ck.read_bytes() == before


# -- 6: bench --recompute honours or refuses each option; no relu GRU; no row ran → exit 1 ---------------
def test_bench_recompute_times_the_cell_and_layers_asked_for_in_json():
    result = runner.invoke(app, [*LONG, "--cell", "gru", "--layers", "2", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["config"]["cell"], data["config"]["num_layers"], data["config"]["nonlinearity"]) == ("gru", 2, None)
    reference = gpubptt.RNN(5, 4, 5, cell="gru", num_layers=2, backend="numpy", dtype="float32", bias=False)
    for row in data["rows"]:  # the estimate of the model timed is that of a two-layer GRU, not a tanh RNN
        policy = None if row["policy"] == "none" else row["policy"]
        assert row["estimate_bytes"] == reference.memory_estimate(row["T"], 2, recompute=policy).total


def test_bench_recompute_quiet_with_an_output_file_prints_no_table(tmp_path):
    out = tmp_path / "r.txt"
    result = runner.invoke(app, [*LONG, "--output", str(out)])  # LONG is --quiet
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and "sqrt" in out.read_text()  # the table went to its file only
    loud = runner.invoke(app, [*(a for a in LONG if a != "--quiet"), "--output", str(tmp_path / "r2.txt")])
    assert loud.exit_code == 0 and "sqrt" in loud.stdout  # without --quiet it is on stdout too


@pytest.mark.parametrize(
    ("option", "needle"),
    [
        (["--bidirectional"], "a bidirectional model cannot recompute"),
        (["--compare", "naive"], "--compare applies to the T and H sweeps"),
        (["--input", "dense"], "--input applies to the T and H sweeps"),
        (["--hidden-sizes", "8,16"], "--hidden-sizes applies to the T and H sweeps"),
        (["--format", "csv"], "--recompute writes a table or json"),
    ],
)
def test_bench_recompute_refuses_what_it_cannot_honour_before_measuring(monkeypatch, option, needle):
    import gpubptt.bench.long as long

    monkeypatch.setattr(long, "long_sweep", lambda *a, **k: pytest.fail("measured before refusing"))
    _one_line_error(runner.invoke(app, [*LONG, *option]), needle)


def test_bench_refuses_a_nonlinearity_for_a_gated_cell():
    for cell in ("gru", "lstm"):
        result = runner.invoke(app, [*BENCH, "--cell", cell, "--nonlinearity", "relu"])
        _one_line_error(result, "--nonlinearity applies to --cell rnn")
    with pytest.raises(ValueError, match="applies to the cells that take one"):
        gpubptt.bench.BenchConfig(cell="gru", nonlinearity="relu")


def test_bench_whose_every_row_ran_out_of_memory_exits_1(monkeypatch, tmp_path):
    import gpubptt.bench.runner as bench_runner

    def out_of_memory(*args, **kwargs):
        raise MemoryError("no room")

    monkeypatch.setattr(bench_runner, "RNN", out_of_memory)
    out = tmp_path / "r.json"
    result = runner.invoke(app, [*BENCH, "--output", str(out), "--quiet"])
    assert result.exit_code == 1, result.output
    assert "error: every configuration ran out of memory" in result.stderr
    assert {row["status"] for row in json.loads(out.read_text())["rows"]} == {"out of memory"}  # still recorded


# -- 7: one --layers limit, checked up front; a bidirectional text model neither trains nor samples -------
@pytest.mark.parametrize(
    "command",
    [["train", *TINY], VANISH, BENCH],
    ids=["train", "vanish", "bench"],
)
def test_layers_above_the_checkpoint_limit_are_refused_before_any_work(tmp_path, command):
    ck = tmp_path / "ck.npz"
    args = [*command, "--layers", "1025"] + (["--checkpoint", str(ck)] if command[0] == "train" else [])
    result = runner.invoke(app, args)
    _one_line_error(result, "--layers must be at most 1024", "got 1025")
    assert not ck.exists() and "step " not in result.output


def test_train_resume_refuses_a_bidirectional_text_model_as_sample_does(tmp_path):
    ck = _checkpoint(tmp_path / "bi.npz", bidirectional=True)
    before = ck.read_bytes()
    resumed = runner.invoke(app, ["train", "--resume", "--checkpoint", str(ck), "--steps", "3"])
    sampled = runner.invoke(app, ["sample", "--checkpoint", str(ck), "--length", "5"])
    _one_line_error(resumed, "reverse direction reads the characters still to come")
    _one_line_error(sampled, "reverse direction reads the characters still to come")
    assert resumed.output.splitlines()[-1] == sampled.output.splitlines()[-1]  # the same rule, the same words
    assert ck.read_bytes() == before


# -- 8: a path component longer than 255 bytes ----------------------------------------------------------
@pytest.mark.parametrize(
    ("command", "option"),
    [
        (["train", *TINY], "--checkpoint"),
        (["train", *TINY], "--data"),
        (["train", *TINY], "--plot"),
        (["sample"], "--checkpoint"),
        (["info"], "--checkpoint"),
        (VANISH, "--plot"),
        (["vanish"], "--checkpoint"),
        (BENCH, "--output"),
        (BENCH, "--plot"),
    ],
)
@pytest.mark.usefixtures("no_plot_check")
def test_a_name_longer_than_255_bytes_is_one_error_line(tmp_path, command, option):
    name = LONG_NAME + (".png" if option == "--plot" else "")
    args = [*command, option, str(tmp_path / name)]
    if command[0] == "train" and option != "--checkpoint":
        args += ["--checkpoint", str(tmp_path / "ck.npz")]
    result = runner.invoke(app, args)
    _one_line_error(result, option, "at most 255 bytes")
    assert list(tmp_path.iterdir()) == []


# -- 9: a stdout that cannot be written -----------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize(
    "command",
    [
        ["sample", "--checkpoint", "ck.npz", "--length", "20"],
        ["info"],
        VANISH,
        BENCH,
    ],
    ids=["sample", "info", "vanish", "bench"],
)
def test_a_full_stdout_is_one_error_line_and_exit_1(tmp_path, command):
    _checkpoint(tmp_path / "ck.npz")
    with open("/dev/full", "w") as full:
        done = _run(command, stdout=full, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    assert "error: could not write to stdout: No space left on device" in done.stderr.splitlines()[-1]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_train_with_a_full_stdout_says_its_checkpoint_was_saved_and_exits_3(tmp_path):
    with open("/dev/full", "w") as full:
        done = _run(["train", *TINY, "--checkpoint", "ck.npz"], stdout=full, cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    last = done.stderr.splitlines()[-1]
    assert "could not write to stdout" in last and "the checkpoint 'ck.npz' was saved at step 2" in last
    assert "Traceback" not in done.stderr
    assert gpubptt.training.record.load_checkpoint(tmp_path / "ck.npz", backend="numpy").state.step == 2


# -- 10: extreme temperatures -----------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["rnn", "gru"])
@pytest.mark.parametrize("tau", [1e-308, 5e-324])
def test_a_vanishing_temperature_samples_the_argmax_of_the_forward_pass(cell, tau):
    vocab = Vocab("abcdefgh")
    model = gpubptt.RNN(8, 16, 8, cell=cell, backend="numpy", dtype="float64", seed=3, init="torch")
    model.params["V"] = model.params["V"] * 40  # logits of several units: z / τ overflowed to ±inf before
    text = sample_text(model, vocab, length=12, temperature=tau, prime="abc")
    ids = list(vocab.encode(text))
    probs = model.forward(np.array(ids[:-1])[:, None]).probs[:, 0]  # every prediction from one forward pass
    np.testing.assert_array_equal(np.argmax(probs[2:], axis=1), ids[3:])


def test_a_huge_temperature_samples_every_character_and_the_cli_accepts_extremes(tmp_path):
    vocab = Vocab("abcd")
    model = gpubptt.RNN(4, 8, 4, cell="gru", backend="numpy", dtype="float64", seed=0)
    text = sample_text(model, vocab, length=400, temperature=1.7e308, seed=1)
    counts = np.array([text.count(ch) for ch in vocab.chars])
    assert counts.sum() == 400 and counts.min() > 60  # about uniform: 100 each
    ck = _checkpoint(tmp_path / "ck.npz")
    for tau in ("1e-308", "5e-324", "1e308"):
        result = runner.invoke(app, ["sample", "--checkpoint", str(ck), "--length", "10", "--temperature", tau])
        assert result.exit_code == 0, result.output


# -- 12: looping and dangling links as --checkpoint --------------------------------------------------------
@pytest.mark.parametrize("kind", ["self", "loop", "dangling into a missing folder"])
def test_a_checkpoint_link_that_loops_or_dangles_is_refused_before_training(tmp_path, kind):
    ck = tmp_path / "ck.npz"
    if kind == "self":
        ck.symlink_to(ck)
    elif kind == "loop":
        ck.symlink_to(tmp_path / "other.npz")
        (tmp_path / "other.npz").symlink_to(ck)
    else:
        ck.symlink_to(tmp_path / "missing" / "ck.npz")
    result = runner.invoke(app, ["train", *TINY, "--checkpoint", str(ck)])
    _one_line_error(result, "--checkpoint", "does not exist" if kind.startswith("dangling") else "loops")
    assert "step " not in result.output and not (tmp_path / "missing").exists()
    if kind != "dangling into a missing folder":
        sampled = runner.invoke(app, ["sample", "--checkpoint", str(ck)])
        _one_line_error(sampled, "--checkpoint", "symbolic link that loops")
