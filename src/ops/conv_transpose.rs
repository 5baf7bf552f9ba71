//! PyTorch's `ConvTranspose2d` on channels-last images: Stage A's 4/2/1 upsampler, Stage B's
//! 2×2 upscalers and the previewer's layers. The kernel is the dense conv's implicit GEMM
//! (`kernels/conv2d.cu`, [`super::conv2d`]) run once per output phase: output rows s·j + φ take
//! the taps ky ≡ φ + p (mod s) only, so each of the stride² phases is an ordinary conv with
//! ⌈k/s⌉² or fewer taps, all in one launch.
//!
//! The reference accumulates in f64 and rounds once, like [`super::gemm::gemm_ref`].

use super::conv2d::{Act, Conv2dLaunch};
use super::dot::{accumulate, pack_panels, LANES};
use super::{inputs_n, nhwc, require_f32, Shaped};
use crate::runtime::graph::{Cost, LaunchIo, OpImpl, OutSpec, TensorDesc};
use crate::runtime::launch::Launch;
use crate::tensor::{DType, HostTensor};
use crate::verify::{CheckBuilder, OpCheck, Scale, Tolerance};
use crate::{Error, Result};
use rayon::prelude::*;

/// Output extent of a transposed conv along one axis: `(n − 1)·s − 2p + k`, if positive.
fn transposed_extent(n: usize, k: usize, stride: usize, pad: usize) -> Option<usize> {
    (n.checked_sub(1)?.checked_mul(stride)?.checked_add(k)?)
        .checked_sub(pad.checked_mul(2)?)
        .filter(|&v| v > 0)
}

/// The input index a transposed-conv tap reads for output position `o` and kernel offset
/// `kk`: `i` with `o = i·s − p + kk`, if it exists in `[0, n)`.
fn transposed_source(o: usize, kk: usize, stride: usize, pad: usize, n: usize) -> Option<usize> {
    let t = (o + pad).checked_sub(kk)?;
    (t % stride == 0 && t / stride < n).then_some(t / stride)
}

/// PyTorch `ConvTranspose2d(Cin, Cout, k, stride, padding)` with bias. Inputs: `x [B, H, W,
/// Cin]`, `w [Cin, Cout, k, k]` (PyTorch's layout), `bias` f32 `[Cout]` → `[B, (H−1)·s − 2p + k,
/// (W−1)·s − 2p + k, Cout]`, where `out[oy, ox] = bias + Σ x[iy, ix, ci]·w[ci, co, ky, kx]` over
/// `oy = iy·s − p + ky`, `ox = ix·s − p + kx`. Stage A uses k 4, s 2, p 1.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvTranspose2d {
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub out: DType,
}

/// Validated dimensions of a [`ConvTranspose2d`].
struct TransposedDims {
    x: [usize; 4],
    cout: usize,
    out_hw: (usize, usize),
}

impl ConvTranspose2d {
    fn dims<T: Shaped>(&self, ins: &[&T]) -> Result<TransposedDims> {
        let op = self.name();
        let [x, w, bias] = inputs_n(op, ins)?;
        let xd @ [_, h, wd, cin] = nhwc(op, "x", x.shape())?;
        let k = self.k;
        if k == 0 || self.stride == 0 {
            return Err(Error::shape(
                op,
                format!("k = {k} and stride = {} must be ≥ 1", self.stride),
            ));
        }
        let cout = match w.shape() {
            &[ci, co, kh, kw] if ci == cin && co > 0 && kh == k && kw == k => co,
            s => {
                return Err(Error::shape(
                    op,
                    format!("w must be [{cin}, Cout, {k}, {k}] (PyTorch layout), got {s:?}"),
                ))
            }
        };
        if bias.shape() != [cout] {
            return Err(Error::shape(
                op,
                format!("bias must be [{cout}], got {:?}", bias.shape()),
            ));
        }
        let extent = |n| transposed_extent(n, k, self.stride, self.pad);
        let (Some(oh), Some(ow)) = (extent(h), extent(wd)) else {
            return Err(Error::shape(
                op,
                format!(
                    "padding {} leaves no output for {h}×{wd} (k {k}, stride {})",
                    self.pad, self.stride
                ),
            ));
        };
        Ok(TransposedDims {
            x: xd,
            cout,
            out_hw: (oh, ow),
        })
    }
}

