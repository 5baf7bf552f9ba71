//! UltraPixel's implicit neural representation (`TransInr_withnorm`, docs/MODEL.md §3.2 C–E): the
//! per-sample modulated hyper-network weights, the pixel-centre coordinate encoding of the
//! high-resolution grid, and the two-layer hyper-MLP evaluated at every pixel.
//!
//! The positional encoding stays f32 in every build: its arguments reach π·1024 ≈ 3.2·10³ rad,
//! where bf16 spacing is coarser than a period (the official bf16 run loses 4e-2 to 1.5e-1
//! rel-L2 there). Its outputs lie in [−1, 1] and may be rounded for the first GEMM.

use super::math::{accurate, linspace};
use super::{inputs_n, linear_launch, require_f32, to_i32, Shaped};
use crate::runtime::graph::{Cost, LaunchIo, OpImpl, OutSpec, TensorDesc};
use crate::runtime::kernels::KernelId;
use crate::runtime::launch::{ceil_div, Args, Launch};
use crate::tensor::{DType, HostTensor};
use crate::verify::{CheckBuilder, OpCheck, Scale, Tolerance};
use crate::{Error, Result};
use rayon::prelude::*;
use std::f32::consts::PI;

/// Frequencies per coordinate: ω_k = exp(linspace(0, ln σ, 64))_k = σ^{k/63}.
const PE_FREQS: usize = 64;
/// σ = `pe_sigma` of `HypoMlp`: the highest frequency.
const PE_SIGMA: f64 = 1024.0;
/// Features per pixel: [cos(π·y·ω), cos(π·x·ω), sin(π·y·ω), sin(π·x·ω)].
pub const POSENC_WIDTH: usize = 4 * PE_FREQS;
/// `F.normalize`'s floor on a column norm.
const NORM_FLOOR: f32 = 1e-12;

/// ω in f32: `torch.exp(torch.linspace(0, ln σ, 64))`.
fn frequencies() -> Vec<f32> {
    linspace(0.0, PE_SIGMA.ln() as f32, PE_FREQS)
        .into_iter()
        .map(|v| accurate(f64::exp, v))
        .collect()
}

/// Pixel-centre coordinate of index i on an axis of n pixels, in (−1, 1), in f32 as
/// `make_coord_grid`: l = (0.5 + i)/n, then −1 + 2·l.
fn coordinate(i: usize, n: usize) -> f32 {
    -1.0 + 2.0 * ((0.5 + i as f32) / n as f32)
}

/// The encoding of an h×w grid into `out` (`[h·w, 256]`, row p = i·w + j).
pub fn coord_posenc_ref(h: usize, w: usize, out: &mut [f32]) {
    let freqs = frequencies();
    out.par_chunks_exact_mut(POSENC_WIDTH)
        .enumerate()
        .for_each(|(p, row)| {
            let (y, x) = (coordinate(p / w, h), coordinate(p % w, w));
            let (cos, sin) = row.split_at_mut(2 * PE_FREQS);
            // The 128 products coordinate-major (y·ω₀ … y·ω₆₃, x·ω₀ … x·ω₆₃), each in f32,
            // then π times it in f32: the reference's matmul and `np.pi * x`.
            let products = freqs
                .iter()
                .map(|&f| y * f)
                .chain(freqs.iter().map(|&f| x * f));
            for ((c, s), u) in cos.iter_mut().zip(sin).zip(products) {
                let arg = PI * u;
                *c = accurate(f64::cos, arg);
                *s = accurate(f64::sin, arg);
            }
        });
}

/// The positional encoding of the h×w pixel-centre grid: no inputs, f32 `[h·w, 256]`.
#[derive(Clone, Debug, PartialEq)]
pub struct CoordPosEnc {
    pub h: usize,
    pub w: usize,
}

impl CoordPosEnc {
    fn check<T: Shaped>(&self, ins: &[&T]) -> Result<()> {
        let [] = inputs_n(self.name(), ins)?;
        if self.h == 0 || self.w == 0 {
            return Err(Error::shape(
                self.name(),
                format!("the grid {}×{} is empty", self.h, self.w),
            ));
        }
        Ok(())
    }
}

