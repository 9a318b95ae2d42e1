"""The training loop: schedules, the carried state, evaluation, learning and determinism."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import gpubptt
from gpubptt.errors import InputError
from gpubptt.training.data import CopyTask, TextData
from gpubptt.training.loop import TrainConfig, evaluate, learning_rate, train
from gpubptt.training.optim import SGD, NonFiniteError, make_optimizer


def test_learning_rate_schedules_match_their_formulas():
    kw = {"base_lr": 1.0, "total_steps": 100}
    assert learning_rate(50, schedule="constant", **kw) == 1.0
    assert learning_rate(0, schedule="cosine", **kw) == pytest.approx(1.0)
    assert learning_rate(50, schedule="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(100, schedule="cosine", **kw) == pytest.approx(0.1)
    assert [learning_rate(s, schedule="step", **kw) for s in (0, 25, 50, 99)] == [1.0, 0.5, 0.25, 0.125]
    assert learning_rate(0, schedule="constant", warmup=4, **kw) == pytest.approx(0.25)
    with pytest.raises(InputError, match="unknown schedule"):
        learning_rate(0, schedule="linear", **kw)


def test_stateful_chunks_match_a_hand_run_with_the_carried_state():
    """Two SGD steps on two chunks, replayed by hand through the public model API."""
    text = "".join("abcdefg"[i % 7] if i % 11 else "h" for i in range(400))
    data = TextData(text)
    B, T = 2, 5

    def fresh():
        return gpubptt.RNN(data.input_size, 6, data.output_size, backend="numpy", dtype="float64", bias=True, seed=1)

    model = fresh()
    train(
        model,
        data,
        SGD(model, lr=0.5),
        TrainConfig(steps=2, batch_size=B, chunk=T, max_norm=None, lr=0.5, eval_every=0),
    )

    ref = fresh()
    x, y = data.train_sequence(0, seed=0, batch_size=B, chunk=T)
    _, g1 = ref.loss_and_grads(x[:T], y[:T], reduction="mean")
    s = ref.forward(x[:T]).final_state  # the state the first chunk ends in, before the update
    for k in ref.params:
        ref.params[k] -= 0.5 * g1[k]
    _, g2 = ref.loss_and_grads(x[T : 2 * T], y[T : 2 * T], s, reduction="mean")
    for k in ref.params:
        ref.params[k] -= 0.5 * g2[k]
    for k in ref.params:
        np.testing.assert_allclose(model.params[k], ref.params[k], rtol=1e-12, atol=1e-15)


def test_grad_hook_runs_between_the_gradients_and_clipping_and_the_update():
    """A hook that doubles the gradients and reports a tripled loss, with clipping on: the update is
    what clipping the doubled gradients gives (checked by hand), and the history records the hook's loss."""
    text = "".join("abcdefg"[i % 7] if i % 11 else "h" for i in range(400))
    data = TextData(text)
    B, T, lr, clip = 2, 5, 0.5, 0.1

    def fresh():
        return gpubptt.RNN(data.input_size, 6, data.output_size, backend="numpy", dtype="float64", bias=True, seed=1)

    seen = []

    def hook(loss, grads):
        seen.append(sorted(grads))
        for g in grads.values():
            g *= 2.0
        return loss * 3.0

    model = fresh()
    config = TrainConfig(steps=1, batch_size=B, chunk=T, max_norm=clip, lr=lr, eval_every=0)
    _, history = train(model, data, SGD(model, lr=lr), config, grad_hook=hook)

    ref = fresh()
    x, y = data.train_sequence(0, seed=0, batch_size=B, chunk=T)
    loss, g = ref.loss_and_grads(x[:T], y[:T], reduction="mean")
    norm = np.sqrt(sum(np.sum((2 * g[k]) ** 2) for k in ref.params))  # clipping sees the hook's gradients
    assert norm > clip  # so the clip is active and the order matters
    for k in ref.params:
        ref.params[k] -= lr * (2 * g[k]) * (clip / (norm + 1e-12))
    for k in ref.params:
        np.testing.assert_allclose(model.params[k], ref.params[k], rtol=1e-12, atol=1e-15)
    assert seen == [sorted(g)]
    assert history.loss == [pytest.approx(3 * float(loss), rel=1e-12)]
    assert history.grad_norm == [pytest.approx(norm, rel=1e-12)]


