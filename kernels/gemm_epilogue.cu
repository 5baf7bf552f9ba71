// What a vendor GEMM (cuBLASLt) cannot fuse, as separate passes around it (ops/gemm_epilogue.rs),
// and the tuner's on-device comparison (src/tune/).
//
// gemm_epilogue_<x>_<out>: Y = epilogue(X) for a GEMM product X [M, N] computed elsewhere (f32 or
//   bf16), the same epilogue as kernels/gemm.cu applied to its accumulator, in the same order:
//   + bias[n] (if bias), GELU-erf (if gelu), + R[m, n] (if R), then FiLM v·(k + a[s, n]) + β[s, n]
//   with s = m / rows_per_sample (if ab). Y is rounded once, to the output type.
//   With `partials` it also writes the GRN statistics of kernels/gemm.cu in the same layout:
//   for every 64-row slab q of Y, partials[q][0][n] = Σ Y[m, n]² (of the stored values) over the
//   slab's rows of sample s0 = 64q / rows_per_sample and partials[q][1][n] over its rows of sample
//   s0 + 1 (rows_per_sample ≥ 64, so a slab meets at most two samples). One thread owns a
//   column of a slab and adds its 64 rows in row order: no atomics, bit-identical run to run
//   (grn_reduce_partials then adds each sample's slabs in order).
//   Launch: grid (ceil(M / 64), ceil(N / 256)), 256 threads, thread ↔ column (coalesced rows).
// gemm_scale_a_bf16: A' = bf16(A[m, k] · (a_k + a[s, k])), s = m / rows_per_sample, with `ab` the
//   [samples, 2K] GRN modulation (first half): the operand scaling kernels/gemm.cu applies to its
//   A tiles in shared memory, as its own pass, with the same arithmetic and rounding.
//   Launch: grid-stride over the M·K elements, 256 threads.
// tune_compare_<t>: the tuner's check of a candidate's output against ours, on the device. Element
//   i goes to block (i / 256) mod gridDim.x (a grid-stride loop of 256-thread blocks); block b
//   writes out[b] = {max |got − want| over finite pairs, max |want| over finite values, count of
//   elements whose bits differ, count of elements where either value is NaN or ±Inf}. Max and
//   counts do not depend on the order of combination: the result is exact and deterministic.
//   Launch: grid G ≤ 1024 blocks (the op's choice), 256 threads.
// Layout: row-major; X, R, Y [M, N]; bias f32 [N]; ab f32 [M / rows_per_sample, 2N] (a | β), or
//   [samples, 2K] for the scaling; partials f32 [ceil(M / 64)][2][N].
// Limits: M < 2^31 rows, N < 2^31 / 256 column blocks; element counts in 64 bits.
// Names: gemm_epilogue_<x>_<out>, gemm_scale_a_bf16, tune_compare_<t>.
#include "common/portable.cuh"
#include "common/convert.cuh"
#include "common/reduce.cuh"
#include "common/gemm_epilogue.cuh"

namespace gemm_epilogue {
constexpr int THREADS = 256, SLAB = 64;

template <typename TX, typename TO>
__device__ __forceinline__ void body(const TX* __restrict__ X, const float* __restrict__ bias, const TO* __restrict__ R,
                                     TO* __restrict__ Y, int M, int N, int gelu, const float* __restrict__ ab,
                                     int rows_per_sample, float film_k, float* __restrict__ partials) {
    const int col = blockIdx.y * THREADS + threadIdx.x;
    const long long slab = (long long)blockIdx.x * SLAB;
    if (col >= N) return;
    const long long end = slab + SLAB < M ? slab + SLAB : M;
    const long long first_sample = slab / rows_per_sample;
    const GemmEpilogue epi{bias, R, ab, N, gelu, rows_per_sample, film_k};
    float sum0 = 0.f, sum1 = 0.f;  // the slab's first sample, the next one
    for (long long row = slab; row < end; ++row) {
        const long long at = row * N + col;
        const TO stored = from_f32<TO>(epi.apply<TO>(to_f32(X[at]), row, col));
        Y[at] = stored;
        if (partials) grn_accumulate(sum0, sum1, stored, grn_next_sample(row, first_sample, rows_per_sample));
    }
    if (partials) {
        float* out = partials + (long long)blockIdx.x * 2 * N;
        out[col] = sum0;
        out[N + col] = sum1;
    }
}

template <typename T> __device__ __forceinline__ uint32_t bits_of(T v);
template <> __device__ __forceinline__ uint32_t bits_of<float>(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);  // __float_as_uint, in a form the emulator also compiles
    return u;
}
template <> __device__ __forceinline__ uint32_t bits_of<__nv_bfloat16>(__nv_bfloat16 v) {
    return __bfloat16_as_ushort(v);
}

