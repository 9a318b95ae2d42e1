"""The LSTM cell (``torch.nn.LSTM``): its parameters, its two recurrences and its fused gate kernels.

Gates stacked (i, f, g, o) in the rows of U (4H, D) and W (4H, H), as torch's ``weight_ih_l0`` and
``weight_hh_l0``; in row form, with a = U x_t + b (the input projection, one GEMM for all steps)
and w = h_{t-1} @ W.T (one (B, H) × (H, 4H) GEMM per step):

    i_t = σ(a_i + w_i)   f_t = σ(a_f + w_f)   g_t = tanh(a_g + w_g)   o_t = σ(a_o + w_o)
    c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t          h_t = o_t ⊙ tanh(c_t)

The state is (h, c): the initial state is (h0, c0), both (B, H). b (4H,) is torch's ``bias_ih +
bias_hh`` (the loss depends on their sum only). The backward recursion carries dh and dc:

    dh_t = g_t + (what step t+1 sends back)       dc_t = dc'_t + dh_t ⊙ o_t ⊙ (1 − tanh²c_t)
    ∂a_i = dc_t ⊙ g_t ⊙ i_t (1 − i_t)           ∂a_f = dc_t ⊙ c_{t-1} ⊙ f_t (1 − f_t)
    ∂a_g = dc_t ⊙ i_t ⊙ (1 − g_t²)              ∂a_o = dh_t ⊙ tanh(c_t) ⊙ o_t (1 − o_t)
    dh_{t-1} = ∂a_t @ W                         dc'_{t-1} = dc_t ⊙ f_t
    dW = Σ_t ∂a_tᵀ h_{t-1}   (one GEMM after the loop; ∂a is also ∂E/∂pre, from which the engine forms dU, db)

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
from ._loops import loops_possible, step_loops
from ._per_backend import PerBackend
from .base import register_cell

__all__ = ["LSTMCell"]

# σ(x) = 1 / (1 + exp(−x)): relative accuracy on the whole range, so σ(1 − σ) in the backward stays accurate for a
# nearly shut gate (exp(−x) = inf for x ≪ 0 gives exactly 0). (1 + tanh(x/2)) / 2 is within a rounding of 0 below
# x ≈ −16 (float32) or −37 (float64), and its gradients there were noise.
_FORWARD = """
const ptrdiff_t b = i / H, j = i % H, k = b * 4 * H + j;
const T ig = (T)1 / ((T)1 + exp(-(pre[k] + hw[k])));
const T fg = (T)1 / ((T)1 + exp(-(pre[k + H] + hw[k + H])));
const T gg = tanh(pre[k + 2 * H] + hw[k + 2 * H]);
const T og = (T)1 / ((T)1 + exp(-(pre[k + 3 * H] + hw[k + 3 * H])));
c = fg * cprev + ig * gg;
h = og * tanh(c);
A[k] = ig; A[k + H] = fg; A[k + 2 * H] = gg; A[k + 3 * H] = og;
"""

_BACKWARD = """
const ptrdiff_t b = i / H, j = i % H, k = b * 4 * H + j;
const T ig = A[k], fg = A[k + H], gg = A[k + 2 * H], og = A[k + 3 * H];
const T tc = tanh(c);
const T dh = g + dhn;
const T dct = dc + dh * og * ((T)1 - tc * tc);
da[k] = dct * gg * ig * ((T)1 - ig);
da[k + H] = dct * cprev * fg * ((T)1 - fg);
da[k + 2 * H] = dct * ig * ((T)1 - gg * gg);
da[k + 3 * H] = dh * tc * og * ((T)1 - og);
dc = dct * fg;
"""


@register_cell
class LSTMCell(GatedCell):
    """The LSTM cell, torch.nn.LSTM's equations and gate order (i, f, g, o); see the module docstring.

    Implements the engine's cell interface (``gpubptt.cells``), with a second state c: ``extra_state``
    "c0" names its initial value and gradient. Parameters per recurrence: U (4H, D), W (4H, H), b (4H,).
    """

    option = "lstm"
    name = "lstm"
    torch_module = "nn.LSTM"
    gates = 4
    #: the state carried beside h: its initial value c0 and ∂E/∂c0 go by this name
    extra_state = "c0"

    def param_shapes(self, D: int, H: int, bias: bool) -> dict[str, tuple[int, ...]]:
        """U (4H, D) like ``weight_ih_l0``, W (4H, H) like ``weight_hh_l0``; b (4H,) with ``bias``."""
        shapes: dict[str, tuple[int, ...]] = {"U": (4 * H, D), "W": (4 * H, H)}
        if bias:
            shapes["b"] = (4 * H,)
        return shapes

    def buffers(self, T: int, B: int, H: int, *, xp: Any, dtype: Any) -> dict[str, Any]:
        """A (T, B, 4H) the gates [i, f, g, o] of every step (between a forward and its backward; where the compiled
        loops run, it holds the input projection before the forward and ∂a after the backward); C (T+1, B, H) the
        cell states (C[0] = c0);
        Wt (H, 4H) W transposed; hw (B, 4H), tmp (2, B, H) per-step scratch."""
        return {
            "A": xp.empty((T, B, 4 * H), dtype=dtype),
            "C": xp.zeros((T + 1, B, H), dtype=dtype),
            "hw": xp.empty((B, 4 * H), dtype=dtype),
            "Wt": xp.empty((H, 4 * H), dtype=dtype),
            "tmp": xp.empty((2, B, H), dtype=dtype),
        }

    def load(self, aux: dict[str, Any], state0: Any) -> None:
        """c0 (B, H), or None for zeros."""
        aux["C"][0] = 0 if state0 is None else state0

    def cell_states(self, aux: dict[str, Any]) -> Any:
        """C (T+1, B, H): C[0] = c0, C[t+1] = c_t."""
        return aux["C"]

    def step_jacobian(self, p: dict[str, np.ndarray], S: np.ndarray, aux: dict[str, np.ndarray]) -> np.ndarray:
        """∂(h, c)_t/∂(h, c)_{t−1}, (T, B, 2H, 2H), h first, from the gates A and cell states C:
        ∂c_t/∂h_{t−1} = diag(c_{t−1}) ∂f + diag(g) ∂i + diag(i) ∂g, ∂c_t/∂c_{t−1} = diag(f),
        ∂h_t/∂(h, c)_{t−1} = diag(tanh c_t) ∂o + diag(o (1 − tanh² c_t)) ∂c_t (∂o = diag(o(1 − o)) W_o, …)."""
        A, C, W = aux["A"], aux["C"], p["W"]
        T, B, H = A.shape[0], A.shape[1], W.shape[1]
        eye = np.eye(H)
        J = np.zeros((T, B, 2 * H, 2 * H))
        Wi, Wf, Wg, Wo = W[:H], W[H : 2 * H], W[2 * H : 3 * H], W[3 * H :]
        for t in range(T):
            i, f, g, o = (A[t][:, k * H : (k + 1) * H] for k in range(4))
            tc = np.tanh(C[t + 1])
            dc_dh = C[t][:, :, None] * sig_grad(f, Wf) + g[:, :, None] * sig_grad(i, Wi)
            dc_dh += i[:, :, None] * ((1 - g * g)[:, :, None] * Wg[None])
            dc_dc = f[:, :, None] * eye
            through = (o * (1 - tc * tc))[:, :, None]
            J[t, :, :H, :H] = tc[:, :, None] * sig_grad(o, Wo) + through * dc_dh
            J[t, :, :H, H:] = through * dc_dc
            J[t, :, H:, :H] = dc_dh
            J[t, :, H:, H:] = dc_dc
        return J

    def projection_buffer(self, aux: dict[str, Any], be: Backend) -> Any:
        """The gates A, where the compiled step loops can run (``_loops.loops_possible``): each step then adds
        h_{t-1} @ Wᵀ to its projection in place, one (T, B, 4H) buffer streamed instead of two; else None."""
        return aux["A"] if loops_possible(be, kernels(be).jit) else None

    def adds_input_bias(self, be: Backend) -> bool:
        """Where the compiled step loops can run (as ``projection_buffer``): each step's gates kernel adds b as it
        reads the step's projection (``_jit_gates_in_place``); the per-step path adds it to pre first."""
        return loops_possible(be, kernels(be).jit)

    def run_forward(
        self, pre: Any, p: dict[str, Any], S: Any, aux: dict[str, Any], *, be: Backend, scratch: Any, step_kernels: str
    ) -> None:
        """All steps: pre (T, B, 4H) = U x_t + b (without b where ``adds_input_bias``; pre may be the gates A itself:
        ``projection_buffer``); S (T+1, B, H) with S[0] = h0 and aux["C"][0] = c0 set."""
        forward_in_halves(self._forward_rows, pre, p, S, aux, be=be, k=kernels(be))

    def _forward_rows(
        self, pre: Any, p: dict[str, Any], S: Any, aux: dict[str, Any], rows: slice, Wt: Any, *, be: Backend, k: Any
    ) -> None:
        """The forward steps of the batch rows ``rows``; Wt (H, 4H) a buffer for Wᵀ."""
        r0, r1, _ = rows.indices(pre.shape[1])
        A, C, hw = aux["A"], aux["C"], aux["hw"]
        # Wᵀ packed (for any size where the compiled loops run), or a row-major copy where it pays
        Wt = forward_weight(p["W"], Wt, pre.shape[0], r1 - r0, be, loop=k.jit is not None)
        b = p.get("b") if self.adds_input_bias(be) else None  # the engine's projection left b out: added here
        loops = k.step_loops(be, Wt, r1 - r0, (pre, S, A, C, hw))
        if loops is not None:  # all T steps in one compiled call (whole buffers, rows r0..r1−1: ``_loops``)
            if b is None:
                bias = k.zeros(A.shape[2], A.dtype)  # no bias: zeros (adding them changes no value)
            else:  # a contiguous vector of the loop's dtype (a parameter is one)
                bias = b if b.dtype == A.dtype and b.flags.c_contiguous else np.ascontiguousarray(b, dtype=A.dtype)
            loops[0](pre, S, A, C, hw, bias, Wt.ptr, A.dtype.type(1), pre is A, r0, r1)
            return
        if b is not None:
            pre[:, rows] += b
        pre, S, A, C, hw, tmp = pre[:, rows], S[:, rows], A[:, rows], C[:, rows], hw[rows], aux["tmp"][:, rows]
        for t in range(pre.shape[0]):
            be.matmul(S[t], Wt, hw)  # w = h_{t-1} @ W.T, all four gates in one GEMM
            k.forward(pre[t], hw, C[t], S[t + 1], C[t + 1], A[t], tmp)

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
        d_extra: dict[int, list[tuple[Any, Any]]] | None = None,
    ) -> Any:
        """BPTT through all steps; returns ∂E/∂pre (T, B, 4H): over the gates ``aux["A"]`` where the compiled step
        loops ran (the forward's buffers are spent, as a pullback's are; a half whose loop could not run copies its
        rows over from ``work``), else in ``work``. G (T, B, H) enters as the
        direct term ∂E/∂h_t; writes grads["W"], ds0 (B, H) = ∂E/∂h0 and grads["c0"] (B, H) = ∂E/∂c0.
        ``d_extra`` {t: [(cols, values)]}, optional: direct terms ∂E/∂c_t at the steps named, for the batch
        columns ``cols`` (a slice or an index array; values (len(cols), H)): the pullback's ∂E/∂c_n at each
        sequence's last step, a later segment's carry under recomputation. Full BPTT only."""
        if truncate is not None:
            return self._backward_truncated(G, p, S, aux, truncate, be=be, work=work, grads=grads, ds0=ds0)
        k = kernels(be)
        T, B, H = G.shape
        ds0[...] = 0  # what step t+1 sends back to h_t (ds0) and c_t (c0); after step 0, ∂E/∂h0 and ∂E/∂c0
        grads["c0"][...] = 0
        # where the compiled loops run, ∂a_t goes over the gates A[t] (the loop's last use of them): one (T, B, 4H)
        # buffer streamed through memory instead of two; the per-step path writes it into work
        halves = None if d_extra else batch_halves(be, k, B, aux, T)
        rows = [slice(None)] if halves is None else [r for r, _ in halves]
        in_place: dict[int, bool] = {}
        jobs = [partial(self._backward_rows, G, p, aux, r, work, ds0, grads["c0"], d_extra, in_place, i, be=be, k=k)
                for i, r in enumerate(rows)]  # fmt: skip
        be.run_concurrently(jobs)  # with halves, two threads, each its rows
        dpre = aux["A"] if any(in_place.values()) else work
        for i, r in enumerate(rows):
            if dpre is not work and not in_place[i]:  # this half's loop could not run: its ∂a where the other's is
                dpre[:, r] = work[:, r]
        be.matmul(dpre.reshape(T * B, 4 * H).T, S[:-1].reshape(T * B, H), grads["W"])  # dW = Σ_t ∂a_tᵀ h_{t-1}
        return dpre

    def _backward_rows(
        self, G: Any, p: dict[str, Any], aux: dict[str, Any], rows: slice, work: Any, dh: Any, dc: Any,
        d_extra: dict[int, list[tuple[Any, Any]]] | None, in_place: dict[int, bool], i: int, *, be: Backend, k: Any,
    ) -> None:  # fmt: skip
        """The backward steps of the batch rows ``rows`` (d_extra: all rows only); dh, dc (B, H) the carries; ∂a
        over the gates A by the compiled loop (in_place[i] ← True), else into ``work`` (in_place[i] ← False)."""
        r0, r1, _ = rows.indices(G.shape[1])
        T, n = G.shape[0], r1 - r0
        A, C, tmp = aux["A"], aux["C"], aux["tmp"]
        Wp = be.pack(p["W"], n, T, loop=k.jit is not None)  # W packed once for all T steps where MKL runs, else W
        loops = None if d_extra else k.step_loops(be, Wp, n, (G, A, C, dh, dc, tmp))
        in_place[i] = loops is not None
        if loops is not None:  # all T steps in one compiled call (whole buffers, rows r0..r1−1: ``_loops``)
            loops[1](G, dh, A, C, dc, tmp[0], Wp.ptr, A.dtype.type(1), r0, r1)
            return
        G, work, A, C = G[:, rows], work[:, rows], A[:, rows], C[:, rows]
        dh, dc, tmp = dh[rows], dc[rows], tmp[:, rows]
        for t in range(T - 1, -1, -1):
            for cols, values in d_extra.get(t, ()) if d_extra else ():
                dc[cols] += values
            k.backward(G[t], dh, C[t], C[t + 1], A[t], dc, work[t], tmp)  # ∂a_t; dc ← dc_t ⊙ f_t
            be.matmul(work[t], Wp, dh)  # dh_{t-1} = ∂a_t @ W: all four gates in one GEMM

    def _backward_truncated(
        self, G: Any, p: dict[str, Any], S: Any, aux: dict[str, Any], k: int, *, be: Backend, work: Any,
        grads: dict[str, Any], ds0: Any,
    ) -> Any:  # fmt: skip
        """Tutorial truncation with window k: lane d at step t holds E_{t+d}'s (∂/∂h_t, ∂/∂c_t); every lane
        passes through step t's gates (their sum gives ∂a_t: the map is linear), lanes 0..k−1 move on to
        (h, c)_{t−1} (one GEMM for all of them), lane k falls off; ∂E/∂(h0, c0) gathers every lane at step 0."""
        kk, xp = kernels(be), be.xp
        T, B, H = G.shape
        W, A, C, tmp = p["W"], aux["A"], aux["C"], aux["tmp"]
        key = f"lanes{k}"
        if key not in aux:  # once per workspace
            aux[key] = (
                xp.zeros((2, k + 1, B, H), dtype=G.dtype), xp.zeros((2, k + 1, B, H), dtype=G.dtype),
                xp.empty((max(k, 1), B, 4 * H), dtype=G.dtype), xp.empty((2, B, H), dtype=G.dtype),
                xp.zeros((B, H), dtype=G.dtype),
            )  # fmt: skip
        lh, lc, lane_da, total, zero = aux[key]
        lh[...] = 0
        lc[...] = 0
        (ch, nh), (cc, nc) = (lh[0], lh[1]), (lc[0], lc[1])
        for t in range(T - 1, -1, -1):
            ch[0] = G[t]  # E_t's own term enters lane 0 (through h_t only)
            cc[0] = 0
            xp.sum(ch, axis=0, out=total[0])
            xp.sum(cc, axis=0, out=total[1])
            kk.backward(total[0], zero, C[t], C[t + 1], A[t], total[1], work[t], tmp)  # ∂a_t of every lane
            if t == 0:  # ∂E/∂(h0, c0): every lane that passed step 0
                be.matmul(work[0], W, ds0)
                grads["c0"][...] = total[1]
                break
            for d in range(k):  # lanes 0..k−1 one step back; lane k falls off
                kk.backward(ch[d], zero, C[t], C[t + 1], A[t], cc[d], lane_da[d], tmp)  # cc[d] ← its dc_{t-1}
            if k:
                be.matmul(lane_da[:k].reshape(k * B, 4 * H), W, nh[1:].reshape(k * B, H))
                nc[1:] = cc[:k]
            (ch, nh), (cc, nc) = (nh, ch), (nc, cc)
        be.matmul(work.reshape(T * B, 4 * H).T, S[:-1].reshape(T * B, H), grads["W"])  # dW = Σ_t ∂a_tᵀ h_{t-1}
        return work


