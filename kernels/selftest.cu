// Emulator self-tests (tests/hostsim.rs): kernels that pin down the semantics hostsim must
// reproduce — warp collectives, block reductions, the mma.sync / ldmatrix fragment layouts,
// cp.async — and deliberately broken kernels the emulator must reject. They compile for the
// GPU too, where the fragment-layout kernels double as a hostsim ↔ hardware parity check.
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

// One warp: D[16×8] = A[16×16]·B[16×8] with fragments assembled straight from global memory by
// the PTX register layout (no ldmatrix). A row-major [16][16], Bt = Bᵀ row-major [8][16].
extern "C" __global__ void selftest_mma_fragments(const __nv_bfloat16* A, const __nv_bfloat16* Bt, float* D) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    auto pack = [](__nv_bfloat16 lo, __nv_bfloat16 hi) {
        return (uint32_t)__bfloat16_as_ushort(lo) | (uint32_t)__bfloat16_as_ushort(hi) << 16;
    };
    uint32_t a[4], b[2];
    for (int r = 0; r < 4; ++r) {
        const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
        a[r] = pack(A[row * 16 + col], A[row * 16 + col + 1]);
    }
    for (int r = 0; r < 2; ++r) b[r] = pack(Bt[g * 16 + 2 * t + 8 * r], Bt[g * 16 + 2 * t + 8 * r + 1]);
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    mma_bf16_16816(d, a, b, d);
    for (int i = 0; i < 4; ++i) D[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = d[i];
}

// One warp: the same product with operands staged by cp.async and loaded by ldmatrix: A with
// ldmatrix_x4, B from Bt ([n][k]) with ldmatrix_x2 and from Bk ([k][n] = B) with
// ldmatrix_x2_trans. D[0..128) from the first, D[128..256) from the second.
extern "C" __global__ void selftest_mma_ldmatrix(const __nv_bfloat16* A, const __nv_bfloat16* Bt,
                                                 const __nv_bfloat16* Bk, float* D) {
    __shared__ __align__(16) __nv_bfloat16 As[16 * 16], Bts[8 * 16], Bks[16 * 8];
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    // 512 + 256 + 256 bytes = 64 chunks of 16 bytes, two per lane.
    for (int c = lane; c < 64; c += 32) {
        if (c < 32)
            cp_async_16(As + c * 8, A + c * 8);
        else if (c < 48)
            cp_async_16(Bts + (c - 32) * 8, Bt + (c - 32) * 8);
        else
            cp_async_16(Bks + (c - 48) * 8, Bk + (c - 48) * 8);
    }
    cp_async_wait_all();
    __syncthreads();
    uint32_t a[4], b[2], bk[2];
    ldmatrix_x4(a, As + ((lane & 7) + 8 * ((lane >> 3) & 1)) * 16 + 8 * (lane >> 4));
    ldmatrix_x2(b, Bts + (lane & 7) * 16 + 8 * ((lane >> 3) & 1));
    ldmatrix_x2_trans(bk, Bks + ((lane & 7) + 8 * ((lane >> 3) & 1)) * 8);
    float d[4] = {0.f, 0.f, 0.f, 0.f}, e[4] = {0.f, 0.f, 0.f, 0.f};
    mma_bf16_16816(d, a, b, d);
    mma_bf16_16816(e, a, bk, e);
    for (int i = 0; i < 4; ++i) {
        const int idx = (g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1);
        D[idx] = d[i];
        D[128 + idx] = e[i];
    }
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
