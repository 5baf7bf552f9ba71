// bf16 GEMM for Hopper (sm_90a only): TMA + wgmma, warp-specialised, persistent (ops/gemm_sm90a.rs).
//
// Math: the same as kernels/gemm.cu: C[m, n] = epilogue(Σ_k A[m, k]·W[n, k]), f32 accumulation,
//   the epilogue of kernels/common/gemm_epilogue.cuh (+ bias, GELU-erf, + R, FiLM), bf16 or f32
//   out, and with `partials` the GRN slab sums in kernels/gemm.cu's layout and slab order:
//   partials[q][0|1][n] = Σ C[m, n]² (stored values) over 64-row slab q's rows of its first
//   sample | of the next one, each element written by one thread after a fixed-order reduction
//   (bit-identical run to run). The GRN scale of A (`a_mod`) is not applied here: the host runs
//   gemm_scale_a_bf16 into a workspace first (the same arithmetic), or falls back.
// Layout: A bf16 [M, K] row-major, W bf16 [N, K] row-major (a Linear weight), bias f32 [N],
//   R and C [M, N] row-major in the output type, ab f32 [M / rows_per_sample, 2N] (a | β).
//   A and W reach the kernel as TMA tensor maps (dims {K, rows}, boxes {64, 128} for A and
//   {64, BN} for W, 128-byte swizzle): each stage holds a 128×64 A tile and a BN×64 W tile,
//   rows of 128 bytes in the canonical K-major 128-byte-swizzled layout (8-row atoms of 1024
//   bytes).
// Tile width BN ∈ {64, 128, 256}, one instantiation each; per shape the tuning table's
//   measured winner, else ops/gemm_sm90a.rs TileWidth's model (waves over the SMs, padded
//   columns, operand traffic). Each element is accumulated and reduced the same way in every
//   width, so all three give the same bits (C and the GRN partials).
// Launch: a persistent grid of min(tiles, SMs) blocks; block b takes the 128×BN output tiles
//   b, b + grid, b + 2·grid, … in grouped order: tile t lies in group g = t div (8·tiles_n) of
//   8 row tiles (the last group has the remaining r ≤ 8), walked row-fastest: row tile
//   8g + (t' mod r), column tile t' div r, t' = t − 8g·tiles_n. The ~SM-count tiles in flight
//   at once then share ≤ 8 A row panels and ~SMs/8 W column panels in L2.
//   384 threads = 3 warpgroups: warpgroup 0 the producer (setmaxnreg.dec to 40; one thread
//   issues the TMA loads), warpgroups 1 and 2 the consumers (setmaxnreg.inc to 232: BN = 256
//   holds 128 f32 accumulators per thread), each computing 64 rows × BN columns with
//   wgmma.mma_async m64nBNk16 f32.bf16.bf16, A and B from shared-memory descriptors, one
//   k-tile's batch of 4 wgmmas in flight (wait_group 1 releases the previous stage). A 4-stage
//   ring of full/empty mbarrier pairs: full[s] one arrival (expect_tx of the stage's 16 KiB +
//   BN·128 bytes) + the TMA bytes, empty[s] one arrival per consumer warp (8).
//   Dynamic shared memory: 1024 (alignment slack) + 4 stages · (16 KiB + BN·128) + BN·64 bytes
//   of GRN scratch + 64 bytes of barriers = Plan<BN>::SMEM_BYTES below (103 488, 140 352 and
//   214 080 bytes for BN 64, 128, 256; the limit is 227 KiB).
// Limits: K % 8 == 0 (TMA strides are multiples of 16 bytes), A and W 16-byte aligned;
//   M, N, K tails are zero-filled by TMA and masked on store. M, N < 2^31, tiles < 2^31.
// Names: gemm_sm90a_n<BN>_bf16_<out>. Parameters: the A and W tensor maps, then GemmParams
//   (kernels/common/gemm_params.cuh, shared with kernels/gemm.cu; `a` and `w` are unused,
//   `a_mod` must be null).
// The released model's GEMMs (`bench --shapes --list` at 1024², 2048², 4096²; docs/PERF.md
//   lists them with work shares): N and K each one of 16, 192, 320, 384, 512, 576, 640, 768,
//   1024, 1152, 1280, 1536, 2048, 2304, 4096, 4608, 5120, 8192 (N also 12, 256, 3072, 3456,
//   3840, 6144; K also 8, 64), M from 2 to 524 288; 92 % of the GEMM FLOPs at 4096² have
//   N ∈ {1152, 2048, 3456, 4608, 6144, 8192} and K ∈ {1152, 2048, 4608, 8192}.
#include "common/portable.cuh"
#include "common/convert.cuh"
#include "common/hopper_sm90a.cuh"
#include "common/gemm_epilogue.cuh"
#include "common/gemm_params.cuh"