class _Kernels:
    """One backend's fused LSTM step kernels (CuPy ElementwiseKernels), or their NumPy twins."""

    def __init__(self, be: Backend) -> None:
        self.xp = be.xp
        self._fwd = be.elementwise(
            "raw T pre, raw T hw, T cprev, int64 H", "T h, T c, raw T A", _FORWARD, "gpubptt_lstm_forward"
        )
        self._bwd = be.elementwise(
            "T g, T dhn, T cprev, T c, raw T A, int64 H", "T dc, raw T da", _BACKWARD, "gpubptt_lstm_backward"
        )
        #: the compiled twins (numba, ``GPUBPTT_JIT``) of the NumPy twins, or None
        self.jit = None if self._fwd is not None else compile_kernels(*JIT_KERNELS)
        self._zeros: dict[tuple[int, Any], Any] = {}

    def zeros(self, n: int, dtype: Any) -> Any:
        """n zeros of ``dtype``, made once, never written: the bias of a gates kernel whose pre has it already."""
        key = (n, np.dtype(dtype))
        if key not in self._zeros:
            self._zeros[key] = np.zeros(n, dtype=dtype)
        return self._zeros[key]

    def step_loops(self, be: Backend, w: Any, rows: int, arrays: tuple[Any, ...]) -> tuple[Any, Any] | None:
        """(forward loop, backward loop) of ``_mkl_step_loops`` for these operands, or None (``_loops.step_loops``)."""
        return step_loops(self.jit, be, w, rows, arrays, _mkl_step_loops, exp=True)

    def forward(self, pre: Any, hw: Any, cprev: Any, h: Any, c: Any, A: Any, tmp: Any) -> None:
        """One step: pre, hw (B, 4H); cprev, h, c (B, H); A (B, 4H) ← [i, f, g, o]."""
        H = h.shape[1]
        if self._fwd is not None:
            self._fwd(pre, hw, cprev, H, h, c, A)
            return
        xp = self.xp
        if self.jit is not None:  # 6 calls instead of 12; the transcendentals stay NumPy's (vectorised)
            B = A.shape[0]
            self.jit[0](pre, hw, A, h, self.zeros(A.shape[1], A.dtype), 0, B)  # A = [−a_i, −a_f, 0, −a_o], h = a_g
            exp_in_place(A, xp=xp)
            xp.tanh(h, out=h)  # g
            self.jit[1](A, cprev, c, h, A.dtype.type(1), 0, B)  # [i, f, g, o]; c = f ⊙ c_{t-1} + i ⊙ g
            xp.tanh(c, out=h)
            h *= A[:, 3 * H :]  # h = o ⊙ tanh(c)
            return
        xp.add(pre, hw, out=A)
        sigmoid_in_place(A[:, : 2 * H], xp=xp)  # i, f
        sigmoid_in_place(A[:, 3 * H :], xp=xp)  # o
        xp.tanh(A[:, 2 * H : 3 * H], out=A[:, 2 * H : 3 * H])  # g
        xp.multiply(A[:, H : 2 * H], cprev, out=c)
        xp.multiply(A[:, :H], A[:, 2 * H : 3 * H], out=tmp[0])
        c += tmp[0]  # c = f ⊙ c_{t-1} + i ⊙ g
        xp.tanh(c, out=h)
        h *= A[:, 3 * H :]  # h = o ⊙ tanh(c)

    def backward(self, g: Any, dhn: Any, cprev: Any, c: Any, A: Any, dc: Any, da: Any, tmp: Any) -> None:
        """One step back: g (B, H) the direct term (clobbered); dhn, dc (B, H) what step t+1 sends to h_t, c_t
        (dc ← dc_t ⊙ f_t, for c_{t-1}); da (B, 4H) ← ∂a_t."""
        H = g.shape[1]
        if self._bwd is not None:
            self._bwd(g, dhn, cprev, c, A, H, dc, da)
            return
        xp = self.xp
        if self.jit is not None:
            xp.tanh(c, out=tmp[0])
            self.jit[2](g, dhn, cprev, tmp[0], A, dc, da, A.dtype.type(1), 0, g.shape[0])
            return
        ig, fg, gg, og = A[:, :H], A[:, H : 2 * H], A[:, 2 * H : 3 * H], A[:, 3 * H :]
        dai, daf, dag, dao = da[:, :H], da[:, H : 2 * H], da[:, 2 * H : 3 * H], da[:, 3 * H :]
        dh, tc, t1 = g, tmp[0], tmp[1]
        dh += dhn
        xp.tanh(c, out=tc)
        xp.subtract(1, og, out=t1)
        t1 *= og  # o (1 − o)
        t1 *= tc
        xp.multiply(t1, dh, out=dao)  # ∂a_o = dh ⊙ tanh(c) ⊙ o (1 − o)
        tc *= tc
        xp.subtract(1, tc, out=tc)
        tc *= og
        tc *= dh
        dc += tc  # dc_t = dc' + dh ⊙ o ⊙ (1 − tanh²c)
        xp.multiply(gg, gg, out=t1)
        xp.subtract(1, t1, out=t1)
        t1 *= ig
        xp.multiply(t1, dc, out=dag)  # ∂a_g = dc ⊙ i ⊙ (1 − g²)
        xp.subtract(1, ig, out=t1)
        t1 *= ig
        t1 *= gg
        xp.multiply(t1, dc, out=dai)  # ∂a_i = dc ⊙ g ⊙ i (1 − i)
        xp.subtract(1, fg, out=t1)
        t1 *= fg
        t1 *= cprev
        xp.multiply(t1, dc, out=daf)  # ∂a_f = dc ⊙ c_{t-1} ⊙ f (1 − f)
        dc *= fg  # dc' for step t−1


