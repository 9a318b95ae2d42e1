"""The ``gpubptt`` command line: thin Typer commands that parse options and call the library."""

from __future__ import annotations

import json
import platform
import sys
import time
from enum import Enum
from typing import Annotated

import numpy as np
import typer

from . import __version__
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


def main() -> None:
    """Entry point of the ``gpubptt`` console script."""
    app()
