"""Rendering a benchmark result: CSV rows and the human-readable table (rich), from the result dict alone."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from ..cells import cell_class, cell_names
from ..timing import NOISY_SPREAD, is_noisy

__all__ = ["CSV_COLUMNS", "NOISY_MARK", "render", "render_csv", "render_table"]


CSV_COLUMNS = [
    "backend", "sweep", "T", "H", "B", "D", "K", "status", "flops",
    "bptt_median_s", "bptt_min_s", "bptt_iqr_s", "forward_median_s", "tokens_per_s", "us_per_step",
    "gflops", "gemm_gflops", "efficiency",
    "torch_median_s", "torch_ratio", "torch_max_grad_rel_err", "naive_median_s", "naive_ratio", "bptt_times_s",
    "bptt_spread", "noisy", "cell", "precision",
]  # fmt: skip


def _csv_row(r: dict[str, Any]) -> dict[str, Any]:
    out = {k: r.get(k) for k in ("backend", "sweep", "T", "H", "B", "D", "K", "status", "flops")}
    out.update(cell=r.get("cell", cell_names()[0]), precision=r.get("precision", "fp32"))  # rows omit the defaults
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


#: The width the table is laid out for: every line fits it (the JSON and CSV keep every column).
TABLE_WIDTH = 100


def _table(title: str, cols: list[str]) -> Any:
    """A right-justified table with a rule under its header, one space between columns (fits TABLE_WIDTH)."""
    from rich import box
    from rich.table import Table

    table = Table(
        title=title, box=box.SIMPLE_HEAD, title_justify="left", show_edge=False, pad_edge=False, padding=(0, 0, 0, 1)
    )
    for c in cols:
        table.add_column(c, justify="right", no_wrap=True)
    return table


def render_table(result: dict[str, Any]) -> str:
    """The result as readable text, at most TABLE_WIDTH columns: a table per backend and sweep (and, with
    references, a second one comparing them), the fitted exponents, and a legend for what they show.

    The min and the IQR in milliseconds are left to the JSON and CSV (the IQR/median column says how
    far the runs spread)."""
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=TABLE_WIDTH, color_system=None, highlight=False)
    cfg = result["config"]
    shown_refs: list[str] = []
    any_noisy = False
    for be in result["environment"]["backends"]:
        for sweep, fixed in (("T", f"H={cfg['fixed_H']}"), ("H", f"T={cfg['fixed_T']}")):
            rows = [r for r in result["rows"] if r["backend"] == be["name"] and r["sweep"] == sweep]
            layers = cfg.get("num_layers", 1)
            arch = (f"{layers} layers, " if layers > 1 else "") + (
                "bidirectional, " if cfg.get("bidirectional") else ""
            )
            cell, phi = cfg.get("cell", cell_names()[0]), cfg.get("nonlinearity", "tanh")
            if cell != cell_names()[0]:  # the cell timed, with its φ where it takes one
                arch += f"{cell} {phi}, " if cell_class(cell).takes_nonlinearity else f"{cell}, "
            else:
                arch += "relu, " if phi == "relu" else ""
            if cfg.get("precision", "fp32") != "fp32":
                arch += f"precision {cfg['precision']}, "
            title = (
                f"{be['name']} on {be['device']}: forward+BPTT vs {sweep} at {fixed}, {arch}B={cfg['batch']}, "
                f"D={cfg['D']}, K={cfg['K']}, {cfg['input']}, {cfg['dtype']} (median of {cfg['repeats']})"
            )
            cols = ["T", "H", "fwd+BPTT ms", "IQR/median", "fwd ms", "tokens/s", "µs/step"]
            cols += ["GFLOP/s", "GEMM GFLOP/s", "eff"]
            table = _table(title, cols)
            refs = [ref for ref in ("torch", "naive") if any(ref in r for r in rows)]
            ref_cols = ["T", "H", "fwd+BPTT ms"]
            for ref in refs:
                ref_cols += [f"{ref} ms", f"×{ref}", f"{ref} grad err"]
            ref_table = _table(f"the same rows against {' and '.join(refs)}", ref_cols) if refs else None
            for r in rows:
                if r["status"] != "ok":
                    table.add_row(str(r["T"]), str(r["H"]), r["status"], *[""] * (len(cols) - 3))
                    continue
                b = r["bptt"]
                any_noisy |= is_noisy(b)
                cells = [str(r["T"]), str(r["H"]), _ms(b), _spread(b)]
                cells += [_ms(r["forward"]), f"{r['tokens_per_s']:,.0f}", f"{r['us_per_step']:.1f}"]
                cells += [f"{r['gflops']:.1f}", f"{r['gemm']['gflops']:.1f}", f"{r['efficiency']:.0%}"]
                table.add_row(*cells)
                if ref_table is None:
                    continue
                ref_cells = [str(r["T"]), str(r["H"]), _ms(b) + (f" {NOISY_MARK}" if is_noisy(b) else "")]
                for ref in refs:
                    d = r.get(ref)
                    if d is None:
                        ref_cells += ["-"] * 3
                        continue
                    any_noisy |= is_noisy(d["bptt"])
                    err = max(d["grad_rel_err"].values())
                    ref_ms = _ms(d["bptt"]) + (f" {NOISY_MARK}" if is_noisy(d["bptt"]) else "")
                    ref_cells += [ref_ms, f"{d['ratio']:.2f}", f"{err:.1e}" + ("" if d["grads_match"] else " (!)")]
                ref_table.add_row(*ref_cells)
            console.print(table)
            if ref_table is not None and ref_table.row_count:
                console.print(ref_table)
                shown_refs += [ref for ref in refs if ref not in shown_refs]
            console.print()
        fits = [f for f in result["fits"] if f["backend"] == be["name"]]
        for f in fits:
            (k, v), exp = next(iter(f["fixed"].items())), f["exponent"]
            expo = "n/a (needs 2 sizes)" if exp is None else f"{exp:.2f}"
            noisy = f.get("noisy_points", 0)
            caveat = f"  ({NOISY_MARK} rests on {noisy} noisy of {f['points']} points: unreliable)" if noisy else ""
            line = f"fitted: {f['impl']:>8} [{be['name']}]  time ∝ {f['sweep']}^{expo}  at {k}={v}{caveat}"
            console.print(line, markup=False)  # "[numpy]" is text, not a rich style tag
    for note in result["notes"]:
        console.print(f"note: {note}", markup=False)
    # a legend for what the tables show, and nothing else
    console.print("eff = GFLOP/s ÷ the same-shaped GEMM rate measured in this run")
    if shown_refs:
        names = " / ".join(f"×{ref}" for ref in shown_refs)
        console.print(f"{names} = reference time ÷ gpubptt time (above 1: gpubptt is faster)")
    if any_noisy:
        console.print(
            f"{NOISY_MARK} noisy: IQR/median above {NOISY_SPREAD:.0%}, the runs disagree and the median is "
            "unreliable (a busy machine?): rerun on a quieter one, or with more --repeats"
        )
    return "".join(line.rstrip() + "\n" for line in buf.getvalue().splitlines())


def render(result: dict[str, Any], fmt: str) -> str:
    """The result as "json", "csv" or "table" text."""
    if fmt == "json":
        return json.dumps(result, indent=2) + "\n"
    if fmt == "csv":
        return render_csv(result)
    return render_table(result)
