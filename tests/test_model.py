"""RNN construction, forward semantics, and backend parity."""

from __future__ import annotations

import numpy as np
import pytest

import gpubptt
from tests.reference import ref_forward_one, ref_loss, ref_tutorial_truncated_grads


def test_forward_matches_per_sequence_reference(be, xp):
    rng = np.random.default_rng(0)
    model = gpubptt.RNN(7, 6, 5, backend=be, dtype="float64", bias=True, init="torch", seed=1)
    x = rng.integers(0, 7, size=(8, 4))
    s0 = rng.normal(size=(4, 6)) * 0.3
    lengths = np.array([8, 3, 0, 5])
    out = model.forward(be.asarray(x), be.asarray(s0), lengths=be.asarray(lengths))
    p = {k: gpubptt.to_numpy(v) for k, v in model.params.items()}
    states, probs = gpubptt.to_numpy(out.states), gpubptt.to_numpy(out.probs)
    for b in range(4):
        n = lengths[b]
        ref = ref_forward_one(p, x[:n, b], s0[b])
        for t in range(8):
            if t < n:
                np.testing.assert_allclose(states[t, b], ref[t], rtol=1e-12)
                z = p["V"] @ ref[t] + p["c"]
                np.testing.assert_allclose(probs[t, b], np.exp(z - z.max()) / np.exp(z - z.max()).sum(), rtol=1e-12)
            else:
                assert np.all(states[t, b] == 0) and np.all(probs[t, b] == 0)
        want_final = ref[n - 1] if n else s0[b]
        np.testing.assert_allclose(gpubptt.to_numpy(out.final_state)[b], want_final, rtol=1e-12)


def test_loss_matches_reference_and_is_0d_on_backend(be, xp):
    rng = np.random.default_rng(1)
    model = gpubptt.RNN(4, 5, 6, backend=be, dtype="float64", seed=2)
    x = rng.normal(size=(6, 3, 4))
    y = rng.integers(0, 6, size=(6, 3))
    loss = model.loss(be.asarray(x), be.asarray(y))
    assert isinstance(loss, xp.ndarray) and loss.ndim == 0
    p = {k: gpubptt.to_numpy(v) for k, v in model.params.items()}
    assert float(loss) == pytest.approx(ref_loss(p, x, y), rel=1e-12)


def test_softmax_is_stable_for_huge_logits():
    model = gpubptt.RNN(3, 4, 3, backend="numpy", dtype="float32", seed=0)
    model.params["V"][...] = 1e4 * np.arange(12, dtype=np.float32).reshape(3, 4)
    x = np.array([[0], [1], [2]])
    loss, grads = model.loss_and_grads(x, x)
    p64 = {k: v.astype(np.float64) for k, v in model.params.items()}  # the same weights, in float64
    # logits of order 1e4: exp overflows without the max shift; the float64 loops shift, so they are exact
    assert float(loss) == pytest.approx(ref_loss(p64, x, x), rel=1e-5)
    want = ref_tutorial_truncated_grads(p64, x, x, truncate=len(x))
    for k in ("U", "W", "V", "s0"):
        scale = max(np.abs(want[k]).max(), 1.0)
        np.testing.assert_allclose(grads[k], want[k], rtol=1e-4, atol=1e-5 * scale, err_msg=k)
    states = ref_forward_one(p64, x[:, 0], np.zeros(4))
    for t, s in enumerate(states):
        z = p64["V"] @ s
        e = np.exp(z - z.max())
        np.testing.assert_allclose(model.forward(x).probs[t, 0], e / e.sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["wildml", "torch"])
def test_init_presets_have_their_bounds(init):
    D, H, K = 50, 40, 30
    m = gpubptt.RNN(D, H, K, backend="numpy", init=init, bias=True, seed=0, dtype="float64")
    bound = {"U": 1 / np.sqrt(D) if init == "wildml" else 1 / np.sqrt(H), "W": 1 / np.sqrt(H), "V": 1 / np.sqrt(H)}
    for k, a in bound.items():
        p = m.params[k]
        assert np.abs(p).max() <= a and np.abs(p).max() > 0.9 * a, k
    if init == "wildml":
        assert not m.params["b"].any() and not m.params["c"].any()
    else:
        assert np.abs(m.params["b"]).max() <= 1 / np.sqrt(H) and m.params["b"].any()


def test_seed_gives_identical_weights_and_parameter_shapes():
    a = gpubptt.RNN(5, 7, 3, backend="numpy", seed=3, bias=True)
    b = gpubptt.RNN(5, 7, 3, backend="numpy", seed=3, bias=True)
    shapes = {k: v.shape for k, v in a.params.items()}
    assert shapes == {"U": (7, 5), "W": (7, 7), "V": (3, 7), "b": (7,), "c": (3,)}
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
        assert a.params[k].dtype == np.float32


