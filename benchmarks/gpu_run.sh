#!/usr/bin/env bash
# One device lease's worth of GPU checks: the suite on CUDA, then the benchmark, each time-boxed so that
# the results come back inside one 10-minute command. Run from the repository root on the GPU machine,
# with Liger Kernel and Cut Cross-Entropy wheels in .whl/ (benchmarks/RESULTS.md says how):
#
#     bash benchmarks/gpu_run.sh [TEST_SECONDS] [BENCH_SECONDS] [BENCH_ARGS...]
#
# XENT_GPU_TESTS (default: tests) picks the test paths; 0 seconds skips a part.
# Writes tests.log, bench.md and env.txt under $OUT (or ./gpu-out when OUT is unset).
set -u
out=${OUT:-gpu-out}
mkdir -p "$out"
test_s=${1:-180}
bench_s=${2:-200}
shift 2 2>/dev/null || shift $#
bench_args=${*:---quick --only ce,linear}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit
fi
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c \
    'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } >"$out/env.txt" 2>&1
cat "$out/env.txt"
# The tests: CPU and CUDA parametrisations, in parallel workers (xdist ships with the image). Failures are
# also written as they happen (conftest.py, XENT_FAILURE_LOG), in case the time box cuts the run short.
if [ "$test_s" -gt 0 ]; then
    XENT_FAILURE_LOG="$out/failures.log" timeout "$test_s" python3 -m pytest -q -p no:cacheprovider -n 14 \
        --tb=short --durations=15 ${XENT_GPU_TESTS:-tests} >"$out/tests.log" 2>&1
    echo "tests rc=$?"
    tail -n 25 "$out/tests.log"
fi
if [ "$bench_s" -gt 0 ]; then
    # shellcheck disable=SC2086
    timeout "$bench_s" python3 benchmarks/bench_cuda.py $bench_args --out "$out/bench.md" 2>&1 | tail -n 5
    echo "bench rc=${PIPESTATUS[0]}"
fi
