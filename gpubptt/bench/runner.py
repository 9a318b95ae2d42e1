"""Running a benchmark: the configuration, one measured row per (T, H), both sweeps, the fits.

Every configuration is timed honestly (warm-up runs first, each timed run synchronised with the
device, data built once from a fixed seed outside the timed region). Nothing here prints.
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from ..backend import Backend, get_backend
from ..cells import cell_class, cell_names, make_cell
from ..engine.memory import is_out_of_memory
from ..environment import environment
from ..model import RNN
from ..timing import NOISY_SPREAD, is_noisy, summarize, time_interleaved
from .config import BenchConfig
from .flops import fit_exponent, flops, gemm_rate
from .references import gemm_references, naive_measure, torch_reference, torch_unavailable_reason

__all__ = ["SCHEMA", "run_bench"]

SCHEMA = "gpubptt.bench/1"


def _make_data(cfg: BenchConfig, T: int, H: int) -> tuple[np.ndarray, np.ndarray]:
    """x (T, B) ids or (T, B, D) floats and y (T, B), on the host, from a seed fixed per (seed, T, H)."""
    rng = np.random.default_rng([cfg.seed, T, H])
    B = cfg.batch
    if cfg.tokens:
        x = rng.integers(0, cfg.D, size=(T, B))
    else:
        x = rng.standard_normal((T, B, cfg.D)).astype(cfg.dtype)
    return x, rng.integers(0, cfg.K, size=(T, B))


def _measure(be: Backend, cfg: BenchConfig, T: int, H: int) -> dict[str, Any]:
    """Everything one row reports, for sizes T and H on backend ``be``.

    gpubptt and its GEMM references are timed interleaved (one run of each per round), so a burst of
    load from elsewhere on the machine hits them alike and the efficiency stays meaningful.
    """
    B, D, K = cfg.batch, cfg.D, cfg.K
    row: dict[str, Any] = {"backend": be.name, "T": T, "H": H, "B": B, "D": D, "K": K, "status": "ok"}
    cell = make_cell(cfg.cell, cfg.nonlinearity if cell_class(cfg.cell).takes_nonlinearity else None)
    if cfg.cell != cell_names()[0]:  # rows of the default cell keep their old columns
        row["cell"] = cfg.cell
    if cfg.precision != "fp32":  # as the cell: fp32 rows keep their old columns
        row["precision"] = cfg.precision
    arch = dict(num_layers=cfg.num_layers, dirs=cfg.dirs, cell=cell)
    row["flops"] = flops(T, B, D, H, K, tokens=cfg.tokens, **arch)
    row["flops_forward"] = flops(T, B, D, H, K, tokens=cfg.tokens, forward_only=True, **arch)
    try:
        x_host, y_host = _make_data(cfg, T, H)
        model = RNN(
            D, H, K, backend=be, dtype=cfg.dtype, seed=cfg.seed, num_layers=cfg.num_layers, bias=False,
            bidirectional=cfg.bidirectional, cell=cell, precision=cfg.precision,
        )  # fmt: skip
        x, y = be.asarray(x_host), be.asarray(y_host)
        timer = be.timer()
        fns = {
            "bptt": (lambda: model.loss_and_grads(x, y), timer),
            "forward": (lambda: model.loss(x, y), timer),
            **{k: (fn, timer) for k, fn in gemm_references(model.backend, T, B, H, K, cfg, cell.gates).items()},
        }
        times = time_interleaved(fns, warmup=cfg.warmup, repeats=cfg.repeats)
        if cfg.compare == "torch":
            # Timed in a block of its own: interleaved with NumPy calls on a small CPU, torch's OpenMP
            # threads and OpenBLAS's threads spin against each other and torch runs ~10x slower.
            _, grads = model.loss_and_grads(x, y)
            torch_facts, torch_fns = torch_reference(model, x, y, grads, cfg)
            torch_times = time_interleaved(torch_fns, warmup=cfg.warmup, repeats=cfg.repeats)
            times.update({f"torch_{k}": v for k, v in torch_times.items()})
        bptt, fwd = summarize(times["bptt"]), summarize(times["forward"])
        t = bptt["median_s"]
        rates, gemm_gflops = gemm_rate(times, T, B, H, K, row["flops"], recurrences=model.num_states, cell=cell)
        row.update(
            bptt=bptt,
            noisy=is_noisy(bptt),
            forward=fwd,
            tokens_per_s=T * B / t,
            us_per_step=t / T * 1e6,
            gflops=row["flops"] / t / 1e9,
            gflops_forward=row["flops_forward"] / fwd["median_s"] / 1e9,
            gemm={**rates, "gflops": gemm_gflops},
            efficiency=row["flops"] / t / 1e9 / gemm_gflops,
        )
        if cfg.compare == "torch":
            ref = {**torch_facts, "bptt": summarize(times["torch_bptt"]), "forward": summarize(times["torch_forward"])}
            ref["ratio"] = ref["bptt"]["median_s"] / t
            ref["ratio_forward"] = ref["forward"]["median_s"] / fwd["median_s"]
            ref["noisy"] = is_noisy(ref["bptt"])
            row["torch"] = ref
        elif cfg.compare == "naive":
            ref = naive_measure(model, x_host, y_host, cfg)
            ref["ratio"] = ref["bptt"]["median_s"] / t
            ref["noisy"] = is_noisy(ref["bptt"])
            row["naive"] = ref
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        row.update(status="out of memory", error=f"{type(exc).__name__}: {exc}")
    finally:
        gc.collect()
    return row


def _plan(cfg: BenchConfig) -> list[tuple[str, int, int]]:
    """(sweep, T, H) in run order: T at fixed H, then H at fixed T."""
    return [("T", T, cfg.fixed_H) for T in cfg.seq_lens] + [("H", cfg.fixed_T, H) for H in cfg.hidden_sizes]


def _resolve_backends(names: Sequence[str]) -> list[Backend]:
    out: list[Backend] = []
    for name in names:
        be = get_backend(name)
        if be not in out:
            out.append(be)
    return out


def _fits(rows: list[dict[str, Any]], backends: list[Backend], cfg: BenchConfig) -> list[dict[str, Any]]:
    """time ∝ size^exponent per backend, implementation and sweep; ``noisy_points`` counts the noisy timings
    among the ``points`` it rests on."""
    fits = []
    impls = ["gpubptt"] + ([cfg.compare] if cfg.compare != "none" else [])
    for be in backends:
        for sweep, size, fixed in (("T", "T", {"H": cfg.fixed_H}), ("H", "H", {"T": cfg.fixed_T})):
            sel = [r for r in rows if r["backend"] == be.name and r["sweep"] == sweep and r["status"] == "ok"]
            for impl in impls:
                pts = [(r[size], (r if impl == "gpubptt" else r.get(impl, {})).get("bptt")) for r in sel]
                pts = [(s, b["median_s"], is_noisy(b)) for s, b in pts if b]
                fits.append(
                    {
                        "backend": be.name,
                        "impl": impl,
                        "sweep": sweep,
                        "fixed": fixed,
                        "exponent": fit_exponent([s for s, _, _ in pts], [t for _, t, _ in pts]),
                        "points": len(pts),
                        "noisy_points": sum(noisy for _, _, noisy in pts),
                    }
                )
    return fits


def run_bench(
    cfg: BenchConfig, *, progress: Callable[[str, int, int], None] | None = None, argv: Sequence[str] | None = None
) -> dict[str, Any]:
    """Run both sweeps on every backend of ``cfg``; returns the versioned result dict (schema SCHEMA).

    ``progress(description, done, total)`` is called before each configuration and once at the end.
    Raises BackendUnavailableError (before any work) if a requested backend cannot run here.
    """
    backends = _resolve_backends(cfg.backends)
    load_start = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    notes: list[str] = []
    if cfg.compare == "torch":
        reason = torch_unavailable_reason()
        if reason:
            notes.append(f"--compare torch skipped: {reason}")
            cfg = BenchConfig(**{**asdict(cfg), "compare": "none"})
    plan = _plan(cfg)
    total = len(plan) * len(backends)
    rows: list[dict[str, Any]] = []
    done = 0
    for be in backends:
        cache: dict[tuple[int, int], dict[str, Any]] = {}
        for sweep, T, H in plan:
            if progress:
                progress(f"{be.name} T={T} H={H}", done, total)
            if (T, H) not in cache:  # the (fixed T, fixed H) point sits in both sweeps: measure once
                cache[(T, H)] = _measure(be, cfg, T, H)
            rows.append({"sweep": sweep, **cache[(T, H)]})
            done += 1
    if progress:
        progress("done", done, total)
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": list(argv) if argv is not None else None,
        "config": asdict(cfg),
        "environment": {**environment(backends), "load_average_at_start": load_start},
        "flop_model": {  # the one-layer Elman cell's; every row's "flops" is gpubptt.bench.flops for its own model
            "applies_to": "cell 'rnn', one layer, one direction; other cells and stacks: gpubptt.bench.flops",
            "tokens": "6*B*H*T*(H+K)",
            "dense": "2*B*H*T*(2*D+3*H+3*K)",
            "tokens_forward": "2*B*H*T*(H+K)",
            "dense_forward": "2*B*H*T*(D+H+K)",
            "gemm_reference": "the sequential products (Cell.sequential_flops_per_step: 4*B*G*H^2 per step) at the "
            "rate of T x (B,H)x(H,G*H) GEMMs, the rest at one (T*B,H)x(H,K)",
        },
        "notes": notes,
        "noisy_spread": NOISY_SPREAD,
        "rows": rows,
        "fits": _fits(rows, backends, cfg),
    }
