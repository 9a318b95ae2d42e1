#!/usr/bin/env bash
# The GPU side of data parallelism, on a machine whose python3 has CuPy (mpi4py may be absent):
#   1. the NCCL communicator at size 1 (unique id drawn locally, no MPI): allreduce/broadcast of CuPy buffers,
#      and DataParallel training over it equal to plain training on the GPU;
#   2. the cost of staging through pinned host memory (what MPI without CUDA-awareness does per allreduce):
#      device → pinned host → device, against buffer size, beside NCCL's size-1 allreduce.
# Usage: PYTHONPATH=. bash benchmarks/gpu_distributed_check.sh      (JSON in $OUT, or benchmarks/ when unset)
set -euo pipefail
OUT="${OUT:-benchmarks}"
mkdir -p "$OUT"
timeout 110 python3 - "$OUT/gpu-distributed.json" <<'PY'
import json, sys, time
import numpy as np
import cupy, cupyx
from gpubptt.distributed import DataParallel
from gpubptt.distributed.nccl import NCCLCommunicator
from gpubptt.training.run import new_run
from gpubptt.training.loop import train

out = {"device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "cupy": cupy.__version__}
comm = NCCLCommunicator()  # size 1: no MPI
x = cupy.arange(1000, dtype=cupy.float64)
y = x.copy(); comm.allreduce(y); comm.broadcast(y)
h = np.arange(5.0); comm.allreduce(h)
out["nccl_size1_ok"] = bool((y == x).all()) and bool((h == np.arange(5.0)).all())

def trained(dp):
    run = new_run({"hidden": 64, "batch": 8, "chunk": 32, "dtype": "float64"}, backend="cupy", steps=30, eval_every=10)
    model, data, config = run.model, run.data, run.config
    kw = {}
    if dp:
        d = DataParallel(run.model, comm, batch_size=8, check_every=5)
        model, data, config, kw = d, d.shard_data(run.data), d.local_config(run.config), {"evaluator": d.evaluate}
    train(model, data, run.optimizer, config, **kw)
    return {k: cupy.asnumpy(v) for k, v in run.model.params.items()}

a, b = trained(False), trained(True)
out["nccl_size1_training_max_rel_diff"] = max(float(np.abs(a[k] - b[k]).max() / np.abs(a[k]).max()) for k in a)

def timed(fn, reps):
    fn(); cupy.cuda.Device().synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    cupy.cuda.Device().synchronize()
    return (time.perf_counter() - t) / reps

rows = []
for k in range(10, 29, 2):
    n = 2**k  # float32 elements
    dev = cupy.ones(n, dtype=cupy.float32)
    pinned = cupyx.empty_pinned((n,), dtype=np.float32)
    reps = max(5, min(200, 2**26 // n))
    def stage():
        dev.get(out=pinned)
        dev.set(pinned)
    rows.append({"bytes": 4 * n, "staged_roundtrip_s": timed(stage, reps), "nccl_size1_allreduce_s": timed(lambda: comm.allreduce(dev), reps)})
    r = rows[-1]
    print(f"{4*n:>12,} B  staged {r['staged_roundtrip_s']*1e6:9.1f} µs ({2*4*n/r['staged_roundtrip_s']/1e9:5.1f} GB/s)  nccl(1) {r['nccl_size1_allreduce_s']*1e6:8.1f} µs", file=sys.stderr)
out["staging"] = rows
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps({k: v for k, v in out.items() if k != "staging"}))
PY