# The compiled twins (``_jit.compile_kernels``): plain loops over (B, H), one row at a time, each loop over a
# row's H units short enough (few arrays) for the compiler to vectorise it; the CUDA bodies' formulas
# above, in the array dtype (``one`` carries it: a Python float would widen float32). σ's division is
# ``np.true_divide``: numba's ``/`` checks for a zero divisor (Python's semantics), and that check kept the loop from
# vectorising (18.6 against 4.3 µs for 32 × 512 float32 values).


def _jit_gates_in(pre: Any, hw: Any, A: Any, gt: Any, bias: Any, r0: int, r1: int) -> None:
    """A (B, 4H) ← [−a_i, −a_f, 0, −a_o] with a = pre + hw + bias (4H,) (zeros where pre has the bias already),
    and gt (B, H) ← a_g, on rows r0..r1−1: the arguments of the one exp over A (σ(a) = 1 / (1 + exp(−a)); the g
    columns' exp(0) is unused) and of g's tanh."""
    H = A.shape[1] // 4
    for b in range(r0, r1):
        p, w, a, g = pre[b], hw[b], A[b], gt[b]
        for j in range(2 * H):
            a[j] = -(p[j] + w[j] + bias[j])
        for j in range(H):
            g[j] = p[2 * H + j] + w[2 * H + j] + bias[2 * H + j]
        for j in range(2 * H, 3 * H):
            a[j] = 0
        for j in range(3 * H, 4 * H):
            a[j] = -(p[j] + w[j] + bias[j])


