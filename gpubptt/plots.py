"""Plots, as PNG files: one place for the "is matplotlib installed" check and its install hint.

Every figure is drawn on its own ``Figure`` with the Agg canvas (the user's pyplot state and backend
are never touched) and written atomically (``_io.write_atomic``): an existing file is replaced whole
or left as it was.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from ._io import write_atomic
from .errors import InputError

__all__ = [
    "PLOT_HINT",
    "figure_title",
    "new_figure",
    "plot_bench",
    "plot_history",
    "plot_unavailable_reason",
    "plot_vanish",
    "require_matplotlib",
    "save_png",
]

PLOT_HINT = (
    "install matplotlib with `pip install matplotlib` (or, in gpubptt's source folder, `pip install -e '.[plot]'`)"
)


def plot_unavailable_reason() -> str | None:
    """Why matplotlib cannot be imported here (with how to install it), or None when it can."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return f"--plot needs matplotlib, which is not installed ({exc}); {PLOT_HINT}"
    return None


def require_matplotlib() -> None:
    """Raise ImportError with the install hint when matplotlib (the ``plot`` extra) is missing."""
    reason = plot_unavailable_reason()
    if reason:
        raise ImportError(reason)


def new_figure(**kwargs: Any) -> Any:
    """A matplotlib ``Figure`` on the Agg canvas (no pyplot); ImportError with the install hint without matplotlib."""
    require_matplotlib()
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


def figure_title(fig: Any, title: str) -> None:
    """Give ``fig`` (constrained layout) its title, bold, with room below it: at the layout's default
    padding the title sat on the middle panel's title and read as one line with it."""
    fig.suptitle(title, fontsize=12, fontweight="bold")
    fig.get_layout_engine().set(h_pad=0.15)


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