namespace gemm_sm90a {
constexpr int BM = 128, BK = 64, STAGES = 4, GROUP_M = 8;
constexpr int PRODUCER_REGS = 40, CONSUMER_REGS = 232;

// The shared-memory plan of the BN-wide kernel: [STAGES][A BM×BK | W BN×BK] tiles, the GRN
// scratch [consumer][warp][part][column] f32, then the full and empty mbarriers.
template <int BN> struct Plan {
    static constexpr int A_BYTES = BM * BK * 2;
    static constexpr int W_BYTES = BN * BK * 2;
    static constexpr int STAGE_BYTES = A_BYTES + W_BYTES;
    static constexpr int RED_BYTES = 2 * 4 * 2 * BN * 4;
    static constexpr int SMEM_BYTES = 1024 + STAGES * STAGE_BYTES + RED_BYTES + 2 * STAGES * 8;
    static_assert(SMEM_BYTES <= 227 * 1024, "Hopper's per-block shared memory limit");
};
static_assert(Plan<64>::SMEM_BYTES == 103488 && Plan<128>::SMEM_BYTES == 140352 && Plan<256>::SMEM_BYTES == 214080,
              "ops/gemm_sm90a.rs TileWidth::smem_bytes mirrors these");

// Tile t → (row tile, column tile): groups of GROUP_M row tiles (the last group may be
// shorter), each walked row-fastest over all column tiles. A bijection of [0, tiles_m·tiles_n).
__device__ __forceinline__ void tile_coords(int t, int tiles_m, int tiles_n, int& tm, int& tn) {
    const int group = t / (GROUP_M * tiles_n), first = group * GROUP_M;
    const int rows = min(GROUP_M, tiles_m - first), in_group = t - first * tiles_n;
    tm = first + in_group % rows;
    tn = in_group / rows;
}

template <int BN, typename TO>
__device__ __forceinline__ void body(const CUtensorMap* a_map, const CUtensorMap* w_map, const GemmParams& p) {
    using P = Plan<BN>;
    constexpr int STAGE_BYTES = P::STAGE_BYTES;
    unsigned char* raw = dynamic_smem<unsigned char>();
    // 128-byte swizzle atoms start on 1024-byte boundaries of the shared address space.
    unsigned char* smem = raw + ((1024 - (smem_address(raw) & 1023)) & 1023);
    unsigned char* tiles = smem;  // [STAGES][A 128×64 | W BN×64]
    float* red = reinterpret_cast<float*>(smem + STAGES * STAGE_BYTES);
    uint64_t* full = reinterpret_cast<uint64_t*>(smem + STAGES * STAGE_BYTES + P::RED_BYTES);
    uint64_t* empty = full + STAGES;

    const int M = p.m, N = p.n, K = p.k;
    const int tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
    const int n_tiles = tiles_m * tiles_n;
    const int ktiles = (K + BK - 1) / BK;
    const int wg = threadIdx.x / 128;

    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbarrier_init(&full[s], 1);
            mbarrier_init(&empty[s], 8);  // one arrival per consumer warp
        }
        fence_mbarrier_init();
    }
    __syncthreads();

    if (wg == 0) {
        // Producer: one thread streams every k-tile of this block's tiles through the ring.
        setmaxnreg_dec<PRODUCER_REGS>();
        if (threadIdx.x == 0) {
            int it = 0;
            for (int tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
                int tm, tn;
                tile_coords(tile, tiles_m, tiles_n, tm, tn);
                const int m0 = tm * BM, n0 = tn * BN;
                for (int kt = 0; kt < ktiles; ++kt, ++it) {
                    const int s = it % STAGES;
                    mbarrier_wait_parity(&empty[s], ((it / STAGES) & 1) ^ 1);
                    unsigned char* st = tiles + s * STAGE_BYTES;
                    mbarrier_arrive_expect_tx(&full[s], STAGE_BYTES);
                    tma_load_2d(st, a_map, &full[s], kt * BK, m0);
                    tma_load_2d(st + P::A_BYTES, w_map, &full[s], kt * BK, n0);
                }
            }
        }
        return;
    }

    // Consumers: warpgroup c (0, 1) computes rows [64c, 64c + 64) of each tile.
    setmaxnreg_inc<CONSUMER_REGS>();
    const int c = wg - 1, t = threadIdx.x % 128, warp = t / 32, lane = t % 32;
    const uint32_t tiles_addr = smem_address(tiles);
    const GemmEpilogue epi{p.bias, p.r, p.ab, N, p.gelu, p.rows_per_sample, p.film_k};
    TO* C = static_cast<TO*>(p.c);
    float acc[BN / 2];
    int it = 0;
    for (int tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
        int tm, tn;
        tile_coords(tile, tiles_m, tiles_n, tm, tn);
        const int m0 = tm * BM, n0 = tn * BN;
        for (int kt = 0; kt < ktiles; ++kt, ++it) {
            const int s = it % STAGES;
            mbarrier_wait_parity(&full[s], (it / STAGES) & 1);
            const uint32_t a_addr = tiles_addr + s * STAGE_BYTES + c * (64 * 128);
            const uint32_t w_addr = tiles_addr + s * STAGE_BYTES + P::A_BYTES;
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < BK / 16; ++ks)
                wgmma_bf16_ss<BN, 0, 0>(acc, make_matrix_desc(a_addr + 32 * ks, 16, 1024, 128),
                                        make_matrix_desc(w_addr + 32 * ks, 16, 1024, 128), kt > 0 || ks > 0);
            wgmma_commit();
            // One batch in flight: the previous k-tile's wgmmas are done, so its stage is free.
            wgmma_wait<1>();
            if (kt > 0 && lane == 0) mbarrier_arrive(&empty[(it - 1) % STAGES]);
        }
        wgmma_wait<0>();
        if (lane == 0) mbarrier_arrive(&empty[(it - 1) % STAGES]);

        // Epilogue from the accumulator fragment: value v of thread t is
        // D[16·warp + lane/4 + 8·((v/2)%2)][8·(v/4) + 2·(lane%4) + v%2].
        const long long slab = (long long)m0 + 64 * c;
        const long long first_sample = slab / p.rows_per_sample;
        const bool grn = p.partials != nullptr;
        float* wred = red + (c * 4 + warp) * 2 * BN;  // this warp's [part][column] sums
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int cl = 8 * j + 2 * (lane % 4) + e, col = n0 + cl;
                float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const long long row = slab + 16 * warp + lane / 4 + 8 * h;
                    if (row < M && col < N) {
                        const TO stored = from_f32<TO>(epi.apply<TO>(acc[4 * j + 2 * h + e], row, col));
                        C[row * N + col] = stored;
                        if (grn) grn_accumulate(sum0, sum1, stored, grn_next_sample(row, first_sample, p.rows_per_sample));
                    }
                }
                if (grn) {
                    // The warp's 16 rows: the 8 lanes of a column combine in a fixed tree.
                    sum0 += __shfl_xor_sync(0xFFFFFFFFu, sum0, 4);
                    sum1 += __shfl_xor_sync(0xFFFFFFFFu, sum1, 4);
                    sum0 += __shfl_xor_sync(0xFFFFFFFFu, sum0, 8);
                    sum1 += __shfl_xor_sync(0xFFFFFFFFu, sum1, 8);
                    sum0 += __shfl_xor_sync(0xFFFFFFFFu, sum0, 16);
                    sum1 += __shfl_xor_sync(0xFFFFFFFFu, sum1, 16);
                    if (lane < 4) {
                        wred[cl] = sum0;
                        wred[BN + cl] = sum1;
                    }
                }
            }
        if (grn) {
            // The slab's 4 warps, added in warp order by the thread that owns the column.
            named_barrier_sync(1 + c, 128);
            const float* cred = red + c * 4 * 2 * BN;
            float* out = p.partials + (slab / 64) * 2LL * N;
            for (int cl = t; cl < BN; cl += 128) {
                const int col = n0 + cl;
                if (slab < M && col < N) {
#pragma unroll
                    for (int part = 0; part < 2; ++part) {
                        float v = 0.f;
#pragma unroll
                        for (int w = 0; w < 4; ++w) v += cred[(w * 2 + part) * BN + cl];
                        out[part * N + col] = v;
                    }
                }
            }
            named_barrier_sync(1 + c, 128);  // the scratch is free for the next tile
        }
    }
}
}  // namespace gemm_sm90a

