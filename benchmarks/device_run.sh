#!/usr/bin/env bash
# One device-tool call: the GPU tests, then the whole-block benchmark, results under $OUT.
#   bash benchmarks/device_run.sh [tests|bench|all] [extra pytest args...]
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
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
rc=0
if [ "$what" != bench ]; then
    python3 -m pytest -q -p no:warnings tests/test_kernel_gpu.py tests/test_trt_plugin.py "$@" 2>&1 \
        | tee "$out/gpu_tests_$commit.txt" | tail -30
    rc=${PIPESTATUS[0]}
fi
if [ "$what" != tests ]; then
    CONVATTN_COMMIT=$commit python3 benchmarks/attention.py --out "$out" --budget-s "${BUDGET_S:-420}" 2>&1 | tail -40
fi
exit "$rc"
