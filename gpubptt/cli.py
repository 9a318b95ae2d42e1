"""The ``gpubptt`` command line: thin Typer commands that parse options and call the library."""

from __future__ import annotations

import json
import platform
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from . import __version__, diagnostics
from .backend import available_backends, get_backend
from .errors import BackendUnavailableError, InputError
from .model import RNN

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Batched RNNs and exact BPTT on NumPy or CuPy.")


class BackendChoice(str, Enum):
    auto = "auto"
    numpy = "numpy"
    cupy = "cupy"


def _backend_or_exit(name: str):
    try:
        return get_backend(name)
    except (BackendUnavailableError, InputError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def info(
    backend: Annotated[BackendChoice, typer.Option(help="Backend to describe.")] = BackendChoice.auto,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Show the backend, device and library versions."""
    be = _backend_or_exit(backend.value)
    data = {
        "gpubptt": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "backend": be.name,
        "device": be.device,
        "available_backends": available_backends(),
    }
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        for k, v in data.items():
            typer.echo(f"{k:>20}: {v}")


@app.command()
def bench(
    backend: Annotated[BackendChoice, typer.Option(help="Backend to measure.")] = BackendChoice.auto,
    seq_lens: Annotated[str, typer.Option(help="Comma-separated sequence lengths T.")] = "16,32,64,128",
    hidden: Annotated[int, typer.Option(help="Hidden size H.")] = 128,
    batch: Annotated[int, typer.Option(help="Batch size B.")] = 32,
    vocab: Annotated[int, typer.Option(help="Vocabulary size (D = K) for token inputs.")] = 256,
    repeats: Annotated[int, typer.Option(help="Timed runs per configuration (median reported).")] = 5,
) -> None:
    """Time forward+BPTT as the sequence length grows (median of repeated runs)."""
    be = _backend_or_exit(backend.value)
    try:
        Ts = [int(t) for t in seq_lens.split(",") if t.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"--seq-lens must be comma-separated ints, got {seq_lens!r}") from exc
    model = RNN(vocab, hidden, vocab, backend=be, seed=0)
    rng = np.random.default_rng(0)
    typer.echo(f"backend={be.name} device={be.device} H={hidden} B={batch} vocab={vocab}", err=True)
    typer.echo(f"{'T':>6} {'median ms':>10} {'tokens/s':>12}")
    for T in Ts:
        x = be.asarray(rng.integers(0, vocab, size=(T, batch)))
        y = be.asarray(rng.integers(0, vocab, size=(T, batch)))
        model.loss_and_grads(x, y)
        times = []
        for _ in range(repeats):
            be.synchronize()
            t0 = time.perf_counter()
            model.loss_and_grads(x, y)
            be.synchronize()
            times.append(time.perf_counter() - t0)
        med = float(np.median(times))
        typer.echo(f"{T:>6} {med * 1e3:>10.3f} {T * batch / med:>12.0f}")
    sys.stdout.flush()


# -- gpubptt vanish: gradient-flow diagnostics --------------------------------------------------------
class InitChoice(str, Enum):
    wildml = "wildml"
    torch = "torch"


class DtypeChoice(str, Enum):
    float32 = "float32"
    float64 = "float64"


class VanishFormat(str, Enum):
    table = "table"
    json = "json"


def _parse_scales(text: str) -> list[float]:
    try:
        scales = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise typer.BadParameter(
            f"must be comma-separated numbers like 0.5,0.9,1.0, got {text!r}", param_hint="--scale"
        ) from exc
    if not scales or not all(np.isfinite(v) and v > 0 for v in scales):
        raise typer.BadParameter(
            f"must be one or more spectral radii, finite and > 0; got {text!r}", param_hint="--scale"
        )
    return scales


def _random_problem(be, T: int, H: int, B: int, vocab: int, init: str, dtype: str, seed: int):
    """The model and batch that ``vanish`` measures: random weights, random tokens and targets.

    (A saved model and a text file can take their place here once training and data land.)
    """
    model = RNN(vocab, H, vocab, backend=be, dtype=dtype, init=init, seed=seed)
    rng = np.random.default_rng(seed)
    x = be.asarray(rng.integers(0, vocab, size=(T, B)))  # (T, B) token ids
    y = be.asarray(rng.integers(0, vocab, size=(T, B)))  # (T, B) targets
    return model, x, y


def _horizon_text(p: diagnostics.JacobianProducts) -> str:
    if p.horizon is not None:
        return str(p.horizon)
    if p.horizon_fit is not None:
        return f"~{p.horizon_fit:.0f} (fit)"
    if p.log_slope is not None:
        return "none (grows)"
    return f"none ≤ {p.end}"


def _vanish_row(radius: float, report: diagnostics.VanishReport, T: int) -> list[str]:
    p, tb = report.products, report.truncation
    ok = np.flatnonzero(tb.rel_error < 0.01)
    return [
        f"{radius:g}",
        f"{p.spectral_norm:.3f}",
        f"{100 * p.saturated_fraction:.1f}%",
        _horizon_text(p),
        "—" if p.decay_rate is None else f"{p.decay_rate:.4f}",
        f"{report.steps.s0:.3g}",
        str(int(tb.truncate[ok[0]])) if ok.size else f">{T - 1}",
    ]


@app.command()
def vanish(
    backend: Annotated[BackendChoice, typer.Option(help="Backend to run on.")] = BackendChoice.auto,
    seq_len: Annotated[int, typer.Option(min=1, help="Sequence length T.")] = 30,
    hidden: Annotated[int, typer.Option(min=1, help="Hidden size H.")] = 64,
    batch: Annotated[int, typer.Option(min=1, help="Batch size B.")] = 8,
    vocab: Annotated[int, typer.Option(min=1, help="Vocabulary size (D = K) of the random tokens.")] = 32,
    init: Annotated[InitChoice, typer.Option(help="Weight init of the random model.")] = InitChoice.wildml,
    dtype: Annotated[DtypeChoice, typer.Option(help="Floating-point type.")] = DtypeChoice.float64,
    seed: Annotated[int, typer.Option(help="Seed of the weights and the random tokens.")] = 0,
    scale: Annotated[
        str, typer.Option(help="Comma-separated spectral radii; W is rescaled to each in turn.")
    ] = "0.5,0.9,1.0,1.5,2.0",
    threshold: Annotated[
        float, typer.Option(help="The horizon is the first lag whose product norm is below this.")
    ] = 1e-3,
    iters: Annotated[int, typer.Option(min=1, help="Most power iterations per Jacobian-product norm.")] = 300,
    plot: Annotated[Path | None, typer.Option(help="Write the plots to this PNG file (needs matplotlib).")] = None,
    fmt: Annotated[VanishFormat, typer.Option("--format", help="Output: a table or JSON.")] = VanishFormat.table,
) -> None:
    """Show why BPTT gradients vanish or explode: one row per spectral radius of W.

    On a random model and random tokens, W is rescaled to each --scale radius; the table gives the
    spectral norm of W, the saturated fraction of states, the gradient horizon (first lag where
    ‖Π diag(1 − s_j²) W‖₂ < --threshold; "~N (fit)" extrapolates the fitted line when the sequence
    is too short to reach it), the fitted factor per step of that norm, ‖∂E/∂s0‖, and
    the smallest truncation window whose gradient is within 1 % of full BPTT.
    """
    radii = _parse_scales(scale)
    if not (np.isfinite(threshold) and threshold > 0):
        raise typer.BadParameter(f"must be a finite number > 0, got {threshold}", param_hint="--threshold")
    if plot is not None:
        if plot.suffix.lower() != ".png":
            raise typer.BadParameter(f"must name a .png file, got {str(plot)!r}", param_hint="--plot")
        if not plot.parent.is_dir():
            raise typer.BadParameter(f"folder {str(plot.parent)!r} does not exist", param_hint="--plot")
        try:
            diagnostics.require_matplotlib()
        except ImportError as exc:
            typer.echo(f"error: --plot: {exc}", err=True)
            raise typer.Exit(2) from exc
    be = _backend_or_exit(backend.value)
    model, x, y = _random_problem(be, seq_len, hidden, batch, vocab, init.value, dtype.value, seed)
    settings = {
        "backend": be.name,
        "device": be.device,
        "T": seq_len,
        "H": hidden,
        "B": batch,
        "vocab": vocab,
        "init": init.value,
        "dtype": dtype.value,
        "seed": seed,
        "threshold": threshold,
        "iters": iters,
    }
    typer.echo("vanish: " + " ".join(f"{k}={v}" for k, v in settings.items() if k != "device"), err=True)
    sweep = diagnostics.vanish_sweep(model, x, y, radii, threshold=threshold, iters=iters)
    if fmt is VanishFormat.json:
        data = {"settings": settings, "scales": [{"radius": r, **rep.to_dict()} for r, rep in sweep]}
        typer.echo(json.dumps(data, indent=1))
    else:
        head = ["ρ(W)", "‖W‖₂", "saturated", "horizon", "rate/step", "‖∂E/∂s0‖", "truncate@1%"]
        rows = [head] + [_vanish_row(r, rep, seq_len) for r, rep in sweep]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        for row in rows:
            typer.echo("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    if plot is not None:
        title = f"T={seq_len} H={hidden} B={batch} vocab={vocab} init={init.value} seed={seed} ({be.name})"
        diagnostics.plot_vanish(sweep, plot, title=title)
        typer.echo(f"wrote {plot}", err=True)


def main() -> None:
    """Entry point of the ``gpubptt`` console script."""
    app()
