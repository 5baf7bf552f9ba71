// Warp and block reductions over f32 (full warps only; blocks a multiple of 32 threads).
#pragma once
#include "portable.cuh"

struct SumOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Butterfly: every lane ends with the reduction of the 32 lanes.
template <typename Combine> __device__ __forceinline__ float warp_reduce(float v, Combine combine) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = combine(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, SumOp()); }
__device__ __forceinline__ float warp_max(float v) { return warp_reduce(v, MaxOp()); }

// Every thread of the block gets the reduction of v; `scratch` is a __shared__ float[32].
// Contains two __syncthreads(): call it from all threads of the block.
template <typename Combine>
__device__ __forceinline__ float block_reduce(float v, float* scratch, float identity, Combine combine) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_reduce(v, combine);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = warp_reduce(lane < warps ? scratch[lane] : identity, combine);
    __syncthreads();  // scratch may be reused right after
    return v;
}

__device__ __forceinline__ float block_sum(float v, float* scratch) { return block_reduce(v, scratch, 0.f, SumOp()); }
__device__ __forceinline__ float block_max(float v, float* scratch) {
    return block_reduce(v, scratch, -INFINITY, MaxOp());
}
