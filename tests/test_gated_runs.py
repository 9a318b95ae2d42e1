"""Gated cells in runs: training with carried (h, c) states, checkpoints that record the cell and resume
exactly, `gpubptt train --cell`, `sample`, and the refusals (a checkpoint of one cell as another, options
that a gated cell does not have)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import gpubptt
from gpubptt.cli import app
from gpubptt.training.data import TextData, Vocab
from gpubptt.training.loop import TrainConfig, train
from gpubptt.training.optim import make_optimizer
from gpubptt.training.record import CheckpointError, load_checkpoint, save_checkpoint

TEXT = "the quick brown fox jumps over the lazy dog. " * 30
runner = CliRunner()


def _trained(steps, cell, **arch):
    data = TextData(TEXT)
    model = gpubptt.RNN(data.input_size, 8, data.output_size, cell=cell, backend="numpy", bias=True, seed=0, **arch)
    opt = make_optimizer("adam", model)
    config = TrainConfig(steps=steps, batch_size=3, chunk=6, eval_every=2)
    state, history = train(model, data, opt, config)
    return data, model, opt, config, state, history


def _save(path, data, model, opt, config, state, history):
    return save_checkpoint(
        path, model, optimizer=opt, vocab=data.vocab, data=data.spec(), config=config, state=state, history=history
    )


@pytest.mark.parametrize("cell,arch", [("gru", {}), ("lstm", {}), ("lstm", dict(num_layers=2, dropout=0.3)),
                                       ("gru", dict(num_layers=2, bidirectional=True))])  # fmt: skip
def test_a_gated_run_round_trips_and_resumes_exactly(tmp_path, cell, arch):
    model = _trained(9, cell, **arch)[1]  # 9 steps straight
    d2, m2, o2, c2, s2, h2 = _trained(5, cell, **arch)  # 5 steps, saved mid-sequence, then 4 more
    carried = s2.s if cell == "lstm" else (s2.s,)
    assert isinstance(s2.s, tuple) == (cell == "lstm") and carried[0] is not None
    _save(tmp_path / "ck.npz", d2, m2, o2, c2, s2, h2)
    with np.load(tmp_path / "ck.npz") as z:
        assert ("carry.c" in z.files) == (cell == "lstm")
        meta = json.loads(str(z["meta"]))["model"]
    assert meta["cell"] == cell and meta["nonlinearity"] is None
    ck = load_checkpoint(tmp_path / "ck.npz", backend="numpy")
    assert ck.model.cell_name == cell and list(ck.model.params) == list(m2.params)
    for a, b in zip(ck.state.s if cell == "lstm" else (ck.state.s,), carried, strict=True):
        np.testing.assert_array_equal(a, b)
    cfg = TrainConfig(**{**vars(ck.config), "steps": 9})
    train(ck.model, d2, ck.optimizer, cfg, state=ck.state, history=ck.history)
    for k, v in model.params.items():
        np.testing.assert_array_equal(ck.model.params[k], v)


def test_an_lstm_checkpoint_without_its_carried_c_is_refused(tmp_path):
    d, m, o, c, s, h = _trained(5, "lstm")
    path = _save(tmp_path / "ck.npz", d, m, o, c, s, h)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "carry.c"}
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"carry\.s without carry\.c"):
        load_checkpoint(tmp_path / "bad.npz", backend="numpy")


def test_a_checkpoint_of_one_cell_relabelled_as_another_is_refused(tmp_path):
    d, m, o, c, s, h = _trained(4, "gru")
    path = _save(tmp_path / "ck.npz", d, m, o, c, s, h)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta["model"]["cell"] = "lstm"
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"W has shape \(24, 8\), 24 rows for H = 8: the gru cell's \(3H\)"):
        load_checkpoint(tmp_path / "bad.npz", backend="numpy")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_train_cell_then_sample_and_resume(tmp_path, corpus, cell):
    ck = tmp_path / "ck.npz"
    args = ["train", "--cell", cell, "--hidden", "12", "--batch", "4", "--chunk", "8", "--backend", "numpy"]
    result = runner.invoke(app, [*args, "--data", str(corpus), "--steps", "30", "--eval-every", "10",
                                 "--checkpoint", str(ck)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert load_checkpoint(ck, backend="numpy").model.cell_name == cell
    out = runner.invoke(app, ["sample", "--checkpoint", str(ck), "--length", "40", "--seed", "3", "--prime", "the"])
    assert out.exit_code == 0, out.output
    text = out.stdout.rstrip("\n")
    assert text.startswith("the") and len(text) == 43 and set(text) <= set(Vocab.from_text(TEXT).chars)
    again = runner.invoke(app, ["sample", "--checkpoint", str(ck), "--length", "40", "--seed", "3", "--prime", "the"])
    assert again.stdout == out.stdout
    other = "lstm" if cell == "gru" else "gru"
    bad = runner.invoke(app, ["train", "--resume", "--checkpoint", str(ck), "--cell", other, "--steps", "40"])
    assert bad.exit_code == 2 and f"--cell {other} differs from the checkpoint ({cell})" in bad.output
    ok = runner.invoke(app, ["train", "--resume", "--checkpoint", str(ck), "--steps", "40", "--backend", "numpy"])
    assert ok.exit_code == 0, ok.output


def test_sampling_a_gated_model_follows_its_forward():
    """The sampler's steps carry the model's own state: after a prime, its next-character distribution is
    the model's forward over the whole prime (checked by drawing with a near-zero temperature)."""
    data = TextData(TEXT)
    model = gpubptt.RNN(data.input_size, 16, data.output_size, cell="lstm", backend="numpy", seed=4, dtype="float64")
    prime = "the quick"
    ids = data.vocab.encode(prime)
    probs = model.forward(np.array(ids)[:, None]).probs[-1, 0]
    text = gpubptt.training.sample.sample_text(model, data.vocab, length=1, temperature=1e-6, prime=prime, seed=0)
    assert text == prime + data.vocab.decode([int(np.argmax(probs))])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--cell", "gru", "--nonlinearity", "relu"], "--nonlinearity applies to --cell rnn"),
        (["--cell", "transformer"], "transformer"),
    ],
)
def test_options_a_gated_cell_lacks_are_refused(tmp_path, args, message):
    result = runner.invoke(app, ["train", "--backend", "numpy", "--checkpoint", str(tmp_path / "c.npz"), *args])
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_bench_cell_measures_the_gated_model_and_counts_its_gates(tmp_path, cell):
    out = tmp_path / "b.json"
    args = ["bench", "--cell", cell, "--seq-lens", "4", "--hidden-sizes", "8", "--backend", "numpy", "--repeats", "1",
            "--warmup", "0", "--input", "dense", "--vocab", "6", "--output", str(out), "--quiet"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    G = {"gru": 3, "lstm": 4}[cell]
    assert rows and all(r["cell"] == cell for r in rows)
    r = rows[0]
    T, B, D, H, K = (r[k] for k in "TBDHK")
    assert r["flops"] == 2 * B * H * T * (G * (2 * D + 3 * H) + 3 * K)


def test_bench_refuses_the_naive_reference_for_a_gated_cell():
    result = runner.invoke(app, ["bench", "--cell", "gru", "--compare", "naive", "--backend", "numpy"])
    assert result.exit_code == 2 and "--cell rnn only" in result.output


@pytest.mark.parametrize("cell", ["gru", "lstm", "indrnn"])
def test_a_float32_gated_model_samples_from_softmax_of_its_logits_at_any_temperature(cell):
    """The step loop drew from log of the float32 softmax: a logit more than ~87 below the largest became
    −690 (1e-300 floored), so at τ = 100 'b' and 'c' came out 0.1 % of the time instead of 21 % and 9 %."""
    from gpubptt.training.data import Vocab
    from gpubptt.training.sample import next_distribution, sample_text

    vocab = Vocab("abc")
    kw = {"init": "torch"} if cell == "indrnn" else {}
    model = gpubptt.RNN(3, 4, 3, cell=cell, backend="numpy", dtype="float32", seed=0, **kw)
    model.params["V"] = np.zeros((3, 4), dtype=np.float32)
    model.params["c"] = np.array([0.0, -120.0, -200.0], dtype=np.float32)
    want = next_distribution(np.array([0.0, -120.0, -200.0]), temperature=100.0)  # 0.70, 0.21, 0.09
    draws = [sample_text(model, vocab, length=1, prime="a", temperature=100.0, seed=i)[-1] for i in range(600)]
    got = np.array([draws.count(ch) for ch in "abc"]) / len(draws)
    assert np.abs(got - want).max() < 0.06  # 600 draws: about 3 standard deviations


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the forward's own overflow (inf − inf), as intended here
def test_sampling_refuses_logits_that_are_not_finite():
    from gpubptt.training.data import Vocab
    from gpubptt.training.sample import next_distribution, sample_text

    model = gpubptt.RNN(3, 4, 3, cell="gru", backend="numpy", seed=0)
    model.params["V"] = np.full((3, 4), np.float32(3e38))  # finite weights whose logits overflow
    with pytest.raises(gpubptt.InputError, match="the logits are not finite"):
        sample_text(model, Vocab("abc"), length=3, prime="a", greedy=True)
    for z in ([0.0, np.nan], [np.inf, 0.0], []):
        with pytest.raises(gpubptt.InputError):
            next_distribution(np.array(z))
