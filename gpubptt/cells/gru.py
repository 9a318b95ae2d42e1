"""The GRU cell (``torch.nn.GRU``): its parameters, its two recurrences and its fused gate kernels.

Gates stacked (r, z, n) in the rows of U (3H, D) and W (3H, H), as torch's ``weight_ih_l0`` and
``weight_hh_l0``; in row form, with a = U x_t + b (the input projection, one GEMM for all steps)
and w = h_{t-1} @ W.T (one (B, H) × (H, 3H) GEMM per step):

    r_t  = σ(a_r + w_r)                  z_t = σ(a_z + w_z)
    m_t  = w_n + b_hn                    n_t = tanh(a_n + r_t ⊙ m_t)
    h_t  = (1 − z_t) ⊙ n_t + z_t ⊙ h_{t-1}

b (3H,) is torch's ``bias_ih`` plus the r and z thirds of ``bias_hh``, which add to the same sums;
b_hn (H,), the n third of ``bias_hh``, sits inside r ⊙ (·) and stays a parameter of its own.

The backward recursion, with dh_t = ∂E/∂h_t (the direct term g_t plus what step t+1 sends back):

    ∂a_n = dh_t ⊙ (1 − z_t) ⊙ (1 − n_t²)        ∂a_z = dh_t ⊙ (h_{t-1} − n_t) ⊙ z_t (1 − z_t)
    ∂a_r = ∂a_n ⊙ m_t ⊙ r_t (1 − r_t)           ∂m_t = ∂a_n ⊙ r_t
    ∂w_t = [∂a_r, ∂a_z, ∂m_t]                   dh_{t-1} = dh_t ⊙ z_t + ∂w_t @ W
    dW = Σ_t ∂w_tᵀ h_{t-1}   db_hn = Σ_t ∂m_t   ∂E/∂a_t = [∂a_r, ∂a_z, ∂a_n]   (one GEMM / sum after the loop)

One step of each recurrence is one GEMM and one fused elementwise kernel (CuPy) or its NumPy twin
(a handful of ``out=`` operations on preallocated buffers): nothing is allocated per step.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from ..backend import Backend
from ._gated import GatedCell, batch_halves, exp_in_place, forward_in_halves, forward_weight, sig_grad, sigmoid_in_place
from ._jit import compile_kernels
from ._loops import step_loops
from ._per_backend import PerBackend
from .base import register_cell

__all__ = ["GRUCell"]

# σ(x) = 1 / (1 + exp(−x)): relative accuracy on the whole range, so σ(1 − σ) in the backward stays accurate for a
# nearly shut gate (exp(−x) = inf for x ≪ 0 gives exactly 0). (1 + tanh(x/2)) / 2 is within a rounding of 0 below
# x ≈ −16 (float32) or −37 (float64), and its gradients there were noise.
_FORWARD = """
const ptrdiff_t b = i / H, j = i % H, k = b * 3 * H + j, a = b * 4 * H + j;
const T r = (T)1 / ((T)1 + exp(-(pre[k] + hw[k])));
const T z = (T)1 / ((T)1 + exp(-(pre[k + H] + hw[k + H])));
const T m = hw[k + 2 * H] + bn[j];
const T n = tanh(pre[k + 2 * H] + r * m);
h = n + z * (hprev - n);
A[a] = r; A[a + H] = z; A[a + 2 * H] = n; A[a + 3 * H] = m;
"""

_BACKWARD = """
const ptrdiff_t b = i / H, j = i % H, k = b * 3 * H + j, a = b * 4 * H + j;
const T r = A[a], z = A[a + H], n = A[a + 2 * H], m = A[a + 3 * H];
const T dh = g + carry;
const T dan = dh * ((T)1 - z) * ((T)1 - n * n);
const T daz = dh * (hprev - n) * z * ((T)1 - z);
const T dar = dan * m * r * ((T)1 - r);
dpre[k] = dar; dpre[k + H] = daz; dpre[k + 2 * H] = dan;
dw[k] = dar; dw[k + H] = daz; dw[k + 2 * H] = dan * r;
direct = dh * z;
"""


@register_cell
class GRUCell(GatedCell):
    """The GRU cell, torch.nn.GRU's equations and gate order (r, z, n); see the module docstring.

    Implements the engine's cell interface (``gpubptt.cells``). Parameters per recurrence: U (3H, D),
    W (3H, H), and with biases b (3H,) (the input projection's) and b_hn (H,) (inside r ⊙ (·)).
    """

    option = "gru"
    name = "gru"
    torch_module = "nn.GRU"
    gates = 3
    #: no state beyond h (recomputation may keep h alone)
    extra_state = False

    def param_shapes(self, D: int, H: int, bias: bool) -> dict[str, tuple[int, ...]]:
        """U (3H, D) like ``weight_ih_l0``, W (3H, H) like ``weight_hh_l0``; b (3H,), b_hn (H,) with ``bias``."""
        shapes: dict[str, tuple[int, ...]] = {"U": (3 * H, D), "W": (3 * H, H)}
        if bias:
            shapes["b"] = (3 * H,)
            shapes["b_hn"] = (H,)
        return shapes

    def buffers(self, T: int, B: int, H: int, *, xp: Any, dtype: Any) -> dict[str, Any]:
        """A (T, B, 4H) the gates [r, z, n, m] of every step; dw (T, B, 3H) ∂E/∂(h_{t-1} @ W.T);
        Wt (H, 3H) W transposed; hw (B, 3H), tmp (3, B, H) per-step scratch; zero (H,) the b_hn of a
        model without biases."""
        return {
            "A": xp.empty((T, B, 4 * H), dtype=dtype),
            "dw": xp.empty((T, B, 3 * H), dtype=dtype),
            "hw": xp.empty((B, 3 * H), dtype=dtype),
            "Wt": xp.empty((H, 3 * H), dtype=dtype),
            "tmp": xp.empty((3, B, H), dtype=dtype),
            "zero": xp.zeros(H, dtype=dtype),
        }

    def load(self, aux: dict[str, Any], state0: Any) -> None:
        """No state beyond h."""

    def cell_states(self, aux: dict[str, Any]) -> None:
        """No state beyond h."""
        return None

    def step_jacobian(self, p: dict[str, np.ndarray], S: np.ndarray, aux: dict[str, np.ndarray]) -> np.ndarray:
        """∂h_t/∂h_{t−1} = diag(z) + diag(h_{t−1} − n) ∂z + diag(1 − z) ∂n, (T, B, H, H), from the gates A:
        ∂z = diag(z(1 − z)) W_z, ∂r = diag(r(1 − r)) W_r, ∂n = diag(1 − n²) (diag(m) ∂r + diag(r) W_n)."""
        A, W = aux["A"], p["W"]
        T, B, H = A.shape[0], A.shape[1], W.shape[1]
        eye = np.eye(H)
        J = np.empty((T, B, H, H))
        Wr, Wz, Wn = W[:H], W[H : 2 * H], W[2 * H :]
        for t in range(T):
            r, z, n, mm = (A[t][:, i * H : (i + 1) * H] for i in range(4))
            dr, dz = sig_grad(r, Wr), sig_grad(z, Wz)
            dn = (1 - n * n)[:, :, None] * (mm[:, :, None] * dr + r[:, :, None] * Wn[None])
            J[t] = z[:, :, None] * eye + (S[t] - n)[:, :, None] * dz + (1 - z)[:, :, None] * dn
        return J

    def run_forward(
        self, pre: Any, p: dict[str, Any], S: Any, aux: dict[str, Any], *, be: Backend, scratch: Any, step_kernels: str
    ) -> None:
        """All steps: pre (T, B, 3H) = U x_t + b; S (T+1, B, H) with S[0] = h0, S[1:] written; gates into aux["A"]."""
        forward_in_halves(self._forward_rows, pre, p, S, aux, be=be, k=kernels(be))

    def _forward_rows(
        self, pre: Any, p: dict[str, Any], S: Any, aux: dict[str, Any], rows: slice, Wt: Any, *, be: Backend, k: Any
    ) -> None:
        """The forward steps of the batch rows ``rows``; Wt (H, 3H) a buffer for Wᵀ."""
        r0, r1, _ = rows.indices(pre.shape[1])
        A, bn, hw = aux["A"], p.get("b_hn", aux["zero"]), aux["hw"]
        # Wᵀ packed (for any size where the compiled loops run), or a row-major copy where it pays
        Wt = forward_weight(p["W"], Wt, pre.shape[0], r1 - r0, be, loop=k.jit is not None)
        loops = k.step_loops(be, Wt, r1 - r0, (pre, S, A, bn, hw))
        if loops is not None:  # all T steps in one compiled call (whole buffers, rows r0..r1−1: ``_loops``)
            loops[0](pre, S, A, bn, hw, Wt.ptr, A.dtype.type(1), r0, r1)
            return
        pre, S, A, hw, tmp = pre[:, rows], S[:, rows], A[:, rows], hw[rows], aux["tmp"][:, rows]
        for t in range(pre.shape[0]):
            be.matmul(S[t], Wt, hw)  # w = h_{t-1} @ W.T, all three gates in one GEMM
            k.forward(pre[t], hw, bn, S[t], S[t + 1], A[t], tmp)

    def run_backward(
        self,
        G: Any,
        p: dict[str, Any],
        S: Any,
        aux: dict[str, Any],
        *,
        be: Backend,
        work: Any,
        scratch: Any,
        step_kernels: str,
        truncate: int | None,
        lanes: Any,
        grads: dict[str, Any],
        ds0: Any,
    ) -> Any:
        """BPTT through all steps; returns ∂E/∂pre (T, B, 3H) (in ``work``). G (T, B, H) enters as the
        direct term ∂E/∂h_t (and is clobbered); writes grads["W"], grads["b_hn"] and ds0 (B, H)."""
        if truncate is not None:
            return self._backward_truncated(G, p, S, aux, truncate, be=be, work=work, grads=grads, ds0=ds0)
        k = kernels(be)
        T, B, H = G.shape
        dw = aux["dw"]
        ds0[...] = 0  # dh_t's share from step t+1; after step 0 it is ∂E/∂h0
        halves = batch_halves(be, k, B, aux, T)
        if halves is None:
            self._backward_rows(G, p, S, aux, slice(None), work, ds0, be=be, k=k)
        else:  # two threads, each its rows
            be.run_concurrently(
                [partial(self._backward_rows, G, p, S, aux, r, work, ds0, be=be, k=k) for r, _ in halves]
            )
        rows = dw.reshape(T * B, 3 * H)
        be.matmul(rows.T, S[:-1].reshape(T * B, H), grads["W"])  # dW = Σ_t ∂w_tᵀ h_{t-1}
        if "b_hn" in grads:
            be.sum_rows(rows[:, 2 * H :], out=grads["b_hn"])  # db_hn = Σ_t ∂m_t
        return work

    def _backward_rows(
        self, G: Any, p: dict[str, Any], S: Any, aux: dict[str, Any], rows: slice, work: Any, carry: Any, *,
        be: Backend, k: Any,
    ) -> None:  # fmt: skip
        """The backward steps of the batch rows ``rows``; carry (B, H) dh's share from the step after."""
        r0, r1, _ = rows.indices(G.shape[1])
        T, n = G.shape[0], r1 - r0
        A, dw, tmp = aux["A"], aux["dw"], aux["tmp"]
        Wp = be.pack(p["W"], n, T, loop=k.jit is not None)  # W packed once for all T steps where MKL runs, else W
        loops = k.step_loops(be, Wp, n, (G, S, A, carry, work, dw, tmp))
        if loops is not None:  # all T steps in one compiled call (whole buffers, rows r0..r1−1: ``_loops``)
            loops[1](G, S, A, carry, work, dw, tmp[0], Wp.ptr, A.dtype.type(1), r0, r1)
            return
        G, S, work, A, dw = G[:, rows], S[:, rows], work[:, rows], A[:, rows], dw[:, rows]
        carry, tmp = carry[rows], tmp[:, rows]
        for t in range(T - 1, -1, -1):
            k.backward(G[t], S[t], A[t], carry, work[t], dw[t], tmp)  # the gates' gradients; tmp[0] = dh ⊙ z
            be.matmul(dw[t], Wp, carry)  # ∂w_t @ W: all three gates in one GEMM
            carry += tmp[0]  # dh_{t-1} = dh_t ⊙ z_t + ∂w_t @ W

    def _backward_truncated(
        self, G: Any, p: dict[str, Any], S: Any, aux: dict[str, Any], k: int, *, be: Backend, work: Any,
        grads: dict[str, Any], ds0: Any,
    ) -> Any:  # fmt: skip
        """Tutorial truncation with window k: lane d at step t holds ∂E_{t+d}/∂h_t; every lane passes through
        step t's gates (their sum gives ∂a_t and ∂w_t: the map is linear), lanes 0..k−1 move on to h_{t−1}
        (one GEMM for all of them) and lane k falls off; ∂E/∂h0 gathers every lane that passes step 0."""
        kk, xp = kernels(be), be.xp
        T, B, H = G.shape
        W, A, dw, tmp = p["W"], aux["A"], aux["dw"], aux["tmp"]
        lanes, lane_dw, lane_dpre, direct, total, zero = _lane_buffers(aux, k, B, H, 3, xp=xp, dtype=G.dtype)
        cur, nxt = lanes[0], lanes[1]
        for t in range(T - 1, -1, -1):
            cur[0] = G[t]  # E_t's own term enters lane 0
            xp.sum(cur, axis=0, out=total)
            kk.backward(total, S[t], A[t], zero, work[t], dw[t], tmp)  # ∂a_t, ∂w_t of every lane at once
            if t == 0:  # ∂E/∂h0: every lane that passed step 0
                be.matmul(dw[0], W, ds0)
                ds0 += tmp[0]
                break
            for d in range(k):  # lanes 0..k−1 one step back; lane k falls off
                kk.backward(cur[d], S[t], A[t], zero, lane_dpre, lane_dw[d], tmp)
                direct[d] = tmp[0]
            if k:
                be.matmul(lane_dw.reshape(k * B, 3 * H), W, nxt[1:].reshape(k * B, H))
                nxt[1:] += direct
            cur, nxt = nxt, cur
        rows = dw.reshape(T * B, 3 * H)
        be.matmul(rows.T, S[:-1].reshape(T * B, H), grads["W"])  # dW = Σ_t ∂w_tᵀ h_{t-1}
        if "b_hn" in grads:
            be.sum_rows(rows[:, 2 * H :], out=grads["b_hn"])
        return work


def _lane_buffers(aux: dict[str, Any], k: int, B: int, H: int, G: int, *, xp: Any, dtype: Any) -> tuple[Any, ...]:
    """The truncation lanes of window k, allocated once per workspace: lanes (2, k+1, B, H) (current, next),
    per-lane ∂w (k, B, G·H), a ∂a scratch (B, G·H), the direct terms (k, B, H), the lanes' sum and a zero (B, H)."""
    key = f"lanes{k}"
    if key not in aux:
        aux[key] = (
            xp.zeros((2, k + 1, B, H), dtype=dtype), xp.empty((max(k, 1), B, G * H), dtype=dtype),
            xp.empty((B, G * H), dtype=dtype), xp.empty((max(k, 1), B, H), dtype=dtype),
            xp.empty((B, H), dtype=dtype), xp.zeros((B, H), dtype=dtype),
        )  # fmt: skip
    out = aux[key]
    out[0][...] = 0
    return out


class _Kernels:
    """One backend's fused GRU step kernels (CuPy ElementwiseKernels), or their NumPy twins."""

    def __init__(self, be: Backend) -> None:
        self.xp = be.xp
        self._fwd = be.elementwise(
            "raw T pre, raw T hw, raw T bn, T hprev, int64 H", "T h, raw T A", _FORWARD, "gpubptt_gru_forward"
        )
        self._bwd = be.elementwise(
            "T g, T carry, T hprev, raw T A, int64 H",
            "T direct, raw T dpre, raw T dw",
            _BACKWARD,
            "gpubptt_gru_backward",
        )
        #: the compiled twins (numba, ``GPUBPTT_JIT``) of the NumPy twins, or None
        self.jit = None if self._fwd is not None else compile_kernels(*JIT_KERNELS)

    def step_loops(self, be: Backend, w: Any, rows: int, arrays: tuple[Any, ...]) -> tuple[Any, Any] | None:
        """(forward loop, backward loop) of ``_mkl_step_loops`` for these operands, or None (``_loops.step_loops``)."""
        return step_loops(self.jit, be, w, rows, arrays, _mkl_step_loops, exp=True)

    def forward(self, pre: Any, hw: Any, bn: Any, hprev: Any, h: Any, A: Any, tmp: Any) -> None:
        """One step's gates and state: pre, hw (B, 3H); bn (H,); hprev, h (B, H); A (B, 4H) ← [r, z, n, m]."""
        H = h.shape[1]
        if self._fwd is not None:
            self._fwd(pre, hw, bn, hprev, H, h, A)
            return
        xp = self.xp
        if self.jit is not None:  # 5 calls instead of 12: exp and tanh stay NumPy's (vectorised)
            B = A.shape[0]
            self.jit[0](pre, hw, bn, A, 0, B)  # A = [−(a_r + w_r), −(a_z + w_z), ·, m = w_n + b_hn]
            exp_in_place(A[:, : 2 * H], xp=xp)
            self.jit[1](pre, A, A.dtype.type(1), 0, B)  # r, z ← 1 / (1 + exp(−a)) (σ); A_n = a_n + r ⊙ m
            xp.tanh(A[:, 2 * H : 3 * H], out=A[:, 2 * H : 3 * H])  # n
            self.jit[2](hprev, A, h, 0, B)  # h = n + z ⊙ (h_{t-1} − n)
            return
        rz, n, m = A[:, : 2 * H], A[:, 2 * H : 3 * H], A[:, 3 * H :]
        xp.add(pre[:, : 2 * H], hw[:, : 2 * H], out=rz)
        sigmoid_in_place(rz, xp=xp)  # r, z
        xp.add(hw[:, 2 * H :], bn, out=m)  # m = w_n + b_hn
        xp.multiply(A[:, :H], m, out=n)
        n += pre[:, 2 * H :]
        xp.tanh(n, out=n)  # n = tanh(a_n + r ⊙ m)
        xp.subtract(hprev, n, out=h)
        h *= A[:, H : 2 * H]
        h += n  # h = n + z ⊙ (h_{t-1} − n)

    def backward(self, g: Any, hprev: Any, A: Any, carry: Any, dpre: Any, dw: Any, tmp: Any) -> None:
        """One step back: g (B, H) the direct term (clobbered), carry (B, H) dh's share from t+1; writes
        dpre (B, 3H) ← ∂a, dw (B, 3H) ← ∂w and tmp[0] ← dh ⊙ z (the direct path to h_{t-1})."""
        H = g.shape[1]
        if self._bwd is not None:
            self._bwd(g, carry, hprev, A, H, tmp[0], dpre, dw)
            return
        xp = self.xp
        if self.jit is not None:
            self.jit[3](g, carry, hprev, A, dpre, dw, tmp[0], A.dtype.type(1), 0, g.shape[0])
            return
        r, z, n, m = A[:, :H], A[:, H : 2 * H], A[:, 2 * H : 3 * H], A[:, 3 * H :]
        dar, daz, dan = dpre[:, :H], dpre[:, H : 2 * H], dpre[:, 2 * H :]
        dh, t1, t2 = g, tmp[1], tmp[2]
        dh += carry
        xp.multiply(n, n, out=t1)
        xp.subtract(1, t1, out=t1)  # 1 − n²
        xp.subtract(1, z, out=t2)  # 1 − z
        xp.multiply(t1, t2, out=dan)
        dan *= dh  # ∂a_n = dh ⊙ (1 − z) ⊙ (1 − n²)
        xp.multiply(t2, z, out=t2)  # z (1 − z)
        xp.subtract(hprev, n, out=t1)
        t1 *= dh
        xp.multiply(t1, t2, out=daz)  # ∂a_z = dh ⊙ (h_{t-1} − n) ⊙ z (1 − z)
        xp.subtract(1, r, out=t1)
        t1 *= r  # r (1 − r)
        t1 *= m
        xp.multiply(t1, dan, out=dar)  # ∂a_r = ∂a_n ⊙ m ⊙ r (1 − r)
        dw[:, : 2 * H] = dpre[:, : 2 * H]
        xp.multiply(dan, r, out=dw[:, 2 * H :])  # ∂m = ∂a_n ⊙ r
        xp.multiply(dh, z, out=tmp[0])


# The compiled twins (``_jit.compile_kernels``): plain loops over (B, H), one row at a time, each loop over a
# row's H units short enough (few arrays) for the compiler to vectorise it; the CUDA bodies' formulas
# above, in the array dtype (``one`` carries it: a Python float would widen float32). σ's division is
# ``np.true_divide``: numba's ``/`` checks for a zero divisor (Python's semantics), and that check kept the loop from
# vectorising (18.6 against 4.3 µs for 32 × 512 float32 values).


def _jit_gates_in(pre: Any, hw: Any, bn: Any, A: Any, r0: int, r1: int) -> None:
    """A (B, 4H) ← [−(a_r + w_r), −(a_z + w_z), (unset), m = w_n + b_hn] on rows r0..r1−1: r, z's exp arguments
    (σ(a) = 1 / (1 + exp(−a))) and m."""
    H = A.shape[1] // 4
    for b in range(r0, r1):
        p, w, a = pre[b], hw[b], A[b]
        for j in range(2 * H):
            a[j] = -(p[j] + w[j])
        for j in range(H):
            a[3 * H + j] = w[2 * H + j] + bn[j]


def _jit_candidate(pre: Any, A: Any, one: Any, r0: int, r1: int) -> None:
    """r, z ← 1 / (1 + exp(−a)) (σ) in A (B, 4H), which holds exp(−a); A's n columns ← a_n + r ⊙ m (n's tanh
    argument); rows r0..r1−1."""
    H = A.shape[1] // 4
    for b in range(r0, r1):
        p, a = pre[b], A[b]
        for j in range(2 * H):
            a[j] = np.true_divide(one, one + a[j])
        for j in range(H):
            a[2 * H + j] = p[2 * H + j] + a[j] * a[3 * H + j]


def _jit_state(hprev: Any, A: Any, h: Any, r0: int, r1: int) -> None:
    """h (B, H) ← n + z ⊙ (h_{t-1} − n); rows r0..r1−1."""
    H = h.shape[1]
    for b in range(r0, r1):
        hp, a, hb = hprev[b], A[b], h[b]
        for j in range(H):
            n = a[2 * H + j]
            hb[j] = n + a[H + j] * (hp[j] - n)


def _jit_backward(
    g: Any, carry: Any, hprev: Any, A: Any, dpre: Any, dw: Any, direct: Any, one: Any, r0: int, r1: int
) -> None:
    """One step back, as ``_BACKWARD``, rows r0..r1−1: g ← dh (clobbered); dpre (B, 3H) ← ∂a; dw (B, 3H) ← ∂w;
    direct ← dh ⊙ z."""
    H = g.shape[1]
    for b in range(r0, r1):
        dh, cb, hp, d = g[b], carry[b], hprev[b], direct[b]
        r, z, n, m = A[b, :H], A[b, H : 2 * H], A[b, 2 * H : 3 * H], A[b, 3 * H :]
        dar, daz, dan = dpre[b, :H], dpre[b, H : 2 * H], dpre[b, 2 * H :]
        dwr, dwz, dwn = dw[b, :H], dw[b, H : 2 * H], dw[b, 2 * H :]
        for j in range(H):
            dh[j] += cb[j]
        for j in range(H):
            dan[j] = dh[j] * (one - z[j]) * (one - n[j] * n[j])
        for j in range(H):
            daz[j] = dh[j] * (hp[j] - n[j]) * z[j] * (one - z[j])
        for j in range(H):
            dar[j] = dan[j] * m[j] * r[j] * (one - r[j])
        for j in range(H):
            dwr[j] = dar[j]
            dwz[j] = daz[j]
            dwn[j] = dan[j] * r[j]
        for j in range(H):
            d[j] = dh[j] * z[j]


def _mkl_step_loops(
    compute: Any, tanh: Any, exp: Any, gates_in: Any, candidate: Any, state: Any, backward: Any
) -> tuple[Any, Any]:
    """The forward and backward step loops of a batch's rows as plain Python for numba (``_jit.compile_loops``):
    per step the GEMM on the packed W through MKL's ``compute`` (cblas_?gemm_compute), the compiled kernels
    (``JIT_KERNELS`` compiled) and MKL's vectorised ``exp`` (v?Exp, for σ) and ``tanh`` (v?Tanh) row by row; the
    same operations as ``_Kernels.forward`` / ``backward`` with ``matmul`` between them."""

    def forward_loop(pre: Any, S: Any, A: Any, bn: Any, hw: Any, w: int, one: Any, r0: int, r1: int) -> None:
        """Rows r0..r1−1 of pre (T, B, 3H), S (T+1, B, H), A (T, B, 4H), hw (B, 3H); bn (H,); w Wᵀ packed for
        r1 − r0 rows."""
        T, G = pre.shape[0], pre.shape[2]
        H, n = S.shape[2], r1 - r0
        size = S.itemsize
        for t in range(T):  # hw = h_{t-1} @ Wᵀ
            compute(101, 111, 151, n, G, H, S[t, r0].ctypes.data, S.strides[1] // size, w, G, 0.0,
                    hw[r0].ctypes.data, hw.strides[0] // size)  # fmt: skip
            a = A[t]
            gates_in(pre[t], hw, bn, a, r0, r1)
            for b in range(r0, r1):
                exp(2 * H, a[b].ctypes.data, a[b].ctypes.data)  # r, z: exp(−a)
            candidate(pre[t], a, one, r0, r1)
            for b in range(r0, r1):
                tanh(H, a[b, 2 * H :].ctypes.data, a[b, 2 * H :].ctypes.data)  # n
            state(S[t], a, S[t + 1], r0, r1)

    def backward_loop(G: Any, S: Any, A: Any, carry: Any, work: Any, dw: Any, direct: Any, w: int, one: Any,
                      r0: int, r1: int) -> None:  # fmt: skip
        """Rows r0..r1−1 of G (T, B, H) clobbered, S (T+1, B, H), A (T, B, 4H), carry, direct (B, H), work, dw
        (T, B, 3H); w W packed for r1 − r0 rows."""
        T, H, n = G.shape[0], G.shape[2], r1 - r0
        size = G.itemsize
        for t in range(T - 1, -1, -1):
            backward(G[t], carry, S[t], A[t], work[t], dw[t], direct, one, r0, r1)  # direct = dh ⊙ z
            compute(101, 111, 151, n, H, 3 * H, dw[t, r0].ctypes.data, dw.strides[1] // size, w, H, 0.0,
                    carry[r0].ctypes.data, carry.strides[0] // size)  # fmt: skip  # ∂w_t @ W
            for b in range(r0, r1):
                cb, db = carry[b], direct[b]
                for j in range(H):
                    cb[j] += db[j]  # dh_{t-1} = dh_t ⊙ z_t + ∂w_t @ W

    return forward_loop, backward_loop


#: the compiled twins' Python sources, in the order ``_Kernels.jit`` holds them
JIT_KERNELS = (_jit_gates_in, _jit_candidate, _jit_state, _jit_backward)

#: ``kernels(be)``: the GRU kernels of backend ``be`` (built once per backend)
kernels: PerBackend[_Kernels] = PerBackend(_Kernels, "GRU kernels")
