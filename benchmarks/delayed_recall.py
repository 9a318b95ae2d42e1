"""Delayed recall across delays: where a vanilla RNN trained with full BPTT learns, and where it stays at chance.

Task (gpubptt.training.data.CopyTask with k = 1): see a symbol a ∈ {1..A}, then `delay` blanks, then a cue;
output a at the cue. A model without memory can do no better than log A nats at the cue (closed
form), so the held-out loss at the cue says at once whether the RNN carried the symbol across the
delay. Every run: the same model size, optimizer, clipping and number of steps; only the delay and
the seed change. Writes NAME.json (settings, environment, per-run curves and final numbers) and
NAME.png into the folder ``--out DIR`` (default: a cache folder outside the repository, printed; the
committed results are regenerated with ``--out benchmarks``). NAME is delayed-recall, or
delayed-recall-cells with ``--cell``, unless ``--name`` says otherwise. Nothing here compares
timings (each run's seconds are reported for planning only), so no row is judged noisy.

    python benchmarks/delayed_recall.py --out benchmarks     # the committed delayed-recall.json: the defaults
    python benchmarks/delayed_recall.py --delays 5,10 --seeds 0 --steps 300
    python benchmarks/delayed_recall.py --plot-only --out benchmarks    # redraw the PNG from the JSON

With ``--cell rnn,gru,lstm`` each cell is trained on every delay and seed (the same H, optimizer,
steps and init scheme for all), runs go to ``--jobs`` processes, and the plot puts the cells side
by side. The committed delayed-recall-cells.json is not the defaults' setup; it came from

    python benchmarks/delayed_recall.py --cell rnn,gru,lstm --delays 5,10,20,50,100,200 --steps 1500 \
        --hidden 32 --batch 32 --lr 0.01 --jobs 2 --out benchmarks
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

# The GEMMs here are tiny (H = 64): BLAS threads gain nothing, and a threaded OpenBLAS slows down
# by up to 100x when other processes share the cores. Set before NumPy loads; override from outside.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

import gpubptt
from gpubptt.training.data import CopyTask
from gpubptt.training.loop import TrainConfig, train
from gpubptt.training.optim import make_optimizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import add_out_option, out_dir


def run(delay: int, seed: int, args: argparse.Namespace, cell: str = "rnn") -> dict:
    data = CopyTask(symbols=args.symbols, length=1, delay=delay)
    model = gpubptt.RNN(
        data.input_size, args.hidden, data.output_size, cell=cell, backend="numpy", bias=True, seed=seed
    )
    if cell == "lstm" and getattr(args, "forget_bias", 0.0):  # b's f quarter (torch's bias_ih + bias_hh there)
        b = model.params["b"]
        b[args.hidden : 2 * args.hidden] = args.forget_bias
    opt = make_optimizer("adam", model, lr=args.lr)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        chunk=None,
        max_norm=args.clip,
        lr=args.lr,
        eval_every=max(1, args.steps // 20),
        seed=seed,
    )
    t0 = time.perf_counter()
    _, h = train(model, data, opt, config)
    seconds = time.perf_counter() - t0
    final_loss, final_acc = h.eval_loss[-1], h.eval_accuracy[-1]
    flow = None
    if getattr(args, "cells_mode", False):  # the trained model's gradient flow on 8 held-out sequences
        from gpubptt.diagnostics.gated import cell_flow

        xe, ye = data.eval_sequences(batch_size=8)[0]
        f = cell_flow(model, xe, ye, truncates=[])
        at_delay = float(f.log_norms[min(delay + 1, len(f.log_norms) - 1)])  # from the cue back to the symbol
        flow = {"decay_rate": f.decay_rate, "horizon": f.horizon, "cell_decay_rate": f.cell_decay_rate,
                "cell_horizon": f.cell_horizon, "log_norm_cue_to_symbol": at_delay}  # fmt: skip
    verdict = "learned" if final_acc >= 0.9 else ("chance" if final_loss >= 0.95 * data.chance_loss else "partial")
    return {
        **({} if cell == "rnn" and not getattr(args, "cells_mode", False) else {"cell": cell}),
        "delay": delay,
        "seed": seed,
        "seconds": round(seconds, 2),
        "final_recall_loss": final_loss,
        "final_recall_accuracy": final_acc,
        "best_recall_loss": min(h.eval_loss),
        "verdict": verdict,
        **({"trained_flow": flow} if flow is not None else {}),
        "curve": {"step": h.eval_step, "recall_loss": h.eval_loss, "recall_accuracy": h.eval_accuracy},
    }


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chance = results["chance_loss"]
    runs = results["runs"]
    delays = sorted({r["delay"] for r in runs})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in runs:
        ax1.plot(r["delay"], r["final_recall_loss"], "o", color="C0", alpha=0.6)
    med = [np.median([r["final_recall_loss"] for r in runs if r["delay"] == d]) for d in delays]
    ax1.plot(delays, med, "-", color="C0", label="held-out loss at the cue (median over seeds)")
    ax1.axhline(
        chance, color="k", ls="--", lw=1, label=f"chance level log {results['settings']['symbols']} = {chance:.3f}"
    )
    ax1.set_xscale("log")
    ax1.minorticks_off()
    ax1.set_xticks(delays, [str(d) for d in delays])
    ax1.set_xlabel("delay (blank steps between the symbol and the cue)")
    ax1.set_ylabel("nats at the cue")
    ax1.set_ylim(bottom=0, top=chance * 1.3)
    ax1.set_title(f"after {results['settings']['steps']} Adam steps, full BPTT")
    ax1.legend(fontsize=8, loc="lower right")
    seed0 = min(r["seed"] for r in runs)
    for i, d in enumerate(delays):
        r = next(r for r in runs if r["delay"] == d and r["seed"] == seed0)
        ax2.plot(r["curve"]["step"], r["curve"]["recall_loss"], color=f"C{i}", label=f"delay {d}")
    ax2.axhline(chance, color="k", ls="--", lw=1)
    ax2.set_xlabel("step")
    ax2.set_ylabel("held-out loss at the cue (nats)")
    ax2.set_ylim(bottom=0, top=chance * 1.3)
    ax2.set_title(f"learning curves (seed {seed0})")
    ax2.legend(fontsize=8)
    fig.suptitle(
        f"Delayed recall with a vanilla RNN (H={results['settings']['hidden']}, A={results['settings']['symbols']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cells(results: dict, path: str) -> None:
    """The cells side by side: held-out loss at the cue against the delay (median over seeds, every seed a dot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chance, runs, s = results["chance_loss"], results["runs"], results["settings"]
    delays = sorted({r["delay"] for r in runs})
    cells = s["cells"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for i, cell in enumerate(cells):
        mine = [r for r in runs if r["cell"] == cell]
        for key, ax in zip(("final_recall_loss", "final_recall_accuracy"), axes, strict=True):
            ax.plot([r["delay"] for r in mine], [r[key] for r in mine], "o", color=f"C{i}", alpha=0.4)
            med = [np.median([r[key] for r in mine if r["delay"] == d]) for d in delays]
            ax.plot(delays, med, "-", color=f"C{i}", lw=2, label=cell)
    axes[0].axhline(chance, color="k", ls="--", lw=1, label=f"chance log {s['symbols']} = {chance:.3f}")
    axes[1].axhline(1 / s["symbols"], color="k", ls="--", lw=1, label=f"chance 1/{s['symbols']}")
    axes[0].set_ylabel("held-out loss at the cue (nats)")
    axes[0].set_ylim(bottom=0, top=chance * 1.3)
    axes[1].set_ylabel("held-out accuracy at the cue")
    axes[1].set_ylim(0, 1.05)
    for ax in axes:
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(delays, [str(d) for d in delays])
        ax.set_xlabel("delay (blank steps between the symbol and the cue)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"Delayed recall, {' vs '.join(cells)}: H={s['hidden']} (matched), A={s['symbols']}, {s['steps']} Adam "
        f"steps (lr {s['lr']}), batch {s['batch']}, full BPTT; {len(s['seeds'])} seeds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_job(job: tuple) -> dict:
    cell, delay, seed, args = job
    return run(delay, seed, args, cell)


def main_cells(args: argparse.Namespace, cells: list[str]) -> None:
    """Every cell × delay × seed, in ``--jobs`` processes; JSON and the side-by-side plot."""
    import multiprocessing

    if args.plot_only:
        with open(args.out + ".json") as f:
            plot_cells(json.load(f), args.out + ".png")
        return
    delays = [int(d) for d in args.delays.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    args.cells_mode = True
    jobs = [(c, d, s, args) for d in sorted(delays, reverse=True) for c in cells for s in seeds]  # long ones first
    t0 = time.perf_counter()
    with multiprocessing.Pool(args.jobs) as pool:
        runs = []
        for r in pool.imap_unordered(_run_job, jobs):
            runs.append(r)
            print(
                f"{r['cell']:>4} delay {r['delay']:>3} seed {r['seed']}: recall loss {r['final_recall_loss']:.3f} "
                f"(chance {math.log(args.symbols):.3f}), accuracy {r['final_recall_accuracy']:.1%} "
                f"-> {r['verdict']}  [{r['seconds']:.0f} s]",
                flush=True,
            )
    runs.sort(key=lambda r: (cells.index(r["cell"]), r["delay"], r["seed"]))
    results = {
        "benchmark": "delayed recall of the first symbol (gpubptt.training.data.CopyTask, length=1),"
        " cells side by side",
        "settings": {
            "cells": cells, "delays": delays, "seeds": seeds, "steps": args.steps, "hidden": args.hidden,
            "matched": "H (not the parameter count)", "symbols": args.symbols, "batch": args.batch,
            "optimizer": "adam", "lr": args.lr, "clip": args.clip, "bptt": "full", "init": "wildml", "bias": True,
            "dtype": "float32", "backend": "numpy", "jobs": args.jobs, "lstm_forget_bias": args.forget_bias,
            "verdict_rule": "learned: held-out accuracy at the cue >= 90%; chance: loss >= 0.95 x chance level; "
            "else partial",
        },
        "chance_loss": math.log(args.symbols),
        "chance_accuracy": 1 / args.symbols,
        "environment": {
            "gpubptt": gpubptt.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        },
        "total_seconds": round(time.perf_counter() - t0, 1),
        "runs": runs,
    }  # fmt: skip
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    try:
        plot_cells(results, args.out + ".png")
    except ImportError:
        print("matplotlib is not installed: wrote the JSON only (pip install 'gpubptt[plot]')")
    print(f"wrote {args.out}.json and .png in {results['total_seconds']:.0f} s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--delays", default="5,10,15,20,30,40,80")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--symbols", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=1.0)
    add_out_option(p)
    p.add_argument("--name", default=None, help="file name stem (default: delayed-recall, -cells with --cell)")
    p.add_argument("--plot-only", action="store_true", help="redraw DIR/NAME.png from an existing DIR/NAME.json")
    p.add_argument("--cell", default=None, help="cells to compare, comma-separated: rnn,gru,lstm")
    p.add_argument("--jobs", type=int, default=1, help="with --cell: runs in this many processes")
    p.add_argument("--forget-bias", type=float, default=0.0, help="with --cell lstm: start the forget gate's bias here")
    args = p.parse_args(argv)
    name = args.name or ("delayed-recall" if args.cell is None else "delayed-recall-cells")
    args.out = str(out_dir(args.out) / name)  # the path stem of NAME.json and NAME.png
    if args.plot_only and not os.path.isfile(args.out + ".json"):
        p.error(f"--plot-only needs {args.out}.json: run without --plot-only first, or name its folder with --out")
    if args.cell is not None:
        cells = [c.strip() for c in args.cell.split(",") if c.strip()]
        main_cells(args, cells)
        return
    if args.plot_only:
        with open(args.out + ".json") as f:
            plot(json.load(f), args.out + ".png")
        return
    delays = [int(d) for d in args.delays.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = []
    t0 = time.perf_counter()
    for delay in delays:
        for seed in seeds:
            r = run(delay, seed, args)
            runs.append(r)
            print(
                f"delay {delay:>3} seed {seed}: recall loss {r['final_recall_loss']:.3f} "
                f"(chance {math.log(args.symbols):.3f}), accuracy {r['final_recall_accuracy']:.1%} "
                f"-> {r['verdict']}  [{r['seconds']:.0f} s]",
                flush=True,
            )
    results = {
        "benchmark": "delayed recall of the first symbol (gpubptt.training.data.CopyTask, length=1)",
        "settings": {
            "delays": delays,
            "seeds": seeds,
            "steps": args.steps,
            "hidden": args.hidden,
            "symbols": args.symbols,
            "batch": args.batch,
            "optimizer": "adam",
            "lr": args.lr,
            "clip": args.clip,
            "bptt": "full",
            "init": "wildml",
            "bias": True,
            "dtype": "float32",
            "backend": "numpy",
            "verdict_rule": "learned: held-out accuracy at the cue >= 90%; chance: loss >= 0.95 x chance level; "
            "else partial",
        },
        "chance_loss": math.log(args.symbols),
        "chance_accuracy": 1 / args.symbols,
        "environment": {
            "gpubptt": gpubptt.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        },
        "total_seconds": round(time.perf_counter() - t0, 1),
        "runs": runs,
    }
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    try:
        plot(results, args.out + ".png")
    except ImportError:
        print("matplotlib is not installed: wrote the JSON only (pip install 'gpubptt[plot]')")
    print(f"wrote {args.out}.json and .png in {results['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
