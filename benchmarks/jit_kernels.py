"""The gated cells' step kernels on the NumPy backend, NumPy twins against numba's compiled twins (the ``jit``
extra): µs per call of one step forward and one step back, LSTM and GRU, at one (B, H).

    python benchmarks/jit_kernels.py                       # B = 32, H = 256, float32 and float64, 15 rounds
    python benchmarks/jit_kernels.py --batch 128 --hidden 1024 --rounds 9

Each round times every kernel both ways (the order alternating between rounds), each over ``--calls`` calls
on the same buffers; the backward's carries are reset before each call (two copies, timed on their own
as "reset") so they never decay into subnormals. Prints the median and quartiles of the rounds; writes nothing.
The whole-model gain is ``python benchmarks/perf_gated.py OUT --jit-compare``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from gpubptt.backend import get_backend
from gpubptt.cells import _jit, gru, lstm


def per_call(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def kernels(B: int, H: int, dtype) -> dict:
    """{name: call} on buffers of a real forward step, and the two kernel objects."""
    be = get_backend("numpy")
    kl, kg = lstm._Kernels(be), gru._Kernels(be)
    rng = np.random.default_rng(0)
    pre, hw = rng.normal(size=(2, B, 4 * H)).astype(dtype)
    cprev, g, dhn, dc0 = rng.normal(size=(4, B, H)).astype(dtype)
    h, c, dc, dh = (np.empty((B, H), dtype) for _ in range(4))
    A, Ag, da = (np.empty((B, 4 * H), dtype) for _ in range(3))
    dpre, dw, tmp = np.empty((B, 3 * H), dtype), np.empty((B, 3 * H), dtype), np.empty((3, B, H), dtype)
    pre3, hw3, bn = pre[:, : 3 * H].copy(), hw[:, : 3 * H].copy(), rng.normal(size=H).astype(dtype)
    kl.forward(pre, hw, cprev, h, c, A, tmp)
    kg.forward(pre3, hw3, bn, cprev, h, Ag, tmp)

    def reset() -> None:
        np.copyto(dc, dc0)
        np.copyto(dh, g)

    def lstm_back() -> None:
        reset()
        kl.backward(dh, dhn, cprev, c, A, dc, da, tmp)

    def gru_back() -> None:
        reset()
        kg.backward(dh, cprev, Ag, dhn, dpre, dw, tmp)

    calls = {
        "lstm forward": lambda: kl.forward(pre, hw, cprev, h, c, A, tmp),
        "lstm backward": lstm_back,
        "gru forward": lambda: kg.forward(pre3, hw3, bn, cprev, h, Ag, tmp),
        "gru backward": gru_back,
        "reset": reset,
    }
    return {"calls": calls, "lstm": kl, "gru": kg}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=400)
    args = ap.parse_args()
    try:
        compiled = {cell.__name__: _jit.compile_kernels(*cell.JIT_KERNELS, choice="numba") for cell in (lstm, gru)}
    except Exception as exc:  # numba absent: nothing to compare
        print(f"this benchmark needs numba ({exc})", file=sys.stderr)
        return 1
    for dtype in (np.float32, np.float64):
        k = kernels(args.batch, args.hidden, dtype)

        def use(which: str, k=k) -> None:
            for cell in ("lstm", "gru"):
                k[cell].jit = compiled[f"gpubptt.cells.{cell}"] if which == "numba" else None

        times = {(name, w): [] for name in k["calls"] for w in ("numpy", "numba")}
        for w in ("numpy", "numba"):  # warm-up (and numba's compilation)
            use(w)
            for fn in k["calls"].values():
                fn()
        for r in range(args.rounds):
            for w in ("numpy", "numba") if r % 2 == 0 else ("numba", "numpy"):
                use(w)
                for name, fn in k["calls"].items():
                    times[(name, w)].append(per_call(fn, args.calls))
        for name in k["calls"]:
            cols = []
            for w in ("numpy", "numba"):
                t = np.array(times[(name, w)])
                cols.append(f"{w} {np.median(t):7.1f} µs [{np.percentile(t, 25):.1f}–{np.percentile(t, 75):.1f}]")
            print(f"{np.dtype(dtype).name} B={args.batch} H={args.hidden} {name:<14} " + "   ".join(cols), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
