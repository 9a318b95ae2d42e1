"""The Elman cell (``torch.nn.RNN``, tanh or relu): its parameters, its two recurrences and its kernels.

    s_t = φ(U x_t + b + W s_{t-1})                     U (H, D), W (H, H), b (H,); φ = tanh or relu
    δ_t = (∂E_t/∂s_t + δ_{t+1} @ W) ⊙ f_t              the backward recursion, δ_T = 0
    ∂s_t/∂s_{t-1} = diag(f_t) W                        the step Jacobian; f_t = φ' (``factors``):
                                                       tanh: 1 − s_t²; relu: 1 where s_t > 0, else 0

Both derivatives are read from the state itself, so the backward recursion, its kernels and
truncation are the same for both; only the forward step differs. The fused and persistent forward
kernels are compiled per φ (``PHI``); relu's have not yet run on a device, so "auto" never picks them
(``UNMEASURED``): a relu cell's forward steps are a GEMM and a fused elementwise max(·, 0) there, and
``step_kernels`` "fused" or "persistent" runs its kernels.

Rows are examples (S (T+1, B, H) with S[0] = s0 and S[t+1] = s_t). One step of each recurrence is
a GEMM and a fused elementwise kernel (the NumPy twins below), or, on a backend that compiles
kernels, one fused dot+φ kernel per step (``elman_step.cu``) or one persistent kernel for all
steps that keeps W on chip (``elman_persistent.cu``), chosen per shape by timing (``step_kernels``
"auto"), or forced ("cublas", "fused", "persistent"). On the NumPy backend under MKL with numba (the ``jit``
extra), each recurrence's steps run as one compiled call (``_mkl_step_loops``: per step the GEMM on the packed
W and the elementwise step, no Python between steps), over the whole batch or its two halves at once in two
threads (``_loops.split_rows``).
"""

from __future__ import annotations

import threading
from functools import partial
from importlib import resources
from typing import Any

import numpy as np

from ..backend import Backend
from ..errors import InputError
from ._jit import compile_kernels
from ._loops import over_rows, split_rows, step_loops
from ._per_backend import PerBackend
from .base import Cell, register_cell

__all__ = [
    "NONLINEARITIES",
    "PHI",
    "STEP_KERNELS",
    "UNMEASURED",
    "ElmanCell",
    "backward_truncated",
    "kernels",
    "phi_prime",
]

STEP_KERNELS = ("auto", "cublas", "fused", "persistent")
#: φ in the CUDA sources, by nonlinearity; relu written as a comparison, not CUDA's max (fmax, which turns NaN
#: into 0), so that a NaN stays NaN as in NumPy's maximum and torch
PHI = {"tanh": "tanh(x)", "relu": "((x) < (T)0 ? (T)0 : (x))"}
#: (family, kind) of the compiled kernels built but not yet timed on a device: "auto" never picks them, a forced
#: ``step_kernels`` ("fused", "persistent") runs them
UNMEASURED = {("fused", "forward relu"), ("persistent", "forward relu")}
#: the relu step's elementwise body: out = max(pre + hw, 0) as PHI writes it (a NaN stays NaN; CUDA's max gives 0)
_RELU_STEP = "const T a = pre + hw; out = a < (T)0 ? (T)0 : a"
NONLINEARITIES = ("tanh", "relu")