impl OpImpl for ConvTranspose2d {
    fn name(&self) -> &'static str {
        "conv_transpose2d"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let d = self.dims(inputs)?;
        require_f32(self.name(), "bias", inputs[2])?;
        Ok(vec![(
            vec![d.x[0], d.out_hw.0, d.out_hw.1, d.cout],
            self.out,
        )])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let TransposedDims {
            x: [_, h, wd, cin],
            cout,
            out_hw: (oh, ow),
        } = self.dims(inputs)?;
        let (x, w, bias) = (&inputs[0].data, &inputs[1].data, &inputs[2].data);
        let (k, s, p) = (self.k, self.stride, self.pad);
        // w as [Cout][tap·Cin] packed in panels of LANES output channels: one panel holds a
        // block's weights for every tap and input channel, contiguous per tap.
        let taps = k * k;
        let w_oc: Vec<f32> = (0..cout * taps * cin)
            .map(|i| {
                let (co, rest) = (i / (taps * cin), i % (taps * cin));
                let (tap, ci) = (rest / cin, rest % cin);
                w[(ci * cout + co) * taps + tap]
            })
            .collect();
        let panels = pack_panels(&w_oc, cout, taps * cin);
        outputs[0]
            .data
            .par_chunks_mut(ow * cout)
            .enumerate()
            .for_each(|(row, out)| {
                let (b, oy) = (row / oh, row % oh);
                // Per output channel: the bias, then tap by tap (ky, kx in order), each over
                // the input channels in order.
                for (pi, panel) in panels.chunks_exact(taps * cin * LANES).enumerate() {
                    let co0 = pi * LANES;
                    for (ox, px) in out.chunks_exact_mut(cout).enumerate() {
                        let mut acc = [[0f64; LANES]];
                        for (a, &bv) in acc[0].iter_mut().zip(&bias[co0..]) {
                            *a = bv as f64;
                        }
                        for ky in 0..k {
                            let Some(iy) = transposed_source(oy, ky, s, p, h) else {
                                continue;
                            };
                            for kx in 0..k {
                                let Some(ix) = transposed_source(ox, kx, s, p, wd) else {
                                    continue;
                                };
                                let src = &x[((b * h + iy) * wd + ix) * cin..][..cin];
                                let tap = ky * k + kx;
                                accumulate(
                                    &mut acc,
                                    [src],
                                    &panel[tap * cin * LANES..][..cin * LANES],
                                );
                            }
                        }
                        for (o, &a) in px[co0..].iter_mut().zip(&acc[0]) {
                            *o = a as f32;
                        }
                    }
                }
            });
        Ok(())
    }

    /// The products of every (output pixel, tap) pair that reads an input pixel: per axis,
    /// the taps whose source row exists, summed over the output rows.
    fn cost(&self, inputs: &[&TensorDesc], outputs: &[&TensorDesc]) -> Cost {
        let (k, s, p) = (self.k, self.stride, self.pad);
        let [b, h, wd, cin] = inputs[0].shape[..] else {
            return Cost::default();
        };
        let [_, oh, ow, cout] = outputs[0].shape[..] else {
            return Cost::default();
        };
        let pairs = |out: usize, n: usize| -> usize {
            (0..out)
                .map(|o| {
                    (0..k)
                        .filter(|&kk| transposed_source(o, kk, s, p, n).is_some())
                        .count()
                })
                .sum()
        };
        let products = b * pairs(oh, h) * pairs(ow, wd) * cin * cout;
        Cost {
            flops: 2.0 * products as f64,
            bytes: inputs.iter().chain(outputs).map(|d| d.bytes() as f64).sum(),
        }
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let descs: Vec<&TensorDesc> = io.inputs.iter().map(|t| t.desc).collect();
        let d = self.dims(&descs)?;
        let launch = Conv2dLaunch {
            x: d.x,
            out_hw: d.out_hw,
            cout: d.cout,
            k: self.k,
            stride: self.stride,
            pad: self.pad,
            transposed: true,
            bias: io.inputs[2].ptr,
            gate: 0,
            r: 0,
            act: Act::None,
            out: self.out,
        };
        Ok(vec![launch.launch(self.name(), io)?])
    }
}

