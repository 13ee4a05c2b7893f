#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in ONE call of at most
# 8 minutes, from the repository root on the GPU machine (CuPy, PyTorch,
# pytest and hypothesis; ncu and compute-sanitizer where the image has them;
# no package index). The package is used from the checkout (PYTHONPATH).
#
#   bash benchmarks/gpu_session.sh          # every step, in turn
#   bash benchmarks/gpu_session.sh plan     # the steps and their time budgets
#   bash benchmarks/gpu_session.sh check-pytest-log FILE
#                                           # exit 1 unless a GPU test passed in FILE
#   bash benchmarks/gpu_session.sh list-gpu-tests
#   bash benchmarks/gpu_session.sh commands  # each benchmark step's command line
#
# The steps, each under its own timeout, all within SESSION_S seconds (a
# step gets what is left when earlier ones overran):
#   describe       the card, the driver, CuPy, PyTorch and the tools present
#   pytest-cuda    pytest -m cuda over every test file holding GPU tests; the
#                  session FAILS LOUDLY when none of them passed (all skipped)
#   memcheck       the kernel tests again under compute-sanitizer --tool memcheck,
#                  with CuPy's memory pool off so that each array is its own
#                  allocation (skipped, and said so, without compute-sanitizer)
#   launches       kernel launches per epoch: ncu over 5 epochs drawn between
#                  cudaProfilerStart/Stop (bench_gpu.py --profile-epochs); without
#                  ncu, torch.profiler (CUPTI) and CudaBackend.launch_count
#                  (bench_gpu.py --launch-probe), and the summary says which
#   bench-gpu      bench_gpu.py (full sizes, a shorter budget per case)
#   bench-crop     bench_crop.py --gpu-only (full sizes, no CPU half)
#   bench-filters  bench_filters.py --gpu-only (the 10000x6760 image, no CPU half)
#   bench-access   bench_access.py --quick --gpu-only (get_patch_spec on backend="cuda")
#   bench-memory   bench_memory.py --quick --gpu-only (device memory per region)
#   bench-stores   bench_stores.py --quick --gpu-only (PatchLoader device_output=True)
#   bench-careamics bench_careamics.py --quick --gpu-only (CAREamist.train on the GPU)
#
# The benchmark steps are every script in benchmarks/ with a GPU row (the ones
# that ask the harness for a device, usable_cupy); tests/test_bench_gpu.py
# checks that none is left out and that each command line parses. bench_cpu
# has no device path and measures the CPU only. The GPU-only runs of the last
# four use their --quick sizes, so that every step fits the session.
#
# Results: $OUT (the folder the device tool brings back, at most 8 files) gets
# summary.txt (one line per step, and the launch count), session.tar.gz
# (every log, the device's description and every markdown result), and
# copies of pytest-cuda.log and the GPU results (gpu-<card>.md,
# crop-gpu-<card>.md, filters-gpu.md); access-gpu.md, memory-gpu.md,
# stores-gpu.md and careamics-train-gpu.md are in session.tar.gz. Without $OUT: /tmp/gpu-session.
# The committed benchmarks/results/*.md are not touched except gpu-<card>.md.
# Exit status: 0 when every step passed, 1 otherwise.

set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-session}

# The whole session's seconds: the device call is at most 8 minutes (480 s);
# the rest is kept for timeout's grace and the packing at the end.
SESSION_S=450
# Each step's budget in seconds (the plan adds up to SESSION_S).
STEPS=(describe pytest-cuda memcheck launches bench-gpu bench-crop bench-filters
    bench-access bench-memory bench-stores bench-careamics)
declare -A BUDGET=(
    [describe]=20
    [pytest-cuda]=90
    [memcheck]=40
    [launches]=35
    [bench-gpu]=95
    [bench-crop]=30
    [bench-filters]=40
    [bench-access]=20
    [bench-memory]=20
    [bench-stores]=25
    [bench-careamics]=35
)
# Seconds timeout waits after TERM before it kills a step.
GRACE_S=3
# Epochs that ncu (or torch.profiler) counts.
PROFILED_EPOCHS=5
# The kernel tests that memcheck runs (they launch our own kernels).
SANITIZED_TESTS=(tests/test_cuda.py tests/test_crop_cuda.py)
# The benchmark steps, in the order they run.
BENCH_STEPS=(bench-gpu bench-crop bench-filters bench-access bench-memory bench-stores
    bench-careamics)

