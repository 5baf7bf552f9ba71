// The parameter struct of both GEMM kernels (kernels/gemm.cu and kernels/gemm_sm90a.cu),
// mirrored by ops::gemm::GemmParams; build.rs reads it from here (build/abi.rs) and checks that
// both sides have this layout. Pointers first, so there is no implicit padding.
#pragma once

struct GemmParams {
    const __nv_bfloat16* a;  // A [M, K] (the sm_90a kernel reads A through its tensor map)
    const __nv_bfloat16* w;  // W [N, K] (likewise)
    const float* bias;       // [N], or null
    const void* r;           // R [M, N] in the output type, or null
    void* c;                 // C [M, N] in the output type
    const float* ab;         // FiLM a | β [M / rows_per_sample, 2N], or null
    float* partials;         // GRN slab sums, or null
    const float* a_mod;      // the A modulation [samples, 2K], or null (null for sm_90a)
    int m, n, k;
    int gelu;
    int rows_per_sample;
    float film_k;
    float a_k;
    int pad;  // explicit, so every byte is a field
};