extern "C" __global__ void __launch_bounds__(384, 1)
    gemm_sm90a_n64_bf16_f32(const __grid_constant__ CUtensorMap a_map, const __grid_constant__ CUtensorMap w_map,
                          const GemmParams p) {
    gemm_sm90a::body<64, float>(&a_map, &w_map, p);
}
extern "C" __global__ void __launch_bounds__(384, 1)
    gemm_sm90a_n64_bf16_bf16(const __grid_constant__ CUtensorMap a_map, const __grid_constant__ CUtensorMap w_map,
                          const GemmParams p) {
    gemm_sm90a::body<64, __nv_bfloat16>(&a_map, &w_map, p);
}
extern "C" __global__ void __launch_bounds__(384, 1)
    gemm_sm90a_n128_bf16_f32(const __grid_constant__ CUtensorMap a_map, const __grid_constant__ CUtensorMap w_map,
                          const GemmParams p) {
    gemm_sm90a::body<128, float>(&a_map, &w_map, p);
}
extern "C" __global__ void __launch_bounds__(384, 1)
    gemm_sm90a_n128_bf16_bf16(const __grid_constant__ CUtensorMap a_map, const __grid_constant__ CUtensorMap w_map,
                          const GemmParams p) {
    gemm_sm90a::body<128, __nv_bfloat16>(&a_map, &w_map, p);
}
extern "C" __global__ void __launch_bounds__(384, 1)
    gemm_sm90a_n256_bf16_f32(const __grid_constant__ CUtensorMap a_map, const __grid_constant__ CUtensorMap w_map,
                          const GemmParams p) {
    gemm_sm90a::body<256, float>(&a_map, &w_map, p);
}
extern "C" __global__ void __launch_bounds__(384, 1)
    gemm_sm90a_n256_bf16_bf16(const __grid_constant__ CUtensorMap a_map, const __grid_constant__ CUtensorMap w_map,
                          const GemmParams p) {
    gemm_sm90a::body<256, __nv_bfloat16>(&a_map, &w_map, p);
}
