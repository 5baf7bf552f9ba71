#!/usr/bin/env bash
# The emulator's shared-memory race check over the emulator and op tests, the Hopper kernels'
# included (CI, after the test command): an instrumented emulator build
# (UPX_HOSTSIM_RACECHECK=1, a few minutes) that runs 2-3x slower, so without the long GEMM
# test. Any race in a kernel fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=$(tools/install-cuda-toolchain.sh)
export NVCC UPX_REQUIRE_NVCC=1 UPX_STRICT_PTXAS=1
UPX_HOSTSIM_RACECHECK=1 HOSTSIM_RACECHECK=1 \
    cargo test --locked --test ops --test hostsim --test hostsim_gemm_sm90a \
        --test hostsim_attention_sm90a -- --skip gemm_matches_reference
