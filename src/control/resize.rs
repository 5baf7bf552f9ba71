//! The resizes of the official control preprocessing, on one channels-first image
//! (`[c, h, w]`, values in [0, 1]):
//!
//! - [`control_size`] / [`resize_short_side`]: `inference/utils.py resize_image`, which the
//!   official `test_controlnet.py` applies to the control image: the short side becomes 768
//!   ([`CONTROL_SHORT_SIDE`]) and the long side keeps the aspect, truncated; torchvision's
//!   bilinear resize with antialias (a triangle filter widened by the downscale factor).
//! - [`bilinear`]: `F.interpolate(.., mode='bilinear')` without antialias (align_corners
//!   False), which the Canny filter uses to go to 224×224 and back. It follows PyTorch's
//!   float32 rounding, so the 8-bit quantization after it sees the same values.

use crate::tensor::HostTensor;

/// The short side of the control image in the official script.
pub const CONTROL_SHORT_SIDE: usize = 768;

/// `(height, width)` after `resize_image(image, short)`: the short side becomes `short`,
/// the long one `int(short · long / short_in)` (computed in double precision, truncated).
pub fn control_size(h: usize, w: usize, short: usize) -> (usize, usize) {
    let long = |l: usize, s: usize| (short as f64 * l as f64 / s as f64) as usize;
    if w <= h {
        (long(h, w), short)
    } else {
        (short, long(w, h))
    }
}

/// `resize_image(image, short)`: antialiased bilinear to [`control_size`].
pub fn resize_short_side(img: &HostTensor, short: usize) -> HostTensor {
    let [_, h, w] = dims(img);
    let (oh, ow) = control_size(h, w, short);
    bilinear_antialias(img, oh, ow)
}

fn dims(img: &HostTensor) -> [usize; 3] {
    img.shape
        .as_slice()
        .try_into()
        .expect("a channels-first image [c, h, w]")
}

/// Taps of one output position along one axis: first input index and normalised weights.
struct Taps {
    first: usize,
    weights: Vec<f32>,
}

/// torchvision's antialiased linear taps: the triangle filter centred on the output pixel's
/// source position, widened to the scale when downscaling, normalised to sum 1. All in
/// float32 in PyTorch's order, so the weights are PyTorch's to the bit.
fn antialias_taps(input: usize, output: usize) -> Vec<Taps> {
    let scale = input as f32 / output as f32;
    let (support, inv) = if scale >= 1.0 {
        (scale, 1.0 / scale)
    } else {
        (1.0, 1.0)
    };
    (0..output)
        .map(|i| {
            let center = scale * (i as f32 + 0.5);
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let raw: Vec<f32> = (lo..hi)
                .map(|j| (1.0 - ((j as f32 - center + 0.5) * inv).abs()).max(0.0))
                .collect();
            let total: f32 = raw.iter().fold(0.0, |a, &v| a + v);
            Taps {
                first: lo,
                weights: raw.iter().map(|&v| v / total).collect(),
            }
        })
        .collect()
}

/// Σ weightsₖ · valuesₖ as PyTorch's kernel rounds it: the first product, then one fused
/// multiply-add per further tap.
fn weighted_sum(weights: &[f32], value: impl Fn(usize) -> f32) -> f32 {
    (1..weights.len()).fold(value(0) * weights[0], |acc, k| {
        value(k).mul_add(weights[k], acc)
    })
}

/// torchvision `F.resize(img, (oh, ow), antialias=True)` (bilinear): width first, then
/// height, each axis skipped when its size does not change; PyTorch's rounding, bit for bit.
pub fn bilinear_antialias(img: &HostTensor, oh: usize, ow: usize) -> HostTensor {
    let [c, h, w] = dims(img);
    let mut cur = img.clone();
    if ow != w {
        let taps = antialias_taps(w, ow);
        let mut out = vec![0f32; c * h * ow];
        for (row, dst) in cur.data.chunks_exact(w).zip(out.chunks_exact_mut(ow)) {
            for (d, t) in dst.iter_mut().zip(&taps) {
                *d = weighted_sum(&t.weights, |k| row[t.first + k]);
            }
        }
        cur = HostTensor::new(vec![c, h, ow], out);
    }
    if oh != h {
        let taps = antialias_taps(h, oh);
        let mut out = vec![0f32; c * oh * ow];
        for (plane, dst) in cur
            .data
            .chunks_exact(h * ow)
            .zip(out.chunks_exact_mut(oh * ow))
        {
            for (t, drow) in taps.iter().zip(dst.chunks_exact_mut(ow)) {
                for (x, d) in drow.iter_mut().enumerate() {
                    *d = weighted_sum(&t.weights, |k| plane[(t.first + k) * ow + x]);
                }
            }
        }
        cur = HostTensor::new(vec![c, oh, ow], out);
    }
    cur
}

