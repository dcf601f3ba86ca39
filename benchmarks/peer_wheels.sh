#!/usr/bin/env bash
# flash-attn-4 and its CuTe DSL for the device machine (no package index there), in two device calls:
# one carries more than 64 MiB at most (the device tool's limit), and nvidia-cutlass-dsl-libs-cu13 alone is
# 92 MB, so it travels split in two parts.
#
#   bash benchmarks/peer_wheels.sh download     # here: .peer-wheels/{a,b}/ (ignored by git)
#   bash benchmarks/peer_wheels.sh stage        # device call 1, carry [".peer-wheels/a"]: parts to /tmp/peer-parts
#   bash benchmarks/peer_wheels.sh install      # device call 2 (at once: the machine goes back after 30 s idle),
#                                               # carry [".peer-wheels/b"]: join, pip install --target /tmp/peers
# The benchmark then calls site.addsitedir("/tmp/peers") (the DSL finds `cutlass` through a .pth file,
# which PYTHONPATH does not read). Versions: issue 24 (tried on the H200), the device's Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
        nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2
        torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5)
BIG=nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
case "${1:-}" in
download)
    rm -rf .peer-wheels && mkdir -p .peer-wheels/a .peer-wheels/b .peer-wheels/all
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        -d .peer-wheels/all "${WHEELS[@]}"
    split -b 46m -d ".peer-wheels/all/$BIG" ".peer-wheels/a/$BIG.part"  # part00, part01
    mv ".peer-wheels/a/$BIG.part01" .peer-wheels/b/
    find .peer-wheels/all -name '*.whl' ! -name "$BIG" -exec mv {} .peer-wheels/b/ \;
    (cd .peer-wheels/all && sha256sum "$BIG") > .peer-wheels/b/SHA256
    rm -rf .peer-wheels/all
    du -sh .peer-wheels/a .peer-wheels/b
    ;;
stage)
    mkdir -p /tmp/peer-parts && cp .peer-wheels/a/* /tmp/peer-parts/ && ls -la /tmp/peer-parts
    ;;
install)
    [ -f "/tmp/peer-parts/$BIG.part00" ] || { echo "no first part on this machine: run 'stage' first (same warm machine)" >&2; exit 1; }
    mkdir -p /tmp/peer-wheels && cp .peer-wheels/b/*.whl /tmp/peer-wheels/
    cat "/tmp/peer-parts/$BIG.part00" ".peer-wheels/b/$BIG.part01" > "/tmp/peer-wheels/$BIG"
    (cd /tmp/peer-wheels && sha256sum -c "$OLDPWD/.peer-wheels/b/SHA256")
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peers /tmp/peer-wheels/*.whl
    python3 -c "import site; site.addsitedir('/tmp/peers'); import flash_attn.cute.interface as f; print('flash-attn-4 ok', f.__file__)"
    ;;
*)
    echo "usage: bash benchmarks/peer_wheels.sh download|stage|install" >&2; exit 2
    ;;
esac
