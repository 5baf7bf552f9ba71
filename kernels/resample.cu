// Spatial resizes of channels-last images (ops/resample.rs), with PyTorch's CPU f32 index and
// weight arithmetic (the scales arrive computed on the host in f32, exactly as PyTorch does).
//
// resize_bilinear_<in>_<out> (align_corners=True):
//   Math: per axis, src = scale·dst (scale = (in − 1)/(out − 1), 0 when out = 1),
//   i0 = min(trunc(src), in − 1), i1 = i0 + (i0 < in − 1), λ1 = clamp(src − i0, 0, 1),
//   λ0 = 1 − λ1; equal sizes copy (i0 = i1 = dst, λ = (1, 0)). Output
//   λ0h·(λ0w·x[i0][j0] + λ1w·x[i0][j1]) + λ1h·(λ0w·x[i1][j0] + λ1w·x[i1][j1]) in f32.
//   nvcc may contract these products into fused multiply-adds: a few ulp, not semantics.
// resize_nearest_<in>_<out> (PyTorch's legacy "nearest"):
//   Math: src = min(floor(dst·scale), in − 1) per axis, scale = in/out in f32.
// Layout: x [B, H, W, C], y [B, h, w, C].
// Launch: 2-d grid-stride loops, rows = B·h output image rows over grid/block y, the w·C
//   elements of a row over grid/block x; blocks of 256 threads shaped (tx, 256/tx).
// Limits: B·h, w·C and W·C < 2^31 (the op checks); element offsets in 64 bits.
#include "common/portable.cuh"
#include "common/convert.cuh"

// 64-bit loop counters (a counter past its bound must not overflow); values < 2^31 inside.
#define FOR_ROWS(r, rows) \
    for (long long r = (long long)blockIdx.y * blockDim.y + threadIdx.y; r < (rows); r += (long long)gridDim.y * blockDim.y)
#define FOR_COLS(j, cols) \
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < (cols); j += (long long)gridDim.x * blockDim.x)

// The two source indices and weights of one output coordinate along one axis.
struct LinearTap {
    int i0, i1;
    float l0, l1;
};

__device__ __forceinline__ LinearTap linear_tap(int dst, int n_in, int n_out, float scale) {
    if (n_in == n_out) return {dst, dst, 1.f, 0.f};
    const float src = scale * (float)dst;
    const int i0 = min((int)src, n_in - 1);
    const float l1 = fminf(fmaxf(src - (float)i0, 0.f), 1.f);
    return {i0, i0 + (i0 < n_in - 1), 1.f - l1, l1};
}

template <typename TI, typename TO>
__device__ __forceinline__ void bilinear(const TI* __restrict__ x, TO* __restrict__ y, int rows, int cols, int c,
                                         int hi, int wi, int ho, int wo, float scale_h, float scale_w) {
    FOR_ROWS(row, rows) {
        const int b = (int)row / ho, oy = (int)row % ho;
        const LinearTap th = linear_tap(oy, hi, ho, scale_h);
        const TI* top = x + ((long long)b * hi + th.i0) * wi * c;
        const TI* bottom = x + ((long long)b * hi + th.i1) * wi * c;
        TO* out = y + row * cols;
        FOR_COLS(j, cols) {
            const int ox = (int)j / c, ch = (int)j % c;
            const LinearTap tw = linear_tap(ox, wi, wo, scale_w);
            const int j0 = tw.i0 * c + ch, j1 = tw.i1 * c + ch;
            const float t = to_f32(top[j0]) * tw.l0 + to_f32(top[j1]) * tw.l1;
            const float bt = to_f32(bottom[j0]) * tw.l0 + to_f32(bottom[j1]) * tw.l1;
            out[j] = from_f32<TO>(t * th.l0 + bt * th.l1);
        }
    }
}

__device__ __forceinline__ int nearest_index(int dst, int n_in, float scale) {
    return min((int)floorf((float)dst * scale), n_in - 1);
}

template <typename TI, typename TO>
__device__ __forceinline__ void nearest(const TI* __restrict__ x, TO* __restrict__ y, int rows, int cols, int c,
                                        int hi, int wi, int ho, float scale_h, float scale_w) {
    FOR_ROWS(row, rows) {
        const int b = (int)row / ho, oy = (int)row % ho;
        const TI* src = x + ((long long)b * hi + nearest_index(oy, hi, scale_h)) * wi * c;
        TO* out = y + row * cols;
        FOR_COLS(j, cols) {
            const int ox = (int)j / c, ch = (int)j % c;
            out[j] = from_f32<TO>(to_f32(src[nearest_index(ox, wi, scale_w) * c + ch]));
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) resize_bilinear_f32_f32(const float* x, float* y, int rows, int cols, int c, int hi, int wi, int ho, int wo, float sh, float sw) { bilinear(x, y, rows, cols, c, hi, wi, ho, wo, sh, sw); }
extern "C" __global__ void __launch_bounds__(256) resize_bilinear_f32_bf16(const float* x, __nv_bfloat16* y, int rows, int cols, int c, int hi, int wi, int ho, int wo, float sh, float sw) { bilinear(x, y, rows, cols, c, hi, wi, ho, wo, sh, sw); }
extern "C" __global__ void __launch_bounds__(256) resize_bilinear_bf16_f32(const __nv_bfloat16* x, float* y, int rows, int cols, int c, int hi, int wi, int ho, int wo, float sh, float sw) { bilinear(x, y, rows, cols, c, hi, wi, ho, wo, sh, sw); }
extern "C" __global__ void __launch_bounds__(256) resize_bilinear_bf16_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, int rows, int cols, int c, int hi, int wi, int ho, int wo, float sh, float sw) { bilinear(x, y, rows, cols, c, hi, wi, ho, wo, sh, sw); }

extern "C" __global__ void __launch_bounds__(256) resize_nearest_f32_f32(const float* x, float* y, int rows, int cols, int c, int hi, int wi, int ho, float sh, float sw) { nearest(x, y, rows, cols, c, hi, wi, ho, sh, sw); }
extern "C" __global__ void __launch_bounds__(256) resize_nearest_f32_bf16(const float* x, __nv_bfloat16* y, int rows, int cols, int c, int hi, int wi, int ho, float sh, float sw) { nearest(x, y, rows, cols, c, hi, wi, ho, sh, sw); }
extern "C" __global__ void __launch_bounds__(256) resize_nearest_bf16_f32(const __nv_bfloat16* x, float* y, int rows, int cols, int c, int hi, int wi, int ho, float sh, float sw) { nearest(x, y, rows, cols, c, hi, wi, ho, sh, sw); }
extern "C" __global__ void __launch_bounds__(256) resize_nearest_bf16_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, int rows, int cols, int c, int hi, int wi, int ho, float sh, float sw) { nearest(x, y, rows, cols, c, hi, wi, ho, sh, sw); }
