// Hopper (sm_90a) wrappers: mbarrier and wgmma, for the kernels/*_sm90a.cu files only. Each
// wrapper has the real instruction for the device pass (__CUDA_ARCH__) and an emulated twin in
// hostsim.h (g++), as in mma.cuh. Semantics: PTX ISA, "mbarrier" and "Asynchronous
// Warpgroup Level Matrix Multiply-Accumulate" (wgmma); the emulation's rules are summarised at
// the top of hostsim.h.
//
// Rules the emulator checks: mbarriers and wgmma operands live in dynamic shared memory; the
// warpgroup instructions are executed by all 128 threads of a warpgroup (4 whole warps, the
// block a multiple of 128 threads); a wgmma.fence precedes the first wgmma after the start and
// after every wait_group; every wgmma is waited for before the thread exits.
#pragma once
#include "portable.cuh"
#if !defined(HOSTSIM)
#include <cuda.h>  // CUtensorMap
#endif

// The caller's source line reaches the emulator's deadlock report of a blocking wait.
#if defined(HOSTSIM)
#define UPX_CALLER , const std::source_location caller = std::source_location::current()
#define UPX_PASS_CALLER , caller
#else
#define UPX_CALLER
#define UPX_PASS_CALLER
#endif

// The shared-memory address of a pointer into shared memory (the emulator: its offset in the
// 1024-byte-aligned dynamic shared memory).
__device__ __forceinline__ uint32_t smem_address(const void* p) {
#if defined(__CUDA_ARCH__)
    return (uint32_t)__cvta_generic_to_shared(p);
#elif !defined(__CUDACC__)
    return hostsim::smem_address(p, "shared address");
#else
    return 0;  // nvcc's host pass: never called
#endif
}

// --- mbarrier ------------------------------------------------------------------------------
// A 64-bit barrier object in shared memory (8-byte aligned). A phase completes when `count`
// arrivals (init) have happened and every transaction byte announced by expect_tx has been
// completed; the barrier then starts the next phase. Waits name a phase by its parity: the
// first phase has parity 0, and a wait for the parity of the phase before the current one
// returns at once (so a producer's first wait on a fresh "empty" barrier uses parity 1).

// One thread initialises; fence_mbarrier_init and a __syncthreads publish it to the block.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
#if defined(__CUDA_ARCH__)
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(bar)), "r"(count) : "memory");
#elif !defined(__CUDACC__)
    hostsim::mbarrier_init(bar, count);
#endif
}

__device__ __forceinline__ void fence_mbarrier_init() {
#if defined(__CUDA_ARCH__)
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// Orders this thread's ordinary shared-memory stores before later async-proxy reads (wgmma
// operands, TMA stores). The emulator reports an async-proxy read of bytes stored after the
// last fence (hostsim::check_async_read).
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH__)
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#elif !defined(__CUDACC__)
    hostsim::fence_proxy_async();
#endif
}

// One arrival (release semantics: this thread's earlier writes are visible to the waiters).
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#if defined(__CUDA_ARCH__)
    asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(smem_address(bar))
                 : "memory");
#elif !defined(__CUDACC__)
    hostsim::mbarrier_arrive(bar, 0);
#endif
}

// Announces `bytes` transaction bytes for the current phase, then arrives.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__)
    asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(
                     smem_address(bar)),
                 "r"(bytes)
                 : "memory");
#elif !defined(__CUDACC__)
    hostsim::mbarrier_arrive(bar, bytes);
#endif
}

// Completes `bytes` of the current phase's transactions (what a TMA load does on arrival).
// Relaxed: it publishes no data by itself.
__device__ __forceinline__ void mbarrier_complete_tx(uint64_t* bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__)
    asm volatile("mbarrier.complete_tx.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(bar)), "r"(bytes) : "memory");
#elif !defined(__CUDACC__)
    hostsim::mbarrier_complete_tx(bar, bytes);
#endif
}

