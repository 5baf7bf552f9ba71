// Data movement without arithmetic (ops/layout.rs): strided row copies (concat, slice, batch
// broadcast, dtype cast), row gathers (token embedding, one row per sample) and pixel
// (un)shuffles. Values only change by the bf16 rounding of an f32 → bf16 store.
//
// copy_rows_<in>_<out>, copy_rows_x16:
//   Math: dst[r·dst_pitch + j] = src[r·src_pitch + j] for r < rows, j < cols. Concat is one
//   launch per input (dst offset by the input's place along the axis), slice offsets src, a
//   broadcast has src_pitch = 0, a cast is one contiguous row. x16 moves 16-byte units
//   (same dtype, every pointer, pitch and row length a multiple of 16 bytes).
//   Layout: pointers already offset by the host; pitches and cols in elements (units).
// gather_rows_<in>_<out>:
//   Math: dst[r, :] = src[r·group + clamp(idx[r], 0, n − 1), :] with idx f32 holding integers
//   (truncated; NaN reads row 0). Embedding: group = 0, n = V (table [V, cols]). GatherRows:
//   group = n = T (x [B, T, cols]).
// pixel_shuffle_<in>_<out>:   [B, hc, wc, C·r²] → [B, hf, wf, C], hf = r·hc, wf = r·wc.
// pixel_unshuffle_<in>_<out>: [B, hf, wf, C] → [B, hc, wc, C·r²] reading rows and columns
//   below r·hc, r·wc only (a cropped unshuffle leaves the rest of a larger fine image unread).
//   Both: coarse channel c·r² + dy·r + dx at (h, w) ⇔ fine channel c at (r·h + dy, r·w + dx).
//   Indexed by the output: rows = B·h_out image rows of cols = w_out·c_out elements.
// Launch (all): 2-d grid-stride loops, rows over grid/block y, elements of a row over grid/block
//   x; blocks of 256 threads shaped (tx, 256/tx) to the row length. No shared memory, no
//   collectives.
// Limits: copies and gathers index in 64 bits. Shuffles: rows and cols < 2^31 (the op checks),
//   element offsets in 64 bits.
#include "common/portable.cuh"
#include "common/convert.cuh"

#define FOR_ROWS(r, rows) \
    for (long long r = (long long)blockIdx.y * blockDim.y + threadIdx.y; r < (rows); r += (long long)gridDim.y * blockDim.y)
#define FOR_COLS(j, cols) \
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < (cols); j += (long long)gridDim.x * blockDim.x)

template <typename TO, typename TI> __device__ __forceinline__ TO convert(TI v) { return from_f32<TO>(to_f32(v)); }
template <> __device__ __forceinline__ uint4 convert<uint4, uint4>(uint4 v) { return v; }

template <typename TI, typename TO>
__device__ __forceinline__ void copy_rows(const TI* __restrict__ src, TO* __restrict__ dst, long long rows,
                                          long long cols, long long src_pitch, long long dst_pitch) {
    FOR_ROWS(r, rows) {
        const TI* s = src + r * src_pitch;
        TO* d = dst + r * dst_pitch;
        FOR_COLS(j, cols) d[j] = convert<TO>(s[j]);
    }
}

extern "C" __global__ void __launch_bounds__(256) copy_rows_f32_f32(const float* src, float* dst, long long rows, long long cols, long long src_pitch, long long dst_pitch) { copy_rows(src, dst, rows, cols, src_pitch, dst_pitch); }
extern "C" __global__ void __launch_bounds__(256) copy_rows_f32_bf16(const float* src, __nv_bfloat16* dst, long long rows, long long cols, long long src_pitch, long long dst_pitch) { copy_rows(src, dst, rows, cols, src_pitch, dst_pitch); }
extern "C" __global__ void __launch_bounds__(256) copy_rows_bf16_f32(const __nv_bfloat16* src, float* dst, long long rows, long long cols, long long src_pitch, long long dst_pitch) { copy_rows(src, dst, rows, cols, src_pitch, dst_pitch); }
extern "C" __global__ void __launch_bounds__(256) copy_rows_bf16_bf16(const __nv_bfloat16* src, __nv_bfloat16* dst, long long rows, long long cols, long long src_pitch, long long dst_pitch) { copy_rows(src, dst, rows, cols, src_pitch, dst_pitch); }
extern "C" __global__ void __launch_bounds__(256) copy_rows_x16(const uint4* src, uint4* dst, long long rows, long long cols, long long src_pitch, long long dst_pitch) { copy_rows(src, dst, rows, cols, src_pitch, dst_pitch); }

template <typename TI, typename TO>
__device__ __forceinline__ void gather_rows(const float* __restrict__ idx, const TI* __restrict__ src,
                                            TO* __restrict__ dst, long long rows, long long cols, int n,
                                            long long group) {
    FOR_ROWS(r, rows) {
        // Clamped, not checked (a kernel cannot report an error per row); fmaxf(NaN, 0) = 0.
        const long long i = min((long long)fminf(fmaxf(idx[r], 0.f), (float)n), (long long)n - 1);
        const TI* s = src + (r * group + i) * cols;
        TO* d = dst + r * cols;
        FOR_COLS(j, cols) d[j] = convert<TO>(s[j]);
    }
}

