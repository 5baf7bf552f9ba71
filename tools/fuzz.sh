#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, entry points in src/fuzzing.rs) for N seconds each with
# libFuzzer through cargo-fuzz, from the committed seed corpora; a crash, a hang or an
# allocation over the limits fails the run and leaves the reproducer in fuzz/artifacts/.
#
#   tools/fuzz.sh [SECONDS] [TARGET...]      (default: 60 s, every target)
#
# cargo-fuzz needs nightly flags: RUSTC_BOOTSTRAP=1 lets the stable toolchain take them.
# It is installed on first use (cargo install cargo-fuzz, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors torch_zip pickle tokenizer cli_values case_file)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
export RUSTC_BOOTSTRAP=1 UPX_NO_NVCC=1
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    work=$(mktemp -d)
    printf '\n== fuzz %s for %ss\n' "$t" "$secs"
    # New inputs go to a scratch corpus; the committed seeds stay as they are.
    status=0
    cargo fuzz run "$t" "$work" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
        -print_final_stats=1 >"$work.log" 2>&1 || status=$?
    grep -E '^Done|ERROR|panicked|SUMMARY|stat::number_of_executed_units' "$work.log" || true
    rm -rf "$work"
    if [ "$status" -ne 0 ]; then
        tail -n 40 "$work.log"
        echo "fuzz target $t failed (reproducer in fuzz/artifacts/$t)"
        exit 1
    fi
    rm -f "$work.log"
done
echo "== every fuzz target ran ${secs}s without a failure"
