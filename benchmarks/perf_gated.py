"""GRU and LSTM forward+BPTT side by side with PyTorch's nn.GRU / nn.LSTM + Linear, on one backend.

The rows of issue 11: (T=64, B=32, D=128, H=256, K=256) and the perf grid's largest configuration
(T=16, B=128, D=512, H=1024, K=1024), each with 1 and 2 layers, for both cells. Each row:
gpubptt's ``loss_and_grads`` and torch's ``nn.GRU``/``nn.LSTM(bias=False) + Linear(bias=False) +
cross_entropy(sum)`` forward+backward on the same weights and data (the gradients are checked to
agree first), float32, timed interleaved: each round runs gpubptt once and torch once, with a pause
between the two libraries so neither one's idle worker threads slow the other. Median of the rounds;
the ratio is gpubptt's median over torch's, from the same run.

    python benchmarks/perf_gated.py --backend numpy --output benchmarks/perf-cpu-gated.json
    python benchmarks/perf_gated.py --backend cupy --output benchmarks/perf-gpu-gated.json

Prints one line per row; writes JSON with every raw time.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np

import gpubptt

# (cell, T, B, D, H, K, num_layers)
ROWS = [
    (cell, *shape, layers)
    for cell in ("gru", "lstm")
    for shape in ((64, 32, 128, 256, 256), (16, 128, 512, 1024, 1024))
    for layers in (1, 2)
]
PAUSE_S = 0.2


def torch_side(model, x, y, grads):
    """nn.GRU / nn.LSTM + Linear on the model's weights, on its device: (fwd_bwd, sync, max rel grad err)."""
    import torch
    import torch.nn.functional as F

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    T, B = y.shape
    D, H, K = model.input_size, model.hidden_size, model.output_size
    module = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[model.cell_name]
    U = torch.from_dlpack(model.params["U"])
    rnn = module(D, H, num_layers=model.num_layers, bias=False).to(device=U.device, dtype=torch.float32)
    lin = torch.nn.Linear(H, K, bias=False).to(device=U.device, dtype=torch.float32)
    sd, lsd = model.to_torch()
    rnn.load_state_dict({k: torch.as_tensor(v).to(U.device) for k, v in sd.items()})
    lin.load_state_dict({k: torch.as_tensor(v).to(U.device) for k, v in lsd.items()})
    xt, yt = torch.from_dlpack(x), torch.from_dlpack(y).reshape(-1).long()
    sync = torch.cuda.synchronize if U.device.type == "cuda" else (lambda: None)

    def fwd_bwd() -> None:
        rnn.zero_grad(set_to_none=True)
        lin.zero_grad(set_to_none=True)
        out, _ = rnn(xt)
        F.cross_entropy(lin(out).reshape(T * B, K), yt, reduction="sum").backward()

    fwd_bwd()
    g_rnn, _ = model.to_torch(grads=grads)
    err = 0.0
    for name, p in rnn.named_parameters():
        ref = p.grad.detach().cpu().numpy()
        err = max(err, float(np.abs(g_rnn[name] - ref).max() / (np.abs(ref).max() + 1e-30)))
    return fwd_bwd, sync, err


def measure(be, cell, T, B, D, H, K, layers, args) -> dict:
    rng = np.random.default_rng(0)
    model = gpubptt.RNN(D, H, K, cell=cell, num_layers=layers, backend=be, seed=0, init="torch", bias=False)
    x = be.asarray(rng.normal(size=(T, B, D)).astype(np.float32))
    y = be.asarray(rng.integers(0, K, (T, B)))
    _, grads = model.loss_and_grads(x, y)
    torch_fn, sync, err = torch_side(model, x, y, grads)

    def ours() -> None:
        model.loss_and_grads(x, y)
        be.synchronize()

    def theirs() -> None:
        torch_fn()
        sync()

    for _ in range(args.warmup):
        ours()
        theirs()
    times = {"gpubptt": [], "torch": []}
    for _ in range(args.repeats):
        for name, fn in (("gpubptt", ours), ("torch", theirs)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            time.sleep(PAUSE_S)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return dict(cell=cell, T=T, B=B, D=D, H=H, K=K, num_layers=layers, times_s=times, median_s=med,
                ratio_vs_torch=med["gpubptt"] / med["torch"], max_rel_grad_err=err)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rows", default="all", help="'all', or indices into the rows, comma-separated (0-7)")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    try:
        import torch
    except ImportError as exc:
        print(f"this benchmark compares with torch, which is not installed ({exc})", file=sys.stderr)
        return 1
    be = gpubptt.get_backend(args.backend)
    rows = ROWS if args.rows == "all" else [ROWS[int(i)] for i in args.rows.split(",")]
    out = []
    for cell, T, B, D, H, K, layers in rows:
        row = measure(be, cell, T, B, D, H, K, layers, args)
        out.append(row)
        med = row["median_s"]
        print(
            f"{cell:>4} L={layers} T={T:<3} B={B:<3} D={D:<3} H={H:<4} K={K:<4}  gpubptt {med['gpubptt'] * 1e3:8.2f} ms"
            f"  torch {med['torch'] * 1e3:8.2f} ms  ratio {row['ratio_vs_torch']:.2f}"
            f"  (grads agree to {row['max_rel_grad_err']:.1e})",
            flush=True,
        )
    if args.output:
        env = {"gpubptt": gpubptt.__version__, "numpy": np.__version__, "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
               "machine": platform.machine(), "backend": be.name, "device": be.device}  # fmt: skip
        with open(args.output, "w") as f:
            json.dump({"benchmark": "perf_gated", "environment": env, "rows": out}, f, indent=1)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
