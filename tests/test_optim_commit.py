"""An optimizer step is all or nothing once it commits: a cell's constraint that fails changes nothing, and a
Ctrl-C arriving between two parameters' writes waits for the whole commit (parameters, state, step count)."""

from __future__ import annotations

import signal

import numpy as np
import pytest

import gpubptt
from gpubptt.cells.indrnn import IndRNNCell
from gpubptt.training.optim import SGD, make_optimizer

X = np.array([[0, 1], [2, 0], [1, 1]], dtype=np.int64)


def test_a_failing_constraint_changes_no_parameter_state_or_step_count(monkeypatch):
    model = gpubptt.RNN(3, 5, 3, cell=IndRNNCell("tanh", max_weight=0.5), backend="numpy", seed=0)
    opt = make_optimizer("adam", model, lr=0.05)
    loss, grads = model.loss_and_grads(X, X)
    before = {k: v.copy() for k, v in model.params.items()}
    moments = {k: v.copy() for k, v in opt.state["m"].items()}

    def broken(self, p, *, xp):
        raise RuntimeError("a cell's projection failed")

    monkeypatch.setattr(type(model.cell), "constrain", broken)
    with pytest.raises(RuntimeError, match="projection failed"):
        opt.step(grads, loss=loss)
    assert opt.t == 0
    for k, v in model.params.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
        np.testing.assert_array_equal(opt.state["m"][k], moments[k], err_msg=k)
    monkeypatch.undo()
    opt.step(grads, loss=loss)  # and the step then runs as ever, clipped into the bound
    assert opt.t == 1 and np.abs(model.params["w"]).max() <= 0.5


class _Arming(dict):
    """Parameters whose second read after ``armed`` is set raises SIGINT, as a Ctrl-C landing mid-commit."""

    armed, reads = False, 0

    def __getitem__(self, k):
        if self.armed:
            self.reads += 1
            if self.reads == 2:
                signal.raise_signal(signal.SIGINT)
        return super().__getitem__(k)


class _SGD(SGD):
    def _read_back(self, pairs, loss, norm):  # the guard's read-back: the commit comes next
        host = super()._read_back(pairs, loss, norm)
        self.params.armed = True
        return host


def test_a_ctrl_c_mid_commit_waits_for_the_whole_step():
    params = _Arming(a=np.zeros(3), b=np.zeros(3), c=np.zeros(3))
    opt = _SGD(params, lr=0.5, momentum=0.9)
    grads = {k: np.ones(3) for k in params}
    with pytest.raises(KeyboardInterrupt):
        opt.step(grads)
    assert params.reads >= 2  # the interrupt came between the writes
    for k in ("a", "b", "c"):
        np.testing.assert_array_equal(dict.__getitem__(params, k), np.full(3, -0.5), err_msg=k)
        np.testing.assert_array_equal(opt.state["momentum"][k], np.ones(3), err_msg=k)
    assert opt.t == 1


def test_a_rate_set_by_hand_survives_save_and_load(tmp_path):
    from gpubptt.training.record import load_checkpoint, save_checkpoint

    model = gpubptt.RNN(3, 5, 3, backend="numpy", seed=0)
    opt = make_optimizer("sgd", model, lr=0.1)
    opt.lr = 0.5  # by hand, after building: the next step's rate
    save_checkpoint(tmp_path / "ck.npz", model, optimizer=opt)
    loaded = load_checkpoint(tmp_path / "ck.npz")
    assert loaded.optimizer.lr == 0.5 and loaded.optimizer.base_lr == 0.1
    twin = make_optimizer("sgd", gpubptt.RNN(3, 5, 3, backend="numpy", seed=0), lr=0.1)
    twin.load_state_dict(opt.state_dict())
    assert twin.lr == 0.5


def test_a_constrain_of_no_arguments_runs_on_the_committed_parameters():
    model = gpubptt.RNN(3, 5, 3, backend="numpy", seed=0)
    opt = make_optimizer("sgd", model.params, lr=0.1)  # on the mapping: constrain is the caller's to set
    seen = []
    opt.constrain = lambda: seen.append(model.params["W"].copy())  # as it was called before it took the values
    loss, grads = model.loss_and_grads(X, X)
    before = model.params["W"].copy()
    opt.step(grads, loss=loss)
    np.testing.assert_array_equal(seen[0], before - 0.1 * grads["W"])  # after the parameters were written

    class Wrapped:  # a model-like object whose constrain takes no values
        def __init__(self, m):
            self.params, self.backend, self.calls = m.params, m.backend, 0

        def constrain(self):
            self.calls += 1

    wrapped = Wrapped(model)
    make_optimizer("adam", wrapped).step(grads, loss=loss)
    assert wrapped.calls == 1