/// PyTorch's two linear taps along one axis (align_corners False), in float32:
/// src = max(scale·(i + 0.5) − 0.5, 0), i0 = ⌊src⌋, i1 = min(i0 + 1, n − 1), λ = src − i0.
fn linear_taps(input: usize, output: usize) -> Vec<(usize, usize, f32, f32)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|i| {
            let src = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(input - 1);
            let lambda = (src - i0 as f32).clamp(0.0, 1.0);
            let i1 = (i0 + 1).min(input - 1);
            (i0, i1, 1.0 - lambda, lambda)
        })
        .collect()
}

/// `F.interpolate(img, (oh, ow), mode='bilinear')`: per output pixel, the two rows are each
/// interpolated along the width, then blended along the height, each as
/// `fma(a, w_a, b · w_b)`: the rounding of PyTorch's x86 CPU kernel (which its compiler
/// contracts to fused multiply-adds), bit for bit, so a quantization after it agrees.
pub fn bilinear(img: &HostTensor, oh: usize, ow: usize) -> HostTensor {
    let [c, h, w] = dims(img);
    let (ty, tx) = (linear_taps(h, oh), linear_taps(w, ow));
    let mut out = vec![0f32; c * oh * ow];
    for (plane, dst) in img
        .data
        .chunks_exact(h * w)
        .zip(out.chunks_exact_mut(oh * ow))
    {
        for (&(y0, y1, wy0, wy1), drow) in ty.iter().zip(dst.chunks_exact_mut(ow)) {
            let (r0, r1) = (&plane[y0 * w..][..w], &plane[y1 * w..][..w]);
            for (&(x0, x1, wx0, wx1), d) in tx.iter().zip(drow.iter_mut()) {
                let top = r0[x0].mul_add(wx0, r0[x1] * wx1);
                let bottom = r1[x0].mul_add(wx0, r1[x1] * wx1);
                *d = top.mul_add(wy0, bottom * wy1);
            }
        }
    }
    HostTensor::new(vec![c, oh, ow], out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_data::random;

    #[test]
    fn the_short_side_becomes_the_target_and_the_long_side_is_truncated() {
        assert_eq!(control_size(1080, 1920, 768), (768, 1365)); // 1365.33
        assert_eq!(control_size(1920, 1080, 768), (1365, 768));
        assert_eq!(control_size(500, 500, 768), (768, 768));
        assert_eq!(control_size(3, 1000, 768), (768, 256000));
        assert_eq!(control_size(61, 89, 40), (40, 58)); // 58.36
    }

    /// Both resizes are weighted means with non-negative weights summing to 1: constants
    /// stay constant and every output lies within the input's range.
    #[test]
    fn resizes_keep_constants_and_stay_within_the_input_range() {
        for (h, w, oh, ow) in [(7, 13, 3, 29), (31, 5, 224, 224), (224, 224, 17, 9)] {
            let img = random(h as u64 * 31 + w as u64, &[2, h, w], 1.0);
            let (lo, hi) = img
                .data
                .iter()
                .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            for out in [bilinear(&img, oh, ow), bilinear_antialias(&img, oh, ow)] {
                assert_eq!(out.shape, [2, oh, ow]);
                assert!(out.data.iter().all(|&v| v >= lo - 1e-6 && v <= hi + 1e-6));
            }
            let flat = HostTensor::new(vec![1, h, w], vec![0.375; h * w]);
            for out in [bilinear(&flat, oh, ow), bilinear_antialias(&flat, oh, ow)] {
                assert!(out.data.iter().all(|&v| (v - 0.375).abs() < 1e-6));
            }
        }
    }

    /// Without a size change an axis is copied; an exact 2× downscale averages pixel pairs
    /// with weights 1/4, 1/2, 1/4 (antialias) or 1/2, 1/2 (plain bilinear).
    #[test]
    fn known_weights_on_simple_scales() {
        let img = random(5, &[1, 3, 8], 1.0);
        let same = bilinear_antialias(&img, 3, 8);
        assert_eq!(same.data, img.data);
        assert_eq!(bilinear(&img, 3, 8).data, img.data);
        let aa = bilinear_antialias(&img, 3, 4);
        let plain = bilinear(&img, 3, 4);
        let row = &img.data[8..16];
        // Output 1 is centred at 3.0 (source pixels 1..5 carry weight).
        let want_aa = (0.25 * row[1] + 0.75 * row[2] + 0.75 * row[3] + 0.25 * row[4]) / 2.0;
        assert!((aa.data[4 + 1] - want_aa).abs() < 1e-6);
        assert!((plain.data[4 + 1] - 0.5 * (row[2] + row[3])).abs() < 1e-6);
    }
}