def _jit_cell_state(A: Any, cprev: Any, c: Any, gt: Any, one: Any, r0: int, r1: int) -> None:
    """A (B, 4H) holds exp(−a) for i, f, o: i, f, o ← 1 / (1 + exp(−a)) (σ), g ← gt (B, H) (tanh(a_g));
    c (B, H) ← f ⊙ c_{t-1} + i ⊙ g; rows r0..r1−1."""
    H = c.shape[1]
    for b in range(r0, r1):
        a, cp, cb, g = A[b], cprev[b], c[b], gt[b]
        for j in range(2 * H):
            a[j] = np.true_divide(one, one + a[j])
        for j in range(H):
            a[2 * H + j] = g[j]
        for j in range(3 * H, 4 * H):
            a[j] = np.true_divide(one, one + a[j])
        for j in range(H):
            cb[j] = a[H + j] * cp[j] + a[j] * a[2 * H + j]


def _jit_backward(g: Any, dhn: Any, cprev: Any, tc: Any, A: Any, dc: Any, da: Any, one: Any, r0: int, r1: int) -> None:
    """One step back, as ``_BACKWARD``, rows r0..r1−1: tc (B, H) = tanh(c_t); g ← dh (clobbered); da (B, 4H) ←
    ∂a_t; dc ← dc_t ⊙ f_t."""
    H = g.shape[1]
    for b in range(r0, r1):
        dh, dhb, cp, t, dcb = g[b], dhn[b], cprev[b], tc[b], dc[b]
        ig, fg, gg, og = A[b, :H], A[b, H : 2 * H], A[b, 2 * H : 3 * H], A[b, 3 * H :]
        dai, daf, dag, dao = da[b, :H], da[b, H : 2 * H], da[b, 2 * H : 3 * H], da[b, 3 * H :]
        for j in range(H):
            dh[j] += dhb[j]
        for j in range(H):
            dao[j] = dh[j] * t[j] * og[j] * (one - og[j])
        for j in range(H):
            dcb[j] += dh[j] * og[j] * (one - t[j] * t[j])
        for j in range(H):
            dai[j] = dcb[j] * gg[j] * ig[j] * (one - ig[j])
        for j in range(H):
            daf[j] = dcb[j] * cp[j] * fg[j] * (one - fg[j])
        for j in range(H):
            dag[j] = dcb[j] * ig[j] * (one - gg[j] * gg[j])
        for j in range(H):
            dcb[j] *= fg[j]


