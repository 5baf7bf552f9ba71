//! Spatial convolutions on channels-last images (`kernels/conv.cu`): the depthwise k×k conv
//! (zero or edge-replicated border, stride 1 or more, optionally SiLU: EfficientNetV2's
//! MBConv) and its fusion with the channel LayerNorm that opens every Stage B/C ResBlock.
//! 1×1 convs are GEMMs ([`super::gemm`]); dense k×k convs are [`super::conv2d`], transposed
//! ones [`super::conv_transpose`].
//!
//! The references accumulate in f64 and round once, like [`super::gemm::gemm_ref`].

use super::math::{layernorm_bounds, layernorm_ref, silu_ref, LnParams};
use super::{inputs_n, nhwc, require_f32, to_i32, Shaped};
use crate::runtime::graph::{LaunchIo, OpImpl, OutSpec, TensorDesc};
use crate::runtime::kernels::KernelId;
use crate::runtime::launch::{ceil_div, Launch};
use crate::tensor::{DType, HostTensor};
use crate::verify::{CheckBuilder, OpCheck, Scale, Tolerance};
use crate::{Error, Result};
use rayon::prelude::*;

/// How a depthwise conv reads outside the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pad {
    /// Zeros (Stage B/C: `padding = k // 2`).
    Zero,
    /// The nearest edge pixel (Stage A: `ReplicationPad2d(1)` before an unpadded conv).
    Replicate,
}

impl Pad {
    /// The source index of position `at + offset` on an axis of length `n`, or `None` where
    /// the tap reads a zero.
    fn source(self, at: usize, offset: isize, n: usize) -> Option<usize> {
        let p = at as isize + offset;
        match self {
            _ if (0..n as isize).contains(&p) => Some(p as usize),
            Pad::Zero => None,
            Pad::Replicate => Some(p.clamp(0, n as isize - 1) as usize),
        }
    }
}

/// Validates depthwise conv inputs `(x [B, H, W, C], w [C, k·k], bias [C])`; returns x's dims.
fn depthwise_dims<T: Shaped>(op: &str, k: usize, ins: &[&T]) -> Result<[usize; 4]> {
    let [x, w, bias] = inputs_n(op, ins)?;
    if k % 2 == 0 {
        return Err(Error::shape(
            op,
            format!("k = {k} must be odd to keep the size"),
        ));
    }
    let dims = nhwc(op, "x", x.shape())?;
    let c = dims[3];
    if w.shape() != [c, k * k] {
        return Err(Error::shape(
            op,
            format!(
                "w must be [{c}, {}] (PyTorch [C, 1, k, k] flattened), got {:?}",
                k * k,
                w.shape()
            ),
        ));
    }
    if bias.shape() != [c] {
        return Err(Error::shape(
            op,
            format!("bias must be [{c}], got {:?}", bias.shape()),
        ));
    }
    Ok(dims)
}

/// The output extent of a depthwise conv with padding k/2 and `stride` on an axis of `n`.
fn strided(n: usize, stride: usize) -> usize {
    (n - 1) / stride + 1
}

/// `infer` of both depthwise ops: taps and bias are f32, the output is x's shape strided.
fn depthwise_infer(
    op: &str,
    k: usize,
    stride: usize,
    out: DType,
    ins: &[&TensorDesc],
) -> Result<Vec<OutSpec>> {
    let [b, h, w, c] = depthwise_dims(op, k, ins)?;
    if stride == 0 {
        return Err(Error::shape(op, "stride must be ≥ 1"));
    }
    require_f32(op, "w", ins[1])?;
    require_f32(op, "bias", ins[2])?;
    Ok(vec![(
        vec![b, strided(h, stride), strided(w, stride), c],
        out,
    )])
}

