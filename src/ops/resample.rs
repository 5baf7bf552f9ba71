//! Spatial resizes of channels-last images (`kernels/resample.cu`), reproducing PyTorch's CPU
//! float32 index and weight arithmetic step by step (these are semantics, not precision):
//! bilinear with `align_corners=True` (Stage B's effnet and size-mismatch resizes) and the
//! legacy `nearest` mode (the INR's LR→HR skip).

use super::rows_launch;
use super::{inputs_n, nhwc, to_i32, Shaped};
use crate::runtime::graph::{LaunchIo, OpImpl, OutSpec, TensorDesc};
use crate::runtime::launch::{Args, Launch};
use crate::tensor::{DType, HostTensor};
use crate::verify::{copy_tolerance, unary_check, DTYPE_PAIRS};
use crate::verify::{seed_sequence, OpCheck, Scale, Tolerance};
use crate::{Error, Result};
use rayon::prelude::*;

/// Validates `[B, H, W, C] → [B, h, w, C]`; returns the input dims.
fn resize_dims<T: Shaped>(op: &str, (h, w): (usize, usize), ins: &[&T]) -> Result<[usize; 4]> {
    let [x] = inputs_n(op, ins)?;
    let dims = nhwc(op, "x", x.shape())?;
    if h == 0 || w == 0 {
        return Err(Error::shape(
            op,
            format!("the output size {h}×{w} is empty"),
        ));
    }
    Ok(dims)
}

fn resize_infer(
    op: &str,
    size: (usize, usize),
    out: DType,
    ins: &[&TensorDesc],
) -> Result<Vec<OutSpec>> {
    let [b, _, _, c] = resize_dims(op, size, ins)?;
    Ok(vec![(vec![b, size.0, size.1, c], out)])
}

/// The f32 scale of an `align_corners=True` axis: (in − 1)/(out − 1), 0 when out = 1.
fn align_corners_scale(n_in: usize, n_out: usize) -> f32 {
    if n_out > 1 {
        (n_in - 1) as f32 / (n_out - 1) as f32
    } else {
        0.0
    }
}

/// The f32 scale of a legacy `nearest` axis: in/out.
fn nearest_scale(n_in: usize, n_out: usize) -> f32 {
    n_in as f32 / n_out as f32
}

/// The arguments both resize kernels start with: (x, y, output rows B·h, row length w·C, C,
/// H, W, h), and the (rows, row length) of the launch.
fn resize_args(op: &str, io: &LaunchIo, (h, w): (usize, usize)) -> Result<(Args, usize, usize)> {
    let x = io.inputs[0];
    let [b, hi, wi, c] = resize_dims(op, (h, w), &[x.desc])?;
    let (rows, cols) = (b * h, w * c);
    let i = |what: &str, v: usize| to_i32(op, what, v);
    i("input row length", wi * c)?;
    let args = Args::new()
        .ptr(x.ptr)
        .ptr(io.outputs[0].ptr)
        .i32(i("output rows", rows)?)
        .i32(i("output row length", cols)?)
        .i32(i("channels", c)?)
        .i32(i("input height", hi)?)
        .i32(i("input width", wi)?)
        .i32(i("output height", h)?);
    Ok((args, rows, cols))
}

/// `<op>_<in>_<out>`.
fn resize_kernel(op: &str, io: &LaunchIo, out: DType) -> String {
    format!("{op}_{}_{}", io.inputs[0].desc.dtype.suffix(), out.suffix())
}

/// One output coordinate of a linear resize: two source indices and their weights.
#[derive(Clone, Copy, Debug, PartialEq)]
struct LinearTap {
    i0: usize,
    i1: usize,
    l0: f32,
    l1: f32,
}

