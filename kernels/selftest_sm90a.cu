// Hopper emulator self-tests (tests/hostsim_sm90a.rs): kernels that pin down the semantics of
// the sm_90a wrappers (kernels/common/hopper_sm90a.cuh) — wgmma with every operand layout and
// both A sources, mbarrier phases — and deliberately broken kernels the emulator must reject.
// Built for sm_90a only, like every *_sm90a.cu; on an H100/H200 their raw outputs can become
// hardware truth the emulator is replayed against (src/truth.rs).
#include "common/portable.cuh"
#include "common/hopper_sm90a.cuh"

// One warpgroup (1 block of 128 threads, `image_bytes` of dynamic shared memory, a multiple of
// 16): D (64×N f32) = Σ_s A_s·B_s over `steps` (≥ 1) wgmma k-steps of 16.
// - image: copied verbatim to the start of dynamic shared memory, holding the A and B tiles in
//   whatever layout the descriptors describe (the window starts on a 1024-byte boundary on the
//   GPU and in the emulator, so the image's offsets keep their swizzle phase).
// - descs_a[s], descs_b[s]: the matrix descriptors of step s, start addresses relative to the
//   window (the kernel adds the window's shared address).
// - mode: bit 0 A MN-major (trans-a), bit 1 B MN-major (trans-b), bit 2 A from registers:
//   then a_regs[(s·128 + t)·4 + j] is word j of thread t's A fragment of step s.
// - d[t·N/2 + v]: value v of thread t's raw accumulator fragment after wait_group 0.
template <int N, int Mode>
__device__ __forceinline__ void wgmma_steps(float (&acc)[N / 2], const uint32_t* a_regs, const unsigned long long* da,
                                            const unsigned long long* db, uint64_t base, int steps) {
    for (int s = 0; s < steps; ++s) {
        if constexpr (Mode & 4) {
            const uint32_t* r = a_regs + (s * 128 + threadIdx.x) * 4;
            const uint32_t a[4] = {r[0], r[1], r[2], r[3]};
            wgmma_bf16_rs<N, (Mode >> 1) & 1>(acc, a, db[s] + base, s > 0);
        } else {
            wgmma_bf16_ss<N, Mode & 1, (Mode >> 1) & 1>(acc, da[s] + base, db[s] + base, s > 0);
        }
    }
}

template <int N>
__device__ __forceinline__ void wgmma_selftest(const unsigned char* image, int image_bytes, const uint32_t* a_regs,
                                               const unsigned long long* descs_a, const unsigned long long* descs_b,
                                               int steps, int mode, float* d) {
    unsigned char* smem = dynamic_smem<unsigned char>();
    for (int i = threadIdx.x * 16; i < image_bytes; i += 128 * 16)
        *reinterpret_cast<uint4*>(smem + i) = *reinterpret_cast<const uint4*>(image + i);
    fence_proxy_async();  // the ordinary stores above, before the wgmma reads them
    __syncthreads();
    const uint64_t base = smem_address(smem) >> 4;  // the start-address field of the window
    // Not zeroed: the first step overwrites (scale-d 0). Zeroing them in the thread would
    // make ptxas serialize the wgmma pipeline (C7515).
    float acc[N / 2];
    wgmma_fence();
    switch (mode) {
        case 0: wgmma_steps<N, 0>(acc, a_regs, descs_a, descs_b, base, steps); break;
        case 1: wgmma_steps<N, 1>(acc, a_regs, descs_a, descs_b, base, steps); break;
        case 2: wgmma_steps<N, 2>(acc, a_regs, descs_a, descs_b, base, steps); break;
        case 3: wgmma_steps<N, 3>(acc, a_regs, descs_a, descs_b, base, steps); break;
        case 4: wgmma_steps<N, 4>(acc, a_regs, descs_a, descs_b, base, steps); break;
        default: wgmma_steps<N, 6>(acc, a_regs, descs_a, descs_b, base, steps); break;
    }
    wgmma_commit();
    wgmma_wait<0>();
#pragma unroll
    for (int v = 0; v < N / 2; ++v) d[threadIdx.x * (N / 2) + v] = acc[v];
}

