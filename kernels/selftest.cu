// Emulator self-tests (tests/hostsim.rs) and the hardware truth cases (src/truth.rs): kernels
// that pin down the semantics hostsim must reproduce — warp collectives, block reductions, the
// mma.sync / ldmatrix fragment layouts and accumulation, the fragment helpers of mma.cuh that
// the GEMM and attention kernels load their operands with, cp.async with zero-fill — and
// deliberately broken kernels the emulator must reject. On a GPU their raw outputs become the
// truth fixture (`verify --truth`) that the emulator is replayed against.
#include "common/portable.cuh"
#include "common/mma.cuh"
#include "common/reduce.cuh"

// out[8·i + j], for thread i of a 1-d launch and its value v = in[i]:
//   j = 0: __shfl_sync(v, 7·lane mod 32)   1: __shfl_xor_sync(v, 5)   2: __shfl_up_sync(v, 3)
//   3: __shfl_down_sync(v, 3)   4: __ballot_sync(v odd)   5: __any_sync(v > 1000)
//   6: __all_sync(v ≥ 0)   7: __shfl_xor_sync(v, 1, width 4)
extern "C" __global__ void selftest_warp_collectives(const int* in, int* out) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x % 32;
    const int v = in[i];
    int* o = out + 8 * i;
    o[0] = __shfl_sync(0xFFFFFFFFu, v, (7 * lane) % 32);
    o[1] = __shfl_xor_sync(0xFFFFFFFFu, v, 5);
    o[2] = __shfl_up_sync(0xFFFFFFFFu, v, 3);
    o[3] = __shfl_down_sync(0xFFFFFFFFu, v, 3);
    o[4] = (int)__ballot_sync(0xFFFFFFFFu, v & 1);
    o[5] = __any_sync(0xFFFFFFFFu, v > 1000);
    o[6] = __all_sync(0xFFFFFFFFu, v >= 0);
    o[7] = __shfl_xor_sync(0xFFFFFFFFu, v, 1, 4);
}

// out[2·b] = Σ x[b·blockDim .. (b+1)·blockDim), out[2·b + 1] = max over the same range.
extern "C" __global__ void selftest_block_reduce(const float* x, float* out) {
    __shared__ float scratch[32];
    const float v = x[blockIdx.x * blockDim.x + threadIdx.x];
    const float s = block_sum(v, scratch);
    const float m = block_max(v, scratch);
    if (threadIdx.x == 0) {
        out[2 * blockIdx.x] = s;
        out[2 * blockIdx.x + 1] = m;
    }
}

// The m16n8k16 fragments of one lane (g = lane >> 2, t = lane & 3), read straight from global
// memory by the PTX register layout (no ldmatrix): A row-major [16][16], Bt = Bᵀ row-major
// [8][16]; accumulator element i of the lane is D[frag_d_index(g, t, i)] of a row-major [16][8].
__device__ __forceinline__ uint32_t pack_bf16x2(__nv_bfloat16 lo, __nv_bfloat16 hi) {
    return (uint32_t)__bfloat16_as_ushort(lo) | (uint32_t)__bfloat16_as_ushort(hi) << 16;
}

__device__ __forceinline__ void load_a_fragment(uint32_t a[4], const __nv_bfloat16* A, int g, int t) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
        a[r] = pack_bf16x2(A[row * 16 + col], A[row * 16 + col + 1]);
    }
}

__device__ __forceinline__ void load_b_fragment(uint32_t b[2], const __nv_bfloat16* Bt, int g, int t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) b[r] = pack_bf16x2(Bt[g * 16 + 2 * t + 8 * r], Bt[g * 16 + 2 * t + 8 * r + 1]);
}

__device__ __forceinline__ int frag_d_index(int g, int t, int i) { return (g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1); }

// One warp: D[16×8] = A[16×16]·B[16×8] with fragments assembled straight from global memory by
// the PTX register layout (no ldmatrix). A row-major [16][16], Bt = Bᵀ row-major [8][16].
extern "C" __global__ void selftest_mma_fragments(const __nv_bfloat16* A, const __nv_bfloat16* Bt, float* D) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    uint32_t a[4], b[2];
    load_a_fragment(a, A, g, t);
    load_b_fragment(b, Bt, g, t);
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    mma_bf16_16816(d, a, b, d);
#pragma unroll
    for (int i = 0; i < 4; ++i) D[frag_d_index(g, t, i)] = d[i];
}