impl OpImpl for CoordPosEnc {
    fn name(&self) -> &'static str {
        "coord_posenc"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        self.check(inputs)?;
        Ok(vec![(vec![self.h * self.w, POSENC_WIDTH], DType::F32)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        self.check(inputs)?;
        coord_posenc_ref(self.h, self.w, &mut outputs[0].data);
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let op = self.name();
        let args = Args::new()
            .ptr(io.outputs[0].ptr)
            .i32(to_i32(op, "h", self.h)?)
            .i32(to_i32(op, "w", self.w)?)
            .f32(PE_SIGMA.ln() as f32);
        linear_launch("coord_posenc_f32", self.h * self.w * POSENC_WIDTH, args)
    }
}

/// One hyper-network layer's weights for each sample. Inputs `base [Din+1, Dout]` (weight
/// rows, input-major, then the bias row) and `m [B, g, Din]` (the `wtoken_postfc` output: g
/// group tokens of Din values, g = `groups`). Output `[B, Din+1, Dout]`:
/// `W′[b,i,o] = base[i,o]·m[b, o mod g, i]` (groups tiled across the columns), every column
/// W′[b, :Din, o] divided by max(‖·‖₂, 1e-12) (`F.normalize(dim=1)`), and the bias row
/// copied unchanged.
#[derive(Clone, Debug, PartialEq)]
pub struct ModulatedWeights {
    pub groups: usize,
    pub out: DType,
}

impl ModulatedWeights {
    /// (B, Din, Dout).
    fn dims<T: Shaped>(&self, ins: &[&T]) -> Result<(usize, usize, usize)> {
        let op = self.name();
        let [base, m] = inputs_n(op, ins)?;
        let (din, dout) = match *base.shape() {
            [rows, dout] if rows >= 2 && dout > 0 => (rows - 1, dout),
            ref s => {
                return Err(Error::shape(
                    op,
                    format!("base must be [Din+1, Dout] with Din, Dout ≥ 1, got {s:?}"),
                ))
            }
        };
        let g = self.groups;
        if g == 0 || dout % g != 0 {
            return Err(Error::shape(
                op,
                format!("{g} groups must divide the {dout} output columns"),
            ));
        }
        match *m.shape() {
            [b, mg, mi] if b > 0 && mg == g && mi == din => Ok((b, din, dout)),
            ref s => Err(Error::shape(
                op,
                format!("m must be [B, {g}, {din}] with B ≥ 1, got {s:?}"),
            )),
        }
    }
}

impl OpImpl for ModulatedWeights {
    fn name(&self) -> &'static str {
        "modulated_weights"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let (b, din, dout) = self.dims(inputs)?;
        Ok(vec![(vec![b, din + 1, dout], self.out)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let (_, din, dout) = self.dims(inputs)?;
        let (base, m) = (&inputs[0].data, &inputs[1].data);
        let (base_w, base_bias) = base.split_at(din * dout);
        for (mb, ob) in m
            .chunks_exact(self.groups * din)
            .zip(outputs[0].data.chunks_exact_mut((din + 1) * dout))
        {
            let (w, bias) = ob.split_at_mut(din * dout);
            for o in 0..dout {
                let group = &mb[(o % self.groups) * din..][..din];
                let col: Vec<f32> = (0..din).map(|i| base_w[i * dout + o] * group[i]).collect();
                let norm = col.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() as f32;
                let denom = norm.max(NORM_FLOOR);
                for (i, v) in col.iter().enumerate() {
                    w[i * dout + o] = v / denom;
                }
            }
            bias.copy_from_slice(base_bias);
        }
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let op = self.name();
        let descs: Vec<&TensorDesc> = io.inputs.iter().map(|t| t.desc).collect();
        let (b, din, dout) = self.dims(&descs)?;
        if descs[0].dtype != descs[1].dtype || self.out != DType::F32 {
            return Err(Error::shape(
                op,
                format!(
                    "the kernel needs base and m of one dtype and an f32 output (the hyper-MLP stays f32), got {:?}, {:?} -> {:?}",
                    descs[0].dtype, descs[1].dtype, self.out
                ),
            ));
        }
        let args = io
            .tensor_args()
            .i32(to_i32(op, "B", b)?)
            .i32(to_i32(op, "Din", din)?)
            .i32(to_i32(op, "Dout", dout)?)
            .i32(to_i32(op, "groups", self.groups)?);
        let name = format!("modulated_weights_{}_f32", descs[0].dtype.suffix());
        Ok(vec![Launch::linear(
            KernelId::lookup(&name)?,
            to_i32(op, "column blocks", ceil_div(b * dout, 4))? as u32,
            128,
            args,
        )])
    }
}

/// The per-pixel hyper-MLP. Inputs `pe [P, Din0]` (shared by the batch), `w0 [B, Din0+1, Dh]`
/// and `w1 [B, Dh+1, Dout]` (weight rows then bias row, from [`ModulatedWeights`]). Output
/// `[B, P, Dout]`: `h = ReLU(pe·w0[:Din0] + w0[Din0])`, `out = h·w1[:Dh] + w1[Dh]`.
#[derive(Clone, Debug, PartialEq)]
pub struct HyperMlp {
    pub out: DType,
}

/// (B, P, Din0, Dh, Dout) of validated inputs.
type MlpDims = (usize, usize, usize, usize, usize);

impl HyperMlp {
    fn dims<T: Shaped>(&self, ins: &[&T]) -> Result<MlpDims> {
        let op = self.name();
        let [pe, w0, w1] = inputs_n(op, ins)?;
        let (p, din) = match *pe.shape() {
            [p, din] if p > 0 && din > 0 => (p, din),
            ref s => {
                return Err(Error::shape(
                    op,
                    format!("pe must be a non-empty [P, Din], got {s:?}"),
                ))
            }
        };
        let (b, dh) = match *w0.shape() {
            [b, rows, dh] if b > 0 && rows == din + 1 && dh > 0 => (b, dh),
            ref s => {
                return Err(Error::shape(
                    op,
                    format!("w0 must be [B, {}, Dh] with B, Dh ≥ 1, got {s:?}", din + 1),
                ))
            }
        };
        match *w1.shape() {
            [b1, rows, dout] if b1 == b && rows == dh + 1 && dout > 0 => Ok((b, p, din, dh, dout)),
            ref s => Err(Error::shape(
                op,
                format!(
                    "w1 must be [{b}, {}, Dout] with Dout ≥ 1, got {s:?}",
                    dh + 1
                ),
            )),
        }
    }
}

/// `x·W + bias` for `wb = [len(x) + 1, width]` (weight rows, then the bias row), in f64.
fn affine(x: &[f32], wb: &[f32], out: &mut [f32]) {
    let width = out.len();
    let (w, bias) = wb.split_at(x.len() * width);
    let mut acc: Vec<f64> = bias.iter().map(|&v| v as f64).collect();
    for (&xi, row) in x.iter().zip(w.chunks_exact(width)) {
        for (a, &wv) in acc.iter_mut().zip(row) {
            *a += xi as f64 * wv as f64;
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = a as f32;
    }
}

impl OpImpl for HyperMlp {
    fn name(&self) -> &'static str {
        "hyper_mlp"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let (b, p, _, _, dout) = self.dims(inputs)?;
        Ok(vec![(vec![b, p, dout], self.out)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let (_, p, din, dh, dout) = self.dims(inputs)?;
        let (pe, w0, w1) = (&inputs[0].data, &inputs[1].data, &inputs[2].data);
        outputs[0]
            .data
            .par_chunks_mut(dout)
            .enumerate()
            .for_each(|(row, out)| {
                let (b, px) = (row / p, row % p);
                let mut hidden = vec![0f32; dh];
                affine(
                    &pe[px * din..][..din],
                    &w0[b * (din + 1) * dh..][..(din + 1) * dh],
                    &mut hidden,
                );
                hidden.iter_mut().for_each(|v| *v = v.max(0.0));
                affine(&hidden, &w1[b * (dh + 1) * dout..][..(dh + 1) * dout], out);
            });
        Ok(())
    }

    fn cost(&self, inputs: &[&TensorDesc], outputs: &[&TensorDesc]) -> Cost {
        let bytes = inputs.iter().chain(outputs).map(|d| d.bytes() as f64).sum();
        let flops = self.dims(inputs).map_or(0.0, |(b, p, din, dh, dout)| {
            2.0 * (b * p) as f64 * (din * dh + dh * dout) as f64
        });
        Cost { flops, bytes }
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let op = self.name();
        let descs: Vec<&TensorDesc> = io.inputs.iter().map(|t| t.desc).collect();
        let (b, p, din, dh, dout) = self.dims(&descs)?;
        for t in &descs {
            require_f32(op, &t.name, t)?;
        }
        if b > 65535 {
            return Err(Error::shape(op, format!("batch {b} exceeds 65535")));
        }
        let args = io
            .tensor_args()
            .i32(to_i32(op, "P", p)?)
            .i32(to_i32(op, "Din", din)?)
            .i32(to_i32(op, "Dh", dh)?)
            .i32(to_i32(op, "Dout", dout)?);
        let smem = (din + dh) * 4;
        if smem > 96 << 10 {
            return Err(Error::shape(
                op,
                format!("Din + Dh = {} exceeds the kernel's shared memory", din + dh),
            ));
        }
        Ok(vec![Launch {
            kernel: KernelId::lookup(&format!("hyper_mlp_f32_{}", self.out.suffix()))?,
            grid: [p as u32, b as u32, 1],
            block: [128, 1, 1],
            smem: smem as u32,
            args,
        }])
    }
}

/// Hostsim/GPU checks: the encoding on odd grids, the modulation and the MLP with odd widths.
pub fn checks(seed: u64, scale: Scale) -> Result<Vec<OpCheck>> {
    let mut v = Vec::new();
    let mut grids = vec![(1, 1), (3, 5), (24, 17)];
    if scale == Scale::Gpu {
        grids.push((256, 192));
    }
    for &(h, w) in &grids {
        let mut cb = CheckBuilder::new(seed);
        let y = cb.graph.op1(CoordPosEnc { h, w }, &[])?;
        // Arguments up to π·1024, the same f32 operations on both sides (ω = exp of the same
        // f32 linspace value in double, rounded once: the same f32 unless a double result
        // lands on an f32 rounding tie, which for these 64 fixed values either always or never
        // happens); cos and sin in double, rounded once: at a tie the sides differ by one ulp,
        // ≤ 2⁻²⁴ below 1 (2⁻²³ bounds it with |y| = 1 included).
        v.push(cb.finish(
            format!("coord_posenc {h}x{w}"),
            &[y],
            Tolerance {
                atol: 2.0 * crate::verify::bound::U as f32,
                rtol: 0.0,
            },
        )?);
    }
    // (B, Din, Dout, groups, P, Dh)
    let mut mlps = vec![
        (1, 1, 1, 1, 1, 1),
        (2, 37, 12, 4, 7, 5),
        (3, 64, 96, 32, 33, 20),
    ];
    if scale == Scale::Gpu {
        mlps.push((2, 256, 2048, 64, 4096, 64));
    }
    for (i, &(b, din, dout, groups, p, dh)) in mlps.iter().enumerate() {
        for dtype in [DType::F32, DType::BF16] {
            let mut cb = CheckBuilder::new(
                seed.wrapping_add(10 + i as u64 * 2 + (dtype == DType::BF16) as u64),
            );
            let base = cb.input(&[din + 1, dout], dtype, 1.0)?;
            let m = cb.input(&[b, groups, din], dtype, 1.0)?;
            let y = cb.graph.op1(
                ModulatedWeights {
                    groups,
                    out: DType::F32,
                },
                &[base, m],
            )?;
            // Relative per element (so relative to max|ref| too): base·m is the same f32 on
            // both sides; the kernel's f32 sum of squares (positive, ≤ din/32 + 5 steps a
            // lane) errs by sum(din/32 + 6, u), the norm by half of that + u (sqrtf), the
            // reciprocal and the product by 2u; the reference rounds once: ½·sum + 4u.
            use crate::verify::bound::{sum, U};
            let rtol = 0.5 * sum(din.div_ceil(32) + 6, U) + 4.0 * U;
            v.push(cb.finish(
                format!("modulated_weights {dtype:?} b{b} {din}x{dout} g{groups}"),
                &[y],
                Tolerance {
                    atol: 0.0,
                    rtol: rtol as f32,
                },
            )?);
        }
        for out in [DType::F32, DType::BF16] {
            let mut cb = CheckBuilder::new(
                seed.wrapping_add(100 + i as u64 * 2 + (out == DType::BF16) as u64),
            );
            let pe = cb.input(&[p, din], DType::F32, 1.0)?;
            let w0 = cb.input(&[b, din + 1, dh], DType::F32, 0.5)?;
            let w1 = cb.input(&[b, dh + 1, dout], DType::F32, 0.5)?;
            let y = cb.graph.op1(HyperMlp { out }, &[pe, w0, w1])?;
            let check = cb.finish(
                format!("hyper_mlp ->{out:?} b{b} p{p} {din}->{dh}->{dout}"),
                &[y],
                Tolerance::BOUND,
            )?;
            // The kernel sums each hidden unit's din + 1 terms and each output's dh + 1 in
            // sequential f32 chains: the hidden h errs by ≤ sum(din + 1, u)·S_h, S_h =
            // |b0| + Σ|pe·w0| ≥ |h|, which reaches the output through |w1|; the output's own
            // chain adds sum(dh + 1, u)·(|b1| + Σ|h·w1|). Both are ≤ M = the MLP on absolute
            // values (ReLU is the identity there), the reference rounds once: (sum(din + 1, u)
            // + sum(dh + 1, u) + 2u)·M, then the store.
            v.push(check.with_scale(move |chk, r| {
                use crate::verify::bound::{stored, sum, U};
                let shapes = [vec![p, din], vec![b, din + 1, dh], vec![b, dh + 1, dout]];
                let vals = [pe, w0, w1].map(|id| chk.values(id));
                let ins: Vec<(&[usize], &[f32])> =
                    shapes.iter().map(|s| s.as_slice()).zip(vals).collect();
                let mag = crate::verify::reference_on_abs(&HyperMlp { out }, &ins)
                    .expect("the check's shapes")
                    .remove(0);
                let k = sum(din + 1, U) + sum(dh + 1, U) + 2.0 * U;
                let bf16 = out == DType::BF16;
                vec![mag
                    .iter()
                    .zip(&r[0])
                    .map(|(&mv, &yv)| stored(k * mv as f64, yv as f64, bf16) as f32)
                    .collect()]
            }));
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_data::random;
    use crate::ops::test_support::{desc, run};

    #[test]
    fn frequencies_are_powers_of_1024() {
        let f = frequencies();
        assert_eq!(f[0], 1.0);
        for (k, &v) in f.iter().enumerate() {
            let exact = 1024f64.powf(k as f64 / 63.0);
            assert!(((v as f64 - exact) / exact).abs() < 1e-6, "ω_{k} = {v}");
        }
    }

    #[test]
    fn encoding_follows_the_grid_and_layout() {
        let (h, w) = (3, 5);
        let pe = run(&CoordPosEnc { h, w }, &[]).unwrap();
        assert_eq!(pe.shape, [h * w, POSENC_WIDTH]);
        let f = frequencies();
        for i in 0..h {
            for j in 0..w {
                let row = &pe.data[(i * w + j) * POSENC_WIDTH..][..POSENC_WIDTH];
                let y = -1.0 + (2 * i + 1) as f64 / h as f64;
                let x = -1.0 + (2 * j + 1) as f64 / w as f64;
                for k in [0, 17, 63] {
                    let (ay, ax) = (
                        std::f64::consts::PI * y * f[k] as f64,
                        std::f64::consts::PI * x * f[k] as f64,
                    );
                    // f32 arguments near 3·10³ rad: allow their rounding.
                    let tol = 1e-6 + 4e-7 * ay.abs().max(ax.abs());
                    for (got, want) in [
                        (row[k], ay.cos()),
                        (row[PE_FREQS + k], ax.cos()),
                        (row[2 * PE_FREQS + k], ay.sin()),
                        (row[3 * PE_FREQS + k], ax.sin()),
                    ] {
                        assert!((got as f64 - want).abs() <= tol, "pixel ({i},{j}) k {k}");
                    }
                }
            }
        }
        // The centre of an odd grid is the origin: cos 1, sin 0 at every frequency.
        let centre = &pe.data[(w + 2) * POSENC_WIDTH..][..POSENC_WIDTH];
        assert!(centre[..2 * PE_FREQS].iter().all(|&v| v == 1.0));
        assert!(centre[2 * PE_FREQS..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn modulated_columns_have_unit_norm_and_tile_the_groups() {
        let (b, din, dout, g) = (2, 7, 12, 3);
        let mut base = random(1, &[din + 1, dout], 1.0);
        // Column o + g copies column o: both use group o mod g, so they must come out equal.
        for i in 0..=din {
            base.data[i * dout + 4 + g] = base.data[i * dout + 4];
        }
        let m = random(2, &[b, g, din], 2.0);
        let op = ModulatedWeights {
            groups: g,
            out: DType::F32,
        };
        let w = run(&op, &[&base, &m]).unwrap();
        assert_eq!(w.shape, [b, din + 1, dout]);
        for s in 0..b {
            let ws = &w.data[s * (din + 1) * dout..][..(din + 1) * dout];
            for o in 0..dout {
                let norm: f64 = (0..din).map(|i| (ws[i * dout + o] as f64).powi(2)).sum();
                assert!((norm.sqrt() - 1.0).abs() < 1e-6, "sample {s} column {o}");
                // Proportional to base·m of its group.
                let i = 2;
                let ratio = ws[i * dout + o]
                    / (base.data[i * dout + o] * m.data[(s * g + o % g) * din + i]);
                let ratio0 = ws[o] / (base.data[o] * m.data[(s * g + o % g) * din]);
                assert!((ratio / ratio0 - 1.0).abs() < 1e-5);
            }
            for i in 0..din {
                assert_eq!(ws[i * dout + 4 + g], ws[i * dout + 4]);
            }
            assert_eq!(&ws[din * dout..], &base.data[din * dout..], "bias row");
        }
        // Changing group 1 of sample 0 changes exactly the columns ≡ 1 (mod g) of sample 0.
        let mut m2 = m.clone();
        m2.data[din..2 * din].iter_mut().for_each(|v| *v = 1.5 - *v);
        let w2 = run(&op, &[&base, &m2]).unwrap();
        for (idx, (a, c)) in w.data.iter().zip(&w2.data).enumerate() {
            let (s, i, o) = (idx / ((din + 1) * dout), idx / dout % (din + 1), idx % dout);
            assert_eq!(
                a != c,
                s == 0 && i < din && o % g == 1,
                "sample {s} row {i} column {o}"
            );
        }
    }

    #[test]
    fn zero_columns_stay_zero() {
        let base = HostTensor::zeros(&[3, 2]);
        let m = HostTensor::new(vec![1, 1, 2], vec![1.0, 1.0]);
        let w = run(
            &ModulatedWeights {
                groups: 1,
                out: DType::F32,
            },
            &[&base, &m],
        )
        .unwrap();
        assert!(w.data.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn hyper_mlp_matches_explicit_loops() {
        let (b, p, din, dh, dout) = (2, 11, 9, 6, 5);
        let pe = random(3, &[p, din], 1.0);
        let w0 = random(4, &[b, din + 1, dh], 1.0);
        let w1 = random(5, &[b, dh + 1, dout], 1.0);
        let got = run(&HyperMlp { out: DType::F32 }, &[&pe, &w0, &w1]).unwrap();
        assert_eq!(got.shape, [b, p, dout]);
        let at = |t: &HostTensor, s: usize, i: usize, o: usize| {
            let (rows, cols) = (t.shape[1], t.shape[2]);
            t.data[(s * rows + i) * cols + o] as f64
        };
        for s in 0..b {
            for px in 0..p {
                let hidden: Vec<f64> = (0..dh)
                    .map(|j| {
                        let pre = at(&w0, s, din, j)
                            + (0..din)
                                .map(|i| pe.data[px * din + i] as f64 * at(&w0, s, i, j))
                                .sum::<f64>();
                        pre.max(0.0) as f32 as f64
                    })
                    .collect();
                for o in 0..dout {
                    let want = at(&w1, s, dh, o)
                        + (0..dh).map(|j| hidden[j] * at(&w1, s, j, o)).sum::<f64>();
                    let g = got.data[(s * p + px) * dout + o] as f64;
                    assert!((g - want).abs() < 1e-6, "sample {s} pixel {px} out {o}");
                }
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let f = |s: &[usize]| desc(s, DType::F32);
        let infer = |op: &dyn OpImpl, ins: &[TensorDesc]| op.infer(&ins.iter().collect::<Vec<_>>());

        assert!(
            infer(&CoordPosEnc { h: 0, w: 4 }, &[]).is_err(),
            "empty grid"
        );
        assert!(
            infer(&CoordPosEnc { h: 2, w: 4 }, &[f(&[1])]).is_err(),
            "arity"
        );
        assert!(CoordPosEnc { h: 2, w: 0 }.reference(&[], &mut []).is_err());

        let mw = |groups| ModulatedWeights {
            groups,
            out: DType::BF16,
        };
        assert!(infer(&mw(4), &[f(&[9, 16]), f(&[2, 4, 8])]).is_ok());
        assert!(
            infer(&mw(0), &[f(&[9, 16]), f(&[2, 0, 8])]).is_err(),
            "no groups"
        );
        assert!(
            infer(&mw(5), &[f(&[9, 16]), f(&[2, 5, 8])]).is_err(),
            "groups ∤ Dout"
        );
        assert!(
            infer(&mw(4), &[f(&[9, 16]), f(&[2, 3, 8])]).is_err(),
            "token count"
        );
        assert!(infer(&mw(4), &[f(&[9, 16]), f(&[2, 4, 9])]).is_err(), "Din");
        assert!(
            infer(&mw(4), &[f(&[1, 16]), f(&[2, 4, 0])]).is_err(),
            "no weight rows"
        );
        assert!(
            infer(&mw(4), &[f(&[9, 16, 1]), f(&[2, 4, 8])]).is_err(),
            "base rank"
        );
        assert!(infer(&mw(4), &[f(&[9, 16])]).is_err(), "arity");

        let mlp = HyperMlp { out: DType::F32 };
        assert!(infer(&mlp, &[f(&[10, 8]), f(&[2, 9, 6]), f(&[2, 7, 3])]).is_ok());
        assert!(
            infer(&mlp, &[f(&[10, 8]), f(&[2, 8, 6]), f(&[2, 7, 3])]).is_err(),
            "w0 rows"
        );
        assert!(
            infer(&mlp, &[f(&[10, 8]), f(&[2, 9, 6]), f(&[2, 6, 3])]).is_err(),
            "w1 rows"
        );
        assert!(
            infer(&mlp, &[f(&[10, 8]), f(&[2, 9, 6]), f(&[1, 7, 3])]).is_err(),
            "w1 batch"
        );
        assert!(
            infer(&mlp, &[f(&[0, 8]), f(&[2, 9, 6]), f(&[2, 7, 3])]).is_err(),
            "no pixels"
        );
        assert!(
            infer(&mlp, &[f(&[1, 10, 8]), f(&[2, 9, 6]), f(&[2, 7, 3])]).is_err(),
            "pe rank"
        );
        assert!(infer(&mlp, &[f(&[10, 8]), f(&[2, 9, 6])]).is_err(), "arity");
    }
}