/// Hostsim/GPU checks on odd sizes, every (x, output) dtype pair: phases with different tap
/// counts (k not a multiple of s), phases without taps (k < s), Cin and Cout across several
/// 64-wide tiles.
pub fn checks(seed: u64, scale: Scale) -> Result<Vec<OpCheck>> {
    let mut v = Vec::new();
    // (B, H, W, Cin, Cout, k, stride, pad): Stage A's 4/2/1, Stage B's and the previewer's
    // 2/2/0, the previewer's 3×3 convs as 3/1/1; 3/2/1 and 5/3/2 give phases of different tap
    // counts, 1/3/0 phases with none.
    let mut tr = vec![
        (1, 1, 1, 3, 5, 4, 2, 1),
        (2, 5, 7, 16, 9, 4, 2, 1),
        (1, 6, 5, 24, 40, 2, 2, 0),
        (1, 3, 4, 8, 130, 3, 1, 1),
        (1, 9, 7, 70, 65, 4, 2, 1),
        (2, 4, 3, 5, 7, 3, 2, 1),
        (1, 5, 4, 9, 3, 5, 3, 2),
        (2, 3, 5, 6, 66, 1, 3, 0),
    ];
    if scale == Scale::Gpu {
        tr.extend([
            (1, 160, 160, 384, 192, 4, 2, 1),
            (2, 128, 128, 576, 320, 2, 2, 0),
            (1, 192, 192, 128, 128, 3, 1, 1),
        ]);
    }
    for (i, &(b, h, w, cin, cout, k, stride, pad)) in tr.iter().enumerate() {
        for (j, &(dx, dout)) in crate::verify::DTYPE_PAIRS.iter().enumerate() {
            let mut cb = CheckBuilder::new(seed.wrapping_add(1000 + (i * 4 + j) as u64));
            let ins = vec![
                cb.input(&[b, h, w, cin], dx, 1.0)?,
                cb.input(&[cin, cout, k, k], DType::BF16, 0.5)?,
                cb.input(&[cout], DType::F32, 0.5)?,
            ];
            let op = ConvTranspose2d {
                k,
                stride,
                pad,
                out: dout,
            };
            let y = cb.graph.op1(op.clone(), &ins)?;
            let check = cb.finish(
                format!("conv_transpose2d {dx:?}->{dout:?} [{b},{h},{w},{cin}]->{cout} k{k} s{stride} p{pad}"),
                &[y],
                Tolerance::BOUND,
            )?;
            v.push(check.with_scale(move |chk, r| {
                let [x, wt, bias] = [ins[0], ins[1], ins[2]].map(|id| chk.values(id));
                vec![op.bounds(x, ([b, h, w, cin], dx), wt, bias, &r[0])]
            }));
        }
    }
    Ok(v)
}

