"""The FLOP model of forward+BPTT, the GEMM rate it is measured against, and fitted exponents.

Multiply-adds count 2; elementwise work (tanh, exp, the gather and scatter-add of token inputs) is
not counted. See the package docstring for the table of products.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..timing import summarize

__all__ = ["fit_exponent", "flops", "gemm_rate"]


def flops(
    T: int, B: int, D: int, H: int, K: int, *, tokens: bool, forward_only: bool = False, num_layers: int = 1,
    dirs: int = 1, gates: int = 1, cell: Any = None,
) -> int:  # fmt: skip
    """FLOPs of forward+BPTT (or the forward pass alone) under the model in this module's docstring.

    One layer, one direction: tokens 6·B·H·T·(H + K) (forward 2·B·H·T·(H + K)); dense
    2·B·H·T·(2D + 3H + 3K) (forward 2·B·H·T·(D + H + K)). A stack adds per recurrence the same
    products with D_l = H·dirs inputs above layer 0 (forward U x and W s; backward dU, δW, dW and,
    above layer 0, ∂E/∂x), and the output layer reads H·dirs. A gated cell (``gates`` G = 3 GRU,
    4 LSTM) has G× the input and recurrent GEMMs (one layer, dense: 2·B·H·T·(G·(2D + 3H) + 3K));
    the gate arithmetic is not counted. ``cell`` (a ``Cell``): its own ``flops_per_step`` instead of a
    dense W of ``gates`` (IndRNN's recurrence is elementwise: no H² term).
    """
    fwd = bwd = 0
    for layer in range(num_layers):
        d_in = (0 if tokens else D) if layer == 0 else H * dirs
        if cell is None:
            fwd += dirs * 2 * B * H * T * gates * (d_in + H)
            bwd += dirs * 2 * B * H * T * gates * (d_in + 2 * H + (d_in if layer > 0 else 0))
            continue
        rows = cell.param_shapes(max(d_in, 1), H, False)["U"][0]  # the input projection's outputs, G·H
        fwd += dirs * T * cell.flops_per_step(B, d_in, H, backward=False)
        bwd += dirs * T * (cell.flops_per_step(B, d_in, H, backward=True) + (2 * B * rows * d_in if layer > 0 else 0))
    out = 2 * B * T * H * dirs * K
    return fwd + out if forward_only else fwd + bwd + 3 * out


def fit_exponent(sizes: Sequence[float], times: Sequence[float]) -> float | None:
    """Least-squares slope a of log(time) = a·log(size) + c; None with fewer than 2 distinct sizes."""
    pts = [(s, t) for s, t in zip(sizes, times, strict=True) if t is not None and t > 0 and s > 0]
    if len({s for s, _ in pts}) < 2:
        return None
    lx = np.log([s for s, _ in pts])
    ly = np.log([t for _, t in pts])
    return float(np.polyfit(lx, ly, 1)[0])


def gemm_rate(
    times: dict[str, list[float]], T: int, B: int, H: int, K: int, total_flops: float, recurrences: int = 1,
    cell: Any = None,
) -> tuple[dict[str, float], float]:  # fmt: skip
    """The GEMM rate a forward+BPTT of these sizes could reach, from the ``gemm_references`` times.

    The sequential products of each of the ``recurrences`` (``cell.sequential_flops_per_step``·T: 4·B·G·H²·T
    for a dense W, none for IndRNN's elementwise recurrence; None: an Elman cell's 4·B·H²·T) are charged at
    the rate of T back-to-back (B, H)×(H, G·H) GEMMs (``gemm_references(..., gates=G)``), the rest at one
    (T·B, H)×(H, K) GEMM: returns ({"step_gflops", "batched_gflops"}, the FLOP-weighted harmonic mean of
    the two in GFLOP/s).
    """
    G = 1 if cell is None else cell.gates
    rates = {
        "step_gflops": 2 * B * H * G * H * T / summarize(times["gemm_step"])["median_s"] / 1e9,
        "batched_gflops": 2 * T * B * H * K / summarize(times["gemm_batched"])["median_s"] / 1e9,
    }
    per_step = 4 * B * H * H if cell is None else cell.sequential_flops_per_step(B, H)
    rec = per_step * T * recurrences  # the products that wait on the step before, of every recurrence
    gemm_time = rec / (rates["step_gflops"] * 1e9) + (total_flops - rec) / (rates["batched_gflops"] * 1e9)
    return rates, total_flops / gemm_time / 1e9
