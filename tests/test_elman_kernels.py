"""The Elman cell's compiled kernels' host side, on the CPU: which CUDA source (φ defined as tanh or relu) is
compiled and launched for which choice, through a stand-in backend whose "kernels" compute what each source's
kernel is documented to compute, in NumPy, with φ read from the source handed to them. A model on it must give
the NumPy backend's loss and gradients; "auto" must never pick relu's forward kernels (not yet timed on a
device), and a forced ``step_kernels`` must run them. The kernels themselves run in the gpu-marked tests."""

from __future__ import annotations

import re

import numpy as np
import pytest

import gpubptt
from gpubptt.backend.numpy_backend import NumpyBackend
from gpubptt.cells import elman

from .test_gated_kernels import c_expr, run_body


class _Kernel:
    """One stand-in kernel: ``name`` of ``source`` (φ from its PHI define), logging each launch."""

    def __init__(self, source: str, name: str, log: list) -> None:
        (phi,) = re.findall(r"#define PHI\(x\) (.*)", source)
        self.phi = {"tanh(x)": np.tanh, "((x) < (T)0 ? (T)0 : (x))": lambda a: np.maximum(a, 0)}[phi]
        self.persistent = "every step of a recurrence in ONE launch" in source
        self.name, self.log, self.phi_text = name, log, phi
        self.max_dynamic_shared_size_bytes = 0

    def __call__(self, grid, block, args, shared_mem=0):
        self.log.append(("persistent" if self.persistent else "step", self.name, self.phi_text))
        if not self.persistent and self.name == "fwd":
            s_prev, W, pre, out, _, _ = args
            out[...] = self.phi(pre + s_prev @ W.T)
        elif not self.persistent:
            d_next, W, d, g, _, _ = args
            g[...] = (g + d_next @ W) * d
        elif self.name == "fwd":
            pre, W, S, steps = args[:4]
            for t in range(int(steps)):
                S[t + 1] = self.phi(pre[t] + S[t] @ W.T)
        else:
            G, W, Dt, steps = args[:4]
            for t in range(int(steps) - 1, -1, -1):
                G[t] = (G[t] + G[t + 1] @ W) * Dt[t]


class _Compiling(NumpyBackend):
    """The NumPy backend posing as one that compiles kernels (the stand-ins above); every other call is NumPy's."""

    compiles_kernels = True

    def __init__(self) -> None:
        super().__init__(blas="numpy")
        self.log: list = []
        self.asked: list = []

    def raw_kernels(self, source, names, dtype):
        return {n: _Kernel(source, n, self.log) for n in names}

    def device_limits(self):
        return {"shared_memory_per_block": 227 << 10, "multiprocessors": 132}

    def choice(self, family, key, measure):  # what "auto" asks to time: logged, answered yes
        self.asked.append((family, key[0]))
        return True


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("step_kernels", ["fused", "persistent", "auto"])
def test_elman_kernels_take_the_models_nonlinearity_and_give_the_numpy_gradients(nonlinearity, step_kernels):
    rng = np.random.default_rng(6)
    T, B, D, H, K = 7, 3, 4, 5, 6
    ref = gpubptt.RNN(D, H, K, nonlinearity=nonlinearity, backend="numpy", dtype="float64", seed=1, bias=True)
    be = _Compiling()
    model = ref.to(be)
    model.use_graphs = False
    model.step_kernels = step_kernels
    x, y = rng.normal(size=(T, B, D)), rng.integers(0, K, size=(T, B))
    l1, g1 = ref.loss_and_grads(x, y)
    l2, g2 = model.loss_and_grads(x, y)
    assert float(l2) == pytest.approx(float(l1), rel=1e-12)
    for k in g1:
        np.testing.assert_allclose(g2[k], g1[k], rtol=1e-10, atol=1e-12, err_msg=k)
    forward = {(kind, phi) for kind, name, phi in be.log if name == "fwd"}
    phi = elman.PHI[nonlinearity]
    if step_kernels != "auto":  # forced: this φ's forward kernel ran, the step or the persistent one
        assert forward == {(step_kernels.replace("fused", "step"), phi)}
    elif nonlinearity == "relu":  # auto: relu's forward kernels are unmeasured, never picked, never timed
        assert forward == set() and not [a for a in be.asked if a[1] == "forward relu"]
    else:  # auto: tanh's forward kernel is asked for by its measured choice, under the key it always had
        assert ("persistent", "forward") in be.asked and forward == {("persistent", phi)}
    backward = {kind for kind, name, _ in be.log if name == "bwd"}  # φ does not enter it: one source for both
    assert backward == ({"step"} if step_kernels == "fused" else {"persistent"})


