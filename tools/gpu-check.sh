#!/usr/bin/env bash
# The one command for a GPU machine. Runs, from a release binary built elsewhere and carried
# over: `info`, `verify` with UPX_REQUIRE_GPU=1 (GPU checks fail instead of skipping), the
# golden cases on the cuda backend (when the binary has `validate`), and `bench`; logs go to
# $OUT (or ./gpu-check-out) and a short table is printed last.
#
#   tools/gpu-check.sh [BINARY]     (default: target/release/ultrapixel)
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/ultrapixel}
out=${OUT:-gpu-check-out}
mkdir -p "$out"
export UPX_REQUIRE_GPU=1
[ -x "$bin" ] || { echo "error: $bin not found or not executable; build with cargo build --release" >&2; exit 2; }

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

run info "$bin" info
run verify "$bin" verify
# Every golden case on the GPU, one file at a time (kinds this build does not run yet exit 2
# and are listed as such; they never count as passes).
run cases bash -c 'rc=0; for f in tests/cases/*.safetensors; do "$0" validate --backend cuda "$f" || rc=1; done; exit $rc' "$bin"
run bench "$bin" bench

printf '\n== summary (%s, %s)\n' "$(date -u +%Y-%m-%dT%H:%MZ)" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
printf '%s\n' "${summary[@]}"