// One warp (1 block of 32 threads): a chain of `steps` mma.sync k-steps into one accumulator,
// D_s = A_s·B_s + D_(s-1) with D_(-1) = C, and every D_s written raw. A [steps][16][16],
// Bt [steps][8][16] (B_sᵀ), C [16][8], D [steps][16][8]. The hardware truth for the tensor
// core's f32 accumulation order and rounding: src/truth.rs feeds it products near 2^24 mixed
// with ±1 products, mixed exponents and signed zeros.
extern "C" __global__ void selftest_mma_chain(const __nv_bfloat16* A, const __nv_bfloat16* Bt, const float* C, float* D,
                                              int steps) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    float d[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) d[i] = C[frag_d_index(g, t, i)];
    for (int s = 0; s < steps; ++s) {
        uint32_t a[4], b[2];
        load_a_fragment(a, A + 256 * s, g, t);
        load_b_fragment(b, Bt + 128 * s, g, t);
        mma_bf16_16816(d, a, b, d);
#pragma unroll
        for (int i = 0; i < 4; ++i) D[128 * s + frag_d_index(g, t, i)] = d[i];
    }
}

// One warp: the same product with operands staged by cp.async and loaded by the fragment
// helpers of mma.cuh: A with ldmatrix_a_frag, B with ldmatrix_b_pair from a [n][k] tile built
// from Bt, and with ldmatrix_b_pair_trans from a [k][n] tile built from Bk (= B, [k][n]). Each
// B tile spans n 0..15, two n-tiles: n 0..7 is B, n 8..15 is B with its columns swapped in
// pairs (n = 8 + c holds B's column c ^ 1). The second n-tile's product must therefore be the
// first's with columns 2t and 2t + 1 exchanged; D holds the first's, and NaN wherever the
// second disagrees. D[0..128) through ldmatrix_b_pair, D[128..256) through
// ldmatrix_b_pair_trans.
extern "C" __global__ void selftest_mma_ldmatrix(const __nv_bfloat16* A, const __nv_bfloat16* Bt,
                                                 const __nv_bfloat16* Bk, float* D) {
    __shared__ __align__(16) __nv_bfloat16 As[16 * 16], Bn[16 * 16], Kn[16 * 16];  // [m][k], [n][k], [k][n]
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    // 80 chunks of 16 bytes: A (32), Bt into rows 0..7 of Bn (16), Bt's rows n ^ 1 into rows
    // 8..15 of Bn (16), Bk into columns 0..7 of Kn (16).
    for (int c = lane; c < 80; c += 32) {
        if (c < 32) {
            cp_async_16(As + c * 8, A + c * 8);
        } else if (c < 48) {
            cp_async_16(Bn + (c - 32) * 8, Bt + (c - 32) * 8);
        } else if (c < 64) {
            const int n = (c - 48) / 2, half = (c - 48) % 2;
            cp_async_16(Bn + (8 + n) * 16 + half * 8, Bt + (n ^ 1) * 16 + half * 8);
        } else {
            cp_async_16(Kn + (c - 64) * 16, Bk + (c - 64) * 8);
        }
    }
    // Columns 8..15 of Kn, element by element (the swap is inside a 16-byte row).
    for (int i = lane; i < 128; i += 32) {
        const int k = i / 8, n = i % 8;
        Kn[k * 16 + 8 + n] = Bk[k * 8 + (n ^ 1)];
    }
    cp_async_wait_all();
    __syncthreads();
    uint32_t a[4], b[2][2], bk[2][2];
    ldmatrix_a_frag(a, As, 0, 0, 16, lane);
    ldmatrix_b_pair(b[0], b[1], Bn, 0, 0, 16, lane);
    ldmatrix_b_pair_trans(bk[0], bk[1], Kn, 0, 0, 16, lane);
    float d[2][4] = {}, e[2][4] = {};
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        mma_bf16_16816(d[j], a, b[j], d[j]);
        mma_bf16_16816(e[j], a, bk[j], e[j]);
    }
    // Element i of a lane is column 2t + (i & 1): its partner in the swapped tile is i ^ 1.
    for (int i = 0; i < 4; ++i) {
        const int idx = frag_d_index(g, t, i);
        D[idx] = d[1][i ^ 1] == d[0][i] ? d[0][i] : NAN;
        D[128 + idx] = e[1][i ^ 1] == e[0][i] ? e[0][i] : NAN;
    }
}

