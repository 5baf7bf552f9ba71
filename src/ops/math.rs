//! Scalar numerics shared by several op families' references: f32 functions evaluated
//! accurately, PyTorch's f32 `linspace`, the exact GELU and SiLU, and the GRN's sums of
//! squares; the LayerNorm reference and its error bound (LayerNorm, and the conv that fuses one).

use rayon::prelude::*;

/// `f` (sin, cos, exp, ln, acos …) of an f32 argument, evaluated in f64 and rounded once:
/// correctly rounded but for rare double-rounding ties, like PyTorch's accurate f32 math.
pub fn accurate(f: fn(f64) -> f64, x: f32) -> f32 {
    f(x as f64) as f32
}

/// `torch.linspace(start, end, steps)` in f32, value for value: step = (end − start)/(steps − 1)
/// in f32; the first half is `start + step·k`, the second half `end − step·(steps − 1 − k)`,
/// each rounded once (PyTorch's CPU kernel is a scalar loop its x86 builds compile with fused
/// multiply-adds; this reproduces the `r_range_20` input of the `sampler_step` case bit for bit).
pub fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    (0..steps)
        .map(|k| {
            if k < steps / 2 {
                step.mul_add(k as f32, start)
            } else {
                (-step).mul_add((steps - 1 - k) as f32, end)
            }
        })
        .collect()
}

/// Exact (erf) GELU, as `torch.nn.GELU()`, evaluated in f64.
pub fn gelu_ref(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))) as f32
}

/// SiLU, x·σ(x), in f64.
pub fn silu_ref(x: f32) -> f32 {
    let x = x as f64;
    (x / (1.0 + (-x).exp())) as f32
}

/// Channels per parallel task of [`sums_of_squares`].
const SUMSQ_CHANNELS: usize = 64;

/// Σ over the pixels (rows of `sample`, in order) of v² per channel, in f64; blocks of
/// channels in parallel, each channel's sum in pixel order.
pub fn sums_of_squares(sample: &[f32], d: usize) -> Vec<f64> {
    let mut ss = vec![0f64; d];
    ss.par_chunks_mut(SUMSQ_CHANNELS)
        .enumerate()
        .for_each(|(blk, acc)| {
            let c0 = blk * SUMSQ_CHANNELS;
            for px in sample.chunks_exact(d) {
                for (a, &v) in acc.iter_mut().zip(&px[c0..]) {
                    *a += v as f64 * v as f64;
                }
            }
        });
    ss
}

/// The f32 reference of a LayerNorm over rows of `c` channels (`gamma`/`beta` optional); rows in parallel.
pub fn layernorm_ref(
    x: &[f32],
    c: usize,
    eps: f32,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    y: &mut [f32],
) {
    y.par_chunks_exact_mut(c)
        .zip(x.par_chunks_exact(c))
        .for_each(|(out, row)| {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for (i, (o, &v)) in out.iter_mut().zip(row).enumerate() {
                let n = ((v as f64 - mean) * inv) as f32;
                *o = n * gamma.map_or(1.0, |g| g[i]) + beta.map_or(0.0, |b| b[i]);
            }
        });
}

/// The parameters of a LayerNorm whose error is bounded: channels, eps, (γ, β).
pub(crate) struct LnParams<'a> {
    pub c: usize,
    pub eps: f32,
    pub affine: Option<(&'a [f32], &'a [f32])>,
}

/// Per-element bounds on |kernel − reference| of a LayerNorm over the rows of `x`, which the
/// kernel sees with errors up to `dx` (None: the same values); `y` the reference output.
/// The kernel (one warp per row) sums c/32 values per lane then 5 butterfly levels, in f32:
/// - μ errs by sum(c/32 + 5, u)·mean|x| + u·|μ| + mean(dx); d = x − μ by dx + Δμ + u·|d|;
/// - σ² by 2·mean(|d|·Δd) + (sum(c/32 + 5, u) + 2u)·σ²; rsqrtf(σ² + eps) relatively by half
///   of σ²'s relative error + 2u + 2 ulp (rsqrtf);
/// - n = d·inv by inv·Δd + |n|·(inv's error + 2u) (the product; the reference's rounding);
/// - y = n·γ + β by |γ|·Δn + 4u·(|n·γ| + |β|) (two roundings a side), then the store.
///
/// The reference's statistics are f64 of the f32 inputs.
pub(crate) fn layernorm_bounds(
    x: &[f32],
    dx: Option<&[f32]>,
    p: &LnParams,
    y: &[f32],
    bf16: bool,
) -> Vec<f32> {
    use crate::verify::bound::{stored, sum, U, ULP2};
    let c = p.c;
    let chain = sum(c.div_ceil(32) + 5, U);
    let mut out = vec![0f32; x.len()];
    out.par_chunks_exact_mut(c)
        .enumerate()
        .for_each(|(row, o)| {
            let xr = &x[row * c..][..c];
            let dr = |i: usize| dx.map_or(0.0, |d| d[row * c + i] as f64);
            let cf = c as f64;
            let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / cf;
            let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cf;
            let abs_mean = xr.iter().map(|&v| (v as f64).abs()).sum::<f64>() / cf;
            let d_mean = (0..c).map(dr).sum::<f64>() / cf;
            let dmu = chain * abs_mean + U * mean.abs() + d_mean;
            let dd: Vec<f64> = (0..c)
                .map(|i| dr(i) + dmu + U * (xr[i] as f64 - mean).abs())
                .collect();
            let dvar = 2.0
                * (0..c)
                    .map(|i| (xr[i] as f64 - mean).abs() * dd[i])
                    .sum::<f64>()
                / cf
                + (chain + 2.0 * U) * var;
            let inv = 1.0 / (var + p.eps as f64).sqrt();
            let rel_inv = 0.5 * dvar / (var + p.eps as f64) + 2.0 * U + ULP2;
            for (i, ov) in o.iter_mut().enumerate() {
                let n = (xr[i] as f64 - mean) * inv;
                let dn = inv * dd[i] + n.abs() * (rel_inv + 2.0 * U);
                let (g, b) = p
                    .affine
                    .map_or((1.0, 0.0), |(g, b)| (g[i] as f64, b[i] as f64));
                let e = g.abs() * dn + 4.0 * U * ((n * g).abs() + b.abs());
                *ov = stored(e, y[row * c + i] as f64, bf16) as f32;
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_torch_values() {
        // torch.linspace(1, 0, 21) as stored in the sampler_step case (index 9 is where an
        // unfused evaluation of 1 + step·9 rounds the other way).
        let t = linspace(1.0, 0.0, 21);
        assert_eq!(t[9].to_bits(), 0x3f0c_cccd);
        assert_eq!((t[0], t[10], t[20]), (1.0, 0.5, 0.0));
        assert_eq!(linspace(0.25, 1.0, 1), vec![0.25]);
    }
}
