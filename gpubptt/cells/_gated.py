"""What the gated cells share: their identity (a parameter-free cell is equal to any of its kind) and the
layout of W for the per-step forward GEMM."""

from __future__ import annotations

from typing import Any


def forward_weight(W: Any, Wt: Any, T: int, B: int) -> Any:
    """Wᵀ (H, G·H) for the step GEMM h_{t-1} @ Wᵀ: the transposed view of W (G·H, H), or its row-major copy in Wt.

    A BLAS on the CPU runs the step GEMM faster on a row-major Wᵀ (OpenBLAS on a 2-core CPU: 0.17 vs
    0.20 ms at B = 32, H = 256, G = 4; 5.1 vs 5.6 ms at B = 128, H = 1024, G = 3), but the transposed
    copy costs 0.4 and 19 ms there: it pays over a forward of T steps once T·B ≥ 8·H.
    """
    H = W.shape[1]
    if T * B >= 8 * H:
        Wt[...] = W.T  # once per forward
        return Wt
    return W.T


class GatedCell:
    """The base of the GRU and LSTM cells: no options, so equal by kind; the input bias is "b"; no nonlinearity."""

    name = "gated"
    input_bias = "b"
    nonlinearity = None

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
