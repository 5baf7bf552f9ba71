// Dense 2-d convolution as an implicit GEMM on tensor cores (ops/conv2d.rs): the k×k convs
// of the EfficientNetV2 backbone (stem, FusedMBConv), its 1×1 expansions and projections
// (with the squeeze-and-excitation scale folded into the operand load), and the ControlNet's
// projections.
//
// Math: y[b,oy,ox,co] = act(bias[co] + Σ_{ky,kx,ci} w[co,ci,ky,kx]·x̃[b, oy·s − p + ky,
//   ox·s − p + kx, ci]·g[b,ci]) + r[b,oy,ox,co], with x̃ zero outside the image, g the optional
//   per-sample channel gate (SE; 1 without), act none, SiLU x/(1 + e⁻ˣ) or LeakyReLU
//   (x > 0 ? x : slope·x), r the optional residual. The GEMM view: M = B·OH·OW output pixels,
//   N = Cout, K = k·k·Cin ordered tap-major (kk = (ky·k + kx)·Cin + ci), so neighbouring k of
//   an A row are neighbouring channels of one input pixel.
// Numerics: each A element (x·g, in f32) and each weight is rounded to bf16 once; mma.sync
//   m16n8k16 accumulates in f32; the epilogue is f32; one rounding at the store.
// Layout: x NHWC [B, H, W, Cin] (f32 or bf16), w bf16 [Cout, Cin, k, k] (PyTorch's layout,
//   read as is), bias f32 [Cout] or null, g f32 [B, Cin] or null, r and y NHWC
//   [B, OH, OW, Cout] in the output type (f32 or bf16), r may be null.
// Launch: grid (ceil(M/64), ceil(N/64)), 128 threads = 4 warps as 2 (m) × 2 (n), each warp a
//   32×32 tile (2 × 4 mma tiles). Per 32-wide k step every thread gathers 16 A and 16 W
//   elements into padded shared tiles (row pitch 40 elements keeps ldmatrix rows on distinct
//   banks), then ldmatrix.x4 + mma.sync. The output pixel of each tile row (sample offset,
//   top-left input coordinate) is decoded once per block into shared memory. Static shared
//   memory: 2·64·40·2 + 64·(8 + 4 + 4) = 11,264 bytes.
// Limits: M < 2^31 (checked by the op), any Cin, Cout, k, stride ≥ 1, padding ≥ 0; M, N and
//   K tails are zero-filled on load and masked on store. A gather, not a cp.async pipeline:
//   loads are scalar, so no alignment or channel-multiple requirement.
// Names: conv2d_<x>_<out>. Parameters: one Conv2dParams by value.
#include "common/portable.cuh"
#include "common/convert.cuh"
#include "common/mma.cuh"

// Mirrored by ops::conv2d::Conv2dParams (checked by build.rs). Pointers first: no padding.
struct Conv2dParams {
    const void* x;              // [B, H, W, Cin]
    const __nv_bfloat16* w;     // [Cout, Cin, k, k]
    const float* bias;          // [Cout], or null
    const float* gate;          // [B, Cin], or null
    const void* r;              // [B, OH, OW, Cout] in the output type, or null
    void* y;                    // [B, OH, OW, Cout]
    int b, h, w_in, cin;
    int oh, ow, cout;
    int k, stride, pad;
    int act;  // 0 none, 1 SiLU, 2 LeakyReLU
    float slope;
};

namespace conv2d {
constexpr int BM = 64, BN = 64, BK = 32, LDS = BK + 8, THREADS = 128;
constexpr int ACT_SILU = 1, ACT_LEAKY = 2;

template <typename TI, typename TO>
__device__ __forceinline__ void body(const Conv2dParams& p) {
    __shared__ __align__(16) __nv_bfloat16 As[BM * LDS];
    __shared__ __align__(16) __nv_bfloat16 Bs[BN * LDS];
    __shared__ long long pix_base[BM];  // b·H, or −1 for rows past M
    __shared__ int pix_iy[BM], pix_ix[BM];
    const TI* __restrict__ x = static_cast<const TI*>(p.x);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wm = warp / 2, wn = warp % 2;
    const long long M = (long long)p.b * p.oh * p.ow;
    const int N = p.cout, taps = p.k * p.k, K = taps * p.cin;
    const long long m0 = (long long)blockIdx.x * BM;
    const int n0 = blockIdx.y * BN;

    if (tid < BM) {
        const long long m = m0 + tid;
        if (m < M) {
            const int ox = (int)(m % p.ow), oy = (int)(m / p.ow % p.oh);
            pix_base[tid] = m / ((long long)p.ow * p.oh) * p.h;
            pix_iy[tid] = oy * p.stride - p.pad;
            pix_ix[tid] = ox * p.stride - p.pad;
        } else {
            pix_base[tid] = -1;
            pix_iy[tid] = pix_ix[tid] = 0;
        }
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
        const int tap = k_ok ? gk / p.cin : 0, ci = k_ok ? gk % p.cin : 0;
        const int ky = tap / p.k, kx = tap % p.k;
#pragma unroll 4
        for (int r = row0; r < BM; r += THREADS / BK) {
            float v = 0.f;
            const long long base = pix_base[r];
            const int iy = pix_iy[r] + ky, ix = pix_ix[r] + kx;
            if (k_ok && base >= 0 && iy >= 0 && iy < p.h && ix >= 0 && ix < p.w_in) {
                v = to_f32(x[((base + iy) * p.w_in + ix) * p.cin + ci]);
                if (p.gate) v *= p.gate[base / p.h * p.cin + ci];
            }
            As[r * LDS + col] = from_f32<__nv_bfloat16>(v);
            const int n = n0 + r;
            Bs[r * LDS + col] = k_ok && n < N ? p.w[((long long)n * p.cin + ci) * taps + tap] : from_f32<__nv_bfloat16>(0.f);
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

    const TO* __restrict__ R = static_cast<const TO*>(p.r);
    TO* __restrict__ Y = static_cast<TO*>(p.y);
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const long long row = m0 + wm * 32 + mi * 16 + g + h * 8;
            if (row >= M) continue;
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
                    if (R) v += to_f32(R[row * N + c]);
                    Y[row * N + c] = from_f32<TO>(v);
                }
        }
}
}  // namespace conv2d

extern "C" __global__ void __launch_bounds__(128) conv2d_f32_f32(const Conv2dParams p) { conv2d::body<float, float>(p); }
extern "C" __global__ void __launch_bounds__(128) conv2d_f32_bf16(const Conv2dParams p) { conv2d::body<float, __nv_bfloat16>(p); }
extern "C" __global__ void __launch_bounds__(128) conv2d_bf16_f32(const Conv2dParams p) { conv2d::body<__nv_bfloat16, float>(p); }
extern "C" __global__ void __launch_bounds__(128) conv2d_bf16_bf16(const Conv2dParams p) { conv2d::body<__nv_bfloat16, __nv_bfloat16>(p); }