impl ConvTranspose2d {
    /// Per-element bounds on |kernel − reference|, the conv2d kernel's arithmetic (as in
    /// [`super::conv2d::Conv2d`]'s checks), with S = |bias| + Σ|x·w| ≤ |bias| + Σ_taps
    /// ‖x_pixel‖·‖w[:, co, tap]‖ (Cauchy–Schwarz per tap, cheap at GPU size):
    /// - an f32 x rounded to bf16 once: U_BF16·S (w is bf16);
    /// - the tensor cores' truncating f32 accumulation over a phase's K ≤ ⌈k/s⌉²·Cin terms:
    ///   sum(K, 2⁻²³)·S; the bias add and the reference's rounding: 2u·S; then the store.
    fn bounds(
        &self,
        x: &[f32],
        ([_, h, wd, cin], dx): ([usize; 4], DType),
        w: &[f32],
        bias: &[f32],
        y: &[f32],
    ) -> Vec<f32> {
        use crate::verify::bound::{stored, sum, U, U_BF16, U_MMA};
        let (k, s, p) = (self.k, self.stride, self.pad);
        let cout = bias.len();
        let norm =
            |it: &mut dyn Iterator<Item = f32>| it.map(|v| v as f64 * v as f64).sum::<f64>().sqrt();
        let x_norm: Vec<f64> = x
            .chunks_exact(cin)
            .map(|px| norm(&mut px.iter().copied()))
            .collect();
        // ‖w[:, co, ky, kx]‖ at [(ky·k + kx)·Cout + co].
        let w_norm: Vec<f64> = (0..k * k * cout)
            .map(|i| {
                let (tap, co) = (i / cout, i % cout);
                norm(&mut (0..cin).map(|ci| w[(ci * cout + co) * k * k + tap]))
            })
            .collect();
        let operand = if dx == DType::F32 { U_BF16 } else { 0.0 };
        let chain = sum(k.div_ceil(s).pow(2) * cin, U_MMA) + 2.0 * U + operand;
        let extent = |n| transposed_extent(n, k, s, p).unwrap_or(1);
        let (oh, ow) = (extent(h), extent(wd));
        y.par_chunks(cout)
            .enumerate()
            .flat_map_iter(|(px, yp)| {
                let (b, oy, ox) = (px / (oh * ow), px / ow % oh, px % ow);
                let mut s_tap = vec![0f64; cout];
                for ky in 0..k {
                    let Some(iy) = transposed_source(oy, ky, s, p, h) else {
                        continue;
                    };
                    for kx in 0..k {
                        let Some(ix) = transposed_source(ox, kx, s, p, wd) else {
                            continue;
                        };
                        let xn = x_norm[(b * h + iy) * wd + ix];
                        for (st, wn) in s_tap.iter_mut().zip(&w_norm[(ky * k + kx) * cout..]) {
                            *st += xn * wn;
                        }
                    }
                }
                yp.iter()
                    .enumerate()
                    .map(|(co, &yv)| {
                        let sv = bias[co].abs() as f64 + s_tap[co];
                        stored(chain * sv, yv as f64, self.out == DType::BF16) as f32
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_support::{assert_rejected, random, run, Rejected};

    fn conv_t(k: usize, stride: usize, pad: usize) -> ConvTranspose2d {
        ConvTranspose2d {
            k,
            stride,
            pad,
            out: DType::F32,
        }
    }

    #[test]
    fn conv_transpose_one_pixel_and_two_pixel_examples() {
        let w = HostTensor::new(vec![1, 1, 4, 4], (0..16).map(|v| v as f32).collect());
        let x = HostTensor::new(vec![1, 1, 1, 1], vec![2.0]);
        let y = run(&conv_t(4, 2, 1), &[&x, &w, &HostTensor::full(&[1], 0.5)]).unwrap();
        // out[oy, ox] = 0.5 + 2·w[oy + 1, ox + 1].
        assert_eq!(y.shape, [1, 2, 2, 1]);
        assert_eq!(y.data, [10.5, 12.5, 18.5, 20.5]);

        // Two input pixels whose 4×4 footprints overlap on the middle output columns.
        let x = HostTensor::new(vec![1, 1, 2, 1], vec![1.0, 10.0]);
        let y = run(&conv_t(4, 2, 1), &[&x, &w, &HostTensor::zeros(&[1])]).unwrap();
        assert_eq!(y.shape, [1, 2, 4, 1]);
        assert_eq!(y.data, [5.0, 46.0, 57.0, 60.0, 9.0, 90.0, 101.0, 100.0]);
    }

    /// The direct conv with ConvTranspose2d's weights: `out[iy, ix, ci] = Σ y[iy·s − p + ky,
    /// ix·s − p + kx, co]·w[ci, co, ky, kx]`, zero outside.
    fn direct_conv(
        y: &HostTensor,
        w: &HostTensor,
        (s, p): (usize, usize),
        (h, wd): (usize, usize),
    ) -> Vec<f64> {
        let [b, oh, ow, cout] = y.shape[..] else {
            panic!()
        };
        let [cin, _, k, _] = w.shape[..] else {
            panic!()
        };
        let mut out = vec![0f64; b * h * wd * cin];
        for bi in 0..b {
            for iy in 0..h {
                for ix in 0..wd {
                    for ci in 0..cin {
                        let o = &mut out[((bi * h + iy) * wd + ix) * cin + ci];
                        for ky in 0..k {
                            for kx in 0..k {
                                let (oy, ox) = (
                                    (iy * s + ky) as isize - p as isize,
                                    (ix * s + kx) as isize - p as isize,
                                );
                                if !(0..oh as isize).contains(&oy)
                                    || !(0..ow as isize).contains(&ox)
                                {
                                    continue;
                                }
                                for co in 0..cout {
                                    let yv = y.data
                                        [((bi * oh + oy as usize) * ow + ox as usize) * cout + co];
                                    *o += yv as f64
                                        * w.data[((ci * cout + co) * k + ky) * k + kx] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn conv_transpose_is_the_adjoint_of_the_direct_conv() {
        let (h, wd, cin, cout) = (4, 5, 3, 4);
        for (i, &(k, s, p)) in [
            (4, 2, 1),
            (3, 1, 1),
            (2, 2, 0),
            (3, 2, 0),
            (5, 3, 2),
            (1, 1, 0),
        ]
        .iter()
        .enumerate()
        {
            let seed = 10 * i as u64;
            let x = random(&[2, h, wd, cin], seed);
            let w = random(&[cin, cout, k, k], seed + 1);
            let t = run(&conv_t(k, s, p), &[&x, &w, &HostTensor::zeros(&[cout])]).unwrap();
            assert_eq!(
                t.shape,
                [2, (h - 1) * s + k - 2 * p, (wd - 1) * s + k - 2 * p, cout]
            );
            let y = random(&t.shape, seed + 2);
            let lhs: f64 = t
                .data
                .iter()
                .zip(&y.data)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            let cy = direct_conv(&y, &w, (s, p), (h, wd));
            let rhs: f64 = x.data.iter().zip(&cy).map(|(&a, b)| a as f64 * b).sum();
            assert!(
                (lhs - rhs).abs() < 1e-4,
                "k {k} s {s} p {p}: {lhs} vs {rhs}"
            );
        }
    }

    #[test]
    fn conv_transpose_adds_the_bias() {
        let x = HostTensor::zeros(&[1, 3, 2, 2]);
        let bias = HostTensor::new(vec![3], vec![0.5, -1.0, 2.0]);
        let y = run(&conv_t(4, 2, 1), &[&x, &random(&[2, 3, 4, 4], 1), &bias]).unwrap();
        assert!(y.data.chunks_exact(3).all(|px| px == bias.data.as_slice()));
    }

    #[test]
    fn invalid_shapes_are_errors() {
        let (f, b) = (DType::F32, DType::BF16);
        let ct = |k, s, p| Box::new(conv_t(k, s, p)) as Box<dyn OpImpl>;
        let cases: Vec<Rejected> = vec![
            (
                ct(4, 2, 1),
                vec![(&[1, 4, 4, 3], f), (&[3, 2, 3, 3], f), (&[2], f)],
            ),
            (
                ct(4, 2, 1),
                vec![(&[1, 4, 4, 3], f), (&[2, 2, 4, 4], f), (&[2], f)],
            ),
            (
                ct(4, 2, 1),
                vec![(&[1, 4, 4, 3], f), (&[3, 2, 4, 4], f), (&[3], f)],
            ),
            (
                ct(4, 2, 1),
                vec![(&[1, 4, 4, 3], b), (&[3, 2, 4, 4], b), (&[2], b)],
            ),
            (
                ct(4, 0, 1),
                vec![(&[1, 4, 4, 3], f), (&[3, 2, 4, 4], f), (&[2], f)],
            ),
            (
                ct(2, 1, 1),
                vec![(&[1, 1, 4, 3], f), (&[3, 2, 2, 2], f), (&[2], f)],
            ),
            (
                ct(0, 1, 0),
                vec![(&[1, 1, 4, 3], f), (&[3, 2, 0, 0], f), (&[2], f)],
            ),
        ];
        assert_rejected(&cases);
    }

    #[test]
    fn cost_counts_the_taps_that_read_an_input_pixel() {
        let desc = |shape: &[usize]| TensorDesc {
            name: String::new(),
            shape: shape.to_vec(),
            dtype: DType::BF16,
            role: crate::runtime::graph::Role::Activation,
        };
        // 4/2/1 doubles the size; every output row reads 2 taps but the first and the last,
        // which read 1: 4H − 2 pairs along an axis of H input rows.
        let (b, h, w, cin, cout) = (2, 5, 7, 3, 4);
        let x = desc(&[b, h, w, cin]);
        let y = desc(&[b, 2 * h, 2 * w, cout]);
        let c = conv_t(4, 2, 1).cost(&[&x], &[&y]);
        let want = b * (4 * h - 2) * (4 * w - 2) * cin * cout;
        assert_eq!(c.flops, 2.0 * want as f64);
        // 2/2/0: one tap per output pixel.
        let y = desc(&[b, 2 * h, 2 * w, cout]);
        let c = conv_t(2, 2, 0).cost(&[&x], &[&y]);
        assert_eq!(c.flops, 2.0 * (b * 4 * h * w * cin * cout) as f64);
    }
}
