// GlobalResponseNorm as a modulation (ops/grn.rs), in two launches:
//
// grn_sumsq_<in>: ss[b, d] = Σ_p h[b, p, d]² over the P pixels of sample b, f32.
//   Launch: grid (ceil(D / 32), B), 256 threads = 8 warps; lane ↔ channel (coalesced NHWC
//   rows), warps split the pixels, partial sums combined in shared memory.
// grn_finish: G = √ss, N = G / (mean_d G + eps); ab[b, d] = γ_d·N[b, d], ab[b, D + d] = β_d.
//   Launch: one block of 256 threads per sample.
// grn_reduce_partials: ss[b, d] = Σ over the 64-row slabs q meeting sample b, in order, of
//   partials[q][b − 64q/P][d] (the per-slab sums GEMM1's epilogue wrote, kernels/gemm.cu):
//   a fixed order, so bit-identical run to run. partials f32 [ceil(B·P / 64)][2][D], P ≥ 64.
//   Launch: grid (ceil(D / 256), B), 256 threads, thread ↔ channel.
// Layout: h [B, P, D] (channels last); ss f32 [B, D] (the op's workspace); γ, β f32 [D];
//   ab f32 [B, 2D]. Limits: B ≤ 65535, P·D < 2^63.
#include "common/portable.cuh"
#include "common/convert.cuh"
#include "common/reduce.cuh"

template <typename TI>
__device__ __forceinline__ void sumsq(const TI* __restrict__ h, float* __restrict__ ss, long long P, int D) {
    __shared__ float part[8][33];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int d = blockIdx.x * 32 + lane, b = blockIdx.y;
    float acc = 0.f;
    if (d < D) {
        const TI* hb = h + (long long)b * P * D + d;
        for (long long p = warp; p < P; p += 8) {
            const float v = to_f32(hb[p * D]);
            acc += v * v;
        }
    }
    part[warp][lane] = acc;
    __syncthreads();
    if (warp == 0 && d < D) {
        float s = 0.f;
        for (int w = 0; w < 8; ++w) s += part[w][lane];
        ss[(long long)b * D + d] = s;
    }
}

extern "C" __global__ void __launch_bounds__(256) grn_sumsq_f32(const float* h, float* ss, long long p, int d) { sumsq(h, ss, p, d); }
extern "C" __global__ void __launch_bounds__(256) grn_sumsq_bf16(const __nv_bfloat16* h, float* ss, long long p, int d) { sumsq(h, ss, p, d); }

extern "C" __global__ void __launch_bounds__(256) grn_finish(const float* ss, const float* gamma, const float* beta, float* ab, int D, float eps) {
    __shared__ float scratch[32];
    const float* s = ss + (long long)blockIdx.x * D;
    float* out = ab + (long long)blockIdx.x * 2 * D;
    float total = 0.f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) total += sqrtf(s[d]);
    const float denom = block_sum(total, scratch) / (float)D + eps;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        out[d] = gamma[d] * (sqrtf(s[d]) / denom);
        out[D + d] = beta[d];
    }
}

extern "C" __global__ void __launch_bounds__(256) grn_reduce_partials(const float* partials, float* ss, long long P, int D) {
    const int d = blockIdx.x * blockDim.x + threadIdx.x, b = blockIdx.y;
    if (d >= D) return;
    const long long first = (long long)b * P / 64, last = ((long long)b * P + P - 1) / 64;
    float acc = 0.f;
    for (long long q = first; q <= last; ++q) {
        const long long part = b - q * 64 / P;  // 0 or 1: which of the slab's samples b is
        acc += partials[(q * 2 + part) * D + d];
    }
    ss[(long long)b * D + d] = acc;
}