/// The depthwise conv reference: `y[b,i,j,c] = bias[c] + Σ w[c, dy·k+dx]·x̃[b, i·s+dy−k/2,
/// j·s+dx−k/2, c]`, with x̃ read through `pad` (s = `stride`).
#[allow(clippy::too_many_arguments)]
pub fn depthwise_ref(
    x: &[f32],
    [_, h, wd, c]: [usize; 4],
    w: &[f32],
    bias: &[f32],
    k: usize,
    stride: usize,
    pad: Pad,
    y: &mut [f32],
) {
    let (oh, ow) = (strided(h, stride), strided(wd, stride));
    let half = (k / 2) as isize;
    // The taps transposed to [k·k][C] in f64: tap t of every channel is one contiguous row.
    let taps: Vec<f64> = (0..k * k)
        .flat_map(|t| (0..c).map(move |ch| w[ch * k * k + t] as f64))
        .collect();
    y.par_chunks_mut(ow * c).enumerate().for_each(|(row, out)| {
        let (b, i) = (row / oh, row % oh * stride);
        let mut acc = vec![0f64; c];
        for (oj, px) in out.chunks_exact_mut(c).enumerate() {
            let j = oj * stride;
            for (a, &bv) in acc.iter_mut().zip(bias) {
                *a = bv as f64;
            }
            for dy in 0..k {
                let Some(sy) = pad.source(i, dy as isize - half, h) else {
                    continue;
                };
                for dx in 0..k {
                    let Some(sx) = pad.source(j, dx as isize - half, wd) else {
                        continue;
                    };
                    let src = &x[((b * h + sy) * wd + sx) * c..][..c];
                    let tap = &taps[(dy * k + dx) * c..][..c];
                    for ((a, &v), &t) in acc.iter_mut().zip(src).zip(tap) {
                        *a += t * v as f64;
                    }
                }
            }
            for (o, &a) in px.iter_mut().zip(&acc) {
                *o = a as f32;
            }
        }
    });
}

/// Depthwise k×k conv (odd k, padding k/2), stride s: output `[B, (H−1)/s + 1, (W−1)/s + 1,
/// C]`, then SiLU if `silu`. Inputs: `x [B, H, W, C]`, `w` f32 `[C, k·k]` (PyTorch's
/// `[C, 1, k, k]` flattened row-major), `bias` f32 `[C]`.
#[derive(Clone, Debug, PartialEq)]
pub struct DwConv {
    pub k: usize,
    pub stride: usize,
    pub pad: Pad,
    pub silu: bool,
    pub out: DType,
}

impl DwConv {
    /// Stride 1, no activation: the Stage A form.
    pub fn same(k: usize, pad: Pad, out: DType) -> Self {
        DwConv {
            k,
            stride: 1,
            pad,
            silu: false,
            out,
        }
    }
}

impl OpImpl for DwConv {
    fn name(&self) -> &'static str {
        "dwconv"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        depthwise_infer(self.name(), self.k, self.stride, self.out, inputs)
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let dims = depthwise_dims(self.name(), self.k, inputs)?;
        let (x, w, bias) = (&inputs[0].data, &inputs[1].data, &inputs[2].data);
        let y = &mut outputs[0].data;
        depthwise_ref(x, dims, w, bias, self.k, self.stride, self.pad, y);
        if self.silu {
            y.iter_mut().for_each(|v| *v = silu_ref(*v));
        }
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let mode = if self.silu { Then::Silu } else { Then::Nothing };
        depthwise_launch(
            self.name(),
            io,
            (self.k, self.stride),
            self.pad,
            mode,
            self.out,
        )
    }
}

/// The front of every Stage B/C ResBlock: the zero-padded [`DwConv`] followed by LayerNorm2d
/// over channels (no affine, biased variance, f32 statistics). Inputs as [`DwConv`].
#[derive(Clone, Debug, PartialEq)]
pub struct DwConvLn {
    pub k: usize,
    pub eps: f32,
    pub out: DType,
}

impl OpImpl for DwConvLn {
    fn name(&self) -> &'static str {
        "dwconv_ln"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        depthwise_infer(self.name(), self.k, 1, self.out, inputs)
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let dims = depthwise_dims(self.name(), self.k, inputs)?;
        let (x, w, bias) = (&inputs[0].data, &inputs[1].data, &inputs[2].data);
        let mut conv = vec![0f32; x.len()];
        depthwise_ref(x, dims, w, bias, self.k, 1, Pad::Zero, &mut conv);
        layernorm_ref(&conv, dims[3], self.eps, None, None, &mut outputs[0].data);
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let ln = Then::LayerNorm(self.eps);
        depthwise_launch(self.name(), io, (self.k, 1), Pad::Zero, ln, self.out)
    }
}

/// Pixels per block of the depthwise kernel (one warp each).
const DW_WARPS: usize = 4;

/// What the depthwise kernel does after the conv.
#[derive(Clone, Copy, PartialEq)]
enum Then {
    Nothing,
    Silu,
    /// LayerNorm over channels with this eps.
    LayerNorm(f32),
}

