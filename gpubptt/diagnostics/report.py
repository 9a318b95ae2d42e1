"""All of it at once: ``vanish_report`` on one model, ``vanish_sweep`` over rescaled spectral radii."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ..model import RNN
from ._common import (
    ToDict,
    batch_of,
    check_elman,
    check_int,
    check_list,
    check_positive_float,
    check_tol,
)
from .gradient_flow import Contributions, StepGradients, TruncationBias, contributions, step_gradients, truncation_bias
from .jacobians import DEFAULT_ITERS, DEFAULT_THRESHOLD, JacobianProducts, jacobian_products, spectral_radius


# -- all of it ------------------------------------------------------------------------------------
@dataclass
class VanishReport(ToDict):
    """Every diagnostic of one model on one batch (see each part's docstring)."""

    steps: StepGradients
    contributions: Contributions
    products: JacobianProducts
    truncation: TruncationBias


VANISH_STAGES = ("step gradients", "contributions", "Jacobian-product norms", "truncation bias")


def vanish_report(
    model: RNN,
    x: Any,
    y: Any,
    s0: Any = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    iters: int = DEFAULT_ITERS,
    tol: float = 1e-5,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> VanishReport:
    """All four diagnostics of ``model`` on (x, y, s0): x (T, B) or (T, B, D), y (T, B), s0 (B, H).

    ``progress(stage)``, if given, is called before each of the four (``VANISH_STAGES``).
    """
    check_positive_float(threshold, "threshold")  # every setting checked before the first diagnostic runs
    check_int(iters, "iters", 1)
    check_tol(tol)
    check_int(seed, "seed", 0)
    say = progress or (lambda stage: None)
    say(VANISH_STAGES[0])
    steps = step_gradients(model, x, y, s0)
    say(VANISH_STAGES[1])
    contrib = contributions(model, x, y, s0)
    say(VANISH_STAGES[2])
    products = jacobian_products(model, x, s0, threshold=threshold, iters=iters, tol=tol, seed=seed)
    say(VANISH_STAGES[3])
    truncation = truncation_bias(model, x, y, s0)
    return VanishReport(steps=steps, contributions=contrib, products=products, truncation=truncation)


def with_spectral_radius(model: RNN, radius: float) -> RNN:
    """A copy of the model (same backend and dtype) with W rescaled so that max |eig(W)| = radius."""
    model = check_elman(model, "with_spectral_radius")
    if model.num_states > 1:  # W alone would move: every other recurrence kept its radius
        raise InputError(
            f"with_spectral_radius rescales one recurrence's W; the model has {model.num_states} (num_layers="
            f"{model.num_layers}, bidirectional={model.bidirectional}): use diagnostics.stack_sweep, which rescales "
            "each of them"
        )
    radius = check_positive_float(radius, "radius")
    rho = spectral_radius(model.params["W"])
    if rho == 0:
        raise InputError("W has spectral radius 0 (nilpotent or zero); it cannot be rescaled to another radius")
    params = dict(model.params)
    params["W"] = model.params["W"] * (radius / rho)
    return RNN.from_params(params, backend=model.backend, dtype=model.dtype, nonlinearity=model.nonlinearity)


def vanish_sweep(
    model: RNN,
    x: Any,
    y: Any,
    radii: Any,
    s0: Any = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    iters: int = DEFAULT_ITERS,
    tol: float = 1e-5,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[tuple[float, VanishReport]]:
    """``vanish_report`` for copies of the model with W rescaled to each spectral radius in ``radii``.

    x (T, B) or (T, B, D); y (T, B); s0 (B, H) or None. Returns [(radius, report), ...] in order.
    An entry None in ``radii`` measures the model as it is, reported with W's own spectral radius
    (a trained model's W, say, next to rescaled copies of it). Every argument is checked before the
    first report is computed.

    ``progress(done, total, what)``, if given, is called before each diagnostic of each radius and
    once at the end (done = total = 4·len(radii)); ``what`` reads "ρ=0.5: Jacobian-product norms",
    then "done". Nothing here prints: the caller decides how to show it.
    """
    model = check_elman(model, "vanish_sweep")
    radii = [None if r is None else check_positive_float(r, "radius") for r in check_list(radii, "radii") or []]
    if not radii:
        raise InputError("radii must hold at least one spectral radius > 0 (or None: W as it is)")
    check_positive_float(threshold, "threshold")
    check_int(iters, "iters", 1)
    check_tol(tol)
    check_int(seed, "seed", 0)
    batch_of(model, x, y, s0)
    sweep = []
    total = len(VANISH_STAGES) * len(radii)
    for i, r in enumerate(radii):
        name = "ρ=model" if r is None else f"ρ={r:g}"
        stages = iter(range(len(VANISH_STAGES) * i, total))

        def stage(what: str, name: str = name, stages: Any = stages) -> None:
            if progress is not None:
                progress(next(stages), total, f"{name}: {what}")

        m = model if r is None else with_spectral_radius(model, r)
        report = vanish_report(m, x, y, s0, threshold=threshold, iters=iters, tol=tol, seed=seed, progress=stage)
        sweep.append((report.products.spectral_radius if r is None else r, report))
    if progress is not None:
        progress(total, total, "done")
    return sweep