/// The `align_corners=True` taps along one axis, in f32 as PyTorch's
/// `compute_source_index_and_lambda`: scale = (in−1)/(out−1) (0 when out = 1), src = scale·dst,
/// i0 = min(trunc(src), in−1), i1 = i0 + (i0 < in−1), λ1 = clamp(src − i0, 0, 1), λ0 = 1 − λ1.
/// Equal sizes copy (λ = (1, 0) on the same index), as PyTorch special-cases them.
fn linear_taps(n_in: usize, n_out: usize) -> Vec<LinearTap> {
    let scale = align_corners_scale(n_in, n_out);
    (0..n_out)
        .map(|d| {
            if n_in == n_out {
                return LinearTap {
                    i0: d,
                    i1: d,
                    l0: 1.0,
                    l1: 0.0,
                };
            }
            let src = scale * d as f32;
            let i0 = (src as usize).min(n_in - 1);
            let l1 = (src - i0 as f32).clamp(0.0, 1.0);
            LinearTap {
                i0,
                i1: i0 + usize::from(i0 < n_in - 1),
                l0: 1.0 - l1,
                l1,
            }
        })
        .collect()
}

/// Bilinear resize with `align_corners=True`: `[B, H, W, C] → [B, h, w, C]`. Each output is
/// `λ0h·(λ0w·x[i0][j0] + λ1w·x[i0][j1]) + λ1h·(λ0w·x[i1][j0] + λ1w·x[i1][j1])` in f32, the
/// evaluation order of PyTorch's generic CPU kernel for NCHW float tensors. (PyTorch switches
/// to another kernel when the input is channels-last with C > 3 or when out_h + out_w ≤ 128:
/// that one sums `x·(λh·λw)` products and can differ from this in the last bits.)
#[derive(Clone, Debug, PartialEq)]
pub struct ResizeBilinear {
    pub h: usize,
    pub w: usize,
    pub out: DType,
}

impl OpImpl for ResizeBilinear {
    fn name(&self) -> &'static str {
        "resize_bilinear"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        resize_infer(self.name(), (self.h, self.w), self.out, inputs)
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let [_, hi, wi, c] = resize_dims(self.name(), (self.h, self.w), inputs)?;
        let (rows, cols) = (linear_taps(hi, self.h), linear_taps(wi, self.w));
        let x = &inputs[0].data;
        let image = hi * wi * c;
        outputs[0]
            .data
            .par_chunks_exact_mut(c)
            .enumerate()
            .for_each(|(o, y)| {
                let (b, oy, ox) = (o / (self.h * self.w), o / self.w % self.h, o % self.w);
                let (th, tw) = (rows[oy], cols[ox]);
                let px = |i: usize, j: usize| &x[b * image + (i * wi + j) * c..][..c];
                let (p00, p01, p10, p11) = (
                    px(th.i0, tw.i0),
                    px(th.i0, tw.i1),
                    px(th.i1, tw.i0),
                    px(th.i1, tw.i1),
                );
                for (ch, v) in y.iter_mut().enumerate() {
                    let top = p00[ch] * tw.l0 + p01[ch] * tw.l1;
                    let bottom = p10[ch] * tw.l0 + p11[ch] * tw.l1;
                    *v = top * th.l0 + bottom * th.l1;
                }
            });
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let (args, rows, cols) = resize_args(self.name(), io, (self.h, self.w))?;
        let [_, hi, wi, _] = io.inputs[0].desc.shape[..] else {
            unreachable!("resize_args checked the rank")
        };
        let args = args
            .i32(self.w as i32) // w ≤ w·C, which resize_args checked
            .f32(align_corners_scale(hi, self.h))
            .f32(align_corners_scale(wi, self.w));
        let name = resize_kernel(self.name(), io, self.out);
        Ok(vec![rows_launch(&name, rows, cols, args)?])
    }
}

/// PyTorch's legacy `nearest` source index along one axis: scale = in/out in f32,
/// src = min(floor(dst·scale), in−1).
fn nearest_index(n_in: usize, n_out: usize) -> Vec<usize> {
    let scale = nearest_scale(n_in, n_out);
    (0..n_out)
        .map(|d| ((d as f32 * scale).floor() as usize).min(n_in - 1))
        .collect()
}

