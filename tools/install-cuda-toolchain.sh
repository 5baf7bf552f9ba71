#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, ptxas, headers) from PyPI into a cache venv
# outside the repository, and prints where nvcc is. Idempotent: a second run only checks.
#
#   UPX_CUDA_VENV   venv location (default: $HOME/.cache/upx/cuda-13.0)
#
# Why 13.0: the GPU machines run driver 580 (CUDA 13.0), which cannot JIT newer PTX.
set -euo pipefail

venv="${UPX_CUDA_VENV:-$HOME/.cache/upx/cuda-13.0}"
pins=("nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-runtime==13.0.*"
      "nvidia-nvvm==13.0.*" "nvidia-cuda-cccl==13.0.*")

find_nvcc() {
    local hit
    for hit in "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc; do
        [ -x "$hit" ] && { echo "$hit"; return 0; }
    done
    return 1
}

if nvcc=$(find_nvcc) && "$nvcc" --version 2>/dev/null | grep -q "release 13.0"; then
    echo "$nvcc"
    exit 0
fi

python=${PYTHON:-python3}
command -v "$python" >/dev/null || { echo "error: $python not found; install Python 3 first" >&2; exit 1; }
echo "installing CUDA 13.0 nvcc from PyPI into $venv (about 270 MB)" >&2
mkdir -p "$(dirname "$venv")"
[ -x "$venv/bin/pip" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}" >&2
nvcc=$(find_nvcc) || { echo "error: nvcc missing after install under $venv" >&2; exit 1; }
"$nvcc" --version | grep -q "release 13.0" || { echo "error: $nvcc is not CUDA 13.0" >&2; exit 1; }
echo "$nvcc"
