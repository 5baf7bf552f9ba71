// Tensor-core and async-copy wrappers: the only inline PTX in the project. Each wrapper has
// the real instruction for the device pass (__CUDA_ARCH__) and an emulated twin in hostsim.h
// (g++), so every kernel that uses them also runs on the CPU. Fragment layouts: PTX ISA,
// "mma.m16n8k16" and "ldmatrix" (summarised in hostsim.h's emulation). On top of them, the
// fragment loaders the GEMM and attention kernels share (plain C++, no PTX of their own): the
// lane addressing that makes one ldmatrix.x4 yield an m16n8k16 A fragment, or the B fragments
// of two neighbouring n-tiles from B stored [n][k] or [k][n]; each is exercised by
// selftest_mma_ldmatrix (kernels/selftest.cu).
#pragma once
#include "portable.cuh"

// D (16×8 f32) = A (16×16 bf16, row-major fragments) · B (16×8 bf16, "col") + C. d may alias c.
__device__ __forceinline__ void mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2],
                                               const float c[4]) {
#if defined(__CUDA_ARCH__)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#elif !defined(__CUDACC__)
    hostsim::mma_bf16_16816(d, a, b, c);
#endif
}

// One 8×8 b16 matrix: lanes 0..7 give the row addresses (16-byte aligned); the other lanes'
// addresses are ignored but must be aligned, valid shared addresses.
__device__ __forceinline__ void ldmatrix_x1(uint32_t r[1], const void* smem_row) {
#if defined(__CUDA_ARCH__)
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
#elif !defined(__CUDACC__)
    hostsim::ldmatrix(r, smem_row, 1, false);
#endif
}

__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t r[1], const void* smem_row) {
#if defined(__CUDA_ARCH__)
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
#elif !defined(__CUDACC__)
    hostsim::ldmatrix(r, smem_row, 1, true);
#endif
}

// Four 8×8 b16 matrices; lanes 8j..8j+7 give the row addresses of matrix j (16-byte aligned).
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem_row) {
#if defined(__CUDA_ARCH__)
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#elif !defined(__CUDACC__)
    hostsim::ldmatrix(r, smem_row, 4, false);
#endif
}

// As ldmatrix_x4, each matrix transposed (for B stored [k][n]).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* smem_row) {
#if defined(__CUDA_ARCH__)
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#elif !defined(__CUDACC__)
    hostsim::ldmatrix(r, smem_row, 4, true);
#endif
}

// Two 8×8 matrices: lanes 0..15 give the row addresses (the others are ignored but must be
// aligned, valid shared addresses).
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* smem_row) {
#if defined(__CUDA_ARCH__)
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
#elif !defined(__CUDACC__)
    hostsim::ldmatrix(r, smem_row, 2, false);
#endif
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t r[2], const void* smem_row) {
#if defined(__CUDA_ARCH__)
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
#elif !defined(__CUDACC__)
    hostsim::ldmatrix(r, smem_row, 2, true);
#endif
}

// --- m16n8k16 fragments from shared memory ---------------------------------------------------
// Each loader reads the 16×16 block at rows row0.., columns col0.. of a row-major bf16 tile in
// shared memory (row pitch ld elements); every row address must be 16-byte aligned (col0 and
// ld multiples of 8, tile 16-byte aligned). Each lane gives one row address; lanes 8j..8j+7
// give the eight rows of matrix j, which lands in register j of the ldmatrix.x4 result.

// The A fragment (mma_bf16_16816's a[0..3]) of one k-step, the block being A (rows m,
// columns k). Lane l points at row m = l % 16, column k = 8·(l / 16): lanes 0-7 → m 0-7,
// k 0-7 (a[0]); lanes 8-15 → m 8-15, k 0-7 (a[1]); lanes 16-23 → m 0-7, k 8-15 (a[2]);
// lanes 24-31 → m 8-15, k 8-15 (a[3]).
__device__ __forceinline__ void ldmatrix_a_frag(uint32_t a[4], const __nv_bfloat16* tile, int row0, int col0, int ld,
                                                int lane) {
    ldmatrix_x4(a, tile + (row0 + (lane & 15)) * ld + col0 + (lane >> 4) * 8);
}

