"""Gradient flow through any cell, measured the same way for every cell: what ``gpubptt vanish --cell`` runs.

The step Jacobian of the whole state (h for rnn and gru, (h, c) for the LSTM) is each cell's own
``step_jacobian``, per example from the forward's own gates, dense (B, n, n), n = H or 2H; for example:

    rnn    ∂h_t/∂h_{t−1} = diag(1 − h_t²) W
    gru    ∂h_t/∂h_{t−1} = diag(z) + diag(h_{t−1} − n) ∂z + diag(1 − z) ∂n
           ∂z = diag(z(1 − z)) W_z   ∂r = diag(r(1 − r)) W_r   ∂n = diag(1 − n²) (diag(m) ∂r + diag(r) W_n)
    lstm   ∂c_t/∂h_{t−1} = diag(c_{t−1}) ∂f + diag(g) ∂i + diag(i) ∂g      ∂c_t/∂c_{t−1} = diag(f)
           ∂h_t/∂(h, c)_{t−1} = diag(tanh c_t) ∂o + diag(o (1 − tanh² c_t)) ∂c_t      (∂o = diag(o(1 − o)) W_o, …)

From them: ‖Π_{j=k+1..t} ∂s_j/∂s_{j−1}‖₂ against the lag t − k (t the last step; geometric mean over
the batch; for the LSTM also the c→c block of the product, ∂c_t/∂c_k, the cell-state path), the
horizon (first lag below a threshold) and the fitted factor per step; ‖∂E/∂s_t‖ per step (the
backward recursion d_t = g_t + J_{t+1}ᵀ d_{t+1} on these Jacobians); and the truncation bias of
tutorial truncation, for any cell, from the model's own exact BPTT on windows:

    g_k = Σ_t (G(a_t, t) − G(a_t, t − 1)),   a_t = max(0, t − k)

G(a, t) the gradient of E_a + … + E_t on steps a..t started from the state at step a − 1 (held
fixed): the difference is E_t's contribution through steps t, t − 1, …, t − k only. One layer, one
direction only (stacks of gated or IndRNN cells are not measured); x time-major whatever the model's
``batch_first``, the per-step softmax loss whatever its ``head``; the host, float64. Dense Jacobians
cost T·B·n² memory: meant for H up to a few hundred.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import get_backend, to_numpy
from ..cells import make_cell
from ..engine import stack as engine
from ..engine.memory import cell_flow_memory, check_fits
from ..errors import InputError
from ..model import RNN
from ..plots import figure_title, new_figure, save_png
from ._common import ToDict, batch_of, check_int, check_list, check_model, check_positive_float

__all__ = [
    "CellFlow", "cell_flow", "compare_cells", "plot_cells", "step_jacobians", "truncated_gradients",
    "truncation_windows",
]  # fmt: skip

#: The horizon is the first lag whose product norm falls below this.
DEFAULT_THRESHOLD = 1e-3
#: ``CellFlow.smallest_truncate``: the smallest window whose relative error is below this (the tables' truncate@1%).
TRUNCATE_TOL = 0.01


@dataclass
class CellFlow(ToDict):
    """The gradient flow of one cell on one batch (host float64 arrays).

    lags (T+1,) 0..T; log_norms (T+1,) mean over the batch of log ‖∂s_{T−1}/∂s_{T−1−ℓ}‖₂ (the whole
    state); cell_log_norms the LSTM's ∂c_{T−1}/∂c_{T−1−ℓ} (None otherwise); step_norms (T,)
    ‖∂E/∂s_t‖ over the batch; s0_norm ‖∂E/∂s0‖; horizon, decay_rate (and cell_horizon,
    cell_decay_rate): first lag below ``threshold`` and exp(fitted slope of the log norm per lag);
    truncate, rel_error, cosine: the truncated gradient of every parameter against full BPTT, at the
    measured windows; smallest_truncate: the smallest k in 0..T−1 whose relative error is below
    ``TRUNCATE_TOL`` (1 %), every window measured from k = 0 up to it (the error need not fall
    monotonically with k, so no window is skipped); None when the truncation bias is skipped.
    """

    cell: str
    hidden_size: int
    parameters: int
    threshold: float
    lags: np.ndarray
    log_norms: np.ndarray
    cell_log_norms: np.ndarray | None
    step_norms: np.ndarray
    s0_norm: float
    horizon: int | None
    decay_rate: float | None
    cell_horizon: int | None
    cell_decay_rate: float | None
    truncate: np.ndarray
    rel_error: np.ndarray
    cosine: np.ndarray
    smallest_truncate: int | None = None

    def truncate_within(self, tol: float = 0.01) -> int | None:
        """The smallest measured window (in ``truncate``) whose gradient is within ``tol`` (relative) of full BPTT,
        or None; ``smallest_truncate`` is the smallest of every window 0..T−1 (1 %)."""
        ok = np.flatnonzero(self.rel_error < tol)
        return int(self.truncate[ok[0]]) if ok.size else None


def _host_model(model: RNN) -> RNN:
    """A float64 NumPy copy (the diagnostics run on the host), reading x time-major under the per-step softmax head."""
    if model.num_states != 1:
        arch = f"{model.num_layers} layer{'s' if model.num_layers > 1 else ''}"
        raise InputError(
            f"the cell diagnostics measure one layer and one direction only; this {model.cell_name} model has "
            f"{arch}{', bidirectional' if model.bidirectional else ''}: "
            + ("diagnostics.stack_report measures stacks of rnn cells" if model.cell_name == "rnn"
               else f"stacks of {model.cell_name} cells are not measured (stack_report takes rnn cells only)")
        )  # fmt: skip
    params = {k: to_numpy(v).astype(np.float64) for k, v in model.params.items()}
    return RNN.from_params(params, backend="numpy", dtype="float64", cell=model.cell)


def _forward(m: RNN, batch: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """The model's own forward from zero: S (T+1, B, H) and the cell's buffers (gates "A", the LSTM's "C")."""
    stack = engine.Stack(m, batch.T, batch.B, dropout=False)
    stack.load(None, None)
    stack.run(batch.x, batch.tokens, step_kernels="cublas")
    return stack.S[0], stack.aux[0]


def step_jacobians(model: RNN, x: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """J (T, B, n, n): ∂s_t/∂s_{t−1} of the whole state at every step (n = H, or 2H for the LSTM's [h, c]),
    the cell's own ``step_jacobian`` on the forward's buffers; and the forward itself: {"S": (T+1, B, H),
    "C": the cell's further state where it has one}.

    x (T, B) token ids or (T, B, D) floats; s0 zero.
    """
    m = _host_model(check_model(model))
    batch = batch_of(m, x, None, None)
    S, aux = _forward(m, batch)
    forward = {"S": S.copy()}
    C = m.cell.cell_states(aux)
    if C is not None:
        forward["C"] = np.array(C)
    J = m.cell.step_jacobian(m.recurrence_params(m.recurrences[0]), S, aux)
    return J, forward


def _fit(log_norms: np.ndarray, threshold: float) -> tuple[int | None, float | None]:
    """(first lag below threshold, exp(slope of the log norm per lag fitted over lags ≥ 1)), from mean log norms."""
    below = np.flatnonzero(log_norms < math.log(threshold))
    horizon = int(below[0]) if below.size else None
    lags = np.arange(len(log_norms))
    ok = np.isfinite(log_norms) & (lags >= 1)
    if ok.sum() < 2:
        return horizon, None
    slope = np.polyfit(lags[ok], log_norms[ok], 1)[0]
    return horizon, float(math.exp(slope))


def _window_grads(m: RNN, x: Any, y: Any, states: list[Any], a: int, t: int) -> dict[str, np.ndarray] | None:
    """The exact gradient of E_a + … + E_t over steps a..t from the (fixed) state at step a − 1; None if t < a."""
    if t < a:
        return None
    _, g = m.loss_and_grads(x[a : t + 1], y[a : t + 1], states[a])
    return g


def truncated_gradients(model: RNN, x: Any, y: Any, k: int, s0: Any = None) -> dict[str, np.ndarray]:
    """The tutorial-truncated gradient of window k, of every parameter and of s0 (an LSTM's c0 too), from exact
    BPTT on windows only: Σ_t (G(a_t, t) − G(a_t, t − 1)), a_t = max(0, t − k) (module docstring).

    x (T, B) or (T, B, D); y (T, B); s0 as the model takes it, or None. Independent of the cells'
    own truncation (it never asks for ``truncate``): 2T short runs of full BPTT.
    """
    k = check_int(k, "k", 0)
    m = _host_model(check_model(model))
    batch = m._check(x, y, s0, None, True)
    xh, yh = to_numpy(batch.x), to_numpy(batch.y)
    T = batch.T
    stack = engine.Stack(m, batch.T, batch.B, dropout=False)
    stack.load(batch.s0_stacked, None, batch.c0_stacked)
    stack.run(batch.x, batch.tokens, step_kernels="cublas")
    S, C = stack.S[0], m.cell.cell_states(stack.aux[0])  # the states at every step, to start the windows from
    states = [S[a] if C is None else (S[a], C[a]) for a in range(T)]
    extra = ["s0"] + ([m.cell.extra_state] if m.cell.extra_state else [])
    acc = {n: np.zeros(v.shape) for n, v in m.params.items()}
    acc.update({n: np.zeros(S[0].shape) for n in extra})
    for t in range(T):
        a = max(0, t - k)
        hi, lo = _window_grads(m, xh, yh, states, a, t), _window_grads(m, xh, yh, states, a, t - 1)
        for n in acc:
            if n in extra and a > 0:
                continue  # the window starts after step 0: E_t's gradient stops before s0
            acc[n] += hi[n] - (lo[n] if lo is not None else 0)
    return acc


def truncation_windows(model: RNN, x: Any, y: Any, truncates: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(rel_error, cosine) per window k of tutorial truncation against full BPTT, every parameter, any cell.

    x (T, B) or (T, B, D); y (T, B). Each truncated gradient from ``truncated_gradients``.
    """
    truncates = [check_int(k, "truncate", 0) for k in check_list(truncates, "truncates") or []]
    m = _host_model(check_model(model))
    full = _full_gradient(m, x, y)
    return _windows(m, x, y, truncates, full)


def _full_gradient(m: RNN, x: Any, y: Any) -> np.ndarray:
    """Full BPTT's gradient of every parameter of the host model ``m``, flattened in ``m.params``' order."""
    _, full = m.loss_and_grads(x, y)
    return np.concatenate([full[n].ravel() for n in m.params])


def _windows(m: RNN, x: Any, y: Any, truncates: list[int], full: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``truncation_windows`` against the full gradient ``full`` (``_full_gradient``), computed once by the caller."""
    rel, cos = [], []
    for k in truncates:
        g = truncated_gradients(m, x, y, k)
        acc = np.concatenate([g[n].ravel() for n in m.params])
        rel.append(np.linalg.norm(acc - full) / np.linalg.norm(full))
        cos.append(acc @ full / (np.linalg.norm(acc) * np.linalg.norm(full)))
    return np.array(rel), np.array(cos)


def cell_flow(
    model: RNN, x: Any, y: Any, *, threshold: float = DEFAULT_THRESHOLD, truncates: list[int] | None = None
) -> CellFlow:
    """Every measure of the module docstring for a one-layer, one-direction model of any cell.

    x (T, B) token ids or (T, B, D) floats; y (T, B) targets; s0 zero; E the sum over steps and
    examples. ``truncates``: the windows k to measure (default 0, 1, 2, 4, … and T − 1; [] skips the
    truncation bias, the one part that costs 2T short BPTT runs per window).
    """
    threshold = check_positive_float(threshold, "threshold")
    m = _host_model(check_model(model))  # one layer, one direction: refused by name before anything else
    batch = batch_of(m, x, y, None)  # x and y checked before the sizes are read from them
    T, B = batch.T, batch.B
    est = cell_flow_memory(model.input_size, model.hidden_size, model.output_size, T=T, B=B,
                           state=2 if model.cell.extra_state else 1)  # fmt: skip
    check_fits(est, get_backend("numpy").available_memory(), f"measuring the {model.cell_name} cell at T={T} "
               f"H={model.hidden_size} B={B}")  # fmt: skip  # the dense step Jacobians, before they are made
    J, fwd = step_jacobians(m, x)
    T, B, n, _ = J.shape
    H = m.hidden_size
    if truncates is None:
        truncates = sorted({0, *(2**i for i in range(max(1, T).bit_length()) if 2**i < T), max(0, T - 1)})
    truncates = [check_int(k, "truncate", 0) for k in check_list(truncates, "truncates")]
    # products from the last step back: P_ℓ = J_{T−1} ⋯ J_{T−ℓ}, renormalised (log scale kept) per example
    P = np.broadcast_to(np.eye(n), (B, n, n)).copy()
    scale = np.zeros(B)
    logs, cell_logs = [np.zeros(B)], [np.zeros(B)]
    for ell in range(1, T + 1):
        P = P @ J[T - ell]
        big = np.abs(P).max(axis=(1, 2))
        big = np.where(big > 0, big, 1.0)
        P /= big[:, None, None]
        scale += np.log(big)
        with np.errstate(divide="ignore"):
            logs.append(np.log(np.linalg.norm(P, ord=2, axis=(1, 2))) + scale)
            if n == 2 * H:
                cell_logs.append(np.log(np.linalg.norm(P[:, H:, H:], ord=2, axis=(1, 2))) + scale)
    log_norms = np.mean(logs, axis=1)
    cell_log_norms = np.mean(cell_logs, axis=1) if n == 2 * H else None
    # ∂E/∂s_t: d_t = g_t + J_{t+1}ᵀ d_{t+1}, g_t = [V_ᵀ do_t, 0]
    yh = to_numpy(batch.y)
    V, c = np.asarray(m.params["V"]), np.asarray(m.params.get("c", 0.0))
    z = fwd["S"][1:] @ V.T + c  # (T, B, K)
    p = np.exp(z - z.max(axis=2, keepdims=True))
    p /= p.sum(axis=2, keepdims=True)
    p[np.arange(T)[:, None], np.arange(B)[None, :], yh] -= 1  # do_t
    g = np.zeros((T, B, n))
    g[..., :H] = p @ V
    d = np.zeros((B, n))
    step_norms = np.zeros(T)
    for t in range(T - 1, -1, -1):
        d = g[t] + (np.einsum("bij,bi->bj", J[t + 1], d) if t + 1 < T else 0)
        step_norms[t] = np.linalg.norm(d)
    s0_norm = float(np.linalg.norm(np.einsum("bij,bi->bj", J[0], d)))
    horizon, rate = _fit(log_norms, threshold)
    cell_horizon, cell_rate = _fit(cell_log_norms, threshold) if cell_log_norms is not None else (None, None)
    rel, cos, smallest = np.zeros(0), np.zeros(0), None
    if truncates:
        full = _full_gradient(m, x, y)  # once, for every window
        rel, cos = _windows(m, x, y, truncates, full)
        smallest = _smallest_truncate(m, x, y, dict(zip(truncates, rel, strict=True)), T, full)
    return CellFlow(
        cell=m.cell_name, hidden_size=H, parameters=int(sum(v.size for v in m.params.values())),
        threshold=threshold, lags=np.arange(T + 1), log_norms=log_norms, cell_log_norms=cell_log_norms,
        step_norms=step_norms, s0_norm=s0_norm, horizon=horizon, decay_rate=rate, cell_horizon=cell_horizon,
        cell_decay_rate=cell_rate, truncate=np.array(truncates), rel_error=rel, cosine=cos,
        smallest_truncate=smallest,
    )  # fmt: skip


def _smallest_truncate(m: RNN, x: Any, y: Any, measured: dict[int, float], T: int, full: np.ndarray) -> int | None:
    """The smallest k = 0, 1, 2, … whose relative truncation error is below ``TRUNCATE_TOL``: each k in turn (the
    windows of ``measured`` reused), up to the first that is (k = T − 1 is full BPTT; None only where the full
    gradient is 0 and no relative error is defined). ``full``: full BPTT's gradient (``_full_gradient``)."""
    for k in range(T):
        rel = measured[k] if k in measured else _windows(m, x, y, [k], full)[0][0]
        if rel < TRUNCATE_TOL:
            return k
    return None


def compare_cells(
    cells: list[str], T: int, H: int, B: int, vocab: int, *, seed: int = 0, threshold: float = DEFAULT_THRESHOLD
) -> list[CellFlow]:
    """``cell_flow`` of a random model of each cell on the same random tokens x, y (T, B) from ``seed``.

    The hidden size H is matched (not the parameter count: a GRU has about 3×, an LSTM 4× the
    recurrent weights of an rnn of the same H), and every model takes torch's init (U(±1/√H) for
    every recurrent parameter, as ``nn.RNN``/``nn.GRU``/``nn.LSTM``), on NumPy in float64.
    """
    T, H, B, vocab = (check_int(v, name, 1) for v, name in ((T, "T"), (H, "H"), (B, "B"), (vocab, "vocab")))
    rng = np.random.default_rng(check_int(seed, "seed", 0))
    x = rng.integers(0, vocab, size=(T, B))
    y = rng.integers(0, vocab, size=(T, B))
    widest = 2 if any(make_cell(c).extra_state for c in cells) else 1  # the largest measure, checked before any
    check_fits(cell_flow_memory(vocab, H, vocab, T=T, B=B, state=widest), get_backend("numpy").available_memory(),
               f"measuring the cells at T={T} H={H} B={B}")  # fmt: skip
    out = []
    for cell in cells:
        model = RNN(vocab, H, vocab, cell=cell, backend="numpy", dtype="float64", init="torch", seed=seed, bias=True)
        out.append(cell_flow(model, x, y, threshold=threshold))
    return out


#: A relative truncation error at or below this is float64 rounding of an exact window (plot_cells).
EXACT_TO_ROUNDING = 1e-12


def plot_cells(flows: list[CellFlow], path: Any, *, title: str | None = None) -> None:
    """One PNG, the cells side by side: product norm against the lag (LSTM's c path dashed), ‖∂E/∂s_t‖ against
    t, and the truncation bias against the window k. Needs matplotlib (the ``plot`` extra)."""
    if not flows:
        raise InputError("nothing to plot: no cells measured")
    fig = new_figure(figsize=(15.0, 4.6), layout="constrained")
    ax = fig.subplots(1, 3)
    for f, col in zip(flows, ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "k"), strict=False):
        rate = "—" if f.decay_rate is None else f"{f.decay_rate:.3f}"
        ax[0].semilogy(f.lags, np.exp(f.log_norms), color=col, lw=2, label=f"{f.cell}: ×{rate}/step")
        if f.cell_log_norms is not None:
            crate = "—" if f.cell_decay_rate is None else f"{f.cell_decay_rate:.3f}"
            ax[0].semilogy(f.lags, np.exp(f.cell_log_norms), color=col, lw=1.5, ls="--",
                           label=f"{f.cell} ∂c_t/∂c_k: ×{crate}/step")  # fmt: skip
        ax[1].semilogy(np.arange(len(f.step_norms)), f.step_norms, color=col, lw=2, label=f.cell)
        # a window as long as the sequence is exact: its ~1e-16 is float64 rounding, and on the log axis
        # it squashed every other point into the top of the panel, so it is left out
        err = np.where(np.asarray(f.rel_error) > EXACT_TO_ROUNDING, f.rel_error, np.nan)
        ax[2].semilogy(f.truncate, err, "o-", color=col, label=f.cell)
    ax[0].axhline(flows[0].threshold, color="0.5", lw=0.8, ls=":")
    ax[0].set(xlabel="lag t − k", ylabel="‖∂s_t/∂s_k‖₂ (geometric mean over the batch)", title="Jacobian products")
    ax[1].set(xlabel="step t", ylabel="‖∂E/∂s_t‖", title="gradient reaching each step")
    ax[2].set(xlabel="truncation window k", ylabel="‖g_k − g‖ / ‖g‖", title="truncation bias (exact windows left out)")
    ax[2].set_xscale("symlog", linthresh=1)  # k = 0 at 0 (a log axis had drawn it at 0.5), log-spaced beyond 1
    windows = sorted({int(k) for f in flows for k in f.truncate})
    ax[2].set_xticks(windows, [str(k) for k in windows])
    ax[2].minorticks_off()
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    if title:
        figure_title(fig, title)
    save_png(fig, path)
