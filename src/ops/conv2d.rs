//! Dense 2-d convolution on channels-last images as an implicit GEMM on tensor cores
//! (`kernels/conv2d.cu`): PyTorch `Conv2d(Cin, Cout, k, stride, padding)` with an optional
//! bias, a fused SiLU or LeakyReLU, an optional per-sample channel gate on the input (the
//! squeeze-and-excitation scale, [`super::squeeze_excite`]) and an optional residual. The
//! EfficientNetV2 backbone of the Stable Cascade ControlNets runs on it, BatchNorm folded into
//! its weights at load ([`fold_batchnorm`]).
//!
//! The reference accumulates in f64 and rounds once, like [`super::gemm::gemm_ref`].

use super::math::silu_ref;
use super::{nhwc, require_f32, to_i32, Shaped};
use crate::runtime::abi::mirror_kernel_struct;
use crate::runtime::graph::{Cost, LaunchIo, OpImpl, OutSpec, TensorDesc};
use crate::runtime::kernels::KernelId;
use crate::runtime::launch::{ceil_div, Args, Launch};
use crate::tensor::{DType, HostTensor};
use crate::verify::{CheckBuilder, OpCheck, Scale, Tolerance};
use crate::{Error, Result};
use rayon::prelude::*;

/// The activation fused after the bias.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Act {
    None,
    /// x / (1 + e⁻ˣ).
    Silu,
    /// x > 0 ? x : slope·x.
    LeakyRelu(f32),
}

impl Act {
    fn apply(self, v: f32) -> f32 {
        match self {
            Act::None => v,
            Act::Silu => silu_ref(v),
            Act::LeakyRelu(slope) => {
                if v > 0.0 {
                    v
                } else {
                    slope * v
                }
            }
        }
    }

    /// The kernel's `act` code and `slope`.
    fn code(self) -> (i32, f32) {
        match self {
            Act::None => (0, 0.0),
            Act::Silu => (1, 0.0),
            Act::LeakyRelu(slope) => (2, slope),
        }
    }
}

/// The parameters of `conv2d_*`: `struct Conv2dParams` of kernels/conv2d.cu, whose comments
/// say what each field is. Device pointers are addresses, 0 for null.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Conv2dParams {
    pub x: u64,
    pub w: u64,
    pub bias: u64,
    pub gate: u64,
    pub r: u64,
    pub y: u64,
    pub b: i32,
    pub h: i32,
    pub w_in: i32,
    pub cin: i32,
    pub oh: i32,
    pub ow: i32,
    pub cout: i32,
    pub k: i32,
    pub stride: i32,
    pub pad: i32,
    pub act: i32,
    pub slope: f32,
    pub transposed: i32,
    pub m: i32,
}
mirror_kernel_struct!(Conv2dParams);

/// One launch of `conv2d_*`: an ordinary conv, or a transposed one run as its stride²
/// output phases ([`super::conv_transpose`]). `io`'s first two inputs are x and w (bf16, in
/// PyTorch's layout for the kind); the optional ones are given as device addresses (0: none).
pub(super) struct Conv2dLaunch {
    pub x: [usize; 4],
    pub out_hw: (usize, usize),
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub transposed: bool,
    pub bias: u64,
    pub gate: u64,
    pub r: u64,
    pub act: Act,
    pub out: DType,
}

