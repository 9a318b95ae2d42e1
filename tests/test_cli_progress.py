"""Long commands say how far they are; sample streams; Ctrl-C in train saves; --version; whole --help."""

from __future__ import annotations

import itertools

from typer.testing import CliRunner

from gpubptt.cli import app

runner = CliRunner()
VANISH = ["vanish", "--backend", "numpy", "--seq-len", "6", "--hidden", "5", "--batch", "2", "--vocab", "4"]


# -- vanish ------------------------------------------------------------------------------------------
def test_vanish_sweep_reports_each_stage_of_each_radius_through_a_callback():
    from gpubptt import diagnostics

    problem = diagnostics.random_problem(5, 4, 2, 3, backend="numpy", seed=0)
    calls = []
    diagnostics.vanish_sweep(
        problem.model, problem.x, problem.y, [0.5, None], iters=5, progress=lambda *a: calls.append(a)
    )
    stages = diagnostics.VANISH_STAGES
    assert [c[0] for c in calls] == list(range(2 * len(stages) + 1))
    assert all(c[1] == 2 * len(stages) for c in calls)
    assert calls[0][2] == f"ρ=0.5: {stages[0]}" and calls[len(stages)][2] == f"ρ=model: {stages[0]}"
    assert calls[-1][2] == "done"