// The B fragments (mma_bf16_16816's b) of two neighbouring n-tiles over one k-step, the
// block being B stored [n][k] (a row per output column: a weight row, a key): b0 for n 0-7,
// b1 for n 8-15. Lane l points at row n = l % 8 + 8·(l / 16), column k = 8·((l / 8) % 2):
// lanes 0-7 → n 0-7, k 0-7 (b0[0]); lanes 8-15 → n 0-7, k 8-15 (b0[1]); lanes 16-23 →
// n 8-15, k 0-7 (b1[0]); lanes 24-31 → n 8-15, k 8-15 (b1[1]).
__device__ __forceinline__ void ldmatrix_b_pair(uint32_t b0[2], uint32_t b1[2], const __nv_bfloat16* tile, int row0,
                                                int col0, int ld, int lane) {
    uint32_t r[4];
    ldmatrix_x4(r, tile + (row0 + (lane & 7) + ((lane >> 4) << 3)) * ld + col0 + ((lane >> 3) & 1) * 8);
    b0[0] = r[0];
    b0[1] = r[1];
    b1[0] = r[2];
    b1[1] = r[3];
}

// As ldmatrix_b_pair with the block being B stored [k][n] (a row per k: attention's values),
// each 8×8 matrix transposed on the way in. Lane l points at row k = l % 16, column
// n = 8·(l / 16): lanes 0-7 → k 0-7, n 0-7 (b0[0]); lanes 8-15 → k 8-15, n 0-7 (b0[1]);
// lanes 16-23 → k 0-7, n 8-15 (b1[0]); lanes 24-31 → k 8-15, n 8-15 (b1[1]). The row is
// spelled l % 8 + 8·((l / 8) % 2): with the shorter l % 16, nvcc schedules the attention
// kernel differently; this spelling keeps its SASS as it was.
__device__ __forceinline__ void ldmatrix_b_pair_trans(uint32_t b0[2], uint32_t b1[2], const __nv_bfloat16* tile,
                                                      int row0, int col0, int ld, int lane) {
    uint32_t r[4];
    ldmatrix_x4_trans(r, tile + (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + col0 + (lane >> 4) * 8);
    b0[0] = r[0];
    b0[1] = r[1];
    b1[0] = r[2];
    b1[1] = r[3];
}

// 16 bytes global → shared, asynchronously (L2 only): the first `src_bytes` (0..16) come
// from the source, the rest of the 16 destination bytes are zero-filled. Both addresses
// 16-byte aligned; with src_bytes == 0 the source is not read (it must still be valid).
__device__ __forceinline__ void cp_async_16_partial(void* smem_dst, const void* gmem_src, unsigned src_bytes) {
#if defined(__CUDA_ARCH__)
    const unsigned d = (unsigned)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(gmem_src), "r"(src_bytes)
                 : "memory");
#elif !defined(__CUDACC__)
    hostsim::cp_async_16(smem_dst, gmem_src, src_bytes);
#endif
}

// With valid == false the destination is zero-filled and the source is not read (it must
// still be a valid address): the predicated tile-edge load.
__device__ __forceinline__ void cp_async_16_zfill(void* smem_dst, const void* gmem_src, bool valid) {
    cp_async_16_partial(smem_dst, gmem_src, valid ? 16u : 0u);
}

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
    cp_async_16_zfill(smem_dst, gmem_src, true);
}

// Closes this thread's issued copies into one group.
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif !defined(__CUDACC__)
    hostsim::cp_async_commit();
#endif
}

// Waits until at most N of this thread's committed groups are pending. Other threads see the
// data only after a __syncthreads().
template <int N> __device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#elif !defined(__CUDACC__)
    hostsim::cp_async_wait(N);
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
    cp_async_commit();
    cp_async_wait<0>();
}
