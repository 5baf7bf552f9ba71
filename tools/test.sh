#!/usr/bin/env bash
# The test command (README, CI): installs the pinned nvcc if needed, compiles every kernel for
# every architecture with strict ptxas (no spills, no local memory), checks formatting and
# lints, and runs the whole test suite, the emulator tests in both thread orders and with the
# shared-memory race check.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=$(tools/install-cuda-toolchain.sh)
export NVCC UPX_REQUIRE_NVCC=1 UPX_STRICT_PTXAS=1

step() { printf '\n== %s\n' "$*"; }

step "format"
cargo fmt --all -- --check

step "build (every kernel, strict ptxas)"
cargo build --workspace --all-targets --locked

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests (emulator threads in forward order)"
cargo test --workspace --locked

step "emulator tests in reverse thread order"
HOSTSIM_REVERSE=1 cargo test --locked --test ops --test hostsim --test hostsim_gemm_sm90a \
  --test hostsim_attention_sm90a

step "golden cases on the emulator with the Hopper kernels forced"
# Cases that reach the GEMM epilogues (bias, GELU, residual, FiLM, GRN) and both attention
# head dims (64, 32), in seconds. The whole set takes about 8 minutes here (the large
# high-res cases dominate) and runs by hand.
hopper_cases=(resblock resblock_skip timestepblock feedforwardblock attnblock attnblock_d64
  scale_aware_norm clip_text stage_c stage_c_lora stage_c_ultrapixel_lr stage_c_ultrapixel_hr_d64
  inr_upsampler controlnet_canny_tiny stage_b sample_stage_b_3step)
UPX_KERNELS=sm90a cargo run --locked --bin ultrapixel -- validate --backend hostsim \
  $(printf "tests/cases/%s.safetensors " "${hopper_cases[@]}")

step "all tests passed"
