"""Issue 18, the API's part: overflowing updates, sizes refused before building, checkpoint members checked
before inflating, gpubptt errors instead of NumPy's or torch's, models that copy and pickle."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import pickle
import tracemalloc
import zipfile

import numpy as np
import pytest
from typer.testing import CliRunner

import gpubptt
import gpubptt.training.loop
import gpubptt.training.optim
import gpubptt.training.run
from gpubptt.backend import get_backend
from gpubptt.cli import app
from gpubptt.engine.memory import MAX_LAYERS, InsufficientMemoryError
from gpubptt.errors import CheckpointError, InputError, InputTypeError, ShapeError
from gpubptt.training.data import TextData, default_corpus
from gpubptt.training.loop import TrainConfig, evaluate, train
from gpubptt.training.optim import SGD, Adam, NonFiniteError
from gpubptt.training.record import load_checkpoint, save_checkpoint

runner = CliRunner()
F32_MAX = float(np.finfo(np.float32).max)


def _copies(arrays):
    return {k: np.array(v) for k, v in arrays.items()}


def _assert_same(arrays, before):
    assert set(arrays) == set(before)
    for k, v in arrays.items():
        np.testing.assert_array_equal(np.asarray(v), before[k])


# -- item 2: an update that overflows the weights ------------------------------------------------


@pytest.fixture
def huge_lr(monkeypatch):
    """Lets a learning rate past LR_MAX through, as before the bound: the guard behind it is what is tested."""
    for module in (
        gpubptt.training.run,
        gpubptt.training.loop,
        gpubptt.training.optim,
        gpubptt.training._optim_settings,
    ):
        monkeypatch.setattr(module, "LR_MAX", math.inf, raising=False)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_an_update_that_overflows_the_weights_is_refused_and_changes_nothing(huge_lr, momentum):
    # finite weights and finite gradients (their norm too): only p − lr·v overflows float32
    params = {"U": np.full((2, 3), 2.5e38, dtype=np.float32), "W": np.ones((2, 2), dtype=np.float32)}
    grads = {"U": np.full((2, 3), -1.0, dtype=np.float32), "W": np.ones((2, 2), dtype=np.float32)}
    assert 2.5e38 + 1e38 > F32_MAX  # the reference: SGD's new U is past float32's range, its new W is not
    opt = SGD(params, lr=1e38, momentum=momentum)
    before, state_before = _copies(params), _copies(opt.state_dict())
    with pytest.raises(NonFiniteError, match=r"step 1: the update would overflow parameter U ") as info:
        opt.step(grads, loss=np.float32(1.0))
    assert "W" not in str(info.value).split("(")[0] and "clip the gradients" in str(info.value)
    _assert_same(params, before)
    _assert_same(opt.state_dict(), state_before)
    assert opt.t == 0
    opt.on_nonfinite = "skip"
    res = opt.step(grads, loss=np.float32(1.0))
    assert not res.applied and res.nonfinite == ("updated.U",) and res.loss == 1.0
    _assert_same(params, before)
    _assert_same(opt.state_dict(), state_before)
    # the guard does not get in the way of a normal step, which then matches the formula
    res = opt.step({"U": np.zeros((2, 3), np.float32), "W": np.ones((2, 2), np.float32)}, loss=np.float32(1.0))
    assert res.applied and opt.t == 1
    np.testing.assert_array_equal(params["W"], before["W"] - np.float32(1e38))
    np.testing.assert_array_equal(params["U"], before["U"])


def test_the_step_and_its_state_match_the_formulas_after_a_refused_step():
    """Adam's bias correction counts applied steps only: a refused step leaves t, m and v as they were."""
    p = {"W": np.array([1.0, -2.0], dtype=np.float64)}
    opt = Adam(p, lr=0.1, on_nonfinite="skip")
    assert not opt.step({"W": np.array([np.nan, 1.0])}).applied
    g = np.array([0.5, -0.25])
    opt.step({"W": g.copy()})
    m, v = 0.1 * g, 0.001 * g**2  # one applied step: t = 1
    expected = np.array([1.0, -2.0]) - 0.1 * (m / 0.1) / (np.sqrt(v / 0.001) + 1e-8)
    np.testing.assert_allclose(p["W"], expected, rtol=1e-14)
    assert opt.t == 1


