"""Overhead of ``gpubptt.torch.Recurrent`` over calling gpubptt's pullback directly, on the CPU.

For each single-layer shape of the performance grid (``perf_grid.GRID``; its token row runs with
dense x of D = vocabulary size, since a torch module takes dense input), one cell, float32, biases
on (torch's default): one forward+backward through ``Recurrent`` as a torch training step runs it
(gradients set to None as ``optimizer.zero_grad()`` does, forward, ``backward`` with an upstream
gradient on the output) against ``model.vjp`` + ``pullback`` on NumPy arrays with the same weights,
x and upstream gradient (both compute dx; the direct path keeps its gradients until its next call, as
torch keeps ``.grad`` until ``zero_grad``). A third path, "bare", is the least any torch module around
gpubptt can cost: an ``nn.Module`` calling a ``torch.autograd.Function`` whose forward is
``model.vjp`` and whose backward is the pullback, with no checks, no bias sums, no in-place check.
Timed interleaved: each round runs the three (the order rotating per round), best of 3 each, and
counts their minor page faults a call; the median over the rounds of the per-round ratio, with its
interquartile range, and of the per-round difference (excess: the wrapper's cost a call; own =
wrapped − bare: what the wrapper adds beyond the least). Prints one line per shape; writes
OUT_DIR/torch-overhead.json with every round's times.

Each round also times torch's own floor: a ``torch.autograd.Function`` with the same inputs (x and
the Parameters) and outputs, whose forward and backward only hand back tensors made in advance (``apply``,
saving tensors, the engine, one gradient accumulation per Parameter), each call right after a direct
call, as the wrapper's torch work runs after gpubptt's: on a small shared machine that work runs from
cold caches and costs several times what it costs in a tight loop.

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
import resource
import time

import numpy as np
import torch
from _report import add_out_option
from _report import out_dir as _out_dir
from perf_grid import GRID  # this script's folder, first on sys.path when run as a script

import gpubptt
from gpubptt.torch import Recurrent

SHAPES = [(T, B, D, H) for T, B, D, H, _K, _tokens in GRID]  # (T, B, D, H): the single-layer rows


def best_of(fn, n: int = 3, before=None) -> tuple[float, float]:
    """(best time of n calls of fn, minor page faults per call); ``before`` runs untimed before each call."""
    best, faults = float("inf"), 0
    for _ in range(n):
        if before is not None:
            before()
        f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f
    return best, faults / n


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
    """One shape: print and return the medians of direct, bare and wrapped, the ratio's median and quartiles."""
    model = gpubptt.RNN(D, H, 1, cell=cell, backend="numpy", seed=0, bias=True)
    rec = Recurrent(model)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(T, B, D)).astype(np.float32)
    dY = rng.normal(size=(T, B, H)).astype(np.float32)
    xt, dYt = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(dY)
    kept: list = [None]  # the direct path's gradients, kept until its next call as torch keeps .grad

    def direct() -> None:
        kept[0] = None
        _, pullback = model.vjp(x)
        kept[0] = pullback(dY)

    params = list(rec.parameters())

    def wrapped() -> None:
        for p in params:  # as a training step's optimizer.zero_grad() (set_to_none)
            p.grad = None
        xt.grad = None
        out, _ = rec(xt)
        out.backward(dYt)

    class Bare(torch.autograd.Function):
        """The least any torch module around gpubptt does: vjp forward, pullback backward, nothing else."""

        @staticmethod
        def forward(ctx, x, *ps):
            out, ctx.pullback = model.vjp(x.detach().numpy())
            h_n = out.final_state[0] if isinstance(out.final_state, tuple) else out.final_state
            return torch.from_numpy(out.states), torch.from_numpy(h_n)

        @staticmethod
        def backward(ctx, d_out, d_hn):
            g = ctx.pullback(d_out.numpy())
            grads = [g["U"], g["W"], g["b"], g["b"].copy()]  # torch's bias_ih and bias_hh both get db
            return torch.from_numpy(g["x"]), *map(torch.from_numpy, grads)

    class BareModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ps = torch.nn.ParameterList(torch.nn.Parameter(p.detach().clone()) for p in params)

        def forward(self, x):
            return Bare.apply(x, *self.ps)

    bare_module = BareModule()
    ps_bare = list(bare_module.parameters())

    def bare() -> None:
        for p in ps_bare:
            p.grad = None
        xt.grad = None
        out, _ = bare_module(xt)
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

    paths = {"direct": direct, "wrapped": wrapped, "bare": bare}
    for fn in (*paths.values(), floor):  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in (*paths, "floor")}
    faults: dict[str, list[float]] = {k: [] for k in paths}
    order = list(paths)
    for _ in range(rounds):
        order = order[1:] + order[:1]  # each path first, second and last in turn
        for k in order:
            t, f = best_of(paths[k])
            times[k].append(t)
            faults[k].append(f)
        times["floor"].append(best_of(floor, before=direct)[0])  # after the same computation, as the wrapper runs
    t_direct, t_wrapped, t_bare = (np.array(times[k]) for k in paths)
    q = np.percentile(t_wrapped / t_direct, [25, 50, 75])
    qb = np.percentile(t_bare / t_direct, [25, 50, 75])
    excess = float(np.median(t_wrapped - t_direct))  # the wrapper's cost per call, in seconds
    fl = float(np.median(times["floor"]))
    own = float(np.median(t_wrapped - t_bare))  # beyond the least a torch module around gpubptt costs
    mf = {k: float(np.median(v)) for k, v in faults.items()}
    print(
        f"T={T} B={B} D={D} H={H}: direct {np.median(t_direct) * 1e3:.2f} ms, Recurrent "
        f"{np.median(t_wrapped) * 1e3:.2f} ms, ratio {q[1]:.3f} (IQR {q[0]:.3f}–{q[2]:.3f}); bare Function "
        f"{qb[1]:.3f} ({qb[0]:.3f}–{qb[2]:.3f}); excess {excess * 1e3:.3f} ms a call = bare "
        f"{float(np.median(t_bare - t_direct)) * 1e3:.3f} + the wrapper's own {own * 1e3:.3f} "
        f"({own / np.median(t_direct):.1%}); torch's floor {fl * 1e3:.3f} ms; page faults a call "
        f"{mf['direct']:.0f} / {mf['wrapped']:.0f} / {mf['bare']:.0f}"
    )
    return {"T": T, "B": B, "D": D, "H": H, "direct_s": times["direct"], "wrapped_s": times["wrapped"],
            "bare_s": times["bare"], "floor_s": times["floor"], "ratio_median": q[1], "ratio_q25": q[0],
            "ratio_q75": q[2], "bare_ratio_median": qb[1], "bare_ratio_q25": qb[0], "bare_ratio_q75": qb[2],
            "excess_s_median": excess, "floor_s_median": fl, "own_s_median": own,
            "own_fraction": own / float(np.median(t_direct)), "minor_faults_per_call": mf}  # fmt: skip


if __name__ == "__main__":
    main()