@register_cell
class ElmanCell(Cell):
    """The Elman cell: parameter shapes, forward and backward recurrences, step Jacobian factors.

    ``nonlinearity`` "tanh" (the default) or "relu", as ``torch.nn.RNN``'s.

    What the engine calls (the interface every cell implements; see ``gpubptt.cells``): ``gates``
    (rows of U and W per hidden unit), ``input_bias`` (the bias the engine adds in the input
    projection and whose gradient it sums), ``param_shapes``, ``buffers``, ``load``, ``run_forward``
    and ``run_backward``. The lower-level ``forward``, ``factors``, ``backward``, ``step_back`` and
    ``enter`` are this cell's own (diagnostics and tests use them).
    """

    option = "rnn"
    name = "elman"
    torch_module = "nn.RNN"
    takes_nonlinearity = True
    #: rows of U (gates·H, D) and W (gates·H, H) per hidden unit
    gates = 1
    #: the bias added to U x_t in the input projection (its gradient is Σ_t ∂E/∂pre_t)
    input_bias = "b"
    #: a state carried beside s from step to step: False (s is the whole state) or its name ("c0", an
    #: LSTM's cell state: its initial value and gradient go by that name); recomputation keeps only s
    extra_state = False

    def __init__(self, nonlinearity: str = "tanh") -> None:
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"unknown nonlinearity {nonlinearity!r}; expected one of {', '.join(NONLINEARITIES)}")
        self.nonlinearity = nonlinearity

    def options(self) -> dict[str, Any]:
        """{"nonlinearity": φ}."""
        return {"nonlinearity": self.nonlinearity}

    @classmethod
    def from_options(cls, nonlinearity: str | None = None, **options: Any) -> ElmanCell:
        """ElmanCell(nonlinearity or "tanh"); InputError on an unknown φ or option."""
        if options:
            raise InputError(f"cell 'rnn' takes no options beyond nonlinearity, got {sorted(options)}")
        nonlinearity = "tanh" if nonlinearity is None else nonlinearity
        if nonlinearity not in NONLINEARITIES:
            raise InputError(f"unknown nonlinearity {nonlinearity!r}; expected one of {', '.join(NONLINEARITIES)}")
        return cls(nonlinearity)

    def activate(self, a: Any, *, xp: Any) -> Any:
        """φ(a), a new array (what sampling runs one step at a time on the host)."""
        return xp.tanh(a) if self.nonlinearity == "tanh" else xp.maximum(a, 0)

    def param_shapes(self, D: int, H: int, bias: bool) -> dict[str, tuple[int, ...]]:
        """The recurrent parameters: U (H, D) like ``weight_ih_l0``, W (H, H) like ``weight_hh_l0``, b (H,)."""
        shapes: dict[str, tuple[int, ...]] = {"U": (H, D), "W": (H, H)}
        if bias:
            shapes["b"] = (H,)
        return shapes

    def step_jacobian(self, p: dict[str, np.ndarray], S: np.ndarray, aux: dict[str, np.ndarray]) -> np.ndarray:
        """∂s_t/∂s_{t−1} = diag(φ'_t) W, (T, B, H, H): tanh φ' = 1 − s_t², relu 1 where s_t > 0."""
        f = phi_prime(S[1:], self.nonlinearity, xp=np, out=np.empty_like(S[1:]))
        return f[..., None] * p["W"]

    # -- the engine's interface (buffers, load, cell_states: the base's, none for this cell) ----
    def run_forward(
        self, pre: Any, p: dict[str, Any], S: Any, aux: dict[str, Any], *, be: Backend, scratch: Any, step_kernels: str
    ) -> None:
        """The recurrence over all steps: pre (T, B, gates·H) = U x_t + input bias; S (T+1, B, H) with S[0] set.

        p: this recurrence's parameters by base name ("U", "W", "b").
        """
        self.forward(pre, p["W"], S, be=be, scratch=scratch, step_kernels=step_kernels)

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
        """BPTT through this recurrence; returns ∂E/∂pre (T, B, gates·H) (here G itself, in place).

        G (T, B, H) enters as ∂E/∂s_t from above (output layer or the next layer); ``work`` (T, B,
        gates·H) and ``scratch`` (B, H) are free; ``lanes`` (2, k+1, B, H) for ``truncate`` = k.
        Writes the gradients of the recurrent-side parameters into ``grads`` (by base name: W) and
        ∂E/∂s0 into ``ds0`` (B, H). The engine then forms dU, the input bias's gradient and ∂E/∂x.
        """
        F = self.factors(S, be=be, out=work)  # the step factors φ'
        if truncate is None:
            self.backward(G, p["W"], F, be=be, carry=scratch, step_kernels=step_kernels)
        else:
            backward_truncated(self, G, p["W"], F, truncate, be=be, lanes=lanes[0], spare=lanes[1])
        T, B, H = G.shape
        be.matmul(G.reshape(T * B, H).T, S[:-1].reshape(T * B, H), grads["W"])  # dW = Σ_t δ_tᵀ s_{t-1}
        be.matmul(G[0], p["W"], ds0)  # ds0 = δ_0 @ W
        return G

    # -- this cell's recurrences -----------------------------------------------------------------
    def forward(self, pre: Any, W: Any, S: Any, *, be: Backend, scratch: Any, step_kernels: str = "auto") -> None:
        """s_t = φ(pre_t + s_{t-1} @ W.T) for t = 0..T-1, in place.

        pre (T, B, H) = U x_t + b; S (T+1, B, H) with S[0] = s0 on entry, S[1:] written; scratch (B, H).
        """
        if pre.shape[0] == 0:
            return
        k = kernels(be)
        if k.forward_recurrence(pre, W, S, step_kernels, self.nonlinearity):  # all steps in one kernel
            return
        job = partial(self._forward_rows, pre, W, S, scratch, step_kernels=step_kernels, be=be, k=k)
        over_rows(be, k.halves(be, pre.shape[1], pre.shape[2], pre.shape[0]), job)  # the batch, or its two halves

    def _forward_rows(
        self, pre: Any, W: Any, S: Any, scratch: Any, rows: slice, step_kernels: str, *, be: Backend, k: Any
    ) -> None:
        """``forward`` on the batch rows ``rows`` of pre (T, B, H), S (T+1, B, H), scratch (B, H)."""
        r0, r1, _ = rows.indices(pre.shape[1])
        T, n = pre.shape[0], r1 - r0
        Wt = be.pack(W.T, n, T, loop=k.jit is not None)  # Wᵀ packed once for all steps where the backend packs (MKL)
        loops = k.step_loops(be, Wt, n, (pre, S))
        if loops is not None:  # all T steps in one compiled call (whole buffers, rows r0..r1−1: ``_loops``)
            loops[0](pre, S, Wt.ptr, self.nonlinearity == "relu", r0, r1)
            return
        pre, S, scratch = pre[:, rows], S[:, rows], scratch[rows]
        for t in range(T):  # s_t = φ(pre_t + s_{t-1} @ W.T)
            k.forward_step(S[t], W, pre[t], S[t + 1], scratch, step_kernels, Wt, self.nonlinearity)

    def factors(self, S: Any, *, be: Backend, out: Any) -> Any:
        """φ' at every step, from the states: S (T+1, B, H) → out (T, B, H); ∂s_t/∂s_{t-1} = diag(out[t]) W.

        tanh: 1 − s_t²; relu: 1 where s_t > 0, else 0 (s_t ≥ 0, so its sign).
        """
        return phi_prime(S[1:], self.nonlinearity, xp=be.xp, out=out)

    def backward(self, G: Any, W: Any, F: Any, *, be: Backend, carry: Any, step_kernels: str = "auto") -> None:
        """Full BPTT, in place: G (T, B, H) enters as the direct term ∂E_t/∂s_t and leaves as δ_t.

        F (T, B, H) from ``factors``; carry (B, H) scratch.
        """
        T = G.shape[0]
        if T == 0:
            return
        G[T - 1] *= F[T - 1]  # δ_{T-1}: no later step feeds back
        k = kernels(be)
        if T == 1 or k.backward_recurrence(G, W, F, step_kernels):  # all steps in one kernel
            return
        job = partial(self._backward_rows, G, W, F, carry, step_kernels=step_kernels, be=be, k=k)
        over_rows(be, k.halves(be, G.shape[1], G.shape[2], T - 1), job)  # the batch, or its two halves at once

    def _backward_rows(
        self, G: Any, W: Any, F: Any, carry: Any, rows: slice, step_kernels: str, *, be: Backend, k: Any
    ) -> None:
        """``backward``'s steps T−2 … 0 on the batch rows ``rows`` (G[T−1] already δ_{T−1}) of G, F (T, B, H), carry
        (B, H)."""
        r0, r1, _ = rows.indices(G.shape[1])
        T, n = G.shape[0], r1 - r0
        Wp = be.pack(W, n, T - 1, loop=k.jit is not None)  # W packed once for the T − 1 steps where the backend packs
        loops = k.step_loops(be, Wp, n, (G, F, carry))
        if loops is not None:  # all T − 1 steps in one compiled call (whole buffers, rows r0..r1−1: ``_loops``)
            loops[1](G, F, carry, Wp.ptr, r0, r1)
            return
        G, F, carry = G[:, rows], F[:, rows], carry[rows]
        for t in range(T - 2, -1, -1):
            k.backward_step(G[t + 1], W, F[t], G[t], carry, step_kernels, Wp)  # δ_t = (g_t + δ_{t+1} @ W) ⊙ f_t

    @staticmethod
    def step_back(lanes: Any, W: Any, f: Any, out: Any, *, be: Backend) -> None:
        """δ-gradients one step back, for a stack of lanes: out = (lanes @ W) ⊙ f.

        lanes, out (N, B, H) (δ's at t+1 → δ's at t); f (B, H) the step's factor. One (N·B, H) × (H, H)
        GEMM: what truncated BPTT runs on all its lanes at once.
        """
        N, B, H = lanes.shape
        be.matmul(lanes.reshape(N * B, H), W, out.reshape(N * B, H))
        out *= f

    @staticmethod
    def enter(g: Any, f: Any, out: Any, *, be: Backend) -> None:
        """A state gradient into the pre-activation: out = g ⊙ f; all (B, H), f the step's factor."""
        be.xp.multiply(g, f, out=out)