def test_save_checkpoint_refuses_non_finite_parameters_and_keeps_the_file(tmp_path):
    model = gpubptt.RNN(3, 4, 3, backend="numpy", seed=0)
    path = save_checkpoint(tmp_path / "ck.npz", model)
    raw = path.read_bytes()
    model.params["W"][0, 0] = np.inf  # in place, as an overflowing update would have written it
    with pytest.raises(CheckpointError, match=r"param\.W contains NaN or infinity"):
        save_checkpoint(path, model)
    assert path.read_bytes() == raw
    model.params["W"][0, 0] = 0.0
    opt = SGD(model, lr=0.1, momentum=0.5)
    opt.state["momentum"]["V"][0, 0] = np.nan
    with pytest.raises(CheckpointError, match=r"optim\.momentum\.V"):
        save_checkpoint(path, model, optimizer=opt)
    assert path.read_bytes() == raw


@pytest.mark.parametrize("lr", [1e38, 1e4, math.inf, 0.0, -1.0])
def test_absurd_learning_rates_are_refused_up_front_naming_the_sensible_range(lr):
    model = gpubptt.RNN(3, 4, 3, backend="numpy", seed=0)
    for build in (lambda: SGD(model, lr=lr), lambda: TrainConfig(lr=lr)):
        with pytest.raises(InputError, match=r"lr must be a finite number in \(0, 1000\].*sensible values"):
            build()
    result = runner.invoke(app, ["train", "--backend", "numpy", "--steps", "1", "--lr", str(lr)])
    assert result.exit_code == 2 and "--lr must be a finite number in (0, 1000]" in result.output, result.output


