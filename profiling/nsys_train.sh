#!/usr/bin/env bash
# Nsight Systems timelines of profiling/train_mlp.py, GPU-filling and launch-bound.
#
#   profiling/nsys_train.sh [large|small ...]        (default: both)
#
# For each configuration, records the measured steps (cudaProfilerStart/Stop brackets
# them, so compilation and warm-up are left out) with CUDA and NVTX tracing, then prints
# nsys's summaries to $OUT_DIR/nsys_<config>_*.csv:
#   nvtx_sum           wall (CPU) time of each NVTX range: cugrad's ops and layers, "step"
#   nvtx_gpu_proj_sum  GPU time of the kernels launched inside each range, projected onto it
#   cuda_gpu_kern_sum  time per kernel name
#   cuda_api_sum       time in CUDA API calls (launches, synchronisation)
# and keeps $OUT_DIR/nsys_<config>.nsys-rep for the GUI.
#
# Environment: OUT_DIR (default profiling/results), STEPS (default 20), PYTHON, NSYS.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-profiling/results}
STEPS=${STEPS:-20}
PYTHON=${PYTHON:-python3}
NSYS=${NSYS:-nsys}
CONFIGS=("$@")
[ "${#CONFIGS[@]}" -gt 0 ] || CONFIGS=(large small)

command -v "$NSYS" >/dev/null || { echo "nsys_train.sh: '$NSYS' not found" >&2; exit 2; }
source profiling/nvtx_env.sh
ensure_nvtx "$PYTHON" || { echo "nsys_train.sh: the nvtx package is not importable for $PYTHON: cugrad would emit no NVTX ranges and the NVTX summaries would be empty (pip install nvtx, or carry its wheel in .whl/)" >&2; exit 2; }
mkdir -p "$OUT_DIR"
MISSING=0
for CONFIG in "${CONFIGS[@]}"; do
    REP="$OUT_DIR/nsys_$CONFIG"
    CMD=("$NSYS" profile -t cuda,nvtx --capture-range=cudaProfilerApi
         --capture-range-end=stop --force-overwrite=true -o "$REP"
         "$PYTHON" profiling/train_mlp.py --device cuda --config "$CONFIG" --steps "$STEPS")
    echo ">> ${CMD[*]}"
    "${CMD[@]}" || echo "nsys_train.sh: nsys exited $? for $CONFIG" >&2   # its report may still be there
    if [ ! -f "$REP.nsys-rep" ]; then
        echo "nsys_train.sh: nsys wrote no $REP.nsys-rep (see its output above)" >&2
        MISSING=$((MISSING + 1))
        continue
    fi
    for REPORT in nvtx_sum nvtx_gpu_proj_sum cuda_gpu_kern_sum cuda_api_sum; do
        "$NSYS" stats --force-export=true --report "$REPORT" --format csv \
            --output "${REP}" "$REP.nsys-rep" > /dev/null \
            || echo "nsys_train.sh: report $REPORT unavailable in this nsys" >&2
    done
    ls "${REP}"_*.csv 2>/dev/null || true
done
# Non-zero when a configuration produced no report (nsys may record nothing on some machines).
[ "$MISSING" -eq 0 ] || exit 1
