#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in two calls of under ten
# minutes each, from the repository root on the GPU machine (which has CuPy,
# PyTorch, pytest, hypothesis and compute-sanitizer, and no package index):
#
#   bash benchmarks/gpu_session.sh tests   # the GPU tests, then again under memcheck
#   bash benchmarks/gpu_session.sh bench   # bench_gpu, bench_crop, bench_filters
#
# The package is used from the checkout (PYTHONPATH), not installed. The
# benchmarks write benchmarks/results/*-<card>.md and filters.md as usual;
# logs, the device's description and copies of the results go to $OUT (the
# folder the device tool brings back), or to /tmp/gpu-session without it.
# The last lines printed are a short summary. Exit status: 0 when every step
# passed.

set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"

# The test files that hold GPU tests (pytest -m cuda); naming them keeps
# collection away from modules whose optional imports the machine may lack.
GPU_TESTS=(tests/test_cuda.py tests/test_crop_cuda.py tests/test_loader.py tests/test_stats.py tests/test_policies.py)
# The kernels' own tests, run again under compute-sanitizer's memcheck.
SANITIZED_TESTS=(tests/test_cuda.py tests/test_crop_cuda.py)

summary=()
status=0

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, remember the outcome
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local code=$?
    local seconds=$((SECONDS - started))
    if [ "$code" -eq 0 ]; then
        summary+=("ok      $name (${seconds} s)")
    else
        summary+=("FAILED  $name (exit $code after ${seconds} s; see $OUT/$name.log)")
        status=1
    fi
    tail -n 3 "$OUT/$name.log"
}

describe_device() {
    {
        nvidia-smi -L 2>&1
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
            --format=csv 2>&1
        "$PY" -c 'import cupy, numpy, sys
print("python", sys.version.split()[0], "numpy", numpy.__version__, "cupy", cupy.__version__)
print("device:", cupy.cuda.runtime.getDeviceProperties(0)["name"])' 2>&1
        "$PY" -c 'import torch; print("torch", torch.__version__)' 2>&1
    } >"$OUT/device.txt"
    cat "$OUT/device.txt"
}

run_tests() {
    step pytest-cuda 420 "$PY" -m pytest -m cuda -q -p no:cacheprovider "${GPU_TESTS[@]}"
    if ! grep -q " passed" "$OUT/pytest-cuda.log"; then
        summary+=("FAILED  no GPU test passed: all skipped? (see $OUT/pytest-cuda.log)")
        status=1
    fi
    if command -v compute-sanitizer >/dev/null; then
        step memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 86 \
            "$PY" -m pytest -m cuda -q -x -p no:cacheprovider "${SANITIZED_TESTS[@]}"
    else
        summary+=("skipped memcheck (no compute-sanitizer on PATH)")
    fi
}

run_benchmarks() {
    step bench-gpu 300 "$PY" benchmarks/bench_gpu.py
    step bench-crop 150 "$PY" benchmarks/bench_crop.py
    step bench-filters 120 "$PY" benchmarks/bench_filters.py
    mkdir -p "$OUT/results"
    cp benchmarks/results/*.md "$OUT/results/" 2>/dev/null
}

case "${1:-}" in
    tests)
        describe_device
        run_tests
        ;;
    bench)
        describe_device
        run_benchmarks
        ;;
    *)
        echo "usage: bash benchmarks/gpu_session.sh tests|bench" >&2
        exit 2
        ;;
esac

echo
echo "summary (logs in $OUT):"
printf '  %s\n' "${summary[@]}"
exit "$status"
