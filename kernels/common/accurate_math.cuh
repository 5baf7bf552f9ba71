// sin and cos of f32 arguments far from zero (sinusoidal embeddings reach 10^4 rad, the INR
// encoding π·1024), evaluated in double and rounded once to f32: correctly rounded but for
// rare double-rounding ties, like the references' f64 evaluation. Our own reduction and
// polynomials: libdevice's double sin/cos keep a Payne–Hanek slow path in local memory.
// Reduction: x/π in double-double, minus the nearest multiple of 1/2 (exact), times π, then
// Taylor series on |r| ≤ π/4 (truncation < 5e-17). Error ≈ 1e-16 absolute for |x| < 2^24.
#pragma once
#include "portable.cuh"

namespace accurate {// 1/π = INV_PI_HI + INV_PI_LO and π = PI_HI + PI_LO, each pair exact to ~2^-107.
constexpr double INV_PI_HI = 0.3183098861837907, INV_PI_LO = -1.9678676675182486e-17;
constexpr double PI_HI = 3.141592653589793, PI_LO = 1.2246467991473532e-16;

// sin and cos of r, |r| ≤ π/4 (+ rounding), by their Taylor series through r^15 and r^16.
__device__ __forceinline__ void sincos_reduced(double r, double* s, double* c) {
    const double r2 = r * r;
    double ps = 1.0 / 1307674368000.0;  // 1/15!
    ps = ps * -r2 + 1.0 / 6227020800.0;
    ps = ps * -r2 + 1.0 / 39916800.0;
    ps = ps * -r2 + 1.0 / 362880.0;
    ps = ps * -r2 + 1.0 / 5040.0;
    ps = ps * -r2 + 1.0 / 120.0;
    ps = ps * -r2 + 1.0 / 6.0;
    *s = r - r * r2 * ps;
    double pc = 1.0 / 20922789888000.0;  // 1/16!
    pc = pc * -r2 + 1.0 / 87178291200.0;
    pc = pc * -r2 + 1.0 / 479001600.0;
    pc = pc * -r2 + 1.0 / 3628800.0;
    pc = pc * -r2 + 1.0 / 40320.0;
    pc = pc * -r2 + 1.0 / 720.0;
    pc = pc * -r2 + 1.0 / 24.0;
    pc = pc * -r2 + 0.5;
    *c = 1.0 - r2 * pc;
}

// sin(x) and cos(x) of an f32 argument, evaluated in double and rounded once to f32.
__device__ __forceinline__ void sincosf_double(float xf, float* sin_out, float* cos_out) {
    const double x = xf;
    const double t = x * INV_PI_HI;
    const double t_lo = fma(x, INV_PI_HI, -t) + x * INV_PI_LO;  // t + t_lo = x/π
    const double q = rint(2.0 * t);                             // quarter turns
    const double f = (t - 0.5 * q) + t_lo;                      // exact difference, |f| ≤ 1/4
    double s, c;
    sincos_reduced(fma(f, PI_HI, f * PI_LO), &s, &c);
    switch ((long long)q & 3) {
        case 0: *sin_out = (float)s; *cos_out = (float)c; break;
        case 1: *sin_out = (float)c; *cos_out = (float)-s; break;
        case 2: *sin_out = (float)-s; *cos_out = (float)-c; break;
        default: *sin_out = (float)-c; *cos_out = (float)s; break;
    }
}
}  // namespace accurate
