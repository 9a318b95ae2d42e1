"""Training conveniences (issue 21, item 3): the best model beside the last, early stopping, a held-out
file or fraction, decoupled weight decay, greedy/top-k/top-p sampling, one bias default, and what
``info --checkpoint`` and the recall task's progress say. CLI through CliRunner, tiny sizes, tmp_path."""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

import gpubptt
import gpubptt.training.loop
from gpubptt.cli import app
from gpubptt.training.data import TextData, Vocab
from gpubptt.training.loop import History, TrainConfig, train
from gpubptt.training.optim import SGD, Adagrad, Adam
from gpubptt.training.record import load_checkpoint, save_checkpoint
from gpubptt.training.run import DEFAULTS, best_path
from gpubptt.training.sample import next_distribution, sample_chars

runner = CliRunner()
TEXT = "to be or not to be, that is the question. " * 40
HELD_OUT = "whether tis nobler in the mind to suffer. "
TINY = ["--hidden", "12", "--batch", "4", "--chunk", "8", "--backend", "numpy"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _train(*args):
    return runner.invoke(app, ["train", *TINY, *map(str, args)])


def _scripted_evaluations(monkeypatch, losses):
    """Replace the held-out evaluation by a script of losses (one per evaluation, step 0 first)."""
    calls = itertools.count()

    def fake(model, data, **kw):
        loss = losses[min(next(calls), len(losses) - 1)]
        return {"loss": loss, "accuracy": 0.5, "chance": data.chance_loss, "loss_all": loss}

    monkeypatch.setattr(gpubptt.training.loop, "evaluate", fake)


# -- the best model beside the last; early stopping ------------------------------------------------------
def test_history_best_is_the_lowest_finite_loss_after_step_0():
    h = History(eval_step=[0, 5, 10, 15, 20], eval_loss=[0.1, 2.0, float("nan"), 1.5, 1.5])
    assert h.best() == (15, 1.5)  # step 0 (untrained) is no candidate; NaN never; the first of equal ones
    assert h.evals_since_best() == 1
    assert History(eval_step=[0], eval_loss=[1.0]).best() is None


def test_early_stop_keeps_the_best_and_the_last_model_and_says_so(tmp_path, corpus, monkeypatch):
    # held-out losses at steps 0, 4, 8, 12, 16: best at step 8, then two evaluations without improvement
    _scripted_evaluations(monkeypatch, [4.0, 3.0, 2.0, 2.5, 2.1, 1.0])
    ck = tmp_path / "ck.npz"
    result = _train("--data", corpus, "--steps", 40, "--eval-every", 4, "--early-stop", 2, "--checkpoint", ck)
    assert result.exit_code == 0, result.output
    assert "early stop at step 16: 2 evaluations without a held-out loss below 2.0000 (step 8)" in result.output
    assert "best model: step 8, held-out 2.0000 nats/char: " in result.stdout
    last, best = load_checkpoint(ck, backend="numpy"), load_checkpoint(best_path(ck), backend="numpy")
    assert best_path(ck) == tmp_path / "ck.best.npz"
    assert (last.state.step, best.state.step) == (16, 8)
    assert last.history.eval_step == [0, 4, 8, 12, 16] and best.history.eval_step == [0, 4, 8]
    # the best file holds the weights of step 8: those of an uninterrupted run stopped there (deterministic)
    monkeypatch.undo()
    ref = tmp_path / "ref.npz"
    assert _train("--data", corpus, "--steps", 8, "--eval-every", 4, "--checkpoint", ref).exit_code == 0
    ref_params = load_checkpoint(ref, backend="numpy").model.params
    for k, p in best.model.params.items():
        np.testing.assert_array_equal(p, ref_params[k])
    # --resume continues from the last model, not the best
    resumed = runner.invoke(app, ["train", "--resume", "--checkpoint", str(ck), "--steps", "20"])
    assert resumed.exit_code == 0, resumed.output
    assert "steps 16 → 20" in resumed.output
    assert load_checkpoint(ck, backend="numpy").state.step == 20


def test_library_early_stop_counts_evaluations_without_improvement(monkeypatch):
    _scripted_evaluations(monkeypatch, [5.0, 3.0, 3.0, 3.5, 2.0])  # step 2 is equal: no improvement
    data = TextData(TEXT)
    model = gpubptt.RNN(data.input_size, 8, data.output_size, backend="numpy", seed=0)
    opt = gpubptt.training.optim.make_optimizer("adam", model)
    events = []
    config = TrainConfig(steps=50, batch_size=2, chunk=8, eval_every=1)
    state, history = train(model, data, opt, config, early_stop=2, callback=events.append)
    assert state.step == 3 and history.eval_step == [0, 1, 2, 3]
    assert [e.best for e in events] == [True, False, False]
    with pytest.raises(gpubptt.InputError, match="early_stop"):
        train(model, data, opt, config, early_stop=0)


def test_the_best_file_is_checked_as_an_output_before_any_work(tmp_path, corpus):
    ck, text = tmp_path / "ck.npz", tmp_path / "ck.best.npz"
    text.write_text(TEXT, encoding="utf-8")  # a text that happens to sit where the best model would go
    result = _train("--data", text, "--steps", 4, "--checkpoint", ck)
    assert result.exit_code == 2 and "--data and --checkpoint's best file name the same file" in result.output
    assert not ck.exists() and text.read_text(encoding="utf-8") == TEXT
    text.unlink()
    # a best file left by another run is never replaced without --force, and --force replaces it
    best_path(ck).write_bytes(b"an earlier run's best model")
    refused = _train("--data", corpus, "--steps", 4, "--checkpoint", ck)
    assert refused.exit_code == 2 and "ck.best.npz' exists" in refused.output and "--force" in refused.output
    assert best_path(ck).read_bytes() == b"an earlier run's best model" and not ck.exists()
    forced = _train("--data", corpus, "--steps", 4, "--eval-every", 2, "--checkpoint", ck, "--force")
    assert forced.exit_code == 0, forced.output
    assert load_checkpoint(best_path(ck), backend="numpy").state.step in (2, 4)
    assert (
        _train("--data", corpus, "--early-stop", 2, "--eval-every", 0, "--checkpoint", tmp_path / "x.npz").exit_code
        == 2
    )


def test_sample_and_vanish_take_the_best_or_the_last_model(tmp_path, corpus, monkeypatch):
    _scripted_evaluations(monkeypatch, [4.0, 1.0, 2.0])  # best at step 2, last at step 4
    ck = tmp_path / "ck.npz"
    assert _train("--data", corpus, "--steps", 4, "--eval-every", 2, "--checkpoint", ck).exit_code == 0
    best = load_checkpoint(best_path(ck), backend="numpy")
    last = load_checkpoint(ck, backend="numpy")
    assert (best.state.step, last.state.step) == (2, 4)
    args = ["sample", "--checkpoint", str(ck), "--length", "30", "--greedy", "--prime", "to "]
    for which, model in (("best", best.model), ("last", last.model), (None, last.model)):
        out = runner.invoke(app, args + ([] if which is None else ["--which", which]))
        assert out.exit_code == 0, out.output
        ids = list(best.vocab.encode(out.stdout.rstrip("\n")))
        probs = model.forward(np.array(ids[:-1])[:, None]).probs[:, 0]  # greedy: each char the argmax
        np.testing.assert_array_equal(np.argmax(probs[2:], axis=1), ids[3:])
    v = runner.invoke(app, ["vanish", "--checkpoint", str(ck), "--which", "best", "--seq-len", "8", "--format", "json"])
    assert v.exit_code == 0, v.output
    assert "ck.best.npz" in v.stdout
    alone = runner.invoke(app, ["vanish", "--which", "best"])
    assert alone.exit_code == 2 and "give --checkpoint" in alone.output
    best_path(ck).unlink()
    missing = runner.invoke(app, [*args, "--which", "best"])
    assert missing.exit_code == 2 and "ck.best.npz' does not exist" in missing.output


# -- a held-out file or fraction ------------------------------------------------------------------------------
def test_val_data_is_the_held_out_text_and_its_digest_is_recorded(tmp_path, corpus):
    val = tmp_path / "val.txt"
    val.write_text(HELD_OUT, encoding="utf-8")
    ck = tmp_path / "ck.npz"
    result = _train("--data", corpus, "--val-data", val, "--steps", 6, "--eval-every", 3, "--checkpoint", ck)
    assert result.exit_code == 0, result.output
    got = load_checkpoint(ck, backend="numpy")
    assert got.data["val_source"] == str(val) and got.data["val_fraction"] is None
    assert got.data["val_sha256"] == hashlib.sha256(HELD_OUT.encode()).hexdigest()
    assert set(got.vocab.chars) == set(TEXT + HELD_OUT)  # the vocabulary covers both texts
    # reference: one stream over the whole held-out file, mean −log ŷ[next char]
    ids = got.vocab.encode(HELD_OUT)
    probs = got.model.forward(ids[:-1, None]).probs[:, 0]
    reference = -np.mean(np.log(probs[np.arange(len(ids) - 1), ids[1:]]))
    assert got.history.eval_loss[-1] == pytest.approx(reference, rel=1e-5)
    # a resume reads it again, and refuses a changed held-out file unless told to accept it
    val.write_text(HELD_OUT + "more. ", encoding="utf-8")
    refused = runner.invoke(app, ["train", "--resume", "--checkpoint", str(ck), "--steps", "9"])
    assert refused.exit_code == 2 and "val.txt" in refused.output and "has changed" in refused.output
    accepted = runner.invoke(
        app, ["train", "--resume", "--checkpoint", str(ck), "--steps", "9", "--accept-changed-data"]
    )
    assert accepted.exit_code == 0, accepted.output


def test_val_fraction_holds_out_that_part_and_the_tasks_refuse_both_by_name(tmp_path, corpus):
    ck = tmp_path / "ck.npz"
    assert _train("--data", corpus, "--val-fraction", 0.3, "--steps", 2, "--checkpoint", ck).exit_code == 0
    got = load_checkpoint(ck, backend="numpy")
    assert got.data["val_fraction"] == 0.3
    resumed = runner.invoke(
        app, ["train", "--resume", "--checkpoint", str(ck), "--steps", "3", "--val-fraction", "0.2"]
    )
    assert resumed.exit_code == 2 and "--val-fraction 0.2 differs" in resumed.output
    for args, message in [
        (["--task", "recall", "--val-fraction", "0.2"], "--val-fraction applies to --task text only"),
        (["--task", "copy", "--val-data", str(corpus)], "--val-data applies to --task text only"),
        (["--data", str(corpus), "--val-data", str(corpus), "--val-fraction", "0.2"], "not both"),
        (["--data", str(corpus), "--val-fraction", "1.5"], "--val-fraction must be a number in (0, 1)"),
    ]:
        result = _train(*args, "--steps", 2, "--checkpoint", tmp_path / "no.npz")
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "no.npz").exists()


