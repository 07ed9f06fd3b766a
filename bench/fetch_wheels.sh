#!/usr/bin/env bash
# Download, here (with network), the pure-Python or manylinux wheels the offline GPU image lacks,
# into .whl/ (ignored by git), for `run(..., carry=[".whl"])`; bench/gpu_session.sh installs them
# into /tmp/site there. The image's Python is 3.12 (see /work/.library/device/KINDS.md).
#   liger-kernel: a peer in the LayerNorm/RMSNorm and GeGLU benchmarks (pure Python, on Triton)
#   nvtx:         NVTX domains, so the ranges land in the "dlh" domain that the ncu recipes name
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "liger-kernel${LIGER_VERSION:+==$LIGER_VERSION}" "nvtx${NVTX_VERSION:+==$NVTX_VERSION}"
ls -l .whl
