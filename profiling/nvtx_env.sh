# Sourced by the profiling scripts (bash): ensure_nvtx PYTHON makes the nvtx package
# importable for PYTHON, installing the wheels carried in .whl/ (a lent GPU machine has no
# package registry) into /tmp/site and putting that on PYTHONPATH when it is not already
# importable. Exit status 0 when nvtx imports; without it cugrad emits no NVTX ranges, so
# ncu's --nvtx-include matches no kernel and nsys's NVTX summaries come out empty.
ensure_nvtx() {
    local py=$1
    "$py" -c 'import nvtx' >/dev/null 2>&1 && return 0
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl \
            && export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/site
    fi
    "$py" -c 'import nvtx' >/dev/null 2>&1
}
