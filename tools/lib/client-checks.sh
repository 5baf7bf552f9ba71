# Sourced by the checks against real client libraries (tools/hf-interop.sh,
# tools/serve-clients.sh): progress lines with elapsed time, failing at the first bad check,
# and the binary under test. Expects to run from the repository root.

started=$SECONDS
step() { printf '\n== %s (%ds)\n' "$*" "$((SECONDS - started))"; }
fail() {
    echo "FAIL: $*" >&2
    exit 1
}

# Sets UPX_BIN to the ultrapixel binary built as tools/test.sh builds it, unless the caller
# named one.
use_upx_bin() {
    [ -n "${UPX_BIN:-}" ] && return
    step "build (as tools/test.sh)"
    NVCC=$(tools/install-cuda-toolchain.sh)
    export NVCC UPX_REQUIRE_NVCC=1 UPX_STRICT_PTXAS=1
    cargo build --locked --quiet --bin ultrapixel
    UPX_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/ultrapixel"
}
