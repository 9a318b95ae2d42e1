"""The per-step recurrent GEMMs on NumPy's own BLAS (OpenBLAS), MKL's ``cblas_?gemm`` and MKL's packed B, one thread.

For every step shape of ``perf_grid.py`` and ``perf_gated.py`` (B rows, hidden size H, G gates: Elman 1,
GRU 3, LSTM 4): the forward step h (B, H) @ Wᵀ (H, G·H) with Wᵀ a transposed view of W (G·H, H), and the
backward step ∂a (B, G·H) @ W (G·H, H). Each is timed as a run of back-to-back GEMMs through the calls
the NumPy backend makes (``np.matmul`` with OpenBLAS on one thread, and in the forward also on a row-major
copy of Wᵀ, which the gated cells make for long sequences; ``Mkl.gemm``; ``Mkl.compute`` on W packed once,
as a cell packs it once per call), interleaved over rounds; the median of the rounds, in µs per GEMM.
Needs MKL (the ``mkl`` extra).

    python benchmarks/blas_gemm.py --out DIR      # DIR/blas-gemm.json; one line per shape

DIR defaults to a folder outside the repository (``_report.default_out_dir``); the committed result is
regenerated with ``--out benchmarks``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from gpubptt.backend._mkl import PackSlot
from gpubptt.backend.numpy_backend import NumpyBackend
from gpubptt.environment import environment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import add_out_option, out_dir

# (cell, gates, B, H): the per-step shapes of perf_grid.py (Elman) and perf_gated.py (GRU, LSTM), and two
# between the smallest two (where MKL starts to pay: MKL_MIN_FLOPS)
SHAPES = [
    ("rnn", 1, 1, 100),
    ("rnn", 1, 16, 128),
    ("rnn", 1, 32, 128),
    ("rnn", 1, 16, 256),
    ("rnn", 1, 32, 256),
    ("rnn", 1, 64, 512),
    ("rnn", 1, 128, 1024),
    ("gru", 3, 32, 256),
    ("gru", 3, 128, 1024),
    ("lstm", 4, 32, 256),
    ("lstm", 4, 128, 1024),
]


def per_gemm_us(fn, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def measure(be: NumpyBackend, G: int, B: int, H: int, direction: str, rounds: int) -> dict:
    rng = np.random.default_rng(0)
    W = rng.standard_normal((G * H, H)).astype(np.float32)
    if direction == "forward":
        a, b = rng.standard_normal((B, H)).astype(np.float32), W.T  # h @ Wᵀ, Wᵀ a view
    else:
        a, b = rng.standard_normal((B, G * H)).astype(np.float32), W  # ∂a @ W
    out = np.empty((B, b.shape[1]), np.float32)
    mkl = be.mkl
    packed = mkl.packed(b, B, PackSlot())
    ref = a.astype(np.float64) @ b.astype(np.float64)
    fns = {
        "openblas": lambda: np.matmul(a, b, out=out),
        "mkl": lambda: mkl.gemm(a, b, out, False),
        "mkl_packed": lambda: mkl.compute(a, packed, out, False),
    }
    if direction == "forward":  # what the gated cells' NumPy path runs once T·B ≥ 8·H: a row-major copy of Wᵀ
        b_rows = np.ascontiguousarray(b)
        fns["openblas_row_major"] = lambda: np.matmul(a, b_rows, out=out)
    err = {}
    for name, fn in fns.items():
        out[...] = 0
        fn()
        err[name] = float(np.abs(out - ref).max() / np.abs(ref).max())
    calls = max(5, int(4e8 / (2 * a.shape[0] * a.shape[1] * b.shape[1] + 2e5)))  # ~0.1 s per round and name
    for fn in fns.values():  # warm-up: caches, page faults, MKL's dispatch
        per_gemm_us(fn, calls // 5 + 1)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(per_gemm_us(fn, calls))
    us = {name: float(np.median(t)) for name, t in times.items()}
    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    return {"m": a.shape[0], "k": a.shape[1], "n": b.shape[1], "flops": flops, "calls_per_round": calls,
            "us": us, "gflops": {k: flops / v / 1e3 for k, v in us.items()}, "rel_err": err,
            "raw_us": times}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_option(parser)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    be = NumpyBackend("mkl")
    be.blas_threads.use(1)  # NumPy's BLAS on one thread; MKL runs one thread per caller
    be.blas_threads.enabled = False  # and stays there
    rows = []
    for cell, G, B, H in SHAPES:
        for direction in ("forward", "backward"):
            row = {"cell": cell, "B": B, "H": H, "direction": direction, **measure(be, G, B, H, direction, args.rounds)}
            rows.append(row)
            us = row["us"]
            copied = f" ({us['openblas_row_major']:.1f} on Wᵀ copied)" if "openblas_row_major" in us else ""
            print(f"{cell:>4} B={B:<3} H={H:<4} {direction:<8} ({row['m']}×{row['k']})·({row['k']}×{row['n']}): "
                  f"openblas {us['openblas']:.1f} µs{copied}, mkl {us['mkl']:.1f}, packed {us['mkl_packed']:.1f}",
                  flush=True)  # fmt: skip
    path = out_dir(args.out) / "blas-gemm.json"
    result = {"what": "per-step GEMM, µs per call, median of rounds, one thread, float32", "rows": rows,
              "openblas": be.blas_threads.library, "mkl": be.mkl.version, "environment": environment([be])}  # fmt: skip
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
