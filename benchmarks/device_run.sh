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
    # Three pytest processes in parallel (mostly Triton compiles, on 16 cores): the kernel file in two
    # halves, the TensorRT-plugin file.
    half="jit_kernel or wide_heads or aot_launch_is_bit_identical_to_jit_in_every_layout or fused_vae"
    python3 -m pytest -q -p no:warnings tests/test_kernel_gpu.py -k "$half" "$@" > "$out/gpu_kernel_a.txt" 2>&1 &
    a=$!
    python3 -m pytest -q -p no:warnings tests/test_kernel_gpu.py -k "not ($half)" "$@" > "$out/gpu_kernel_b.txt" 2>&1 &
    b=$!
    python3 -m pytest -q -p no:warnings tests/test_trt_plugin.py "$@" > "$out/gpu_trt.txt" 2>&1 &
    t=$!
    wait $a || rc=1
    wait $b || rc=1
    wait $t || rc=1
    parts=("$out/gpu_kernel_a.txt" "$out/gpu_kernel_b.txt" "$out/gpu_trt.txt")
    cat "${parts[@]}" > "$out/gpu_tests_$commit.txt" && rm "${parts[@]}"
    echo "tests: ${SECONDS} s"
    grep -E "passed|failed|FAILED|Error" "$out/gpu_tests_$commit.txt" | tail -30
fi
if [ "$what" != tests ]; then
    budget=${BUDGET_S:-420}
    if [ -n "${CALL_LIMIT_S:-}" ]; then  # what the call has left, less a margin for the last row
        budget=$(( CALL_LIMIT_S - SECONDS - 60 ))
    fi
    echo "benchmark budget: ${budget} s"
    CONVATTN_COMMIT=$commit python3 benchmarks/attention.py --out "$out" --budget-s "$budget" 2>&1 | tail -40
    CONVATTN_COMMIT=$commit python3 benchmarks/profile_block.py --out "$out" > /dev/null 2>&1 || echo "profile failed"
fi
exit "$rc"