/// Whether the depthwise conv can take the vector kernel `dwconv3x16_*`: k = 3 (every
/// depthwise conv of the model), whole 16-byte groups of x channels (8 bf16 or 4 f32) and
/// 16-byte aligned x, w, bias and y (the arena and the weight buffers align every tensor to
/// 256 bytes; a view into one may not be).
fn vector_path(io: &LaunchIo, k: usize, c: usize) -> bool {
    let group = 16 / io.inputs[0].desc.dtype.size();
    let aligned = io.inputs.iter().chain(&io.outputs).all(|t| t.ptr % 16 == 0);
    k == 3 && c % group == 0 && aligned
}

/// The launch of `dwconv_<in>_<out>` (or its vector form, [`vector_path`]) with kernel
/// size and stride `(k, stride)`.
fn depthwise_launch(
    op: &str,
    io: &LaunchIo,
    (k, stride): (usize, usize),
    pad: Pad,
    then: Then,
    out: DType,
) -> Result<Vec<Launch>> {
    let descs: Vec<&TensorDesc> = io.inputs.iter().map(|t| t.desc).collect();
    let [b, h, w, c] = depthwise_dims(op, k, &descs)?;
    let eps = match then {
        Then::LayerNorm(eps) => Some(eps),
        _ => None,
    };
    // The LayerNorm stages each warp's conv row in shared memory.
    let smem = if eps.is_some() { DW_WARPS * c * 4 } else { 0 };
    if smem > 128 << 10 {
        return Err(Error::shape(
            op,
            format!("C = {c} exceeds the kernel's 8192 channels"),
        ));
    }
    let vector = vector_path(io, k, c);
    let mut args = io
        .tensor_args()
        .i32(to_i32(op, "B", b)?)
        .i32(to_i32(op, "H", h)?)
        .i32(to_i32(op, "W", w)?)
        .i32(to_i32(op, "C", c)?);
    if !vector {
        args = args.i32(to_i32(op, "k", k)?);
    }
    let args = args
        .i32(to_i32(op, "stride", stride)?)
        .i32((pad == Pad::Replicate) as i32)
        .i32(eps.is_some() as i32)
        .i32((then == Then::Silu) as i32)
        .f32(eps.unwrap_or(0.0));
    let kernel = if vector { "dwconv3x16" } else { "dwconv" };
    let name = format!("{kernel}_{}_{}", descs[0].dtype.suffix(), out.suffix());
    let pixels = b * strided(h, stride) * strided(w, stride);
    let mut launch = Launch::linear(
        KernelId::lookup(&name)?,
        to_i32(op, "pixel blocks", ceil_div(pixels, DW_WARPS))? as u32,
        (32 * DW_WARPS) as u32,
        args,
    );
    launch.smem = smem as u32;
    Ok(vec![launch])
}