# -- weight decay -------------------------------------------------------------------------------------------
LR, DECAY = 0.1, 0.3


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        # AdamW, one step by hand: m̂ = g, v̂ = g², θ ← θ(1 − lr·λ) − lr·g/(|g| + ε)
        (
            lambda p, be: Adam(p, lr=LR, weight_decay=DECAY, eps=1e-8, backend=be),
            lambda th, g: th * (1 - LR * DECAY) - LR * g / (abs(g) + 1e-8),
        ),
        # plain SGD: the same as the gradient of the L2 penalty λ/2·‖θ‖² added to the loss
        (lambda p, be: SGD(p, lr=LR, weight_decay=DECAY, backend=be), lambda th, g: th - LR * (g + DECAY * th)),
        (
            lambda p, be: Adagrad(p, lr=LR, weight_decay=DECAY, eps=1e-8, backend=be),
            lambda th, g: th * (1 - LR * DECAY) - LR * g / np.sqrt(g * g + 1e-8),
        ),
    ],
    ids=["adamw", "sgd", "adagrad"],
)
def test_decoupled_weight_decay_matches_one_step_by_hand(make, expected, be):
    rng = np.random.default_rng(0)
    theta0, g = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    params = {"W": be.asarray(theta0.copy())}  # NumPy: asarray would not copy, and the update is in place
    assert make(params, be).step({"W": be.asarray(g)}).applied
    np.testing.assert_allclose(be.to_numpy(params["W"]), expected(theta0, g), rtol=1e-12, atol=1e-15)


