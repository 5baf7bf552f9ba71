// Dense 2-d convolution as an implicit GEMM on tensor cores (ops/conv2d.rs): the k×k convs
// of the EfficientNetV2 backbone (stem, FusedMBConv), its 1×1 expansions and projections
// (with the squeeze-and-excitation scale folded into the operand load), the ControlNet's
// projections; and, run as stride² ordinary convs, every transposed conv
// (ops/conv_transpose.rs: Stage A's 4/2/1 upsampler, Stage B's 2×2 upscalers, the previewer).
//
// Math (conv): y[b,oy,ox,co] = act(bias[co] + Σ_{ky,kx,ci} w[co,ci,ky,kx]·x̃[b, oy·s − p + ky,
//   ox·s − p + kx, ci]·g[b,ci]) + r[b,oy,ox,co], with x̃ zero outside the image, g the optional
//   per-sample channel gate (SE; 1 without), act none, SiLU x/(1 + e⁻ˣ) or LeakyReLU
//   (x > 0 ? x : slope·x), r the optional residual. The GEMM view: M = B·OH·OW output pixels,
//   N = Cout, K = k·k·Cin ordered tap-major (kk = (ky·k + kx)·Cin + ci), so neighbouring k of
//   an A row are neighbouring channels of one input pixel.
// Math (transposed, `transposed` = 1): y[b,oy,ox,co] = act(bias[co] + Σ x[b,iy,ix,ci]·
//   w[ci,co,ky,kx] over oy = iy·s − p + ky, ox = ix·s − p + kx) + r. An output row oy = s·j + φ
//   (phase φ ∈ [0, s)) takes exactly the taps ky = ρ + s·t, ρ = (φ + p) mod s, t ∈ [0, ⌈(k − ρ)/s⌉),
//   from input row iy = j + ⌊(φ + p)/s⌋ − t (columns alike). So phase (φy, φx) is an ordinary
//   conv over the input with ⌈(k − ρy)/s⌉ × ⌈(k − ρx)/s⌉ taps whose outputs land every s-th
//   pixel: blockIdx.z is the phase, M = B·⌈OH/s⌉·⌈OW/s⌉ (rows past OH or OW masked), K =
//   taps·Cin ordered channel-major (kk = ci·taps + tap): the taps of one (ci, co) lie in one
//   32-byte run of w, and a warp's 32 A columns are a few pixels × consecutive channels. A
//   phase without taps (k < s) stores act(bias) + r.
// Numerics: each A element (x·g, in f32) and each weight is rounded to bf16 once; mma.sync
//   m16n8k16 accumulates in f32; the epilogue is f32; one rounding at the store.
// Layout: x NHWC [B, H, W, Cin] (f32 or bf16), w bf16 [Cout, Cin, k, k] (conv) or [Cin, Cout,
//   k, k] (transposed), PyTorch's layouts read as they are, bias f32 [Cout] or null, g f32
//   [B, Cin] or null (conv only), r and y NHWC [B, OH, OW, Cout] in the output type (f32 or
//   bf16), r may be null.
// Launch: grid (ceil(M/64), ceil(N/64), 1 or s²), 128 threads = 4 warps as 2 (m) × 2 (n), each
//   warp a 32×32 tile (2 × 4 mma tiles). Per 32-wide k step every thread gathers 16 A and 16 W
//   elements into padded shared tiles (row pitch 40 elements keeps ldmatrix rows on distinct
//   banks), then ldmatrix.x4 + mma.sync. The pixels of each tile row (sample offset, input
//   origin, output offset) are decoded once per block into shared memory. Static shared
//   memory: 2·64·40·2 + 64·(8 + 4 + 4 + 8) = 11,776 bytes.
// Limits: M < 2^31 per phase and B·OH·OW·Cout < 2^63 (checked by the ops), any Cin, Cout, k,
//   stride ≥ 1, padding ≥ 0; M, N and K tails are zero-filled on load and masked on store. A
//   gather, not a cp.async pipeline: loads are scalar, so no alignment or channel-multiple
//   requirement.
// Names: conv2d_<x>_<out>. Parameters: one Conv2dParams by value.
#include "common/portable.cuh"
#include "common/convert.cuh"
#include "common/mma.cuh"

