"""What the benchmark scripts share: where results go, and which timings may be summed up.

- Results go to the folder given by ``--out DIR``; without it, to a cache folder outside the
  repository (``default_out_dir``, printed on stderr), so a run never overwrites the committed
  results in ``benchmarks/``. The commands that regenerate those pass ``--out benchmarks``.
- A row whose repeated timings spread more than ``NOISY_SPREAD`` (IQR / median, as ``gpubptt bench``
  uses) is flagged noisy (``~``), and a summary ratio is taken over the clean rows only; with no clean
  row, no summary is printed at all (``summary_ratio``).

Scripts import it as ``_report`` (Python puts the script's folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import gpubptt
from gpubptt.timing import NOISY_SPREAD, summarize

__all__ = ["NOISY_SPREAD", "add_out_option", "default_out_dir", "is_noisy", "out_dir", "spread", "summary_ratio"]

#: the mark of a noisy row in printed tables (as in ``gpubptt bench``)
NOISY_MARK = "~"


def default_out_dir() -> Path:
    """``$XDG_CACHE_HOME/gpubptt/benchmarks`` (``~/.cache/...`` without it): outside any checkout."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "gpubptt" / "benchmarks"


def add_out_option(parser: argparse.ArgumentParser) -> None:
    """``--out DIR``: where the script writes its results (default: ``default_out_dir()``)."""
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"folder for the results (default: {default_out_dir()}, outside the repository; "
        "the committed results are regenerated with --out benchmarks)",
    )


def add_streams_option(parser: argparse.ArgumentParser) -> None:
    """``--streams``: on CuPy, a bidirectional layer's two directions on two CUDA streams (``backend.concurrent``)."""
    parser.add_argument(
        "--streams",
        action="store_true",
        help="CuPy: a bidirectional layer's two directions on two CUDA streams (backend.concurrent)",
    )


def streams_suffix(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """``--streams`` checked before any work (refused, through ``parser.error``, with any backend but CuPy's): the
    suffix it adds to a default output file's name, "-streams" or "". The caller then sets ``be.concurrent``."""
    if args.streams and args.backend != "cupy":
        parser.error("--streams is for --backend cupy (the NumPy backend runs the directions in threads already)")
    return "-streams" if args.streams else ""


def open_backend(args: argparse.Namespace) -> Any:
    """The backend of ``--backend``, ``--streams`` applied, after making ``--output``'s folder (made now, not found
    missing after the whole run)."""
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    be = gpubptt.get_backend(args.backend)
    if args.streams:
        be.concurrent = True
    return be


def out_dir(out: Path | str | None) -> Path:
    """The folder to write into (``out``, or the default), created if needed and printed on stderr."""
    folder = Path(out) if out is not None else default_out_dir()
    folder.mkdir(parents=True, exist_ok=True)
    print(f"results go to {folder}", file=sys.stderr)
    return folder


def spread(times: Sequence[float]) -> float | None:
    """IQR / median of repeated timings (None for a zero median)."""
    return summarize(times)["spread"]


def is_noisy(times: Sequence[float], threshold: float = NOISY_SPREAD) -> bool:
    """Whether repeated timings spread more than ``threshold`` (IQR / median); a zero median is noisy too."""
    s = spread(times)
    return s is None or s > threshold


def summary_ratio(
    rows: Sequence[dict[str, Any]], what: str, *, key: str = "ratio", threshold: float = NOISY_SPREAD
) -> tuple[str, dict[str, Any] | None]:
    """One line summing up ``row[key]`` over the rows not flagged ``row["noisy"]``, and the same as a dict
    for the JSON (None when refused). Noisy rows are left out and counted; with no clean row the line
    says there is no summary and gives no number."""
    clean = [float(r[key]) for r in rows if not r.get("noisy")]
    left_out = len(rows) - len(clean)
    if not clean:
        return (
            f"{what}: no summary: every row's timings spread more than {threshold:.0%} (IQR / median); "
            "rerun on a quieter machine",
            None,
        )
    stats = {"median": float(np.median(clean)), "max": max(clean), "rows": len(clean), "noisy_rows_left_out": left_out}
    line = f"{what}: median {stats['median']:.2f}, max {stats['max']:.2f} over {len(clean)} rows"
    if left_out:
        line += f"; {left_out} noisy row{'s' if left_out > 1 else ''} ({NOISY_MARK}) left out"
    return line, stats


def blas_facts(be) -> dict:
    """The BLAS behind the backend's matmul and its thread counts: GEMMs of fewer FLOPs than ``threaded_from_flops``
    (most per-step GEMMs) take ``threads_small``, larger ones ``threads_large``. Under MKL (``blas`` "mkl"):
    GEMMs from ``mkl_from_flops`` run on MKL (one MKL thread per calling thread; the large ones on ``threads_large``
    of MKL's OpenMP threads, or split into as many blocks over the backend's threads where MKL runs another
    threading layer: ``large_on``; the step GEMMs on a packed weight), smaller ones on NumPy's BLAS."""
    threads = getattr(be, "blas_threads", None)
    if threads is None:
        return {"library": be.xp.__name__}
    from gpubptt.backend.numpy_backend import BLAS_THREADED_FLOPS, MKL_MIN_FLOPS

    facts = {"library": be.blas_library, "blas": be.blas, "threads_large": threads.most, "threads_small": 1,
             "threaded_from_flops": BLAS_THREADED_FLOPS}  # fmt: skip
    if be.blas == "mkl":
        large_on = "mkl_openmp" if be.mkl.openmp is not None else "backend_threads"
        facts.update(mkl_from_flops=MKL_MIN_FLOPS, numpy_blas=threads.library, large_on=large_on)
    return facts
