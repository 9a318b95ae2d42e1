"""`gpubptt vanish --checkpoint`: a trained model measured on its own text or task.

Tiny models are trained for a few steps through the library and saved; the references read the
saved weights straight from the .npz (NumPy, float64) and build every step Jacobian densely, so
nothing is compared against the diagnostics' own code.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

import gpubptt
from gpubptt import diagnostics as dg
from gpubptt.cli import app
from gpubptt.training.data import Vocab
from gpubptt.training.loop import train
from gpubptt.training.record import save_checkpoint
from gpubptt.training.run import new_run, save_run
from tests.images import assert_png_drawn
from tests.reference import ref_forward_one

runner = CliRunner()
# not periodic, so a window pins down where it came from; the last 10 % (250 characters) is held out
TEXT = "".join(np.random.default_rng(7).choice(list("abcdefgh ,."), size=2500))
HELD_OUT = TEXT[-250:]


def _trained(path, settings, steps=5):
    """Train a tiny float64 model for a few steps on NumPy and checkpoint it at ``path``."""
    run = new_run({"hidden": 8, "batch": 4, "dtype": "float64", **settings}, backend="numpy", steps=steps)
    train(run.model, run.data, run.optimizer, run.config, state=run.state, history=run.history)
    save_run(path, run)
    return path


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture
def text_ck(tmp_path, corpus):
    return _trained(tmp_path / "text.npz", {"data": str(corpus), "chunk": 8})


@pytest.fixture
def recall_ck(tmp_path):
    return _trained(tmp_path / "recall.npz", {"task": "recall", "delay": 3, "symbols": 4})


def _saved(path):
    """The saved parameters (host float64) and vocabulary, read straight from the archive."""
    with np.load(path, allow_pickle=False) as z:
        params = {k.removeprefix("param."): z[k].astype(np.float64) for k in z.files if k.startswith("param.")}
        chars = "".join(chr(c) for c in z["vocab"]) if "vocab" in z.files else None
    return params, chars


def _dense_product_norms(params, x):
    """Geometric mean over the batch of ‖Π_{j=T−ℓ..T−1} diag(1 − s_j²) W‖₂ for ℓ = 0..T−1, densely."""
    T, B = x.shape
    H = params["W"].shape[0]
    logs = np.zeros((T, B))
    for b in range(B):
        S = ref_forward_one(params, x[:, b], np.zeros(H))  # s_0..s_{T−1}
        P = np.eye(H)
        for lag in range(1, T):
            P = P @ (np.diag(1 - S[T - lag] ** 2) @ params["W"])
            logs[lag, b] = np.log(np.linalg.norm(P, 2))
    return np.exp(logs.mean(axis=1))


def _vanish(*args):
    return runner.invoke(app, ["vanish", "--backend", "numpy", *map(str, args)])


def _finite(values):
    return all(v is not None and math.isfinite(v) for v in values)


# -- text checkpoints -----------------------------------------------------------------------------
def test_cli_vanish_on_a_text_checkpoint_measures_the_trained_W_as_it_is(text_ck):
    result = _vanish("--checkpoint", text_ck, "--format", "json", "--seq-len", 12, "--batch", 3, "--seed", 4)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    params, chars = _saved(text_ck)
    st = data["settings"]
    assert (st["T"], st["H"], st["B"], st["K"], st["step"], st["task"]) == (12, 8, 3, len(chars), 5, "text")
    assert "held-out" in st["data"]
    [row] = data["scales"]  # with a checkpoint the sweep is the model's own W alone
    radius = np.abs(np.linalg.eigvals(params["W"])).max()
    assert row["rescaled"] is False and row["radius"] == pytest.approx(radius, rel=1e-10)
    assert row["products"]["spectral_radius"] == pytest.approx(radius, rel=1e-10)
    assert len(row["products"]["norms"]) == 12 and len(row["contributions"]["norms"]) == 12
    assert _finite(row["products"]["norms"]) and _finite(row["steps"]["total"]) and _finite([row["steps"]["s0"]])
    assert _finite(row["truncation"]["rel_error"]) and row["truncation"]["rel_error"][-1] == 0

    # the same windows from the library, checked against the held-out text and a dense reference
    problem = dg.checkpoint_problem(text_ck, T=12, B=3, seed=4, backend="numpy", dtype="float64")
    x, y = gpubptt.to_numpy(problem.x), gpubptt.to_numpy(problem.y)
    for b in range(3):
        window = "".join(chars[i] for i in x[:, b]) + chars[y[-1, b]]
        assert window in HELD_OUT  # x: T characters of the held-out text; y: each next one
        np.testing.assert_array_equal(y[:-1, b], x[1:, b])
    # the command's power iteration stops once a norm moves by < 1e-5 (relative) per iteration
    np.testing.assert_allclose(row["products"]["norms"], _dense_product_norms(params, x), rtol=1e-4)


def test_cli_vanish_on_a_text_checkpoint_defaults_to_T_30_and_draws_windows_from_the_seed(text_ck):
    first = json.loads(_vanish("--checkpoint", text_ck, "--format", "json", "--seed", 1).stdout)
    again = json.loads(_vanish("--checkpoint", text_ck, "--format", "json", "--seed", 1).stdout)
    other = json.loads(_vanish("--checkpoint", text_ck, "--format", "json", "--seed", 2).stdout)
    assert first["settings"]["T"] == dg.DEFAULT_SEQ_LEN == 30 and first["settings"]["B"] == 8
    assert first["scales"] == again["scales"] and first["scales"] != other["scales"]


def test_cli_vanish_data_file_is_cut_into_windows_in_the_model_vocabulary(tmp_path, text_ck):
    own = tmp_path / "own.txt"
    own.write_text("abc defgh." * 5, encoding="utf-8")  # 50 characters, all in the vocabulary
    result = _vanish("--checkpoint", text_ck, "--data", own, "--format", "json", "--seq-len", 6, "--batch", 4)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["data"] == str(own)
    _, chars = _saved(text_ck)
    problem = dg.checkpoint_problem(text_ck, T=6, B=4, seed=0, backend="numpy", text=own)
    x, y = gpubptt.to_numpy(problem.x), gpubptt.to_numpy(problem.y)
    assert x.shape == y.shape == (6, 4)
    for b in range(4):
        assert "".join(chars[i] for i in x[:, b]) + chars[y[-1, b]] in own.read_text()


def test_cli_vanish_explicit_scale_rescales_the_trained_W(text_ck):
    result = _vanish("--checkpoint", text_ck, "--format", "json", "--seq-len", 8, "--scale", "model,0.5,1.5")
    assert result.exit_code == 0, result.output
    scales = json.loads(result.stdout)["scales"]
    params, _ = _saved(text_ck)
    own = np.abs(np.linalg.eigvals(params["W"])).max()
    assert [s["rescaled"] for s in scales] == [False, True, True]
    np.testing.assert_allclose([s["radius"] for s in scales], [own, 0.5, 1.5], rtol=1e-10)
    np.testing.assert_allclose([s["products"]["spectral_radius"] for s in scales], [own, 0.5, 1.5], rtol=1e-10)
    table = _vanish("--checkpoint", text_ck, "--seq-len", 8, "--scale", "model,0.5")
    rows = table.stdout.strip().splitlines()[1:]
    assert rows[0].split()[:2] == [f"{own:.3f}", "(model)"] and rows[1].split()[0] == "0.5"


def test_cli_vanish_on_a_builtin_corpus_checkpoint_uses_its_held_out_text(tmp_path):
    ck = _trained(tmp_path / "builtin.npz", {"chunk": 8}, steps=2)
    result = _vanish("--checkpoint", ck, "--format", "json", "--seq-len", 5, "--batch", 2)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["data"] == "held-out text of the built-in corpus"


def test_cli_vanish_writes_png_for_a_checkpoint(tmp_path, text_ck):
    pytest.importorskip("matplotlib")
    out = tmp_path / "trained.png"
    result = _vanish("--checkpoint", text_ck, "--seq-len", 8, "--plot", out)
    assert result.exit_code == 0, result.output
    assert_png_drawn(out, 1540, 990)  # figsize (14, 9) at 110 dpi


# -- copy/recall checkpoints ----------------------------------------------------------------------
def test_cli_vanish_on_a_recall_checkpoint_uses_the_task_sequences(recall_ck):
    result = _vanish("--checkpoint", recall_ck, "--format", "json", "--batch", 5)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    params, chars = _saved(recall_ck)
    st = data["settings"]
    assert chars is None and (st["task"], st["T"], st["H"], st["B"], st["D"], st["K"]) == ("recall", 5, 8, 5, 6, 5)
    [row] = data["scales"]
    assert row["radius"] == pytest.approx(np.abs(np.linalg.eigvals(params["W"])).max(), rel=1e-10)
    assert _finite(row["products"]["norms"]) and _finite(row["steps"]["total"])
    problem = dg.checkpoint_problem(recall_ck, B=5, seed=0, backend="numpy")
    x, y = gpubptt.to_numpy(problem.x), gpubptt.to_numpy(problem.y)
    # delayed recall, k = 1, delay 3: symbol, 3 blanks, go (A + 1 = 5); the target is the symbol at the end
    assert ((1 <= x[0]) & (x[0] <= 4)).all() and (x[1:4] == 0).all() and (x[4] == 5).all()
    assert (y[:4] == 0).all() and (y[4] == x[0]).all()
    np.testing.assert_allclose(row["products"]["norms"], _dense_product_norms(params, x), rtol=1e-4)


def test_cli_vanish_recall_checkpoint_refuses_another_length_or_a_text_file(recall_ck, corpus):
    result = _vanish("--checkpoint", recall_ck, "--seq-len", 9)
    assert result.exit_code == 2 and "= 5 steps" in result.output and "T=9" in result.output
    result = _vanish("--checkpoint", recall_ck, "--data", corpus)
    assert result.exit_code == 2 and "recall task" in result.output


# -- bad input: usage errors before any work, nothing touched -------------------------------------
def test_cli_vanish_names_the_first_character_outside_the_vocabulary(tmp_path, text_ck):
    bad = tmp_path / "bad.txt"
    bad.write_text("abc dé fgZ", encoding="utf-8")
    raw = text_ck.read_bytes()
    result = _vanish("--checkpoint", text_ck, "--data", bad, "--seq-len", 3)
    assert result.exit_code == 2
    assert "character 'é' (offset 5) is not in the model's vocabulary" in result.output and str(bad) in result.output
    assert text_ck.read_bytes() == raw


def test_cli_vanish_missing_checkpoint_is_a_usage_error(tmp_path):
    result = _vanish("--checkpoint", tmp_path / "nowhere.npz")
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.parametrize(
    "args,what",
    [
        (["--hidden", "16"], "--hidden"),
        (["--vocab", "16"], "--vocab"),
        (["--init", "torch"], "--init"),
        (["--seq-len", "300"], "need at least 301"),  # longer than the held-out text
        (["--scale", "model,x"], "--scale"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_cli_vanish_checkpoint_bad_options_are_usage_errors(text_ck, args, what):
    result = _vanish("--checkpoint", text_ck, *args)
    assert result.exit_code == 2 and what in result.output


def test_cli_vanish_data_without_checkpoint_is_a_usage_error(corpus):
    result = _vanish("--data", corpus)
    assert result.exit_code == 2 and "--data needs --checkpoint" in result.output


def test_cli_vanish_checkpoint_whose_text_has_gone_asks_for_a_text_file(text_ck, corpus):
    corpus.unlink()
    result = _vanish("--checkpoint", text_ck)
    assert result.exit_code == 2 and "does not exist" in result.output and "give a text file" in result.output


def test_cli_vanish_checkpoint_without_data_description(tmp_path, corpus):
    bare = save_checkpoint(tmp_path / "bare.npz", gpubptt.RNN(4, 3, 4, backend="numpy", seed=0))
    result = _vanish("--checkpoint", bare)
    assert result.exit_code == 2 and "no vocabulary and no copy/recall task" in result.output
    vocab = Vocab.from_text(TEXT)
    model = gpubptt.RNN(len(vocab), 5, len(vocab), backend="numpy", dtype="float64", seed=0)
    with_vocab = save_checkpoint(tmp_path / "vocab.npz", model, vocab=vocab)  # no data spec: --data is needed
    result = _vanish("--checkpoint", with_vocab)
    assert result.exit_code == 2 and "give a text file" in result.output
    result = _vanish("--checkpoint", with_vocab, "--data", corpus, "--format", "json", "--seq-len", 7)
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)["scales"]
    W = gpubptt.to_numpy(model.params["W"])
    assert row["radius"] == pytest.approx(np.abs(np.linalg.eigvals(W)).max(), rel=1e-10)