// True once the phase of parity `parity` has completed (acquire semantics). The hardware may
// also return false after a time limit; the emulator suspends the thread until it is true.
__device__ __forceinline__ bool mbarrier_try_wait_parity(uint64_t* bar, uint32_t parity UPX_CALLER) {
#if defined(__CUDA_ARCH__)
    uint32_t done;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_address(bar)), "r"(parity)
        : "memory");
    return done != 0;
#elif !defined(__CUDACC__)
    return hostsim::mbarrier_try_wait_parity(bar, parity, caller);
#else
    return true;  // nvcc's host pass: never called
#endif
}

__device__ __forceinline__ void mbarrier_wait_parity(uint64_t* bar, uint32_t parity UPX_CALLER) {
    while (!mbarrier_try_wait_parity(bar, parity UPX_PASS_CALLER)) {
    }
}

// --- wgmma ---------------------------------------------------------------------------------
// D (64×N f32) = A (64×16 bf16) · B (16×N bf16) (+ D), one instruction per warpgroup.
// Accumulator fragment (N/2 floats per thread t of the warpgroup): value v is
// D[16·(t/32) + (t%32)/4 + 8·((v/2)%2)][8·(v/4) + 2·(t%4) + v%2]. A in registers: 4 words per
// thread holding A[16·(t/32) + (t%32)/4 + 8·((i/2)%2)][8·(i/4) + 2·(t%4) + i%2] as element i
// (word i/2, low half first). Shared-memory operands go by a matrix descriptor
// (make_matrix_desc); B is stored N×K: K-major (TransB = 0) has k contiguous, MN-major
// (TransB = 1) has n contiguous, and likewise A (M×K) with TransA.

// The 64-bit matrix descriptor: start address, leading and stride dimension byte offsets (all
// multiples of 16, below 256 KiB), swizzle span 0 (none), 32, 64 or 128 bytes. The base offset
// is 0: swizzled operands start on their pattern's boundary (1024, 512, 256 bytes) or at a
// multiple of 16 bytes within the first 128-byte row of it (a k-step inside a K-major row).
__device__ __forceinline__ uint64_t make_matrix_desc(uint32_t start, uint32_t lbo, uint32_t sbo, int swizzle_bytes) {
    const uint64_t mode = swizzle_bytes == 128 ? 1 : swizzle_bytes == 64 ? 2 : swizzle_bytes == 32 ? 3 : 0;
    return (uint64_t)((start & 0x3FFFF) >> 4) | (uint64_t)((lbo & 0x3FFFF) >> 4) << 16 |
           (uint64_t)((sbo & 0x3FFFF) >> 4) << 32 | mode << 62;
}

// Orders earlier register writes (accumulators, A fragments) before the next wgmma: needed
// before the first wgmma and after every wait_group.
__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH__)
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#elif !defined(__CUDACC__)
    hostsim::wgmma_fence();
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH__)
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#elif !defined(__CUDACC__)
    hostsim::wgmma_commit();
#endif
}

// Waits until at most N committed groups of the warpgroup are in flight; the accumulators of
// the completed ones are valid from here on.
template <int N> __device__ __forceinline__ void wgmma_wait() {
#if defined(__CUDA_ARCH__)
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#elif !defined(__CUDACC__)
    hostsim::wgmma_wait(N);
#endif
}

// Operand lists of the accumulator registers (%0 .. %(N/2 - 1)).
#define UPX_WG_D16 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define UPX_WG_D32                                                                                      \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
    "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define UPX_WG_D64                                                                                       \
    UPX_WG_D32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, " \
               "%49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define UPX_WG_D128                                                                                     \
    UPX_WG_D64 ", %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, " \
               "%81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, "    \
               "%98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, "  \
               "%113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define UPX_WG_F4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define UPX_WG_F16(i) UPX_WG_F4(i), UPX_WG_F4(i + 4), UPX_WG_F4(i + 8), UPX_WG_F4(i + 12)