extern "C" __global__ void __launch_bounds__(128) selftest_wgmma_n64(const unsigned char* image, int image_bytes,
                                                                     const uint32_t* a_regs,
                                                                     const unsigned long long* descs_a,
                                                                     const unsigned long long* descs_b, int steps,
                                                                     int mode, float* d) {
    wgmma_selftest<64>(image, image_bytes, a_regs, descs_a, descs_b, steps, mode, d);
}

extern "C" __global__ void __launch_bounds__(128) selftest_wgmma_n128(const unsigned char* image, int image_bytes,
                                                                      const uint32_t* a_regs,
                                                                      const unsigned long long* descs_a,
                                                                      const unsigned long long* descs_b, int steps,
                                                                      int mode, float* d) {
    wgmma_selftest<128>(image, image_bytes, a_regs, descs_a, descs_b, steps, mode, d);
}

extern "C" __global__ void __launch_bounds__(128) selftest_wgmma_n256(const unsigned char* image, int image_bytes,
                                                                      const uint32_t* a_regs,
                                                                      const unsigned long long* descs_a,
                                                                      const unsigned long long* descs_b, int steps,
                                                                      int mode, float* d) {
    wgmma_selftest<256>(image, image_bytes, a_regs, descs_a, descs_b, steps, mode, d);
}

// A two-stage producer/consumer ring over mbarriers (1 block of 128 threads, 64 bytes of
// dynamic shared memory): warp 0 produces `iters` rounds of 32 floats, round r = x[r·32 ..];
// warps 1..3 consume them. full[s]: one arrival (lane 0's arrive.expect_tx of 128 bytes, after
// 128 bytes of complete_tx); empty[s]: 96 arrivals, one per consumer. Round r uses stage r % 2
// and waits for the parity of its use count, (r / 2) % 2; the producer's first wait on each
// fresh empty barrier passes at once (parity 1). Consumer thread c (0..95) writes
// y[c] = Σ_r x[r·32 + c % 32] · (r + 1).
extern "C" __global__ void __launch_bounds__(128) selftest_mbarrier_ring(const float* x, float* y, int iters) {
    uint64_t* full = dynamic_smem<uint64_t>();
    uint64_t* empty = full + 2;
    float* data = reinterpret_cast<float*>(full + 4);  // 2 stages of 32 floats
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (threadIdx.x == 0) {
        for (int s = 0; s < 2; ++s) {
            mbarrier_init(&full[s], 1);
            mbarrier_init(&empty[s], 96);
        }
        fence_mbarrier_init();
    }
    __syncthreads();
    if (warp == 0) {
        for (int r = 0; r < iters; ++r) {
            const int s = r % 2;
            mbarrier_wait_parity(&empty[s], ((r / 2) % 2) ^ 1);
            data[s * 32 + lane] = x[r * 32 + lane];
            __syncwarp();
            if (lane == 0) {
                mbarrier_complete_tx(&full[s], 128);
                mbarrier_arrive_expect_tx(&full[s], 128);
            }
        }
    } else {
        float sum = 0.f;
        for (int r = 0; r < iters; ++r) {
            const int s = r % 2;
            mbarrier_wait_parity(&full[s], (r / 2) % 2);
            sum += data[s * 32 + lane] * (float)(r + 1);
            mbarrier_arrive(&empty[s]);
        }
        y[threadIdx.x - 32] = sum;
    }
}

// Broken on purpose (1 block of 128 threads, 8 bytes of dynamic shared memory): everyone waits
// for the barrier's first phase (parity 0), which thread 0 completes, then for the next one
// (parity 1), which nobody arrives on: a wait with the parity of the current phase hangs.
extern "C" __global__ void selftest_bad_mbarrier_parity(float* y) {
    uint64_t* bar = dynamic_smem<uint64_t>();
    if (threadIdx.x == 0) {
        mbarrier_init(bar, 1);
        fence_mbarrier_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) mbarrier_arrive(bar);
    mbarrier_wait_parity(bar, 0);
    mbarrier_wait_parity(bar, 1);  // deliberately wrong: phase 1 never completes
    y[threadIdx.x] = 1.f;
}

