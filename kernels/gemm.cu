// bf16 GEMM on tensor cores with fused epilogues (ops/gemm.rs).
//
// Math: C[m, n] = epilogue(Σ_k A[m, k]·W[n, k]), f32 accumulation, where the epilogue is, in
//   order: + bias[n] (if bias), GELU-erf (if gelu), + R[m, n] (if residual), then FiLM
//   v·(k + a[s, n]) + β[s, n] for sample s = m / rows_per_sample (if ab: a TimestepBlock or
//   the scale-aware norm fused onto the GEMM before it). This is a PyTorch Linear (W is
//   [out, in]) applied to every row of A, i.e. a 1×1 conv on NHWC.
// GRN across a GEMM pair (ResBlock MLP): with `partials`, the epilogue also writes, for every
//   64-row slab q of C (rows [64q, 64q + 64)), Σ C[m, n]² over its rows of sample
//   s0 = 64q / rows_per_sample into partials[q][0][n] and over its rows of sample s0 + 1 into
//   partials[q][1][n] (rows_per_sample ≥ 64, so a slab meets at most two samples). Every
//   element has one writer and a fixed summation order: no atomics, results are bit-identical
//   run to run (grn_reduce_partials then sums the slabs of each sample in order). With
//   `a_mod`, each A tile is scaled in shared memory by (a_k + a[sample, k]) before the MMAs,
//   a the first half of a [samples, 2K] modulation.
// Layout: A bf16 [M, K] row-major, W bf16 [N, K] row-major, bias f32 [N], R and C [M, N]
//   row-major in the output type (f32 or bf16), ab f32 [M / rows_per_sample, 2N] (a | β).
// Launch: grid (ceil(M/128), ceil(N/128)), 256 threads = 8 warps as 2 (m) × 4 (n), each warp a
//   64×32 tile; dynamic shared memory STAGES·(128 + 128)·40·2 = 61,440 bytes (opt-in > 48 KiB).
// Pipeline: cp.async 16-byte copies into a 3-stage ring of padded tiles (row pitch 40
//   elements = 80 bytes keeps ldmatrix rows on distinct banks), ldmatrix.x4 fragments
//   (mma.cuh: ldmatrix_a_frag for A, ldmatrix_b_pair for two n-tiles of W), mma.sync m16n8k16
//   bf16 → f32.
// Limits: K % 8 == 0 (16-byte rows; the op rejects other K), M < 2^31, N ≤ 65535·128.
//   M, N, K tails are zero-filled on load and masked on store.
// Names: gemm_bf16_<out>. Parameters: one GemmParams by value.
#include "common/portable.cuh"
#include "common/convert.cuh"
#include "common/mma.cuh"
#include "common/gemm_epilogue.cuh"
#include "common/gemm_params.cuh"

