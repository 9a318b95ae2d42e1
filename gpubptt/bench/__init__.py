"""Benchmarks: how forward+BPTT cost grows with sequence length T and hidden size H.

Two sweeps per backend: T at a fixed H, and H at a fixed T. Every configuration is timed honestly
(warm-up runs first, each timed run synchronised with the device, data built once from a fixed seed
outside the timed region) and reported as median (the headline), min, IQR and the raw times.

A timing whose spread IQR/median exceeds ``timing.NOISY_SPREAD`` (10 %) is flagged ``noisy``: its median is not a
reliable figure, and neither is an exponent fitted through it (each fit counts its noisy points).

FLOP model (multiply-adds count 2; elementwise work — tanh, exp, the gather and scatter-add of
token inputs — is not counted). With N = T·B rows:

    forward       input projection  (N, D)×(D, H)        2·N·D·H      (0 for one-hot tokens: a gather)
                  recurrence        T × (B, H)×(H, H)    2·N·H²
                  logits            (N, H)×(H, K)        2·N·H·K
    backward      ∂E/∂s = do @ V    (N, K)×(K, H)        2·N·H·K
                  dV = doᵀ s        (K, N)×(N, H)        2·N·H·K
                  δ_{t+1} @ W       T × (B, H)×(H, H)    2·N·H²
                  dW = δᵀ s         (H, N)×(N, H)        2·N·H²
                  dU = δᵀ x         (H, N)×(N, D)        2·N·H·D      (0 for tokens: a scatter-add)

    forward+BPTT  dense: 2·B·H·T·(2D + 3H + 3K)      tokens: 6·B·H·T·(H + K)
    forward       dense: 2·B·H·T·(D + H + K)         tokens: 2·B·H·T·(H + K)

Efficiency is measured against the GEMM rate of the same shapes, in the same run, on the same
backend and dtype: the two sequential products (4·B·H²·T FLOPs) are charged at the rate of T
back-to-back (B, H)×(H, H) GEMMs, everything else at the rate of one (T·B, H)×(H, K) GEMM (the
output layer as one product). ``gemm_gflops`` is the FLOP-weighted harmonic mean of the two, i.e.
the rate a perfect implementation would reach if every FLOP ran at the speed of a GEMM of its own
shape; ``efficiency = gflops / gemm_gflops``.

    >>> cfg = BenchConfig(backends=["numpy"], seq_lens=[4, 8], hidden_sizes=[8, 16], batch=2,
    ...                   D=5, K=5, warmup=0, repeats=1)
    >>> result = run_bench(cfg)
    >>> result["schema"], len(result["rows"])
    ('gpubptt.bench/1', 4)

Schema ``gpubptt.bench/1``; fields added since it was first written, without a new tag (readers of older
results see them missing): ``spread`` in each timing summary, ``noisy`` in each row and reference,
``noisy_points`` in each fit, ``noisy_spread`` (the threshold) in the result.

Modules: ``runner`` (configuration, measuring, both sweeps, fits), ``flops`` (the FLOP model and the
GEMM rate), ``references`` (naive, PyTorch, GEMMs), ``render`` (CSV and the table); timing lives in
``gpubptt.timing``, the environment in ``gpubptt.environment``, the plot in ``gpubptt.plots``.
Nothing here prints: the command line renders the result.
"""

from __future__ import annotations

from ..plots import PLOT_HINT
from ..timing import NOISY_SPREAD, Timer, is_noisy, summarize, sync_timer, time_fn, time_interleaved
from .config import COMPARES, GRAD_TOL, INPUTS, BenchConfig
from .flops import fit_exponent, flops, gemm_rate
from .references import (
    NAIVE_EXAMPLES,
    NAIVE_REPEATS,
    TORCH_HINT,
    gemm_references,
    naive_loss_and_grads,
    torch_reference,
    torch_unavailable_reason,
)
from .render import CSV_COLUMNS, render, render_csv, render_table
from .runner import SCHEMA, run_bench

__all__ = [
    "COMPARES",
    "CSV_COLUMNS",
    "GRAD_TOL",
    "INPUTS",
    "NAIVE_EXAMPLES",
    "NAIVE_REPEATS",
    "NOISY_SPREAD",
    "PLOT_HINT",
    "SCHEMA",
    "TORCH_HINT",
    "BenchConfig",
    "Timer",
    "fit_exponent",
    "flops",
    "gemm_rate",
    "gemm_references",
    "is_noisy",
    "naive_loss_and_grads",
    "render",
    "render_csv",
    "render_table",
    "run_bench",
    "summarize",
    "sync_timer",
    "time_fn",
    "time_interleaved",
    "torch_reference",
    "torch_unavailable_reason",
]