# bench_args NAME SECONDS LOGS: set BENCH_ARGS to the benchmark step NAME's
# command line (after "$PY"), for a step of SECONDS with its logs in LOGS.
bench_args() {
    case $1 in
        # The script's own budget: the step's, less 15 s for its start and report.
        bench-gpu) BENCH_ARGS=(benchmarks/bench_gpu.py --no-torch-profile
            --time-budget "$(($2 - 15))" --epoch-budget 1.5 --write-results) ;;
        # The GPU halves only, at full size (the CPU halves are recorded from
        # CPU machines); crop-gpu-<card>.md goes beside crop-cpu.md.
        bench-crop) BENCH_ARGS=(benchmarks/bench_crop.py --gpu-only --output "$3/crop-cpu.md") ;;
        bench-filters) BENCH_ARGS=(benchmarks/bench_filters.py --gpu-only
            --output "$3/filters-gpu.md") ;;
        # Their GPU rows alone, at --quick sizes (their CPU rows come from CPU machines).
        bench-access) BENCH_ARGS=(benchmarks/bench_access.py --quick --gpu-only
            --output "$3/access-gpu.md") ;;
        bench-memory) BENCH_ARGS=(benchmarks/bench_memory.py --quick --gpu-only
            --output "$3/memory-gpu.md") ;;
        bench-stores) BENCH_ARGS=(benchmarks/bench_stores.py --quick --gpu-only --seconds 2
            --output "$3/stores-gpu.md") ;;
        bench-careamics) BENCH_ARGS=(benchmarks/bench_careamics.py --quick --gpu-only
            --output "$3/careamics-train-gpu.md") ;;
        *) return 1 ;;
    esac
}

commands() {  # each benchmark step's command line, at its full budget
    for name in "${BENCH_STEPS[@]}"; do
        bench_args "$name" "${BUDGET[$name]}" "$OUT/logs"
        printf '%s: %s\n' "$name" "${BENCH_ARGS[*]}"
    done
}

plan() {
    local total=0
    for name in "${STEPS[@]}"; do
        printf '%-16s %4d s\n' "$name" "${BUDGET[$name]}"
        total=$((total + BUDGET[$name]))
    done
    printf '%-16s %4d s (of %d s for the session)\n' total "$total" "$SESSION_S"
    printf '%-16s %4d s (after TERM, before KILL, per step)\n' grace "$GRACE_S"
}

list_gpu_tests() {  # the test files that mark tests cuda (a decorator or pytestmark)
    grep -l -E '^[[:space:]]*@pytest\.mark\.cuda\b|^pytestmark[[:space:]]*=.*pytest\.mark\.cuda\b' \
        tests/test_*.py
}

# check_pytest_log FILE: 0 when FILE's pytest summary says a test passed;
# otherwise a loud line and 1 (every GPU test skipped, or none ran). The
# summary is pytest's last line, "[=== ]N passed, M skipped, ... in T s[ ===]"
# or "no tests ran ...", not any line that mentions a count.
check_pytest_log() {
    local log=$1 last
    last=$(grep -E '^(=+ )?([0-9]+ [a-z]+(, )?)+ in [0-9.]+s|^(=+ )?no tests ran' "$log" | tail -n 1)
    if grep -qE '(^|[^0-9])[1-9][0-9]* passed' <<<"$last"; then
        echo "ok      GPU tests ran: $last"
        return 0
    fi
    echo "FAILED: no GPU test passed: every GPU test skipped or none ran (${last:-no pytest summary}; see $log)"
    return 1
}

case "${1:-all}" in
    plan)
        plan
        exit 0
        ;;
    list-gpu-tests)
        list_gpu_tests
        exit 0
        ;;
    commands)
        commands
        exit 0
        ;;
    check-pytest-log)
        check_pytest_log "${2:?usage: gpu_session.sh check-pytest-log FILE}"
        exit $?
        ;;
    all) ;;
    *)
        echo "usage: bash benchmarks/gpu_session.sh [plan|list-gpu-tests|commands|check-pytest-log FILE]" >&2
        exit 2
        ;;
esac

LOGS="$OUT/logs"
mkdir -p "$LOGS"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
STARTED="$LOGS/started"
touch "$STARTED"
DEADLINE=$((SECONDS + SESSION_S))
status=0

note() {  # a line of the summary, printed too
    echo "$1" | tee -a "$SUMMARY"
}

# step NAME COMMAND...: run under NAME's budget (or what is left of the
# session), log to $LOGS/NAME.log, write the outcome to the summary.
step() {
    local name=$1
    shift
    local left=$((DEADLINE - SECONDS))
    local limit=${BUDGET[$name]}
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 5 ]; then
        note "FAILED  $name: not run, the session's $SESSION_S s are spent"
        status=1
        return 1
    fi
    local started=$SECONDS
    timeout --kill-after="$GRACE_S" "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local code=$?
    local seconds=$((SECONDS - started))
    if [ "$code" -eq 0 ]; then
        note "ok      $name (${seconds} s of ${limit} s)"
    elif [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; then
        note "FAILED  $name: TIMED OUT after ${limit} s (see logs/$name.log)"
        status=1
    else
        note "FAILED  $name (exit $code after ${seconds} s; see logs/$name.log)"
        status=1
    fi
    tail -n 3 "$LOGS/$name.log"
    return "$code"
}

