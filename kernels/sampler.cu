// The sampler's device side (ops/sampler.rs): classifier-free guidance with std rescaling, and
// the DDPM/DDIM step. All arithmetic in f32; the predictions may be stored as bf16.
//
// CFG: pred [2B, …] holds the conditional rows c, then the unconditional ones u. Per element
//   p = lerp(u, c, cfg) (torch.lerp: fma from the nearer end). Without rescale (rho = 0) the
//   output is p. With rescale, per group (the whole half-batch, or each sample when per_sample):
//   y = rho·(p·σ_c/(σ_p + 1e-9)) + keep·p, σ the unbiased (n − 1) std over the group, keep =
//   1 − rho rounded to f32 by the host.
// cfg_stats_<pred>: launch 1 of the rescale. Grid (P, G): block x of group g takes a grid-stride
//   share of the group's elements; each thread sums (v − v₀) and (v − v₀)² of c and p, v₀ its
//   own first element (a shift near the data: no cancellation), turns them into (count, mean,
//   M2) and the block merges those with Chan's formula; one moments record per block goes to
//   `parts` (f32 [G, P, 5]: count, mean_c, M2_c, mean_p, M2_p).
// cfg_apply_<pred>: grid (Q, G). With rho > 0 every block first merges the P ≤ 256 records of
//   its group (one per thread, in the same order in every block, so all blocks agree), then
//   writes y over a grid-stride share of the group. With rho = 0 it writes p (parts unused).
//   With `x` non-null it also takes the sampler step on the guided y as eps, element e of
//   sample r = e / per with (a, b, a′, b′, σ) = coef[r], exactly as ddpm_step does: CFG,
//   rescale and the step of one sampler iteration in two launches.
// ddpm_step_<eps>: x0 = (x − b·eps)/a, x_next = a′·x0 + √(b′² − σ²)·eps + σ·noise with (a, b, a′,
//   b′, σ) = coef[row]; x, noise, coef and both outputs f32. 2-d grid-stride loops: rows over
//   grid/block y, a row's elements over grid/block x (blocks (tx, 256/tx)).
// Launch: the CFG kernels use 256 threads (8 full warps: the merges use warp shuffles), G ≤
//   65535. Limits: every element count in 64 bits; P ≤ 256.
#include "common/portable.cuh"
#include "common/convert.cuh"

// The parameters of cfg_apply_<pred>, mirrored by ops::sampler::CfgApplyParams; build.rs checks
// that both have this layout (build/abi.rs).
struct CfgApplyParams {
    const void* pred;     // [2B, …] in the kernel's type
    const float* parts;   // moments records [G, P, 5], or null without rescale
    float* y;             // the guided prediction
    const float* x;       // the step's x, or null: no step
    const float* noise;   // the step's noise
    const float* coef;    // the step's (a, b, a′, b′, σ) per sample
    float* x0;            // the step's outputs
    float* next;
    long long group_len;  // elements per rescale group
    long long half;       // elements of one half (c or u) of pred
    long long per;        // elements per sample
    int n_parts;          // P: records per group (0 without rescale)
    float cfg, rho, keep;
};

namespace sampler {
constexpr int THREADS = 256, WARPS = THREADS / 32;
constexpr float STD_EPS = 1e-9f;

// torch.lerp(start, end, w) on the CPU.
__device__ __forceinline__ float lerp(float start, float end, float w) {
    const float diff = end - start;
    return fabsf(w) < 0.5f ? fmaf(w, diff, start) : fmaf(w - 1.f, diff, end);
}

// Count, mean and sum of squared deviations of c and of p over some elements.
struct Moments {
    float n, mean_c, m2_c, mean_p, m2_p;
};

// Chan et al.'s pairwise combination of two sets' moments.
__device__ __forceinline__ Moments merge(const Moments& a, const Moments& b) {
    const float n = a.n + b.n;
    if (n == 0.f) return a;
    const float wb = b.n / n, cross = a.n * wb;
    const float dc = b.mean_c - a.mean_c, dp = b.mean_p - a.mean_p;
    return {n, a.mean_c + dc * wb, a.m2_c + b.m2_c + dc * dc * cross, a.mean_p + dp * wb,
            a.m2_p + b.m2_p + dp * dp * cross};
}

// f applied to each field (the shuffles move one float at a time).
template <typename F> __device__ __forceinline__ Moments each(const Moments& m, F f) {
    return {f(m.n), f(m.mean_c), f(m.m2_c), f(m.mean_p), f(m.m2_p)};
}

// Every lane ends with the merge of the warp's 32 records (full warps only).
__device__ __forceinline__ Moments warp_merge(Moments m) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = merge(m, each(m, [o](float v) { return __shfl_xor_sync(0xFFFFFFFFu, v, o); }));
    return m;
}