def _jit_backward_in_place(g: Any, dhn: Any, cprev: Any, tc: Any, A: Any, dc: Any, one: Any, r0: int, r1: int) -> None:
    """``_jit_backward`` with ∂a_t written over the gates A (B, 4H) that it reads, rows r0..r1−1 (each entry read
    before it is overwritten; o is not needed in the second pass): two passes over a row instead of seven."""
    H = g.shape[1]
    for b in range(r0, r1):
        dh, dhb, cp, t, dcb = g[b], dhn[b], cprev[b], tc[b], dc[b]
        ig, fg, gg, og = A[b, :H], A[b, H : 2 * H], A[b, 2 * H : 3 * H], A[b, 3 * H :]
        for j in range(H):
            d, o, tj = dh[j] + dhb[j], og[j], t[j]
            dh[j] = d
            dcb[j] += d * o * (one - tj * tj)  # dc_t = dc' + dh ⊙ o ⊙ (1 − tanh²c)
            og[j] = d * tj * o * (one - o)  # ∂a_o
        for j in range(H):
            d, i, f, gj = dcb[j], ig[j], fg[j], gg[j]
            ig[j] = d * gj * i * (one - i)  # ∂a_i
            fg[j] = d * cp[j] * f * (one - f)  # ∂a_f
            gg[j] = d * i * (one - gj * gj)  # ∂a_g
            dcb[j] = d * f  # dc' for step t−1