// Broken on purpose (same shape): 2 arrivals expected, one happens.
extern "C" __global__ void selftest_bad_mbarrier_deadlock(float* y) {
    uint64_t* bar = dynamic_smem<uint64_t>();
    if (threadIdx.x == 0) {
        mbarrier_init(bar, 2);
        fence_mbarrier_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) mbarrier_arrive(bar);
    mbarrier_wait_parity(bar, 0);
    y[threadIdx.x] = 1.f;
}

// Broken on purpose (same shape): expect_tx announces `expected` bytes and `arrived` complete.
extern "C" __global__ void selftest_bad_mbarrier_expect_tx(float* y, unsigned expected, unsigned arrived) {
    uint64_t* bar = dynamic_smem<uint64_t>();
    if (threadIdx.x == 0) {
        mbarrier_init(bar, 1);
        fence_mbarrier_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        mbarrier_arrive_expect_tx(bar, expected);
        mbarrier_complete_tx(bar, arrived);
    }
    mbarrier_wait_parity(bar, 0);
    y[threadIdx.x] = 1.f;
}

// Broken on purpose (1 block of 128 threads, 2048 bytes of dynamic shared memory): reads the
// accumulators between the wgmma and its wait_group. A and B are 1.0 (K-major, no swizzle):
// every product element is 16. y[t] = the first accumulator value before the wait (the
// emulator: NaN), y[128 + t] = after it (16).
extern "C" __global__ void __launch_bounds__(128) selftest_bad_wgmma_missing_wait(float* y) {
    __nv_bfloat16* tile = dynamic_smem<__nv_bfloat16>();
    for (int i = threadIdx.x; i < 1024; i += 128) tile[i] = __float2bfloat16(1.f);
    fence_proxy_async();
    __syncthreads();
    const uint32_t start = smem_address(tile);
    const uint64_t desc = make_matrix_desc(start, 128, 256, 0);
    float acc[32];
#pragma unroll
    for (int v = 0; v < 32; ++v) acc[v] = 0.f;
    wgmma_fence();
    wgmma_bf16_ss<64, 0, 0>(acc, desc, desc, false);
    wgmma_commit();
    y[threadIdx.x] = acc[0];  // deliberately wrong: no wgmma_wait before the read
    wgmma_wait<0>();
    y[128 + threadIdx.x] = acc[0];
}

// Broken on purpose (1 block of 96 threads): a warpgroup instruction without its 4th warp.
extern "C" __global__ void selftest_bad_wgmma_partial_warpgroup(float* y) {
    wgmma_fence();
    y[threadIdx.x] = 1.f;
}

// --- TMA -------------------------------------------------------------------------------------
// One TMA box through shared memory and back (1 block of 128 threads; dynamic shared memory:
// 1024 + box_bytes, the mbarrier at 0, the tile at 1024). coords[0..rank) is the box origin.
// Thread 0 arms the barrier with expect_bytes and loads the box with load_map; flags:
// - bit 0: thread 0 copies the tile to tile_out[0 .. box_bytes) before waiting (deliberately
//   wrong: the emulator's tile is poison until the wait);
// - after the wait every thread copies the tile to tile_out[box_bytes .. 2·box_bytes) (raw:
//   swizzled as it lies in shared memory);
// - bit 1: then every byte of the tile is XORed with 0x5A by ordinary stores, fenced for the
//   async proxy (unless bit 2: deliberately missing) and stored with store_map at the same
//   coordinates by thread 0.
__device__ __forceinline__ void tma_load_rank(void* dst, const CUtensorMap* map, uint64_t* bar, int rank,
                                              const int* c) {
    switch (rank) {
        case 2: tma_load_2d(dst, map, bar, c[0], c[1]); break;
        case 3: tma_load_3d(dst, map, bar, c[0], c[1], c[2]); break;
        case 4: tma_load_4d(dst, map, bar, c[0], c[1], c[2], c[3]); break;
        default: tma_load_5d(dst, map, bar, c[0], c[1], c[2], c[3], c[4]); break;
    }
}

