"""The cell contract holds: a toy cell defined here, in the test file, and registered, runs through train →
checkpoint → resume → sample → vanish → bench → memory estimate → recompute → two fake ranks, with its
gradients checked against central differences. Nothing outside ``gpubptt.cells.register_cell`` learns of it.

The toy is a leaky accumulator with no recurrent weight:

    s_t = λ s_{t−1} + tanh(U x_t + b)       ∂s_t/∂s_{t−1} = λ I       (λ a fixed option, 1/2 here)

so its gradient-flow table has a closed form: the Jacobian product over a lag ℓ has norm λ^ℓ.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
import pytest

import gpubptt
from gpubptt.bench import BenchConfig, run_bench
from gpubptt.cells import Cell, register_cell
from gpubptt.diagnostics import gated
from gpubptt.distributed import DataParallel, run_ranks
from gpubptt.engine.memory import train_memory
from gpubptt.errors import InputError
from gpubptt.training.loop import train
from gpubptt.training.run import new_run, resume_run, save_run
from gpubptt.training.sample import sample_text
from tests.reference import central_differences


@register_cell
class LeakyCell(Cell):
    """s_t = λ s_{t−1} + tanh(pre_t); parameters U (H, D) and, with biases, b (H,)."""

    option = "toy-leaky"
    extra_state = False

    def __init__(self, lam: float = 0.5) -> None:
        self.lam = float(lam)

    def options(self) -> dict[str, Any]:
        return {"lam": self.lam}

    @classmethod
    def from_options(cls, nonlinearity: str | None = None, **options: Any) -> LeakyCell:
        if nonlinearity is not None:
            raise InputError("the toy cell takes no nonlinearity")
        return cls(**options)

    def param_shapes(self, D: int, H: int, bias: bool) -> dict[str, tuple[int, ...]]:
        return {"U": (H, D), **({"b": (H,)} if bias else {})}

    def buffers(self, T: int, B: int, H: int, *, xp: Any, dtype: Any) -> dict[str, Any]:
        return {"A": xp.empty((T, B, H), dtype=dtype)}  # tanh(pre_t), for the backward

    def run_forward(self, pre, p, S, aux, *, be, scratch, step_kernels) -> None:
        xp, A = be.xp, aux["A"]
        for t in range(pre.shape[0]):
            xp.tanh(pre[t], out=A[t])
            xp.multiply(S[t], self.lam, out=S[t + 1])
            S[t + 1] += A[t]

    def run_backward(self, G, p, S, aux, *, be, work, scratch, step_kernels, truncate, lanes, grads, ds0):
        xp, T = be.xp, G.shape[0]
        if truncate is None:
            for t in range(T - 2, -1, -1):
                xp.multiply(G[t + 1], self.lam, out=scratch)
                G[t] += scratch  # ds_t = g_t + λ ds_{t+1}
        else:  # E_{t+d} reaches step t for d ≤ truncate only
            g = G.copy()
            for t in range(T):
                G[t] = sum(self.lam**d * g[t + d] for d in range(min(truncate, T - 1 - t) + 1))
        ds0[...] = self.lam * G[0] if T else 0
        A = aux["A"][:T]
        xp.multiply(A, A, out=work)
        xp.subtract(1, work, out=work)
        work *= G  # ∂E/∂pre_t = ds_t ⊙ tanh', in the engine's buffer (no allocation)
        return work

    def step_jacobian(self, p, S, aux) -> np.ndarray:
        T, B, H = S.shape[0] - 1, S.shape[1], S.shape[2]
        return np.broadcast_to(self.lam * np.eye(H), (T, B, H, H)).copy()

    def flops_per_step(self, B: int, D: int, H: int, *, backward: bool) -> int:
        return 2 * B * H * D  # U x forward, dU backward: no recurrent product


CELL = LeakyCell.option
SETTINGS = {"cell": CELL, "hidden": 8, "batch": 4, "chunk": 8, "dtype": "float64", "task": "text"}


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-300))


def test_toy_cell_gradients_match_central_differences():
    rng = np.random.default_rng(0)
    D, H, K, T, B = 4, 3, 4, 5, 2
    model = gpubptt.RNN(D, H, K, cell=CELL, backend="numpy", dtype="float64", bias=True, seed=0)
    x, y = rng.normal(size=(T, B, D)), rng.integers(0, K, (T, B))
    s0, lengths = rng.normal(size=(B, H)), np.array([T, 3])
    _, grads = model.loss_and_grads(x, y, s0, lengths=lengths)
    want = central_differences(model, x, y, s0, lengths)
    for name in model.params:
        assert _rel(grads[name], want[name]) <= 1e-7, name


def test_toy_cell_trains_checkpoints_resumes_and_samples_as_one_run(tmp_path):
    straight = new_run(SETTINGS, backend="numpy", steps=6, eval_every=3)
    train(straight.model, straight.data, straight.optimizer, straight.config, state=straight.state,
          history=straight.history)  # fmt: skip
    first = new_run(SETTINGS, backend="numpy", steps=3, eval_every=3)
    train(first.model, first.data, first.optimizer, first.config, state=first.state, history=first.history)
    path = save_run(tmp_path / "toy.npz", first)
    resumed = resume_run(path, backend="numpy", steps=6, eval_every=3)
    assert resumed.model.cell == LeakyCell(0.5) and resumed.model.config == straight.model.config
    train(resumed.model, resumed.data, resumed.optimizer, resumed.config, state=resumed.state,
          history=resumed.history)  # fmt: skip
    for k in straight.model.params:
        assert _rel(resumed.model.params[k], straight.model.params[k]) <= 1e-12, k
    text = sample_text(resumed.model, resumed.data.vocab, length=20, seed=1)
    assert len(text) == 20 and set(text) <= set(resumed.data.vocab.chars)


def test_toy_cell_vanish_table_has_its_closed_form_rate():
    (flow,) = gated.compare_cells([CELL], 10, 4, 3, 5, seed=0)
    assert flow.cell == CELL
    assert flow.decay_rate == pytest.approx(0.5, rel=1e-9)  # ‖(λI)^ℓ‖ = λ^ℓ
    assert flow.horizon == 10  # 0.5^10 < 1e-3 ≤ 0.5^9


def test_toy_cell_bench_counts_its_own_flops():
    cfg = BenchConfig(backends=["numpy"], seq_lens=[4], hidden_sizes=[6], batch=2, D=5, K=5, warmup=0, repeats=1,
                      fixed_T=4, fixed_H=6, cell=CELL)  # fmt: skip
    (row, *_) = run_bench(cfg)["rows"]
    assert row["status"] == "ok" and row["cell"] == CELL
    T, B, H, K = 4, 2, 6, 5
    assert row["flops"] == 3 * 2 * B * T * H * K  # token inputs: no U GEMM, no recurrent product; the output layer


@pytest.mark.parametrize("recompute", [None, 2])
def test_toy_cell_memory_estimate_is_within_10_percent_of_the_traced_peak(recompute):
    rng = np.random.default_rng(1)
    T, B, D, H, K = 256, 8, 16, 64, 16
    model = gpubptt.RNN(D, H, K, cell=CELL, backend="numpy", seed=0)
    x, y = rng.integers(0, D, (T, B)), rng.integers(0, K, (T, B))
    model.loss_and_grads(x[:4], y[:4], recompute=recompute)  # lazy imports inside NumPy, not the call's memory
    est = model.memory_estimate(T, B, recompute=recompute).total
    fresh = gpubptt.RNN.from_params(model.params, backend="numpy", cell=model.cell)
    tracemalloc.start()
    try:
        fresh.loss_and_grads(x, y, recompute=recompute)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert abs(est - peak) <= 0.10 * peak, (est, peak)
    training = train_memory(D, H, K, T=T, B=B, itemsize=4, slots=2, cell=model.cell)
    P = H * D + H + K * H + K  # U, b, V, c: the toy has no recurrent weight
    assert training.parts["parameters, gradients and optimizer state"] == P * 4 * (2 + 2)  # float32 w, g, Adam


def test_toy_cell_recomputes_and_splits_over_two_fake_ranks_as_one_process():
    rng = np.random.default_rng(2)
    T, B, D, H, K = 9, 4, 5, 6, 5
    x, y = rng.integers(0, D, (T, B)), rng.integers(0, K, (T, B))
    lengths = np.array([T, 7, 4, 1])
    ref = gpubptt.RNN(D, H, K, cell=CELL, backend="numpy", dtype="float64", bias=True, seed=3)
    loss, grads = ref.loss_and_grads(x, y, lengths=lengths)
    loss_r, grads_r = ref.loss_and_grads(x, y, lengths=lengths, recompute=3)
    assert _rel(loss_r, loss) <= 1e-12 and all(_rel(grads_r[k], grads[k]) <= 1e-12 for k in grads)

    def work(comm):
        model = gpubptt.RNN(D, H, K, cell=CELL, backend="numpy", dtype="float64", bias=True, seed=3 + comm.rank)
        dp = DataParallel(model, comm, batch_size=B)
        lo, hi = dp.lo, dp.hi
        return dp.loss_and_grads(x[:, lo:hi], y[:, lo:hi], lengths=lengths[lo:hi])

    for loss_k, grads_k in run_ranks(2, work):
        assert _rel(loss_k, loss) <= 1e-12
        for k in ref.params:
            assert _rel(grads_k[k], grads[k]) <= 1e-12, k
