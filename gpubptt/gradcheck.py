"""Central finite differences in float64 against the analytic BPTT gradients.

>>> import numpy as np, gpubptt
>>> model = gpubptt.RNN(4, 5, 3, backend="numpy", seed=0)
>>> x = np.array([[0, 1], [2, 3]]); y = np.array([[1, 2], [0, 1]])   # (T, B) = (2, 2)
>>> report = gpubptt.gradcheck(model, x, y)
>>> report.max_rel_error < 1e-6
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError, InputTypeError
from .model import RNN
from .validation import check_positive_int

__all__ = ["GradcheckReport", "gradcheck"]


@dataclass
class GradcheckReport:
    """Per-parameter max relative error between analytic and finite-difference gradients.

    errors maps "U", "W", "V", ("b", "c",) "s0" (and an LSTM's "c0") to the max relative error over the checked
    coordinates; checked maps each name to how many coordinates were checked.
    """

    errors: dict[str, float] = field(default_factory=dict)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def max_rel_error(self) -> float:
        """The worst error over every parameter."""
        return max(self.errors.values(), default=0.0)

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}: {v:.2e} ({self.checked[k]})" for k, v in self.errors.items())
        return f"GradcheckReport({parts})"


def _rel_errors(analytic: np.ndarray, numeric: np.ndarray, scale: float) -> np.ndarray:
    """|a − n| / max(|a|, |n|, floor): a floor keeps near-zero coordinates from dominating."""
    floor = 1e-7 * max(scale, 1.0)
    return np.abs(analytic - numeric) / np.maximum(np.maximum(np.abs(analytic), np.abs(numeric)), floor)


def gradcheck(
    model: RNN,
    x: Any,
    y: Any,
    s0: Any = None,
    *,
    lengths: Any = None,
    reduction: str = "sum",
    eps: float = 1e-5,
    max_coords: int | None = 200,
    seed: int = 0,
    dropout_seed: int = 0,
) -> GradcheckReport:
    """Check ``model.loss_and_grads`` against central differences, both in float64.

    x (T, B) or (T, B, D); y (T, B) (as the model's head takes it); s0 as the model takes it (an LSTM's
    (h0, c0)), or None; lengths (B,). The model is copied to float64 on the same backend, with its head and
    ``batch_first`` (x and y then (B, T, ...)); the model itself and s0 are left unchanged. A model
    with dropout is checked with the masks held fixed: every evaluation draws them from
    ``dropout_seed``. Each parameter's
    coordinates are all checked, or a random sample of ``max_coords`` of them (``None``: all).
    A central difference errs by about (rounding error of the loss) / eps + eps² · (third
    derivative): eps = 1e-5 balances the two for losses of order 1 to 100 (at H = 128, eps = 1e-6
    gave errors ten times larger, all from rounding). ``eps`` must lie in (0, 1). What to expect of a correct
    gradient: about 1e-8 to 1e-6 for small models under the summed loss; more where the gradients are small
    beside the loss's rounding (``reduction="mean"`` over many steps, deep stacks: 1e-5 to 1e-4 is still
    rounding — it grows as eps shrinks, where a wrong gradient's error does not); and a relu cell has no
    derivative where a pre-activation sits exactly at 0 (zero biases at init feed it there), so such
    coordinates can show errors of order 1 (shift the biases off 0 to check the rest).
    """
    if not (hasattr(model, "loss_and_grads") and hasattr(model, "params")):  # an RNN, or a wrapper of one
        hint = " (for a torch module's weights: RNN.from_torch(rnn.state_dict(), linear.state_dict(), cell=...))"
        raise InputTypeError(
            f"gradcheck checks a gpubptt.RNN, got {type(model).__name__}{hint if hasattr(model, 'state_dict') else ''}"
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)):
        raise InputTypeError(f"eps must be a number in (0, 1), got {type(eps).__name__} {eps!r}")
    if not 0 < eps < 1:  # also refuses NaN
        raise InputError(f"eps must lie in (0, 1) (a step of central differences), got {eps}")
    if max_coords is not None:
        check_positive_int(max_coords, "max_coords (None checks every coordinate)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be an int ≥ 0, got {type(seed).__name__} {seed!r}")
    ref = RNN.from_params(
        model.params, backend=model.backend, dtype="float64", nonlinearity=model.nonlinearity, dropout=model.dropout,
        cell=model.cell,  # the cell itself: its options (an IndRNN's bound, a custom cell's) are the model's
    )  # fmt: skip
    ref.head, ref.batch_first = model.head, model.batch_first  # the model's loss, its inputs as it reads them
    drop = {"dropout_seed": dropout_seed} if ref.head == "softmax" else {}
    be = ref.backend
    extra = model.cell.extra_state  # an LSTM's "c0": s0 is the tuple (h0, c0), both checked

    def own(a: Any) -> Any:  # a private C-ordered float64 copy: its flat view is what gets perturbed
        return be.asarray(a, dtype=np.float64).copy(order="C")

    if s0 is not None:  # s0 as the user gave it: a wrong one is refused with the model's own words
        ref.loss(x, y, s0, lengths=lengths, reduction=reduction, **drop)
    if s0 is None:
        s0_64 = None
    elif extra and isinstance(s0, tuple):
        s0_64 = tuple(own(a) for a in s0)
    else:
        s0_64 = own(s0)
    _, grads = ref.loss_and_grads(x, y, s0_64, lengths=lengths, reduction=reduction, **drop)
    if s0_64 is None:
        s0_64 = be.xp.zeros(grads["s0"].shape, dtype=np.float64)
        if extra:
            s0_64 = (s0_64, be.xp.zeros(grads[extra].shape, dtype=np.float64))
    states = dict(zip(("s0", extra), s0_64, strict=True)) if isinstance(s0_64, tuple) else {"s0": s0_64}
    targets = dict(ref.params, **states)
    rng = np.random.default_rng(seed)
    report = GradcheckReport()
    for name, arr in targets.items():
        analytic = be.to_numpy(grads[name]).ravel()
        n = arr.size
        idx = np.arange(n) if max_coords is None or n <= max_coords else rng.choice(n, max_coords, replace=False)
        flat = arr.reshape(-1)  # a view: perturbing it perturbs the parameter
        numeric = np.empty(len(idx))
        for j, i in enumerate(idx):
            orig = flat[i].copy()
            flat[i] = orig + eps
            up = float(ref.loss(x, y, s0_64, lengths=lengths, reduction=reduction, **drop))
            flat[i] = orig - eps
            down = float(ref.loss(x, y, s0_64, lengths=lengths, reduction=reduction, **drop))
            flat[i] = orig
            numeric[j] = (up - down) / (2 * eps)
        scale = float(np.abs(numeric).max(initial=0.0))
        report.errors[name] = float(_rel_errors(analytic[idx], numeric, scale).max(initial=0.0))
        report.checked[name] = len(idx)
    return report