/// Nearest resize, PyTorch's legacy `mode="nearest"`: `[B, H, W, C] → [B, h, w, C]` with
/// `y[oy, ox] = x[min(⌊oy·(H/h)⌋, H−1), min(⌊ox·(W/w)⌋, W−1)]`, the scales in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct ResizeNearest {
    pub h: usize,
    pub w: usize,
    pub out: DType,
}

impl OpImpl for ResizeNearest {
    fn name(&self) -> &'static str {
        "resize_nearest"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        resize_infer(self.name(), (self.h, self.w), self.out, inputs)
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let [_, hi, wi, c] = resize_dims(self.name(), (self.h, self.w), inputs)?;
        let (rows, cols) = (nearest_index(hi, self.h), nearest_index(wi, self.w));
        let x = &inputs[0].data;
        outputs[0]
            .data
            .par_chunks_exact_mut(c)
            .enumerate()
            .for_each(|(o, y)| {
                let (b, oy, ox) = (o / (self.h * self.w), o / self.w % self.h, o % self.w);
                y.copy_from_slice(&x[((b * hi + rows[oy]) * wi + cols[ox]) * c..][..c]);
            });
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let (args, rows, cols) = resize_args(self.name(), io, (self.h, self.w))?;
        let [_, hi, wi, _] = io.inputs[0].desc.shape[..] else {
            unreachable!("resize_args checked the rank")
        };
        let args = args
            .f32(nearest_scale(hi, self.h))
            .f32(nearest_scale(wi, self.w));
        let name = resize_kernel(self.name(), io, self.out);
        Ok(vec![rows_launch(&name, rows, cols, args)?])
    }
}

/// Checks for `verify` and the emulator tests: up, down and identity resizes, 1-pixel inputs
/// and outputs, odd channel counts, PyTorch's f32 rounding cases, every dtype pair; on a GPU
/// also model-sized resizes.
pub fn checks(seed: u64, scale: Scale) -> Result<Vec<OpCheck>> {
    let mut v = Vec::new();
    let mut next = seed_sequence(seed);
    for &(din, dout) in &DTYPE_PAIRS {
        for (shape, (h, w)) in [
            (&[2, 5, 7, 3][..], (11, 13)),
            (&[1, 37, 23, 16], (7, 5)),
            (&[2, 5, 7, 3], (5, 7)),
            (&[1, 1, 1, 4], (3, 4)),
            (&[1, 6, 9, 1], (1, 1)),
            (&[1, 2, 2, 5], (42, 3)),
        ] {
            let op = ResizeBilinear { h, w, out: dout };
            v.push(bilinear_check(next(), op, shape, din)?);
        }
        for (shape, (h, w)) in [
            (&[1, 23, 11, 2][..], (11, 23)),
            (&[2, 5, 4, 3], (15, 8)),
            (&[1, 37, 7, 5], (50, 3)),
            (&[1, 1, 1, 3], (2, 5)),
        ] {
            let op = ResizeNearest { h, w, out: dout };
            v.push(unary_check(
                next(),
                op,
                shape,
                din,
                copy_tolerance(&[din], dout),
            )?);
        }
    }
    if scale == Scale::Gpu {
        let (f, h) = (DType::F32, DType::BF16);
        for (shape, (oh, ow), din) in [
            (&[2, 24, 24, 16][..], (256, 256), f),
            (&[1, 64, 64, 1280], (128, 128), h),
        ] {
            let op = ResizeBilinear {
                h: oh,
                w: ow,
                out: h,
            };
            v.push(bilinear_check(next(), op, shape, din)?);
        }
        let op = ResizeNearest {
            h: 96,
            w: 96,
            out: h,
        };
        v.push(unary_check(
            next(),
            op,
            &[1, 48, 48, 2048],
            h,
            copy_tolerance(&[h], h),
        )?);
    }
    Ok(v)
}