namespace gemm {
constexpr int BM = 128, BN = 128, BK = 32, STAGES = 3, LDS = BK + 8, THREADS = 256;

template <typename TO>
__device__ __forceinline__ void body(const __nv_bfloat16* __restrict__ A, const __nv_bfloat16* __restrict__ W,
                                     const float* __restrict__ bias, const TO* __restrict__ R, TO* __restrict__ C,
                                     int M, int N, int K, int gelu, const float* __restrict__ ab,
                                     int rows_per_sample, float film_k, float* __restrict__ partials,
                                     const float* __restrict__ a_mod, float a_k) {
    __nv_bfloat16* As = dynamic_smem<__nv_bfloat16>();  // [STAGES][BM][LDS]
    __nv_bfloat16* Bs = As + STAGES * BM * LDS;                 // [STAGES][BN][LDS]
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wm = warp / 4, wn = warp % 4;
    const long long m0 = (long long)blockIdx.x * BM;
    const int n0 = blockIdx.y * BN;
    const int ktiles = (K + BK - 1) / BK;

    // One k-tile of A and W: 128 rows × 4 chunks of 8 elements each, 2 chunks per thread.
    auto load_tile = [&](int stage, int kt) {
        const int k0 = kt * BK;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int c = tid + i * THREADS, r = c / 4, kc = (c % 4) * 8;
            const int gk = k0 + kc;
            const long long gm = m0 + r;
            const bool a_ok = gm < M && gk < K;
            cp_async_16_zfill(As + (stage * BM + r) * LDS + kc, a_ok ? A + gm * K + gk : A, a_ok);
            const int gn = n0 + r;
            const bool b_ok = gn < N && gk < K;
            cp_async_16_zfill(Bs + (stage * BN + r) * LDS + kc, b_ok ? W + (long long)gn * K + gk : W, b_ok);
        }
    };

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ktiles) load_tile(s, s);
        cp_async_commit();
    }

    float acc[4][4][4];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // tile kt landed for everyone; stage (kt-1) % STAGES is free again
        const int next = kt + STAGES - 1;
        if (next < ktiles) load_tile(next % STAGES, next);
        cp_async_commit();

        __nv_bfloat16* a_s = As + (kt % STAGES) * BM * LDS;
        if (a_mod) {
            // GRN folded into this GEMM's operand: A[m, k] ·= a_k + a[sample(m), k].
            for (int i = tid; i < BM * BK; i += THREADS) {
                const int r = i / BK, kk = i % BK, gk = kt * BK + kk;
                const long long gm = m0 + r;
                if (gm < M && gk < K) {
                    a_s[r * LDS + kk] = gemm_scale_a(a_s[r * LDS + kk], a_k, a_mod[(gm / rows_per_sample) * 2 * K + gk]);
                }
            }
            __syncthreads();
        }
        const __nv_bfloat16* b_s = Bs + (kt % STAGES) * BN * LDS;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            uint32_t af[4][4], bf[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) ldmatrix_a_frag(af[mi], a_s, wm * 64 + mi * 16, kk, LDS, lane);
#pragma unroll
            for (int ni = 0; ni < 4; ni += 2)
                ldmatrix_b_pair(bf[ni], bf[ni + 1], b_s, wn * 32 + ni * 8, kk, LDS, lane);
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) mma_bf16_16816(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
        }
    }
    cp_async_wait_all();

    const int g = lane >> 2, t = lane & 3;
    const GemmEpilogue epi{bias, R, ab, N, gelu, rows_per_sample, film_k};
    // GRN statistics: this warp's 64-row slab, split at the (at most one) sample boundary in
    // it; each thread sums its rows per column, the 8 lanes of a column combine by shuffles.
    const long long slab = m0 + wm * 64;
    const long long first_sample = slab / rows_per_sample;
    float sum0[4][2] = {}, sum1[4][2] = {};  // the slab's first sample, the next one
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const long long row = slab + mi * 16 + g + h * 8;
            if (row >= M) continue;
            const bool next = grn_next_sample(row, first_sample, rows_per_sample);
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = n0 + wn * 32 + ni * 8 + 2 * t + e;
                    if (col >= N) continue;
                    const TO stored = from_f32<TO>(epi.apply<TO>(acc[mi][ni][h * 2 + e], row, col));
                    C[row * N + col] = stored;
                    if (partials) grn_accumulate(sum0[ni][e], sum1[ni][e], stored, next);
                }
        }
    if (partials && slab < M) {
        float* out = partials + (slab / 64) * 2LL * N;
#pragma unroll
        for (int part = 0; part < 2; ++part)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float v = part ? sum1[ni][e] : sum0[ni][e];
                    v += __shfl_xor_sync(0xFFFFFFFFu, v, 4);
                    v += __shfl_xor_sync(0xFFFFFFFFu, v, 8);
                    v += __shfl_xor_sync(0xFFFFFFFFu, v, 16);
                    const int col = n0 + wn * 32 + ni * 8 + 2 * t + e;
                    if (g == 0 && col < N) out[part * N + col] = v;
                }
    }
}

// A kernel: the struct unpacked into the body's arguments.
template <typename TO>
__device__ __forceinline__ void entry(const GemmParams& p) {
    body(p.a, p.w, p.bias, static_cast<const TO*>(p.r), static_cast<TO*>(p.c), p.m, p.n, p.k, p.gelu, p.ab,
         p.rows_per_sample, p.film_k, p.partials, p.a_mod, p.a_k);
}
}  // namespace gemm

extern "C" __global__ void __launch_bounds__(256) gemm_bf16_f32(const GemmParams p) { gemm::entry<float>(p); }
extern "C" __global__ void __launch_bounds__(256) gemm_bf16_bf16(const GemmParams p) { gemm::entry<__nv_bfloat16>(p); }