impl Conv2dLaunch {
    /// The launch: a GEMM of M output pixels (per phase), N = Cout and K = taps·Cin, in 64×64
    /// tiles, one grid layer per phase.
    pub(super) fn launch(&self, op: &str, io: &LaunchIo) -> Result<Launch> {
        if io.inputs[1].desc.dtype != DType::BF16 {
            return Err(Error::shape(
                op,
                "the kernel needs w in bf16 (a tensor-core operand)",
            ));
        }
        let [b, h, w, cin] = self.x;
        let (oh, ow) = self.out_hw;
        let s = self.stride;
        // A transposed conv's phase holds every s-th output row and column, and at most
        // ⌈k/s⌉ of the taps along each axis.
        let (rows, taps, phases) = match self.transposed {
            false => (b * oh * ow, self.k * self.k, 1),
            true => (
                b * oh.div_ceil(s) * ow.div_ceil(s),
                self.k.div_ceil(s).pow(2),
                s * s,
            ),
        };
        to_i32(op, "K = taps·Cin", taps * cin)?;
        let (act, slope) = self.act.code();
        let params = Conv2dParams {
            x: io.inputs[0].ptr,
            w: io.inputs[1].ptr,
            bias: self.bias,
            gate: self.gate,
            r: self.r,
            y: io.outputs[0].ptr,
            b: to_i32(op, "B", b)?,
            h: to_i32(op, "H", h)?,
            w_in: to_i32(op, "W", w)?,
            cin: to_i32(op, "Cin", cin)?,
            oh: to_i32(op, "OH", oh)?,
            ow: to_i32(op, "OW", ow)?,
            cout: to_i32(op, "Cout", self.cout)?,
            k: to_i32(op, "k", self.k)?,
            stride: to_i32(op, "stride", s)?,
            pad: to_i32(op, "padding", self.pad)?,
            act,
            slope,
            transposed: self.transposed as i32,
            m: to_i32(op, "output pixels per phase", rows)?,
        };
        let grid = |what: &str, n: usize| {
            u16::try_from(n).map(u32::from).map_err(|_| {
                Error::shape(op, format!("{what} = {n} exceeds the grid's 65535 limit"))
            })
        };
        let name = format!(
            "conv2d_{}_{}",
            io.inputs[0].desc.dtype.suffix(),
            self.out.suffix()
        );
        Ok(Launch {
            kernel: KernelId::lookup(&name)?,
            grid: [
                ceil_div(rows, TILE) as u32,
                grid("Cout / 64", ceil_div(self.cout, TILE))?,
                grid("stride²", phases)?,
            ],
            block: [128, 1, 1],
            smem: 0,
            args: Args::new().by_value(&params),
        })
    }
}

/// `Conv2d(Cin, Cout, k, stride, pad)` on `x [B, H, W, Cin]` (f32 or bf16) with `w` bf16
/// `[Cout, Cin, k, k]` (PyTorch's layout), then, each optional and in this order of the
/// inputs: `bias` f32 `[Cout]`, `gate` f32 `[B, Cin]` (x·gate per sample and channel before
/// the conv), `residual [B, OH, OW, Cout]` in the output dtype (added after the activation).
/// Output `[B, (H + 2p − k)/s + 1, (W + 2p − k)/s + 1, Cout]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Conv2d {
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub bias: bool,
    pub gate: bool,
    pub residual: bool,
    pub act: Act,
    pub out: DType,
}

/// Validated dimensions of a [`Conv2d`].
#[derive(Clone, Copy, Debug)]
struct Dims {
    x: [usize; 4],
    cout: usize,
    oh: usize,
    ow: usize,
}

/// Output extent of a conv along one axis: `(n + 2p − k)/s + 1`, if the kernel fits.
pub fn conv_extent(n: usize, k: usize, stride: usize, pad: usize) -> Option<usize> {
    (n + 2 * pad).checked_sub(k).map(|v| v / stride + 1)
}

impl Conv2d {
    /// A conv with bias and activation, nothing else.
    pub fn plain(k: usize, stride: usize, pad: usize, act: Act, out: DType) -> Self {
        Conv2d {
            k,
            stride,
            pad,
            bias: true,
            gate: false,
            residual: false,
            act,
            out,
        }
    }

    fn n_inputs(&self) -> usize {
        2 + self.bias as usize + self.gate as usize + self.residual as usize
    }

    /// Index of the gate input, if any.
    fn gate_at(&self) -> Option<usize> {
        self.gate.then_some(2 + self.bias as usize)
    }