// The merge of every thread's moments; every thread gets lane 0's result of the last step, so
// all threads of a block (and all blocks, which merge in the same order) use identical values.
// Contains two __syncthreads(): call it from all threads.
__device__ __forceinline__ Moments block_merge(Moments m) {
    __shared__ Moments warp_moments[WARPS];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    m = warp_merge(m);
    if (lane == 0) warp_moments[warp] = m;
    __syncthreads();
    m = warp_merge(lane < WARPS ? warp_moments[lane] : Moments{0.f, 0.f, 0.f, 0.f, 0.f});
    m = each(m, [](float v) { return __shfl_sync(0xFFFFFFFFu, v, 0); });
    __syncthreads();  // warp_moments may be reused right after
    return m;
}

// One group: its conditional elements at c, the unconditional ones at u.
template <typename T> struct Group {
    const T* c;
    const T* u;
};

template <typename T>
__device__ __forceinline__ Group<T> group_of(const T* pred, long long group_len, long long half) {
    const long long base = (long long)blockIdx.y * group_len;
    return {pred + base, pred + half + base};
}

template <typename T>
__device__ __forceinline__ void stats(const T* __restrict__ pred, float* __restrict__ parts, long long group_len,
                                      long long half, float cfg) {
    const Group<T> g = group_of(pred, group_len, half);
    const long long first = (long long)blockIdx.x * THREADS + threadIdx.x, stride = (long long)gridDim.x * THREADS;
    float shift_c = 0.f, shift_p = 0.f, s1c = 0.f, s2c = 0.f, s1p = 0.f, s2p = 0.f, n = 0.f;
    if (first < group_len) {
        shift_c = to_f32(g.c[first]);
        shift_p = lerp(to_f32(g.u[first]), shift_c, cfg);
    }
    for (long long i = first; i < group_len; i += stride) {
        const float c = to_f32(g.c[i]);
        const float dc = c - shift_c, dp = lerp(to_f32(g.u[i]), c, cfg) - shift_p;
        s1c += dc;
        s2c += dc * dc;
        s1p += dp;
        s2p += dp * dp;
        n += 1.f;
    }
    Moments m{n, 0.f, 0.f, 0.f, 0.f};
    if (n > 0.f) {
        // Σ(v − v̄)² = Σ(v − v₀)² − (Σ(v − v₀))²/n, floored at 0 against rounding.
        m = {n, shift_c + s1c / n, fmaxf(s2c - s1c * s1c / n, 0.f), shift_p + s1p / n, fmaxf(s2p - s1p * s1p / n, 0.f)};
    }
    m = block_merge(m);
    if (threadIdx.x == 0) {
        float* out = parts + ((long long)blockIdx.y * gridDim.x + blockIdx.x) * 5;
        out[0] = m.n;
        out[1] = m.mean_c;
        out[2] = m.m2_c;
        out[3] = m.mean_p;
        out[4] = m.m2_p;
    }
}

// The sampler step of element e with prediction `e_val`; k = its sample's (a, b, a′, b′, σ).
__device__ __forceinline__ void step_element(long long e, float e_val, const float* __restrict__ x,
                                             const float* __restrict__ noise, const float* __restrict__ k,
                                             float* __restrict__ x0, float* __restrict__ next) {
    const float a = k[0], b = k[1], a_prev = k[2], b_prev = k[3], sigma = k[4];
    const float eps_scale = sqrtf(b_prev * b_prev - sigma * sigma);
    const float x0v = (x[e] - e_val * b) / a;
    x0[e] = x0v;
    next[e] = a_prev * x0v + eps_scale * e_val + sigma * noise[e];
}

