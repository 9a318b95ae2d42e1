"""What the gated cells share: their identity (a parameter-free cell is equal to any of its kind) and the
layout of W for the per-step forward GEMM."""

from __future__ import annotations

from typing import Any

from ..backend import Backend
from ..errors import InputError
from .base import Cell


def forward_weight(W: Any, Wt: Any, T: int, B: int, be: Backend) -> Any:
    """Wᵀ (H, G·H) for the step GEMM h_{t-1} @ Wᵀ: packed by the backend for B rows where it packs (MKL's
    packed B, made once per forward, reused by all T steps), else the transposed view of W (G·H, H) or
    its row-major copy in Wt.

    A BLAS on the CPU runs the step GEMM faster on a row-major Wᵀ (OpenBLAS on a 2-core CPU: 0.17 vs
    0.20 ms at B = 32, H = 256, G = 4; 5.1 vs 5.6 ms at B = 128, H = 1024, G = 3), but the transposed
    copy costs 0.4 and 19 ms there: it pays over a forward of T steps once T·B ≥ 8·H. A packed Wᵀ reads
    the view itself (packing transposes it).
    """
    view = W.T
    packed = be.pack(view, B, T)
    if packed is not view:
        return packed
    H = W.shape[1]
    if T * B >= 8 * H:
        Wt[...] = view  # once per forward
        return Wt
    return view


class GatedCell(Cell):
    """The base of the GRU and LSTM cells: no options, so equal by kind; the input bias is "b"; no nonlinearity."""

    input_bias = "b"

    @classmethod
    def from_options(cls, nonlinearity: str | None = None, **options: Any) -> Cell:
        """The cell (it takes no options); InputError naming the option that does not apply."""
        if nonlinearity is not None:
            raise InputError(
                f"nonlinearity applies to cell='rnn' only among torch's cells; the {cls.option.upper()}'s gates use "
                f"σ and tanh as torch.{cls.torch_module}'s (leave nonlinearity unset), "
                f"got nonlinearity={nonlinearity!r}"
            )
        return super().from_options(None, **options)


def sig_grad(a: Any, W: Any) -> Any:
    """diag(a (1 − a)) W for every example: a (B, H), W (H, H) → (B, H, H) (a σ gate's step Jacobian)."""
    return (a * (1 - a))[:, :, None] * W[None]