    fn dims<T: Shaped>(&self, ins: &[&T]) -> Result<Dims> {
        let op = self.name();
        if ins.len() != self.n_inputs() {
            return Err(Error::shape(
                op,
                format!("expected {} inputs, got {}", self.n_inputs(), ins.len()),
            ));
        }
        let x @ [b, h, w, cin] = nhwc(op, "x", ins[0].shape())?;
        let k = self.k;
        if k == 0 || self.stride == 0 {
            return Err(Error::shape(
                op,
                format!("k = {k} and stride = {} must be ≥ 1", self.stride),
            ));
        }
        let cout = match ins[1].shape() {
            &[co, ci, kh, kw] if ci == cin && co > 0 && kh == k && kw == k => co,
            s => {
                return Err(Error::shape(
                    op,
                    format!("w must be [Cout, {cin}, {k}, {k}] (PyTorch layout), got {s:?}"),
                ))
            }
        };
        let (Some(oh), Some(ow)) = (
            conv_extent(h, k, self.stride, self.pad),
            conv_extent(w, k, self.stride, self.pad),
        ) else {
            return Err(Error::shape(
                op,
                format!(
                    "a {k}×{k} kernel with padding {} does not fit a {h}×{w} input",
                    self.pad
                ),
            ));
        };
        let mut at = 2;
        if self.bias {
            if ins[at].shape() != [cout] {
                return Err(Error::shape(
                    op,
                    format!("bias must be [{cout}], got {:?}", ins[at].shape()),
                ));
            }
            at += 1;
        }
        if self.gate {
            if ins[at].shape() != [b, cin] {
                return Err(Error::shape(
                    op,
                    format!("gate must be [{b}, {cin}], got {:?}", ins[at].shape()),
                ));
            }
            at += 1;
        }
        if self.residual && ins[at].shape() != [b, oh, ow, cout] {
            return Err(Error::shape(
                op,
                format!(
                    "residual must be [{b}, {oh}, {ow}, {cout}], got {:?}",
                    ins[at].shape()
                ),
            ));
        }
        Ok(Dims { x, cout, oh, ow })
    }

    /// Σ over the taps of `w·x̃·g` per output element, in f64 (taps in (ky, kx) order, each
    /// over the channels in order), plus the bias; with `abs`, of the absolute values (the
    /// magnitude the rounding errors scale with).
    fn sums(&self, ins: &[&[f32]], d: Dims, abs: bool) -> Vec<f64> {
        let [b, h, wd, cin] = d.x;
        let (k, s, p, cout) = (self.k, self.stride, self.pad, d.cout);
        let f = |v: f32| if abs { v.abs() } else { v };
        let (x, w) = (ins[0], ins[1]);
        let bias = self.bias.then(|| ins[2]);
        let gate = self.gate_at().map(|i| ins[i]);
        // w as [Cout][tap][Cin]: one output channel's taps contiguous per tap.
        let taps = k * k;
        let w_t: Vec<f64> = (0..cout * taps * cin)
            .map(|i| {
                let (co, tap, ci) = (i / (taps * cin), i / cin % taps, i % cin);
                f(w[(co * cin + ci) * taps + tap]) as f64
            })
            .collect();
        let mut out = vec![0f64; b * d.oh * d.ow * cout];
        out.par_chunks_mut(d.ow * cout)
            .enumerate()
            .for_each(|(row, o)| {
                let (bi, oy) = (row / d.oh, row % d.oh);
                let mut src = vec![0f64; cin];
                for (ox, px) in o.chunks_exact_mut(cout).enumerate() {
                    for (co, v) in px.iter_mut().enumerate() {
                        *v = bias.map_or(0.0, |bv| f(bv[co]) as f64);
                    }
                    for ky in 0..k {
                        let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&i| i < h) else {
                            continue;
                        };
                        for kx in 0..k {
                            let Some(ix) = (ox * s + kx).checked_sub(p).filter(|&i| i < wd) else {
                                continue;
                            };
                            let xp = &x[((bi * h + iy) * wd + ix) * cin..][..cin];
                            for (ci, sv) in src.iter_mut().enumerate() {
                                let g = gate.map_or(1.0, |g| g[bi * cin + ci]);
                                *sv = f(xp[ci] * g) as f64;
                            }
                            let tap = ky * k + kx;
                            for (co, v) in px.iter_mut().enumerate() {
                                let wt = &w_t[(co * taps + tap) * cin..][..cin];
                                *v += wt.iter().zip(&src).map(|(a, b)| a * b).sum::<f64>();
                            }
                        }
                    }
                }
            });
        out
    }
}