/// Hostsim/GPU checks of the depthwise conv ops on odd sizes, every dtype pair.
pub fn checks(seed: u64, scale: Scale) -> Result<Vec<OpCheck>> {
    let mut v = Vec::new();
    let dtypes = [
        (DType::F32, DType::F32),
        (DType::BF16, DType::BF16),
        (DType::F32, DType::BF16),
        (DType::BF16, DType::F32),
    ];
    // Depthwise: (B, H, W, C, k), with and without LayerNorm, zero and replicate padding.
    // k = 3 with C a multiple of 16 bytes of x (8 bf16, 4 f32) takes the vector kernel: C 8,
    // 40, 320 (every dtype; 320 loops over groups), 20 (f32 x only); the others the scalar.
    let mut dw = vec![
        (1, 1, 1, 1, 3),
        (2, 7, 9, 37, 3),
        (1, 5, 3, 64, 5),
        (1, 13, 11, 320, 3),
        (1, 1, 3, 8, 3),
        (2, 9, 7, 40, 3),
        (1, 7, 5, 20, 3),
        (1, 5, 7, 72, 5),
    ];
    if scale == Scale::Gpu {
        dw.extend([(2, 64, 64, 2048, 3), (1, 256, 256, 640, 3)]);
    }
    for (i, &(b, h, w, c, k)) in dw.iter().enumerate() {
        for (j, &(din, dout)) in dtypes.iter().enumerate() {
            for variant in 0..5 {
                let mut cb =
                    CheckBuilder::new(seed.wrapping_add((i * 16 + j * 4 + variant) as u64));
                let ins = vec![
                    cb.input(&[b, h, w, c], din, 2.0)?,
                    cb.input(&[c, k * k], DType::F32, 0.5)?,
                    cb.input(&[c], DType::F32, 0.5)?,
                ];
                let (label, y) = match variant {
                    0 => (
                        "dwconv_ln",
                        cb.graph.op1(
                            DwConvLn {
                                k,
                                eps: 1e-6,
                                out: dout,
                            },
                            &ins,
                        )?,
                    ),
                    1 => (
                        "dwconv zero",
                        cb.graph.op1(DwConv::same(k, Pad::Zero, dout), &ins)?,
                    ),
                    2 => (
                        "dwconv replicate",
                        cb.graph.op1(DwConv::same(k, Pad::Replicate, dout), &ins)?,
                    ),
                    // EfficientNetV2's MBConv: stride 2 and 1, SiLU.
                    _ => (
                        if variant == 3 {
                            "dwconv s2 silu"
                        } else {
                            "dwconv silu"
                        },
                        cb.graph.op1(
                            DwConv {
                                k,
                                stride: if variant == 3 { 2 } else { 1 },
                                pad: Pad::Zero,
                                silu: true,
                                out: dout,
                            },
                            &ins,
                        )?,
                    ),
                };
                let check = cb.finish(
                    format!("{label} {din:?}->{dout:?} [{b},{h},{w},{c}] k{k}"),
                    &[y],
                    Tolerance::BOUND,
                )?;
                let pad = if variant == 2 {
                    Pad::Replicate
                } else {
                    Pad::Zero
                };
                let then = match variant {
                    0 => Then::LayerNorm(1e-6),
                    3 | 4 => Then::Silu,
                    _ => Then::Nothing,
                };
                let stride = if variant == 3 { 2 } else { 1 };
                let dims = [b, h, w, c];
                let bf16 = dout == DType::BF16;
                v.push(check.with_scale(move |chk, r| {
                    let [x, wt, bias] = [ins[0], ins[1], ins[2]].map(|id| chk.values(id));
                    vec![depthwise_bounds(
                        x,
                        wt,
                        bias,
                        (dims, k, stride, pad),
                        then,
                        &r[0],
                        bf16,
                    )]
                }));
            }
        }
    }
    Ok(v)
}