def phi_prime(s: Any, nonlinearity: str, *, xp: Any, out: Any) -> Any:
    """φ'(a) read from the state s = φ(a), into ``out`` (same shape): tanh 1 − s²; relu 1 where s > 0, else 0."""
    if nonlinearity == "relu":
        return xp.sign(s, out=out)  # s ≥ 0: its sign is the indicator
    xp.multiply(s, s, out=out)
    xp.subtract(1, out, out=out)
    return out


def backward_truncated(cell: Any, G: Any, W: Any, F: Any, k: int, *, be: Backend, lanes: Any, spare: Any) -> None:
    """Tutorial-truncated BPTT with window k ≥ 0, in place on G (as the cell's ``backward``).

    G (T, B, H) enters as ∂E_t/∂s_t, leaves as δ_t; F (T, B, H) the cell's ``factors``; lanes,
    spare (k+1, B, H) scratch. Lane d of step j holds the contribution of E_{j+d}; it moves to lane
    d+1 of step j−1 through the cell's ``step_back`` (one GEMM for all lanes), and lane k falls off.
    """
    xp = be.xp
    cur, nxt = lanes, spare
    cur[...] = 0
    for t in range(G.shape[0] - 1, -1, -1):
        if k > 0:
            cell.step_back(cur[:k], W, F[t], nxt[1:], be=be)  # every live lane one step back
        cell.enter(G[t], F[t], nxt[0], be=be)  # E_t's own contribution enters lane 0
        xp.sum(nxt, axis=0, out=G[t])
        cur, nxt = nxt, cur


