"""Every bad input gets the documented error before any work, and the model is left unchanged."""

from __future__ import annotations

import numpy as np
import pytest

import gpubptt
from tests.reference import ref_loss, ref_tutorial_truncated_grads

T, B, D, H, K = 4, 3, 5, 6, 7


@pytest.fixture
def model():
    return gpubptt.RNN(D, H, K, backend="numpy", seed=0, bias=True)


def good():
    rng = np.random.default_rng(0)
    return rng.integers(0, D, size=(T, B)), rng.integers(0, K, size=(T, B))


def snapshot(m):
    return {k: v.copy() for k, v in m.params.items()}


X, Y = good()
BAD_CALLS = [
    # (description, kwargs for loss_and_grads, error type, message fragment)
    ("x 1-d", dict(x=X[0]), gpubptt.ShapeError, "got 1 dimensions"),
    ("x 4-d", dict(x=np.zeros((T, B, D, 1))), gpubptt.ShapeError, "got 4 dimensions"),
    ("dense x wrong D", dict(x=np.zeros((T, B, D + 1))), gpubptt.ShapeError, f"(T, B, {D})"),
    ("float token ids", dict(x=X.astype(float)), gpubptt.InputTypeError, "must be integers"),
    ("int dense x", dict(x=np.zeros((T, B, D), dtype=int)), gpubptt.InputTypeError, "floating point"),
    ("token id too big", dict(x=np.where(X == X[0, 0], D, X)), gpubptt.InputError, f"[0, {D})"),
    ("negative token id", dict(x=np.where(X == X[0, 0], -1, X)), gpubptt.InputError, "found -1"),
    ("nan dense x", dict(x=np.full((T, B, D), np.nan)), gpubptt.InputError, "NaN or infinity"),
    ("y wrong shape", dict(y=Y[:, :2]), gpubptt.ShapeError, f"({T}, {B})"),
    ("float y", dict(y=Y.astype(float)), gpubptt.InputTypeError, "integers"),
    ("y too big", dict(y=np.full((T, B), K)), gpubptt.InputError, f"[0, {K})"),
    ("negative y", dict(y=np.full((T, B), -2)), gpubptt.InputError, "found -2"),
    ("s0 wrong shape", dict(s0=np.zeros((B, H + 1))), gpubptt.ShapeError, f"({B}, {H})"),
    ("s0 inf", dict(s0=np.full((B, H), np.inf)), gpubptt.InputError, "s0 contains NaN"),
    ("lengths too long", dict(lengths=np.array([T + 1, 1, 1])), gpubptt.InputError, "lengths[0] = 5"),
    ("lengths negative", dict(lengths=np.array([1, -1, 1])), gpubptt.InputError, "lengths[1] = -1"),
    ("lengths shape", dict(lengths=np.array([1, 1])), gpubptt.ShapeError, "(B,)"),
    ("float lengths", dict(lengths=np.array([1.0, 1, 1])), gpubptt.InputTypeError, "integers"),
    ("T = 0", dict(x=np.zeros((0, B), int), y=np.zeros((0, B), int)), gpubptt.ShapeError, "T=0"),
    ("B = 0", dict(x=np.zeros((T, 0), int), y=np.zeros((T, 0), int)), gpubptt.ShapeError, "B=0"),
    ("negative truncate", dict(truncate=-1), gpubptt.InputError, "truncate"),
    ("float truncate", dict(truncate=1.5), gpubptt.InputTypeError, "truncate"),
    ("bad reduction", dict(reduction="avg"), gpubptt.InputError, "reduction"),
    ("mean of nothing", dict(lengths=np.zeros(B, int), reduction="mean"), gpubptt.InputError, "counted step"),
    # finite in float64, infinite in the float32 model: refused, not a NaN loss
    ("dense x beyond float32", dict(x=np.full((T, B, D), 1e300)), gpubptt.InputError, "too large for float32"),
    ("s0 beyond float32", dict(s0=np.full((B, H), -1e39)), gpubptt.InputError, "s0 has values too large"),
    ("no targets", dict(y=None), gpubptt.InputError, "needs targets y"),
    # the offending value reported exactly, not through a float64 rounding
    ("token id 2**63 - 1", dict(x=np.where(X == X[0, 0], 2**63 - 1, X)), gpubptt.InputError, f"found {2**63 - 1}"),
    ("token id 2**53 + 1", dict(x=np.where(X == X[0, 0], 2**53 + 1, X)), gpubptt.InputError, f"found {2**53 + 1}"),
    ("uint64 token id", dict(x=np.full((T, B), 2**64 - 1, np.uint64)), gpubptt.InputError, f"found {2**64 - 1}"),
    ("uint64 target", dict(y=np.full((T, B), 2**64 - 1, np.uint64)), gpubptt.InputError, f"found {2**64 - 1}"),
    ("uint64 length", dict(lengths=np.array([1, 2**64 - 1, 1], np.uint64)), gpubptt.InputError, f"= {2**64 - 1}"),
]


