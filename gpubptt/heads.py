"""Output heads and their losses on top of the recurrent stack's outputs Y (T, B, H·dirs).

Every head is a linear layer z = V h + c (V (K, H·dirs), c (K,)) and a loss; it returns the loss,
∂E/∂Y for the stack's pullback (``gpubptt.engine.pullback``) and dV, dc. Counted steps are those before
each sequence's length; ``reduction="mean"`` divides by what the loss sums over (below).

    "softmax"       per step:  z_t = V s_t + c,  E = Σ_{t,b counted} −log softmax(z_tb)[y_tb]
                    y (T, B) ints in [0, K); mean: ÷ counted steps.  (The default; ``loss_and_grads``
                    runs it fused in the engine's workspace, ``losses.xent_and_grads``.)
    "last_softmax"  one label per sequence, read from its last valid output
                    h_b = [Y_fwd[len_b − 1, b], Y_rev[0, b]] (one direction: Y[len_b − 1, b]) — the
                    top layer's h_n, what torch users classify from with packed sequences;
                    z_b = V h_b + c,  E = Σ_b −log softmax(z_b)[y_b];  y (B,) ints;  mean: ÷ B
    "mse"           per step:  E = Σ_{t,b counted} ‖z_tb − y_tb‖²;  y (T, B, K) floats;  mean: ÷ (counted·K)
    "last_mse"      E = Σ_b ‖z_b − y_b‖² with z_b from h_b as "last_softmax";  y (B, K);  mean: ÷ (B·K)

Backward: softmax heads dz = softmax(z) − onehot(y), MSE heads dz = 2 (z − y); then dV = Σ dzᵀ h,
dc = Σ dz and ∂E/∂h = dz V, put back on the steps h came from.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import Backend
from .errors import InputError, InputTypeError, ShapeError
from .params import finite_in, nonfinite_reason
from .validation import _as_native

__all__ = [
    "HEADS", "check_head", "check_targets", "head_forward", "head_loss_and_grads", "last_outputs", "mean_count",
]  # fmt: skip

HEADS = ("softmax", "last_softmax", "mse", "last_mse")


def check_head(head: Any) -> str | None:
    """One of HEADS, or None (no output layer)."""
    if head is None or (isinstance(head, str) and head in HEADS):
        return head
    raise InputError(f"unknown head {head!r}; expected one of {', '.join(HEADS)} or None (no output layer)")


def check_targets(head: str, y: Any, T: int, B: int, K: int, *, be: Backend, dtype: Any, weight: Any = None) -> Any:
    """y for a head other than "softmax" (whose targets ``check_batch`` checks), as an array of the backend."""
    if y is None:
        raise InputError(f"head {head!r} needs targets y; got None")
    y = _as_native(be, y, "y")  # a ragged nested list: a ShapeError naming y, not NumPy's
    if head == "last_softmax":
        if y.dtype.kind not in "iu":
            raise InputTypeError(f"head 'last_softmax' takes integer labels y (B,), got dtype {y.dtype}")
        if tuple(y.shape) != (B,):
            raise ShapeError(f"head 'last_softmax' takes labels y of shape (B,) = ({B},), got {tuple(y.shape)}")
        lo, hi = (int(v) for v in be.to_numpy(be.xp.stack([y.min(), y.max()])))
        if lo < 0 or hi >= K:
            raise InputError(f"labels y must lie in [0, {K}) (output_size = {K}); found {lo if lo < 0 else hi}")
        return y.astype(be.xp.int64)
    shape = (T, B, K) if head == "mse" else (B, K)
    if y.dtype.kind != "f":
        raise InputTypeError(f"head {head!r} takes float targets y {shape}, got dtype {y.dtype}")
    if tuple(y.shape) != shape:
        raise ShapeError(f"head {head!r} takes targets y of shape {shape}, got {tuple(y.shape)}")
    if head == "mse" and weight is not None:  # padded steps' targets may hold anything (NaN padding): made 0
        y = be.xp.where(weight[:, :, None] > 0, y, 0)
    cast, finite = finite_in(y, np.dtype(dtype), xp=be.xp)
    if not bool(finite):
        raise InputError(f"head {head!r}: targets y {nonfinite_reason(y, np.dtype(dtype), xp=be.xp)}")
    return cast


def mean_count(head: str, B: int, counted: int, K: int) -> int:
    """What ``reduction="mean"`` divides a head's loss by: the counted steps (softmax), × K (mse), the B sequences
    (last_softmax), × K (last_mse)."""
    count = B if head in ("last_softmax", "last_mse") else counted
    return count * K if head in ("mse", "last_mse") else count


def _last_index(T: int, B: int, lengths: np.ndarray | None) -> np.ndarray:
    """Each sequence's last valid step (B,) (refusing length 0: such a sequence has no output)."""
    if lengths is None:
        return np.full(B, T - 1)
    if (lengths == 0).any():
        bad = int(np.flatnonzero(lengths == 0)[0])
        raise InputError(
            f"last-step heads need every length ≥ 1 (a sequence of length 0 has no output); lengths[{bad}] = 0"
        )
    return lengths - 1