/// Per-element bounds on |kernel − reference| of the depthwise conv (and its LayerNorm):
/// the kernel sums the bias and the k² taps in one f32 chain (fused multiply-adds), erring by
/// ≤ sum(k² + 1, u)·S with S = |bias| + Σ|w·x| (the reference on absolute values); the
/// reference's f64 sum rounds once (u·|z|). SiLU: |silu′| ≤ 1.1 carries that, expf's 2 ulp
/// and three roundings add (2⁻²² + 3u)·|y|. With LayerNorm, those are the errors of its
/// input ([`layernorm_bounds`]); then the store.
fn depthwise_bounds(
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    (dims, k, stride, pad): ([usize; 4], usize, usize, Pad),
    then: Then,
    y: &[f32],
    bf16: bool,
) -> Vec<f32> {
    use crate::verify::bound::{stored, sum, U, ULP2};
    let abs = |v: &[f32]| -> Vec<f32> { v.iter().map(|x| x.abs()).collect() };
    let mut s = vec![0f32; y.len()];
    depthwise_ref(&abs(x), dims, &abs(w), &abs(bias), k, stride, pad, &mut s);
    let chain = sum(k * k + 1, U);
    let silu = then == Then::Silu;
    match then {
        Then::Nothing | Then::Silu => s
            .iter()
            .zip(y)
            .map(|(&sv, &yv)| {
                let yv = yv.abs() as f64;
                let mut e = chain * sv as f64 + U * yv;
                if silu {
                    e = 1.1 * e + (ULP2 + 3.0 * U) * yv;
                }
                stored(e, yv, bf16) as f32
            })
            .collect(),
        Then::LayerNorm(eps) => {
            let mut z = vec![0f32; x.len()];
            depthwise_ref(x, dims, w, bias, k, 1, pad, &mut z);
            let dz: Vec<f32> = s
                .iter()
                .zip(&z)
                .map(|(&sv, &zv)| (chain * sv as f64 + U * zv.abs() as f64) as f32)
                .collect();
            let p = LnParams {
                c: dims[3],
                eps,
                affine: None,
            };
            layernorm_bounds(&z, Some(&dz), &p, y, bf16)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_support::{self, assert_rejected, random, run, Rejected};
    use crate::runtime::graph::Graph;
    use crate::runtime::session::SessionOptions;
    use crate::runtime::Backend;
    use std::collections::HashMap;

    fn dwconv(k: usize, pad: Pad) -> DwConv {
        DwConv::same(k, pad, DType::F32)
    }

    /// Depthwise taps that are 1 at `tap` and 0 elsewhere, for every channel.
    fn one_tap(c: usize, k: usize, tap: usize) -> HostTensor {
        let data = (0..c * k * k)
            .map(|i| if i % (k * k) == tap { 1.0 } else { 0.0 })
            .collect();
        HostTensor::new(vec![c, k * k], data)
    }

    /// x shifted by (dy, dx), read as zero (or clamped, with `replicate`) outside.
    fn shifted(x: &HostTensor, dy: isize, dx: isize, replicate: bool) -> Vec<f32> {
        let [b, h, w, c] = x.shape[..] else { panic!() };
        let mut out = Vec::with_capacity(x.numel());
        for bi in 0..b {
            for i in 0..h as isize {
                for j in 0..w as isize {
                    let (mut y, mut z) = (i + dy, j + dx);
                    if replicate {
                        (y, z) = (y.clamp(0, h as isize - 1), z.clamp(0, w as isize - 1));
                    }
                    let inside = (0..h as isize).contains(&y) && (0..w as isize).contains(&z);
                    for ch in 0..c {
                        out.push(if inside {
                            x.data[((bi * h + y as usize) * w + z as usize) * c + ch]
                        } else {
                            0.0
                        });
                    }
                }
            }
        }
        out
    }

    #[test]
    fn a_single_unit_tap_shifts_the_input() {
        let x = random(&[2, 5, 7, 3], 1);
        let zero_bias = HostTensor::zeros(&[3]);
        for k in [1, 3, 5] {
            for tap in 0..k * k {
                let (dy, dx) = (
                    (tap / k) as isize - k as isize / 2,
                    (tap % k) as isize - k as isize / 2,
                );
                for (pad, replicate) in [(Pad::Zero, false), (Pad::Replicate, true)] {
                    let y = run(&dwconv(k, pad), &[&x, &one_tap(3, k, tap), &zero_bias]).unwrap();
                    assert_eq!(
                        y.data,
                        shifted(&x, dy, dx, replicate),
                        "k {k} tap {tap} {pad:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn dwconv_is_bias_plus_weighted_shifts() {
        let (c, k) = (4, 3);
        let x = random(&[1, 6, 5, c], 2);
        let w = random(&[c, k * k], 3);
        let bias = random(&[c], 4);
        for (pad, replicate) in [(Pad::Zero, false), (Pad::Replicate, true)] {
            let y = run(&dwconv(k, pad), &[&x, &w, &bias]).unwrap();
            let mut expect: Vec<f64> = (0..x.numel()).map(|i| bias.data[i % c] as f64).collect();
            for tap in 0..k * k {
                let s = shifted(
                    &x,
                    (tap / k) as isize - 1,
                    (tap % k) as isize - 1,
                    replicate,
                );
                for (i, (e, v)) in expect.iter_mut().zip(s).enumerate() {
                    *e += w.data[(i % c) * k * k + tap] as f64 * v as f64;
                }
            }
            for (got, e) in y.data.iter().zip(&expect) {
                assert!((*got as f64 - e).abs() < 1e-6, "{got} vs {e}");
            }
        }
    }

    #[test]
    fn replicate_padding_extends_the_border_and_zero_padding_does_not() {
        let x = HostTensor::full(&[1, 4, 5, 2], 3.0);
        let mean = HostTensor::full(&[2, 9], 1.0 / 9.0);
        let bias = HostTensor::zeros(&[2]);
        let rep = run(&dwconv(3, Pad::Replicate), &[&x, &mean, &bias]).unwrap();
        assert!(
            rep.data.iter().all(|v| (v - 3.0).abs() < 1e-6),
            "{:?}",
            rep.data
        );
        let zero = run(&dwconv(3, Pad::Zero), &[&x, &mean, &bias]).unwrap();
        // Corner: 4 of 9 taps inside; edge: 6; interior: 9.
        let at = |i: usize, j: usize| zero.data[(i * 5 + j) * 2];
        for (v, inside) in [
            (at(0, 0), 4.0),
            (at(3, 4), 4.0),
            (at(0, 2), 6.0),
            (at(2, 0), 6.0),
            (at(1, 2), 9.0),
        ] {
            assert!(
                (v - 3.0 * inside / 9.0).abs() < 1e-6,
                "{v} vs {inside} taps"
            );
        }
    }

    #[test]
    fn a_strided_dwconv_samples_the_stride_1_one_and_silu_follows() {
        let (c, k) = (5, 3);
        let x = random(&[2, 7, 6, c], 20);
        let w = random(&[c, k * k], 21);
        let bias = random(&[c], 22);
        let full = run(&dwconv(k, Pad::Zero), &[&x, &w, &bias]).unwrap();
        let op = DwConv {
            stride: 2,
            silu: true,
            ..dwconv(k, Pad::Zero)
        };
        let y = run(&op, &[&x, &w, &bias]).unwrap();
        assert_eq!(y.shape, [2, 4, 3, c]);
        for (i, v) in y.data.iter().enumerate() {
            let (b, oy, ox, ch) = (i / (4 * 3 * c), i / (3 * c) % 4, i / c % 3, i % c);
            let z = full.data[((b * 7 + oy * 2) * 6 + ox * 2) * c + ch];
            assert_eq!(*v, silu_ref(z));
        }
    }

    #[test]
    fn dwconv_ln_rows_are_normalized() {
        let c = 33;
        let x = random(&[2, 5, 7, c], 5);
        let w = random(&[c, 9], 6);
        let bias = random(&[c], 7);
        let op = DwConvLn {
            k: 3,
            eps: 1e-6,
            out: DType::F32,
        };
        let y = run(&op, &[&x, &w, &bias]).unwrap();
        for row in y.data.chunks_exact(c) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
            assert!(
                mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-3,
                "mean {mean} var {var}"
            );
        }
    }

    /// Runs the depthwise launch on the emulator with y `y_shift` bytes into its buffer;
    /// returns the kernel that ran and y's bytes (poisoned first).
    fn emulate(
        (x, din): (&HostTensor, DType),
        w: &HostTensor,
        bias: &HostTensor,
        (k, stride, pad, then): (usize, usize, Pad, Then),
        (y_shape, dout): (&[usize], DType),
        y_shift: u64,
    ) -> (String, Vec<u8>) {
        use crate::runtime::device::Device;
        use crate::runtime::graph::DevTensor;
        use crate::runtime::hostsim::{launch, HostsimDevice};
        use crate::runtime::kernel_choice::KernelTarget;
        use crate::tensor::encode;
        let dev = HostsimDevice::new();
        let y_bytes = y_shape.iter().product::<usize>() * dout.size();
        let ins = [(x, din), (w, DType::F32), (bias, DType::F32)];
        let bufs: Vec<_> = ins
            .iter()
            .map(|(t, d)| {
                let b = dev.alloc(t.numel() * d.size()).unwrap();
                dev.write(b.ptr, &encode(&t.data, *d)).unwrap();
                b
            })
            .collect();
        let y = dev.alloc(y_bytes + 16).unwrap();
        dev.fill(y.ptr, 0xFF, y_bytes + 16).unwrap();
        let descs: Vec<TensorDesc> = ins
            .iter()
            .map(|(t, d)| test_support::desc(&t.shape, *d))
            .chain([test_support::desc(y_shape, dout)])
            .collect();
        let tensor = |ptr, desc| DevTensor { ptr, desc };
        let io = LaunchIo {
            inputs: (0..3).map(|i| tensor(bufs[i].ptr, &descs[i])).collect(),
            outputs: vec![tensor(y.ptr + y_shift, &descs[3])],
            workspace: 0,
            target: KernelTarget::hostsim(),
        };
        let mut launches = depthwise_launch("test", &io, (k, stride), pad, then, dout).unwrap();
        assert_eq!(launches.len(), 1);
        launch(&mut launches[0]).unwrap();
        let mut out = vec![0u8; y_bytes];
        dev.read(y.ptr + y_shift, &mut out).unwrap();
        (launches[0].kernel.name().to_string(), out)
    }

    #[test]
    fn the_vector_and_scalar_kernels_give_the_same_bits() {
        let (b, h, w, c) = (2, 5, 7, 40);
        let dtypes = [DType::F32, DType::BF16];
        for (case, (din, dout, stride, pad, then)) in [
            (0, 1, 1, Pad::Zero, Then::LayerNorm(1e-6)),
            (1, 0, 1, Pad::Zero, Then::LayerNorm(1e-6)),
            (1, 1, 1, Pad::Replicate, Then::Nothing),
            (0, 0, 2, Pad::Zero, Then::Silu),
            (1, 0, 1, Pad::Zero, Then::Silu),
        ]
        .into_iter()
        .enumerate()
        {
            let (din, dout) = (dtypes[din], dtypes[dout]);
            let seed = 30 + 3 * case as u64;
            let x = random(&[b, h, w, c], seed);
            let (wt, bias) = (random(&[c, 9], seed + 1), random(&[c], seed + 2));
            let y_shape = [b, strided(h, stride), strided(w, stride), c];
            let run = |shift| {
                let conv = (3, stride, pad, then);
                emulate((&x, din), &wt, &bias, conv, (&y_shape, dout), shift)
            };
            // y 16-byte aligned takes the vector kernel, one element off the scalar one.
            let (vector, scalar) = (run(0), run(dout.size() as u64));
            assert!(vector.0.starts_with("dwconv3x16_"), "{}", vector.0);
            assert!(scalar.0.starts_with("dwconv_"), "{}", scalar.0);
            assert!(vector.1 == scalar.1, "case {case}: the kernels differ");
            let y = crate::tensor::decode(&vector.1, dout);
            assert!(y.iter().all(|v| v.is_finite()), "case {case}: unwritten");
        }
    }

    #[test]
    fn invalid_shapes_and_dtypes_are_errors() {
        let (f, b) = (DType::F32, DType::BF16);
        let dw = |k| Box::new(dwconv(k, Pad::Zero)) as Box<dyn OpImpl>;
        let ln = Box::new(DwConvLn {
            k: 3,
            eps: 1e-6,
            out: f,
        }) as Box<dyn OpImpl>;
        let cases: Vec<Rejected> = vec![
            (dw(2), vec![(&[1, 4, 4, 3], f), (&[3, 4], f), (&[3], f)]),
            (
                dw(3),
                vec![(&[1, 4, 4, 3], f), (&[3, 1, 3, 3], f), (&[3], f)],
            ),
            (dw(3), vec![(&[1, 4, 4, 3], f), (&[3, 9], f), (&[4], f)]),
            (dw(3), vec![(&[1, 4, 4, 3], f), (&[3, 9], b), (&[3], f)]),
            (dw(3), vec![(&[1, 4, 4, 3], f), (&[3, 9], f), (&[3], b)]),
            (dw(3), vec![(&[4, 4, 3], f), (&[3, 9], f), (&[3], f)]),
            (dw(3), vec![(&[1, 4, 4, 3], f), (&[3, 9], f)]),
            (ln, vec![(&[1, 4, 4, 3], f), (&[3, 25], f), (&[3], f)]),
        ];
        assert_rejected(&cases);
    }

    #[test]
    fn dwconv_runs_on_the_cpu_executor() {
        let mut g = Graph::new();
        let x = g.input("x", &[2, 5, 3, 8], DType::BF16).unwrap();
        let w = g.weight("dw.weight", &[8, 9], DType::F32).unwrap();
        let bias = g.weight("dw.bias", &[8], DType::F32).unwrap();
        let y = g.op1(dwconv(3, Pad::Replicate), &[x, w, bias]).unwrap();
        g.output(y, "y").unwrap();
        let (xv, wv, bv) = (
            random(&[2, 5, 3, 8], 1),
            random(&[8, 9], 2),
            random(&[8], 3),
        );
        let weights = HashMap::from([
            ("dw.weight".to_string(), wv.clone()),
            ("dw.bias".to_string(), bv.clone()),
        ]);
        let mut s = Backend::Cpu
            .session(g, &weights, SessionOptions::default())
            .unwrap();
        s.set_input(x, &xv.data).unwrap();
        s.run().unwrap();
        let direct = run(&dwconv(3, Pad::Replicate), &[&xv, &wv, &bv]).unwrap();
        assert_eq!(s.read(y).unwrap(), direct.data);
    }
}