def test_evaluate_of_a_uniform_model_is_log_k():
    task = CopyTask(symbols=6, length=2, delay=3)
    model = gpubptt.RNN(task.input_size, 4, task.output_size, backend="numpy", dtype="float64", seed=0)
    model.params["V"][...] = 0  # every output uniform over K = A + 1 classes
    ev = evaluate(model, task, batch_size=8)
    assert ev["loss"] == pytest.approx(math.log(7)) and ev["loss_all"] == pytest.approx(math.log(7))
    assert ev["chance"] == pytest.approx(math.log(6))


def test_loss_falls_below_chance_on_a_learnable_sequence():
    text = "the cat sat on the mat. " * 60
    data = TextData(text)
    model = gpubptt.RNN(data.input_size, 24, data.output_size, backend="numpy", bias=True, seed=0)
    opt = make_optimizer("adam", model, lr=1e-2)
    _, hist = train(model, data, opt, TrainConfig(steps=300, batch_size=4, chunk=16, lr=1e-2, eval_every=100))
    assert hist.eval_loss[0] > 0.9 * data.chance_loss  # starts at chance
    assert hist.eval_loss[-1] < 0.25 * data.chance_loss  # deterministic; the real value is far lower
    assert np.mean(hist.loss[-20:]) < np.mean(hist.loss[:20]) / 3


def test_delayed_recall_is_learned_at_a_short_delay():
    task = CopyTask(symbols=4, length=1, delay=3)
    model = gpubptt.RNN(task.input_size, 16, task.output_size, backend="numpy", bias=True, seed=0)
    opt = make_optimizer("adam", model, lr=1e-2)
    _, hist = train(
        model, task, opt, TrainConfig(steps=300, batch_size=32, chunk=None, max_norm=1.0, lr=1e-2, eval_every=300)
    )
    assert hist.eval_loss[-1] < 0.2 * task.chance_loss and hist.eval_accuracy[-1] > 0.9


def test_training_is_deterministic_with_a_seed():
    data = TextData("abcde fghij klmno " * 40)

    def run():
        model = gpubptt.RNN(data.input_size, 8, data.output_size, backend="numpy", seed=3)
        train(
            model,
            data,
            make_optimizer("adam", model),
            TrainConfig(steps=25, batch_size=3, chunk=7, eval_every=0, seed=5),
        )
        return model.params

    a, b = run(), run()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_train_refuses_mismatched_model_and_optimizer():
    data = TextData("abcabcabc" * 30)
    model = gpubptt.RNN(data.input_size, 4, data.output_size, backend="numpy", seed=0)
    other = gpubptt.RNN(data.input_size, 4, data.output_size, backend="numpy", seed=0)
    with pytest.raises(InputError, match="optimizer must be built on this model"):
        train(model, data, make_optimizer("sgd", other), TrainConfig(steps=1, batch_size=2, chunk=4))
    wrong = gpubptt.RNN(5, 4, 5, backend="numpy", seed=0)
    with pytest.raises(InputError, match="the data needs"):
        train(wrong, data, make_optimizer("sgd", wrong), TrainConfig(steps=1, batch_size=2, chunk=4))
    with pytest.raises(InputError, match="steps"):
        TrainConfig(steps=0)