def test_a_ctrl_c_in_a_training_steps_commit_lands_after_the_step_is_counted():
    from gpubptt.training.data import TextData
    from gpubptt.training.loop import History, TrainConfig, TrainState, train

    data = TextData("abcde fghij klmno " * 40)
    config = TrainConfig(steps=5, batch_size=3, chunk=7, eval_every=0, seed=5)

    class Interrupted(SGD):  # a Ctrl-C as the third step's commit counts it
        @property
        def t(self):
            return self._t

        @t.setter
        def t(self, value):
            self._t = value
            if value == 3 and not getattr(self, "fired", False):
                self.fired = True
                signal.raise_signal(signal.SIGINT)

    def model_and_opt(kind):
        model = gpubptt.RNN(data.input_size, 8, data.output_size, backend="numpy", seed=3)
        return model, kind(model, lr=0.1, momentum=0.9)

    whole, opt = model_and_opt(SGD)
    train(whole, data, opt, config)
    model, opt = model_and_opt(Interrupted)
    state, history = TrainState(), History()
    with pytest.raises(KeyboardInterrupt):
        train(model, data, opt, config, state=state, history=history)
    assert state.step == opt.t == 3 and history.step == [1, 2, 3]  # was: the step applied, not counted
    train(model, data, opt, config, state=state, history=history)
    assert opt.t == 5
    for k in whole.params:
        np.testing.assert_array_equal(model.params[k], whole.params[k], err_msg=k)


def test_only_the_models_own_constrain_takes_the_new_values():
    from gpubptt.training.optim import SGD as Plain

    model = gpubptt.RNN(3, 5, 3, cell=IndRNNCell("tanh", max_weight=1.0), backend="numpy", seed=0)

    class Wrapped:  # a model-like object whose constrain has an optional parameter of its own
        def __init__(self, m):
            self.m, self.params, self.backend = m, m.params, m.backend

        def constrain(self, clip=None):
            assert clip is None  # never handed the values
            self.m.constrain()

    opt = Plain(Wrapped(model), lr=50.0)
    loss, grads = model.loss_and_grads(X, X)
    opt.step(grads, loss=loss)
    assert np.abs(model.params["w"]).max() <= 1.0  # projected after the writes, as before


def test_a_failing_constrain_of_no_arguments_leaves_the_step_applied_and_counted():
    model = gpubptt.RNN(3, 5, 3, backend="numpy", seed=0)
    opt = make_optimizer("sgd", model.params, lr=0.1, momentum=0.9)
    loss, grads = model.loss_and_grads(X, X)
    before = model.params["W"].copy()

    def broken():
        raise RuntimeError("projection failed")

    opt.constrain = broken
    with pytest.raises(RuntimeError, match="projection failed"):
        opt.step(grads, loss=loss)
    assert opt.t == 1  # the parameters, the state and the count agree: a continued run repeats no step
    np.testing.assert_array_equal(model.params["W"], before - 0.1 * grads["W"])
    np.testing.assert_array_equal(opt.state["momentum"]["W"], grads["W"])


class _Clipped(gpubptt.RNN):  # a subclass's own constrain() of no arguments: a caller's own, called as before
    def constrain(self):
        np.clip(self.params["W"], -0.01, 0.01, out=self.params["W"])


class _Bounded(gpubptt.RNN):  # a subclass's constrain(self, params), as RNN's: it gets the new values
    def constrain(self, params):
        super().constrain(params)
        np.clip(params["W"], -0.01, 0.01, out=params["W"])


@pytest.mark.parametrize("kind", [_Clipped, _Bounded], ids=["no-arguments", "takes-the-values"])
def test_a_subclass_constrain_runs_as_its_signature_says(kind):
    model = kind(3, 5, 3, backend="numpy", seed=0)
    opt = make_optimizer("sgd", model, lr=0.1)
    loss, grads = model.loss_and_grads(X, X)
    opt.step(grads, loss=loss)
    assert opt.t == 1 and np.abs(model.params["W"]).max() <= 0.01


def test_the_optimizer_module_still_exports_its_names():
    from gpubptt.training.optim import STATE_KEYS, clip_grad_norm, global_grad_norm

    assert STATE_KEYS == ("s0", "c0") and callable(clip_grad_norm) and callable(global_grad_norm)


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        (lambda g: {**g, "W": g["W"].astype(np.complex64)}, gpubptt.InputTypeError, "gradient W must hold real"),
        (lambda g: {**g, "U": g["U"].astype(str)}, gpubptt.InputTypeError, "gradient U must hold real"),
        (lambda g: {**g, "V": g["V"].astype(object)}, gpubptt.InputTypeError, "gradient V must hold real"),
    ],
)
def test_a_gradient_of_no_real_dtype_is_refused_by_name_and_changes_nothing(change, error, words):
    model = gpubptt.RNN(3, 4, 3, backend="numpy", seed=0)
    opt = make_optimizer("adam", model)
    _, grads = model.loss_and_grads(X, X)
    before = {k: v.copy() for k, v in model.params.items()}
    with pytest.raises(error, match=words):
        opt.step(change(grads))
    assert opt.t == 0 and all(np.array_equal(v, before[k]) for k, v in model.params.items())


