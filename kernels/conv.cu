// The depthwise convolution, not a GEMM (ops/conv.rs); transposed convs run on conv2d.cu.
//
// dwconv_<in>_<out>, dwconv3x16_<in>_<out>: depthwise k×k conv (odd k, padding k/2,
//   stride s), optionally followed by SiLU (EfficientNetV2's MBConv) or by LayerNorm over
//   channels (the front of every Stage B/C ResBlock; stride 1 only):
//     z[b,i,j,c] = bias[c] + Σ_{dy,dx} w[c, dy·k + dx]·x̃[b, i·s + dy − k/2, j·s + dx − k/2, c]
//     y = ln ? (z − μ)·rsqrt(σ² + eps) : silu ? z/(1 + e⁻ᶻ) : z, μ and σ² (biased, two passes)
//     over c, in f32.
//   x̃ reads zeros outside the image, or the nearest edge pixel with `replicate` (Stage A).
//   Both forms compute every z in one f32 chain, bias then the taps inside the image in
//   (dy, dx) order (contracted to FMAs), and the LayerNorm statistics in one order (lane l
//   sums channels l, l + 32, … of the row, then the butterfly): they give the same bits.
//   Layout: x NHWC [B, H, W, C]; y NHWC [B, OH, OW, C], OH = (H − 1)/s + 1 (likewise OW);
//   w f32 [C, k·k]; bias f32 [C].
//   dwconv (scalar): lane l computes channels l, l + 32, …: per channel k² x loads and k²
//     weight loads, lanes k² floats apart (memory-instruction bound).
//   dwconv3x16 (vector, k = 3 only; the launcher's condition: C a multiple of V = 16 bytes of
//     x (8 bf16, 4 f32), x, w, bias, y 16-byte aligned): lane l computes the V channels of
//     groups l, l + 32, …: one 16-byte x load per tap inside the image, the group's weights
//     (V·9 contiguous floats of w) in V·9/4 16-byte loads, V/4 bias loads, V·sizeof(out)/16
//     16-byte stores (8 bytes for f32 → bf16). Weights come straight from global memory (L1
//     hits for the block's 4 warps, which walk the same groups): shared-memory staging would
//     need a block barrier per group and saves no instructions (a 16-byte shared load per 4
//     taps either way). x of the 9 taps stays in registers while the V channels consume them.
//   Launch: one warp per output pixel, 4 warps (128 threads) per block, grid =
//   ceil(B·OH·OW / 4);
//   with ln, dynamic shared memory 4·C·4 bytes holds each warp's conv row between the
//   passes (the vector form's lanes then read channels other lanes wrote: a __syncwarp).
//   Limits: B·OH·OW < 2^31·4 pixels; C ≤ 8192 with ln (128 KiB of shared memory).
//   Registers (sm_90, ptxas): dwconv 40; dwconv3x16 108–186 (9 x vectors and a group's
//   weights in flight), no spills.

#include "common/portable.cuh"
#include "common/convert.cuh"
#include "common/reduce.cuh"

