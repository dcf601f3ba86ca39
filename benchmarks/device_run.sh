#!/usr/bin/env bash
# One device-tool call: the GPU tests, then the whole-block benchmark, results under $OUT.
#   bash benchmarks/device_run.sh [tests|bench|all] [extra pytest args...]
# Env: CONVATTN_COMMIT (the commit measured), BUDGET_S (benchmark seconds) or CALL_LIMIT_S (the
# call's limit: the benchmark gets what the tests left of it).
# Needs, carried from the workstation: .trt-wheels (the TensorRT bindings the plugin tests run) and
# .whl/ (onnx_graphsurgeon, onnxruntime_extensions for the device's Python; see benchmarks/README.md).
set -uo pipefail
what=${1:-all}
shift || true
out=${OUT:-/tmp/out}
mkdir -p "$out"
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
mkdir -p /tmp/pp && ln -sfn "$PWD" /tmp/pp/convattn  # the repository root is the package
export PYTHONPATH=/tmp/pp${PYTHONPATH:+:$PYTHONPATH}
commit=${CONVATTN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}  # the device's .git may be stale
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
rc=0
if [ "$what" != bench ]; then
    # The two files in parallel: mostly Triton compiles, on 16 cores (about half the time of one run).
    python3 -m pytest -q -p no:warnings tests/test_kernel_gpu.py "$@" > "$out/gpu_kernel.txt" 2>&1 &
    kernel=$!
    python3 -m pytest -q -p no:warnings tests/test_trt_plugin.py "$@" > "$out/gpu_trt.txt" 2>&1 &
    trt=$!
    wait $kernel || rc=1
    wait $trt || rc=1
    cat "$out/gpu_kernel.txt" "$out/gpu_trt.txt" > "$out/gpu_tests_$commit.txt" && rm "$out/gpu_kernel.txt" "$out/gpu_trt.txt"
    grep -E "passed|failed|FAILED|Error" "$out/gpu_tests_$commit.txt" | tail -30
fi
if [ "$what" != tests ]; then
    budget=${BUDGET_S:-420}
    if [ -n "${CALL_LIMIT_S:-}" ]; then  # what the call has left, less a margin for the last row
        budget=$(( CALL_LIMIT_S - SECONDS - 60 ))
    fi
    echo "benchmark budget: ${budget} s"
    CONVATTN_COMMIT=$commit python3 benchmarks/attention.py --out "$out" --budget-s "$budget" 2>&1 | tail -40
fi
exit "$rc"