def test_the_optimizers_own_rate_is_the_base_unless_the_config_gives_one(tmp_path):
    from gpubptt.training.loop import TrainState
    from gpubptt.training.record import load_checkpoint, save_checkpoint

    data = TextData("abcabcabc" * 30)
    model = gpubptt.RNN(data.input_size, 4, data.output_size, backend="numpy", seed=0)
    _, hist = train(model, data, make_optimizer("sgd", model, lr=1e-4), TrainConfig(steps=3, batch_size=2, chunk=4))
    assert hist.lr == [1e-4] * 3  # the rate given to the optimizer, not a default of the config's
    _, hist = train(model, data, make_optimizer("sgd", model), TrainConfig(steps=2, batch_size=2, chunk=4))
    assert hist.lr == [0.1] * 2  # sgd's own default
    cfg = TrainConfig(steps=4, batch_size=2, chunk=4, lr=0.2, schedule="step")
    _, hist = train(model, data, make_optimizer("sgd", model, lr=1e-4), cfg)
    assert hist.lr == [learning_rate(i, base_lr=0.2, schedule="step", total_steps=4) for i in range(4)]
    opt, cfg = make_optimizer("sgd", model, lr=0.3), TrainConfig(steps=4, batch_size=2, chunk=4, schedule="cosine")
    _, hist = train(model, data, opt, cfg)
    assert cfg.lr is None and hist.lr[0] == 0.3 and opt.lr < 0.3  # the caller's config as it was; the rate decays
    _, hist = train(model, data, opt, cfg)
    assert hist.lr[0] == 0.3  # a new run on the same optimizer: from its base, not the rate the schedule left
    opt.lr = 0.05  # set by hand: the next run's base
    _, hist = train(model, data, opt, cfg)
    assert hist.lr[0] == 0.05
    _, hist = train(model, data, make_optimizer("adam", model, lr=1e-3), cfg)  # one config, another optimizer
    assert hist.lr[0] == 1e-3
    cfg = TrainConfig(steps=4, batch_size=2, chunk=4, schedule="cosine")
    with pytest.raises(InputError, match=r"give TrainConfig\(lr=\.\.\.\) the schedule's base rate"):
        train(model, data, make_optimizer("sgd", model), cfg, state=TrainState(step=2))
    assert cfg.lr is None  # refused: the configuration is as it was
    # NumPy scalars are stored as Python numbers: the configuration round-trips through a checkpoint's JSON
    cfg = TrainConfig(steps=np.int64(2), batch_size=np.int32(2), chunk=np.int64(4), lr=np.float32(0.25))
    assert type(cfg.steps) is int and type(cfg.lr) is float and cfg.lr == 0.25
    opt = make_optimizer("sgd", model)
    state, hist = train(model, data, opt, cfg)
    save_checkpoint(tmp_path / "ck.npz", model, optimizer=opt, config=cfg, state=state, history=hist)
    assert load_checkpoint(tmp_path / "ck.npz").config == cfg
    none = TrainConfig(steps=2, batch_size=2, chunk=4)  # lr None is stored as null, and read back so
    save_checkpoint(tmp_path / "none.npz", model, optimizer=opt, config=none, state=state, history=hist)
    assert load_checkpoint(tmp_path / "none.npz").config.lr is None
    with pytest.raises(InputError, match="lr must be a number"):
        TrainConfig(lr="0.1")


def test_new_run_fills_defaults_and_converts_epochs_to_steps(tmp_path):
    from gpubptt.training.run import new_run

    run = new_run({"task": "recall", "delay": 3, "hidden": 8}, backend="numpy", steps=7)
    assert run.config.steps == 7 and run.config.chunk is None and run.model.bias and run.data.seq_len == 5
    with pytest.raises(InputError, match="unknown settings"):
        new_run({"hiden": 8}, backend="numpy")
    with pytest.raises(InputError, match="not both"):
        new_run({"task": "recall"}, backend="numpy", steps=5, epochs=1.0)
    f = tmp_path / "t.txt"
    for size in (1600, 1601, 1437):  # 1601: an epoch whose random offset leaves one whole chunk fewer
        f.write_text(("abcdefgh" * 300)[:size])
        run = new_run({"data": f, "batch": 4, "chunk": 10, "hidden": 4}, backend="numpy", epochs=2.0)
        state, _ = train(run.model, run.data, run.optimizer, dataclasses.replace(run.config, eval_every=0))
        last = run.data.train_sequence(1, seed=run.config.seed, batch_size=4, chunk=10)[0].shape[0] // 10
        assert (state.sequence, state.chunk) == (1, last), size  # two passes end exactly: every chunk of epoch 1
    from gpubptt.training.sizing import EXACT_EPOCHS, total_steps

    f.write_text("abcdefgh" * 226)  # beyond EXACT_EPOCHS the count scales the exact one: more epochs, more steps
    run = new_run({"data": f, "batch": 4, "chunk": 64, "hidden": 4}, backend="numpy", steps=1)
    counts = [
        total_steps(run.data, run.config, steps=None, epochs=e, default=1) for e in (EXACT_EPOCHS, EXACT_EPOCHS + 1)
    ]
    assert counts[0] <= counts[1]