// One warp (1 block of 32 threads): every ldmatrix form, read back raw. M holds 32 rows of 8
// b16 values (16 bytes each), copied to shared memory as they are; lane l gives the address of
// row rows[l] (a permutation, so each matrix's rows come from scattered addresses).
// out[32·r + l] = destination register r of lane l, registers in the order x1 (r = 0), x2 (1–2),
// x4 (3–6), then x1.trans (7), x2.trans (8–9), x4.trans (10–13): 14 × 32 words.
extern "C" __global__ void selftest_ldmatrix(const __nv_bfloat16* M, const int* rows, uint32_t* out) {
    __shared__ __align__(16) __nv_bfloat16 S[32 * 8];
    const int lane = threadIdx.x;
    reinterpret_cast<uint4*>(S)[lane] = reinterpret_cast<const uint4*>(M)[lane];
    __syncthreads();
    const __nv_bfloat16* row = S + 8 * rows[lane];
    uint32_t r[14];
    ldmatrix_x1(r, row);
    ldmatrix_x2(r + 1, row);
    ldmatrix_x4(r + 3, row);
    ldmatrix_x1_trans(r + 7, row);
    ldmatrix_x2_trans(r + 8, row);
    ldmatrix_x4_trans(r + 10, row);
#pragma unroll
    for (int i = 0; i < 14; ++i) out[32 * i + lane] = r[i];
}

// One warp (1 block of 32 threads): cp.async into shared memory pre-set to 0x5A5A5A5A, then
// the 256 shared words read back to out. Chunk c (16 bytes, 4 words of src) is copied by lane
// c mod 32: chunks 0..31 through cp_async_16_zfill (valid = src_bytes[c] != 0: whole copy or
// zero-fill), chunks 32..63 through cp_async_16_partial with src-size src_bytes[c] (0..16:
// that many source bytes, zeros after them).
extern "C" __global__ void selftest_cp_async_zfill(const int* src, const int* src_bytes, int* out) {
    __shared__ __align__(16) int s[256];
    const int lane = threadIdx.x;
    for (int i = lane; i < 256; i += 32) s[i] = 0x5A5A5A5A;
    __syncthreads();
    cp_async_16_zfill(s + 4 * lane, src + 4 * lane, src_bytes[lane] != 0);
    cp_async_16_partial(s + 4 * (lane + 32), src + 4 * (lane + 32), (unsigned)src_bytes[lane + 32]);
    cp_async_wait_all();
    __syncthreads();
    for (int i = lane; i < 256; i += 32) out[i] = s[i];
}

// Reads shared memory a cp.async is still filling: under the emulator it reads poison (NaN).
extern "C" __global__ void selftest_cp_async_unwaited_read(const float* x, float* y) {
    __shared__ __align__(16) float s[4];
    if (threadIdx.x == 0) {
        cp_async_16(s, x);
        cp_async_commit();
        y[0] = s[0];  // missing cp_async_wait: deliberately wrong
        cp_async_wait<0>();
        y[1] = s[1];
    }
}

// Broken on purpose: a __syncthreads() only half of the block reaches.
extern "C" __global__ void selftest_bad_divergent_barrier(float* y) {
    if (threadIdx.x < 16) __syncthreads();
    y[threadIdx.x] = 1.f;
    __syncthreads();
}

// Broken on purpose: lane 0 waits in a shuffle its warp never joins.
extern "C" __global__ void selftest_bad_deadlock(float* y) {
    float v = (float)threadIdx.x;
    if (threadIdx.x % 32 == 0) v = __shfl_sync(0xFFFFFFFFu, v, 1);
    __syncthreads();
    y[threadIdx.x] = v;
}

// Broken on purpose: half a warp leaves, the rest reduces with a full mask.
extern "C" __global__ void selftest_bad_partial_warp(float* y) {
    if (threadIdx.x % 32 >= 16) return;
    y[threadIdx.x] = warp_sum(1.f);
}

// Broken on purpose: exits with a cp.async never waited for.
extern "C" __global__ void selftest_bad_pending_copy(const float* x, float* y) {
    __shared__ __align__(16) float s[4];
    cp_async_16(s, x);
    cp_async_commit();
    y[threadIdx.x] = 0.f;
}

// y[i] = bf16(x[i]) through the emulator's (or the device's) round-to-nearest-even conversion.
extern "C" __global__ void selftest_bf16_round(const float* x, __nv_bfloat16* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __float2bfloat16_rn(x[i]);
}

// Broken on purpose (1 block of 64 threads, 256 bytes of dynamic shared memory): thread t
// stores s[t] and loads s[t ^ 32], written by a thread of the other warp, with no barrier in
// between. `dynamic` picks dynamic shared memory or a static __shared__ array. y[t] = the load.
extern "C" __global__ void selftest_bad_shared_race(float* y, int dynamic) {
    __shared__ float fixed[64];
    float* s = dynamic ? dynamic_smem<float>() : fixed;
    s[threadIdx.x] = (float)threadIdx.x;
    y[threadIdx.x] = s[threadIdx.x ^ 32];  // deliberately no __syncthreads() before
}
