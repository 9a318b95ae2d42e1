"""Recomputation against the stored path on the performance grid: time ratio and measured peak memory.

For each (T, B, D, H, K) of ``perf_grid.GRID``: ``loss_and_grads`` with every state stored and with
``recompute="sqrt"``, timed interleaved (median of the rounds), and the peak bytes one call on a
fresh model allocates (tracemalloc on NumPy, the memory pool's growth on CuPy).

    python benchmarks/recompute_grid.py --backend numpy --out benchmarks   # the committed recompute-grid-cpu.json

Prints one line per configuration, ``~`` where either timing's IQR exceeds 10 % of its median (a
noisy row, left out of the summary ratio); writes recompute-grid-cpu.json (-gpu on CuPy) with every
raw time into ``--out DIR`` (default: a cache folder outside the repository, printed).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import gpubptt
from gpubptt import bench
from gpubptt._io import write_atomic
from gpubptt.bench.long import _measure
from gpubptt.environment import environment

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _report import NOISY_MARK, NOISY_SPREAD, add_out_option, is_noisy, out_dir, summary_ratio
from perf_grid import GRID


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--repeats", type=int, default=7)
    add_out_option(ap)
    args = ap.parse_args()
    be = gpubptt.get_backend(args.backend)
    path = out_dir(args.out) / f"recompute-grid-{'cpu' if be.name == 'numpy' else 'gpu'}.json"
    timer = be.timer()
    rows = []
    for T, B, D, H, K, tokens in GRID:
        rng = np.random.default_rng(0)
        model = gpubptt.RNN(D, H, K, backend=be, seed=0, bias=False)
        x = be.asarray(rng.integers(0, D, size=(T, B)) if tokens else rng.normal(size=(T, B, D)).astype(np.float32))
        y = be.asarray(rng.integers(0, K, size=(T, B)))
        runs = {
            "none": (lambda m=model, x=x, y=y: m.loss_and_grads(x, y), timer),
            "sqrt": (lambda m=model, x=x, y=y: m.loss_and_grads(x, y, recompute="sqrt"), timer),
        }
        times = bench.time_interleaved(runs, warmup=2, repeats=args.repeats)
        med = {k: float(np.median(v)) for k, v in times.items()}
        peaks = {k: _measure(be, model, x, None if k == "none" else k, y=y)[1] for k in runs}
        row = {"T": T, "B": B, "D": D, "H": H, "K": K, "tokens": tokens, "times": times, "median": med, "peak": peaks}
        row["ratio"] = med["sqrt"] / med["none"]
        row["noisy"] = any(is_noisy(t) for t in times.values())
        rows.append(row)
        mark = NOISY_MARK if row["noisy"] else " "
        print(
            f"T={T:<4} B={B:<3} D={D:<4} H={H:<5} K={K:<5}{' tok' if tokens else '    '}"
            f"  stored {1e3 * med['none']:8.2f} ms"
            f"  sqrt {1e3 * med['sqrt']:8.2f} ms  ratio {row['ratio']:.2f}{mark} peak {peaks['none'] / 2**20:6.1f} → "
            f"{peaks['sqrt'] / 2**20:5.1f} MiB",
            flush=True,
        )
    if any(r["noisy"] for r in rows):
        print(f"{NOISY_MARK} noisy: a timing's IQR exceeds {NOISY_SPREAD:.0%} of its median")
    line, summary = summary_ratio(rows, "recompute ÷ stored")
    print(line)
    out = {"environment": environment([be]), "argv": sys.argv, "noisy_spread": NOISY_SPREAD, "summary": summary}
    write_atomic(path, json.dumps({**out, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
