// The depthwise convolution, not a GEMM (ops/conv.rs); transposed convs run on conv2d.cu.
//
// dwconv_<in>_<out>: depthwise k×k conv (odd k, padding k/2, stride s), optionally followed
//   by SiLU (EfficientNetV2's MBConv) or by LayerNorm over channels (the front of every
//   Stage B/C ResBlock; stride 1 only):
//     z[b,i,j,c] = bias[c] + Σ_{dy,dx} w[c, dy·k + dx]·x̃[b, i·s + dy − k/2, j·s + dx − k/2, c]
//     y = ln ? (z − μ)·rsqrt(σ² + eps) : silu ? z/(1 + e⁻ᶻ) : z, μ and σ² (biased, two passes)
//     over c, in f32.
//   x̃ reads zeros outside the image, or the nearest edge pixel with `replicate` (Stage A).
//   Layout: x NHWC [B, H, W, C]; y NHWC [B, OH, OW, C], OH = (H − 1)/s + 1 (likewise OW);
//   w f32 [C, k·k]; bias f32 [C].
//   Launch: one warp per output pixel, 4 warps (128 threads) per block, grid =
//   ceil(B·OH·OW / 4);
//   with ln, dynamic shared memory 4·C·4 bytes holds each warp's conv row between the
//   passes (every lane reads back only the channels it wrote: no barrier needed).
//   Limits: B·OH·OW < 2^31·4 pixels; C ≤ 8192 with ln (128 KiB of shared memory).

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

template <typename TI, typename TO>
__device__ __forceinline__ void depthwise(const TI* __restrict__ x, const float* __restrict__ w,
                                          const float* __restrict__ bias, TO* __restrict__ y, int B, int H, int W,
                                          int C, int k, int stride, int replicate, int ln, int silu, float eps) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int OH = (H - 1) / stride + 1, OW = (W - 1) / stride + 1;
    const long long pixel = (long long)blockIdx.x * DW_WARPS + warp;
    if (pixel >= (long long)B * OH * OW) return;  // whole warps leave together
    const int j = (int)(pixel % OW) * stride, i = (int)(pixel / OW % OH) * stride;
    const long long b = pixel / ((long long)OW * OH);
    const int r = k / 2;
    float* row = dynamic_smem<float>() + warp * C;
    float sum = 0.f;
    for (int c = lane; c < C; c += 32) {
        float acc = bias[c];
        const float* wc = w + (long long)c * k * k;
        for (int dy = 0; dy < k; ++dy) {
            const int si = source(i, dy - r, H, replicate);
            if (si < 0) continue;
            for (int dx = 0; dx < k; ++dx) {
                const int sj = source(j, dx - r, W, replicate);
                if (sj < 0) continue;
                acc += wc[dy * k + dx] * to_f32(x[((b * H + si) * W + sj) * C + c]);
            }
        }
        if (ln) {
            row[c] = acc;
            sum += acc;
        } else {
            if (silu) acc = acc / (1.0f + expf(-acc));  // expf: accurate for large |acc|
            y[pixel * C + c] = from_f32<TO>(acc);
        }
    }
    if (!ln) return;
    const float mean = warp_sum(sum) / (float)C;
    float var = 0.f;
    for (int c = lane; c < C; c += 32) {
        const float d = row[c] - mean;
        var += d * d;
    }
    const float inv = rsqrtf(warp_sum(var) / (float)C + eps);
    for (int c = lane; c < C; c += 32) y[pixel * C + c] = from_f32<TO>((row[c] - mean) * inv);
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
