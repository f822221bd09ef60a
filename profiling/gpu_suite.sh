#!/usr/bin/env bash
# The GPU test suite, the demo on the GPU and compute-sanitizer, in one go, for a lent GPU
# machine (no package registry: the image's python3 with CuPy, PyTorch, pytest, hypothesis,
# pytest-xdist; the nvtx package travels as a wheel in .whl/ when present).
#
#   OUT=/some/dir profiling/gpu_suite.sh [steps...]     steps: env warm suite demo bench plans
#                                                              memcheck racecheck initcheck
#                                                              synccheck
#
# warm: every kernel module compiled once, WARM_JOBS processes at once (default 12), into
# CuPy's disk cache, so the suite's workers load them instead of each compiling them again.
# bench: the benchmark suite (python -m cugrad bench, BENCH_SECONDS of figures, default 200;
# BENCH_ARGS adds options, e.g. --quick); plans: its GEMM tile / split-K sweep (--gemm-plans).
#
# Writes one log per step under $OUT and prints a short summary last. Every step runs even
# when an earlier one failed; the exit status is 1 if any step did (the summary names them),
# 2 for an unknown step (checked before anything runs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cugrad-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export CUGRAD_POISON_OUTPUTS=1
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(env warm suite demo memcheck racecheck)
SUMMARY=()
FAILED=()
for step in "${STEPS[@]}"; do
    case $step in
    env|warm|suite|demo|bench|plans|memcheck|racecheck|initcheck|synccheck) ;;
    *) echo "unknown step $step (steps: env warm suite demo bench plans memcheck racecheck initcheck synccheck)" >&2; exit 2 ;;
    esac
done

source profiling/nvtx_env.sh
ensure_nvtx "$PY" || echo "gpu_suite.sh: the nvtx package is not importable (no wheel in .whl/?): no NVTX ranges; the NVTX tests skip" >&2

# One summary line per step; a non-zero exit status marks the step failed.
record() {
    local step=$1 rc=$2; shift 2
    SUMMARY+=("$step: rc=$rc; $*")
    [ "$rc" -eq 0 ] || FAILED+=("$step")
}

# The GPU tests under compute-sanitizer, which follows every process (SAN_WORKERS sets
# pytest-xdist workers; one log per process, concatenated). SAN_M selects them (pytest -m,
# default "gpu and not slow": the slow ones, a soak and tests past 2^31 elements of up to
# ~37 GB, would outlast SAN_TIMEOUT alone under a sanitizer), SAN_K narrows them (pytest -k);
# the sanitizers run several times slower than the suite.
sanitize() {
    local tool=$1; shift
    mkdir -p "$OUT/san"
    timeout "${SAN_TIMEOUT:-240}" compute-sanitizer --tool "$tool" "$@" \
        --error-exitcode 86 --log-file "$OUT/san/$tool.%p.log" \
        $PY -m pytest -q -p no:cacheprovider -m "${SAN_M:-gpu and not slow}" ${SAN_WORKERS:+-n "$SAN_WORKERS"} \
        ${SAN_K:+-k "$SAN_K"} tests > "$OUT/$tool.pytest.log" 2>&1
    local rc=$?
    cat "$OUT"/san/"$tool".*.log > "$OUT/$tool.sanitizer.log" && rm -f "$OUT"/san/"$tool".*.log
    record "$tool" "$rc" "$(tail -1 "$OUT/$tool.pytest.log"); sanitizer: $(grep -E 'ERROR SUMMARY' "$OUT/$tool.sanitizer.log" | sort | uniq -c | tr '\n' ' ')"
}

# "N figures: met 3, missed 2, report 9, ..." from a bench JSON; the log's last line (the
# bench's own reason) when it wrote none.
bench_counts() {
    [ -f "$1" ] || { tail -1 "$2"; return; }
    $PY -c 'import collections, json, sys
from cugrad.bench import figure_status
figs = json.load(open(sys.argv[1]))["figures"]
c = collections.Counter(figure_status(f) for f in figs)
print(len(figs), "figures:", ", ".join(f"{k} {v}" for k, v in sorted(c.items())))' "$1" 2>&1 | tail -1
}

for step in "${STEPS[@]}"; do
    case $step in
    env)
        {
            date -u +%Y-%m-%dT%H:%M:%SZ
            nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
            nvcc --version | tail -2
            compute-sanitizer --version | tail -1
            ncu --version | tail -1
            $PY -c 'import sys, numpy, cupy, torch; print("python", sys.version.split()[0], "numpy", numpy.__version__, "cupy", cupy.__version__, "torch", torch.__version__, "cuda runtime", cupy.cuda.runtime.runtimeGetVersion())'
            $PY -c 'import nvtx; print("nvtx", nvtx.__file__)' 2>&1 | tail -1
            $PY -m cugrad info
        } > "$OUT/env.txt" 2>&1
        record env $? "$(sed -n 3p "$OUT/env.txt")"
        ;;
    warm)
        timeout 300 $PY -m cugrad compile --jobs "${WARM_JOBS:-12}" > "$OUT/warm.log" 2>&1
        record warm $? "$(tail -1 "$OUT/warm.log")"
        ;;
    suite)
        timeout "${SUITE_TIMEOUT:-300}" $PY -m pytest -q -n "${WORKERS:-12}" -p no:cacheprovider \
            ${SUITE_M:+-m "$SUITE_M"} --junitxml "$OUT/suite.xml" tests > "$OUT/suite.log" 2>&1
        record suite $? "$(tail -1 "$OUT/suite.log")"
        ;;
    demo)
        timeout 120 $PY -m cugrad demo --device cuda > "$OUT/demo.log" 2>&1
        record demo $? "$(tail -2 "$OUT/demo.log" | tr '\n' ' ')"
        ;;
    bench)
        timeout $(( ${BENCH_SECONDS:-200} + 120 )) $PY -m cugrad bench --max-seconds "${BENCH_SECONDS:-200}" \
            ${BENCH_ARGS:-} --out "$OUT/bench.json" > "$OUT/bench.log" 2>&1
        record bench $? "$(bench_counts "$OUT/bench.json" "$OUT/bench.log")"
        ;;
    plans)
        timeout 300 $PY -m cugrad bench --gemm-plans --only gemm_plan --max-seconds 180 \
            --out "$OUT/gemm-plans.json" > "$OUT/gemm-plans.log" 2>&1
        record plans $? "$(bench_counts "$OUT/gemm-plans.json" "$OUT/gemm-plans.log")"
        ;;
    memcheck)  sanitize memcheck ;;
    racecheck) sanitize racecheck --racecheck-report all ;;
    initcheck) sanitize initcheck ;;
    synccheck) sanitize synccheck ;;
    esac
    echo "== ${SUMMARY[-1]}"
done
echo
echo "== summary"
printf '%s\n' "${SUMMARY[@]}"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "== failed: ${FAILED[*]}"
    exit 1
fi
