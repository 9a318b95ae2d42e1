"""Long sequences: time and peak memory of forward+BPTT against T, every state stored or recomputed.

    >>> result = long_sweep(get_backend("numpy"), [1024, 4096], policies=["none", "sqrt"])  # doctest: +SKIP
    >>> result["rows"][0]  # {"policy", "T", "seconds", "peak_bytes", "estimate_bytes", ...}

Peak memory is measured, not estimated: tracemalloc on NumPy (every host allocation of one call on a
fresh model), CuPy's pool allocations counted by a memory hook on a GPU (``Backend.peak_bytes``).
A stored run whose estimate exceeds ``stored_limit`` bytes is skipped (and says so). ``longest_T``
gives, from the estimate (checked against measured peaks in the tests), the longest T that fits a
budget under each policy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import Backend
from ..engine.memory import format_bytes, is_out_of_memory
from ..model import RNN
from ..plots import new_figure, save_png

__all__ = ["POLICIES", "long_sweep", "longest_T", "render_long"]

POLICIES = ("none", "sqrt")


def _policy(name: str) -> str | None:
    return None if name == "none" else name


def longest_T(model: Any, B: int, budget: int, policy: str | None) -> int:
    """The longest T whose ``memory_estimate`` (tokens, no lengths) plus the inputs x, y ((T, B) int64 each)
    fits ``budget`` bytes (0: none)."""
    fits = lambda T: model.memory_estimate(T, B, recompute=policy).total + 16 * T * B <= budget  # noqa: E731
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 50:
            return lo
    while hi - lo > 1:  # the estimate grows with T under both policies: bisect
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _measure(be: Backend, model: Any, x: Any, policy: str | None, *, y: Any = None) -> tuple[float, int]:
    """(seconds, peak bytes) of loss_and_grads(x, y (default x)): timed on ``model`` (its workspace warm),
    the peak traced on a fresh copy (tracemalloc's bookkeeping stays out of the time)."""
    y = x if y is None else y
    timer = be.timer()
    seconds = timer(lambda: model.loss_and_grads(x, y, recompute=policy))
    fresh = model.to(be)  # the same cell, layers and nonlinearity, no warm workspace
    return seconds, be.peak_bytes(lambda: fresh.loss_and_grads(x, y, recompute=policy))


def long_sweep(
    be: Backend,
    Ts: list[int],
    *,
    policies: list[str],
    B: int = 8,
    H: int = 256,
    vocab: int = 64,
    dtype: str = "float32",
    stored_limit: int | None = None,
    budget: int = 8 << 30,
    seed: int = 0,
    progress: Any = None,
    cell: str = "rnn",
    num_layers: int = 1,
    nonlinearity: str | None = None,
) -> dict[str, Any]:
    """Time and peak memory of one forward+BPTT (tokens, D = K = ``vocab``) for each T and policy.

    The model: ``cell`` ("rnn" or any cell that recomputes: no state beside s), ``num_layers``, and
    ``nonlinearity`` (rnn only; None: tanh), one direction (``recompute.unsupported_reason``).
    Returns {"config", "rows": [{policy, T, seconds, peak_bytes, estimate_bytes} or {..., "skipped"}],
    "longest_T": {policy: T that fits ``budget``}}. Tokens come from ``default_rng(seed)``.
    """
    model = RNN(
        vocab, H, vocab, backend=be, dtype=dtype, seed=seed, cell=cell, num_layers=num_layers, bias=False,
        nonlinearity=nonlinearity,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    rows = []
    warm = be.asarray(rng.integers(0, vocab, size=(16, B)))
    for name in policies:  # kernel choices and lazy imports happen here, outside the measurements
        model.loss_and_grads(warm, warm, recompute=_policy(name))
    for T in Ts:
        try:
            x = be.asarray(rng.integers(0, vocab, size=(T, B)))
        except Exception as exc:  # the inputs themselves do not fit: every policy of this T is skipped
            if not is_out_of_memory(exc):
                raise
            x, why = None, f"out of memory for the (T, B) inputs ({type(exc).__name__}: {exc})"
        for name in policies:
            policy = _policy(name)
            est = model.memory_estimate(T, B, recompute=policy).total
            row: dict[str, Any] = {"policy": name, "T": T, "estimate_bytes": est}
            if x is None:
                row["skipped"] = why
            elif policy is None and stored_limit is not None and est > stored_limit:
                row["skipped"] = f"the stored path needs about {format_bytes(est)} > {format_bytes(stored_limit)}"
            else:
                try:
                    row["seconds"], row["peak_bytes"] = _measure(be, model, x, policy)
                except Exception as exc:  # this run did not fit: say so, keep what was measured, go on
                    if not is_out_of_memory(exc):
                        raise
                    row["skipped"] = f"out of memory ({type(exc).__name__}: {exc})"
            rows.append(row)
            if progress:
                progress(row)
    longest = {name: longest_T(model, B, budget, _policy(name)) for name in policies}
    config = {"backend": be.name, "device": be.device, "B": B, "H": H, "D": vocab, "K": vocab, "dtype": dtype}
    config.update(cell=cell, num_layers=num_layers, nonlinearity=model.nonlinearity)
    return {"config": config, "rows": rows, "longest_T": longest, "budget_bytes": budget}


def render_long(result: dict[str, Any]) -> str:
    """One line per (T, policy): time, µs per step, measured peak and the estimate; then the longest T per budget."""
    lines = []
    for r in result["rows"]:
        head = f"T={r['T']:<8} {r['policy']:<5}"
        if "skipped" in r:
            lines.append(f"{head} skipped: {r['skipped']}")
            continue
        us = 1e6 * r["seconds"] / r["T"]
        lines.append(
            f"{head} {r['seconds']:9.3f} s  {us:8.1f} µs/step  peak {format_bytes(r['peak_bytes']):>9}"
            f"  (estimate {format_bytes(r['estimate_bytes'])})"
        )
    b = f"{result['budget_bytes'] / 2**30:g} GiB (with the inputs)"
    lines += [f"longest T in {b}: {p} {t:,}" for p, t in result["longest_T"].items()]
    return "\n".join(lines) + "\n"


def plot_long(result: dict[str, Any], path: Any) -> None:
    """Two log-log panels: seconds against T and peak bytes against T, one line per policy."""
    fig = new_figure(figsize=(10, 4))
    ax_t, ax_m = fig.subplots(1, 2)
    for name in dict.fromkeys(r["policy"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["policy"] == name and "skipped" not in r]
        Ts = [r["T"] for r in rows]
        ax_t.loglog(Ts, [r["seconds"] for r in rows], "o-", label=name)
        ax_m.loglog(Ts, [r["peak_bytes"] for r in rows], "o-", label=name)
    c = result["config"]
    ax_t.set(xlabel="T", ylabel="seconds per forward+BPTT", title=f"time (B={c['B']}, H={c['H']}, {c['backend']})")
    ax_m.set(xlabel="T", ylabel="peak bytes", title="peak memory (measured)")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(title="recompute")
    save_png(fig, path)