def test_a_nonfinite_step_is_skipped_or_refused_without_touching_the_weights():
    data = TextData("abcdefg " * 60)

    def setup(on_nonfinite):
        model = gpubptt.RNN(data.input_size, 6, data.output_size, backend="numpy", dtype="float64", seed=0)
        real = model.loss_and_grads
        calls = []

        def poisoned(*args, **kwargs):  # the second chunk's gradient of W is NaN
            out = real(*args, **kwargs)
            calls.append(1)
            if len(calls) == 2:
                out[1]["W"][...] = np.nan
            return out

        model.loss_and_grads = poisoned
        return model, make_optimizer("adam", model, on_nonfinite=on_nonfinite)

    model, opt = setup("skip")
    seen, after_step_1 = {}, {}

    def on_step(ev):
        seen[ev.step] = ev.applied
        if ev.step == 1:
            after_step_1.update({k: v.copy() for k, v in model.params.items()})

    state, hist = train(model, data, opt, TrainConfig(steps=2, batch_size=2, chunk=5, eval_every=0), callback=on_step)
    assert seen == {1: True, 2: False} and hist.skipped == 1 and state.s is None and opt.t == 1
    for k, v in after_step_1.items():
        np.testing.assert_array_equal(model.params[k], v)

    model, opt = setup("raise")
    with pytest.raises(NonFiniteError, match="step 2: non-finite W"):
        train(model, data, opt, TrainConfig(steps=3, batch_size=2, chunk=5, eval_every=0))
    assert opt.t == 1


@pytest.mark.parametrize("stop_at", [2, 4])  # an evaluation step, and the last (the final evaluation)
def test_a_train_stopped_in_an_evaluation_runs_it_first_when_continued(stop_at, monkeypatch):
    import gpubptt.training.loop as loop

    data = TextData("abcde fghij klmno " * 40)
    config = TrainConfig(steps=4, batch_size=3, chunk=7, eval_every=2, seed=5)

    def run(stop: int | None):
        model = gpubptt.RNN(data.input_size, 8, data.output_size, backend="numpy", seed=3)
        opt = make_optimizer("adam", model)
        if stop is None:
            return train(model, data, opt, config)[1]
        real, calls = loop.evaluate, []

        def interrupted(m, d, **kw):
            calls.append(1)
            if len(calls) == 1 + stop // 2:  # after step 0's and the earlier steps' evaluations
                raise KeyboardInterrupt
            return real(m, d, **kw)

        monkeypatch.setattr(loop, "evaluate", interrupted)
        state, history = loop.TrainState(), loop.History()
        with pytest.raises(KeyboardInterrupt):
            train(model, data, opt, config, state=state, history=history)
        assert state.step == stop and history.eval_step[-1] != stop  # the step ran, its evaluation did not
        monkeypatch.setattr(loop, "evaluate", real)
        return train(model, data, opt, config, state=state, history=history)[1]

    whole, continued = run(None), run(stop_at)
    assert continued.eval_step == whole.eval_step == [0, 2, 4]
    assert continued.eval_loss == whole.eval_loss and continued.loss == whole.loss