template <typename T>
__device__ __forceinline__ void compare(const T* __restrict__ got, const T* __restrict__ want, long long n,
                                        float* __restrict__ out) {
    __shared__ float scratch[32];
    float max_diff = 0.f, max_ref = 0.f, differ = 0.f, non_finite = 0.f;
    for (long long i = (long long)blockIdx.x * THREADS + threadIdx.x; i < n; i += (long long)gridDim.x * THREADS) {
        const float g = to_f32(got[i]), w = to_f32(want[i]);
        differ += bits_of(got[i]) != bits_of(want[i]) ? 1.f : 0.f;
        if (isfinite(g) && isfinite(w)) {
            max_diff = fmaxf(max_diff, fabsf(g - w));
            max_ref = fmaxf(max_ref, fabsf(w));
        } else {
            non_finite += 1.f;
        }
    }
    max_diff = block_max(max_diff, scratch);
    max_ref = block_max(max_ref, scratch);
    differ = block_sum(differ, scratch);
    non_finite = block_sum(non_finite, scratch);
    if (threadIdx.x == 0) {
        float* o = out + blockIdx.x * 4;
        o[0] = max_diff;
        o[1] = max_ref;
        o[2] = differ;
        o[3] = non_finite;
    }
}
}  // namespace gemm_epilogue

extern "C" __global__ void __launch_bounds__(256) gemm_epilogue_f32_f32(const float* X, const float* bias, const float* R, float* Y, int M, int N, int gelu, const float* ab, int rows_per_sample, float film_k, float* partials) {
    gemm_epilogue::body(X, bias, R, Y, M, N, gelu, ab, rows_per_sample, film_k, partials);
}
extern "C" __global__ void __launch_bounds__(256) gemm_epilogue_f32_bf16(const float* X, const float* bias, const __nv_bfloat16* R, __nv_bfloat16* Y, int M, int N, int gelu, const float* ab, int rows_per_sample, float film_k, float* partials) {
    gemm_epilogue::body(X, bias, R, Y, M, N, gelu, ab, rows_per_sample, film_k, partials);
}
extern "C" __global__ void __launch_bounds__(256) gemm_epilogue_bf16_bf16(const __nv_bfloat16* X, const float* bias, const __nv_bfloat16* R, __nv_bfloat16* Y, int M, int N, int gelu, const float* ab, int rows_per_sample, float film_k, float* partials) {
    gemm_epilogue::body(X, bias, R, Y, M, N, gelu, ab, rows_per_sample, film_k, partials);
}

extern "C" __global__ void __launch_bounds__(256) gemm_scale_a_bf16(const __nv_bfloat16* A, const float* ab, __nv_bfloat16* out, long long n, int K, long long per_sample, float a_k) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        out[i] = gemm_scale_a(A[i], a_k, ab[(i / per_sample) * 2 * K + i % K]);
    }
}

extern "C" __global__ void __launch_bounds__(256) tune_compare_f32(const float* got, const float* want, long long n, float* out) {
    gemm_epilogue::compare(got, want, n, out);
}
extern "C" __global__ void __launch_bounds__(256) tune_compare_bf16(const __nv_bfloat16* got, const __nv_bfloat16* want, long long n, float* out) {
    gemm_epilogue::compare(got, want, n, out);
}