#define UPX_WG_F32(i) UPX_WG_F16(i), UPX_WG_F16(i + 16)
#define UPX_WG_F64(i) UPX_WG_F32(i), UPX_WG_F32(i + 32)
#define UPX_WG_F128(i) UPX_WG_F64(i), UPX_WG_F64(i + 64)

// A and B from shared memory. `accumulate` false: D = A·B (the registers' old values unread).
template <int N, int TransA, int TransB>
__device__ __forceinline__ void wgmma_bf16_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,
                                              bool accumulate UPX_CALLER) {
    static_assert(N == 64 || N == 128 || N == 256, "wgmma_bf16_ss: N is 64, 128 or 256");
#if defined(__CUDA_ARCH__)
    const int acc = accumulate;
// Operands after the accumulators: descriptor A (%a), descriptor B, accumulate, TransA, TransB.
#define UPX_WGMMA_SS(n, regs, a, b, acc, ta, tb)                                                      \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %" #acc ", 0;\nwgmma.mma_async.sync.aligned.m64n" #n          \
    "k16.f32.bf16.bf16 {" regs "}, %" #a ", %" #b ", p, 1, 1, %" #ta ", %" #tb ";\n}\n"
    if constexpr (N == 64) {
        asm volatile(UPX_WGMMA_SS(64, UPX_WG_D32, 32, 33, 34, 35, 36)
                     : UPX_WG_F32(0)
                     : "l"(desc_a), "l"(desc_b), "r"(acc), "n"(TransA), "n"(TransB));
    } else if constexpr (N == 128) {
        asm volatile(UPX_WGMMA_SS(128, UPX_WG_D64, 64, 65, 66, 67, 68)
                     : UPX_WG_F64(0)
                     : "l"(desc_a), "l"(desc_b), "r"(acc), "n"(TransA), "n"(TransB));
    } else {
        asm volatile(UPX_WGMMA_SS(256, UPX_WG_D128, 128, 129, 130, 131, 132)
                     : UPX_WG_F128(0)
                     : "l"(desc_a), "l"(desc_b), "r"(acc), "n"(TransA), "n"(TransB));
    }
#undef UPX_WGMMA_SS
#elif !defined(__CUDACC__)
    hostsim::wgmma(d, N, nullptr, desc_a, desc_b, TransA, TransB, accumulate, caller);
#endif
}

// A from registers (the fragment above, 4 words per thread), B from shared memory.
template <int N, int TransB>
__device__ __forceinline__ void wgmma_bf16_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b,
                                              bool accumulate UPX_CALLER) {
    static_assert(N == 32 || N == 64 || N == 128 || N == 256, "wgmma_bf16_rs: N is 32, 64, 128 or 256");
#if defined(__CUDA_ARCH__)
    const int acc = accumulate;
// Operands after the accumulators: A's 4 words (%a0..), descriptor B, accumulate, TransB.
#define UPX_WGMMA_RS(n, regs, a0, a1, a2, a3, b, acc, tb)                                             \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %" #acc ", 0;\nwgmma.mma_async.sync.aligned.m64n" #n          \
    "k16.f32.bf16.bf16 {" regs "}, {%" #a0 ", %" #a1 ", %" #a2 ", %" #a3 "}, %" #b ", p, 1, 1, %" #tb ";\n}\n"
    if constexpr (N == 32) {
        asm volatile(UPX_WGMMA_RS(32, UPX_WG_D16, 16, 17, 18, 19, 20, 21, 22)
                     : UPX_WG_F16(0)
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(acc), "n"(TransB));
    } else if constexpr (N == 64) {
        asm volatile(UPX_WGMMA_RS(64, UPX_WG_D32, 32, 33, 34, 35, 36, 37, 38)
                     : UPX_WG_F32(0)
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(acc), "n"(TransB));
    } else if constexpr (N == 128) {
        asm volatile(UPX_WGMMA_RS(128, UPX_WG_D64, 64, 65, 66, 67, 68, 69, 70)
                     : UPX_WG_F64(0)
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(acc), "n"(TransB));
    } else {
        asm volatile(UPX_WGMMA_RS(256, UPX_WG_D128, 128, 129, 130, 131, 132, 133, 134)
                     : UPX_WG_F128(0)
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(acc), "n"(TransB));
    }
#undef UPX_WGMMA_RS
#elif !defined(__CUDACC__)
    hostsim::wgmma(d, N, a, 0, desc_b, false, TransB, accumulate, caller);
#endif
}

