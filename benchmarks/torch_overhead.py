"""Overhead of ``gpubptt.torch.Recurrent`` over calling gpubptt's pullback directly, on the CPU.

For each single-layer shape of the performance grid (``perf_grid.GRID``; its token row runs with
dense x of D = vocabulary size, since a torch module takes dense input), one cell, float32, biases
on (torch's default): one forward+backward through ``Recurrent`` as a torch training step runs it
(gradients set to None as ``optimizer.zero_grad()`` does, forward, ``backward`` with an upstream
gradient on the output) against ``model.vjp`` + ``pullback`` on NumPy arrays with the same weights,
x and upstream gradient (both compute dx). Timed interleaved: each round runs both (the order
alternating per round), best of 3 each; the median over the rounds of the per-round ratio, with its
interquartile range, and of the per-round difference (the wrapper's cost a call). Prints one line
per shape; writes OUT_DIR/torch-overhead.json with every round's times.

Each round also times torch's own floor: a ``torch.autograd.Function`` with the same inputs (x and
the Parameters) and outputs, whose forward and backward only hand back tensors made in advance. Any
module that brings its own backward into torch autograd pays it (``apply``, saving tensors, the
engine, one gradient accumulation per Parameter); ``own`` = excess − floor is what the wrapper adds
beyond it (moving arrays across, the bias sums and splits, its checks).

``--torch-threads`` sets ``torch.set_num_threads`` (default: torch's own choice). On a small
machine torch's idle OpenMP workers can spin between its ops and take cores from the BLAS that
gpubptt runs in between; one torch thread shows the wrapper's own cost.

    python benchmarks/torch_overhead.py [--out DIR] [--rounds 20] [--shapes N] [--cell rnn] [--torch-threads 1]

OUT_DIR defaults to a new folder under the system's temporary directory (never inside the repository).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from _report import add_out_option
from _report import out_dir as _out_dir
from perf_grid import GRID  # this script's folder, first on sys.path when run as a script

import gpubptt
from gpubptt.torch import Recurrent

SHAPES = [(T, B, D, H) for T, B, D, H, _K, _tokens in GRID]  # (T, B, D, H): the single-layer rows


def best_of(fn, n: int = 3) -> float:
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_option(p)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--shapes", type=int, default=len(SHAPES), help="the first N shapes of the grid")
    p.add_argument("--cell", choices=("rnn", "gru", "lstm"), default="rnn")
    p.add_argument("--torch-threads", type=int, default=None)
    args = p.parse_args()
    out_dir = _out_dir(args.out)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, cell {args.cell}, float32")
    rows = [measure(T, B, D, H, args.cell, args.rounds) for T, B, D, H in SHAPES[: args.shapes]]
    record = {
        "benchmark": "torch_overhead",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "cell": args.cell,
        "dtype": "float32",
        "rounds": args.rounds,
        "rows": rows,
    }
    path = out_dir / "torch-overhead.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")


def measure(T: int, B: int, D: int, H: int, cell: str, rounds: int) -> dict:
    """One shape: print and return direct and wrapped medians and the ratio's median and quartiles."""
    model = gpubptt.RNN(D, H, 1, cell=cell, backend="numpy", seed=0, bias=True)
    rec = Recurrent(model)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(T, B, D)).astype(np.float32)
    dY = rng.normal(size=(T, B, H)).astype(np.float32)
    xt, dYt = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(dY)

    def direct() -> None:
        _, pullback = model.vjp(x)
        pullback(dY)

    params = list(rec.parameters())

    def wrapped() -> None:
        for p in params:  # as a training step's optimizer.zero_grad() (set_to_none)
            p.grad = None
        xt.grad = None
        out, _ = rec(xt)
        out.backward(dYt)

    out_t, hn_t = rec(xt)[0].detach(), torch.zeros(model.num_states, B, H)
    grads = [torch.zeros_like(xt)] + [torch.zeros_like(p) for p in params]

    class Floor(torch.autograd.Function):
        """torch autograd's own cost for a Function of these inputs and outputs: no work at all."""

        @staticmethod
        def forward(ctx, x, *ps):
            ctx.save_for_backward(x, *ps)
            return out_t.view_as(out_t), hn_t.view_as(hn_t)

        @staticmethod
        def backward(ctx, d_out, d_hn):
            ctx.saved_tensors  # noqa: B018 -- as the wrapper: torch's in-place check
            return tuple(g.view_as(g) for g in grads)

    def floor() -> None:
        for p in params:
            p.grad = None
        xt.grad = None
        out, _ = Floor.apply(xt, *params)
        out.backward(dYt)

    direct(), wrapped(), floor()  # warm-up
    ratios, t_direct, t_wrapped, t_floor = [], [], [], []
    for r in range(rounds):
        if r % 2:
            a = best_of(direct)
            b = best_of(wrapped)
        else:
            b = best_of(wrapped)
            a = best_of(direct)
        t_direct.append(a)
        t_wrapped.append(b)
        t_floor.append(best_of(floor))
        ratios.append(b / a)
    q = np.percentile(ratios, [25, 50, 75])
    excess = float(np.median(np.subtract(t_wrapped, t_direct)))  # the wrapper's cost per call, in seconds
    fl = float(np.median(t_floor))
    own = float(np.median(np.subtract(np.subtract(t_wrapped, t_floor), t_direct)))
    print(
        f"T={T} B={B} D={D} H={H}: direct {np.median(t_direct) * 1e3:.2f} ms, Recurrent "
        f"{np.median(t_wrapped) * 1e3:.2f} ms, ratio {q[1]:.3f} (IQR {q[0]:.3f}–{q[2]:.3f}), "
        f"excess {excess * 1e3:.3f} ms a call = torch's floor {fl * 1e3:.3f} + the wrapper's own "
        f"{own * 1e3:.3f} ({own / np.median(t_direct):.1%})"
    )
    return {"T": T, "B": B, "D": D, "H": H, "direct_s": t_direct, "wrapped_s": t_wrapped, "floor_s": t_floor,
            "ratio_median": q[1], "ratio_q25": q[0], "ratio_q75": q[2], "excess_s_median": excess,
            "floor_s_median": fl, "own_s_median": own, "own_fraction": own / float(np.median(t_direct))}  # fmt: skip


if __name__ == "__main__":
    main()
