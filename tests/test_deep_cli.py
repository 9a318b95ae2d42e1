"""Deep models through the command line and the tools around the model: train --layers/--dropout with
resume, sample, info, bench --layers/--bidirectional/--nonlinearity, and the FLOP model of a stack."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import gpubptt
from gpubptt.bench import flops
from gpubptt.cli import app
from gpubptt.training.data import Vocab
from gpubptt.training.record import load_checkpoint
from gpubptt.training.sample import sample_text

runner = CliRunner()
TEXT = "to be or not to be, that is the question. " * 40
TINY = ["--hidden", "12", "--batch", "4", "--chunk", "8", "--backend", "numpy"]


def test_train_layers_and_dropout_then_resume_sample_and_info(tmp_path):
    corpus, ck = tmp_path / "corpus.txt", tmp_path / "ck.npz"
    corpus.write_text(TEXT, encoding="utf-8")
    args = ["train", *TINY, "--data", str(corpus), "--layers", "3", "--dropout", "0.25", "--checkpoint", str(ck)]
    result = runner.invoke(app, [*args, "--steps", "20", "--eval-every", "10"])
    assert result.exit_code == 0, result.output
    model = load_checkpoint(ck, backend="numpy").model
    assert (model.num_layers, model.dropout) == (3, 0.25) and "W_l2" in model.params
    clash = runner.invoke(app, ["train", "--resume", "--checkpoint", str(ck), "--layers", "2", "--steps", "30"])
    assert clash.exit_code != 0 and "--layers 2 differs from the checkpoint (3)" in clash.output
    resumed = runner.invoke(app, ["train", "--resume", "--checkpoint", str(ck), "--steps", "30"])
    assert resumed.exit_code == 0, resumed.output
    assert load_checkpoint(ck, backend="numpy").state.step == 30
    sampled = runner.invoke(app, ["sample", "--checkpoint", str(ck), "--length", "40", "--seed", "1"])
    assert sampled.exit_code == 0 and len(sampled.output.rstrip("\n")) == 40
    info = runner.invoke(app, ["info", "--backend", "numpy", "--json", "--checkpoint", str(ck)])
    described = json.loads(info.output)["model"]
    assert described["num_layers"] == 3 and described["shapes"]["U_l1"] == "12×12"
    assert described["parameters"] == sum(a.size for a in model.params.values())


def test_dropout_without_layers_is_refused_before_any_work(tmp_path):
    ck = tmp_path / "ck.npz"
    result = runner.invoke(app, ["train", *TINY, "--dropout", "0.5", "--steps", "5", "--checkpoint", str(ck)])
    assert result.exit_code != 0 and "give --layers 2 or more" in result.output and not ck.exists()


def test_a_deep_model_samples_what_its_forward_pass_predicts():
    vocab = Vocab("abcdefgh")
    model = gpubptt.RNN(8, 16, 8, num_layers=3, backend="numpy", dtype="float64", seed=4, init="torch")
    text = sample_text(model, vocab, length=12, temperature=1e-4, prime="abc")  # ~ argmax decoding
    ids = list(vocab.encode(text))
    probs = model.forward(np.array(ids[:-1])[:, None]).probs[:, 0]  # every prediction from one forward pass
    np.testing.assert_array_equal(np.argmax(probs[2:], axis=1), ids[3:])


def test_a_bidirectional_model_cannot_sample():
    model = gpubptt.RNN(8, 4, 8, bidirectional=True, backend="numpy")
    with pytest.raises(gpubptt.InputError, match="reverse direction reads the characters still to come"):
        sample_text(model, Vocab("abcdefgh"), length=3)


def test_bench_runs_a_deep_bidirectional_relu_model(tmp_path):
    out = tmp_path / "b.json"
    args = ["bench", "--backend", "numpy", "--seq-lens", "4,8", "--hidden-sizes", "8", "--batch", "3"]
    args += ["--vocab", "16", "--repeats", "1", "--warmup", "0", "--layers", "2", "--bidirectional"]
    result = runner.invoke(app, [*args, "--nonlinearity", "relu", "--output", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    cfg = data["config"]
    assert (cfg["num_layers"], cfg["bidirectional"], cfg["nonlinearity"]) == (2, True, "relu")
    row = data["rows"][0]
    assert row["flops"] == flops(row["T"], 3, 16, 8, 16, tokens=True, num_layers=2, dirs=2)
    naive = runner.invoke(app, [*args, "--compare", "naive"])
    assert naive.exit_code != 0 and "needs --layers 1, one direction" in naive.output


@pytest.mark.parametrize("tokens", [True, False])
def test_flop_model_of_a_stack_counts_every_product(tokens):
    T, B, D, H, K = 7, 3, 5, 4, 6
    for L, dirs in [(1, 1), (2, 1), (3, 2)]:
        n_out = H * dirs
        fwd = bwd = 0
        for layer in range(L):  # per recurrence: forward U x, W s; backward dU, δ W, dW, and ∂E/∂x above layer 0
            d_in = (0 if tokens else D) if layer == 0 else n_out
            dx = 0 if layer == 0 else n_out
            fwd += dirs * (2 * T * B * d_in * H + 2 * T * B * H * H)
            bwd += dirs * (2 * T * B * d_in * H + 4 * T * B * H * H + 2 * T * B * dx * H)
        out_f, out_b = 2 * T * B * n_out * K, 4 * T * B * n_out * K  # logits; dV and ∂E/∂s
        kw = dict(tokens=tokens, num_layers=L, dirs=dirs)
        assert flops(T, B, D, H, K, forward_only=True, **kw) == fwd + out_f
        assert flops(T, B, D, H, K, **kw) == fwd + bwd + out_f + out_b


def test_bench_torch_reference_agrees_on_a_deep_bidirectional_model():
    pytest.importorskip("torch")
    from gpubptt.bench import BenchConfig, run_bench

    cfg = BenchConfig(backends=["numpy"], seq_lens=[6], hidden_sizes=[8], batch=3, D=10, K=10, warmup=0, repeats=1,
                      compare="torch", num_layers=2, bidirectional=True, nonlinearity="relu")  # fmt: skip
    row = run_bench(cfg)["rows"][0]
    errors = row["torch"]["grad_rel_err"]
    assert {"weight_hh_l1_reverse", "weight_ih_l0", "weight"} <= set(errors)
    assert row["torch"]["grads_match"], errors


def test_vanish_measures_a_stack_per_layer_and_through_it(tmp_path):
    from .images import assert_png_drawn

    png = tmp_path / "v.png"
    args = ["vanish", "--backend", "numpy", "--layers", "2", "--hidden", "8", "--seq-len", "12", "--batch", "2"]
    result = runner.invoke(app, [*args, "--scale", "0.5,model", "--format", "json", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [s["radius"] for s in data["scales"]] == [0.5, None]
    rep = data["scales"][0]
    assert [r["layer"] for r in rep["recurrences"]] == [0, 1]
    assert len(rep["through_stack"]["per_layer"]) == 2 and len(rep["recurrences"][0]["step_gradients"]) == 12
    assert abs(rep["recurrences"][1]["spectral_radius"] - 0.5) < 1e-9
    assert_png_drawn(png, 16 * 110, 5 * 110)  # plot_stack's 16 × 5 inches at 110 dpi
    table = runner.invoke(app, [*args, "--bidirectional", "--nonlinearity", "relu", "--scale", "1"])
    assert table.exit_code == 0, table.output
    assert "1 rev" in table.stdout  # one row per recurrence, the reverse ones marked


def test_vanish_architecture_options_describe_the_random_model_only(tmp_path):
    result = runner.invoke(app, ["vanish", "--checkpoint", str(tmp_path / "none.npz"), "--layers", "2"])
    assert result.exit_code != 0


def test_one_recurrence_diagnostics_refuse_a_stack_and_say_what_to_use():
    model = gpubptt.RNN(4, 3, 4, num_layers=2, backend="numpy")
    x = np.zeros((5, 2), dtype=np.int64)
    with pytest.raises(gpubptt.InputError, match=r"use diagnostics\.stack_report"):
        gpubptt.diagnostics.step_gradients(model, x, x)


@pytest.mark.parametrize("extra", [["--layers", "2"], ["--bidirectional"], ["--nonlinearity", "relu"]])
def test_vanish_cells_refuses_the_architecture_options_it_would_ignore(extra):
    result = runner.invoke(app, ["vanish", "--cell", "gru", *extra])
    assert result.exit_code != 0 and "does not apply with --cell" in result.output