def test_adamw_matches_torch_over_three_steps():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    theta0, grads = rng.normal(size=(5,)), [rng.normal(size=(5,)) for _ in range(3)]
    params = {"W": theta0.copy()}
    opt = Adam(params, lr=LR, weight_decay=DECAY)
    w = torch.tensor(theta0, requires_grad=True)
    ref = torch.optim.AdamW([w], lr=LR, weight_decay=DECAY, eps=1e-8)
    for g in grads:
        opt.step({"W": g})
        w.grad = torch.tensor(g)
        ref.step()
    np.testing.assert_allclose(params["W"], w.detach().numpy(), rtol=1e-12)


def test_weight_decay_is_an_optimizer_setting_of_the_checkpoint(tmp_path, corpus):
    ck = tmp_path / "ck.npz"
    assert _train("--data", corpus, "--weight-decay", 0.01, "--steps", 2, "--checkpoint", ck).exit_code == 0
    got = load_checkpoint(ck, backend="numpy")
    assert got.optimizer.weight_decay == 0.01 and got.meta["optimizer"]["weight_decay"] == 0.01
    differs = runner.invoke(app, ["train", "--resume", "--checkpoint", str(ck), "--steps", "3", "--weight-decay", "0"])
    assert differs.exit_code == 2 and "--weight-decay 0.0 differs" in differs.output
    bad = _train("--data", corpus, "--weight-decay", -1, "--checkpoint", tmp_path / "no.npz")
    assert bad.exit_code == 2 and "--weight-decay must be a finite number ≥ 0" in bad.output
    # without decay nothing new is written: files stay readable by a gpubptt that never knew of it
    model = gpubptt.RNN(3, 4, 3, backend="numpy", seed=0)
    save_checkpoint(tmp_path / "plain.npz", model, optimizer=Adam(model))
    assert "weight_decay" not in load_checkpoint(tmp_path / "plain.npz", backend="numpy").meta["optimizer"]