@pytest.mark.parametrize("name", ["loss", "grad_norm"])
@pytest.mark.parametrize(
    ("value", "error", "words"),
    [
        (np.zeros(2), gpubptt.InputError, r"must be one number \(a 0-d array\), got shape \(2,\)"),
        ("abc", gpubptt.InputTypeError, "must be one real number .*got str"),
        (1 + 2j, gpubptt.InputTypeError, "must be one real number .*got complex"),
        (np.complex64(1), gpubptt.InputTypeError, "must be one real number, got dtype complex64"),
        (True, gpubptt.InputTypeError, "must be one real number .*got bool"),
    ],
)
def test_a_loss_or_norm_that_is_not_one_real_number_is_refused_before_the_update(name, value, error, words):
    model = gpubptt.RNN(3, 4, 3, backend="numpy", seed=0)
    opt = make_optimizer("sgd", model, lr=0.1)
    loss, grads = model.loss_and_grads(X, X)
    before = {k: v.copy() for k, v in model.params.items()}
    with pytest.raises(error, match=f"{name} {words}"):
        opt.step(grads, **{name: value})
    assert opt.t == 0 and all(np.array_equal(v, before[k]) for k, v in model.params.items())
    result = opt.step(grads, loss=np.float32(loss), grad_norm=np.array([2.0]))  # one real number in any form: taken
    assert result.applied and result.grad_norm == 2.0 and opt.t == 1


def test_parameters_sharing_memory_are_refused_by_name_before_any_update():
    """One array under two names kept only the last name's update (W's step was lost to W_l1's)."""
    model = gpubptt.RNN(3, 4, 3, num_layers=2, backend="numpy", seed=0)
    opt = make_optimizer("sgd", model, lr=0.5)
    _, grads = model.loss_and_grads(X, X)
    model.params["W_l1"] = model.params["W"]
    before = {k: v.copy() for k, v in model.params.items()}
    with pytest.raises(gpubptt.InputError, match="parameters W and W_l1 share memory"):
        opt.step(grads)
    assert opt.t == 0 and all(np.array_equal(v, before[k]) for k, v in model.params.items())
    with pytest.raises(gpubptt.InputError, match="parameters W and W_l1 share memory"):
        make_optimizer("adam", model)
    model.params["W_l1"] = model.params["W"].copy()  # each its own array: the step runs, W moved as SGD says
    w = model.params["W"].copy()
    opt.step(grads)
    np.testing.assert_allclose(model.params["W"], w - 0.5 * grads["W"], rtol=1e-6)


def test_the_shared_memory_check_sees_a_view_assigned_twice_and_lets_blocks_of_one_buffer_be():
    model = gpubptt.RNN(4, 4, 3, backend="numpy", seed=0)
    opt = make_optimizer("sgd", model, lr=0.1)
    _, grads = model.loss_and_grads(X, X)
    opt.step(grads)
    params = model.params
    params["W"] = params["U"][:]
    params["W"] = params["U"][:]  # the second view may take the freed first one's id: compared by object, not id
    with pytest.raises(gpubptt.InputError, match="parameters U and W share memory"):
        opt.step(grads)
    big = np.zeros((4, 8), dtype=model.dtype)  # U and W side by side in one buffer: no element in common
    params["U"], params["W"] = big[:, :4], big[:, 4:]
    opt.step(grads)
    np.testing.assert_allclose(big[:, :4], -0.1 * grads["U"], rtol=1e-6)
    np.testing.assert_allclose(big[:, 4:], -0.1 * grads["W"], rtol=1e-6)


def test_an_optimizer_pickled_before_the_shared_memory_check_still_steps():
    model = gpubptt.RNN(3, 4, 3, backend="numpy", seed=0)
    opt = make_optimizer("adam", model)
    state = opt.__getstate__()
    state.pop("_unshared", None)
    old = type(opt).__new__(type(opt))
    old.__setstate__(state)
    _, grads = old.constrain.__self__.loss_and_grads(X, X)
    assert old.step(grads).applied and old.t == 1


def test_gradients_of_another_library_keep_their_backend_error_and_a_torch_loss_is_read():
    torch = pytest.importorskip("torch")
    model = gpubptt.RNN(3, 4, 3, backend="numpy", seed=0)
    opt = make_optimizer("sgd", model, lr=0.1)
    loss, grads = model.loss_and_grads(X, X)
    with pytest.raises(gpubptt.BackendMismatchError, match=r"gradient U is a torch\.Tensor"):
        opt.step({k: torch.from_numpy(v) for k, v in grads.items()})
    result = opt.step(grads, loss=torch.tensor(float(loss)))
    assert result.applied and result.loss == pytest.approx(float(loss))
    for bad in (torch.tensor(1 + 1j), torch.tensor(True)):
        with pytest.raises(gpubptt.InputTypeError, match="loss must be one real number, got dtype torch"):
            opt.step(grads, loss=bad)
    assert opt.t == 1