describe() {
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    "$PY" -c 'import cupy, numpy, sys
print("python", sys.version.split()[0], "numpy", numpy.__version__, "cupy", cupy.__version__)
print("device:", cupy.cuda.runtime.getDeviceProperties(0)["name"])'
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
    for tool in ncu compute-sanitizer nvcc; do
        echo "$tool: $(command -v "$tool" || echo absent)"
    done
}

# Runs pytest with CuPy's memory pool off, so that memcheck sees every array
# as its own allocation (an overrun inside a pooled block goes unseen).
POOL_OFF='import sys, cupy, pytest
cupy.cuda.set_allocator(None)
cupy.cuda.set_pinned_memory_allocator(None)
sys.exit(pytest.main(sys.argv[1:]))'

run_memcheck() {
    if ! command -v compute-sanitizer >/dev/null; then
        note "skipped memcheck: compute-sanitizer is not on PATH"
        return
    fi
    step memcheck compute-sanitizer --tool memcheck --error-exitcode 86 \
        "$PY" -c "$POOL_OFF" -m cuda -q -x -p no:cacheprovider "${SANITIZED_TESTS[@]}"
}

run_launch_count() {
    if command -v ncu >/dev/null; then
        # --profile-from-start off: only the epochs between cudaProfilerStart and
        # Stop; one metric keeps each kernel to one replay pass.
        if step launches ncu --profile-from-start off --clock-control none --csv \
            --metrics gpu__time_duration.sum \
            "$PY" benchmarks/bench_gpu.py --profile-epochs "$PROFILED_EPOCHS"; then
            local counted
            if counted=$("$PY" benchmarks/bench_gpu.py --count-ncu "$LOGS/launches.log" 2>&1); then
                note "launches per epoch counted with ncu: $counted"
            else
                note "FAILED  launches: ncu's log could not be read: $(tail -n 1 <<<"$counted")"
                status=1
            fi
        fi
    else
        note "no ncu on PATH: launches counted with torch.profiler (CUPTI) and CudaBackend.launch_count instead"
        if step launches "$PY" benchmarks/bench_gpu.py --launch-probe; then
            note "launches per epoch (torch.profiler): $(tail -n 1 "$LOGS/launches.log")"
        fi
    fi
}

pack() {  # everything into one archive; the most useful files beside it
    # Only the reports this session wrote, not ones committed before it.
    find benchmarks/results -maxdepth 1 -name 'gpu-*.md' -newer "$STARTED" -exec cp {} "$LOGS/" \;
    tar -czf "$OUT/session.tar.gz" -C "$OUT" logs
    for file in "$LOGS"/pytest-cuda.log "$LOGS"/gpu-*.md "$LOGS"/crop-gpu-*.md "$LOGS"/filters-gpu.md; do
        [ -f "$file" ] && cp "$file" "$OUT/"
    done
    rm -rf "$LOGS"
}

echo "GPU session: at most $SESSION_S s; logs in $LOGS"
export PY
export -f describe
step describe bash -c describe

gpu_ok=1
timeout 30 "$PY" -c 'import sys
from gpu_patching.testing import usable_cupy
cupy, why = usable_cupy()
sys.exit(0 if cupy is not None else (print(why) or 1))' >"$LOGS/usable-gpu.log" 2>&1 || gpu_ok=0
if [ "$gpu_ok" -eq 0 ]; then
    note "FAILED  no usable GPU here: $(tail -n 1 "$LOGS/usable-gpu.log")"
    status=1
fi

mapfile -t GPU_TESTS < <(list_gpu_tests)
# A module that fails to import there (a missing package) must not stop the others.
step pytest-cuda "$PY" -m pytest -m cuda -q -p no:cacheprovider --continue-on-collection-errors \
    "${GPU_TESTS[@]}"
if ! check_pytest_log "$LOGS/pytest-cuda.log" | tee -a "$SUMMARY"; then
    status=1
fi

if [ "$gpu_ok" -eq 1 ]; then
    run_memcheck
    run_launch_count
    for name in "${BENCH_STEPS[@]}"; do
        # What the step will get: its budget, or what is left of the session.
        budget=${BUDGET[$name]}
        if [ $((DEADLINE - SECONDS)) -lt "$budget" ]; then budget=$((DEADLINE - SECONDS)); fi
        bench_args "$name" "$budget" "$LOGS"
        step "$name" "$PY" "${BENCH_ARGS[@]}"
    done
else
    note "skipped memcheck, launches and the benchmarks: no usable GPU"
fi

if [ "$status" -eq 0 ]; then
    note "GPU session: every step passed"
else
    note "GPU SESSION FAILED: see the FAILED lines above"
fi
pack
exit "$status"