def test_vanish_prints_one_progress_line_per_radius_on_stderr():
    result = runner.invoke(app, [*VANISH, "--scale", "0.5,2", "--format", "json"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if " measured " in line]
    assert len(lines) == 2 and lines[0].startswith("vanish: ρ=0.5 measured (1/2, ")
    assert lines[1].startswith("vanish: ρ=2 measured (2/2, ")
    assert result.stdout.lstrip().startswith("{")  # stdout stays pure JSON


# -- sample ------------------------------------------------------------------------------------------
TEXT = "to be or not to be, that is the question. " * 40


def _text_checkpoint(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    ck = tmp_path / "ck.npz"
    args = ["--hidden", "8", "--batch", "4", "--chunk", "8", "--steps", "3", "--backend", "numpy"]
    assert runner.invoke(app, ["train", *args, "--data", str(corpus), "--checkpoint", str(ck)]).exit_code == 0
    return ck


def test_sample_chars_yields_the_sample_text_one_character_at_a_time():
    from gpubptt import RNN
    from gpubptt.training.data import Vocab
    from gpubptt.training.sample import sample_chars, sample_text

    vocab = Vocab.from_text("ab c\n")
    model = RNN(len(vocab), 6, len(vocab), backend="numpy", seed=1)
    chars = sample_chars(model, vocab, length=40, seed=3, prime="ab")
    assert next(chars) == "ab"  # available before the rest is drawn
    rest = list(chars)
    assert len(rest) == 40 and all(len(c) == 1 for c in rest)
    assert "ab" + "".join(rest) == sample_text(model, vocab, length=40, seed=3, prime="ab")


def test_sample_chars_checks_its_arguments_before_the_first_character():
    import pytest

    from gpubptt import RNN, InputError
    from gpubptt.training.data import Vocab
    from gpubptt.training.sample import sample_chars

    vocab = Vocab.from_text("abc")
    with pytest.raises(InputError):
        sample_chars(RNN(3, 4, 3, backend="numpy"), vocab, prime="xyz")  # raised by the call, not by next()


def test_sample_streams_and_ctrl_c_keeps_what_was_printed(tmp_path, monkeypatch):
    import gpubptt.cli.sample

    ck = _text_checkpoint(tmp_path)

    def chars(*args, **kwargs):
        yield from "to be"
        raise KeyboardInterrupt

    monkeypatch.setattr(gpubptt.cli.sample, "sample_chars", chars)
    result = runner.invoke(app, ["sample", "--checkpoint", str(ck), "--length", "20"])
    assert result.exit_code == 130
    assert result.stdout == "to be\n" and "interrupted after 5 of 20 characters" in result.stderr


# -- train: Ctrl-C -------------------------------------------------------------------------------------
def _ctrl_c_during_step(monkeypatch, step: int, presses: int) -> None:
    """Press Ctrl-C ``presses`` times while the forward+BPTT of training step ``step`` runs."""
    import signal

    from gpubptt.model import RNN

    real = RNN.loss_and_grads
    calls = [0]

    def loss_and_grads(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            for _ in range(presses):
                signal.raise_signal(signal.SIGINT)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RNN, "loss_and_grads", loss_and_grads)


TASK = ["train", "--backend", "numpy", "--task", "recall", "--delay", "2", "--hidden", "6", "--steps", "20"]


def test_ctrl_c_in_train_saves_the_checkpoint_at_the_step_it_stopped(tmp_path, monkeypatch):
    import signal

    from gpubptt.training.record import load_checkpoint

    ck = tmp_path / "ck.npz"
    _ctrl_c_during_step(monkeypatch, step=3, presses=1)
    result = runner.invoke(app, [*TASK, "--checkpoint", str(ck)])
    assert result.exit_code == 130, result.output
    assert f"interrupted at step 3; saved checkpoint {str(ck)!r} at step 3" in result.stderr
    saved = load_checkpoint(ck, backend="numpy")
    assert saved.state.step == 3 and saved.optimizer.t == 3 and len(saved.history.loss) == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_second_ctrl_c_stops_at_once_and_says_nothing_was_saved(tmp_path, monkeypatch):
    ck = tmp_path / "ck.npz"
    _ctrl_c_during_step(monkeypatch, step=3, presses=2)
    result = runner.invoke(app, [*TASK, "--checkpoint", str(ck)])
    assert result.exit_code == 130, result.output
    assert "interrupted during step 3, before it finished; no checkpoint was saved" in result.stderr
    assert not ck.exists()


def test_second_ctrl_c_while_the_interrupt_saves_waits_for_the_save_and_says_what_it_holds(tmp_path, monkeypatch):
    import signal

    import gpubptt.cli._train_report as report
    from gpubptt.training.record import load_checkpoint

    ck = tmp_path / "ck.npz"
    _ctrl_c_during_step(monkeypatch, step=7, presses=1)  # after the evaluation (and save) at step 5
    real = report.save_run

    def save_run(path, run, **kw):  # the second Ctrl-C lands inside the interrupt's own save
        if run.state.step == 7:
            signal.raise_signal(signal.SIGINT)
        return real(path, run, **kw)

    monkeypatch.setattr(report, "save_run", save_run)
    result = runner.invoke(app, [*TASK, "--eval-every", "5", "--checkpoint", str(ck)])
    assert result.exit_code == 130, result.output
    assert f"interrupted at step 7, and again while saving; {str(ck)!r} keeps step 7" in result.stderr
    assert load_checkpoint(ck, backend="numpy").state.step == 7  # the save finished first, as the message says


# -- --version and --help ------------------------------------------------------------------------------
def test_version_option_prints_the_version():
    import gpubptt

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"gpubptt {gpubptt.__version__}\n"


def test_vanish_help_wraps_whole_paragraphs_without_ragged_breaks():
    result = runner.invoke(app, ["vanish", "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0
    text = result.stdout.split("Usage:", 1)[1].split("\nOptions:", 1)[0]  # the description, before the options
    lines = [line.strip() for line in text.splitlines()[1:]]
    assert "Windows and sequences come from --seed." in " ".join(lines)  # the whole docstring is there
    for line, after in itertools.pairwise(lines):
        if line and after:  # the next line's first word did not fit on this one: no early break
            assert len(line) + 1 + len(after.split()[0]) > 70, (line, after)


def test_ctrl_c_during_the_final_save_says_what_the_file_holds(tmp_path, monkeypatch):
    import signal

    import gpubptt.cli._train_report as report
    from gpubptt.training.record import load_checkpoint

    ck = tmp_path / "ck.npz"
    real, at_20 = report.save_run, []

    def save_run(path, run, **kw):  # Ctrl-C while the save after the loop writes (the loop's own at step 20 first)
        at_20.extend([1] if run.state.step == 20 else [])
        if len(at_20) == 2:
            signal.raise_signal(signal.SIGINT)
        return real(path, run, **kw)

    monkeypatch.setattr(report, "save_run", save_run)
    result = runner.invoke(app, [*TASK, "--eval-every", "0", "--checkpoint", str(ck)])
    assert result.exit_code == 130, result.output
    assert f"interrupted after step 20, while saving; {str(ck)!r} keeps step 20" in result.stderr  # was: silent
    assert load_checkpoint(ck, backend="numpy").state.step == 20