def _jit_gates_in_place(hw: Any, A: Any, gt: Any, bias: Any, r0: int, r1: int) -> None:
    """``_jit_gates_in`` with pre in A (B, 4H) itself: A ← [−a_i, −a_f, 0, −a_o], gt ← a_g (a = A + hw + bias: the
    input bias here, where the step's projection is read anyway, ``adds_input_bias``; or zeros) on rows r0..r1−1.
    A kernel of its own: given pre and A as one array, ``_jit_gates_in`` finds them overlapping and runs its
    scalar loop (8.8 against 4.2 µs for 16 rows at H = 256)."""
    H = A.shape[1] // 4
    for b in range(r0, r1):
        w, a, g = hw[b], A[b], gt[b]
        for j in range(2 * H):
            a[j] = -(a[j] + w[j] + bias[j])
        for j in range(H):
            g[j] = a[2 * H + j] + w[2 * H + j] + bias[2 * H + j]
        for j in range(2 * H, 3 * H):
            a[j] = 0
        for j in range(3 * H, 4 * H):
            a[j] = -(a[j] + w[j] + bias[j])


def _mkl_step_loops(
    compute: Any, tanh: Any, exp: Any, gates_in: Any, cell_state: Any, backward: Any, backward_in_place: Any,
    gates_in_place: Any,
) -> tuple[Any, Any]:  # fmt: skip
    """The forward and backward step loops of a batch's rows as plain Python for numba (``_jit.compile_loops``):
    per step the GEMM on the packed W through MKL's ``compute`` (cblas_?gemm_compute), the compiled kernels
    (``JIT_KERNELS`` compiled; ``backward`` is the per-step path's) and MKL's vectorised ``exp`` (v?Exp, for σ)
    and ``tanh`` (v?Tanh) over the rows' block; the same operations as ``_Kernels.forward`` / ``backward`` with
    ``matmul`` between them, the backward one writing ∂a_t over the gates A[t] (``_jit_backward_in_place``), the
    forward one the gates over the projection where that is in A (``_jit_gates_in_place``)."""

    def forward_loop(pre: Any, S: Any, A: Any, C: Any, hw: Any, bias: Any, w: int, one: Any, in_place: bool,
                     r0: int, r1: int) -> None:  # fmt: skip
        """Rows r0..r1−1 of pre, A (T, B, 4H), S, C (T+1, B, H), hw (B, 4H); bias (4H,) the input bias pre lacks,
        or empty; w Wᵀ packed for r1 − r0 rows; ``in_place``: pre is A (the projection is in A, each step's gates
        go over it). g's argument and tanh pass through h_t's rows (S[t+1]) before h_t is written."""
        T, G = pre.shape[0], pre.shape[2]
        H, n = S.shape[2], r1 - r0
        size = S.itemsize
        for t in range(T):  # hw = h_{t-1} @ Wᵀ
            compute(101, 111, 151, n, G, H, S[t, r0].ctypes.data, S.strides[1] // size, w, G, 0.0,
                    hw[r0].ctypes.data, hw.strides[0] // size)  # fmt: skip
            a, c, h = A[t], C[t + 1], S[t + 1]
            if in_place:
                gates_in_place(hw, a, h, bias, r0, r1)  # a = [−a_i, −a_f, 0, −a_o], h = a_g
            else:
                gates_in(pre[t], hw, a, h, bias, r0, r1)
            if a.strides[0] == G * size:  # the rows' gates are one block: one call
                exp(n * G, a[r0].ctypes.data, a[r0].ctypes.data)
            else:
                for b in range(r0, r1):
                    exp(G, a[b].ctypes.data, a[b].ctypes.data)
            block = c.strides[0] == H * size and h.strides[0] == H * size  # the rows of c and h are one block each
            if block:
                tanh(n * H, h[r0].ctypes.data, h[r0].ctypes.data)  # g
            else:
                for b in range(r0, r1):
                    tanh(H, h[b].ctypes.data, h[b].ctypes.data)
            cell_state(a, C[t], c, h, one, r0, r1)
            if block:
                tanh(n * H, c[r0].ctypes.data, h[r0].ctypes.data)
            else:
                for b in range(r0, r1):
                    tanh(H, c[b].ctypes.data, h[b].ctypes.data)
            for b in range(r0, r1):
                hb, ob = h[b], a[b, 3 * H :]
                for j in range(H):
                    hb[j] *= ob[j]  # h = o ⊙ tanh(c)

    def backward_loop(G: Any, dh: Any, A: Any, C: Any, dc: Any, tc: Any, w: int, one: Any, r0: int,
                      r1: int) -> None:  # fmt: skip
        """Rows r0..r1−1 of G (T, B, H) clobbered, dh, dc, tc (B, H), A (T, B, 4H) the gates, ← ∂a, C (T+1, B, H);
        w W packed for r1 − r0 rows."""
        T, H, n = G.shape[0], G.shape[2], r1 - r0
        size = G.itemsize
        for t in range(T - 1, -1, -1):
            c = C[t + 1]
            if c.strides[0] == H * size and tc.strides[0] == H * size:  # the rows are one block: one call
                tanh(n * H, c[r0].ctypes.data, tc[r0].ctypes.data)
            else:
                for b in range(r0, r1):
                    tanh(H, c[b].ctypes.data, tc[b].ctypes.data)
            backward_in_place(G[t], dh, C[t], tc, A[t], dc, one, r0, r1)
            compute(101, 111, 151, n, H, 4 * H, A[t, r0].ctypes.data, A.strides[1] // size, w, H, 0.0,
                    dh[r0].ctypes.data, dh.strides[0] // size)  # fmt: skip  # dh_{t-1} = ∂a_t @ W

    return forward_loop, backward_loop


#: the compiled twins' Python sources, in the order ``_Kernels.jit`` holds them
JIT_KERNELS = (_jit_gates_in, _jit_cell_state, _jit_backward, _jit_backward_in_place, _jit_gates_in_place)

#: ``kernels(be)``: the LSTM kernels of backend ``be`` (built once per backend)
kernels: PerBackend[_Kernels] = PerBackend(_Kernels, "LSTM kernels")
