// LayerNorm over the channel axis of channels-last rows (ops/norm.rs).
//
// Math: for each row r of C values, μ = mean(x), σ² = mean((x − μ)²) (biased, two passes,
//   f32), y = (x − μ)·rsqrt(σ² + eps)·γ + β; γ = 1, β = 0 when the pointers are null.
// Layout: x, y row-major [rows, C] (any leading dims flattened); γ, β f32 [C].
// Launch: one warp per row, 8 warps (256 threads) per block, grid = ceil(rows / 8).
// Limits: rows, C < 2^31. The row is read three times (it stays in L1/L2 for C up to a few
//   thousand); a register-cached variant is the tuning step for the memory-bound target.
// Names: layernorm_<in>_<out>.
#include "common/portable.cuh"
#include "common/convert.cuh"
#include "common/reduce.cuh"

template <typename TI, typename TO>
__device__ __forceinline__ void layernorm_rows(const TI* __restrict__ x, const float* __restrict__ gamma,
                                               const float* __restrict__ beta, TO* __restrict__ y,
                                               int rows, int c, float eps) {
    const int lane = threadIdx.x % 32;
    const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;  // whole warps leave together
    const TI* xr = x + row * c;
    TO* yr = y + row * c;
    float s = 0.f;
    for (int i = lane; i < c; i += 32) s += to_f32(xr[i]);
    const float mean = warp_sum(s) / (float)c;
    float v = 0.f;
    for (int i = lane; i < c; i += 32) {
        const float d = to_f32(xr[i]) - mean;
        v += d * d;
    }
    const float inv = rsqrtf(warp_sum(v) / (float)c + eps);
    for (int i = lane; i < c; i += 32) {
        float n = (to_f32(xr[i]) - mean) * inv;
        if (gamma) n = n * gamma[i] + beta[i];
        yr[i] = from_f32<TO>(n);
    }
}

extern "C" __global__ void __launch_bounds__(256) layernorm_f32_f32(const float* x, const float* g, const float* b, float* y, int rows, int c, float eps) {
    layernorm_rows(x, g, b, y, rows, c, eps);
}
extern "C" __global__ void __launch_bounds__(256) layernorm_f32_bf16(const float* x, const float* g, const float* b, __nv_bfloat16* y, int rows, int c, float eps) {
    layernorm_rows(x, g, b, y, rows, c, eps);
}
extern "C" __global__ void __launch_bounds__(256) layernorm_bf16_f32(const __nv_bfloat16* x, const float* g, const float* b, float* y, int rows, int c, float eps) {
    layernorm_rows(x, g, b, y, rows, c, eps);
}
extern "C" __global__ void __launch_bounds__(256) layernorm_bf16_bf16(const __nv_bfloat16* x, const float* g, const float* b, __nv_bfloat16* y, int rows, int c, float eps) {
    layernorm_rows(x, g, b, y, rows, c, eps);
}
