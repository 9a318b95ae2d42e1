"""Optimizers, clipping and the non-finite guard, against hand-computed updates."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gpubptt
from gpubptt.errors import InputError, ShapeError
from gpubptt.training.optim import SGD, Adagrad, Adam, NonFiniteError, clip_grad_norm, global_grad_norm, make_optimizer


def _params(be, *values):
    return {name: be.asarray(np.array(v, dtype=np.float64)) for name, v in zip("UWV", values, strict=False)}


def _host(d):
    return {k: gpubptt.to_numpy(v).copy() for k, v in d.items()}


def test_sgd_matches_hand_computed_update(be):
    params = _params(be, [1.0, 2.0])
    opt = SGD(params, lr=0.1, backend=be)
    opt.step({"U": be.asarray(np.array([0.5, -1.0]))})
    np.testing.assert_allclose(gpubptt.to_numpy(params["U"]), [0.95, 2.1], rtol=1e-15)


def test_sgd_momentum_matches_hand_computed_updates(be):
    params = _params(be, [1.0])
    opt = SGD(params, lr=0.1, momentum=0.9, backend=be)
    opt.step({"U": be.asarray(np.array([1.0]))})  # v = 1, θ = 1 − 0.1 = 0.9
    opt.step({"U": be.asarray(np.array([2.0]))})  # v = 0.9 + 2 = 2.9, θ = 0.9 − 0.29 = 0.61
    np.testing.assert_allclose(gpubptt.to_numpy(params["U"]), [0.61], rtol=1e-14)


def test_adagrad_matches_hand_computed_updates(be):
    params = _params(be, [1.0])
    opt = Adagrad(params, lr=0.5, eps=1e-300, backend=be)  # ε > 0, too small to move a float64
    opt.step({"U": be.asarray(np.array([3.0]))})  # G = 9, θ = 1 − 0.5·3/3 = 0.5
    opt.step({"U": be.asarray(np.array([4.0]))})  # G = 25, θ = 0.5 − 0.5·4/5 = 0.1
    np.testing.assert_allclose(gpubptt.to_numpy(params["U"]), [0.1], rtol=1e-14)


def test_adam_matches_hand_computed_updates(be):
    params = _params(be, [1.0])
    opt = Adam(params, lr=0.1, betas=(0.5, 0.75), eps=1e-300, backend=be)  # ε > 0, below float64's reach
    opt.step({"U": be.asarray(np.array([2.0]))})
    # m = 1, v = 1; m̂ = 1/0.5 = 2, v̂ = 1/0.25 = 4; θ = 1 − 0.1·2/2 = 0.9
    np.testing.assert_allclose(gpubptt.to_numpy(params["U"]), [0.9], rtol=1e-14)
    opt.step({"U": be.asarray(np.array([-1.0]))})
    # m = 0.5 − 0.5 = 0, so θ stays 0.9 (v = 0.75 + 0.25 = 1)
    np.testing.assert_allclose(gpubptt.to_numpy(params["U"]), [0.9], rtol=1e-14)
    opt.step({"U": be.asarray(np.array([4.0]))})
    # m = 2, v = 0.75 + 4 = 4.75; m̂ = 2/0.875, v̂ = 4.75/(1 − 0.421875)
    want = 0.9 - 0.1 * (2 / 0.875) / math.sqrt(4.75 / 0.578125)
    np.testing.assert_allclose(gpubptt.to_numpy(params["U"]), [want], rtol=1e-13)


def test_clipping_bounds_the_norm_and_keeps_the_direction(be, xp):
    rng = np.random.default_rng(0)
    host = {"U": rng.normal(size=(3, 4)), "W": rng.normal(size=(3, 3)), "s0": rng.normal(size=(2, 3))}
    grads = {k: be.asarray(v.copy()) for k, v in host.items()}  # asarray may not copy on NumPy
    norm_ref = math.sqrt(sum((host[k] ** 2).sum() for k in ("U", "W")))  # s0 is not a parameter
    norm = clip_grad_norm(grads, 0.5, xp=xp)
    assert be.is_native(norm) and norm.shape == ()
    np.testing.assert_allclose(float(norm), norm_ref, rtol=1e-12)
    for k in ("U", "W"):
        np.testing.assert_allclose(gpubptt.to_numpy(grads[k]), host[k] * 0.5 / norm_ref, rtol=1e-12)
    np.testing.assert_allclose(gpubptt.to_numpy(grads["s0"]), host["s0"])
    np.testing.assert_allclose(float(global_grad_norm(grads, xp=xp)), 0.5, rtol=1e-12)


def test_clipping_leaves_small_and_nonfinite_gradients_unchanged(be, xp):
    g = {"U": be.asarray(np.array([0.3, 0.4]))}
    assert float(clip_grad_norm(g, 1.0, xp=xp)) == pytest.approx(0.5)
    np.testing.assert_array_equal(gpubptt.to_numpy(g["U"]), [0.3, 0.4])
    g = {"U": be.asarray(np.array([np.nan, 1.0])), "W": be.asarray(np.array([3.0]))}
    assert math.isnan(float(clip_grad_norm(g, 1.0, xp=xp)))
    np.testing.assert_array_equal(gpubptt.to_numpy(g["W"]), [3.0])
    with pytest.raises(InputError, match="max_norm"):
        clip_grad_norm(g, 0.0, xp=xp)


@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_nan_gradient_is_refused_and_nothing_changes(be, name):
    model = gpubptt.RNN(3, 4, 3, backend=be, dtype="float64", seed=0)
    opt = make_optimizer(name, model, lr=0.1, momentum=0.9 if name == "sgd" else 0)
    x = be.asarray(np.zeros((4, 2), dtype=np.int64))
    loss, grads = model.loss_and_grads(x, x)
    opt.step(grads, loss=loss)  # one good step so that the state is non-trivial
    before, state_before = _host(model.params), _host(opt.state_dict())
    loss, grads = model.loss_and_grads(x, x)
    grads["W"][0, 0] = np.nan
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite W \(contains NaN") as info:
        opt.step(grads, loss=loss)
    assert "U" not in str(info.value).split(";")[0]
    for k, v in _host(model.params).items():
        np.testing.assert_array_equal(v, before[k])
    for k, v in _host(opt.state_dict()).items():
        np.testing.assert_array_equal(v, state_before[k])


def test_nonfinite_step_is_skipped_when_asked(be):
    model = gpubptt.RNN(3, 4, 3, backend=be, dtype="float32", seed=0)
    opt = Adam(model, on_nonfinite="skip")
    before = _host(model.params)
    x = be.asarray(np.zeros((4, 2), dtype=np.int64))
    loss, grads = model.loss_and_grads(x, x)
    grads["U"][...] = np.inf
    res = opt.step(grads, loss=loss)
    assert not res.applied and res.nonfinite == ("U",) and opt.t == 0
    for k, v in _host(model.params).items():
        np.testing.assert_array_equal(v, before[k])
    res = opt.step(grads, loss=be.xp.asarray(np.nan))
    assert res.nonfinite == ("U", "loss")


def test_nonfinite_loss_and_overflowing_norm_are_refused(be):
    params = {"U": be.asarray(np.ones(2, dtype=np.float32))}
    opt = SGD(params, lr=0.1, backend=be)
    with pytest.raises(NonFiniteError, match="the loss"):
        opt.step({"U": be.asarray(np.ones(2, dtype=np.float32))}, loss=be.xp.asarray(np.float32(np.inf)))
    with pytest.raises(NonFiniteError, match="norm overflows float32"):
        opt.step({"U": be.asarray(np.full(2, 1e30, dtype=np.float32))})
    np.testing.assert_array_equal(gpubptt.to_numpy(params["U"]), [1, 1])


def test_step_reports_loss_and_norm_read_in_one_transfer(be):
    params = {"U": be.asarray(np.zeros(2))}
    res = SGD(params, lr=1.0, backend=be).step({"U": be.asarray(np.array([3.0, 4.0]))}, loss=be.xp.asarray(2.5))
    assert res.applied and res.loss == 2.5 and res.grad_norm == pytest.approx(5.0)


@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_state_dict_round_trip_continues_identically(name):
    rng = np.random.default_rng(1)
    g = [{"U": rng.normal(size=(2, 3)), "W": rng.normal(size=(2, 2))} for _ in range(5)]
    start = {"U": rng.normal(size=(2, 3)), "W": rng.normal(size=(2, 2))}
    a_params = {k: v.copy() for k, v in start.items()}
    a = make_optimizer(name, a_params, lr=0.05, momentum=0.5 if name == "sgd" else 0)
    for gi in g[:3]:
        a.step(gi)
    b_params = {k: v.copy() for k, v in a_params.items()}
    b = make_optimizer(name, b_params, lr=0.05, momentum=0.5 if name == "sgd" else 0)
    b.load_state_dict({k: np.array(v) for k, v in a.state_dict().items()})
    for gi in g[3:]:
        a.step(gi)
        b.step(gi)
    for k in start:
        np.testing.assert_array_equal(a_params[k], b_params[k])


def test_load_state_dict_rejects_wrong_shapes_and_names():
    params = {"U": np.zeros((2, 3))}
    opt = Adam(params)
    good = opt.state_dict()
    with pytest.raises(ShapeError, match=r"m\.U has shape \(3, 2\)"):
        opt.load_state_dict({**good, "m.U": np.zeros((3, 2))})
    with pytest.raises(InputError, match="missing"):
        opt.load_state_dict({"t": good["t"]})
    assert opt.t == 0


def test_bad_settings_are_refused():
    with pytest.raises(InputError, match="lr"):
        SGD({"U": np.zeros(2)}, lr=-1.0)
    with pytest.raises(InputError, match="momentum"):
        SGD({"U": np.zeros(2)}, lr=0.1, momentum=1.5)
    with pytest.raises(InputError, match="on_nonfinite"):
        SGD({"U": np.zeros(2)}, lr=0.1, on_nonfinite="ignore")
    with pytest.raises(InputError, match="unknown optimizer"):
        make_optimizer("rmsprop", {"U": np.zeros(2)})
    for name in ("adagrad", "adam"):  # refused when built, not at the first step or the first save
        for eps in (-1e-3, float("nan"), float("inf"), "1e-8"):
            with pytest.raises(InputError, match=f"eps of {name} must be a finite number > 0"):
                make_optimizer(name, {"U": np.zeros(2)}, eps=eps)
    with pytest.raises(ShapeError, match="gradient U has shape"):
        SGD({"U": np.zeros(2)}, lr=0.1).step({"U": np.zeros(3)})


def test_loaded_optimizer_state_must_be_finite_in_the_parameters_dtype_and_squares_not_negative():
    model = gpubptt.RNN(3, 4, 3, backend="numpy", dtype="float32", seed=0)
    opt = make_optimizer("adam", model)
    good = {k: np.asarray(v).copy() for k, v in opt.state_dict().items()}
    before = {k: np.asarray(v).copy() for k, v in opt.state_dict().items()}
    huge = {**good, "m.W": np.full((4, 4), 1e300)}  # finite in float64, inf in the float32 parameter
    with pytest.raises(InputError, match=r"m\.W is not finite in float32"):
        opt.load_state_dict(huge)
    negative = {**good, "v.U": -np.ones((4, 3), dtype=np.float32)}
    with pytest.raises(InputError, match=r"v\.U accumulates squares, yet holds negative values"):
        opt.load_state_dict(negative)
    for k, v in opt.state_dict().items():
        np.testing.assert_array_equal(v, before[k])  # nothing changed
