// The GEMM epilogue's arithmetic, shared by every GEMM kernel that fuses it (kernels/gemm.cu,
// kernels/gemm_sm90a.cu) and by the separate epilogue pass around a vendor GEMM
// (kernels/gemm_epilogue.cu), so all of them compute the same values from the same f32
// product, bit for bit.
//
// For an f32 product value v at (row, col) of C [M, N], in order: + bias[col] (if bias),
// GELU-erf (if gelu), + R[row, col] (if R), then FiLM v·(k + a[s, col]) + β[s, col] with
// s = row / rows_per_sample (if ab, ab [samples, 2N] = a | β). The caller rounds the result
// once to the output type.
//
// GRN statistics: the square of the *stored* (rounded) value, added to the slab's first
// sample's sum or to the next sample's (a 64-row slab meets at most two samples).
//
// The GRN scale of the A operand: bf16(A[m, k] · (a_k + a[s, k])), a the first half of the
// [samples, 2K] modulation.
#pragma once
#include "portable.cuh"
#include "convert.cuh"

struct GemmEpilogue {
    const float* bias;  // [N], or null
    const void* r;      // R [M, N] in the output type, or null
    const float* ab;    // FiLM a | β [M / rows_per_sample, 2N], or null
    int n;
    int gelu;
    int rows_per_sample;
    float film_k;

    // The epilogue of the f32 product `v` at (row, col); TO is the output (and R) type.
    template <typename TO> __device__ __forceinline__ float apply(float v, long long row, int col) const {
        if (bias) v += bias[col];
        if (gelu) v = gelu_erf(v);
        if (r) v += to_f32(static_cast<const TO*>(r)[row * n + col]);
        if (ab) {
            const float* mod = ab + (row / rows_per_sample) * 2 * n;
            v = v * (film_k + mod[col]) + mod[n + col];
        }
        return v;
    }
};

// Adds the GRN square of a stored value to the slab's first sample (next = false) or the next.
template <typename TO>
__device__ __forceinline__ void grn_accumulate(float& sum0, float& sum1, TO stored, bool next) {
    const float q = to_f32(stored) * to_f32(stored);
    sum0 += next ? 0.f : q;
    sum1 += next ? q : 0.f;
}

// Whether `row` belongs to the sample after the slab's first one (`first_sample`, the sample of
// the slab's first row).
__device__ __forceinline__ bool grn_next_sample(long long row, long long first_sample, int rows_per_sample) {
    return row / rows_per_sample != first_sample;
}

// The GRN-scaled A operand element (scale factor f = a_k + a[s, k]).
__device__ __forceinline__ __nv_bfloat16 gemm_scale_a(__nv_bfloat16 a, float a_k, float a_mod) {
    return from_f32<__nv_bfloat16>(to_f32(a) * (a_k + a_mod));
}
