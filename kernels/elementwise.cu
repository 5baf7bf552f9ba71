// Elementwise ops (ops/elementwise.rs), all f32 arithmetic on f32 or bf16 storage.
//
// gelu_<in>_<out>:      y = 0.5·x·(1 + erf(x/√2))                      (exact erf form)
// silu_<in>_<out>:      y = x / (1 + exp(−x))
// add_<a>_<b>_<out>:    y = a + α·b                                     (same shape)
// film_<x>_<out>:       y = x·(k + a[b, c]) + β[b, c], with ab = [B, 2C] holding a in columns
//                       [0, C) and β in [C, 2C); x is [B, P, C] (P = pixels per sample). k = 1
//                       is a TimestepBlock, k = 2 the scale-aware norm's extra residual.
// Layout: contiguous; n = element count (64-bit).
// Launch: grid-stride loop, 256 threads, grid = min(ceil(n / 256), 65535·8).
#include "common/portable.cuh"
#include "common/convert.cuh"

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

struct GeluOp {
    __device__ __forceinline__ float operator()(float x) const { return gelu_erf(x); }
};
struct SiluOp {
    // expf, not __expf: accurate for large |x|.
    __device__ __forceinline__ float operator()(float x) const { return x / (1.0f + expf(-x)); }
};

template <typename F, typename TI, typename TO>
__device__ __forceinline__ void unary_body(const TI* __restrict__ x, TO* __restrict__ y, long long n) {
    GRID_STRIDE(i, n) y[i] = from_f32<TO>(F()(to_f32(x[i])));
}

extern "C" __global__ void __launch_bounds__(256) gelu_f32_f32(const float* x, float* y, long long n) { unary_body<GeluOp>(x, y, n); }
extern "C" __global__ void __launch_bounds__(256) gelu_bf16_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, long long n) { unary_body<GeluOp>(x, y, n); }
extern "C" __global__ void __launch_bounds__(256) silu_f32_f32(const float* x, float* y, long long n) { unary_body<SiluOp>(x, y, n); }
extern "C" __global__ void __launch_bounds__(256) silu_bf16_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, long long n) { unary_body<SiluOp>(x, y, n); }

template <typename TA, typename TB, typename TO>
__device__ __forceinline__ void add_body(const TA* __restrict__ a, const TB* __restrict__ b, TO* __restrict__ y, long long n, float alpha) {
    GRID_STRIDE(i, n) y[i] = from_f32<TO>(to_f32(a[i]) + alpha * to_f32(b[i]));
}

extern "C" __global__ void __launch_bounds__(256) add_f32_f32_f32(const float* a, const float* b, float* y, long long n, float alpha) { add_body(a, b, y, n, alpha); }
extern "C" __global__ void __launch_bounds__(256) add_f32_bf16_f32(const float* a, const __nv_bfloat16* b, float* y, long long n, float alpha) { add_body(a, b, y, n, alpha); }
extern "C" __global__ void __launch_bounds__(256) add_bf16_bf16_bf16(const __nv_bfloat16* a, const __nv_bfloat16* b, __nv_bfloat16* y, long long n, float alpha) { add_body(a, b, y, n, alpha); }

template <typename TX, typename TO>
__device__ __forceinline__ void film_body(const TX* __restrict__ x, const float* __restrict__ ab, TO* __restrict__ y,
                                          long long n, int c, long long per_sample, float k) {
    GRID_STRIDE(i, n) {
        const int ch = (int)(i % c);
        const long long s = i / per_sample;
        const float* row = ab + s * 2 * c;
        y[i] = from_f32<TO>(to_f32(x[i]) * (k + row[ch]) + row[c + ch]);
    }
}

extern "C" __global__ void __launch_bounds__(256) film_f32_f32(const float* x, const float* ab, float* y, long long n, int c, long long per_sample, float k) { film_body(x, ab, y, n, c, per_sample, k); }
extern "C" __global__ void __launch_bounds__(256) film_f32_bf16(const float* x, const float* ab, __nv_bfloat16* y, long long n, int c, long long per_sample, float k) { film_body(x, ab, y, n, c, per_sample, k); }
extern "C" __global__ void __launch_bounds__(256) film_bf16_bf16(const __nv_bfloat16* x, const float* ab, __nv_bfloat16* y, long long n, int c, long long per_sample, float k) { film_body(x, ab, y, n, c, per_sample, k); }

