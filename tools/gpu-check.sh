#!/usr/bin/env bash
# The one command for a GPU machine. Runs, from a release binary built elsewhere and carried
# over: `info` (with the 4096² memory plan), `verify` with UPX_REQUIRE_GPU=1 (GPU checks fail
# instead of skipping), every golden case on the cuda backend, `generate` on the tiny random
# model twice with one seed (the PNGs must be bit-identical), `bench` (kernels, against the
# copy and cuBLASLt ceilings), `bench --stages` (every part of a generation at 1K–4K),
# `bench --shapes` (every GEMM shape of the model against cuBLASLt, every attention shape)
# and, where PyTorch is installed, its peer on the same shapes (`tools/torch-peer.py`); logs
# go to $OUT (or ./gpu-check-out) and a short table is printed last.
#
#   tools/gpu-check.sh [BINARY [PART...]]     (default: target/release/ultrapixel, all parts)
#
# PARTS: checks (info, verify, cases, the tiny model twice), bench, stages, shapes (with the
# PyTorch peer). A device call is limited to 10 minutes: run them as two calls, e.g.
# `checks bench` then `stages shapes`, if one does not fit.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/ultrapixel}
shift $(($# > 0 ? 1 : 0))
parts=${*:-checks bench stages shapes}
for p in $parts; do
    case $p in checks | bench | stages | shapes) ;; *)
        echo "error: unknown part $p (parts: checks bench stages shapes)" >&2
        exit 2
        ;;
    esac
done
want() { [[ " $parts " == *" $1 "* ]]; }
out=${OUT:-gpu-check-out}
mkdir -p "$out"
export UPX_REQUIRE_GPU=1
[ -x "$bin" ] || { echo "error: $bin not found or not executable; build with cargo build --release" >&2; exit 2; }

# cuBLASLt (the matmul ceiling and the GEMM peer), loaded at run time: the system's, or the
# one in a pip-installed CUDA wheel.
if ! ldconfig -p 2>/dev/null | grep -q 'libcublasLt\.so'; then
    lib=$(find /usr/local/cuda*/ /usr/lib/x86_64-linux-gnu \
        $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null) \
        -name 'libcublasLt.so*' 2>/dev/null | head -n 1)
    [ -n "$lib" ] && export LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

summary=()
run() {
    local name=$1
    shift
    printf '\n== %s: %s\n' "$name" "$*"
    local start=$SECONDS
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    summary+=("$(printf '%-10s exit %-3s %5ss  %s' "$name" "$rc" "$((SECONDS - start))" "$(grep -E 'passed|failed' "$out/$name.log" | tail -n 1)")")
}

if want checks; then
    run info "$bin" info --size 4096x4096
    run verify "$bin" verify
    # Every golden case on the GPU (bf16 rule); an unknown kind would exit 2, never pass.
    run cases "$bin" validate --backend cuda tests/cases/*.safetensors
    # The product on the tiny random model: a 512x512 PNG (with previews), twice with one
    # seed (bit-identical).
    tiny="$out/tiny"
    run tinymodel "$bin" make-tiny-model "$tiny"
    run generate "$bin" generate --model-dir "$tiny" --backend cuda --size 512x512 --seed 11 \
        --out "$out/gpu-a-{seed}.png" --preview "$out/previews" --json "a gpu check"
    run determinism bash -c '"$0" generate --model-dir "$1" --backend cuda --size 512x512 --seed 11 \
        --out "$2/gpu-b-{seed}.png" -q "a gpu check" \
        || { echo "0 passed, 1 failed (the second run failed)"; exit 1; }
        cmp "$2/gpu-a-11.png" "$2/gpu-b-11.png" && echo "1 passed, 0 failed (bit-identical)" \
        || { echo "0 passed, 1 failed (images differ)"; exit 1; }' "$bin" "$tiny" "$out"
fi
want bench && run bench "$bin" bench
# Every part of a generation with random full-size weights (the released model's work).
want stages && run stages "$bin" bench --stages --size 1024x1024 --size 2048x2048 \
    --size 4096x4096 --size 5120x2560 --iters 5
if want shapes; then
    shape_sizes=(--size 1024x1024 --size 2048x2048 --size 4096x4096)
    run shapes "$bin" bench --shapes "${shape_sizes[@]}" --iters 5
    "$bin" bench --shapes --list "${shape_sizes[@]}" >"$out/shapes.json"
    run torchpeer python3 tools/torch-peer.py "$out/shapes.json" --iters 5
fi

printf '\n== summary (%s, %s)\n' "$(date -u +%Y-%m-%dT%H:%MZ)" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
printf '%s\n' "${summary[@]}"
