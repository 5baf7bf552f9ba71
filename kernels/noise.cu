// Gaussian noise from a seed, on the device (ops/noise.rs): the sampler's per-step noise
// without a host round trip, identical on every backend.
//
// Math: group g of four outputs takes Philox4x32-10 (Salmon et al., SC'11) of the counter
//   (g mod 2^32, g / 2^32, stream, step) under the key (seed mod 2^32, seed / 2^32); its
//   four words x_i become uniforms u_i = (x_i + 1)·2^-32 ∈ (0, 1], and Box–Muller turns
//   (u0, u1) and (u2, u3) into z = √(−2 ln u_a)·(cos 2πu_b, sin 2πu_b). Evaluated in double
//   (cospi/sinpi: exact reduction) and rounded once to f32, so the CPU reference matches
//   bit for bit.
// Layout: key = 4 u32 words in device memory (seed lo, seed hi, stream, step), read at run
//   time so a replayed graph draws fresh noise when the host rewrites the step; out f32 [n].
// Launch: grid-stride over ceil(n / 4) groups, 256 threads.
#include "common/portable.cuh"

namespace noise {
__device__ __forceinline__ void philox_round(uint32_t c[4], uint32_t k0, uint32_t k1) {
    const unsigned long long p0 = 0xD2511F53ull * c[0], p1 = 0xCD9E8D57ull * c[2];
    const uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
    const uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
}
}  // namespace noise

extern "C" __global__ void __launch_bounds__(256) gaussian_noise_f32(const uint32_t* key, float* out, long long n) {
    const uint32_t seed_lo = key[0], seed_hi = key[1], stream = key[2], step = key[3];
    const long long groups = (n + 3) / 4;
    for (long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x; g < groups;
         g += (long long)gridDim.x * blockDim.x) {
        uint32_t c[4] = {(uint32_t)g, (uint32_t)((unsigned long long)g >> 32), stream, step};
        uint32_t k0 = seed_lo, k1 = seed_hi;
        for (int r = 0; r < 10; ++r) {
            if (r > 0) {
                k0 += 0x9E3779B9u;
                k1 += 0xBB67AE85u;
            }
            noise::philox_round(c, k0, k1);
        }
        for (int pair = 0; pair < 2; ++pair) {
            const double ua = ((double)c[2 * pair] + 1.0) * 2.3283064365386963e-10;
            const double ub = ((double)c[2 * pair + 1] + 1.0) * 2.3283064365386963e-10;
            const double radius = sqrt(-2.0 * log(ua));
            const long long e = 4 * g + 2 * pair;
            if (e < n) out[e] = (float)(radius * cospi(2.0 * ub));
            if (e + 1 < n) out[e + 1] = (float)(radius * sinpi(2.0 * ub));
        }
    }
}