__device__ __forceinline__ void tma_store_rank(const CUtensorMap* map, const void* src, int rank, const int* c) {
    switch (rank) {
        case 2: tma_store_2d(map, src, c[0], c[1]); break;
        case 3: tma_store_3d(map, src, c[0], c[1], c[2]); break;
        case 4: tma_store_4d(map, src, c[0], c[1], c[2], c[3]); break;
        default: tma_store_5d(map, src, c[0], c[1], c[2], c[3], c[4]); break;
    }
}

extern "C" __global__ void __launch_bounds__(128) selftest_tma(const __grid_constant__ CUtensorMap load_map,
                                                               const __grid_constant__ CUtensorMap store_map,
                                                               int rank, const int* coords, unsigned expect_bytes,
                                                               unsigned box_bytes, int flags,
                                                               unsigned char* tile_out) {
    uint64_t* bar = dynamic_smem<uint64_t>();
    unsigned char* tile = reinterpret_cast<unsigned char*>(bar) + 1024;
    if (threadIdx.x == 0) {
        mbarrier_init(bar, 1);
        fence_mbarrier_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        mbarrier_arrive_expect_tx(bar, expect_bytes);
        tma_load_rank(tile, &load_map, bar, rank, coords);
        if (flags & 1)
            for (unsigned i = 0; i < box_bytes; ++i) tile_out[i] = tile[i];  // deliberately before the wait
    }
    mbarrier_wait_parity(bar, 0);
    for (unsigned i = threadIdx.x; i < box_bytes; i += 128) tile_out[box_bytes + i] = tile[i];
    if (flags & 2) {
        __syncthreads();  // every thread has read the tile
        for (unsigned i = threadIdx.x; i < box_bytes; i += 128) tile[i] ^= 0x5A;
        if (!(flags & 4)) fence_proxy_async();
        __syncthreads();
        if (threadIdx.x == 0) {
            tma_store_rank(&store_map, tile, rank, coords);
            tma_store_commit();
            tma_store_wait<0>();
        }
    }
}

// TMA feeding wgmma end to end (1 block of 128 threads; dynamic shared memory 3·8192 + 8):
// D (64×64 f32, raw accumulator fragments as in selftest_wgmma) = A (64×64) · Bᵀ, A and B
// row-major bf16 in global memory ([m][k], [n][k]; rows past the tensor's end and k past its
// width load as zeros). Both maps: a 64 (k) × 64 (rows) box with 128-byte swizzle, so each
// tile is 64 rows of 128 bytes, K-major, in the canonical 128-byte-swizzled layout: 4 k-steps
// 32 bytes apart within the rows, 8-row groups 1024 bytes apart.
extern "C" __global__ void __launch_bounds__(128) selftest_tma_wgmma(const __grid_constant__ CUtensorMap a_map,
                                                                     const __grid_constant__ CUtensorMap b_map,
                                                                     float* d) {
    unsigned char* smem = dynamic_smem<unsigned char>();
    unsigned char* a_tile = smem;
    unsigned char* b_tile = smem + 8192;
    uint64_t* bar = reinterpret_cast<uint64_t*>(smem + 16384);
    if (threadIdx.x == 0) {
        mbarrier_init(bar, 1);
        fence_mbarrier_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        mbarrier_arrive_expect_tx(bar, 2 * 8192);
        tma_load_2d(a_tile, &a_map, bar, 0, 0);
        tma_load_2d(b_tile, &b_map, bar, 0, 0);
    }
    mbarrier_wait_parity(bar, 0);
    float acc[32];
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 4; ++s)
        wgmma_bf16_ss<64, 0, 0>(acc, make_matrix_desc(smem_address(a_tile) + 32 * s, 16, 1024, 128),
                                make_matrix_desc(smem_address(b_tile) + 32 * s, 16, 1024, 128), s > 0);
    wgmma_commit();
    wgmma_wait<0>();