def test_from_params_round_trip_and_copies():
    a = gpubptt.RNN(5, 7, 3, backend="numpy", seed=3, dtype="float64")
    b = gpubptt.RNN.from_params(a.params, backend="numpy")
    assert b.dtype == np.float64 and (b.input_size, b.hidden_size, b.output_size) == (5, 7, 3)
    b.params["W"][0, 0] += 1
    assert a.params["W"][0, 0] != b.params["W"][0, 0]
    assert "RNN(input_size=5, hidden_size=7, output_size=3" in repr(b)


@pytest.mark.gpu
def test_cupy_matches_numpy(cupy_be):
    be = cupy_be
    rng = np.random.default_rng(5)
    ref = gpubptt.RNN(20, 32, 15, backend="numpy", dtype="float64", bias=True, seed=4)
    gpu = ref.to(be)
    for tokens in (True, False):
        x = rng.integers(0, 20, size=(12, 6)) if tokens else rng.normal(size=(12, 6, 20))
        y = rng.integers(0, 15, size=(12, 6))
        s0 = rng.normal(size=(6, 32)) * 0.2
        lengths = np.array([12, 5, 0, 1, 12, 7])
        for truncate in (None, 0, 3):
            l1, g1 = ref.loss_and_grads(x, y, s0, lengths=lengths, truncate=truncate)
            l2, g2 = gpu.loss_and_grads(
                be.asarray(x), be.asarray(y), be.asarray(s0), lengths=be.asarray(lengths), truncate=truncate
            )
            assert float(l2) == pytest.approx(float(l1), rel=1e-12)
            for k in g1:
                np.testing.assert_allclose(gpubptt.to_numpy(g2[k]), g1[k], rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
def test_cupy_float32_matches_float64_reference(cupy_be):
    be = cupy_be
    rng = np.random.default_rng(6)
    ref = gpubptt.RNN(50, 64, 40, backend="numpy", dtype="float64", seed=5)
    gpu = gpubptt.RNN.from_params(ref.params, backend=be, dtype="float32")
    x = rng.integers(0, 50, size=(30, 16))
    y = rng.integers(0, 40, size=(30, 16))
    l1, g1 = ref.loss_and_grads(x, y)
    l2, g2 = gpu.loss_and_grads(be.asarray(x), be.asarray(y))
    eps = np.finfo(np.float32).eps
    assert abs(float(l2) - float(l1)) <= 100 * eps * abs(float(l1))
    for k in g1:
        g = gpubptt.to_numpy(g2[k])
        assert np.linalg.norm(g - g1[k]) / np.linalg.norm(g1[k]) < 1000 * eps, k


@pytest.mark.gpu
def test_cuda_graph_replay_matches_plain_loop(cupy_be):
    """The captured graph computes what the uncaptured loop computes, and follows in-place updates."""
    be = cupy_be
    rng = np.random.default_rng(7)
    graph = gpubptt.RNN(30, 48, 20, backend=be, dtype="float64", bias=True, seed=6)
    plain = gpubptt.RNN.from_params(graph.params, backend=be)
    plain.use_graphs = False
    for tokens, truncate in [(True, None), (False, None), (True, 2)]:
        for trial in range(3):  # first call captures, later calls replay on new data
            x = rng.integers(0, 30, size=(16, 8)) if tokens else rng.normal(size=(16, 8, 30))
            y = rng.integers(0, 20, size=(16, 8))
            lengths = rng.integers(0, 17, size=8)
            args = (be.asarray(x), be.asarray(y), be.asarray(rng.normal(size=(8, 48)) * 0.1))
            kw = dict(lengths=be.asarray(lengths), truncate=truncate, reduction="mean" if trial else "sum")
            l1, g1 = graph.loss_and_grads(*args, **kw)
            l2, g2 = plain.loss_and_grads(*args, **kw)
            assert float(l1) == pytest.approx(float(l2), rel=1e-12)
            for k in g1:
                np.testing.assert_allclose(gpubptt.to_numpy(g1[k]), gpubptt.to_numpy(g2[k]), rtol=1e-10, atol=1e-13)
    assert graph.workspaces() and all(w["captured"] for w in graph.workspaces())
    # an in-place update is read by the replay; a replaced array triggers a new capture
    x = be.asarray(rng.integers(0, 30, size=(16, 8)))
    y = be.asarray(rng.integers(0, 20, size=(16, 8)))
    graph.params["W"] *= 1.5
    plain.params["W"] *= 1.5
    assert float(graph.loss_and_grads(x, y)[0]) == pytest.approx(float(plain.loss_and_grads(x, y)[0]), rel=1e-12)
    graph.params["V"] = graph.params["V"] * 0.5
    plain.params["V"] = plain.params["V"] * 0.5
    assert float(graph.loss_and_grads(x, y)[0]) == pytest.approx(float(plain.loss_and_grads(x, y)[0]), rel=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("kernels", ["cublas", "fused", "persistent", "auto"])
@pytest.mark.parametrize("B,H", [(3, 37), (16, 128), (5, 100), (200, 33)])
def test_cupy_step_kernels_match_float64_numpy(cupy_be, kernels, B, H, nonlinearity):
    """Every way of running the recurrences (cuBLAS + fused tanh, one fused kernel per step, one
    persistent kernel for all steps, the timed choice) is exact; B = 200 puts 2 rows in a block."""
    rng = np.random.default_rng(B * H)
    ref = gpubptt.RNN(11, H, 9, backend="numpy", dtype="float64", bias=True, seed=1, nonlinearity=nonlinearity)
    x = rng.integers(0, 11, size=(13, B))
    y = rng.integers(0, 9, size=(13, B))
    s0 = rng.normal(size=(B, H)) * 0.3
    l_ref, g_ref = ref.loss_and_grads(x, y, s0)
    for dtype, tol in (("float64", 1e-11), ("float32", 1e-4)):
        for graphs in (False, True):
            gpu = gpubptt.RNN.from_params(ref.params, backend=cupy_be, dtype=dtype, nonlinearity=nonlinearity)
            gpu.use_graphs = graphs
            gpu.step_kernels = kernels
            loss, grads = gpu.loss_and_grads(cupy_be.asarray(x), cupy_be.asarray(y), cupy_be.asarray(s0))
            assert abs(float(loss) - float(l_ref)) <= tol * abs(float(l_ref))
            for k in g_ref:
                g = gpubptt.to_numpy(grads[k])
                assert np.linalg.norm(g - g_ref[k]) <= tol * np.linalg.norm(g_ref[k]), (k, dtype, graphs)
    empty = gpubptt.RNN(11, H, 9, backend=cupy_be, seed=1).forward(cupy_be.asarray(np.zeros((4, 0), np.int64)))
    assert empty.states.shape == (4, 0, H) and empty.final_state.shape == (0, H)


@pytest.mark.parametrize("dense", [False, True])
def test_loss_and_grads_final_state_matches_per_sequence_reference(be, dense):
    rng = np.random.default_rng(0)
    model = gpubptt.RNN(5, 6, 4, backend=be, dtype="float64", bias=True, init="torch", seed=0)
    x = rng.normal(size=(7, 3, 5)) if dense else rng.integers(0, 5, size=(7, 3))
    y = rng.integers(0, 4, size=(7, 3))
    s0 = rng.normal(size=(3, 6)) * 0.5
    lengths = np.array([7, 2, 0])
    loss, grads, final = model.loss_and_grads(
        be.asarray(x), be.asarray(y), be.asarray(s0), lengths=be.asarray(lengths), return_final_state=True
    )
    p = {k: gpubptt.to_numpy(v) for k, v in model.params.items()}
    for b, n in enumerate(lengths):
        want = ref_forward_one(p, x[:n, b], s0[b])[-1] if n else s0[b]
        np.testing.assert_allclose(gpubptt.to_numpy(final)[b], want, rtol=1e-12)
    plain_loss, _ = model.loss_and_grads(be.asarray(x), be.asarray(y), be.asarray(s0), lengths=be.asarray(lengths))
    assert float(loss) == float(plain_loss) and set(grads) == {"U", "W", "V", "b", "c", "s0"}


@pytest.mark.gpu
def test_switching_graphs_or_step_kernels_after_a_capture_takes_effect(cupy_be):
    rng = np.random.default_rng(8)
    model = gpubptt.RNN(10, 32, 7, backend=cupy_be, dtype="float64", seed=0)
    x = cupy_be.asarray(rng.integers(0, 10, size=(12, 4)))
    y = cupy_be.asarray(rng.integers(0, 7, size=(12, 4)))
    l_graph, _ = model.loss_and_grads(x, y)
    model.use_graphs = False
    l_plain, _ = model.loss_and_grads(x, y)
    runs = {(w["use_graphs"], w["step_kernels"]): w["captured"] for w in model.workspaces()}
    assert runs == {(True, "auto"): True, (False, "auto"): False}  # one captured, one plain
    model.step_kernels = "cublas"
    l_cublas, _ = model.loss_and_grads(x, y)
    assert len(model.workspaces()) == 3
    assert float(l_plain) == pytest.approx(float(l_graph), rel=1e-12)
    assert float(l_cublas) == pytest.approx(float(l_graph), rel=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["fused", "persistent"])
def test_strided_buffers_fall_back_to_a_path_that_handles_them(cupy_be, kernels):
    """The fused and persistent kernels index dense rows: strided views must take the cuBLAS path."""
    from gpubptt.cells import ElmanCell

    rng = np.random.default_rng(9)
    T, B, H = 6, 3, 16
    W = rng.normal(size=(H, H)) / 4
    pre = rng.normal(size=(T, B, H))
    big = cupy_be.xp.zeros((T + 1, B, 2 * H))  # S is a strided view: every row skips H entries
    S = big[:, :, :H]
    scratch = cupy_be.xp.empty((B, H))
    ElmanCell().forward(cupy_be.asarray(pre), cupy_be.asarray(W), S, be=cupy_be, scratch=scratch, step_kernels=kernels)
    s = np.zeros((B, H))
    for t in range(T):
        s = np.tanh(pre[t] + s @ W.T)
    np.testing.assert_allclose(gpubptt.to_numpy(S[T]), s, rtol=1e-12, atol=1e-14)