template <typename T>
__device__ __forceinline__ void apply(const T* __restrict__ pred, const float* __restrict__ parts, int n_parts,
                                      float* __restrict__ y, long long group_len, long long half, float cfg, float rho,
                                      float keep, const float* __restrict__ x, const float* __restrict__ noise,
                                      const float* __restrict__ coef, float* __restrict__ x0, float* __restrict__ next,
                                      long long per) {
    const Group<T> g = group_of(pred, group_len, half);
    const long long base = (long long)blockIdx.y * group_len;
    const long long first = (long long)blockIdx.x * THREADS + threadIdx.x, stride = (long long)gridDim.x * THREADS;
    float std_c = 1.f, std_p = 1.f;
    if (rho != 0.f) {
        Moments m{0.f, 0.f, 0.f, 0.f, 0.f};
        if ((int)threadIdx.x < n_parts) {
            const float* p = parts + ((long long)blockIdx.y * n_parts + threadIdx.x) * 5;
            m = {p[0], p[1], p[2], p[3], p[4]};
        }
        m = block_merge(m);
        const float dof = (float)(group_len - 1);
        std_c = sqrtf(m.m2_c / dof);
        std_p = sqrtf(m.m2_p / dof) + STD_EPS;
    }
    for (long long i = first; i < group_len; i += stride) {
        const float p = lerp(to_f32(g.u[i]), to_f32(g.c[i]), cfg);
        const float v = rho == 0.f ? p : rho * (p * std_c / std_p) + p * keep;
        y[base + i] = v;
        if (x) step_element(base + i, v, x, noise, coef + (base + i) / per * 5, x0, next);
    }
}

template <typename T>
__device__ __forceinline__ void ddpm_step(const float* __restrict__ x, const T* __restrict__ eps,
                                          const float* __restrict__ noise, const float* __restrict__ coef,
                                          float* __restrict__ x0, float* __restrict__ next, long long rows,
                                          long long per) {
    for (long long r = (long long)blockIdx.y * blockDim.y + threadIdx.y; r < rows; r += (long long)gridDim.y * blockDim.y) {
        for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < per; j += (long long)gridDim.x * blockDim.x) {
            const long long i = r * per + j;
            step_element(i, to_f32(eps[i]), x, noise, coef + r * 5, x0, next);
        }
    }
}

// cfg_apply_<pred>: the struct unpacked into apply's arguments.
template <typename T>
__device__ __forceinline__ void apply_entry(const CfgApplyParams& p) {
    apply(static_cast<const T*>(p.pred), p.parts, p.n_parts, p.y, p.group_len, p.half, p.cfg, p.rho, p.keep, p.x,
          p.noise, p.coef, p.x0, p.next, p.per);
}
}  // namespace sampler

extern "C" __global__ void __launch_bounds__(256) cfg_stats_f32(const float* pred, float* parts, long long group_len, long long half, float cfg) { sampler::stats(pred, parts, group_len, half, cfg); }
extern "C" __global__ void __launch_bounds__(256) cfg_stats_bf16(const __nv_bfloat16* pred, float* parts, long long group_len, long long half, float cfg) { sampler::stats(pred, parts, group_len, half, cfg); }
extern "C" __global__ void __launch_bounds__(256) cfg_apply_f32(const CfgApplyParams p) { sampler::apply_entry<float>(p); }
extern "C" __global__ void __launch_bounds__(256) cfg_apply_bf16(const CfgApplyParams p) { sampler::apply_entry<__nv_bfloat16>(p); }
extern "C" __global__ void __launch_bounds__(256) ddpm_step_f32(const float* x, const float* eps, const float* noise, const float* coef, float* x0, float* next, long long rows, long long per) { sampler::ddpm_step(x, eps, noise, coef, x0, next, rows, per); }
extern "C" __global__ void __launch_bounds__(256) ddpm_step_bf16(const float* x, const __nv_bfloat16* eps, const float* noise, const float* coef, float* x0, float* next, long long rows, long long per) { sampler::ddpm_step(x, eps, noise, coef, x0, next, rows, per); }
