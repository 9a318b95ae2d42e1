"""Optimizer settings and saved state: the base rate after a save, eps, snapshots, refused settings."""

import math

import numpy as np
import pytest

import gpubptt
from gpubptt.errors import InputError
from gpubptt.training.data import TextData
from gpubptt.training.loop import TrainConfig, train
from gpubptt.training.optim import SGD, Adagrad, Adam, make_optimizer
from gpubptt.training.record import load_checkpoint, save_checkpoint

TEXT = "the quick brown fox jumps over the lazy dog. " * 20


def _cosine(step: int, total: int, base: float) -> float:
    """The cosine schedule in closed form: from base down to base/10 along half a cosine."""
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * step / total)))


def _model_and_data():
    data = TextData(TEXT)
    return gpubptt.RNN(data.input_size, 6, data.output_size, backend="numpy", seed=0), data


def test_a_run_after_load_checkpoint_starts_from_the_rate_built_with_not_the_last_scheduled_one(tmp_path):
    model, data = _model_and_data()
    opt = Adam(model, lr=0.01)
    cfg = TrainConfig(steps=5, batch_size=2, chunk=4, schedule="cosine", eval_every=0)  # lr None: the optimizer's
    state, hist = train(model, data, opt, cfg)
    assert hist.lr == pytest.approx([_cosine(i, 5, 0.01) for i in range(5)], rel=1e-12)
    save_checkpoint(tmp_path / "ck.npz", model, optimizer=opt, config=cfg, state=state, history=hist)
    ck = load_checkpoint(tmp_path / "ck.npz", backend="numpy")
    assert ck.optimizer.lr == pytest.approx(_cosine(4, 5, 0.01), rel=1e-12)  # where the schedule left it
    _, again = train(ck.model, data, ck.optimizer, cfg)  # a fresh run (step 0) on the loaded optimizer
    assert again.lr == pytest.approx([_cosine(i, 5, 0.01) for i in range(5)], rel=1e-12)  # from 0.01, not 0.00186


def test_a_state_saved_without_base_lr_keeps_the_rate_it_was_built_with():
    model, data = _model_and_data()
    opt = Adam(model, lr=0.01)
    train(model, data, opt, TrainConfig(steps=3, batch_size=2, chunk=4, schedule="cosine", eval_every=0))
    old = {k: v for k, v in opt.state_dict().items() if k not in ("base_lr", "scheduled_lr")}  # an older file
    fresh = Adam(model, lr=0.004)
    fresh.load_state_dict(old)
    assert (fresh.base_lr, fresh.scheduled_lr) == (0.004, None)
    with pytest.raises(InputError, match="'scheduled_lr' is given without 'base_lr'"):
        fresh.load_state_dict({**old, "scheduled_lr": np.float64(0.001)})
    with pytest.raises(InputError, match=r"'base_lr' must be a 0-d rate in \(0, 1000\]"):
        fresh.load_state_dict({**old, "base_lr": np.float64(np.nan)})
    assert (fresh.base_lr, fresh.scheduled_lr) == (0.004, None)  # refused: nothing changed


@pytest.mark.parametrize("name", ["adagrad", "adam"])
def test_zero_eps_is_refused_naming_eps_the_optimizer_and_the_division(name):
    params = {"U": np.zeros(2)}
    why = rf"eps of {name} must be a finite number > 0, got 0(\.0)?: .*0/0 = NaN"
    with pytest.raises(InputError, match=why):
        make_optimizer(name, params, eps=0.0)
    with pytest.raises(InputError, match=why):
        {"adagrad": Adagrad, "adam": Adam}[name](params, eps=0)
    # the reason, by hand: a zero gradient on zero state with eps = 0 is 0/(√0 + 0)
    with np.errstate(invalid="ignore"):
        assert math.isnan(np.float64(0.0) / (np.sqrt(np.float64(0.0)) + 0.0))
    make_optimizer(name, params, eps=1e-8).step({"U": np.zeros(2)})  # a zero gradient with eps > 0: a step
    np.testing.assert_array_equal(params["U"], [0.0, 0.0])


def test_sgd_is_unaffected_by_the_eps_rule():
    params = {"U": np.array([1.0])}
    make_optimizer("sgd", params, lr=0.5).step({"U": np.array([0.0])})
    np.testing.assert_array_equal(params["U"], [1.0])


@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_state_dict_is_a_snapshot_that_later_steps_leave_as_it_was(name):
    params = {"U": np.array([1.0, -2.0])}
    opt = make_optimizer(name, params, lr=0.1, **({"momentum": 0.9} if name == "sgd" else {}))
    opt.step({"U": np.array([0.5, 1.0])})
    snap = opt.state_dict()
    copied = {k: np.array(v, copy=True) for k, v in snap.items()}  # taken at once: the reference
    opt.step({"U": np.array([-1.0, 3.0])})
    opt.step({"U": np.array([2.0, 0.25])})
    assert set(snap) == set(copied)
    for k in copied:
        np.testing.assert_array_equal(snap[k], copied[k])
    assert int(snap["t"]) == 1


def test_train_config_refuses_a_non_number_max_norm_with_an_input_error():
    with pytest.raises(InputError, match="max_norm must be a number or None, got '5'"):
        TrainConfig(max_norm="5")
    with pytest.raises(InputError, match=r"lr must be a number or None, got '0\.1'"):
        TrainConfig(lr="0.1")