def test_train_with_skip_never_saves_overflowed_weights(huge_lr, tmp_path):
    """The issue's run (an lr past the bound, let through here on purpose): every step is skipped, the
    weights stay the initial ones and the checkpoint it writes loads."""
    path = tmp_path / "ck.npz"
    args = ["train", "--backend", "numpy", "--lr", "1e38", "--cell", "gru", "--task", "recall", "--on-nonfinite",
            "skip", "--hidden", "8", "--batch", "4", "--steps", "3", "--checkpoint", str(path)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    ck = load_checkpoint(path, backend="numpy")  # was: "parameter U contains NaN or infinity"
    assert ck.history.skipped == 3
    for k, p in ck.model.params.items():
        assert np.isfinite(p).all(), k


@pytest.fixture(scope="module")
def long_text():
    return TextData(default_corpus(60_000))  # held-out streams longer than one evaluation chunk: a carried state


def test_a_weight_overflow_in_text_training_names_its_cause_and_step(huge_lr, long_text):
    """Adam at lr 1e38 (the issue's run): the first update overflows and is refused as such, at step 1."""
    for on_nonfinite in ("raise", "skip"):
        model = gpubptt.RNN(long_text.input_size, 16, long_text.output_size, backend="numpy", bias=True, seed=0)
        before = _copies(model.params)
        opt = Adam(model, lr=1e38, on_nonfinite=on_nonfinite)
        config = TrainConfig(steps=2, batch_size=4, chunk=64, max_norm=None, lr=1e38, eval_every=0)
        if on_nonfinite == "raise":
            with pytest.raises(NonFiniteError) as info:
                train(model, long_text, opt, config)  # was: "step 2: non-finite U (contains NaN ...)"
            message = str(info.value)
            assert message.startswith("step 1: the update would overflow parameters U, W, V"), message
            assert "s0" not in message and "initial state" not in message
        else:  # was: "s0 contains NaN or infinity; the initial state must be finite" from the evaluation
            _, history = train(model, long_text, opt, config)
            assert history.skipped == 2 and opt.t == 0 and math.isfinite(history.eval_loss[-1])
        _assert_same(model.params, before)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_an_evaluation_whose_state_overflows_names_the_weights_not_s0(long_text):
    model = gpubptt.RNN(long_text.input_size, 16, long_text.output_size, backend="numpy", bias=True, seed=0)
    rng = np.random.default_rng(1)
    for k in ("U", "W", "b"):  # finite weights whose sums overflow float32 both ways: inf − inf in the states
        model.params[k] = np.sign(rng.uniform(-1, 1, model.params[k].shape)) * 3e38
    with pytest.raises(NonFiniteError, match=r"^evaluation: the model's states overflow to NaN or infinity") as info:
        evaluate(model, long_text)  # was: "s0 contains NaN or infinity; the initial state must be finite"
    assert "3e+38" in str(info.value) and "s0" not in str(info.value)


# -- item 12: all or nothing, read-only arrays ---------------------------------------------------


def test_a_read_only_parameter_is_copied_and_the_step_updates_every_parameter():
    model = gpubptt.RNN(3, 4, 3, backend="numpy", dtype="float64", seed=0)
    frozen = np.array(model.params["V"])
    frozen.flags.writeable = False
    model.params["V"] = frozen  # was: kept as is, then the step failed half-way with U updated
    opt = SGD(model, lr=0.5)
    x = np.zeros((4, 2), dtype=np.int64)
    before = _copies(model.params)
    loss, grads = model.loss_and_grads(x, x)
    assert opt.step(grads, loss=loss).applied and opt.t == 1
    for k in model.params:  # the hand-written SGD update, for every parameter
        np.testing.assert_allclose(model.params[k], before[k] - 0.5 * grads[k], rtol=1e-15)
    np.testing.assert_array_equal(frozen, before["V"])  # the caller's array is untouched


def test_an_optimizer_step_is_all_or_nothing():
    params = {"U": np.ones(3), "W": np.ones(2)}
    opt = Adam(params, lr=0.1)
    before, state_before = _copies(params), _copies(opt.state_dict())
    bad = [
        ({"U": np.ones(3), "W": [1.0, 1.0]}, InputTypeError, "gradient W"),
        ({"U": np.ones(3), "W": np.ones(3)}, ShapeError, r"gradient W has shape \(3,\), expected \(2,\)"),
        ({"U": np.ones(3)}, InputError, r"grads is missing \['W'\]"),
    ]
    for grads, error, message in bad:
        with pytest.raises(error, match=message):
            opt.step(grads)
        _assert_same(params, before)
        _assert_same(opt.state_dict(), state_before)
        assert opt.t == 0
    frozen = np.ones(2)
    frozen.flags.writeable = False
    with pytest.raises(InputError, match="parameter W is a read-only array"):
        SGD({"U": np.ones(3), "W": frozen}, lr=0.1)


# -- items 4 and 12: sizes refused before anything is built --------------------------------------


def test_a_model_too_large_for_memory_is_refused_before_anything_is_allocated(monkeypatch):
    with pytest.raises(InsufficientMemoryError, match=r"a model of D=5, H=1000000, K=6.* is available"):
        gpubptt.RNN(5, 10**6, 6, backend="numpy")  # 10^12 parameters: was a MemoryError
    be = get_backend("numpy")
    monkeypatch.setattr(be, "available_memory", lambda: 8 * 2**30)  # a machine with 8 GiB free
    with pytest.raises(InsufficientMemoryError, match=r"H=30000.*8\.6 GB is available"):
        gpubptt.RNN(5, 30000, 6, cell="lstm", backend=be)  # 3.6·10^9 parameters, 43 GB with the float64 draw


def test_a_stack_deeper_than_the_limit_is_refused_by_the_model_the_loader_and_vanish():
    with pytest.raises(InputError, match=rf"num_layers=10000000 is above the limit of {MAX_LAYERS} layers"):
        gpubptt.RNN(5, 4, 6, num_layers=10**7, backend="numpy")  # was: minutes building a dict
    deep = {"U": np.ones((1, 1)), "W": np.ones((1, 1)), "V": np.ones((1, 1))}
    for layer in range(1, MAX_LAYERS + 1):
        deep[f"U_l{layer}"], deep[f"W_l{layer}"] = np.ones((1, 1)), np.ones((1, 1))
    with pytest.raises(InputError, match=f"num_layers={MAX_LAYERS + 1} is above the limit"):
        gpubptt.RNN.from_params(deep, backend="numpy")
    result = runner.invoke(app, ["vanish", "--backend", "numpy", "--layers", "100000", "--hidden", "4"])
    assert result.exit_code == 2 and f"above the limit of {MAX_LAYERS} layers" in result.output, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output  # one line, the CLI's limit


@pytest.mark.parametrize("cell, gates", [("gru", 3), ("lstm", 4)])
def test_a_huge_memory_estimate_of_a_gated_cell_is_computed_without_arrays(cell, gates):
    model = gpubptt.RNN(3, 4, 3, cell=cell, backend="numpy", seed=0)
    T, B, H = 10**12, 10**6, 4
    est = model.memory_estimate(T, B)  # was: "array is too big"
    assert est.total >= T * B * gates * H * 4  # at least the (T, B, G·H) gate buffer in float32
    assert math.isfinite(float(est.total))


def test_a_ragged_nested_list_as_x_is_refused_naming_it():
    model = gpubptt.RNN(3, 4, 3, backend="numpy", seed=0)
    with pytest.raises(ShapeError, match="x is a ragged nested sequence"):
        model.forward([[0, 1], [1]])
    with pytest.raises(ShapeError, match="y is a ragged nested sequence"):
        model.loss_and_grads([[0, 1], [1, 2]], [[0, 1], [1]])


# -- item 12: torch interchange ------------------------------------------------------------------


def test_to_torch_checks_the_gradients_naming_the_key_or_shape():
    model = gpubptt.RNN(3, 4, 3, backend="numpy", seed=0, bias=False)
    x = np.zeros((2, 1), dtype=np.int64)
    _, grads = model.loss_and_grads(x, x)
    cases = [
        ({}, InputError, r"grads is missing \['U', 'W', 'V'\]"),
        ([1], InputTypeError, "grads must be a mapping"),
        ({k: v for k, v in grads.items() if k != "V"}, InputError, r"missing \['V'\]"),
        ({**grads, "W": np.zeros((4, 3))}, ShapeError, r"gradient W has shape \(4, 3\), expected \(4, 4\)"),
        ({**grads, "Z": np.zeros(1)}, InputError, r"unknown keys \['Z'\]"),
        ({**grads, "U": 1.0}, InputTypeError, "gradient U must be an array"),
    ]
    for g, error, message in cases:
        with pytest.raises(error, match=message):
            model.to_torch(grads=g)
    rnn, _ = model.to_torch(grads=grads)  # the valid ones still pass
    np.testing.assert_array_equal(rnn["weight_hh_l0"], grads["W"])


def test_from_torch_refuses_a_key_that_is_not_torchs():
    model = gpubptt.RNN(3, 4, 3, backend="numpy", seed=0)
    rnn, lin = model.to_torch()
    rnn["weight_hh_l00"] = rnn["weight_hh_l0"]  # was: silently taken as layer 0 again
    with pytest.raises(InputError, match="unexpected key 'weight_hh_l00'"):
        gpubptt.RNN.from_torch(rnn, lin, backend="numpy")


def test_from_torch_widens_bfloat16_weights_exactly():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    rnn, lin = torch.nn.GRU(3, 4).to(torch.bfloat16), torch.nn.Linear(4, 5).to(torch.bfloat16)
    model = gpubptt.RNN.from_torch(rnn.state_dict(), lin.state_dict(), cell="gru", backend="numpy")
    assert model.dtype == np.float32
    np.testing.assert_array_equal(model.params["W"], rnn.weight_hh_l0.detach().float().numpy())  # torch's own widening
    np.testing.assert_array_equal(model.params["V"], lin.weight.detach().float().numpy())


# -- item 12: copies ---------------------------------------------------------------------------


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_a_model_copies_and_pickles_into_an_equal_independent_model(clone):
    model = gpubptt.RNN(3, 4, 3, cell="gru", num_layers=2, dropout=0.25, bias=True, backend="numpy", seed=0)
    x = np.array([[0, 1], [2, 0], [1, 1]], dtype=np.int64)
    model.loss_and_grads(x, x)  # a workspace is cached: it is not copied
    twin = clone(model)
    assert twin is not model and twin.params["W"] is not model.params["W"]
    for name in ("cell_name", "num_layers", "bidirectional", "dropout", "dtype", "bias", "init", "hidden_size"):
        assert getattr(twin, name) == getattr(model, name), name
    _assert_same(twin.params, _copies(model.params))
    # the same function and the same dropout masks (from a seed) as the original
    loss, grads = model.loss_and_grads(x, x, dropout_seed=7)
    loss2, grads2 = twin.loss_and_grads(x, x, dropout_seed=7)
    assert float(loss) == float(loss2)
    for k in grads:
        np.testing.assert_array_equal(grads[k], grads2[k])
    # it trains on its own: the original keeps its weights
    before = _copies(model.params)
    SGD(twin, lr=0.5).step(grads2, loss=loss2)
    _assert_same(model.params, before)
    assert not np.array_equal(twin.params["W"], model.params["W"])


# -- item 11 and 13: checkpoint members checked before they are inflated -------------------------


@pytest.fixture
def small_ck(tmp_path):
    return save_checkpoint(tmp_path / "small.npz", gpubptt.RNN(3, 4, 3, backend="numpy", seed=0))


def _with_member(src, dst, name, data, compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info))
        zout.writestr(zipfile.ZipInfo(name), data, compress_type=compress)
    return dst


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_a_highly_compressed_member_is_refused_before_it_is_inflated(small_ck, tmp_path):
    bomb = _with_member(
        small_ck, tmp_path / "bomb.npz", "history.extra.npy", _npy(np.zeros(1 << 19)), zipfile.ZIP_DEFLATED
    )
    assert bomb.stat().st_size < 40_000  # 4 MiB of zeros in a few kB
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"more than 100 times its size .* refused before inflating"):
            load_checkpoint(bomb, backend="numpy")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # never near the 4 MiB the member would inflate to