/// A bilinear resize check with per-element bounds: both sides evaluate the same f32 taps and
/// weights (λ ∈ [0, 1]); each side's two lerps and the final one round four products and
/// three sums (fused or not): ≤ 4u·m per side, m = the resize of |x| (the terms' magnitude,
/// since neighbours of opposite sign cancel), 8u·m between them; then the store.
fn bilinear_check(seed: u64, op: ResizeBilinear, shape: &[usize], din: DType) -> Result<OpCheck> {
    use crate::verify::bound::{stored, U};
    let check = unary_check(seed, op.clone(), shape, din, Tolerance::BOUND)?;
    let (x, shape) = (check.inputs[0].0, shape.to_vec());
    Ok(check.with_scale(move |c, r| {
        let mag = crate::verify::reference_on_abs(&op, &[(&shape, c.values(x))])
            .expect("the check's shapes")
            .remove(0);
        let bf16 = op.out == DType::BF16;
        vec![mag
            .iter()
            .zip(&r[0])
            .map(|(&m, &y)| stored(8.0 * U * m as f64, y as f64, bf16) as f32)
            .collect()]
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_support::{assert_rejected, random, run, Rejected};

    fn bilinear(h: usize, w: usize) -> ResizeBilinear {
        ResizeBilinear {
            h,
            w,
            out: DType::F32,
        }
    }

    fn nearest(h: usize, w: usize) -> ResizeNearest {
        ResizeNearest {
            h,
            w,
            out: DType::F32,
        }
    }

    /// `[1, h, w, 2]` holding `f(i, j)` in channel 0 and `−f(i, j)` in channel 1.
    fn image(h: usize, w: usize, f: impl Fn(usize, usize) -> f32) -> HostTensor {
        let data = (0..h * w).flat_map(|p| {
            let v = f(p / w, p % w);
            [v, -v]
        });
        HostTensor::new(vec![1, h, w, 2], data.collect())
    }

    #[test]
    fn bilinear_to_the_same_size_is_the_identity() {
        let x = random(&[2, 5, 7, 3], 1);
        assert_eq!(run(&bilinear(5, 7), &[&x]).unwrap(), x);
    }

    #[test]
    fn bilinear_keeps_the_corners() {
        for (hi, wi, ho, wo) in [(7, 9, 13, 5), (5, 13, 17, 4), (3, 2, 9, 1)] {
            let x = random(&[2, hi, wi, 3], 2);
            let y = run(&bilinear(ho, wo), &[&x]).unwrap();
            for b in 0..2 {
                for (i, j, oi, oj) in [
                    (0, 0, 0, 0),
                    (0, wi - 1, 0, wo - 1),
                    (hi - 1, 0, ho - 1, 0),
                    (hi - 1, wi - 1, ho - 1, wo - 1),
                ] {
                    let j = if wo == 1 { 0 } else { j };
                    let src = &x.data[((b * hi + i) * wi + j) * 3..][..3];
                    let dst = &y.data[((b * ho + oi) * wo + oj) * 3..][..3];
                    assert_eq!(src, dst, "{hi}×{wi} → {ho}×{wo} corner ({i}, {j})");
                }
            }
        }
    }

    #[test]
    fn bilinear_last_tap_follows_pytorch_f32_rounding() {
        // (2 − 1)/(42 − 1) rounds so that scale·41 = 1 − 2⁻²⁴: PyTorch's last output row
        // is then 2⁻²⁴·x[0] + (1 − 2⁻²⁴)·x[1], not x[1] itself.
        let last = *linear_taps(2, 42).last().unwrap();
        let l1 = 1.0 - 2f32.powi(-24);
        assert_eq!(
            last,
            LinearTap {
                i0: 0,
                i1: 1,
                l0: 1.0 - l1,
                l1
            }
        );
        assert_eq!(
            linear_taps(3, 5),
            [
                (0, 1, 0.0),
                (0, 1, 0.5),
                (1, 2, 0.0),
                (1, 2, 0.5),
                (2, 2, 0.0)
            ]
            .map(|(i0, i1, l1)| LinearTap {
                i0,
                i1,
                l0: 1.0 - l1,
                l1
            })
        );
    }

    #[test]
    fn bilinear_keeps_a_linear_ramp_linear() {
        let ramp = |y: f64, x: f64| 0.5 * y - 0.25 * x + 1.0;
        let x = image(6, 9, |i, j| ramp(i as f64, j as f64) as f32);
        for (ho, wo) in [(11, 4), (17, 13), (3, 25), (1, 1)] {
            let y = run(&bilinear(ho, wo), &[&x]).unwrap();
            let src = |o: usize, n_in: usize, n_out: usize| {
                if n_out == 1 {
                    0.0
                } else {
                    o as f64 * (n_in - 1) as f64 / (n_out - 1) as f64
                }
            };
            for (p, px) in y.data.chunks_exact(2).enumerate() {
                let v = ramp(src(p / wo, 6, ho), src(p % wo, 9, wo));
                assert!(
                    (px[0] as f64 - v).abs() < 1e-5,
                    "{ho}×{wo} at {p}: {} vs {v}",
                    px[0]
                );
                assert_eq!(px[1], -px[0]);
            }
        }
    }

    #[test]
    fn bilinear_hand_example() {
        // 1×3 → 1×5: scale 0.5, so the new columns are midpoints.
        let x = HostTensor::new(vec![1, 1, 3, 1], vec![0.0, 10.0, 30.0]);
        let y = run(&bilinear(1, 5), &[&x]).unwrap();
        assert_eq!(y.data, [0.0, 5.0, 10.0, 20.0, 30.0]);
    }

    /// Runs a nearest resize of an image whose pixels hold their own (row, col) and returns
    /// the source (row, col) of every output pixel.
    fn nearest_sources(hi: usize, wi: usize, ho: usize, wo: usize) -> Vec<(usize, usize)> {
        let x = image(hi, wi, |i, j| (i * 1000 + j) as f32);
        let y = run(&nearest(ho, wo), &[&x]).unwrap();
        y.data
            .chunks_exact(2)
            .map(|px| (px[0] as usize / 1000, px[0] as usize % 1000))
            .collect()
    }

    #[test]
    fn nearest_with_integer_factors_repeats_pixels() {
        for (hi, wi, fy, fx) in [(5, 4, 3, 2), (3, 7, 4, 5), (6, 2, 7, 1)] {
            let (ho, wo) = (hi * fy, wi * fx);
            for (p, src) in nearest_sources(hi, wi, ho, wo).into_iter().enumerate() {
                assert_eq!(src, (p / wo / fy, p % wo / fx), "{hi}×{wi} ×{fy}×{fx}");
            }
        }
    }

    #[test]
    fn nearest_matches_hand_computed_legacy_indices() {
        // 23 → 11: scale 2.0909…, floor(d·scale) = 2d for every d < 11.
        let down: Vec<usize> = (0..11).map(|d| 2 * d).collect();
        // 11 → 23: scale 0.47826…; note d = 2 → ⌊0.956⌋ = 0 (floor, not round).
        let up = [
            0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10,
        ];
        let got = nearest_sources(23, 11, 11, 23);
        for (p, src) in got.into_iter().enumerate() {
            assert_eq!(src, (down[p / 23], up[p % 23]));
        }
    }

    #[test]
    fn invalid_shapes_are_errors() {
        let f = DType::F32;
        let ops =
            || -> [Box<dyn OpImpl>; 2] { [Box::new(bilinear(4, 4)), Box::new(nearest(4, 4))] };
        let mut cases: Vec<Rejected> = vec![
            (Box::new(bilinear(0, 4)), vec![(&[1, 3, 3, 2], f)]),
            (Box::new(nearest(4, 0)), vec![(&[1, 3, 3, 2], f)]),
        ];
        let bad_inputs: [Vec<(&'static [usize], DType)>; 4] = [
            vec![(&[3, 3, 2], f)],
            vec![(&[1, 0, 3, 2], f)],
            vec![],
            vec![(&[1, 3, 3, 2], f), (&[1, 3, 3, 2], f)],
        ];
        for inputs in bad_inputs {
            cases.extend(ops().map(|op| (op, inputs.clone())));
        }
        assert_rejected(&cases);
    }
}