def test_relu_forward_kernels_are_listed_as_unmeasured_and_sources_define_phi():
    assert elman.UNMEASURED == {("fused", "forward relu"), ("persistent", "forward relu")}
    for name in ("elman_step.cu", "elman_persistent.cu"):
        code = "\n".join(line.split("//")[0] for line in elman._source(name).splitlines())  # comments out
        assert "PHI(" in code and "tanh(" not in code


def test_one_backend_compiles_each_nonlinearitys_kernels_apart():
    """A tanh model and then a relu model on one backend: each gets its own φ (the compiled kernels are cached per
    dtype and φ), under the fused and the persistent choice alike."""
    rng = np.random.default_rng(8)
    T, B, D, H, K = 6, 3, 4, 5, 6
    be = _Compiling()
    x, y = rng.normal(size=(T, B, D)), rng.integers(0, K, size=(T, B))
    for step_kernels in ("fused", "persistent"):
        for nonlinearity in ("tanh", "relu"):
            ref = gpubptt.RNN(D, H, K, nonlinearity=nonlinearity, backend="numpy", dtype="float64", seed=2)
            model = ref.to(be)
            model.use_graphs, model.step_kernels = False, step_kernels
            be.log.clear()
            l1, g1 = ref.loss_and_grads(x, y)
            l2, g2 = model.loss_and_grads(x, y)
            assert float(l2) == pytest.approx(float(l1), rel=1e-12)
            for k in g1:
                np.testing.assert_allclose(g2[k], g1[k], rtol=1e-10, atol=1e-12, err_msg=f"{nonlinearity} {k}")
            assert {p for _, name, p in be.log if name == "fwd"} == {elman.PHI[nonlinearity]}


def test_auto_asks_for_tanhs_fused_choice_under_its_old_key_where_persistent_loses():
    class NoPersistent(_Compiling):
        def choice(self, family, key, measure):
            self.asked.append((family, key[0]))
            return family != "persistent"

    rng = np.random.default_rng(9)
    be = NoPersistent()
    ref = gpubptt.RNN(4, 5, 6, backend="numpy", dtype="float64", seed=3)
    model = ref.to(be)
    model.use_graphs, model.step_kernels = False, "auto"
    x, y = rng.normal(size=(6, 3, 4)), rng.integers(0, 6, size=(6, 3))
    np.testing.assert_allclose(model.loss_and_grads(x, y)[1]["W"], ref.loss_and_grads(x, y)[1]["W"], rtol=1e-10)
    assert ("fused", "forward") in be.asked and ("persistent", "forward") in be.asked
    assert {(kind, name) for kind, name, _ in be.log} == {("step", "fwd"), ("step", "bwd")}


def test_relu_in_the_cuda_sources_and_the_step_body_is_numpys_maximum_nan_included():
    a = np.array([-2.0, -0.0, 0.0, 3.0, np.nan, -np.inf, np.inf])
    cuda = {"np": np, "x": a, "max": np.fmax}  # CUDA's max is fmax: a NaN argument gives the other one
    phi = eval(c_expr(elman.PHI["relu"].replace("(T)", "")), cuda)  # the macro, read as C
    np.testing.assert_array_equal(phi, np.maximum(a, 0))
    pre, hw, out = a.copy(), np.zeros_like(a), np.empty_like(a)
    run_body(elman._RELU_STEP, {"pre": (pre, False), "hw": (hw, False), "out": (out, False)}, {"max": np.fmax})
    np.testing.assert_array_equal(out, np.maximum(a, 0))