// Mirrored by ops::conv2d::Conv2dParams (checked by build.rs). Pointers first: no padding.
struct Conv2dParams {
    const void* x;              // [B, H, W, Cin]
    const __nv_bfloat16* w;     // [Cout, Cin, k, k], or [Cin, Cout, k, k] when transposed
    const float* bias;          // [Cout], or null
    const float* gate;          // [B, Cin], or null (conv only)
    const void* r;              // [B, OH, OW, Cout] in the output type, or null
    void* y;                    // [B, OH, OW, Cout]
    int b, h, w_in, cin;
    int oh, ow, cout;
    int k, stride, pad;
    int act;  // 0 none, 1 SiLU, 2 LeakyReLU
    float slope;
    int transposed;  // 0: conv; 1: transposed conv, one phase per blockIdx.z
    int m;           // GEMM rows per phase: B·OH·OW, or B·⌈OH/s⌉·⌈OW/s⌉ when transposed
};

namespace conv2d {
constexpr int BM = 64, BN = 64, BK = 32, LDS = BK + 8, THREADS = 128;
constexpr int ACT_SILU = 1, ACT_LEAKY = 2;

// One axis of a block's conv: GEMM row coordinate j → output coordinate out0 + out_step·j
// (masked at `limit`), input origin in0 + in_step·j, tap t → input origin + dir·t and kernel
// offset k0 + k_step·t, for t < taps.
struct Axis {
    int rows, out0, out_step, limit, in0, in_step, dir, k0, k_step, taps;
};

__device__ __forceinline__ Axis conv_axis(int out, int s, int p, int k) {
    return Axis{out, 0, 1, out, -p, s, 1, 0, 1, k};
}

// Phase φ of a transposed conv along an axis of `out` outputs (the header's derivation).
__device__ __forceinline__ Axis transposed_axis(int out, int s, int p, int k, int phi) {
    const int rho = (phi + p) % s;
    const int taps = k > rho ? (k - rho + s - 1) / s : 0;
    return Axis{(out + s - 1) / s, phi, s, out, (phi + p) / s, 1, -1, rho, s, taps};
}

template <typename TI, typename TO>
__device__ __forceinline__ void body(const Conv2dParams& p) {
    __shared__ __align__(16) __nv_bfloat16 As[BM * LDS];
    __shared__ __align__(16) __nv_bfloat16 Bs[BN * LDS];
    __shared__ long long pix_base[BM];  // b·H, or −1 for rows past M or outside the output
    __shared__ long long pix_out[BM];   // the output pixel (b·OH + oy)·OW + ox
    __shared__ int pix_iy[BM], pix_ix[BM];
    const TI* __restrict__ x = static_cast<const TI*>(p.x);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wm = warp / 2, wn = warp % 2;
    const int s = p.stride;
    const Axis ay = p.transposed ? transposed_axis(p.oh, s, p.pad, p.k, blockIdx.z / s) : conv_axis(p.oh, s, p.pad, p.k);
    const Axis ax = p.transposed ? transposed_axis(p.ow, s, p.pad, p.k, blockIdx.z % s) : conv_axis(p.ow, s, p.pad, p.k);
    const int N = p.cout, taps = ay.taps * ax.taps, K = taps * p.cin;
    // w[n, ci, ky, kx] (conv) or w[ci, n, ky, kx] (transposed) = w[n·w_n + ci·w_ci + ky·k + kx].
    const long long k2 = (long long)p.k * p.k;
    const long long w_n = p.transposed ? k2 : p.cin * k2, w_ci = p.transposed ? p.cout * k2 : k2;
    const long long m0 = (long long)blockIdx.x * BM;
    const int n0 = blockIdx.y * BN;

    if (tid < BM) {
        const long long m = m0 + tid;
        const int i = (int)(m % ax.rows), j = (int)(m / ax.rows % ay.rows);
        const long long b = m / ((long long)ax.rows * ay.rows);
        const int oy = ay.out0 + ay.out_step * j, ox = ax.out0 + ax.out_step * i;
        const bool valid = m < p.m && oy < ay.limit && ox < ax.limit;
        pix_base[tid] = valid ? b * p.h : -1;
        pix_out[tid] = valid ? (b * p.oh + oy) * p.ow + ox : -1;
        pix_iy[tid] = ay.in0 + ay.in_step * j;
        pix_ix[tid] = ax.in0 + ax.in_step * i;
    }

    float acc[2][4][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

    const int col = tid % BK, row0 = tid / BK;  // this thread's k column and first tile row
    for (int k0 = 0; k0 < K; k0 += BK) {
        __syncthreads();  // the pixel table is ready; the previous tile's MMAs are done
        const int gk = k0 + col;
        const bool k_ok = gk < K;
        int tap = 0, ci = 0;
        if (k_ok) {
            tap = p.transposed ? gk % taps : gk / p.cin;
            ci = p.transposed ? gk / taps : gk % p.cin;
        }
        const int ty = tap / ax.taps, tx = tap % ax.taps;
        const int dy = ay.dir * ty, dx = ax.dir * tx;
        const long long w_k = ci * w_ci + (ay.k0 + ay.k_step * ty) * p.k + ax.k0 + ax.k_step * tx;
#pragma unroll 4
        for (int r = row0; r < BM; r += THREADS / BK) {
            float v = 0.f;
            const long long base = pix_base[r];
            const int iy = pix_iy[r] + dy, ix = pix_ix[r] + dx;
            if (k_ok && base >= 0 && iy >= 0 && iy < p.h && ix >= 0 && ix < p.w_in) {
                v = to_f32(x[((base + iy) * p.w_in + ix) * p.cin + ci]);
                if (p.gate) v *= p.gate[base / p.h * p.cin + ci];
            }
            As[r * LDS + col] = from_f32<__nv_bfloat16>(v);
            const int n = n0 + r;
            Bs[r * LDS + col] = k_ok && n < N ? p.w[n * w_n + w_k] : from_f32<__nv_bfloat16>(0.f);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            uint32_t af[2][4], bf[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) ldmatrix_a_frag(af[mi], As, wm * 32 + mi * 16, kk, LDS, lane);
#pragma unroll
            for (int ni = 0; ni < 4; ni += 2) ldmatrix_b_pair(bf[ni], bf[ni + 1], Bs, wn * 32 + ni * 8, kk, LDS, lane);
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) mma_bf16_16816(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
        }
    }
    __syncthreads();  // the pixel table is ready even when K = 0 (a phase without taps)

    const TO* __restrict__ R = static_cast<const TO*>(p.r);
    TO* __restrict__ Y = static_cast<TO*>(p.y);
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const long long out = pix_out[wm * 32 + mi * 16 + g + h * 8];
            if (out < 0) continue;
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = n0 + wn * 32 + ni * 8 + 2 * t + e;
                    if (c >= N) continue;
                    float v = acc[mi][ni][h * 2 + e];
                    if (p.bias) v += p.bias[c];
                    if (p.act == ACT_SILU) v = v / (1.0f + expf(-v));  // expf: accurate for large |v|
                    if (p.act == ACT_LEAKY) v = v > 0.f ? v : p.slope * v;
                    if (R) v += to_f32(R[out * N + c]);
                    Y[out * N + c] = from_f32<TO>(v);
                }
        }
}
}  // namespace conv2d

extern "C" __global__ void __launch_bounds__(128) conv2d_f32_f32(const Conv2dParams p) { conv2d::body<float, float>(p); }
extern "C" __global__ void __launch_bounds__(128) conv2d_f32_bf16(const Conv2dParams p) { conv2d::body<float, __nv_bfloat16>(p); }
extern "C" __global__ void __launch_bounds__(128) conv2d_bf16_f32(const Conv2dParams p) { conv2d::body<__nv_bfloat16, float>(p); }
extern "C" __global__ void __launch_bounds__(128) conv2d_bf16_bf16(const Conv2dParams p) { conv2d::body<__nv_bfloat16, __nv_bfloat16>(p); }
