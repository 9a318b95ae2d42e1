"""``gpubptt vanish --cell rnn,gru,lstm``: the same gradient-flow measures for each cell, side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from ..backend import get_backend
from ..diagnostics import gated
from ..engine.memory import InsufficientMemoryError
from ..errors import InputError
from ..model import CELLS
from ._common import Failed, echo_out, out_of_memory, usage_error, write_png


def parse_cells(text: str) -> list[str]:
    """["rnn", "gru"] from "rnn,gru"; a usage error naming the choices otherwise."""
    cells = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in cells if c not in CELLS]
    if not cells or bad or len(set(cells)) != len(cells):
        raise typer.BadParameter(
            f"must be one or more of {', '.join(CELLS)}, comma-separated and each once; got {text!r}",
            param_hint="--cell",
        )
    return cells


def _rate(horizon: int | None, rate: float | None, T: int) -> tuple[str, str]:
    return (str(horizon) if horizon is not None else f"none ≤ {T}"), ("—" if rate is None else f"{rate:.4f}")


def _print(flows: list[gated.CellFlow], T: int, settings: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        echo_out(json.dumps({"settings": settings, "cells": [f.to_dict() for f in flows]}, indent=1))
        return
    head = ["cell", "params", "horizon", "rate/step", "c horizon", "c rate/step", "‖∂E/∂s0‖", "truncate@1%"]
    rows: list[list[Any]] = [head]
    for f in flows:
        k = f.smallest_truncate  # every window from 0 up, as the one-layer table's column
        c = _rate(f.cell_horizon, f.cell_decay_rate, T) if f.cell_log_norms is not None else ("—", "—")
        rows.append([f.cell, f"{f.parameters:,}", *_rate(f.horizon, f.decay_rate, T), *c, f"{f.s0_norm:.3g}",
                     str(k) if k is not None else f">{T - 1}"])  # fmt: skip
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    for row in rows:
        echo_out("  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)))


def _plot(flows: list[gated.CellFlow], plot: Path | None, title: str) -> None:
    if plot is None:
        return
    try:
        write_png(plot, "plot", lambda path: gated.plot_cells(flows, path, title=title))
    except Failed as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.code) from exc
    typer.echo(f"wrote {plot}", err=True)


def run_model(model: Any, x: Any, y: Any, *, label: str, threshold: float, fmt: str, plot: Path | None) -> None:
    """One trained model of any cell (a checkpoint's) on its batch x, y (T, B): the same table, one row."""
    T, B = int(y.shape[0]), int(y.shape[1])
    typer.echo(f"vanish: {label} T={T} H={model.hidden_size} B={B}", err=True)
    try:
        flows = [gated.cell_flow(model, x, y, threshold=threshold)]
    except InsufficientMemoryError as exc:  # checked before the Jacobians are made
        raise usage_error(f"{exc}: choose a smaller --seq-len or --batch") from exc
    except InputError as exc:
        raise usage_error(str(exc)) from exc
    except MemoryError as exc:
        raise out_of_memory(exc, get_backend("numpy")) from exc
    _print(flows, T, {"model": label, "T": T, "H": model.hidden_size, "B": B, "threshold": threshold}, fmt)
    _plot(flows, plot, f"{label}: T={T} H={model.hidden_size} B={B}")


def run_cells(
    cells: list[str], *, T: int, H: int, B: int, vocab: int, seed: int, threshold: float, fmt: str, plot: Path | None
) -> None:
    """Measure each cell on the same random tokens (H matched, torch's init, float64 on the host) and print a
    table (or JSON) to stdout; the plot, if asked for, to ``plot``."""
    typer.echo(f"vanish: cells={','.join(cells)} T={T} H={H} B={B} vocab={vocab} seed={seed} (H matched)", err=True)
    try:
        flows = gated.compare_cells(cells, T, H, B, vocab, seed=seed, threshold=threshold)
    except InsufficientMemoryError as exc:  # each cell's, before its Jacobians are made
        raise usage_error(f"{exc}: choose a smaller --seq-len, --batch or --hidden") from exc
    except InputError as exc:
        raise usage_error(str(exc)) from exc
    except MemoryError as exc:
        raise out_of_memory(exc, get_backend("numpy")) from exc
    settings = {"T": T, "H": H, "B": B, "vocab": vocab, "seed": seed, "threshold": threshold, "matched": "H"}
    _print(flows, T, settings, fmt)
    _plot(flows, plot, f"T={T} H={H} B={B} vocab={vocab} seed={seed}: H matched, torch init")
