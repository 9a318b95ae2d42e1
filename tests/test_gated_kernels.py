"""The CUDA bodies of the GRU/LSTM ElementwiseKernels, checked on the CPU: each body is read as the C it is
(one thread per (b, j) output, ``i`` the flat index) by a small vectorised interpreter and compared with the
NumPy twin that runs on NumPy. This catches an index or formula slip in the CUDA source without a GPU (the
``gpu``-marked tests in test_gated_gpu.py run the compiled kernels themselves)."""

from __future__ import annotations

import numpy as np
import pytest

from gpubptt.backend import get_backend
from gpubptt.cells import gru, lstm


def c_expr(expr: str) -> str:
    """A C expression as Python over arrays: a top-level ``cond ? a : b`` becomes ``np.where(cond, a, b)`` (NaN
    fails every comparison, as in C); outer parentheses around the whole expression are dropped first."""
    expr = expr.strip()
    while expr.startswith("(") and expr.endswith(")"):  # only where they enclose the whole expression
        depth = 0
        for k, ch in enumerate(expr):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0 and k < len(expr) - 1:
                break
        else:
            expr = expr[1:-1].strip()
            continue
        break
    if "?" not in expr:
        return expr
    cond, rest = expr.split("?", 1)
    a, b = rest.split(":", 1)
    return f"np.where({c_expr(cond)}, {c_expr(a)}, {c_expr(b)})"


def run_body(body: str, arrays: dict, scalars: dict) -> None:
    """Run an ElementwiseKernel body for every i at once; arrays by parameter name (written in place)."""
    n = None
    ns: dict = {"tanh": np.tanh, "exp": np.exp, "np": np, **scalars}
    for name, (a, raw) in arrays.items():
        ns[name] = a.reshape(-1)  # a view: writes land in the array
        if not raw:
            n = a.size
    ns["i"] = np.arange(n)
    for stmt in body.replace("\n", " ").split(";"):
        stmt = stmt.strip().replace("(T)", "")
        if not stmt:
            continue
        for prefix, integer in (("const ptrdiff_t ", True), ("const T ", False)):
            if stmt.startswith(prefix):
                for decl in stmt[len(prefix) :].split(","):
                    name, expr = decl.split("=", 1)
                    ns[name.strip()] = eval(expr.replace("/", "//") if integer else c_expr(expr), ns)
                break
        else:
            lhs, rhs = (s.strip() for s in stmt.split("=", 1))
            value = eval(c_expr(rhs), ns)
            if "[" in lhs:
                name, idx = lhs.split("[", 1)
                ns[name][eval(idx.rstrip("]"), ns)] = value
            else:
                ns[lhs][:] = value


B, H = 3, 5


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_gru_kernel_bodies_compute_what_the_numpy_twins_do(rng):
    k = gru.kernels(get_backend("numpy"))
    pre, hw, bn, hprev = (
        rng.normal(size=(B, 3 * H)),
        rng.normal(size=(B, 3 * H)),
        rng.normal(size=H),
        rng.normal(size=(B, H)),
    )
    h, A = np.empty((B, H)), np.empty((B, 4 * H))
    k.forward(pre, hw.copy(), bn, hprev, h, A, np.empty((3, B, H)))
    h2, A2 = np.empty((B, H)), np.empty((B, 4 * H))
    arrays = {"pre": (pre, True), "hw": (hw, True), "bn": (bn, True), "hprev": (hprev, False), "h": (h2, False),
              "A": (A2, True)}  # fmt: skip
    run_body(gru._FORWARD, arrays, {"H": H})
    np.testing.assert_allclose(h2, h, rtol=1e-13)
    np.testing.assert_allclose(A2, A, rtol=1e-13)
    g, carry = rng.normal(size=(B, H)), rng.normal(size=(B, H))
    dpre, dw, tmp = np.empty((B, 3 * H)), np.empty((B, 3 * H)), np.empty((3, B, H))
    k.backward(g.copy(), hprev, A, carry, dpre, dw, tmp)
    dpre2, dw2, direct = np.empty((B, 3 * H)), np.empty((B, 3 * H)), np.empty((B, H))
    arrays = {"g": (g, False), "carry": (carry, False), "hprev": (hprev, False), "A": (A, True),
              "direct": (direct, False), "dpre": (dpre2, True), "dw": (dw2, True)}  # fmt: skip
    run_body(gru._BACKWARD, arrays, {"H": H})
    for got, want in ((dpre2, dpre), (dw2, dw), (direct, tmp[0])):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_lstm_kernel_bodies_compute_what_the_numpy_twins_do(rng):
    k = lstm.kernels(get_backend("numpy"))
    pre, hw, cprev = rng.normal(size=(B, 4 * H)), rng.normal(size=(B, 4 * H)), rng.normal(size=(B, H))
    h, c, A = np.empty((B, H)), np.empty((B, H)), np.empty((B, 4 * H))
    k.forward(pre, hw, cprev, h, c, A, np.empty((2, B, H)))
    h2, c2, A2 = np.empty((B, H)), np.empty((B, H)), np.empty((B, 4 * H))
    arrays = {"pre": (pre, True), "hw": (hw, True), "cprev": (cprev, False), "h": (h2, False), "c": (c2, False),
              "A": (A2, True)}  # fmt: skip
    run_body(lstm._FORWARD, arrays, {"H": H})
    for got, want in ((h2, h), (c2, c), (A2, A)):
        np.testing.assert_allclose(got, want, rtol=1e-13)
    g, dhn, dc = rng.normal(size=(B, H)), rng.normal(size=(B, H)), rng.normal(size=(B, H))
    da, dc1 = np.empty((B, 4 * H)), dc.copy()
    k.backward(g.copy(), dhn, cprev, c, A, dc1, da, np.empty((2, B, H)))
    da2, dc2 = np.empty((B, 4 * H)), dc.copy()
    arrays = {"g": (g, False), "dhn": (dhn, False), "cprev": (cprev, False), "c": (c, False), "A": (A, True),
              "dc": (dc2, False), "da": (da2, True)}  # fmt: skip
    run_body(lstm._BACKWARD, arrays, {"H": H})
    np.testing.assert_allclose(da2, da, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dc2, dc1, rtol=1e-12, atol=1e-15)


def test_kernel_signatures_name_every_argument_their_bodies_use():
    """Each body's names are its parameters or its locals: a typo would not compile on the GPU."""
    import re

    sigs = {
        gru._FORWARD: "pre hw bn hprev H h A", gru._BACKWARD: "g carry hprev A H direct dpre dw",
        lstm._FORWARD: "pre hw cprev H h c A", lstm._BACKWARD: "g dhn cprev c A H dc da",
    }  # fmt: skip
    for body, params in sigs.items():
        declared = set(re.findall(r"(?:const (?:ptrdiff_t|T) |, )(\w+) =", body))
        used = set(re.findall(r"\b([A-Za-z_]\w*)\b", body)) - {"const", "ptrdiff_t", "T", "tanh", "exp", "i"}
        assert used <= declared | set(params.split()), used - declared - set(params.split())