def plot_history(
    path: str | os.PathLike[str], history: Any, *, chance: float, title: str, every_step: bool = False
) -> None:
    """The loss curve of a training ``History`` (training loss per step, smoothed; held-out loss; chance level).

    ``every_step``: the training loss averages every step, blanks included (a copy or recall task's), while the
    held-out loss and the chance level are per scored step (recalled symbol): the labels say so.
    Written atomically; ImportError with the install hint without matplotlib.
    """
    fig = new_figure(figsize=(7, 4), layout="tight")
    ax = fig.subplots()
    steps, loss = np.asarray(history.step), np.asarray(history.loss, dtype=float)
    if len(loss):
        ax.plot(steps, loss, lw=0.6, alpha=0.35, color="C0")
        w = max(1, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        what = "training loss per step, blanks included" if every_step else "training loss"
        ax.plot(steps[w - 1 :], smooth, color="C0", label=f"{what} (smoothed)")
    scored = " per recalled symbol" if every_step else ""
    if history.eval_step:
        ax.plot(history.eval_step, history.eval_loss, "o-", color="C1", ms=3, label=f"held-out loss{scored}")
    ax.axhline(chance, color="k", ls="--", lw=1, label=f"chance level{scored} ({chance:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)" if every_step else "loss (nats per scored step)")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.legend()
    save_png(fig, path)


def plot_vanish(sweep: list[tuple[float, Any]], path: str | os.PathLike[str], *, title: str | None = None) -> None:
    """Write one PNG of a ``vanish_sweep``: three curves on top, one contribution heatmap per radius below.

    Top: the Jacobian-product norm against the lag (log axis; dashed: ρ(W)^lag), the through-time
    gradient ‖δ_{t+1} @ W‖ against the step t, and the truncation bias against the window k.
    Bottom: log10 of ‖E_t's contribution to ∂E/∂W through step k‖ / its largest, rows t, columns k.
    One radius (a checkpoint's own W): a 2 × 2 grid, the heatmap beside the truncation bias.
    ``sweep`` as ``diagnostics.vanish_sweep`` returns it: (radius, VanishReport) pairs.
    """
    if not sweep:
        raise InputError("nothing to plot: the sweep is empty")
    n = len(sweep)
    fig = new_figure(figsize=(max(14.0, 3.0 * n), 9.0), layout="constrained")
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    heat_title = "‖E_t's term of ∂E/∂W through step k‖, rows t, columns k"
    if n == 1:  # a row of heatmaps holding one square would stay mostly blank
        grid = fig.subplots(2, 2)
        ax_top, ax_heat, heat_figure = [grid[0, 0], grid[0, 1], grid[1, 0]], np.array([grid[1, 1]]), fig
    else:
        top, heat_figure = fig.subfigures(2, 1, height_ratios=[1.1, 1])
        ax_top = top.subplots(1, 3)
        ax_heat = np.atleast_1d(heat_figure.subplots(1, n, sharey=True))
    cmap = colormaps["plasma"]
    colors = [cmap(0.85 * i / max(1, n - 1)) for i in range(n)]

    ax = ax_top[0]
    for (radius, rep), color in zip(sweep, colors, strict=True):
        p = rep.products
        rate = "—" if p.decay_rate is None else f"{p.decay_rate:.3f}"
        ax.semilogy(p.lags, p.norms, color=color, lw=2, label=f"ρ(W)={radius:g}: ×{rate}/step")
        ax.semilogy(p.lags, p.spectral_radius ** p.lags.astype(float), color=color, lw=1, ls="--", alpha=0.7)
    thr = sweep[0][1].products.threshold
    ax.axhline(thr, color="0.5", lw=0.8, ls=":")
    ax.set_xlabel("lag t − k")
    ax.set_ylabel("‖Π diag(φ′(a_j)) W‖₂, geometric mean over the batch")  # 1 − s_j² for tanh, 1[s_j > 0] for relu
    ax.set_title("Jacobian product vs lag (dashed: ρ(W)^lag)", fontsize=11)
    ax.legend(fontsize=8)

    ax = ax_top[1]
    for (radius, rep), color in zip(sweep, colors, strict=True):
        st = rep.steps
        t = np.arange(len(st.total))
        ax.semilogy(t[:-1], st.through_time[:-1], color=color, lw=2, label=f"ρ(W)={radius:g}")
        ax.semilogy(t, st.direct, color=color, lw=1, ls="--", alpha=0.7)
    ax.set_xlabel("step t")
    ax.set_ylabel("Frobenius norm over (B, H)")
    ax.set_title("∂E/∂s_t: through time δ_{t+1} W (solid), direct do_t V (dashed)", fontsize=11)
    ax.legend(fontsize=8)

    ax = ax_top[2]
    for (radius, rep), color in zip(sweep, colors, strict=True):
        tb = rep.truncation
        err = np.where(tb.rel_error > 0, tb.rel_error, np.nan)  # exact windows have no log
        ax.semilogy(tb.truncate, err, color=color, lw=2, marker=".", label=f"ρ(W)={radius:g}")
    ax.set_xlabel("truncate k (E_t's gradient flows through k+1 steps)")
    ax.set_ylabel("‖g_full − g_k‖ / ‖g_full‖")
    ax.set_title("truncation bias of the parameter gradient", fontsize=11)
    ax.legend(fontsize=8)

    norm = Normalize(vmin=-8, vmax=0)
    image = None
    for ax, (radius, rep) in zip(ax_heat, sweep, strict=True):
        C = rep.contributions.norms
        T = C.shape[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.log10(C / C.max()) if C.max() > 0 else np.full_like(C, np.nan)
        rel[np.triu_indices(T, 1)] = np.nan
        rel[~np.isfinite(rel)] = np.nan
        image = ax.imshow(rel, cmap="viridis", norm=norm, origin="upper", interpolation="nearest")
        ax.set_title(heat_title.replace(", rows", "\nrows") + f", ρ(W)={radius:.3g}" if n == 1 else f"ρ(W)={radius:g}",
                     fontsize=10 + (n == 1))  # fmt: skip
        ax.set_xlabel("k (step reached)")
    ax_heat[0].set_ylabel("t (loss step)")
    heat_figure.colorbar(image, ax=ax_heat, shrink=0.85, label="log10 (norm / largest)")
    if n > 1:
        heat_figure.suptitle(heat_title, fontsize=11)
    if title:  # the figure's own title, above both rows (a title of the top row overlapped its middle panel's)
        figure_title(fig, title)
    save_png(fig, path)


def _stack_legends(axes: Any, sweep: list[tuple[float | None, Any]], colors: list, styles: list[str]) -> None:
    """Two short legends in place of one entry per (radius, layer) line in every panel: the colours (the
    radius) in the first panel with lines, the line styles (the layer; thin: the reverse direction) in
    the next one."""
    from matplotlib.lines import Line2D

    panels = [ax for ax in axes if ax.lines]
    if not panels:
        return
    colour_handles = [
        Line2D([], [], color=color, lw=2, label="model" if radius is None else f"ρ={radius:g}")
        for (radius, _), color in zip(sweep, colors, strict=True)
    ]
    recurrences = sweep[0][1].recurrences
    layers = sorted({r.layer for r in recurrences})
    style_handles = [Line2D([], [], color="0.3", ls=styles[layer % len(styles)], lw=2, label=f"layer {layer}")
                     for layer in layers]  # fmt: skip
    if any(r.direction for r in recurrences):
        style_handles.append(Line2D([], [], color="0.3", lw=1.5, label="thinner: reverse direction"))
    first = None
    if len(sweep) > 1 or sweep[0][0] is not None:
        first = panels[0].legend(handles=colour_handles, fontsize=8, title="colour", title_fontsize=8)
    if len(style_handles) > 1:
        where = panels[1] if len(panels) > 1 else panels[0]
        if first is not None and where is panels[0]:
            where.add_artist(first)  # a second legend() call would replace the first
        where.legend(handles=style_handles, fontsize=8, title="line", title_fontsize=8, loc="lower left")


def plot_stack(
    sweep: list[tuple[float | None, Any]], path: str | os.PathLike[str], *, title: str | None = None
) -> None:
    """Write one PNG of a ``diagnostics.stack_sweep``: the vanishing gradient of a stack, layer by layer.

    Left: each recurrence's own ‖Π diag(φ'_j) W_l‖₂ against the lag. Middle (one-direction stacks):
    ‖∂s^top/∂s^l‖₂ through the stack against the lag, one line per source layer l. Right (one
    direction): ‖∂E/∂s^l_t‖ against the step t per layer. Colour: the radius; line style: the layer.
    """
    if not sweep:
        raise InputError("nothing to plot: the sweep is empty")
    from matplotlib import colormaps

    n = len(sweep)
    fig = new_figure(figsize=(16.0, 5.0), layout="constrained")
    axes = fig.subplots(1, 3)
    colors = [colormaps["plasma"](0.85 * i / max(1, n - 1)) for i in range(n)]
    styles = ["-", "--", ":", "-."]
    for (radius, rep), color in zip(sweep, colors, strict=True):
        label = "model" if radius is None else f"ρ={radius:g}"
        for r in rep.recurrences:
            ls = styles[r.layer % len(styles)]
            lags = np.arange(len(r.own.norms))
            name = f"layer {r.layer}{' rev' if r.direction else ''}"
            axes[0].semilogy(
                lags, r.own.norms, color=color, ls=ls, lw=1.5 if r.direction else 2, label=f"{label} {name}"
            )
            if r.step_gradients is not None:
                axes[2].semilogy(np.arange(len(r.step_gradients)), r.step_gradients, color=color, ls=ls, lw=2,
                                 label=f"{label} {name}")  # fmt: skip
        if rep.through_stack is not None:
            for layer, d in enumerate(rep.through_stack.per_layer):
                lags = np.arange(len(d.norms))
                axes[1].semilogy(lags, d.norms, color=color, ls=styles[layer % len(styles)], lw=2,
                                 label=f"{label} top ← layer {layer}")  # fmt: skip
    thr = sweep[0][1].threshold
    for ax in axes[:2]:
        ax.axhline(thr, color="0.5", lw=0.8, ls=":")
        ax.set_xlabel("lag ℓ")
    axes[0].set_title("each recurrence's own ‖Π diag(φ'_j) W_l‖₂", fontsize=11)
    axes[1].set_title("through the stack: ‖∂s^top_T−1 / ∂s^l_T−1−ℓ‖₂", fontsize=11)
    axes[2].set_title("‖∂E/∂s^l_t‖ per layer", fontsize=11)
    axes[2].set_xlabel("step t")
    _stack_legends(axes, sweep, colors, styles)
    if title:
        figure_title(fig, title)
    save_png(fig, path)
