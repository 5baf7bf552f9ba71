// Squeeze-and-excitation gates (ops/squeeze_excite.rs): torchvision's SqueezeExcitation as the
// EfficientNetV2 MBConv blocks use it, up to the channel scale, which the following 1×1
// projection applies while loading its operand (conv2d's gate).
//
// Math, per sample b: m[c] = (Σ_p x[b,p,c]) / P (global average pool over the P pixels);
//   h[j] = silu(b1[j] + Σ_c w1[j,c]·m[c]); g[b,c] = sigmoid(b2[c] + Σ_j w2[c,j]·h[j]),
//   sigmoid(v) = 1/(1 + e⁻ᵛ), silu(v) = v·sigmoid(v) (expf, not __expf). All f32, each sum
//   sequential in index order.
// Layout: x [B, P, C] (f32 or bf16, channels-last pixels), w1 f32 [Cs, C], b1 f32 [Cs],
//   w2 f32 [C, Cs], b2 f32 [C], g f32 [B, C].
// Launch: one block of 256 threads per sample (grid B); thread t pools channels t, t + 256, …
//   (coalesced over channels), then computes hidden units and gates the same way. Dynamic
//   shared memory (C + Cs)·4 bytes holds m and h between the phases.
// Limits: B ≤ 2^31 − 1, (C + Cs)·4 ≤ 48 KiB (C + Cs ≤ 12288; the op checks).
// Names: se_gate_<x>.
#include "common/portable.cuh"
#include "common/convert.cuh"

namespace se {
template <typename TI>
__device__ __forceinline__ void gate(const TI* __restrict__ x, const float* __restrict__ w1, const float* __restrict__ b1,
                                     const float* __restrict__ w2, const float* __restrict__ b2, float* __restrict__ g,
                                     long long P, int C, int Cs) {
    float* m = dynamic_smem<float>();
    float* h = m + C;
    const long long b = blockIdx.x;
    const TI* xb = x + b * P * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float s = 0.f;
        for (long long p = 0; p < P; ++p) s += to_f32(xb[p * C + c]);
        m[c] = s / (float)P;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < Cs; j += blockDim.x) {
        float z = b1[j];
        for (int c = 0; c < C; ++c) z += w1[(long long)j * C + c] * m[c];
        h[j] = z / (1.0f + expf(-z));
    }
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float z = b2[c];
        for (int j = 0; j < Cs; ++j) z += w2[(long long)c * Cs + j] * h[j];
        g[b * C + c] = 1.0f / (1.0f + expf(-z));
    }
}
}  // namespace se

extern "C" __global__ void __launch_bounds__(256) se_gate_f32(const float* x, const float* w1, const float* b1, const float* w2, const float* b2, float* g, long long p, int c, int cs) {
    se::gate(x, w1, b1, w2, b2, g, p, c, cs);
}
extern "C" __global__ void __launch_bounds__(256) se_gate_bf16(const __nv_bfloat16* x, const float* w1, const float* b1, const float* w2, const float* b2, float* g, long long p, int c, int cs) {
    se::gate(x, w1, b1, w2, b2, g, p, c, cs);
}