namespace conv {
constexpr int DW_WARPS = 4;

__device__ __forceinline__ int source(int at, int off, int n, bool replicate) {
    const int p = at + off;
    if (p >= 0 && p < n) return p;
    return replicate ? min(max(p, 0), n - 1) : -1;
}

// 16 bytes of T, moved as one uint4 (memcpy: the type pun both compilers accept).
template <typename T> struct alignas(16) Pack16 {
    static constexpr int N = 16 / sizeof(T);
    T e[N];
};
template <typename T> __device__ __forceinline__ Pack16<T> load16(const T* p) {
    const uint4 q = *reinterpret_cast<const uint4*>(p);
    Pack16<T> v;
    memcpy(&v, &q, 16);
    return v;
}

// Stores N f32 values as T at p with the widest stores N·sizeof(T) allows (16 or 8 bytes;
// scalar for N = 1); p aligned to that width.
template <int N, typename T> __device__ __forceinline__ void store_f32(T* p, const float* v) {
    constexpr int BYTES = N * (int)sizeof(T);
    if constexpr (N == 1) {
        *p = from_f32<T>(v[0]);
    } else if constexpr (BYTES % 16 == 0) {
#pragma unroll
        for (int q = 0; q < BYTES / 16; ++q) {
            Pack16<T> e;
#pragma unroll
            for (int u = 0; u < Pack16<T>::N; ++u) e.e[u] = from_f32<T>(v[q * Pack16<T>::N + u]);
            uint4 bits;
            memcpy(&bits, &e, 16);
            reinterpret_cast<uint4*>(p)[q] = bits;
        }
    } else {
        static_assert(BYTES == 8, "8 or a multiple of 16 bytes");
        T e[N];
#pragma unroll
        for (int u = 0; u < N; ++u) e[u] = from_f32<T>(v[u]);
        uint2 bits;
        memcpy(&bits, e, 8);
        *reinterpret_cast<uint2*>(p) = bits;
    }
}

// The output pixel a warp computes: its index, batch, and the input row and column of its
// centre tap (output coordinate × stride). Whole warps of a tail block leave together.
struct Pixel {
    long long index, b;
    int i, j;
};
__device__ __forceinline__ bool warp_pixel(int B, int H, int W, int stride, Pixel& p) {
    const int OH = (H - 1) / stride + 1, OW = (W - 1) / stride + 1;
    p.index = (long long)blockIdx.x * DW_WARPS + threadIdx.x / 32;
    if (p.index >= (long long)B * OH * OW) return false;
    p.j = (int)(p.index % OW) * stride;
    p.i = (int)(p.index / OW % OH) * stride;
    p.b = p.index / ((long long)OW * OH);
    return true;
}

// LayerNorm of the warp's conv row (shared memory) into its output row y. The statistics
// read the row strided over lanes (lane l sums channels l, l + 32, …, then the butterfly) on
// both paths, so both give the same bits; the normalized values go out in groups of V
// channels, group g by lane g % 32.
template <int V, typename TO>
__device__ __forceinline__ void layernorm_row(const float* row, TO* y, int C, float eps) {
    const int lane = threadIdx.x % 32;
    __syncwarp();  // the vector path reads channels other lanes wrote
    float sum = 0.f;
    for (int c = lane; c < C; c += 32) sum += row[c];
    const float mean = warp_sum(sum) / (float)C;
    float var = 0.f;
    for (int c = lane; c < C; c += 32) {
        const float d = row[c] - mean;
        var += d * d;
    }
    const float inv = rsqrtf(warp_sum(var) / (float)C + eps);
    for (int c0 = lane * V; c0 < C; c0 += 32 * V) {
        float v[V];
#pragma unroll
        for (int u = 0; u < V; ++u) v[u] = (row[c0 + u] - mean) * inv;
        store_f32<V>(y + c0, v);
    }
}

// SiLU (expf: accurate for large |z|).
__device__ __forceinline__ float silu_f32(float z) { return z / (1.0f + expf(-z)); }

// The scalar path: any odd k, any C, any alignment; lane l computes channels l, l + 32, ….
template <typename TI, typename TO>
__device__ __forceinline__ void depthwise(const TI* __restrict__ x, const float* __restrict__ w,
                                          const float* __restrict__ bias, TO* __restrict__ y, int B, int H, int W,
                                          int C, int k, int stride, int replicate, int ln, int silu, float eps) {
    Pixel px;
    if (!warp_pixel(B, H, W, stride, px)) return;
    const int r = k / 2;
    float* row = dynamic_smem<float>() + threadIdx.x / 32 * C;
    for (int c = threadIdx.x % 32; c < C; c += 32) {
        float acc = bias[c];
        const float* wc = w + (long long)c * k * k;
        for (int dy = 0; dy < k; ++dy) {
            const int si = source(px.i, dy - r, H, replicate);
            if (si < 0) continue;
            for (int dx = 0; dx < k; ++dx) {
                const int sj = source(px.j, dx - r, W, replicate);
                if (sj < 0) continue;
                acc += wc[dy * k + dx] * to_f32(x[((px.b * H + si) * W + sj) * C + c]);
            }
        }
        if (ln) {
            row[c] = acc;
        } else {
            y[px.index * C + c] = from_f32<TO>(silu ? silu_f32(acc) : acc);
        }
    }
    if (ln) layernorm_row<1>(row, y + px.index * C, C, eps);
}

// The vector path (k = 3): lane l computes the V = 16/sizeof(TI) channels of groups l,
// l + 32, … from 16-byte loads (the header's dwconv3x16), per channel the scalar path's chain.
template <typename TI, typename TO>
__device__ __forceinline__ void depthwise_x16(const TI* __restrict__ x, const float* __restrict__ w,
                                              const float* __restrict__ bias, TO* __restrict__ y, int B, int H,
                                              int W, int C, int stride, int replicate, int ln, int silu, float eps) {
    constexpr int K = 3, V = Pack16<TI>::N, T = K * K;
    Pixel px;
    if (!warp_pixel(B, H, W, stride, px)) return;
    int si[K], sj[K];
#pragma unroll
    for (int d = 0; d < K; ++d) {
        si[d] = source(px.i, d - K / 2, H, replicate);
        sj[d] = source(px.j, d - K / 2, W, replicate);
    }
    float* row = dynamic_smem<float>() + threadIdx.x / 32 * C;
#pragma unroll 1
    for (int c0 = threadIdx.x % 32 * V; c0 < C; c0 += 32 * V) {
        Pack16<TI> xt[T];
#pragma unroll
        for (int t = 0; t < T; ++t) {
            const int yy = si[t / K], xx = sj[t % K];
            if (yy >= 0 && xx >= 0) xt[t] = load16(x + ((px.b * H + yy) * W + xx) * C + c0);
        }
        float acc[V];
#pragma unroll
        for (int q = 0; q < V / 4; ++q) {
            const float4 f = reinterpret_cast<const float4*>(bias + c0)[q];
            acc[4 * q] = f.x, acc[4 * q + 1] = f.y, acc[4 * q + 2] = f.z, acc[4 * q + 3] = f.w;
        }
        // Four channels at a time: their 4·K² taps are whole float4s.
#pragma unroll
        for (int h = 0; h < V / 4; ++h) {
            float wt[4 * T];
#pragma unroll
            for (int q = 0; q < T; ++q) {
                const float4 f = reinterpret_cast<const float4*>(w + (long long)(c0 + 4 * h) * T)[q];
                wt[4 * q] = f.x, wt[4 * q + 1] = f.y, wt[4 * q + 2] = f.z, wt[4 * q + 3] = f.w;
            }
#pragma unroll
            for (int u = 0; u < 4; ++u) {
#pragma unroll
                for (int t = 0; t < T; ++t)
                    if (si[t / K] >= 0 && sj[t % K] >= 0) acc[4 * h + u] += wt[u * T + t] * to_f32(xt[t].e[4 * h + u]);
            }
        }
        if (ln) {
#pragma unroll
            for (int q = 0; q < V / 4; ++q)
                reinterpret_cast<float4*>(row + c0)[q] = make_float4(acc[4 * q], acc[4 * q + 1], acc[4 * q + 2], acc[4 * q + 3]);
        } else {
            if (silu) {
#pragma unroll
                for (int u = 0; u < V; ++u) acc[u] = silu_f32(acc[u]);
            }
            store_f32<V>(y + px.index * C + c0, acc);
        }
    }
    if (ln) layernorm_row<V>(row, y + px.index * C, C, eps);
}

}  // namespace conv

