#!/usr/bin/env bash
# SASS instruction mix of every kernel, for the performance analysis that needs no GPU
# (docs/PERF.md): tensor-core MMAs, ldmatrix, cp.async, barriers, special-function ops, local
# memory. Fetches cuobjdump and nvdisasm from PyPI into the toolchain cache on first use.
#
#   tools/sass-report.sh [ARCH]      (default sm_90)
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:-sm_90}
nvcc=$(tools/install-cuda-toolchain.sh)
venv=${UPX_CUDA_VENV:-$HOME/.cache/upx/cuda-13.0}
tools=$venv/sass-tools
if [ ! -x "$tools/bin/nvdisasm" ] || [ ! -x "$tools/bin/cuobjdump" ]; then
    mkdir -p "$tools/bin" "$tools/wheels"
    "$venv/bin/pip" download --no-deps -q -d "$tools/wheels" nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
    for w in "$tools"/wheels/*.whl; do
        python3 -m zipfile -e "$w" "$tools/unpacked"
    done
    find "$tools/unpacked" \( -name cuobjdump -o -name nvdisasm \) -type f -exec cp {} "$tools/bin/" \;
    chmod +x "$tools/bin/"*
fi
export PATH=$tools/bin:$PATH
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
printf '%-34s %6s %6s %6s %6s %5s %5s %5s\n' kernel instr HMMA LDSM LDGSTS BAR MUFU LDL/STL
for cu in kernels/*.cu; do
    case $cu in *_sm90a.cu) continue ;; esac
    "$nvcc" -cubin -arch="$arch" -O3 -std=c++17 -Ikernels "$cu" -o "$out/k.cubin"
    cuobjdump -sass "$out/k.cubin" | awk -v OFS=' ' '
        /Function : / { if (name) report(); name = $3; n = hmma = ldsm = ldgsts = bar = mufu = lmem = 0; next }
        /^ *\/\*[0-9a-f]+\*\/ / { n++ }
        /HMMA/ { hmma++ } /LDSM/ { ldsm++ } /LDGSTS/ { ldgsts++ } /BAR\.SYNC/ { bar++ } /MUFU/ { mufu++ }
        /[^A-Z](LDL|STL)[ .]/ { lmem++ }
        function report() { printf "%-34s %6d %6d %6d %6d %5d %5d %5d\n", name, n, hmma, ldsm, ldgsts, bar, mufu, lmem }
        END { if (name) report() }'
done