# -- kernels: NumPy twins (any xp), fused and persistent CUDA kernels where the backend compiles ----
def _xp_relu_step(xp: Any):
    def relu_step(pre: Any, hw: Any, out: Any) -> None:
        xp.add(hw, pre, out=hw)
        xp.maximum(hw, 0, out=out)

    return relu_step


def _xp_tanh_step(xp: Any):
    def tanh_step(pre: Any, hw: Any, out: Any) -> None:
        xp.add(hw, pre, out=hw)
        xp.tanh(hw, out=out)

    return tanh_step


def _xp_backprop_tanh(xp: Any):
    def backprop_tanh(carry: Any, d: Any, g: Any) -> None:
        xp.add(g, carry, out=g)
        xp.multiply(g, d, out=g)

    return backprop_tanh


def _source(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


class _Kernels:
    """One backend's step kernels for the Elman cell, and (device backends) the measured choices."""

    def __init__(self, be: Backend) -> None:
        self.be = be
        xp = be.xp
        self.tanh_step = be.elementwise("T pre, T hw", "T out", "out = tanh(pre + hw)", "gpubptt_tanh_step")
        self.tanh_step = self.tanh_step or _xp_tanh_step(xp)  # out = tanh(pre + hw); hw may be clobbered
        self.relu_step = be.elementwise("T pre, T hw", "T out", _RELU_STEP, "gpubptt_relu_step")
        self.relu_step = self.relu_step or _xp_relu_step(xp)  # out = max(pre + hw, 0); hw may be clobbered
        self.backprop_tanh = be.elementwise("T carry, T d", "T g", "g = (g + carry) * d", "gpubptt_backprop_tanh")
        self.backprop_tanh = self.backprop_tanh or _xp_backprop_tanh(xp)  # g = (g + carry) * d
        self.compiled = be.compiles_kernels
        #: () where the step loops may run compiled by numba on this backend (``_loops.step_loops``), else None
        self.jit = None if self.compiled else compile_kernels()
        self._step: dict[tuple[np.dtype, str], dict[str, Any]] = {}  # by (dtype, φ)
        self._persistent: dict[tuple[np.dtype, str], dict[str, Any]] = {}
        self._compile_lock = threading.Lock()

    # -- whole step loops (NumPy backend: numba and MKL) ----------------------------------------
    def halves(self, be: Backend, B: int, H: int, steps: int) -> tuple[slice, slice] | None:
        """The batch's two halves, for ``steps`` steps of a (B, H) state run as two jobs at once
        (``_loops.split_rows``), where they run compiled (numba, MKL, float32 GEMMs exact); else None."""
        if self.jit is None or getattr(be, "mkl", None) is None or be.precision != "fp32":
            return None
        return split_rows(be, self.jit, B, H, steps)

    def step_loops(self, be: Backend, w: Any, rows: int, arrays: tuple[Any, ...]) -> tuple[Any, Any] | None:
        """(forward loop, backward loop) of ``_mkl_step_loops`` for these operands, or None (``_loops.step_loops``)."""
        return step_loops(self.jit, be, w, rows, arrays, _mkl_step_loops)

    # -- one step ----------------------------------------------------------------------------
    def forward_step(
        self, s_prev: Any, W: Any, pre: Any, out: Any, scratch: Any, step_kernels: str, Wt: Any = None,
        nonlinearity: str = "tanh",
    ) -> None:  # fmt: skip
        """out = φ(pre + s_prev @ W.T), all (B, H), W (H, H), φ tanh or relu; ``Wt``: W.T as ``Backend.pack`` made
        it, or None. One fused kernel where chosen, else a GEMM and one elementwise kernel."""
        if self._use_fused(_kind("forward", nonlinearity), W, step_kernels, s_prev, pre, out):
            self._fused_forward(s_prev, W, pre, out, nonlinearity)
            return
        self.be.matmul(s_prev, W.T if Wt is None else Wt, scratch)  # W.T is a view: BLAS reads it transposed
        (self.relu_step if nonlinearity == "relu" else self.tanh_step)(pre, scratch, out)

    def backward_step(
        self, d_next: Any, W: Any, d: Any, g: Any, scratch: Any, step_kernels: str, Wp: Any = None
    ) -> None:
        """g = (g + d_next @ W) * d, all (B, H): g enters as ∂E_t/∂s_t and leaves as δ_t; d = φ'(pre_t);
        ``Wp``: W as ``Backend.pack`` made it, or None."""
        if self._use_fused("backward", W, step_kernels, d_next, d, g):
            self._fused_backward(d_next, W, d, g)
            return
        self.be.matmul(d_next, W if Wp is None else Wp, scratch)  # the through-time term δ_{t+1} @ W
        self.backprop_tanh(scratch, d, g)

    # -- every step in one kernel --------------------------------------------------------------
    def forward_recurrence(self, pre: Any, W: Any, S: Any, step_kernels: str, nonlinearity: str = "tanh") -> bool:
        """All forward steps s_t = φ(pre_t + s_{t-1} @ W.T) in ONE kernel keeping W on chip, where measured faster
        (or forced); False (nothing done) else. pre (T, B, H), S (T+1, B, H)."""
        if not self._use_persistent(_kind("forward", nonlinearity), W, step_kernels, S, pre):
            return False
        self._launch_persistent(0, pre, W, S, None, pre.shape[0], nonlinearity)
        return True

    def backward_recurrence(self, G: Any, W: Any, Dt: Any, step_kernels: str) -> bool:
        """Backward steps T−2 … 0 in ONE kernel (G[T−1] already δ_{T−1}), where measured faster."""
        if not self._use_persistent("backward", W, step_kernels, G, Dt):
            return False
        self._launch_persistent(1, G, W, None, Dt, G.shape[0] - 1)
        return True

    # -- choices -------------------------------------------------------------------------------
    def _use_fused(self, kind: str, W: Any, step_kernels: str, a: Any, *more: Any) -> bool:
        if not self.compiled or step_kernels == "cublas" or a.size == 0:
            return False
        if not all(m.flags.c_contiguous for m in (W, a, *more)):  # the kernels index dense rows
            return False
        if step_kernels in ("fused", "persistent"):
            return True
        if ("fused", kind) in UNMEASURED:
            return False
        key = (kind, a.shape[0], W.shape[0], np.dtype(W.dtype))
        return self.be.choice("fused", key, lambda: self._time_fused_vs_cublas(*key))

    def _use_persistent(self, kind: str, W: Any, step_kernels: str, a: Any, *more: Any) -> bool:
        if not self.compiled or step_kernels in ("cublas", "fused") or a.size == 0:
            return False
        if not all(m.flags.c_contiguous for m in (W, a, *more)):
            return False
        B, H, dtype = a.shape[1], W.shape[0], np.dtype(W.dtype)
        if self._layout(B, H, dtype) is None:
            return False
        if step_kernels == "persistent":
            return True
        if ("persistent", kind) in UNMEASURED:
            return False
        key = (kind, B, H, dtype)
        measure = lambda: self._time_persistent_vs_steps(kind, B, H, dtype, step_kernels)  # noqa: E731
        return self.be.choice("persistent", key, measure)

    def _time_fused_vs_cublas(self, kind: str, B: int, H: int, dtype: np.dtype) -> bool:
        """Time 16 steps of each variant, each captured as a graph; True if the fused kernel wins."""
        be, rng = self.be, np.random.default_rng(0)
        a, pre, out, scratch = (be.asarray(rng.uniform(-1, 1, size=(B, H)), dtype=dtype) for _ in range(4))
        W = be.asarray(rng.uniform(-1, 1, size=(H, H)) / np.sqrt(H), dtype=dtype)
        if kind.startswith("forward"):
            phi, step = ("relu", self.relu_step) if kind.endswith("relu") else ("tanh", self.tanh_step)
            cublas = lambda: (be.matmul(a, W.T, scratch), step(pre, scratch, out))  # noqa: E731
            fused = lambda: self._fused_forward(a, W, pre, out, phi)  # noqa: E731
        else:
            cublas = lambda: (be.matmul(a, W, scratch), self.backprop_tanh(scratch, pre, out))  # noqa: E731
            fused = lambda: self._fused_backward(a, W, pre, out)  # noqa: E731
        repeat = lambda step: lambda: [step() for _ in range(16)]  # noqa: E731
        return be.graph_time(repeat(fused)) < be.graph_time(repeat(cublas))

    def _time_persistent_vs_steps(self, kind: str, B: int, H: int, dtype: np.dtype, step_kernels: str) -> bool:
        """Time 16 steps as one persistent kernel and as per-step launches (each captured); True if persistent wins."""
        be, rng, T = self.be, np.random.default_rng(0), 16
        a = be.asarray(rng.uniform(-1, 1, size=(T + 1, B, H)), dtype=dtype)
        b = be.asarray(rng.uniform(0, 1, size=(T + 1, B, H)), dtype=dtype)
        W = be.asarray(rng.uniform(-1, 1, size=(H, H)) / np.sqrt(H), dtype=dtype)
        scratch = be.xp.empty((B, H), dtype=dtype)
        if kind.startswith("forward"):
            phi = "relu" if kind.endswith("relu") else "tanh"
            persistent = lambda: self._launch_persistent(0, b[:T], W, a, None, T, phi)  # noqa: E731
            steps = lambda: [  # noqa: E731
                self.forward_step(a[t], W, b[t], a[t + 1], scratch, step_kernels, None, phi) for t in range(T)
            ]
        else:
            persistent = lambda: self._launch_persistent(1, a, W, None, b, T)  # noqa: E731
            steps = lambda: [  # noqa: E731
                self.backward_step(a[t + 1], W, b[t], a[t], scratch, step_kernels) for t in range(T - 1, -1, -1)
            ]
        return be.graph_time(persistent) < be.graph_time(steps)

    # -- launches ------------------------------------------------------------------------------
    def _compiled(self, table: dict[Any, dict[str, Any]], name: str, dtype: Any, nonlinearity: str) -> dict[str, Any]:
        """The kernels fwd and bwd of the source ``name`` for (dtype, φ), compiled once (caller holds the lock)."""
        key = (np.dtype(dtype), nonlinearity)
        if key not in table:
            source = f"#define PHI(x) {PHI[nonlinearity]}\n" + _source(name)
            table[key] = self.be.raw_kernels(source, ("fwd", "bwd"), key[0])
        return table[key]

    def _step_kernels(self, dtype: Any, nonlinearity: str = "tanh") -> dict[str, Any]:
        with self._compile_lock:
            return self._compiled(self._step, "elman_step.cu", dtype, nonlinearity)

    def _fused_forward(self, s_prev: Any, W: Any, pre: Any, out: Any, nonlinearity: str = "tanh") -> None:
        B, H = out.shape
        threads = 256
        blocks = (B * H * 32 + threads - 1) // threads  # one warp per output
        fwd = self._step_kernels(W.dtype, nonlinearity)["fwd"]
        fwd((blocks,), (threads,), (s_prev, W, pre, out, np.int32(B), np.int32(H)))

    def _fused_backward(self, d_next: Any, W: Any, d: Any, g: Any) -> None:
        B, H = g.shape
        threads = 128
        blocks = (B * H + threads - 1) // threads  # one thread per output
        self._step_kernels(W.dtype)["bwd"]((blocks,), (threads,), (d_next, W, d, g, np.int32(B), np.int32(H)))

    def _layout(self, B: int, H: int, dtype: Any) -> tuple[int, int, int, int, int] | None:
        """(rows per block R, blocks, lanes per output L, threads, shared bytes); None if W does not fit."""
        limits = self.be.device_limits()
        R = max(1, -(-B // limits["multiprocessors"]))  # one block per SM at most
        nbytes = (H * (H + 1) + 2 * R * H) * np.dtype(dtype).itemsize
        if B == 0 or nbytes > limits["shared_memory_per_block"]:
            return None
        L = 4  # lanes per output: measured best on an H100 among 2..32 (1.9 µs/step at B=64, H=128)
        while L > 1 and R * H * L > 1024:
            L //= 2
        threads = min(1024, max(32, -(-R * H * L // 32) * 32))
        return R, -(-B // R), L, threads, nbytes

    def _launch_persistent(
        self, which: int, a: Any, W: Any, b: Any, c: Any, steps: int, nonlinearity: str = "tanh"
    ) -> None:
        """``which`` 0: the forward kernel (a pre, b S, φ ``nonlinearity``); 1: the backward one (a G, c the
        factors; φ does not enter it)."""
        B, H = a.shape[1], a.shape[2]
        R, blocks, L, threads, nbytes = self._layout(B, H, W.dtype)
        with self._compile_lock:
            kernels = self._compiled(self._persistent, "elman_persistent.cu", W.dtype, nonlinearity)
            fn = kernels["fwd" if which == 0 else "bwd"]
            if fn.max_dynamic_shared_size_bytes < nbytes:  # raised, never lowered, under the lock
                fn.max_dynamic_shared_size_bytes = nbytes
        sizes = (np.int32(steps), np.int32(B), np.int32(H), np.int32(R), np.int32(L))
        fn((blocks,), (threads,), (a, W, b if which == 0 else c, *sizes), shared_mem=nbytes)


def _kind(kind: str, nonlinearity: str) -> str:
    """A measured choice's kind: "forward" for tanh (as measured before relu had kernels), "forward relu"."""
    return kind if nonlinearity == "tanh" else f"{kind} {nonlinearity}"


def _mkl_step_loops(compute: Any, tanh: Any) -> tuple[Any, Any]:
    """The forward and backward step loops of a batch's rows as plain Python for numba (``_jit.compile_loops``):
    per step the GEMM on the packed W through MKL's ``compute`` (cblas_?gemm_compute) and the elementwise step,
    with MKL's vectorised ``tanh`` (v?Tanh) row by row; the same operations as ``_Kernels.forward_step`` /
    ``backward_step``."""

    def forward_loop(pre: Any, S: Any, w: int, relu: bool, r0: int, r1: int) -> None:
        """Rows r0..r1−1 of pre (T, B, H), S (T+1, B, H): s_t = φ(s_{t-1} @ Wᵀ + pre_t) into S[t+1]; w Wᵀ packed
        for r1 − r0 rows."""
        T, H, n = pre.shape[0], pre.shape[2], r1 - r0
        ld = S.strides[1] // S.itemsize
        for t in range(T):
            out, p = S[t + 1], pre[t]
            compute(101, 111, 151, n, H, H, S[t, r0].ctypes.data, ld, w, H, 0.0, out[r0].ctypes.data, ld)
            for b in range(r0, r1):
                ob, pb = out[b], p[b]
                for j in range(H):
                    ob[j] += pb[j]
                if relu:
                    for j in range(H):
                        if ob[j] < 0:  # max(·, 0); a NaN stays NaN, as NumPy's maximum
                            ob[j] = 0
                else:
                    tanh(H, ob.ctypes.data, ob.ctypes.data)

    def backward_loop(G: Any, F: Any, carry: Any, w: int, r0: int, r1: int) -> None:
        """Rows r0..r1−1 of G (T, B, H), G[T−1] already δ_{T−1}: δ_t = (g_t + δ_{t+1} @ W) ⊙ f_t for t = T−2 … 0;
        F (T, B, H) the factors, carry (B, H) scratch; w W packed for r1 − r0 rows."""
        T, H, n = G.shape[0], G.shape[2], r1 - r0
        ld = G.strides[1] // G.itemsize
        for t in range(T - 2, -1, -1):
            compute(101, 111, 151, n, H, H, G[t + 1, r0].ctypes.data, ld, w, H, 0.0, carry[r0].ctypes.data,
                    carry.strides[0] // carry.itemsize)  # fmt: skip
            g, f = G[t], F[t]
            for b in range(r0, r1):
                gb, fb, cb = g[b], f[b], carry[b]
                for j in range(H):
                    gb[j] = (gb[j] + cb[j]) * fb[j]

    return forward_loop, backward_loop


#: ``kernels(be)``: the Elman kernels of backend ``be`` (built once per backend)
kernels: PerBackend[_Kernels] = PerBackend(_Kernels, "Elman kernels")