extern "C" __global__ void __launch_bounds__(256) gather_rows_f32_f32(const float* idx, const float* src, float* dst, long long rows, long long cols, int n, long long group) { gather_rows(idx, src, dst, rows, cols, n, group); }
extern "C" __global__ void __launch_bounds__(256) gather_rows_f32_bf16(const float* idx, const float* src, __nv_bfloat16* dst, long long rows, long long cols, int n, long long group) { gather_rows(idx, src, dst, rows, cols, n, group); }
extern "C" __global__ void __launch_bounds__(256) gather_rows_bf16_f32(const float* idx, const __nv_bfloat16* src, float* dst, long long rows, long long cols, int n, long long group) { gather_rows(idx, src, dst, rows, cols, n, group); }
extern "C" __global__ void __launch_bounds__(256) gather_rows_bf16_bf16(const float* idx, const __nv_bfloat16* src, __nv_bfloat16* dst, long long rows, long long cols, int n, long long group) { gather_rows(idx, src, dst, rows, cols, n, group); }

// The pair geometry of a shuffle by r: coarse [B, hc, wc, c·r²], fine [B, hf, wf, c].
struct Shuffle {
    int c, r, hc, wc, hf, wf;
};

// One output row (b, y) of the fine image, read from the coarse one.
template <typename TI, typename TO>
__device__ __forceinline__ void shuffle_row(const TI* __restrict__ x, TO* __restrict__ y, long long row, int cols,
                                            Shuffle g) {
    const int b = (int)(row / g.hf), fy = (int)(row % g.hf);
    const int rr = g.r * g.r, dy = fy % g.r;
    const long long coarse_row = ((long long)b * g.hc + fy / g.r) * g.wc;
    TO* out = y + row * cols;
    FOR_COLS(j, cols) {
        const int fx = (int)j / g.c, ch = (int)j % g.c;
        out[j] = convert<TO>(x[(coarse_row + fx / g.r) * g.c * rr + ch * rr + dy * g.r + fx % g.r]);
    }
}

// One output row (b, h) of the coarse image, read from the fine one.
template <typename TI, typename TO>
__device__ __forceinline__ void unshuffle_row(const TI* __restrict__ x, TO* __restrict__ y, long long row, int cols,
                                              Shuffle g) {
    const int b = (int)(row / g.hc), h = (int)(row % g.hc);
    const int rr = g.r * g.r, cc = g.c * rr;
    const long long fine_row = (long long)b * g.hf + (long long)g.r * h;
    TO* out = y + row * cols;
    FOR_COLS(j, cols) {
        const int w = (int)j / cc, k = (int)j % cc;
        const int ch = k / rr, dy = k % rr / g.r, dx = k % g.r;
        out[j] = convert<TO>(x[((fine_row + dy) * g.wf + g.r * w + dx) * g.c + ch]);
    }
}

// Every output row of a shuffle (TO_FINE) or an unshuffle.
template <bool TO_FINE, typename TI, typename TO>
__device__ __forceinline__ void shuffle_rows(const TI* __restrict__ x, TO* __restrict__ y, int rows, int cols, int c,
                                             int r, int hc, int wc, int hf, int wf) {
    const Shuffle g{c, r, hc, wc, hf, wf};
    FOR_ROWS(row, rows) {
        if constexpr (TO_FINE) shuffle_row(x, y, row, cols, g);
        else unshuffle_row(x, y, row, cols, g);
    }
}

extern "C" __global__ void __launch_bounds__(256) pixel_shuffle_f32_f32(const float* x, float* y, int rows, int cols, int c, int r, int hc, int wc, int hf, int wf) { shuffle_rows<true>(x, y, rows, cols, c, r, hc, wc, hf, wf); }
extern "C" __global__ void __launch_bounds__(256) pixel_shuffle_f32_bf16(const float* x, __nv_bfloat16* y, int rows, int cols, int c, int r, int hc, int wc, int hf, int wf) { shuffle_rows<true>(x, y, rows, cols, c, r, hc, wc, hf, wf); }
extern "C" __global__ void __launch_bounds__(256) pixel_shuffle_bf16_f32(const __nv_bfloat16* x, float* y, int rows, int cols, int c, int r, int hc, int wc, int hf, int wf) { shuffle_rows<true>(x, y, rows, cols, c, r, hc, wc, hf, wf); }
extern "C" __global__ void __launch_bounds__(256) pixel_shuffle_bf16_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, int rows, int cols, int c, int r, int hc, int wc, int hf, int wf) { shuffle_rows<true>(x, y, rows, cols, c, r, hc, wc, hf, wf); }
extern "C" __global__ void __launch_bounds__(256) pixel_unshuffle_f32_f32(const float* x, float* y, int rows, int cols, int c, int r, int hc, int wc, int hf, int wf) { shuffle_rows<false>(x, y, rows, cols, c, r, hc, wc, hf, wf); }
extern "C" __global__ void __launch_bounds__(256) pixel_unshuffle_f32_bf16(const float* x, __nv_bfloat16* y, int rows, int cols, int c, int r, int hc, int wc, int hf, int wf) { shuffle_rows<false>(x, y, rows, cols, c, r, hc, wc, hf, wf); }
extern "C" __global__ void __launch_bounds__(256) pixel_unshuffle_bf16_f32(const __nv_bfloat16* x, float* y, int rows, int cols, int c, int r, int hc, int wc, int hf, int wf) { shuffle_rows<false>(x, y, rows, cols, c, r, hc, wc, hf, wf); }
extern "C" __global__ void __launch_bounds__(256) pixel_unshuffle_bf16_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, int rows, int cols, int c, int r, int hc, int wc, int hf, int wf) { shuffle_rows<false>(x, y, rows, cols, c, r, hc, wc, hf, wf); }