# -- greedy, top-k, top-p ----------------------------------------------------------------------------------
def _reference_distribution(z, tau, k, p):
    """Written out by sorting, independently of the library: softmax(z/τ), the k best (ties kept), then the
    nucleus: the most likely, one by one, until their mass reaches p."""
    probs = [math.exp((zi - max(z)) / tau) for zi in z]
    if k is not None:
        kth = sorted(probs, reverse=True)[k - 1]
        probs = [q if q >= kth else 0.0 for q in probs]
    total = sum(probs)
    probs = [q / total for q in probs]
    if p is not None:
        kept, mass = [], 0.0
        for i in sorted(range(len(probs)), key=lambda i: (-probs[i], i)):
            if mass >= p:
                break
            kept.append(i)
            mass += probs[i]
        probs = [q if i in kept else 0.0 for i, q in enumerate(probs)]
        total = sum(probs)
        probs = [q / total for q in probs]
    return np.array(probs)


@pytest.mark.parametrize(
    ("tau", "k", "p"), [(1.0, None, None), (0.7, 3, None), (1.3, None, 0.6), (0.9, 4, 0.8), (2.0, 1, None)]
)
def test_next_distribution_matches_a_reference_written_by_sorting(tau, k, p):
    z = np.random.default_rng(7).normal(size=9) * 2
    np.testing.assert_allclose(
        next_distribution(z, temperature=tau, top_k=k, top_p=p), _reference_distribution(z, tau, k, p), rtol=1e-12
    )
    greedy = next_distribution(z, temperature=0)
    assert greedy[np.argmax(z)] == 1 and greedy.sum() == 1


