#!/usr/bin/env bash
# Nsight Compute on cugrad's kernels, selected by their NVTX ranges.
#
#   profiling/ncu_kernels.sh [RANGE ...]
#
# For each RANGE (default: the ones below), profiles the kernels launched inside the
# push/pop range RANGE of the NVTX domain "cugrad" during one measured training step of
# profiling/train_mlp.py, collecting throughput (Speed Of Light), occupancy, launch
# configuration and memory-workload sections, and writes under $OUT_DIR:
#   ncu_<range>.ncu-rep       the full report (open in ncu-ui, or ncu --import)
#   ncu_<range>.csv           one row per kernel: the key metrics, raw values
#   ncu_<range>.txt           ncu's details page (sections and rule advice)
#   summary.md                the CSVs in one table, and the command lines
#
# NVTX filter syntax (ncu --nvtx --nvtx-include): "domain@range" names a start/end range,
# a trailing "/" a push/pop range (cugrad and the nvtx package use push/pop); "A/B" is B
# directly inside A, "A/*/B" B anywhere inside A; "range]" restricts to the innermost
# (top of stack) range. "cugrad@linear.forward/" thus matches every kernel launched while
# linear.forward is on the cugrad push/pop stack, e.g. both layers' GEMMs.
#
# Environment: CONFIG (large|small, default large), OUT_DIR (default profiling/results),
# LAUNCH_COUNT (kernels per range, default 8), PYTHON (default python3), NCU (default ncu),
# EXTRA_NCU_ARGS (appended to the ncu command line).
set -euo pipefail

cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-large}
OUT_DIR=${OUT_DIR:-profiling/results}
LAUNCH_COUNT=${LAUNCH_COUNT:-8}
PYTHON=${PYTHON:-python3}
NCU=${NCU:-ncu}
if [ "$#" -gt 0 ]; then
    RANGES=("$@")
else
    RANGES=(linear.forward linear.backward.dX linear.backward.dW linear.backward.db
            relu relu.backward cross_entropy sgd_step)
fi

# Metrics for the per-kernel CSV; the sections below collect them (and more, for the
# report). Percentages are of the GPU's peak sustained rate.
METRICS=(
    gpu__time_duration.sum                                          # kernel duration
    sm__throughput.avg.pct_of_peak_sustained_elapsed                # compute SOL %
    gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed  # memory SOL %
    dram__throughput.avg.pct_of_peak_sustained_elapsed              # DRAM bandwidth %
    dram__bytes_read.sum
    dram__bytes_write.sum
    l1tex__t_sector_hit_rate.pct
    lts__t_sector_hit_rate.pct
    sm__warps_active.avg.pct_of_peak_sustained_active               # achieved occupancy
    sm__maximum_warps_per_active_cycle_pct                          # theoretical occupancy
    launch__grid_size
    launch__block_size
    launch__registers_per_thread
    launch__shared_mem_per_block_static
    launch__shared_mem_per_block_dynamic
    launch__waves_per_multiprocessor
)
METRIC_LIST=$(IFS=,; echo "${METRICS[*]}")

command -v "$NCU" >/dev/null || { echo "ncu_kernels.sh: '$NCU' not found (CUDA toolkit bin/)" >&2; exit 2; }
source profiling/nvtx_env.sh
ensure_nvtx "$PYTHON" || { echo "ncu_kernels.sh: the nvtx package is not importable for $PYTHON: cugrad would emit no NVTX ranges and --nvtx-include would match no kernel (pip install nvtx, or carry its wheel in .whl/)" >&2; exit 2; }
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.md"
{
    echo "# Nsight Compute: cugrad kernels by NVTX range"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%MZ); ncu: $("$NCU" --version | tail -1)"
    echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo unknown)"
    echo "- workload: \`$PYTHON profiling/train_mlp.py --device cuda --config $CONFIG --steps 1 --warmup 2\`"
    echo
} > "$SUMMARY"

EMPTY=0         # ranges where ncu profiled no kernel (or failed)
for RANGE in "${RANGES[@]}"; do
    NAME=${RANGE//[:\/]/_}
    REP="$OUT_DIR/ncu_$NAME"
    CMD=("$NCU" --nvtx --nvtx-include "cugrad@$RANGE/" --profile-from-start off
         --section SpeedOfLight --section Occupancy --section LaunchStats
         --section MemoryWorkloadAnalysis --metrics "$METRIC_LIST"
         --launch-count "$LAUNCH_COUNT" --force-overwrite --export "$REP"
         ${EXTRA_NCU_ARGS:-}
         "$PYTHON" profiling/train_mlp.py --device cuda --config "$CONFIG" --steps 1 --warmup 2)
    echo ">> ${CMD[*]}"
    rm -f "$REP.ncu-rep" "$REP.csv" "$REP.txt"    # an earlier run's report is not this one's
    STATUS=0
    "${CMD[@]}" > "$REP.log" 2>&1 || STATUS=$?
    # ncu exits 0 when no kernel matched, writing no report; non-zero when it failed (no
    # access to the counters: ERR_NVGPUCTRPERM). Either way: noted, and on to the next range.
    if [ "$STATUS" -ne 0 ] || [ ! -f "$REP.ncu-rep" ]; then
        echo "ncu profiled no kernel in cugrad@$RANGE/ (exit $STATUS), see $REP.log" >&2
        tail -5 "$REP.log" >&2
        printf '## `cugrad@%s/`: no kernel profiled (ncu exit %s)\n\n```\n%s\n```\n\n' \
            "$RANGE" "$STATUS" "$(grep -E '==(WARNING|ERROR)==' "$REP.log" | head -5 || true)" \
            >> "$SUMMARY"
        EMPTY=$((EMPTY + 1))
        continue
    fi
    "$NCU" --import "$REP.ncu-rep" --page raw --csv --metrics "$METRIC_LIST" > "$REP.csv"
    "$NCU" --import "$REP.ncu-rep" --page details > "$REP.txt"
    KERNELS=$(( $(wc -l < "$REP.csv") - 2 ))   # header and units rows
    {
        echo "## \`cugrad@$RANGE/\`: $KERNELS kernel(s)"
        echo
        echo "\`\`\`"
        echo "${CMD[*]}"
        echo "\`\`\`"
        echo
        "$PYTHON" - "$REP.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
if len(rows) < 3:
    print("(no kernel matched)\n"); sys.exit()
head, units, data = rows[0], rows[1], rows[2:]
want = {"Kernel Name": "kernel", "gpu__time_duration.sum": "time",
        "sm__throughput.avg.pct_of_peak_sustained_elapsed": "SM %",
        "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed": "mem %",
        "dram__throughput.avg.pct_of_peak_sustained_elapsed": "DRAM %",
        "sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy %",
        "sm__maximum_warps_per_active_cycle_pct": "theor. occ. %",
        "launch__registers_per_thread": "regs",
        "launch__grid_size": "grid", "launch__block_size": "block"}
cols = [(head.index(k), v, units[head.index(k)]) for k, v in want.items() if k in head]
print("| " + " | ".join(f"{v} ({u})" if u else v for _, v, u in cols) + " |")
print("|" + "---|" * len(cols))
for r in data:
    print("| " + " | ".join(r[i][:60] for i, _, _ in cols) + " |")
print()
PY
    } >> "$SUMMARY"
done
echo "wrote $SUMMARY"
# Non-zero when a range gave no report: a filter that matched nothing, or ncu without access
# to the performance counters (ERR_NVGPUCTRPERM in the range's log).
[ "$EMPTY" -eq 0 ] || { echo "ncu_kernels.sh: $EMPTY range(s) without a report" >&2; exit 1; }
