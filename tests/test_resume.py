"""Resuming `gpubptt train`: a changed training text is noticed, --data paths are compared as files,
and a resume with nothing to do leaves the checkpoint as it was."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from typer.testing import CliRunner

from gpubptt.cli import app
from gpubptt.training.record import load_checkpoint

runner = CliRunner()
TEXT = "to be or not to be, that is the question. " * 40
TINY = ["--hidden", "12", "--batch", "4", "--chunk", "8", "--backend", "numpy", "--eval-every", "5"]


def _train(*args):
    return runner.invoke(app, ["train", *TINY, *map(str, args)])


def _resume(ck, *args):
    return runner.invoke(app, ["train", "--resume", "--checkpoint", str(ck), "--backend", "numpy", *map(str, args)])


def _edit_meta(path, edit):
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["meta"] = np.array(json.dumps(edit(json.loads(str(arrays["meta"])))))
    np.savez(path, **arrays)


def test_a_changed_text_is_refused_unless_accepted(tmp_path):
    corpus, ck = tmp_path / "corpus.txt", tmp_path / "ck.npz"
    corpus.write_text(TEXT, encoding="utf-8")
    assert _train("--data", corpus, "--steps", 5, "--checkpoint", ck).exit_code == 0
    changed = TEXT.replace("question", "tuestion")  # same characters, same size, other content
    corpus.write_text(changed, encoding="utf-8")
    raw = ck.read_bytes()

    refused = _resume(ck, "--steps", 10)
    assert refused.exit_code == 2, refused.output
    message = refused.output
    assert "corpus.txt" in message and "--accept-changed-data" in message
    assert hashlib.sha256(TEXT.encode()).hexdigest()[:12] in message
    assert hashlib.sha256(changed.encode()).hexdigest()[:12] in message
    assert ck.read_bytes() == raw

    accepted = _resume(ck, "--steps", 10, "--accept-changed-data")
    assert accepted.exit_code == 0, accepted.output
    data = load_checkpoint(ck, backend="numpy").data
    assert data["sha256"] == hashlib.sha256(changed.encode()).hexdigest()  # the new text is recorded
    assert data["size_bytes"] == len(changed.encode())
    corpus.write_text(TEXT + "Z", encoding="utf-8")  # a character the model has never seen
    raw = ck.read_bytes()
    result = _resume(ck, "--steps", 12, "--accept-changed-data")
    assert result.exit_code == 2 and "corpus.txt" in result.output and "character 'Z'" in result.output
    assert "keeps the vocabulary it was trained with" in result.output and ck.read_bytes() == raw


def test_a_checkpoint_without_a_digest_resumes_on_any_text(tmp_path):
    corpus, ck = tmp_path / "corpus.txt", tmp_path / "ck.npz"
    corpus.write_text(TEXT, encoding="utf-8")
    assert _train("--data", corpus, "--steps", 5, "--checkpoint", ck).exit_code == 0
    spec = load_checkpoint(ck, backend="numpy").data
    assert spec["sha256"] == hashlib.sha256(TEXT.encode()).hexdigest() and spec["size_bytes"] == len(TEXT)

    def old(meta):  # as written before the digest was recorded
        del meta["data"]["sha256"], meta["data"]["size_bytes"]
        return meta

    _edit_meta(ck, old)
    corpus.write_text(TEXT.replace("question", "tuestion"), encoding="utf-8")
    result = _resume(ck, "--steps", 10)
    assert result.exit_code == 0, result.output


def test_resume_from_another_folder_with_a_relative_data_path(tmp_path, monkeypatch):
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    assert _train("--data", "corpus.txt", "--steps", 5, "--checkpoint", "ck.npz").exit_code == 0
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = _resume("../ck.npz", "--steps", 10)
    assert result.exit_code == 0, result.output
    # the same file by another path is the same --data; another file is not
    same = _resume("../ck.npz", "--steps", 15, "--data", tmp_path / "corpus.txt")
    assert same.exit_code == 0, same.output
    assert _resume("../ck.npz", "--steps", 20, "--data", "../corpus.txt").exit_code == 0
    (tmp_path / "other.txt").write_text(TEXT, encoding="utf-8")
    other = _resume("../ck.npz", "--steps", 25, "--data", "../other.txt")
    assert other.exit_code == 2 and "--data ../other.txt differs" in other.output


def test_an_old_relative_data_path_is_found_beside_the_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "corpus.txt").write_text(TEXT, encoding="utf-8")
    monkeypatch.chdir(run)
    assert _train("--data", "corpus.txt", "--steps", 5, "--checkpoint", "ck.npz").exit_code == 0

    def old(meta):  # an older gpubptt stored --data as given
        meta["data"]["source"] = "corpus.txt"
        return meta

    _edit_meta(run / "ck.npz", old)
    monkeypatch.chdir(tmp_path)  # corpus.txt is not here, but beside the checkpoint
    result = _resume("run/ck.npz", "--steps", 10)
    assert result.exit_code == 0, result.output
    assert load_checkpoint(run / "ck.npz", backend="numpy").data["source"] == str(run / "corpus.txt")


def test_a_resume_with_nothing_to_do_leaves_the_checkpoint_untouched(tmp_path):
    corpus, ck = tmp_path / "corpus.txt", tmp_path / "ck.npz"
    corpus.write_text(TEXT, encoding="utf-8")
    assert _train("--data", corpus, "--steps", 5, "--checkpoint", ck).exit_code == 0
    before, raw = os.stat(ck), ck.read_bytes()
    for args in ([], ["--steps", "3"], ["--steps", "5", "--eval-every", "2"]):
        result = _resume(ck, *args)
        assert result.exit_code == 0 and "nothing to do" in result.output, result.output
        after = os.stat(ck)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert ck.read_bytes() == raw


def test_a_resume_keeps_the_runs_own_evaluation_interval_unless_given(tmp_path):
    corpus, ck = tmp_path / "corpus.txt", tmp_path / "ck.npz"
    corpus.write_text(TEXT, encoding="utf-8")
    assert _train("--data", corpus, "--steps", 5, "--checkpoint", ck, "--eval-every", 3).exit_code == 0
    assert _resume(ck, "--steps", 9).exit_code == 0
    ckpt = load_checkpoint(ck)
    assert ckpt.config.eval_every == 3 and ckpt.history.eval_step == [0, 3, 5, 6, 9]  # every 3 steps, and the ends
    assert _resume(ck, "--steps", 12, "--eval-every", 2).exit_code == 0  # given: the new interval applies
    ckpt = load_checkpoint(ck)
    assert ckpt.config.eval_every == 2 and ckpt.history.eval_step[5:] == [10, 12]
    assert _train("--data", corpus, "--steps", 2, "--checkpoint", tmp_path / "z.npz", "--eval-every", 0).exit_code == 0
    result = _resume(tmp_path / "z.npz", "--steps", 4, "--early-stop", 2)  # the run's own 0: nothing to count
    assert result.exit_code == 2 and "--early-stop counts held-out evaluations" in result.output


def test_a_resume_that_stretches_a_schedule_says_how_the_rate_moves(tmp_path):
    from gpubptt.training.loop import learning_rate

    corpus, ck = tmp_path / "corpus.txt", tmp_path / "ck.npz"
    corpus.write_text(TEXT, encoding="utf-8")
    assert (
        _train("--data", corpus, "--steps", 4, "--checkpoint", ck, "--schedule", "cosine", "--lr", 0.01).exit_code == 0
    )
    result = _resume(ck, "--steps", 8)
    assert result.exit_code == 0
    before = learning_rate(4, base_lr=0.01, schedule="cosine", total_steps=4)
    after = learning_rate(4, base_lr=0.01, schedule="cosine", total_steps=8)
    assert f"now spans 8 steps instead of 4: the learning rate at step 5 is {after:.3g}" in result.output
    assert f"would have used {before:.3g}" in result.output
    assert load_checkpoint(ck).history.lr[4] == after  # as the note says
    flat = tmp_path / "flat.npz"  # a constant rate does not depend on the total: nothing to say
    assert _train("--data", corpus, "--steps", 4, "--checkpoint", flat).exit_code == 0
    result = _resume(flat, "--steps", 8)
    assert result.exit_code == 0 and "note:" not in result.output


def test_a_file_without_the_base_rate_resumes_with_lr_given_or_as_the_optimizers(tmp_path):
    from gpubptt.training.loop import train
    from gpubptt.training.run import new_run, save_run

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    for schedule in ("cosine", "constant"):
        run = new_run({"data": corpus, "hidden": 12, "batch": 4, "chunk": 8, "schedule": schedule}, backend="numpy",
                      steps=8, eval_every=4)  # fmt: skip
        train(run.model, run.data, run.optimizer, run.config, state=run.state, history=run.history)
        run.config.lr, run.config.steps = None, 4  # as a configuration that named no rate would be saved
        ck = tmp_path / f"{schedule}.npz"
        save_run(ck, run)
        raw = ck.read_bytes()
        result = _resume(ck, "--steps", 10)
        if schedule == "cosine":  # the loaded optimizer holds the last step's rate, not the base: ask for it
            assert result.exit_code == 2 and "records no base learning rate" in result.output
            assert "give --lr" in result.output
            assert ck.read_bytes() == raw
            result = _resume(ck, "--steps", 10, "--lr", 0.004)
            assert result.exit_code == 0, result.output
            assert load_checkpoint(ck).config.lr == 0.004
        else:  # a constant rate is the optimizer's own
            assert result.exit_code == 0, result.output
            assert load_checkpoint(ck).config.lr == load_checkpoint(ck).optimizer.lr == 3e-3


def test_a_moved_training_text_resumes_from_its_new_path_when_its_digest_matches(tmp_path):
    corpus, ck = tmp_path / "corpus.txt", tmp_path / "ck.npz"
    corpus.write_text(TEXT, encoding="utf-8")
    assert _train("--data", corpus, "--steps", 4, "--checkpoint", ck).exit_code == 0
    (tmp_path / "moved").mkdir()
    moved = corpus.rename(tmp_path / "moved" / "book.txt")
    result = _resume(ck, "--steps", 6)
    assert result.exit_code == 2 and "if it moved, pass --data with its new path" in result.output
    assert _resume(ck, "--steps", 6, "--data", moved).exit_code == 0
    assert load_checkpoint(ck).state.step == 6 and load_checkpoint(ck).data["source"] == str(moved)
    moved.write_text(TEXT + "x", encoding="utf-8")  # the digest still guards it
    (tmp_path / "moved" / "book.txt").rename(tmp_path / "other.txt")
    result = _resume(ck, "--steps", 8, "--data", tmp_path / "other.txt")
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "other.txt', given for the checkpoint's" in said  # not "book.txt has changed"
    assert f"{moved}' (which has moved), is not the text the run was trained on" in said


def test_a_resume_checks_steps_and_the_texts_length_before_training(tmp_path):
    corpus, ck = tmp_path / "corpus.txt", tmp_path / "ck.npz"
    corpus.write_text(TEXT, encoding="utf-8")
    assert _train("--data", corpus, "--steps", 4, "--checkpoint", ck).exit_code == 0
    raw = ck.read_bytes()
    result = _resume(ck, "--steps", 2**63)  # was: trained, then failed at its first save
    assert result.exit_code == 2 and "--steps must be at most" in result.output
    corpus.write_text(TEXT[:20], encoding="utf-8")  # too short for --batch 4 × --chunk 8 now
    result = _resume(ck, "--steps", 6, "--accept-changed-data")
    assert result.exit_code == 2 and "needs at least" in result.output and ck.read_bytes() == raw


def test_a_moved_text_without_a_recorded_digest_needs_accept_and_an_old_task_chunk_is_refused(tmp_path):
    corpus, ck = tmp_path / "corpus.txt", tmp_path / "ck.npz"
    corpus.write_text(TEXT, encoding="utf-8")
    assert _train("--data", corpus, "--steps", 4, "--checkpoint", ck).exit_code == 0
    _edit_meta(ck, lambda m: {**m, "data": {k: v for k, v in m["data"].items() if k not in ("sha256", "size_bytes")}})
    other = tmp_path / "other.txt"
    other.write_text(TEXT.upper(), encoding="utf-8")
    corpus.unlink()
    result = _resume(ck, "--steps", 6, "--data", tmp_path / "nope.txt")
    assert result.exit_code == 2 and "nope.txt does not exist" in result.output
    result = _resume(ck, "--steps", 6, "--data", other)
    assert result.exit_code == 2 and "records no digest" in result.output
    # a recall run saved with a --chunk that does not divide its sequence (before that was refused)
    task = tmp_path / "task.npz"
    args = ["--task", "recall", "--delay", "3", "--steps", "2", "--checkpoint", task]
    assert runner.invoke(app, ["train", "--backend", "numpy", "--hidden", "8", *map(str, args)]).exit_code == 0
    _edit_meta(task, lambda m: {**m, "config": {**m["config"], "chunk": 2}})
    result = _resume(task, "--steps", 4)
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "--chunk 2 does not divide the recall task's sequence" in said
    assert "a resumed run keeps its --chunk: this run cannot continue; start a new run with --chunk 0" in said


def test_a_resume_names_what_the_checkpoint_used_where_it_recorded_no_value(tmp_path):
    corpus, held = tmp_path / "corpus.txt", tmp_path / "held.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    held.write_text(TEXT[:200], encoding="utf-8")
    builtin, fraction, separate = (tmp_path / f"{n}.npz" for n in ("builtin", "fraction", "separate"))
    assert _train("--steps", 2, "--checkpoint", builtin).exit_code == 0
    assert _train("--data", corpus, "--steps", 2, "--checkpoint", fraction).exit_code == 0
    assert _train("--data", corpus, "--val-data", held, "--steps", 2, "--checkpoint", separate).exit_code == 0
    for ck, args, words in (
        (builtin, ("--data", corpus), "which trained on the built-in corpus (no --data)"),
        (fraction, ("--val-data", held), "which held out --val-fraction 0.1 of its text (no --val-data)"),
        (separate, ("--val-fraction", 0.2), f"which held out --val-data {held} (no --val-fraction)"),
    ):
        result = _resume(ck, "--steps", 4, *args)
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and f"differs from the checkpoint, {words}" in said, said
        assert "(None)" not in said


def test_a_resume_refuses_an_option_of_another_task_as_a_new_run_says_it(tmp_path):
    corpus, ck = tmp_path / "corpus.txt", tmp_path / "ck.npz"
    corpus.write_text(TEXT, encoding="utf-8")
    assert _train("--data", corpus, "--steps", 2, "--checkpoint", ck).exit_code == 0
    result = _resume(ck, "--delay", 10)
    assert result.exit_code == 2 and "--delay applies to --task copy or recall, not --task text" in result.output


def test_an_older_checkpoint_with_a_relative_text_path_says_changed_not_moved(tmp_path):
    corpus, ck = tmp_path / "corpus.txt", tmp_path / "ck.npz"
    corpus.write_text(TEXT, encoding="utf-8")
    assert _train("--data", corpus, "--steps", 2, "--checkpoint", ck).exit_code == 0
    _edit_meta(ck, lambda m: {**m, "data": {**m["data"], "source": "corpus.txt"}})  # as older files recorded it
    corpus.write_text(TEXT.replace("question", "tuestion"), encoding="utf-8")
    said = " ".join(_resume(ck, "--steps", 4).output.split())
    assert "text file 'corpus.txt' has changed since the checkpoint was saved" in said and "moved" not in said


def test_a_copy_of_one_symbol_resumes_with_the_options_it_started_with(tmp_path):
    """It is recorded as the recall task; resuming with its own --task copy --copy-length 1 was refused."""
    ck = str(tmp_path / "c1.npz")
    start = ["train", "--task", "copy", "--copy-length", "1", "--delay", "2", "--hidden", "8", "--batch", "4"]
    r = runner.invoke(app, [*start, "--steps", "2", "--checkpoint", ck])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "--resume", "--task", "copy", "--copy-length", "1", "--delay", "2", "--steps", "3",
                            "--checkpoint", ck])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert load_checkpoint(ck, backend="numpy").state.step == 3
    r = runner.invoke(app, ["train", "--resume", "--copy-length", "1", "--steps", "4", "--checkpoint", ck])
    assert r.exit_code == 0, r.output  # its copy length alone: the same
    again = ["train", "--resume", "--task", "copy", "--copy-length", "2", "--steps", "5", "--checkpoint", ck]
    r = runner.invoke(app, again)
    assert r.exit_code == 2 and "--task copy differs from the checkpoint (recall)" in r.output  # another length
    five = str(tmp_path / "c5.npz")
    r = runner.invoke(app, ["train", "--task", "copy", "--copy-length", "5", "--delay", "2", "--hidden", "4",
                            "--batch", "2", "--steps", "1", "--checkpoint", five])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "--resume", "--task", "copy", "--copy-length", "1", "--steps", "2",
                            "--checkpoint", five])  # fmt: skip
    assert r.exit_code == 2 and "--copy-length 1 differs from the checkpoint (5)" in r.output  # in the user's flags