// --- TMA -----------------------------------------------------------------------------------
// Tile copies between global memory and shared memory through a tensor map that the host
// built with TensorMapSpec::encode (src/runtime/tensor_map.rs), passed to the kernel as a
// `const __grid_constant__ CUtensorMap` parameter. Coordinates are in elements, dimension 0
// innermost, and may be negative or run past the tensor: those elements load as zeros and are
// not stored. The shared side is the box packed densely (dimension 0 fastest), swizzled on the
// absolute address as the tensor map says; it is 128-byte aligned, or 8·span-byte aligned when
// swizzled (1024 for 128 B), so the pattern is the one wgmma descriptors with base offset 0
// read.

// Load: the box lands in dst and its full byte count (out-of-range elements included)
// completes on `bar`, which a thread armed with mbarrier_arrive_expect_tx. Read dst only after
// waiting on the barrier's phase (the emulator: until then it is poison).
#if defined(__CUDA_ARCH__)
#define UPX_TMA_LOAD(dim, coords, ...)                                                                        \
    asm volatile("cp.async.bulk.tensor." #dim "d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], " \
                 "[%1, {" coords "}], [%2];\n" ::"r"(smem_address(dst)),                                         \
                 "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_address(bar)), __VA_ARGS__                       \
                 : "memory")
#endif
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1) {
#if defined(__CUDA_ARCH__)
    UPX_TMA_LOAD(2, "%3, %4", "r"(c0), "r"(c1));
#elif !defined(__CUDACC__)
    const int c[] = {c0, c1};
    hostsim::tma_load(dst, map, bar, c, 2);
#endif
}
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1,
                                            int c2) {
#if defined(__CUDA_ARCH__)
    UPX_TMA_LOAD(3, "%3, %4, %5", "r"(c0), "r"(c1), "r"(c2));
#elif !defined(__CUDACC__)
    const int c[] = {c0, c1, c2};
    hostsim::tma_load(dst, map, bar, c, 3);
#endif
}
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1,
                                            int c2, int c3) {
#if defined(__CUDA_ARCH__)
    UPX_TMA_LOAD(4, "%3, %4, %5, %6", "r"(c0), "r"(c1), "r"(c2), "r"(c3));
#elif !defined(__CUDACC__)
    const int c[] = {c0, c1, c2, c3};
    hostsim::tma_load(dst, map, bar, c, 4);
#endif
}
__device__ __forceinline__ void tma_load_5d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1,
                                            int c2, int c3, int c4) {
#if defined(__CUDA_ARCH__)
    UPX_TMA_LOAD(5, "%3, %4, %5, %6, %7", "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4));
#elif !defined(__CUDACC__)
    const int c[] = {c0, c1, c2, c3, c4};
    hostsim::tma_load(dst, map, bar, c, 5);
#endif
}
#undef UPX_TMA_LOAD

// Store: the box from src (written by ordinary stores: fence_proxy_async first) to global
// memory, in this thread's current bulk group (tma_store_commit); src may change, and the
// global bytes are complete, after tma_store_wait.
#if defined(__CUDA_ARCH__)
#define UPX_TMA_STORE(dim, coords, ...)                                                                          \
    asm volatile("cp.async.bulk.tensor." #dim "d.global.shared::cta.tile.bulk_group [%0, {" coords "}], [%1];\n" :: \
                     "l"(reinterpret_cast<uint64_t>(map)),                                                        \
                 "r"(smem_address(src)), __VA_ARGS__                                                              \
                 : "memory")
#endif
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, const void* src, int c0, int c1 UPX_CALLER) {
#if defined(__CUDA_ARCH__)
    UPX_TMA_STORE(2, "%2, %3", "r"(c0), "r"(c1));
#elif !defined(__CUDACC__)
    const int c[] = {c0, c1};
    hostsim::tma_store(map, src, c, 2, caller);
#endif
}
__device__ __forceinline__ void tma_store_3d(const CUtensorMap* map, const void* src, int c0, int c1,
                                             int c2 UPX_CALLER) {
#if defined(__CUDA_ARCH__)
    UPX_TMA_STORE(3, "%2, %3, %4", "r"(c0), "r"(c1), "r"(c2));
#elif !defined(__CUDACC__)
    const int c[] = {c0, c1, c2};
    hostsim::tma_store(map, src, c, 3, caller);
#endif
}
__device__ __forceinline__ void tma_store_4d(const CUtensorMap* map, const void* src, int c0, int c1, int c2,
                                             int c3 UPX_CALLER) {
#if defined(__CUDA_ARCH__)
    UPX_TMA_STORE(4, "%2, %3, %4, %5", "r"(c0), "r"(c1), "r"(c2), "r"(c3));
#elif !defined(__CUDACC__)
    const int c[] = {c0, c1, c2, c3};
    hostsim::tma_store(map, src, c, 4, caller);
#endif
}
__device__ __forceinline__ void tma_store_5d(const CUtensorMap* map, const void* src, int c0, int c1, int c2, int c3,
                                             int c4 UPX_CALLER) {
#if defined(__CUDA_ARCH__)
    UPX_TMA_STORE(5, "%2, %3, %4, %5, %6", "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4));
#elif !defined(__CUDACC__)
    const int c[] = {c0, c1, c2, c3, c4};
    hostsim::tma_store(map, src, c, 5, caller);
#endif
}
#undef UPX_TMA_STORE

// Closes this thread's uncommitted TMA stores into one bulk group.
__device__ __forceinline__ void tma_store_commit() {
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#elif !defined(__CUDACC__)
    hostsim::bulk_commit();
#endif
}

// Waits until at most N of this thread's bulk groups are in flight.
template <int N> __device__ __forceinline__ void tma_store_wait() {
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
#elif !defined(__CUDACC__)
    hostsim::bulk_wait(N);
#endif
}

// --- warpgroup registers and named barriers --------------------------------------------------
// setmaxnreg: the whole warpgroup raises (inc) or lowers (dec) its per-thread register limit to
// Count, a multiple of 8 in 24..256, the same in every thread (warp-specialised kernels: the
// producer warpgroup gives registers up, the consumers take them).
template <int Count> __device__ __forceinline__ void setmaxnreg_inc() {
    static_assert(Count >= 24 && Count <= 256 && Count % 8 == 0, "setmaxnreg: a multiple of 8 in 24..256");
#if defined(__CUDA_ARCH__)
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Count));
#elif !defined(__CUDACC__)
    hostsim::setmaxnreg(Count, true);
#endif
}
template <int Count> __device__ __forceinline__ void setmaxnreg_dec() {
    static_assert(Count >= 24 && Count <= 256 && Count % 8 == 0, "setmaxnreg: a multiple of 8 in 24..256");
#if defined(__CUDA_ARCH__)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Count));
#elif !defined(__CUDACC__)
    hostsim::setmaxnreg(Count, false);
#endif
}

// Named barrier `id` (1..15; 0 is __syncthreads') for `count` threads, whole warps: bar.sync
// waits for all of them, bar.arrive (a producer signalling consumers) only counts itself.
__device__ __forceinline__ void named_barrier_sync(uint32_t id, uint32_t count UPX_CALLER) {
#if defined(__CUDA_ARCH__)
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
#elif !defined(__CUDACC__)
    hostsim::named_barrier(id, count, true, caller);
#endif
}
__device__ __forceinline__ void named_barrier_arrive(uint32_t id, uint32_t count UPX_CALLER) {
#if defined(__CUDA_ARCH__)
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
#elif !defined(__CUDACC__)
    hostsim::named_barrier(id, count, false, caller);
#endif
}
