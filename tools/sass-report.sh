#!/usr/bin/env bash
# SASS instruction mix of every kernel, for the performance analysis that needs no GPU
# (docs/PERF.md): tensor-core MMAs (mma.sync's HMMA, wgmma's HGMMA), ldmatrix, cp.async, TMA
# loads, barriers (CTA and named: BAR; wgmma fences and waits: WGBAR), special-function ops,
# local memory, global loads and stores (LDG, STG: any width). The Hopper-only `kernels/*_sm90a.cu` are built for sm_90a alone, as build.rs
# does: they are included when ARCH is sm_90a and skipped otherwise. ptxas's notes that a
# wgmma pipeline was serialized or a setmaxnreg ignored ("Potential Performance Loss") are
# printed after the table, on stderr. Fetches cuobjdump and nvdisasm from PyPI into the
# toolchain cache on first use.
#
#   tools/sass-report.sh [ARCH [FILTER]]   (default sm_90; FILTER: only kernels/*FILTER*.cu)
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:-sm_90}
filter=${2:-}
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
printf '%-40s %6s %5s %5s %5s %6s %7s %5s %5s %5s %5s %5s %5s\n' \
    kernel instr HMMA HGMMA LDSM LDGSTS UTMALDG BAR WGBAR MUFU LDL/STL LDG STG
for cu in kernels/*"$filter"*.cu; do
    case $cu in *_sm90a.cu) [ "$arch" = sm_90a ] || continue ;; esac
    # build.rs's nvcc flags that change code (-O3, C++17, relaxed constexpr).
    "$nvcc" -cubin -arch="$arch" -O3 -std=c++17 --expt-relaxed-constexpr -Xptxas=-v -Ikernels \
        "$cu" -o "$out/k.cubin" 2>"$out/ptxas.log"
    grep -h "Potential Performance Loss" "$out/ptxas.log" | sed "s|^|$cu: |" >>"$out/losses" || true
    cuobjdump -sass "$out/k.cubin" | awk '
        /Function : / { if (name) report(); name = $3; n = hmma = hgmma = ldsm = ldgsts = tma = bar = wgbar = mufu = lmem = ldg = stg = 0; next }
        /^ *\/\*[0-9a-f]+\*\/ / { n++ }
        /HMMA/ { hmma++ } /HGMMA/ { hgmma++ } /LDSM/ { ldsm++ } /LDGSTS/ { ldgsts++ } /UTMALDG/ { tma++ }
        /BAR\.(SYNC|ARV|RED)/ { bar++ } /WARPGROUP\.(ARRIVE|DEPBAR)/ { wgbar++ } /MUFU/ { mufu++ }
        /[^A-Z](LDL|STL)[ .]/ { lmem++ } /[^A-Z]LDG[ .]/ { ldg++ } /[^A-Z]STG[ .]/ { stg++ }
        function report() { printf "%-40s %6d %5d %5d %5d %6d %7d %5d %5d %5d %5d %5d %5d\n", name, n, hmma, hgmma, ldsm, ldgsts, tma, bar, wgbar, mufu, lmem, ldg, stg }
        END { if (name) report() }'
done
if [ -s "$out/losses" ]; then
    echo "ptxas performance-loss notes:" >&2
    cat "$out/losses" >&2
fi
