// Sinusoidal r-embedding (ops/embed.rs), Stable Cascade's gen_r_embedding.
//
// sin_embedding_f32:
//   Math: for row b and half = c/2: r' = r[b]·10000, f_i = exp(i·k) with k = −ln(10000)/(half − 1)
//   (a double rounded to f32 by the host) and i an f32 index, arg_i = r'·f_i, every product in
//   f32 in this order; y[b] = [sin(arg_0 … arg_{half−1}), cos(arg_0 … arg_{half−1})].
//   The arguments reach 10^4 rad, so exp, sin and cos are evaluated in double and rounded once
//   to f32, as the reference does (common/accurate_math.cuh).
// Layout: r f32 [B], y f32 [B, c].
// Launch: 2-d grid-stride loops, rows (b) over grid/block y, the c/2 frequencies over grid/block
//   x (each thread writes its sin and its cos).
// Limits: c even and ≥ 4 (the op checks); B < 2^63.
#include "common/portable.cuh"
#include "common/accurate_math.cuh"

namespace embed {
constexpr float MAX_POSITIONS = 10000.f;
}  // namespace embed

extern "C" __global__ void __launch_bounds__(256) sin_embedding_f32(const float* r, float* y, long long rows, int c, float k) {
    const int half = c / 2;
    for (long long b = (long long)blockIdx.y * blockDim.y + threadIdx.y; b < rows; b += (long long)gridDim.y * blockDim.y) {
        const float scaled = r[b] * embed::MAX_POSITIONS;
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < half; i += gridDim.x * blockDim.x) {
            const float freq = (float)exp((double)((float)i * k));
            float s, co;
            accurate::sincosf_double(scaled * freq, &s, &co);
            y[b * c + i] = s;
            y[b * c + half + i] = co;
        }
    }
}
