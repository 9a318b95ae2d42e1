"""Print a Markdown summary of `gpubptt bench --output X.json` or `perf_grid.py --output X.json` results.

python benchmarks/table.py benchmarks/cpu-default.json benchmarks/perf-cpu.json [more.json ...]

A row whose repeated timings spread more than 10 % (IQR / median) is marked ``~`` and left out of
the summary ratio; with no clean row, no summary ratio is printed.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import NOISY_MARK, NOISY_SPREAD, is_noisy, summary_ratio


def _ms(d: dict | None) -> str:
    return "–" if not d else f"{d['median_s'] * 1e3:.3g}"


def grid_summary(path: str, r: dict) -> str:
    """The performance grid: one row per (T, B, D, H, K), gpubptt against PyTorch."""
    env = r["environment"]
    gpu = any("graph_speedup" in row for row in r["rows"])
    lines = [
        f"**{path}** — {', '.join(b['name'] + ' on ' + b['device'] for b in env['backends'])}; float32; "
        f"median of {r['repeats']} interleaved rounds",
        "",
        "| T | B | D | H | K | input | gpubptt ms | torch ms | gpubptt ÷ torch | GFLOP/s | eff |"
        + (" graph speed-up | batched GEMM vs cupy |" if gpu else " peak MiB | T·B·K MiB |"),
        "|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    compared = []
    for row in r["rows"]:
        med = row["median_s"]
        noisy = any(is_noisy(row["times_s"][k]) for k in ("gpubptt", "torch") if k in row.get("times_s", {}))
        mark = f" {NOISY_MARK}" if noisy else ""
        if "ratio_vs_torch" in row:
            compared.append({"ratio": row["ratio_vs_torch"], "noisy": noisy})
        cells = [row[k] for k in "TBDHK"] + ["tokens" if row["tokens"] else "dense"]
        cells += [f"{med['gpubptt'] * 1e3:.3g}", f"{med['torch'] * 1e3:.3g}" if "torch" in med else "–"]
        cells += [f"{row['ratio_vs_torch']:.2f}{mark}" if "ratio_vs_torch" in row else "–"]
        cells += [f"{row['gflops']:.1f}", f"{row['efficiency']:.0%}"]
        if gpu:
            cells += [f"{row['graph_speedup']:.1f}×", f"{row['batched_gemm_vs_library']:.0%}"]
        else:
            cells += [f"{row['peak_bytes'] / 2**20:.1f}", f"{row['T_B_K_bytes'] / 2**20:.1f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if compared:  # recomputed from the rows, the noisy ones left out (the file's own median counts them all)
        lines += ["", summary_ratio(compared, "gpubptt ÷ torch")[0]]
        if any(c["noisy"] for c in compared):
            lines.append(f"{NOISY_MARK} noisy: gpubptt's or torch's IQR exceeds {NOISY_SPREAD:.0%} of its median")
    return "\n".join(lines) + "\n"


def summary(path: str) -> str:
    """One Markdown table (rows of both sweeps) and the fitted exponents of one result file."""
    with open(path, encoding="utf-8") as f:
        r = json.load(f)
    if str(r.get("schema", "")).startswith("gpubptt-perf-grid"):
        return grid_summary(path, r)
    cfg, env = r["config"], r["environment"]
    refs = [k for k in ("torch", "naive") if any(k in row for row in r["rows"])]
    lines = [
        f"**{path}** — {', '.join(b['name'] + ' on ' + b['device'] for b in env['backends'])}; "
        f"{cfg['input']} input, {cfg['dtype']}, B = {cfg['batch']}, D = {cfg['D']}, K = {cfg['K']}; "
        f"numpy {env['versions']['numpy']}, BLAS {env['blas'].get('name', '?')} {env['blas'].get('version', '')}",
        "",
        "| backend | sweep | T | H | fwd+BPTT ms | fwd ms | tokens/s | GFLOP/s | eff |"
        + "".join(f" {k} ms | ×{k} | {k} grad err |" for k in refs),
        "|---|---|--:|--:|--:|--:|--:|--:|--:|" + "--:|--:|--:|" * len(refs),
    ]
    for row in r["rows"]:
        if row["status"] != "ok":
            lines.append(f"| {row['backend']} | {row['sweep']} | {row['T']} | {row['H']} | {row['status']} |")
            continue
        mark = f" {NOISY_MARK}" if row.get("noisy") else ""  # the bench marked it (older files: no mark)
        cells = [row["backend"], row["sweep"], row["T"], row["H"], _ms(row["bptt"]) + mark, _ms(row["forward"])]
        cells += [f"{row['tokens_per_s']:,.0f}", f"{row['gflops']:.1f}", f"{row['efficiency']:.0%}"]
        for k in refs:
            d = row.get(k)
            cells += [_ms(d["bptt"]), f"{d['ratio']:.2f}", f"{max(d['grad_rel_err'].values()):.1e}"] if d else ["–"] * 3
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    for fit in r["fits"]:
        (k, v), e = next(iter(fit["fixed"].items())), fit["exponent"]
        expo = "n/a" if e is None else f"{e:.2f}"
        lines.append(f"- {fit['impl']} [{fit['backend']}]: time ∝ {fit['sweep']}^{expo} at {k} = {v}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print("\n".join(summary(p) for p in sys.argv[1:]))
