"""Rendering a benchmark result: CSV rows and the human-readable table (rich), from the result dict alone."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from ..timing import NOISY_SPREAD, is_noisy

__all__ = ["CSV_COLUMNS", "NOISY_MARK", "render", "render_csv", "render_table"]


CSV_COLUMNS = [
    "backend", "sweep", "T", "H", "B", "D", "K", "status", "flops",
    "bptt_median_s", "bptt_min_s", "bptt_iqr_s", "forward_median_s", "tokens_per_s", "us_per_step",
    "gflops", "gemm_gflops", "efficiency",
    "torch_median_s", "torch_ratio", "torch_max_grad_rel_err", "naive_median_s", "naive_ratio", "bptt_times_s",
    "bptt_spread", "noisy",
]  # fmt: skip


def _csv_row(r: dict[str, Any]) -> dict[str, Any]:
    out = {k: r.get(k) for k in ("backend", "sweep", "T", "H", "B", "D", "K", "status", "flops")}
    if r["status"] == "ok":
        out.update(
            bptt_median_s=r["bptt"]["median_s"],
            bptt_min_s=r["bptt"]["min_s"],
            bptt_iqr_s=r["bptt"]["iqr_s"],
            forward_median_s=r["forward"]["median_s"],
            tokens_per_s=r["tokens_per_s"],
            us_per_step=r["us_per_step"],
            gflops=r["gflops"],
            gemm_gflops=r["gemm"]["gflops"],
            efficiency=r["efficiency"],
            bptt_times_s=";".join(f"{t:.6g}" for t in r["bptt"]["times_s"]),
            bptt_spread=r["bptt"]["spread"],
            noisy=r["noisy"],
        )
        for ref in ("torch", "naive"):
            if ref in r:
                out[f"{ref}_median_s"] = r[ref]["bptt"]["median_s"]
                out[f"{ref}_ratio"] = r[ref]["ratio"]
        if "torch" in r:
            out["torch_max_grad_rel_err"] = max(r["torch"]["grad_rel_err"].values())
    return out


def render_csv(result: dict[str, Any]) -> str:
    """One CSV line per row of ``result`` (columns CSV_COLUMNS; raw times joined by ';')."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in result["rows"]:
        w.writerow(_csv_row(r))
    return buf.getvalue()


def _ms(summary: dict | None) -> str:
    return "-" if not summary else f"{summary['median_s'] * 1e3:.3g}"


#: Marks a noisy timing (IQR/median above NOISY_SPREAD) in the table.
NOISY_MARK = "~"


def _spread(summary: dict) -> str:
    """IQR / median as a percentage, marked when noisy."""
    if summary["median_s"] <= 0:
        return "-"
    text = f"{summary['iqr_s'] / summary['median_s']:.0%}"
    return f"{text} {NOISY_MARK}" if is_noisy(summary) else text


def render_table(result: dict[str, Any]) -> str:
    """The result as readable text: a table per backend and sweep, then the fitted exponents."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    buf = io.StringIO()
    console = Console(file=buf, width=220, color_system=None, highlight=False)
    cfg = result["config"]
    for be in result["environment"]["backends"]:
        for sweep, fixed in (("T", f"H={cfg['fixed_H']}"), ("H", f"T={cfg['fixed_T']}")):
            rows = [r for r in result["rows"] if r["backend"] == be["name"] and r["sweep"] == sweep]
            layers = cfg.get("num_layers", 1)
            arch = (f"{layers} layers, " if layers > 1 else "") + (
                "bidirectional, " if cfg.get("bidirectional") else ""
            )
            arch += "relu, " if cfg.get("nonlinearity", "tanh") == "relu" else ""
            title = (
                f"{be['name']} on {be['device']}: forward+BPTT vs {sweep} at {fixed}, {arch}B={cfg['batch']}, "
                f"D={cfg['D']}, K={cfg['K']}, {cfg['input']}, {cfg['dtype']} (median of {cfg['repeats']})"
            )
            table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
            cols = ["T", "H", "fwd+BPTT ms", "IQR ms", "IQR/median", "min ms", "fwd ms", "tokens/s", "µs/step"]
            cols += ["GFLOP/s", "GEMM GFLOP/s", "eff"]
            refs = [ref for ref in ("torch", "naive") if any(ref in r for r in rows)]
            for ref in refs:
                cols += [f"{ref} ms", f"×{ref}", f"{ref} grad err"]
            for c in cols:
                table.add_column(c, justify="right")
            for r in rows:
                if r["status"] != "ok":
                    table.add_row(str(r["T"]), str(r["H"]), r["status"], *[""] * (len(cols) - 3))
                    continue
                b = r["bptt"]
                cells = [str(r["T"]), str(r["H"]), _ms(b), f"{b['iqr_s'] * 1e3:.2g}", _spread(b)]
                cells.append(f"{b['min_s'] * 1e3:.3g}")
                cells += [_ms(r["forward"]), f"{r['tokens_per_s']:,.0f}", f"{r['us_per_step']:.1f}"]
                cells += [f"{r['gflops']:.1f}", f"{r['gemm']['gflops']:.1f}", f"{r['efficiency']:.0%}"]
                for ref in refs:
                    d = r.get(ref)
                    if d is None:
                        cells += ["-"] * 3
                        continue
                    err = max(d["grad_rel_err"].values())
                    ref_ms = _ms(d["bptt"]) + (f" {NOISY_MARK}" if is_noisy(d["bptt"]) else "")
                    cells += [ref_ms, f"{d['ratio']:.2f}", f"{err:.1e}" + ("" if d["grads_match"] else " (!)")]
                table.add_row(*cells)
            console.print(table)
        fits = [f for f in result["fits"] if f["backend"] == be["name"]]
        for f in fits:
            (k, v), exp = next(iter(f["fixed"].items())), f["exponent"]
            expo = "n/a (needs 2 sizes)" if exp is None else f"{exp:.2f}"
            noisy = f.get("noisy_points", 0)
            caveat = f"  ({NOISY_MARK} rests on {noisy} noisy of {f['points']} points: unreliable)" if noisy else ""
            console.print(f"fitted: {f['impl']:>8} [{be['name']}]  time ∝ {f['sweep']}^{expo}  at {k}={v}{caveat}")
    for note in result["notes"]:
        console.print(f"note: {note}")
    console.print(
        "×torch / ×naive = reference time ÷ gpubptt time (above 1: gpubptt is faster); eff = GFLOP/s ÷ the "
        "same-shaped GEMM rate measured in this run"
    )
    console.print(
        f"{NOISY_MARK} noisy: IQR/median above {NOISY_SPREAD:.0%}, the runs disagree and the median is "
        "unreliable (a busy machine?): rerun on a quieter one, or with more --repeats"
    )
    return buf.getvalue()


def render(result: dict[str, Any], fmt: str) -> str:
    """The result as "json", "csv" or "table" text."""
    if fmt == "json":
        return json.dumps(result, indent=2) + "\n"
    if fmt == "csv":
        return render_csv(result)
    return render_table(result)
