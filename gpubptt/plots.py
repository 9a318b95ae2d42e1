"""Plots, as PNG files: one place for the "is matplotlib installed" check and its install hint.

Every figure is drawn on its own ``Figure`` with the Agg canvas (the user's pyplot state and backend
are never touched) and written atomically (``_io.write_atomic``): an existing file is replaced whole
or left as it was.
"""

from __future__ import annotations

import io
import os
from typing import Any

from ._io import write_atomic

__all__ = ["PLOT_HINT", "new_figure", "plot_bench", "plot_unavailable_reason", "save_png"]

PLOT_HINT = "install matplotlib with `pip install 'gpubptt[plot]'`"


def plot_unavailable_reason() -> str | None:
    """Why matplotlib cannot be imported here (with how to install it), or None when it can."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return f"--plot needs matplotlib, which is not installed ({exc}); {PLOT_HINT}"
    return None


def new_figure(**kwargs: Any) -> Any:
    """A matplotlib ``Figure`` on the Agg canvas (no pyplot); ImportError with the install hint without matplotlib."""
    reason = plot_unavailable_reason()
    if reason:
        raise ImportError(reason)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: str | os.PathLike[str], *, dpi: int = 110) -> None:
    """Render ``fig`` as PNG and write it to ``path`` atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_atomic(path, buf.getvalue())


def plot_bench(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Log-log PNG: forward+BPTT time vs T (fixed H) and vs H (fixed T), a line per backend and reference.

    Written atomically. Raises ImportError (with the install hint) when matplotlib is missing.
    """
    fig = new_figure(figsize=(11, 4.5), layout="constrained")
    from matplotlib.ticker import ScalarFormatter

    cfg = result["config"]
    axes = fig.subplots(1, 2)
    backends = sorted({r["backend"] for r in result["rows"]})
    for ax, sweep, size, fixed in (
        (axes[0], "T", "T", f"H = {cfg['fixed_H']}"),
        (axes[1], "H", "H", f"T = {cfg['fixed_T']}"),
    ):
        for be in backends:
            rows = [r for r in result["rows"] if r["backend"] == be and r["sweep"] == sweep and r["status"] == "ok"]
            dev = next((r["torch"]["device"] for r in rows if "torch" in r), "")
            series = [
                (f"gpubptt [{be}]", lambda r: r["bptt"], "o-"),
                (f"gpubptt forward only [{be}]", lambda r: r["forward"], "o:"),
                (f"torch [{dev}, same data as {be}]", lambda r: r.get("torch", {}).get("bptt"), "s--"),
                (f"naive per-example loop [numpy, vs {be}]", lambda r: r.get("naive", {}).get("bptt"), "^--"),
            ]
            for label, get, style in series:
                pts = [(r[size], get(r)["median_s"] * 1e3) for r in rows if get(r)]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_yscale("log")
        ax.set_xlabel(f"{'sequence length T' if sweep == 'T' else 'hidden size H'}  ({fixed}, B = {cfg['batch']})")
        ax.set_ylabel("time per call, ms (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"gpubptt forward+BPTT, {cfg['input']} input, {cfg['dtype']}, D = {cfg['D']}, K = {cfg['K']}")
    save_png(fig, path)