def last_outputs(Y: Any, lengths: np.ndarray | None, dirs: int, *, be: Backend) -> tuple[Any, Any]:
    """h (B, H·dirs): each sequence's forward half at its last valid step, the reverse half at step 0.

    Returns (h, rows): rows (B,) the forward half's steps (on the backend)."""
    T, B, HD = Y.shape
    rows = be.asarray(_last_index(T, B, lengths))
    cols = be.xp.arange(B)
    h = Y[rows, cols]  # (B, H·dirs), a fresh array
    if dirs == 2:
        H = HD // 2
        h[:, H:] = Y[0, :, H:]
    return h, rows


def _logits(h: Any, V: Any, c: Any, *, be: Backend) -> Any:
    z = be.xp.empty((h.shape[0], V.shape[0]), dtype=h.dtype)
    be.matmul(h, V.T, z)
    if c is not None:
        z += c
    return z


def head_forward(head: str, Y: Any, V: Any, c: Any, lengths: np.ndarray | None, dirs: int, *, be: Backend) -> Any:
    """Logits: (T, B, K) for the per-step heads, (B, K) for the last-step heads."""
    if head in ("last_softmax", "last_mse"):
        h, _ = last_outputs(Y, lengths, dirs, be=be)
        return _logits(h, V, c, be=be)
    T, B, HD = Y.shape
    return _logits(Y.reshape(T * B, HD), V, c, be=be).reshape(T, B, -1)


def head_loss_and_grads(
    head: str,
    Y: Any,
    V: Any,
    c: Any,
    y: Any,
    weight: Any,
    lengths: np.ndarray | None,
    dirs: int,
    counted: int,
    *,
    be: Backend,
) -> tuple[Any, Any, Any, Any, int]:
    """(E, ∂E/∂Y (T, B, H·dirs), dV, dc or None, the count "mean" divides by) for heads other than
    "softmax"; Y the stack's outputs (zero on padded steps), weight (T, B) 1/0 or None, ``counted``
    the counted steps."""
    xp = be.xp
    T, B, HD = Y.shape
    K = V.shape[0]
    last = head in ("last_softmax", "last_mse")
    if last:
        h, rows = last_outputs(Y, lengths, dirs, be=be)
    else:
        h = Y.reshape(T * B, HD)
    z = _logits(h, V, c, be=be)  # (n, K)
    if head == "last_softmax":
        z -= z.max(axis=1, keepdims=True)
        ar = xp.arange(B)
        z_y = z[ar, y]
        xp.exp(z, out=z)
        total = z.sum(axis=1)
        loss = (xp.log(total) - z_y).sum()
        z /= total[:, None]
        z[ar, y] -= 1  # dz = softmax(z) − onehot(y)
    else:
        z -= y.reshape(z.shape)  # z − y
        if weight is not None and not last:
            z *= weight.reshape(-1, 1)
        loss = (z * z).sum()
        z *= 2  # dz = 2 (z − y)
    count = mean_count(head, B, counted, K)
    dV = xp.empty_like(V)
    be.matmul(z.T, h, dV)  # dV = Σ dzᵀ h
    dc = None if c is None else be.sum_rows(z)
    dh = xp.empty((z.shape[0], HD), dtype=Y.dtype)
    be.matmul(z, V, dh)  # ∂E/∂h = dz V
    if not last:
        return loss, dh.reshape(T, B, HD), dV, dc, count
    dY = xp.zeros_like(Y)
    cols = xp.arange(B)
    if dirs == 2:
        H = HD // 2
        dY[rows, cols, :H] = dh[:, :H]
        dY[0, :, H:] += dh[:, H:]
    else:
        dY[rows, cols] = dh
    return loss, dY, dV, dc, count
