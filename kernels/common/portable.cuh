// One kernel source for two compilers. Under nvcc this pulls in the CUDA headers; under g++
// (-DHOSTSIM) it pulls in the host emulator, which supplies the same built-ins on the CPU.
//
// Rules that keep a kernel emulatable (docs/ARCHITECTURE.md §4):
// - dynamic shared memory only through dynamic_smem<T>();
// - inline PTX only inside kernels/common/ wrappers that have an emulated twin;
// - warp collectives on full warps only (the mask equals the live lanes);
// - kernels are `extern "C" __global__`; build.rs exports each one to the emulator.
#pragma once

#if defined(HOSTSIM)
#include "hostsim.h"
#else
#include <cuda_bf16.h>
#include <stdint.h>

// One dynamic shared-memory array per translation unit, viewed as T.
extern __shared__ __align__(128) unsigned char hs_dynamic_smem[];
template <typename T> __device__ __forceinline__ T* dynamic_smem() {
    return reinterpret_cast<T*>(hs_dynamic_smem);
}
#endif