@pytest.mark.parametrize("desc,kwargs,err,fragment", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_clear_error_and_leaves_model_unchanged(model, desc, kwargs, err, fragment):
    args = dict(x=X, y=Y, s0=None)
    args.update(kwargs)
    before = snapshot(model)
    with pytest.raises(err) as info:
        model.loss_and_grads(**args)
    assert fragment in str(info.value)
    assert isinstance(info.value, (ValueError, TypeError))
    for k, v in before.items():
        np.testing.assert_array_equal(model.params[k], v)


def test_loss_without_targets_names_them(model):
    with pytest.raises(gpubptt.InputError, match="needs targets y"):
        model.loss(X, None)


def test_float64_model_takes_values_beyond_float32(model):
    m64 = gpubptt.RNN.from_params(model.params, backend="numpy", dtype="float64")
    x = np.full((T, B, D), 1e300)
    loss, grads = m64.loss_and_grads(x, Y)  # representable in float64: tanh saturates, the loss is finite
    p64 = {k: np.asarray(v) for k, v in m64.params.items()}
    assert float(loss) == pytest.approx(ref_loss(p64, x, Y), rel=1e-12)
    assert not p64["b"].any() and not p64["c"].any()  # wildml init: zero biases, which the loops leave out
    want = ref_tutorial_truncated_grads(p64, x, Y, truncate=T)
    for k in ("U", "W", "V", "s0"):  # dU = Σ δ xᵀ with x = 1e300: tolerances relative to each scale
        np.testing.assert_allclose(grads[k], want[k], rtol=1e-9, atol=1e-12 * max(1.0, np.abs(want[k]).max()))


def test_unsigned_token_ids_in_range_are_read_as_ids(model):
    loss_u, grads_u = model.loss_and_grads(X.astype(np.uint64), Y.astype(np.uint64), lengths=np.full(B, T, np.uint64))
    loss, grads = model.loss_and_grads(X, Y)
    assert float(loss_u) == float(loss)
    for k in grads:
        np.testing.assert_array_equal(grads_u[k], grads[k])


@pytest.mark.parametrize(
    "kwargs,err,fragment",
    [
        (dict(eps=0.0), gpubptt.InputError, "eps must lie in"),
        (dict(eps=-1e-5), gpubptt.InputError, "eps must lie in"),
        (dict(eps=float("nan")), gpubptt.InputError, "eps must lie in"),
        (dict(eps=2.0), gpubptt.InputError, "eps must lie in"),
        (dict(eps="1e-5"), gpubptt.InputTypeError, "eps must be a number"),
        (dict(max_coords=-1), gpubptt.InputError, "max_coords"),
        (dict(max_coords=0), gpubptt.InputError, "max_coords"),
        (dict(max_coords=2.5), gpubptt.InputTypeError, "max_coords"),
        (dict(seed=-1), gpubptt.InputError, "seed"),
    ],
)
def test_gradcheck_refuses_bad_settings(model, kwargs, err, fragment):
    with pytest.raises(err, match=fragment):
        gpubptt.gradcheck(model, X, Y, **kwargs)


def test_negative_seed_is_refused():
    with pytest.raises(gpubptt.InputError, match="seed must be None or an int ≥ 0"):
        gpubptt.RNN(D, H, K, seed=-1)


@pytest.mark.parametrize(
    "name,value,err,fragment",
    [
        ("W", np.zeros((H, H + 1)), gpubptt.ShapeError, f"must have shape ({H}, {H})"),
        ("W", np.zeros(H), gpubptt.ShapeError, "must have shape"),
        ("U", np.zeros((H, D), dtype=int), gpubptt.InputTypeError, "floating point"),
        ("V", np.full((K, H), np.nan), gpubptt.InputError, "NaN or infinity"),
        ("V", np.full((K, H), 1e300), gpubptt.InputError, "too large for float32"),
        ("Q", np.zeros((H, H)), gpubptt.InputError, "unknown parameter 'Q'"),
    ],
)
def test_assigning_a_bad_parameter_is_refused_and_keeps_the_old_one(model, name, value, err, fragment):
    before = snapshot(model)
    with pytest.raises(err) as info:
        model.params[name] = value
    assert fragment in str(info.value)
    assert set(model.params) == set(before)
    for k, v in before.items():
        np.testing.assert_array_equal(model.params[k], v)


def test_parameters_cannot_be_removed(model):
    with pytest.raises(gpubptt.InputError, match="cannot be removed"):
        del model.params["b"]
    assert "b" in model.params


def test_assigned_parameter_is_used_in_the_models_dtype(model):
    W = np.random.default_rng(1).uniform(-0.5, 0.5, size=(H, H))  # float64 into a float32 model
    model.params["W"] = W
    assert model.params["W"].dtype == np.float32
    fresh = gpubptt.RNN.from_params({**model.params, "W": W.astype(np.float32)}, backend="numpy")
    assert float(model.loss(X, Y)) == float(fresh.loss(X, Y))


def test_from_params_refuses_values_beyond_float32(model):
    p = {k: v.astype(np.float64) for k, v in model.params.items()}
    p["U"][0, 0] = 1e300
    with pytest.raises(gpubptt.InputError, match="parameter U has values too large for float32"):
        gpubptt.RNN.from_params(p, backend="numpy", dtype="float32")


def test_padded_targets_may_hold_anything(model):
    y = Y.copy()
    y[2:, 0] = 10**6
    y[:, 1] = -5
    lengths = np.array([2, 0, T])
    loss, _ = model.loss_and_grads(X, y, lengths=lengths)
    p64 = {k: v.astype(np.float64) for k, v in model.params.items()}
    assert float(loss) == pytest.approx(ref_loss(p64, X, y, lengths=lengths), rel=1e-5)  # reads counted steps only


def test_arrays_from_another_library_are_refused(model):
    class Foreign:
        def __array__(self, dtype=None, copy=None):
            return X

    with pytest.raises(gpubptt.BackendMismatchError, match="numpy backend"):
        model.loss_and_grads(Foreign(), Y)


def test_numpy_input_to_cupy_model_is_refused(cupy_be):
    m = gpubptt.RNN(D, H, K, backend=cupy_be, seed=0)
    with pytest.raises(gpubptt.BackendMismatchError, match="cupy backend"):
        m.loss_and_grads(X, cupy_be.asarray(Y))


def test_cupy_wraps_out_of_range_ids_but_we_refuse_them(cupy_be):
    m = gpubptt.RNN(D, H, K, backend=cupy_be, seed=0)
    with pytest.raises(gpubptt.InputError, match=f"found {D}"):
        m.loss_and_grads(cupy_be.asarray(np.where(X == X[0, 0], D, X)), cupy_be.asarray(Y))


@pytest.mark.parametrize(
    "kwargs,err,fragment",
    [
        (dict(dtype="float16"), gpubptt.InputError, "float16"),
        (dict(dtype="bogus"), gpubptt.InputError, "dtype"),
        (dict(init="xavier"), gpubptt.InputError, "unknown init"),
        (dict(backend="tpu"), gpubptt.InputError, "unknown backend"),
        (dict(bias="yes"), gpubptt.InputTypeError, "bias"),
    ],
)
def test_bad_constructor_arguments(kwargs, err, fragment):
    with pytest.raises(err, match=fragment):
        gpubptt.RNN(D, H, K, **kwargs)


@pytest.mark.parametrize("sizes", [(0, 3, 3), (3, -1, 3), (3, 3, 2.5)])
def test_bad_sizes(sizes):
    with pytest.raises((gpubptt.InputError, gpubptt.InputTypeError)):
        gpubptt.RNN(*sizes)


def test_from_params_checks_names_and_shapes(model):
    p = {k: v.copy() for k, v in model.params.items()}
    with pytest.raises(gpubptt.ShapeError, match="parameter W must have shape"):
        gpubptt.RNN.from_params({**p, "W": np.zeros((H, H + 1))}, backend="numpy")
    with pytest.raises(gpubptt.InputError, match="unknown parameter"):
        gpubptt.RNN.from_params({**p, "Q": p["W"]}, backend="numpy")
    with pytest.raises(gpubptt.InputError, match="both biases"):
        gpubptt.RNN.from_params({k: p[k] for k in ("U", "W", "V", "b")}, backend="numpy")
    with pytest.raises(gpubptt.InputError, match="missing"):
        gpubptt.RNN.from_params({"U": p["U"]}, backend="numpy")


def test_per_model_kernel_settings_are_checked_before_any_work(model):
    model.step_kernels = "fastest"
    with pytest.raises(gpubptt.InputError, match="step_kernels must be one of auto, cublas, fused, persistent"):
        model.loss_and_grads(X, Y)
    model.step_kernels, model.chunk_elements = None, 0
    with pytest.raises(gpubptt.InputError, match="chunk_elements must be ≥ 1"):
        model.loss(X, Y)


def test_params_copy_deepcopy_and_whole_assignment(model):
    import copy

    plain = model.params.copy()
    assert isinstance(plain, dict) and all(plain[k] is model.params[k] for k in plain)
    deep = copy.deepcopy(model.params)
    assert isinstance(deep, dict) and all(deep[k] is not model.params[k] for k in deep)
    for k in deep:
        np.testing.assert_array_equal(deep[k], model.params[k])
    before = snapshot(model)
    with pytest.raises(gpubptt.ShapeError):  # one bad array: nothing is replaced
        model.params = {**deep, "W": np.zeros((H, H)), "V": np.zeros((1, 1))}
    with pytest.raises(gpubptt.InputError, match="exactly U, W, V, b, c"):
        model.params = {"U": deep["U"]}
    for k, v in before.items():
        np.testing.assert_array_equal(model.params[k], v)
    model.params = {k: v * 0.5 for k, v in deep.items()}
    np.testing.assert_allclose(model.params["W"], before["W"] * 0.5)