@pytest.mark.parametrize(("probs", "p", "kept"), [([0.7, 0.2, 0.1], 0.7, 1), ([0.7, 0.2, 0.1], 0.9, 2),
                                                  ([0.5, 0.3, 0.2], 0.8, 2)])  # fmt: skip
def test_a_nucleus_whose_mass_is_exactly_top_p_keeps_no_more(probs, p, kept):
    # the fewest whose sum reaches p: the prefix sums 0.7, 0.9 and 0.8 reach it exactly, though their rounded
    # values land a hair below it (0.7 + 0.2 == 0.8999999999999999 in floating point)
    assert int((next_distribution(np.log(probs), top_p=p) > 0).sum()) == kept


@pytest.mark.parametrize(("k", "p"), [(None, None), (2, None), (None, 0.5), (3, 0.9)])
def test_each_drawn_character_comes_from_the_exact_distribution_of_a_tiny_model(k, p):
    # a one-step Elman model by hand: after the prime "ab", s = tanh(U[:, b] + W s_a + b), z = V s + c
    vocab = Vocab("abcd")
    model = gpubptt.RNN(4, 3, 4, backend="numpy", dtype="float64", seed=2, init="torch")
    P = {k_: np.asarray(v) for k_, v in model.params.items()}
    s_a = np.tanh(P["U"][:, 0] + P["b"])
    s_b = np.tanh(P["U"][:, 1] + P["W"] @ s_a + P["b"])
    exact = _reference_distribution(list(P["V"] @ s_b + P["c"]), 0.8, k, p)
    for seed in range(20):  # the sampler's generator, drawing from the exact distribution, picks the same
        drawn = "".join(sample_chars(model, vocab, length=1, temperature=0.8, top_k=k, top_p=p, seed=seed, prime="ab"))
        assert drawn == "ab" + vocab.chars[int(np.random.default_rng(seed).choice(4, p=exact))]


def test_temperature_0_is_greedy_and_top_k_1_is_greedy_in_the_cli(tmp_path, corpus):
    ck = tmp_path / "ck.npz"
    assert _train("--data", corpus, "--steps", 3, "--checkpoint", ck).exit_code == 0
    base = ["sample", "--checkpoint", str(ck), "--length", "40", "--prime", "to be"]
    outs = {
        name: runner.invoke(app, base + extra)
        for name, extra in {
            "greedy": ["--greedy"],
            "t0": ["--temperature", "0"],
            "k1": ["--top-k", "1", "--seed", "5"],
            "p_tiny": ["--top-p", "1e-9", "--seed", "9"],
        }.items()
    }
    assert all(o.exit_code == 0 for o in outs.values()), [o.output for o in outs.values()]
    assert len({o.stdout for o in outs.values()}) == 1
    refused = [
        (["--top-p", "0"], "--top-p must be a number in (0, 1]"),
        (["--temperature", "-1"], "≥ 0"),
        (["--greedy", "--temperature", "2"], "--greedy takes the most likely character every step; --temperature 2"),
        (["--greedy", "--top-k", "3", "--top-p", "0.5"], "--top-k 3, --top-p 0.5 would not apply"),
        (["--temperature", "0", "--top-k", "5"], "--temperature 0 takes the most likely character every step"),
    ]
    for extra, message in refused:
        bad = runner.invoke(app, base + extra)
        assert bad.exit_code == 2 and message in bad.output