extern "C" __global__ void __launch_bounds__(128) dwconv_f32_f32(const float* x, const float* w, const float* bias, float* y, int b, int h, int wd, int c, int k, int stride, int replicate, int ln, int silu, float eps) {
    conv::depthwise(x, w, bias, y, b, h, wd, c, k, stride, replicate, ln, silu, eps);
}
extern "C" __global__ void __launch_bounds__(128) dwconv_f32_bf16(const float* x, const float* w, const float* bias, __nv_bfloat16* y, int b, int h, int wd, int c, int k, int stride, int replicate, int ln, int silu, float eps) {
    conv::depthwise(x, w, bias, y, b, h, wd, c, k, stride, replicate, ln, silu, eps);
}
extern "C" __global__ void __launch_bounds__(128) dwconv_bf16_f32(const __nv_bfloat16* x, const float* w, const float* bias, float* y, int b, int h, int wd, int c, int k, int stride, int replicate, int ln, int silu, float eps) {
    conv::depthwise(x, w, bias, y, b, h, wd, c, k, stride, replicate, ln, silu, eps);
}
extern "C" __global__ void __launch_bounds__(128) dwconv_bf16_bf16(const __nv_bfloat16* x, const float* w, const float* bias, __nv_bfloat16* y, int b, int h, int wd, int c, int k, int stride, int replicate, int ln, int silu, float eps) {
    conv::depthwise(x, w, bias, y, b, h, wd, c, k, stride, replicate, ln, silu, eps);
}
extern "C" __global__ void __launch_bounds__(128) dwconv3x16_f32_f32(const float* x, const float* w, const float* bias, float* y, int b, int h, int wd, int c, int stride, int replicate, int ln, int silu, float eps) {
    conv::depthwise_x16(x, w, bias, y, b, h, wd, c, stride, replicate, ln, silu, eps);
}
extern "C" __global__ void __launch_bounds__(128) dwconv3x16_f32_bf16(const float* x, const float* w, const float* bias, __nv_bfloat16* y, int b, int h, int wd, int c, int stride, int replicate, int ln, int silu, float eps) {
    conv::depthwise_x16(x, w, bias, y, b, h, wd, c, stride, replicate, ln, silu, eps);
}
extern "C" __global__ void __launch_bounds__(128) dwconv3x16_bf16_f32(const __nv_bfloat16* x, const float* w, const float* bias, float* y, int b, int h, int wd, int c, int stride, int replicate, int ln, int silu, float eps) {
    conv::depthwise_x16(x, w, bias, y, b, h, wd, c, stride, replicate, ln, silu, eps);
}
extern "C" __global__ void __launch_bounds__(128) dwconv3x16_bf16_bf16(const __nv_bfloat16* x, const float* w, const float* bias, __nv_bfloat16* y, int b, int h, int wd, int c, int stride, int replicate, int ln, int silu, float eps) {
    conv::depthwise_x16(x, w, bias, y, b, h, wd, c, stride, replicate, ln, silu, eps);
}
