"""Why gradients vanish: exact gradient-flow diagnostics of a model on a batch.

The BPTT gradient of the recurrent weights is a double sum, one term per pair of a loss step t and
an earlier step k:

    ∂E/∂W = Σ_t Σ_{k≤t} δ_k^{(t)ᵀ} s_{k−1}          (rows are examples; summed over the batch)
    δ_k^{(t)} = E_t's gradient at the pre-activation of step k
              = (∂E_t/∂s_t · Π_{j=k+1..t} ∂s_j/∂s_{j−1}) ⊙ (1 − s_k²)
    ∂s_j/∂s_{j−1} = diag(1 − s_j²) W                 ← the product that vanishes or explodes

This package measures every piece of that argument on a model and a batch (``gradient_flow``,
``jacobians``, ``report``; the problem builders in ``problems``, imported only when asked for):

    step_gradients      ‖∂E/∂s_t‖ per step t, split into the direct term (E_t through V) and the
                        through-time term (later steps through W)
    contributions       the T×T lower-triangular matrix ‖E_t's contribution to ∂E/∂W through step k‖
    jacobian_products   ‖Π_{j=k+1..t} ∂s_j/∂s_{j−1}‖₂ against the lag t − k (power iteration), the
                        spectral radius and norm of W, the saturated fraction, the gradient horizon
                        and the fitted geometric rate; ``product_norms`` is the same on raw factors
    truncation_bias     what tutorial truncation costs: relative error and cosine against full BPTT
    vanish_report       all four; ``vanish_sweep`` repeats it with W rescaled to chosen spectral radii
    stack_report        a stack (num_layers > 1 or bidirectional): each recurrence's own products,
                        ‖∂E/∂s^l_t‖ per layer and ‖∂s^top/∂s^l‖ through the stack (``stack``);
                        ``stack_sweep`` with every W rescaled
    random_problem      a random model on random tokens: what ``gpubptt vanish`` measures by default
    checkpoint_problem  a trained model from a checkpoint, on windows of a text or on its task's sequences
    plot_vanish         one PNG of a sweep (``gpubptt.plots``; matplotlib, the optional ``plot`` extra)

States come from ``model.states`` and the step factors from the model's cell; full or truncated
gradients from ``model.loss_and_grads``; only the per-term sweeps are written here, once, against
``xp = model.backend.xp``. Results are host-side dataclasses of float64 NumPy arrays (one transfer
at the end of each function, never inside a per-step loop), each with ``to_dict()`` for JSON.
Sequences are full length (no ``lengths``) and E is the sum over steps and examples.

    >>> import numpy as np, gpubptt
    >>> from gpubptt import diagnostics
    >>> model = gpubptt.RNN(8, 16, 8, backend="numpy", dtype="float64", seed=0)
    >>> x = np.random.default_rng(0).integers(0, 8, size=(12, 4))      # (T, B) token ids
    >>> jp = diagnostics.jacobian_products(model, x)
    >>> jp.norms.shape, bool(jp.decay_rate < 1)                       # lags 0..T−1
    ((12,), True)
"""

from __future__ import annotations

from typing import Any

from ..plots import PLOT_HINT, plot_vanish, require_matplotlib
from .gradient_flow import Contributions, StepGradients, TruncationBias, contributions, step_gradients, truncation_bias
from .jacobians import (
    ACTIVATIONS,
    DEFAULT_ITERS,
    DEFAULT_THRESHOLD,
    NO_DECAY_SLOPE,
    JacobianProducts,
    ProductNorms,
    jacobian_products,
    product_norms,
    spectral_radius,
)
from .report import VANISH_STAGES, VanishReport, vanish_report, vanish_sweep, with_spectral_radius
from .stack import RecurrenceFlow, StackReport, ThroughStack, stack_report, stack_sweep

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_ITERS",
    "DEFAULT_SEQ_LEN",
    "DEFAULT_THRESHOLD",
    "NO_DECAY_SLOPE",
    "PLOT_HINT",
    "VANISH_STAGES",
    "Contributions",
    "JacobianProducts",
    "ProductNorms",
    "RecurrenceFlow",
    "StackReport",
    "StepGradients",
    "ThroughStack",
    "TruncationBias",
    "VanishProblem",
    "VanishReport",
    "checkpoint_problem",
    "contributions",
    "jacobian_products",
    "plot_vanish",
    "product_norms",
    "random_problem",
    "require_matplotlib",
    "spectral_radius",
    "stack_report",
    "stack_sweep",
    "step_gradients",
    "text_windows",
    "truncation_bias",
    "vanish_report",
    "vanish_sweep",
    "with_spectral_radius",
]

_PROBLEMS = ("DEFAULT_SEQ_LEN", "VanishProblem", "checkpoint_problem", "random_problem", "text_windows")


def __getattr__(name: str) -> Any:
    """The problem builders, imported on first use (they bring in checkpoints and data)."""
    if name in _PROBLEMS:
        from . import problems

        return getattr(problems, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
