"""Print a Markdown summary of `gpubptt bench --output X.json` results (for benchmarks/README.md).

python benchmarks/table.py benchmarks/cpu-default.json [more.json ...]
"""

from __future__ import annotations

import json
import sys


def _ms(d: dict | None) -> str:
    return "–" if not d else f"{d['median_s'] * 1e3:.3g}"


def summary(path: str) -> str:
    """One Markdown table (rows of both sweeps) and the fitted exponents of one result file."""
    with open(path, encoding="utf-8") as f:
        r = json.load(f)
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
        cells = [row["backend"], row["sweep"], row["T"], row["H"], _ms(row["bptt"]), _ms(row["forward"])]
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
