// UltraPixel's implicit neural representation (ops/inr.rs): the coordinate encoding, the
// per-sample modulated hyper-weights and the per-pixel hyper-MLP.
//
// coord_posenc_f32: out[p, f] for the h×w pixel-centre grid, p = i·w + j, f ∈ [0, 256):
//   f = 64·part + k, part 0..3 = cos(π·y·ω_k), cos(π·x·ω_k), sin(π·y·ω_k), sin(π·x·ω_k);
//   y = −1 + 2·((0.5 + i)/h), x likewise; ω = exp(linspace(0, ln σ, 64)) in f32 (PyTorch's
//   linspace: fused multiply-add halves). Products in f32 exactly as the reference; exp,
//   cos and sin in double rounded once (common/accurate_math.cuh; arguments reach 3.2·10³
//   rad, where the f32 fast paths lose 1e-4). Launch: grid-stride over h·w·256, 256 threads.
//
// modulated_weights_<in>_<out>: W′[b,i,o] = base[i,o]·m[b, o mod g, i] / max(‖W′[b,:,o]‖₂,
//   1e-12) for i < Din, bias row W′[b,Din,o] = base[Din,o]. base [Din+1, Dout], m [B, g, Din],
//   out [B, Din+1, Dout]. Launch: one warp per (b, o), 4 warps per block,
//   grid = ceil(B·Dout / 4).
//
// hyper_mlp_<w>_<out>: per pixel p and sample b, h = ReLU(pe[p]·w0[b,:Din] + w0[b,Din]),
//   out[b,p] = h·w1[b,:Dh] + w1[b,Dh], f32 throughout (the positional matmul stays f32).
//   pe f32 [P, Din]; w0 [B, Din+1, Dh]; w1 [B, Dh+1, Dout]; out [B, P, Dout].
//   Launch: a block of 128 threads per (pixel, sample): grid (P, B); dynamic shared memory
//   (Din + Dh)·4 bytes for the pixel's encoding and hidden vector. Limits: P < 2^31,
//   B ≤ 65535. Runs once per generation (its output is reused by every high-res step).
#include "common/portable.cuh"
#include "common/convert.cuh"
#include "common/reduce.cuh"
#include "common/accurate_math.cuh"

extern "C" __global__ void __launch_bounds__(256) coord_posenc_f32(float* out, int h, int w, float log_sigma) {
    constexpr int FREQS = 64, WIDTH = 4 * FREQS;
    const float pi = 3.14159265358979323846f;
    const long long n = (long long)h * w * WIDTH;
    const float step = log_sigma / (float)(FREQS - 1);
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const int f = (int)(e % WIDTH), part = f / FREQS, k = f % FREQS;
        const long long p = e / WIDTH;
        const bool is_y = part % 2 == 0;
        const int idx = is_y ? (int)(p / w) : (int)(p % w), len = is_y ? h : w;
        const float coord = -1.0f + 2.0f * ((0.5f + (float)idx) / (float)len);
        const float lin = k < FREQS / 2 ? fmaf(step, (float)k, 0.0f) : fmaf(-step, (float)(FREQS - 1 - k), log_sigma);
        const float omega = (float)exp((double)lin);
        const float u = coord * omega;
        const float arg = pi * u;
        float s, c;
        accurate::sincosf_double(arg, &s, &c);
        out[e] = part < 2 ? c : s;
    }
}

template <typename TI, typename TO>
__device__ __forceinline__ void modulate(const TI* __restrict__ base, const TI* __restrict__ m, TO* __restrict__ out,
                                         int B, int din, int dout, int groups) {
    const int lane = threadIdx.x % 32;
    const long long col = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (col >= (long long)B * dout) return;  // whole warps leave together
    const int o = (int)(col % dout), b = (int)(col / dout);
    const TI* mg = m + ((long long)b * groups + o % groups) * din;
    TO* ob = out + (long long)b * (din + 1) * dout;
    float ss = 0.f;
    for (int i = lane; i < din; i += 32) {
        const float v = to_f32(base[(long long)i * dout + o]) * to_f32(mg[i]);
        ss += v * v;
    }
    const float inv = 1.0f / fmaxf(sqrtf(warp_sum(ss)), 1e-12f);
    for (int i = lane; i < din; i += 32)
        ob[(long long)i * dout + o] = from_f32<TO>(to_f32(base[(long long)i * dout + o]) * to_f32(mg[i]) * inv);
    if (lane == 0) ob[(long long)din * dout + o] = from_f32<TO>(to_f32(base[(long long)din * dout + o]));
}

extern "C" __global__ void __launch_bounds__(128) modulated_weights_f32_f32(const float* base, const float* m, float* out, int b, int din, int dout, int groups) {
    modulate(base, m, out, b, din, dout, groups);
}
extern "C" __global__ void __launch_bounds__(128) modulated_weights_bf16_f32(const __nv_bfloat16* base, const __nv_bfloat16* m, float* out, int b, int din, int dout, int groups) {
    modulate(base, m, out, b, din, dout, groups);
}

template <typename TW, typename TO>
__device__ __forceinline__ void hyper_mlp(const float* __restrict__ pe, const TW* __restrict__ w0,
                                          const TW* __restrict__ w1, TO* __restrict__ out, int P, int din, int dh,
                                          int dout) {
    float* pe_s = dynamic_smem<float>();  // [din]
    float* hid = pe_s + din;              // [dh]
    const int p = blockIdx.x, b = blockIdx.y;
    for (int i = threadIdx.x; i < din; i += blockDim.x) pe_s[i] = pe[(long long)p * din + i];
    __syncthreads();
    const TW* w0b = w0 + (long long)b * (din + 1) * dh;
    for (int j = threadIdx.x; j < dh; j += blockDim.x) {
        float acc = to_f32(w0b[(long long)din * dh + j]);
        for (int i = 0; i < din; ++i) acc += pe_s[i] * to_f32(w0b[(long long)i * dh + j]);
        hid[j] = fmaxf(acc, 0.f);
    }
    __syncthreads();
    const TW* w1b = w1 + (long long)b * (dh + 1) * dout;
    TO* ob = out + ((long long)b * P + p) * dout;
    for (int o = threadIdx.x; o < dout; o += blockDim.x) {
        float acc = to_f32(w1b[(long long)dh * dout + o]);
        for (int j = 0; j < dh; ++j) acc += hid[j] * to_f32(w1b[(long long)j * dout + o]);
        ob[o] = from_f32<TO>(acc);
    }
}

extern "C" __global__ void __launch_bounds__(128) hyper_mlp_f32_f32(const float* pe, const float* w0, const float* w1, float* out, int p, int din, int dh, int dout) {
    hyper_mlp(pe, w0, w1, out, p, din, dh, dout);
}
extern "C" __global__ void __launch_bounds__(128) hyper_mlp_f32_bf16(const float* pe, const float* w0, const float* w1, __nv_bfloat16* out, int p, int din, int dh, int dout) {
    hyper_mlp(pe, w0, w1, out, p, din, dh, dout);
}