# -- one bias default ----------------------------------------------------------------------------------------
def test_the_library_and_the_cli_share_the_bias_default_and_old_checkpoints_keep_theirs(tmp_path):
    assert inspect.signature(gpubptt.RNN).parameters["bias"].default is DEFAULTS["bias"] is True
    assert "b" in gpubptt.RNN(3, 4, 3, backend="numpy").params
    old = gpubptt.RNN(3, 4, 3, backend="numpy", bias=False, seed=1)  # as the old library default made it
    save_checkpoint(tmp_path / "old.npz", old)
    loaded = load_checkpoint(tmp_path / "old.npz", backend="numpy").model
    assert loaded.bias is False and set(loaded.params) == set(old.params)
    for k in old.params:
        np.testing.assert_array_equal(loaded.params[k], old.params[k])


# -- info --checkpoint; the recall task's progress --------------------------------------------------------
def test_info_shows_the_cli_cell_name_the_step_the_losses_and_the_data(tmp_path, corpus, monkeypatch):
    _scripted_evaluations(monkeypatch, [4.0, 1.5, 2.5])
    ck = tmp_path / "ck.npz"
    assert _train("--data", corpus, "--steps", 4, "--eval-every", 2, "--checkpoint", ck).exit_code == 0
    result = runner.invoke(app, ["info", "--backend", "numpy", "--json", "--checkpoint", str(ck)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["model"]["cell"] == "rnn"
    t = info["training"]
    assert (
        t["step"] == 4
        and t["last_held_out"] == {"step": 4, "loss": 2.5}
        and t["best_held_out"] == {"step": 2, "loss": 1.5}
    )
    assert t["data"] == {"task": "text", "name": str(corpus), "sha256": hashlib.sha256(TEXT.encode()).hexdigest()}
    text = runner.invoke(app, ["info", "--backend", "numpy", "--checkpoint", str(ck)])
    assert "model.cell: rnn" in text.stdout and "training.best_held_out.step: 2" in text.stdout


def test_recall_progress_labels_the_per_step_train_loss_apart_from_the_recalled_symbol_loss(tmp_path):
    ck = tmp_path / "ck.npz"
    result = runner.invoke(
        app,
        ["train", "--task", "recall", "--delay", "2", "--hidden", "8", "--batch", "4", "--steps", "4",
         "--eval-every", "2", "--backend", "numpy", "--checkpoint", str(ck)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("step ")]
    assert lines and all("train loss/step" in ln and "train loss " not in ln for ln in lines)
    assert "held-out loss in nats/recalled symbol (the recall steps only)" in result.output
    assert "train loss/step: nats averaged over every step" in result.output


def test_cupy_run_keeps_best_and_last_with_weight_decay_and_they_load_on_numpy(tmp_path, corpus, cupy_be):
    ck = tmp_path / "ck.npz"
    args = ["--hidden", "12", "--batch", "4", "--chunk", "8", "--backend", "cupy", "--data", str(corpus)]
    result = runner.invoke(
        app, ["train", *args, "--steps", "6", "--eval-every", "2", "--weight-decay", "0.1", "--checkpoint", str(ck)]
    )
    assert result.exit_code == 0, result.output
    last, best = load_checkpoint(ck, backend="numpy"), load_checkpoint(best_path(ck), backend="numpy")
    assert last.state.step == 6 and best.state.step == last.history.best()[0]
    assert last.optimizer.weight_decay == 0.1
    out = runner.invoke(app, ["sample", "--checkpoint", str(ck), "--which", "best", "--greedy", "--length", "20"])
    assert out.exit_code == 0 and len(out.stdout) == 21  # 20 characters and the closing line break