@pytest.mark.parametrize("betas", [0.9, (0.9,), (0.9, 0.99, 0.5), (0.9, 1.0), ("0.9", 0.99), None, "ab", ((0.9,), 0.9)])
def test_adam_refuses_betas_other_than_a_pair_of_numbers_in_the_unit_interval(betas):
    with pytest.raises(InputError, match=r"betas of adam must be a pair of numbers in \[0, 1\)"):
        Adam({"U": np.zeros(2)}, betas=betas)
    with pytest.raises(InputError, match=r"betas of adam must be a pair of numbers in \[0, 1\)"):
        make_optimizer("adam", {"U": np.zeros(2)}, betas=betas)


def test_adam_takes_betas_as_a_list_or_an_array():
    assert (make_optimizer("adam", {"U": np.zeros(2)}, betas=[0.5, 0.75]).beta2) == 0.75
    assert (Adam({"U": np.zeros(2)}, betas=np.array([0.5, 0.75])).beta1) == 0.5


@pytest.mark.parametrize(
    "name,setting,value",
    [("sgd", "eps", 1e-3), ("sgd", "betas", (0.9, 0.99)), ("adagrad", "betas", (0.9, 0.99)), ("adam", "nesterov", 1)],
)
def test_make_optimizer_refuses_a_setting_the_optimizer_does_not_take(name, setting, value):
    with pytest.raises(InputError, match=rf"{name} takes no setting '{setting}'; its settings are lr, "):
        make_optimizer(name, {"U": np.zeros(2)}, **{setting: value})


def test_numbers_past_float_range_are_refused_as_input_errors():
    huge = 10**400
    p = {"U": np.zeros(2)}
    for kw, name in [
        ({"eps": huge}, "eps"), ({"lr": huge}, "lr"), ({"weight_decay": huge}, "weight_decay"),
        ({"betas": (huge, 0.9)}, "betas"),
    ]:  # fmt: skip
        with pytest.raises(InputError, match=name):
            make_optimizer("adam", p, **kw)
    with pytest.raises(InputError, match="weight_decay"):
        SGD(p, weight_decay=-huge)
    for kw, name in [({"lr": huge}, "lr"), ({"max_norm": huge}, "max_norm"), ({"max_norm": -huge}, "max_norm")]:
        with pytest.raises(InputError, match=name):
            TrainConfig(**kw)
    assert TrainConfig(lr=np.float32(0.25), max_norm=np.float32(1.5)).max_norm == 1.5  # float32 in range: taken


@pytest.mark.parametrize("name", ["adagrad", "adam"])
def test_momentum_with_another_optimizer_than_sgd_is_refused_unless_zero_or_none(name):
    p = {"U": np.zeros(2)}
    with pytest.raises(InputError, match=rf"momentum=0.9 applies to sgd only; {name} keeps its own statistics"):
        make_optimizer(name, p, momentum=0.9)
    for momentum in (0, 0.0, None):
        assert make_optimizer(name, p, momentum=momentum).name == name
    assert make_optimizer("sgd", p, momentum=0.9).momentum == 0.9


@pytest.mark.parametrize("name", ["adagrad", "adam"])
def test_a_checkpoint_saved_with_zero_eps_still_loads_as_it_was_saved(tmp_path, name):
    import json

    model, _ = _model_and_data()
    path = save_checkpoint(tmp_path / "eps.npz", model, optimizer=make_optimizer(name, model, eps=1e-8))
    with np.load(path, allow_pickle=False) as z:  # as a file from before eps had to be > 0
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta["optimizer"]["eps"] = 0.0
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)
    back = load_checkpoint(path, backend="numpy")
    assert back.optimizer.name == name and back.optimizer.eps == 0.0
    for k in model.params:
        np.testing.assert_array_equal(back.model.params[k], model.params[k])


def test_a_file_from_before_the_base_rate_was_kept_takes_its_configs_rate_as_the_base(tmp_path):
    model, data = _model_and_data()
    opt = Adam(model, lr=0.1)
    config = TrainConfig(steps=5, batch_size=2, chunk=4, schedule="cosine", eval_every=0, lr=0.1)
    train(model, data, opt, config)
    path = save_checkpoint(tmp_path / "old.npz", model, optimizer=opt, config=config)
    with np.load(path, allow_pickle=False) as z:  # as written before optim.base_lr existed
        arrays = {k: z[k] for k in z.files if k not in ("optim.base_lr", "optim.scheduled_lr")}
    np.savez(path, **arrays)
    back = load_checkpoint(path, backend="numpy")
    assert back.optimizer.lr == pytest.approx(_cosine(4, 5, 0.1)) and back.optimizer.base_lr == 0.1


def test_load_state_dict_into_a_new_optimizer_restores_the_rate_a_fresh_run_starts_from():
    """Build, then load_state_dict: the constructor's rate stayed, and train() took it for one set by hand."""
    model, data = _model_and_data()
    opt = Adam(model, lr=0.01)
    config = TrainConfig(steps=5, batch_size=2, chunk=4, schedule="cosine", eval_every=0)
    train(model, data, opt, config)
    fresh = Adam(model)  # the class's default rate, 1e-3
    fresh.load_state_dict(opt.state_dict())
    assert fresh.lr == opt.lr and fresh.base_lr == 0.01
    _, history = train(model, data, fresh, config)
    assert history.lr[0] == pytest.approx(_cosine(0, 5, 0.01))