impl OpImpl for Conv2d {
    fn name(&self) -> &'static str {
        "conv2d"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let d = self.dims(inputs)?;
        let op = self.name();
        if self.bias {
            require_f32(op, "bias", inputs[2])?;
        }
        if let Some(i) = self.gate_at() {
            require_f32(op, "gate", inputs[i])?;
        }
        if self.residual && inputs[inputs.len() - 1].dtype != self.out {
            return Err(Error::shape(
                op,
                format!("residual must be {:?} like the output", self.out),
            ));
        }
        Ok(vec![(vec![d.x[0], d.oh, d.ow, d.cout], self.out)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let d = self.dims(inputs)?;
        let ins: Vec<&[f32]> = inputs.iter().map(|t| t.data.as_slice()).collect();
        let sums = self.sums(&ins, d, false);
        let res = self.residual.then(|| ins[ins.len() - 1]);
        for (i, (o, &s)) in outputs[0].data.iter_mut().zip(&sums).enumerate() {
            let v = self.act.apply(s as f32);
            *o = res.map_or(v, |r| v + r[i]);
        }
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let descs: Vec<&TensorDesc> = io.inputs.iter().map(|t| t.desc).collect();
        let d = self.dims(&descs)?;
        let ptr = |on: bool, i: usize| if on { io.inputs[i].ptr } else { 0 };
        let launch = Conv2dLaunch {
            x: d.x,
            out_hw: (d.oh, d.ow),
            cout: d.cout,
            k: self.k,
            stride: self.stride,
            pad: self.pad,
            transposed: false,
            bias: ptr(self.bias, 2),
            gate: self.gate_at().map_or(0, |i| io.inputs[i].ptr),
            r: ptr(self.residual, io.inputs.len() - 1),
            act: self.act,
            out: self.out,
        };
        Ok(vec![launch.launch(self.name(), io)?])
    }

    fn cost(&self, inputs: &[&TensorDesc], outputs: &[&TensorDesc]) -> Cost {
        let k = inputs[1].shape[1..].iter().product::<usize>();
        Cost {
            flops: 2.0 * outputs[0].numel() as f64 * k as f64,
            bytes: inputs.iter().chain(outputs).map(|d| d.bytes() as f64).sum(),
        }
    }
}

/// Output pixels (and channels) per block of `conv2d_*`.
const TILE: usize = 64;

/// A conv followed by inference BatchNorm folded into one conv: `w'[co] = w[co]·γ[co]/√(σ²[co]
/// + eps)`, `b'[co] = β[co] + (b[co] − μ[co])·γ[co]/√(σ²[co] + eps)` (b = 0 for a conv without
/// bias). `w` is `[Cout, …]`; returns (w', b'). The scale is formed in f64 and rounded once.
pub fn fold_batchnorm(
    w: &HostTensor,
    bias: Option<&[f32]>,
    [gamma, beta, mean, var]: [&[f32]; 4],
    eps: f64,
) -> (HostTensor, HostTensor) {
    let cout = w.shape[0];
    let per = w.data.len() / cout;
    let scale: Vec<f64> = (0..cout)
        .map(|c| gamma[c] as f64 / (var[c] as f64 + eps).sqrt())
        .collect();
    let data = w
        .data
        .iter()
        .enumerate()
        .map(|(i, &v)| (v as f64 * scale[i / per]) as f32)
        .collect();
    let b = (0..cout)
        .map(|c| {
            let b0 = bias.map_or(0.0, |b| b[c] as f64);
            (beta[c] as f64 + (b0 - mean[c] as f64) * scale[c]) as f32
        })
        .collect();
    (
        HostTensor::new(w.shape.clone(), data),
        HostTensor::new(vec![cout], b),
    )
}

/// Hostsim/GPU checks of [`Conv2d`]: the backbone's shapes (3×3 stride 1 and 2, padding 0 and
/// 1, 1×1 with gate and residual, LeakyReLU) on odd sizes, every dtype pair.
pub fn checks(seed: u64, scale: Scale) -> Result<Vec<OpCheck>> {
    // (B, H, W, Cin, Cout, k, stride, pad, act, gate, residual)
    type Shape = (
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        Act,
        bool,
        bool,
    );
    let mut shapes: Vec<Shape> = vec![
        (1, 1, 1, 1, 1, 1, 1, 0, Act::None, false, false),
        (2, 9, 7, 3, 24, 3, 2, 1, Act::Silu, false, false),
        (1, 10, 13, 1, 24, 3, 2, 0, Act::Silu, false, false),
        (2, 7, 5, 24, 24, 3, 1, 1, Act::Silu, false, true),
        (1, 6, 9, 40, 70, 1, 1, 0, Act::None, true, true),
        (2, 5, 5, 37, 130, 1, 1, 0, Act::LeakyRelu(0.2), false, false),
        (1, 4, 6, 17, 9, 3, 1, 0, Act::None, true, false),
    ];
    if scale == Scale::Gpu {
        shapes.extend([
            (1, 384, 384, 3, 24, 3, 2, 1, Act::Silu, false, false),
            (1, 192, 192, 24, 96, 3, 2, 1, Act::Silu, false, false),
            (1, 48, 64, 768, 128, 1, 1, 0, Act::None, true, true),
            (
                1,
                24,
                32,
                1280,
                1280,
                1,
                1,
                0,
                Act::LeakyRelu(0.2),
                false,
                false,
            ),
        ]);
    }
    let mut v = Vec::new();
    for (i, &(b, h, w, cin, cout, k, stride, pad, act, gate, residual)) in shapes.iter().enumerate()
    {
        for (j, &(din, dout)) in crate::verify::DTYPE_PAIRS.iter().enumerate() {
            let mut cb = CheckBuilder::new(seed.wrapping_add((i * 4 + j) as u64));
            let op = Conv2d {
                k,
                stride,
                pad,
                bias: i % 3 != 2,
                gate,
                residual,
                act,
                out: dout,
            };
            let (oh, ow) = (
                conv_extent(h, k, stride, pad).expect("fits"),
                conv_extent(w, k, stride, pad).expect("fits"),
            );
            let mut ins = vec![
                cb.input(&[b, h, w, cin], din, 2.0)?,
                cb.input(&[cout, cin, k, k], DType::BF16, 0.5)?,
            ];
            if op.bias {
                ins.push(cb.input(&[cout], DType::F32, 0.5)?);
            }
            if gate {
                ins.push(cb.input(&[b, cin], DType::F32, 1.0)?);
            }
            if residual {
                ins.push(cb.input(&[b, oh, ow, cout], dout, 1.0)?);
            }
            let y = cb.graph.op1(op.clone(), &ins)?;
            let check = cb.finish(
                format!(
                    "conv2d {din:?}->{dout:?} [{b},{h},{w},{cin}]->{cout} k{k} s{stride} p{pad} {act:?}{}{}",
                    if gate { " gate" } else { "" },
                    if residual { " residual" } else { "" }
                ),
                &[y],
                Tolerance::BOUND,
            )?;
            v.push(check.with_scale(move |chk, r| {
                let vals: Vec<&[f32]> = ins.iter().map(|&id| chk.values(id)).collect();
                let descs: Vec<&TensorDesc> = ins.iter().map(|&id| chk.graph.desc(id)).collect();
                let d = op.dims(&descs).expect("the check's shapes were inferred");
                vec![op.bounds(&vals, d, din, &r[0])]
            }));
        }
    }
    Ok(v)
}

impl Conv2d {
    /// Per-element bounds on |kernel − reference|, S = Σ|w·x·g| + |b|:
    /// - operands: x·g (and an f32 x) rounded to bf16 once: U_BF16·S (weights are bf16);
    /// - the tensor cores' truncating f32 accumulation over K = k²·Cin terms: sum(K, 2⁻²³)·S;
    ///   the bias add and the reference's rounding: 2u·S;
    /// - SiLU: |silu′| ≤ 1.1 carries the error, expf's 2 ulp and three roundings add
    ///   (2⁻²² + 3u)·|y|; LeakyReLU: the slope's product, u·|y|;
    /// - the residual: u·|y|; then the store.
    fn bounds(&self, ins: &[&[f32]], d: Dims, din: DType, y: &[f32]) -> Vec<f32> {
        use crate::verify::bound::{stored, sum, U, ULP2, U_BF16, U_MMA};
        let s = self.sums(ins, d, true);
        let kk = self.k * self.k * d.x[3];
        let operand = if din == DType::F32 || self.gate {
            U_BF16
        } else {
            0.0
        };
        let chain = sum(kk, U_MMA) + 2.0 * U + operand;
        let bf16 = self.out == DType::BF16;
        s.iter()
            .zip(y)
            .map(|(&sv, &yv)| {
                let yv = yv.abs() as f64;
                let mut e = chain * sv;
                e = match self.act {
                    Act::None => e,
                    Act::Silu => 1.1 * e + (ULP2 + 3.0 * U) * yv,
                    Act::LeakyRelu(_) => e + U * yv,
                };
                if self.residual {
                    e += U * yv;
                }
                stored(e, yv, bf16) as f32
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gemm::gemm_ref;
    use crate::ops::test_support::{assert_rejected, random, run, Rejected};

    fn conv(k: usize, stride: usize, pad: usize, act: Act) -> Conv2d {
        Conv2d::plain(k, stride, pad, act, DType::F32)
    }

    #[test]
    fn a_1x1_conv_is_a_gemm_over_pixels() {
        let (x, w, b) = (
            random(&[2, 3, 5, 7], 1),
            random(&[4, 7, 1, 1], 2),
            random(&[4], 3),
        );
        let y = run(&conv(1, 1, 0, Act::None), &[&x, &w, &b]).unwrap();
        let mut want = vec![0f32; 2 * 3 * 5 * 4];
        gemm_ref(
            &x.data,
            &w.data,
            Some(b.data.as_slice()),
            false,
            None,
            (4, 7),
            &mut want,
        );
        for (g, e) in y.data.iter().zip(&want) {
            assert!((g - e).abs() <= 1e-6 * e.abs().max(1.0), "{g} vs {e}");
        }
    }

    #[test]
    fn a_single_unit_tap_samples_the_input_with_stride_and_padding() {
        let (h, w, c) = (7, 6, 2);
        let x = random(&[1, h, w, c], 4);
        for (k, s, p) in [(3, 1, 1), (3, 2, 1), (3, 2, 0), (3, 1, 0), (1, 2, 0)] {
            for tap in 0..k * k {
                let (ky, kx) = (tap / k, tap % k);
                // w[co, ci] = 1 at (ky, kx) where co == ci.
                let mut wd = vec![0f32; c * c * k * k];
                for ch in 0..c {
                    wd[(ch * c + ch) * k * k + tap] = 1.0;
                }
                let wt = HostTensor::new(vec![c, c, k, k], wd);
                let op = Conv2d {
                    bias: false,
                    ..conv(k, s, p, Act::None)
                };
                let y = run(&op, &[&x, &wt]).unwrap();
                let (oh, ow) = (
                    conv_extent(h, k, s, p).unwrap(),
                    conv_extent(w, k, s, p).unwrap(),
                );
                assert_eq!(y.shape, [1, oh, ow, c]);
                for oy in 0..oh {
                    for ox in 0..ow {
                        let (iy, ix) = (
                            (oy * s + ky) as isize - p as isize,
                            (ox * s + kx) as isize - p as isize,
                        );
                        let inside = (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix);
                        for ch in 0..c {
                            let want = if inside {
                                x.data[((iy as usize) * w + ix as usize) * c + ch]
                            } else {
                                0.0
                            };
                            assert_eq!(
                                y.data[(oy * ow + ox) * c + ch],
                                want,
                                "k{k} s{s} p{p} tap {tap}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn gate_activation_and_residual_compose_as_documented() {
        let (b, h, w, cin, cout) = (2, 4, 3, 5, 6);
        let (x, wt, bias) = (
            random(&[b, h, w, cin], 5),
            random(&[cout, cin, 3, 3], 6),
            random(&[cout], 7),
        );
        let gate = random(&[b, cin], 8);
        let res = random(&[b, h, w, cout], 9);
        let gated = HostTensor::new(
            x.shape.clone(),
            x.data
                .iter()
                .enumerate()
                .map(|(i, v)| v * gate.data[i / (h * w * cin) * cin + i % cin])
                .collect(),
        );
        for act in [Act::None, Act::Silu, Act::LeakyRelu(0.2)] {
            let plain = run(&conv(3, 1, 1, act), &[&gated, &wt, &bias]).unwrap();
            let op = Conv2d {
                gate: true,
                residual: true,
                ..conv(3, 1, 1, act)
            };
            let y = run(&op, &[&x, &wt, &bias, &gate, &res]).unwrap();
            for ((g, p), r) in y.data.iter().zip(&plain.data).zip(&res.data) {
                assert_eq!(*g, p + r, "{act:?}");
            }
        }
        let lin = run(&conv(3, 1, 1, Act::None), &[&x, &wt, &bias]).unwrap();
        let leaky = run(&conv(3, 1, 1, Act::LeakyRelu(0.2)), &[&x, &wt, &bias]).unwrap();
        let silu = run(&conv(3, 1, 1, Act::Silu), &[&x, &wt, &bias]).unwrap();
        for ((l, k), s) in lin.data.iter().zip(&leaky.data).zip(&silu.data) {
            assert_eq!(*k, if *l > 0.0 { *l } else { 0.2 * l });
            assert!((s - l / (1.0 + (-l).exp())).abs() < 1e-6);
        }
    }

    #[test]
    fn folding_batchnorm_equals_conv_then_batchnorm() {
        let (cin, cout, eps) = (3, 4, 1e-3);
        let x = random(&[1, 5, 4, cin], 10);
        let w = random(&[cout, cin, 3, 3], 11);
        let gamma = random(&[cout], 12);
        let beta = random(&[cout], 13);
        let mean = random(&[cout], 14);
        let var = HostTensor::new(
            vec![cout],
            random(&[cout], 15)
                .data
                .iter()
                .map(|v| v.abs() + 0.1)
                .collect(),
        );
        for bias in [None, Some(random(&[cout], 16))] {
            let (wf, bf) = fold_batchnorm(
                &w,
                bias.as_ref().map(|b| b.data.as_slice()),
                [&gamma.data, &beta.data, &mean.data, &var.data],
                eps,
            );
            let folded = run(&conv(3, 2, 1, Act::None), &[&x, &wf, &bf]).unwrap();
            let zero = HostTensor::zeros(&[cout]);
            let raw = run(
                &conv(3, 2, 1, Act::None),
                &[&x, &w, bias.as_ref().unwrap_or(&zero)],
            )
            .unwrap();
            for (i, (f, r)) in folded.data.iter().zip(&raw.data).enumerate() {
                let c = i % cout;
                let bn = (*r as f64 - mean.data[c] as f64) / (var.data[c] as f64 + eps).sqrt()
                    * gamma.data[c] as f64
                    + beta.data[c] as f64;
                assert!((*f as f64 - bn).abs() < 1e-5, "{f} vs {bn}");
            }
        }
    }

    #[test]
    fn invalid_shapes_and_dtypes_are_errors() {
        let (f, b) = (DType::F32, DType::BF16);
        let c = |k, s, p| Box::new(conv(k, s, p, Act::None)) as Box<dyn OpImpl>;
        let gated = Box::new(Conv2d {
            gate: true,
            ..conv(1, 1, 0, Act::None)
        }) as Box<dyn OpImpl>;
        let cases: Vec<Rejected> = vec![
            (
                c(3, 1, 1),
                vec![(&[1, 4, 4, 3], f), (&[8, 3, 9], f), (&[8], f)],
            ),
            (
                c(3, 1, 1),
                vec![(&[1, 4, 4, 3], f), (&[8, 2, 3, 3], b), (&[8], f)],
            ),
            (
                c(3, 1, 1),
                vec![(&[1, 4, 4, 3], f), (&[8, 3, 1, 1], b), (&[8], f)],
            ),
            (
                c(3, 1, 1),
                vec![(&[1, 4, 4, 3], f), (&[8, 3, 3, 3], b), (&[7], f)],
            ),
            (
                c(3, 1, 1),
                vec![(&[1, 4, 4, 3], f), (&[8, 3, 3, 3], b), (&[8], b)],
            ),
            (
                c(3, 1, 0),
                vec![(&[1, 2, 4, 3], f), (&[8, 3, 3, 3], b), (&[8], f)],
            ),
            (
                c(3, 0, 1),
                vec![(&[1, 4, 4, 3], f), (&[8, 3, 3, 3], b), (&[8], f)],
            ),
            (
                c(3, 1, 1),
                vec![(&[4, 4, 3], f), (&[8, 3, 3, 3], b), (&[8], f)],
            ),
            (c(3, 1, 1), vec![(&[1, 4, 4, 3], f), (&[8, 3, 3, 3], b)]),
            (
                gated,
                vec![
                    (&[2, 4, 4, 3], f),
                    (&[8, 3, 1, 1], b),
                    (&[8], f),
                    (&[1, 3], f),
                ],
            ),
        ];
        assert_rejected(&cases);
    }
}