#pragma unroll
    for (int v = 0; v < 32; ++v) d[threadIdx.x * 32 + v] = acc[v];
}

// Broken on purpose (1 block of 128 threads, 2048 bytes of dynamic shared memory): the wgmma
// operands are written by ordinary stores with no fence.proxy.async before the wgmma.
extern "C" __global__ void __launch_bounds__(128) selftest_bad_wgmma_missing_proxy_fence(float* y) {
    __nv_bfloat16* tile = dynamic_smem<__nv_bfloat16>();
    for (int i = threadIdx.x; i < 1024; i += 128) tile[i] = __float2bfloat16(1.f);
    __syncthreads();  // deliberately no fence_proxy_async()
    const uint64_t desc = make_matrix_desc(smem_address(tile), 128, 256, 0);
    float acc[32];
    wgmma_fence();
    wgmma_bf16_ss<64, 0, 0>(acc, desc, desc, false);
    wgmma_commit();
    wgmma_wait<0>();
    y[threadIdx.x] = acc[0];
}

// --- warpgroup registers and named barriers --------------------------------------------------
// Warp specialisation in miniature (1 block of 256 threads, `rounds` ≥ 1): warpgroup 0 lowers
// its registers and produces, warpgroup 1 raises them and consumes, handing each round over
// through named barriers 1 ("full": producer bar.arrive, consumer bar.sync, 256 threads) and 2
// ("empty": the reverse), with a static buffer of 128 floats. Consumer thread c writes
// y[c] = Σ_r x[r·128 + c]·(r + 1); y[128 + c] = the sum of the same round's values over its
// warp (a warp reduction inside the consumer warpgroup, named barrier 3 over its 128 threads
// first). The launch bounds name 1 block per SM: ptxas needs them to know the register count at
// entry, or it ignores setmaxnreg (C7508, which strict builds refuse).
extern "C" __global__ void __launch_bounds__(256, 1) selftest_warp_specialized(const float* x, float* y, int rounds) {
    __shared__ float buf[128];
    const int wg = threadIdx.x / 128, t = threadIdx.x % 128;
    if (wg == 0) {
        setmaxnreg_dec<40>();
        for (int r = 0; r < rounds; ++r) {
            if (r > 0) named_barrier_sync(2, 256);  // the consumers are done with round r - 1
            buf[t] = x[r * 128 + t];
            named_barrier_arrive(1, 256);
        }
    } else {
        setmaxnreg_inc<232>();
        float sum = 0.f, last = 0.f;
        for (int r = 0; r < rounds; ++r) {
            named_barrier_sync(1, 256);
            last = buf[t];
            sum += last * (float)(r + 1);
            if (r + 1 < rounds) named_barrier_arrive(2, 256);
        }
        named_barrier_sync(3, 128);
        for (int m = 16; m > 0; m /= 2) last += __shfl_xor_sync(0xFFFFFFFFu, last, m);
        y[t] = sum;
        y[128 + t] = last;
    }
}

// Broken on purpose (1 block of 128 threads): warp 3 asks setmaxnreg for another count.
extern "C" __global__ void __launch_bounds__(128, 1) selftest_bad_setmaxnreg_divergent(float* y) {
    if (threadIdx.x < 96) setmaxnreg_inc<232>();
    else setmaxnreg_inc<240>();
    y[threadIdx.x] = 1.f;
}

// Broken on purpose (1 block of 128 threads): bar.sync 1 for 128 threads, which warp 3 never
// reaches.
extern "C" __global__ void __launch_bounds__(128) selftest_bad_named_barrier(float* y) {
    if (threadIdx.x < 96) named_barrier_sync(1, 128);
    y[threadIdx.x] = 1.f;
}