def test_a_member_larger_or_smaller_than_its_header_implies_is_refused(small_ck, tmp_path):
    good = _npy(np.arange(3.0))
    for data in (good + b"\0" * 4096, good[:-8]):
        path = _with_member(small_ck, tmp_path / "bad.npz", "history.extra.npy", data)
        with pytest.raises(CheckpointError, match=r"entry 'history\.extra' declares \d+ bytes, but its \.npy header"):
            load_checkpoint(path, backend="numpy")


def test_member_names_are_checked(small_ck, tmp_path):
    for name, message in [("../up.npy", "is not a gpubptt entry name"), ("param.W.npy", "appears twice")]:
        with pytest.warns(UserWarning) if name == "param.W.npy" else contextlib.nullcontext():
            path = _with_member(small_ck, tmp_path / "bad.npz", name, _npy(np.zeros((4, 4), np.float32)))
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path, backend="numpy")


def test_a_malformed_npy_header_is_reported_as_malformed(small_ck, tmp_path):
    raw = bytearray(_npy(np.arange(3.0)))
    start = raw.index(b"{")
    raw[start : start + 6] = b"{'dexr"  # the header dict no longer parses
    path = _with_member(small_ck, tmp_path / "bad.npz", "history.extra.npy", bytes(raw))
    with pytest.raises(CheckpointError, match=r"entry 'history\.extra' has a malformed \.npy header") as info:
        load_checkpoint(path, backend="numpy")
    assert "Python objects" not in str(info.value) and "pickle" not in str(info.value)
