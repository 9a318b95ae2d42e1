#!/usr/bin/env bash
# One GPU opportunity (issue 23), in two parts of at most 6.5 and 8.5 minutes (each step has its own timeout, so a
# hang costs that step only, and each part stays under 10 minutes), on a machine whose python3 has CuPy and torch
# (CUDA). Everything lands in $OUT:
#   part 1: env.txt                    nvidia-smi, versions
#           pytest-gpu.txt             python3 -m pytest -m gpu -rs (CuPy against NumPy, tf32/bf16 against their
#                                      emulation, side streams against the sequential schedule)
#           perf-cupy.json/.txt        benchmarks/perf_grid.py rows 0,1,5,6 (T=32 H=128 latency row, H=256, H=512,
#                                      H=1024), fp32
#           perf-gated-cupy.json       benchmarks/perf_gated.py rows 0,2 (GRU H=256, H=1024), fp32
#   part 2: bi-grid[-streams].json     the deep grid's 2-layer bidirectional row, and
#           bi-gated[-streams].json    perf_gated.py rows 8,9 (GRU, LSTM, 2 layers bidirectional), with the directions
#                                      in turn and on two CUDA streams (--streams: backend.concurrent, off by default)
#           relu-STEP.json             perf_grid rows 0,1 (H=128, where W fits on chip, and H=256, where it does not)
#                                      as relu cells, --step-kernels auto, fused, persistent (relu's fused and
#                                      persistent forward kernels are off under auto until timed)
#           perf[-gated]-cupy-P.json   the grids of part 1 for P = tf32 (torch: allow_tf32 for matmul and cuDNN) and
#                                      bf16 (torch: bf16 autocast)
# Usage: PYTHONPATH=. bash benchmarks/gpu_check.sh [1|2]            (one part, or both; results in $OUT, or a new
#                                                                 temporary folder when unset)
#        PYTHONPATH=. bash benchmarks/gpu_check.sh --dry-run [1|2]  (no GPU: the same commands on NumPy, one row, one
#                                                                 repeat, and pytest --collect-only, but the
#                                                                 --streams runs, which are CuPy's alone: checks
#                                                                 the arguments)
set -uo pipefail
DRY=0
[ "${1:-}" = "--dry-run" ] && { DRY=1; shift; }
PART="${1:-all}"
case "$PART" in 1 | 2 | all) ;; *) PART=bad ;; esac
if [ "$PART" = bad ] || [ $# -gt 1 ]; then echo "usage: gpu_check.sh [--dry-run] [1|2]" >&2; exit 2; fi
OUT="${OUT:-$(mktemp -d -t gpubptt-gpu-check-XXXX)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
status=0

step() {  # step SECONDS LOGNAME command...: run one step under a timeout, its output kept in $OUT/LOGNAME
    local limit=$1 log=$2
    shift 2
    echo "== $*" | tee -a "$OUT/$log" >&2
    timeout "$limit" "$@" >>"$OUT/$log" 2>&1
    local rc=$?
    [ $rc -ne 0 ] && { echo "   exit $rc (see $OUT/$log)" >&2; status=1; }
    tail -n 3 "$OUT/$log" >&2
}

if [ $DRY -eq 1 ]; then
    BACKEND=numpy GRID_ROWS=0 GATED_ROWS=0 BI_GATED_ROWS=8 RELU_ROWS=0 REPEATS=(--repeats 1 --warmup 0)
else
    BACKEND=cupy GRID_ROWS=0,1,5,6 GATED_ROWS=0,2 BI_GATED_ROWS=8,9 RELU_ROWS=0,1 REPEATS=(--repeats 5 --warmup 2)
fi

grids() {  # grids PRECISION: the single-layer rows and the gated ones, against torch at the matching setting
    step 50 "grid-$1.log" "$PY" benchmarks/perf_grid.py "$OUT" --backend $BACKEND --precision "$1" --rows $GRID_ROWS \
        "${REPEATS[@]}"
    step 40 "gated-$1.log" "$PY" benchmarks/perf_gated.py "$OUT" --backend $BACKEND --precision "$1" \
        --rows $GATED_ROWS "${REPEATS[@]}"
}

if [ "$PART" != 2 ]; then  # part 1: the tests, then fp32 (≤ 390 s with the env step's timeouts)
    if [ $DRY -eq 1 ]; then
        step 120 pytest-gpu.txt "$PY" -m pytest -q -m gpu --collect-only tests
    else
        { timeout 30 nvidia-smi; timeout 60 "$PY" -c "import cupy, numpy, torch, gpubptt; print('cupy', \
cupy.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__, 'gpubptt', gpubptt.__version__)"; } \
            >"$OUT/env.txt" 2>&1
        step 210 pytest-gpu.txt "$PY" -m pytest -q -m gpu -rs tests
    fi
    grids fp32
fi
if [ "$PART" != 1 ]; then  # part 2: the schedules not yet timed, then tf32 and bf16 (≤ 495 s)
    for S in "" --streams; do  # --streams is CuPy's alone: the dry run checks the rows in turn only
        [ $DRY -eq 1 ] && [ -n "$S" ] && continue
        step 45 "bi${S:+-streams}.log" "$PY" benchmarks/perf_grid.py --backend $BACKEND --grid deep --rows 2 $S \
            --output "$OUT/bi-grid${S:+-streams}.json" "${REPEATS[@]}"
        step 45 "bi${S:+-streams}.log" "$PY" benchmarks/perf_gated.py --backend $BACKEND --rows $BI_GATED_ROWS $S \
            --output "$OUT/bi-gated${S:+-streams}.json" "${REPEATS[@]}"
    done
    for K in auto fused persistent; do  # on NumPy the choice changes nothing: the dry run checks the arguments
        step 45 "relu.log" "$PY" benchmarks/perf_grid.py --backend $BACKEND --rows $RELU_ROWS --nonlinearity relu \
            --step-kernels $K --output "$OUT/relu-$K.json" "${REPEATS[@]}"
    done
    grids tf32
    grids bf16
fi
echo "results in $OUT" >&2
exit $status
