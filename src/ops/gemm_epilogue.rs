//! What a vendor GEMM cannot fuse, as passes of our own around it (`kernels/gemm_epilogue.cu`),
//! and the tuner's on-device comparison of two outputs.
//!
//! - [`GemmEpilogue`]: the epilogue of [`Gemm`](super::gemm::Gemm) (bias, exact GELU, residual),
//!   of [`GemmFilm`](super::gemm::GemmFilm) (FiLM) and of
//!   [`GemmGrnStats`](super::gemm::GemmGrnStats) (GRN sums of squares, per 64-row slab in the
//!   fused GEMM's partials layout, then added in order) applied to a GEMM product computed
//!   elsewhere (cuBLASLt's, in f32 or bf16).
//! - [`GemmScaleA`]: the A-operand modulation of
//!   [`GemmScaledA`](super::gemm::GemmScaledA), as its own pass before a vendor GEMM.
//! - [`TuneCompare`]: max error, max reference, differing and non-finite element counts of two
//!   tensors, per block: the tuner checks every candidate against our kernel without copying
//!   outputs to the host.
//!
//! All are deterministic (no atomics): the same inputs give the same bits on every run.

use super::math::gelu_ref;
use super::{arity, linear_launch, rows_channels, to_i32};
use crate::runtime::graph::{LaunchIo, OpImpl, OutSpec, TensorDesc};
use crate::runtime::kernel_choice::KernelChoice;
use crate::runtime::kernels::KernelId;
use crate::runtime::launch::{ceil_div, Args, Launch};
use crate::tensor::{DType, HostTensor};
use crate::verify::{CheckBuilder, OpCheck, Scale, Tolerance};
use crate::{Error, Result};

/// Rows per slab of the GRN partial sums (kernels/gemm.cu's warp slab; the same layout).
const SLAB: usize = 64;
/// Threads per block of the epilogue kernel, one column each.
const COLUMNS_PER_BLOCK: usize = 256;

/// `y = epilogue(x)`: `+ bias`, GELU-erf, `+ residual`, FiLM, each optional, in that order (the
/// order of kernels/gemm.cu), then rounded once to `out`. Inputs: `x [.., N]` (f32, or bf16
/// with a bf16 output), then f32 `bias [N]`, the residual (`out`, x's shape), f32
/// `ab [B, 2N]` (FiLM), as enabled. With `grn_stats` x is `[B, rows, N]` and a second output
/// holds f32 `sumsq [B, N]`, Σ over each sample's rows of y² (of the stored values).
#[derive(Clone, Debug, PartialEq)]
pub struct GemmEpilogue {
    pub bias: bool,
    pub gelu: bool,
    pub residual: bool,
    /// FiLM `v·(k + a[s]) + β[s]` with this k.
    pub film: Option<f32>,
    pub grn_stats: bool,
    pub out: DType,
}

/// The GEMM output's samples: FiLM's modulation rows, else A's first axis (GRN).
fn samples(op: &str, x: &[usize], film_ab: Option<&[usize]>) -> Result<(usize, usize)> {
    let (m, _) = rows_channels(op, x)?;
    let b = match film_ab {
        Some(ab) => ab.first().copied().unwrap_or(0),
        None if x.len() >= 3 => x[0],
        None => {
            return Err(Error::shape(
                op,
                format!("x must be [samples, rows, N] for the GRN statistics, got {x:?}"),
            ))
        }
    };
    if b == 0 || m % b != 0 {
        return Err(Error::shape(
            op,
            format!("{m} rows do not split into {b} samples"),
        ));
    }
    Ok((b, m / b))
}

impl GemmEpilogue {
    fn n_inputs(&self) -> usize {
        1 + self.bias as usize + self.residual as usize + self.film.is_some() as usize
    }

    /// The modulation input's index.
    fn ab_index(&self) -> usize {
        1 + self.bias as usize + self.residual as usize
    }

    /// (samples, rows per sample) where FiLM or the GRN statistics need them.
    fn sample_split(&self, shapes: &[&[usize]]) -> Result<Option<(usize, usize)>> {
        if self.film.is_none() && !self.grn_stats {
            return Ok(None);
        }
        let ab = self.film.map(|_| shapes[self.ab_index()]);
        samples(self.name(), shapes[0], ab).map(Some)
    }

    /// Slabs of the fused GRN statistics, when samples hold at least one slab.
    fn slabs(&self, shapes: &[&[usize]]) -> Result<Option<usize>> {
        if !self.grn_stats {
            return Ok(None);
        }
        let (b, rows) = self
            .sample_split(shapes)?
            .expect("grn statistics split samples");
        Ok((rows >= SLAB).then(|| (b * rows).div_ceil(SLAB)))
    }
}

impl OpImpl for GemmEpilogue {
    fn name(&self) -> &'static str {
        "gemm_epilogue"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let op = self.name();
        let ins = arity(op, inputs, self.n_inputs())?;
        let x = ins[0];
        let (_, n) = rows_channels(op, &x.shape)?;
        if x.dtype == DType::BF16 && self.out == DType::F32 {
            return Err(Error::shape(
                op,
                "a bf16 product cannot give an f32 output (use an f32 product)",
            ));
        }
        let mut next = 1;
        if self.bias {
            let b = ins[next];
            if b.shape != [n] || b.dtype != DType::F32 {
                return Err(Error::shape(
                    op,
                    format!("bias must be f32 [{n}], got {:?} {:?}", b.dtype, b.shape),
                ));
            }
            next += 1;
        }
        if self.residual {
            let r = ins[next];
            if r.shape != x.shape || r.dtype != self.out {
                return Err(Error::shape(
                    op,
                    format!(
                        "residual must be {:?} {:?}, got {:?} {:?}",
                        self.out, x.shape, r.dtype, r.shape
                    ),
                ));
            }
        }
        let shapes: Vec<&[usize]> = ins.iter().map(|d| d.shape.as_slice()).collect();
        let split = self.sample_split(&shapes)?;
        if self.film.is_some() {
            let ab = ins[self.ab_index()];
            let b = split.map_or(0, |s| s.0);
            if ab.shape != [b, 2 * n] || ab.dtype != DType::F32 {
                return Err(Error::shape(
                    op,
                    format!(
                        "ab must be f32 [B, {}], got {:?} {:?}",
                        2 * n,
                        ab.dtype,
                        ab.shape
                    ),
                ));
            }
        }
        let mut outs = vec![(x.shape.clone(), self.out)];
        if let Some((b, _)) = split.filter(|_| self.grn_stats) {
            outs.push((vec![b, n], DType::F32));
        }
        Ok(outs)
    }

    fn workspace_bytes(&self, inputs: &[&TensorDesc], _: KernelChoice) -> usize {
        let shapes: Vec<&[usize]> = inputs.iter().map(|d| d.shape.as_slice()).collect();
        match self.slabs(&shapes) {
            Ok(Some(slabs)) => slabs * 2 * inputs[0].shape[inputs[0].shape.len() - 1] * 4,
            _ => 0,
        }
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let shapes: Vec<&[usize]> = inputs.iter().map(|t| t.shape.as_slice()).collect();
        let split = self.sample_split(&shapes)?;
        let x = inputs[0];
        let n = x.shape[x.shape.len() - 1];
        let mut next = 1;
        let bias = self.bias.then(|| {
            next += 1;
            &inputs[next - 1].data
        });
        let residual = self.residual.then(|| &inputs[next].data);
        let ab = self.film.map(|k| (k, &inputs[self.ab_index()].data));
        let rows_per_sample = split.map_or(usize::MAX, |s| s.1);
        for (i, (o, &v)) in outputs[0].data.iter_mut().zip(&x.data).enumerate() {
            let (row, col) = (i / n, i % n);
            let mut v = v;
            if let Some(b) = bias {
                v += b[col];
            }
            if self.gelu {
                v = gelu_ref(v);
            }
            if let Some(r) = residual {
                v += r[i];
            }
            if let Some((k, ab)) = ab {
                let m = &ab[(row / rows_per_sample) * 2 * n..][..2 * n];
                v = v * (k + m[col]) + m[n + col];
            }
            *o = v;
        }
        if self.grn_stats {
            let (y, ss) = outputs.split_at_mut(1);
            for (sample, acc_row) in y[0]
                .data
                .chunks_exact(rows_per_sample * n)
                .zip(ss[0].data.chunks_exact_mut(n))
            {
                let mut acc = vec![0f64; n];
                for row in sample.chunks_exact(n) {
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += v as f64 * v as f64;
                    }
                }
                for (o, a) in acc_row.iter_mut().zip(acc) {
                    *o = a as f32;
                }
            }
        }
        Ok(())
    }

    /// The epilogue pass (with per-slab GRN sums in the workspace where samples hold a slab),
    /// then, with the GRN statistics, the in-order slab reduction, or for smaller samples
    /// (test shapes only) the statistics from the stored output.
    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let op = self.name();
        let descs: Vec<&TensorDesc> = io.inputs.iter().map(|t| t.desc).collect();
        self.infer(&descs)?;
        let shapes: Vec<&[usize]> = descs.iter().map(|d| d.shape.as_slice()).collect();
        let x = io.inputs[0];
        let (m, n) = rows_channels(op, &x.desc.shape)?;
        let split = self.sample_split(&shapes)?;
        let rows_per_sample = split.map_or(1, |s| s.1);
        let slabs = self.slabs(&shapes)?;
        let mut next = 1;
        let mut take = |on: bool| {
            if on {
                next += 1;
                io.inputs[next - 1].ptr
            } else {
                0
            }
        };
        let bias = take(self.bias);
        let residual = take(self.residual);
        let ab = take(self.film.is_some());
        let y = io.outputs[0];
        let partials = if slabs.is_some() { io.workspace } else { 0 };
        let name = format!(
            "gemm_epilogue_{}_{}",
            x.desc.dtype.suffix(),
            self.out.suffix()
        );
        let grid_y = ceil_div(n, COLUMNS_PER_BLOCK);
        if grid_y > 65535 {
            return Err(Error::shape(
                op,
                format!("N = {n} exceeds the grid's y range"),
            ));
        }
        let args = Args::new()
            .ptr(x.ptr)
            .ptr(bias)
            .ptr(residual)
            .ptr(y.ptr)
            .i32(to_i32(op, "M", m)?)
            .i32(to_i32(op, "N", n)?)
            .i32(self.gelu as i32)
            .ptr(ab)
            .i32(to_i32(op, "rows per sample", rows_per_sample)?)
            .f32(self.film.unwrap_or(0.0))
            .ptr(partials);
        let mut launches = vec![Launch {
            kernel: KernelId::lookup(&name)?,
            grid: [
                to_i32(op, "row slabs", ceil_div(m, SLAB))? as u32,
                grid_y as u32,
                1,
            ],
            block: [COLUMNS_PER_BLOCK as u32, 1, 1],
            smem: 0,
            args,
        }];
        if let Some((b, rows)) = split.filter(|_| self.grn_stats) {
            let ss = io.outputs[1];
            let batch = to_i32(op, "samples", b)?;
            if batch > 65535 {
                return Err(Error::shape(op, format!("{b} samples exceed 65535")));
            }
            // (kernel, source, channels per block): both kernels have 256 threads (ops/gemm.rs).
            let (kernel, src, per_block) = match slabs {
                Some(_) => ("grn_reduce_partials".to_string(), io.workspace, 256),
                None => (format!("grn_sumsq_{}", self.out.suffix()), y.ptr, 32),
            };
            launches.push(Launch {
                kernel: KernelId::lookup(&kernel)?,
                grid: [ceil_div(n, per_block) as u32, batch as u32, 1],
                block: [256, 1, 1],
                smem: 0,
                args: Args::new()
                    .ptr(src)
                    .ptr(ss.ptr)
                    .u64(rows as u64)
                    .i32(to_i32(op, "N", n)?),
            });
        }
        Ok(launches)
    }
}

/// `A' = A·(k + a[s])` per sample s and input channel, rounded to bf16: the operand modulation
/// of [`GemmScaledA`](super::gemm::GemmScaledA) as its own pass. Inputs: bf16 `A [B, rows, K]`,
/// f32 `ab [B, 2K]` (its first half is a). Output: bf16 `[B, rows, K]`.
#[derive(Clone, Debug, PartialEq)]
pub struct GemmScaleA {
    pub k: f32,
}

impl GemmScaleA {
    /// (samples, K, elements per sample).
    fn dims(&self, a: &[usize], ab: &[usize]) -> Result<(usize, usize, usize)> {
        let op = self.name();
        let (m, k) = rows_channels(op, a)?;
        let b = match a {
            [b, _, ..] if a.len() >= 3 && *b > 0 => *b,
            _ => {
                return Err(Error::shape(
                    op,
                    format!("A must be [samples, rows, K], got {a:?}"),
                ))
            }
        };
        if ab != [b, 2 * k] {
            return Err(Error::shape(
                op,
                format!("ab must be [{b}, {}], got {ab:?}", 2 * k),
            ));
        }
        Ok((b, k, m / b * k))
    }
}

impl OpImpl for GemmScaleA {
    fn name(&self) -> &'static str {
        "gemm_scale_a"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let ins = arity(self.name(), inputs, 2)?;
        if ins[0].dtype != DType::BF16 || ins[1].dtype != DType::F32 {
            return Err(Error::shape(self.name(), "A must be bf16 and ab f32"));
        }
        self.dims(&ins[0].shape, &ins[1].shape)?;
        Ok(vec![(ins[0].shape.clone(), DType::BF16)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let (a, ab) = (inputs[0], inputs[1]);
        let (_, k, per_sample) = self.dims(&a.shape, &ab.shape)?;
        for (i, (o, &v)) in outputs[0].data.iter_mut().zip(&a.data).enumerate() {
            *o = v * (self.k + ab.data[(i / per_sample) * 2 * k + i % k]);
        }
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let (a, ab) = (io.inputs[0], io.inputs[1]);
        let (_, k, per_sample) = self.dims(&a.desc.shape, &ab.desc.shape)?;
        let n = a.desc.numel();
        let args = Args::new()
            .ptr(a.ptr)
            .ptr(ab.ptr)
            .ptr(io.outputs[0].ptr)
            .u64(n as u64)
            .i32(to_i32(self.name(), "K", k)?)
            .u64(per_sample as u64)
            .f32(self.k);
        linear_launch("gemm_scale_a_bf16", n, args)
    }
}

/// Per-block comparison of `got` with `want` (same dtype and element count): f32 `[G, 4]`
/// rows of (max |got − want| over finite pairs, max |want| over finite values, elements whose
/// bits differ, elements where either is NaN/Inf); element i belongs to block
/// `(i / 256) mod G`, `G = `[`compare_blocks`]`(n)`. Exact and deterministic; the tuner reads
/// the G rows and combines them on the host ([`CompareSummary::of`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TuneCompare;

/// Blocks of a [`TuneCompare`] over `n` elements.
pub fn compare_blocks(n: usize) -> usize {
    n.div_ceil(256).clamp(1, 1024)
}

impl OpImpl for TuneCompare {
    fn name(&self) -> &'static str {
        "tune_compare"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let ins = arity(self.name(), inputs, 2)?;
        if ins[0].dtype != ins[1].dtype || ins[0].numel() != ins[1].numel() {
            return Err(Error::shape(
                self.name(),
                format!(
                    "got and want must match: {:?} {:?} vs {:?} {:?}",
                    ins[0].dtype, ins[0].shape, ins[1].dtype, ins[1].shape
                ),
            ));
        }
        Ok(vec![(vec![compare_blocks(ins[0].numel()), 4], DType::F32)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let (got, want) = (&inputs[0].data, &inputs[1].data);
        let g = compare_blocks(got.len());
        let out = &mut outputs[0].data;
        out.fill(0.0);
        for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
            let o = &mut out[(i / 256) % g * 4..][..4];
            if a.to_bits() != b.to_bits() {
                o[2] += 1.0;
            }
            if a.is_finite() && b.is_finite() {
                o[0] = o[0].max((a - b).abs());
                o[1] = o[1].max(b.abs());
            } else {
                o[3] += 1.0;
            }
        }
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let (got, want) = (io.inputs[0], io.inputs[1]);
        let n = got.desc.numel();
        let name = format!("tune_compare_{}", got.desc.dtype.suffix());
        Ok(vec![Launch::linear(
            KernelId::lookup(&name)?,
            compare_blocks(n) as u32,
            256,
            Args::new()
                .ptr(got.ptr)
                .ptr(want.ptr)
                .u64(n as u64)
                .ptr(io.outputs[0].ptr),
        )])
    }
}

/// A [`TuneCompare`] output combined over its blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CompareSummary {
    pub max_err: f32,
    pub max_ref: f32,
    pub differing: u64,
    pub non_finite: u64,
}

impl CompareSummary {
    /// Combines the `[G, 4]` rows.
    pub fn of(rows: &[f32]) -> Self {
        rows.chunks_exact(4)
            .fold(CompareSummary::default(), |s, r| CompareSummary {
                max_err: s.max_err.max(r[0]),
                max_ref: s.max_ref.max(r[1]),
                differing: s.differing + r[2] as u64,
                non_finite: s.non_finite + r[3] as u64,
            })
    }

    /// Within `tol` of the reference and finite everywhere.
    pub fn within(&self, tol: Tolerance) -> bool {
        self.non_finite == 0 && self.max_err <= tol.atol + tol.rtol * self.max_ref
    }
}

/// Checks for `verify` and the emulator tests (part of the GEMM family's checks): every
/// epilogue combination on both product dtypes over odd shapes, GRN statistics with samples
/// below, at and across the 64-row slab, the operand scaling, and the comparison.
pub fn checks(seed: u64, scale: Scale) -> Result<Vec<OpCheck>> {
    // (samples, rows per sample, N)
    let mut shapes = vec![
        (1, 1, 8),
        (2, 63, 37),
        (3, 64, 40),
        (2, 97, 264),
        (1, 200, 24),
    ];
    if scale == Scale::Gpu {
        shapes.push((2, 4096, 1280));
    }
    let mut v = Vec::new();
    let mut s = seed;
    for (i, &(b, rows, n)) in shapes.iter().enumerate() {
        for (x_dtype, out) in [
            (DType::F32, DType::F32),
            (DType::F32, DType::BF16),
            (DType::BF16, DType::BF16),
        ] {
            for (j, &(bias, gelu, residual, film, grn_stats)) in [
                (true, false, false, false, false),
                (true, true, false, false, true),
                (true, false, true, true, false),
                (false, true, true, true, true),
                (false, false, false, false, false),
            ]
            .iter()
            .enumerate()
            {
                // Every combination on some shape, without the full product.
                if (i + j) % 2 == 1 && j != 1 {
                    continue;
                }
                s = s.wrapping_add(1);
                let mut cb = CheckBuilder::new(s);
                let mut ins = vec![cb.input(&[b, rows, n], x_dtype, 4.0)?];
                if bias {
                    ins.push(cb.weight(&[n], DType::F32, 1.0)?);
                }
                if residual {
                    ins.push(cb.input(&[b, rows, n], out, 2.0)?);
                }
                if film {
                    ins.push(cb.input(&[b, 2 * n], DType::F32, 0.5)?);
                }
                let op = GemmEpilogue {
                    bias,
                    gelu,
                    residual,
                    film: film.then_some(1.0 + (j % 2) as f32),
                    grn_stats,
                    out,
                };
                let outs = cb.graph.op(op.clone(), &ins)?;
                // A bf16 product is one rounding off the f32 reference; so is a bf16 output.
                let tol = if out == DType::BF16 || x_dtype == DType::BF16 {
                    Tolerance {
                        atol: 1e-5,
                        rtol: 1.6e-2,
                    }
                } else {
                    Tolerance {
                        atol: 1e-5,
                        rtol: 1e-5,
                    }
                };
                v.push(cb.finish(
                    format!(
                        "gemm_epilogue b{b} rows{rows} n{n} {x_dtype:?}->{out:?} bias={bias} gelu={gelu} residual={residual} film={film} grn={grn_stats}"
                    ),
                    &outs,
                    tol,
                )?);
            }
        }
        // The operand scaling over K = N channels.
        s = s.wrapping_add(1);
        let mut cb = CheckBuilder::new(s);
        let a = cb.input(&[b, rows, n], DType::BF16, 2.0)?;
        let ab = cb.input(&[b, 2 * n], DType::F32, 0.5)?;
        let y = cb.graph.op1(GemmScaleA { k: 1.0 }, &[a, ab])?;
        v.push(cb.finish(
            format!("gemm_scale_a b{b} rows{rows} k{n}"),
            &[y],
            Tolerance::BF16_OUT,
        )?);
    }
    // The comparison: exact, over one block, several, and more elements than 1024 blocks
    // cover in one pass; bf16 inputs that agree on part of their elements.
    let mut lens = vec![1, 300, 5000];
    if scale == Scale::Gpu {
        lens.push(3 << 20);
    }
    for (i, &len) in lens.iter().enumerate() {
        for dtype in [DType::F32, DType::BF16] {
            let mut cb = CheckBuilder::new(seed ^ (0xc0 + i as u64));
            let got = cb.input(&[len], dtype, 3.0)?;
            let want = cb.input(&[len], dtype, 3.0)?;
            let y = cb.graph.op1(TuneCompare, &[got, want])?;
            v.push(cb.finish(
                format!("tune_compare n{len} {dtype:?}"),
                &[y],
                Tolerance {
                    atol: 0.0,
                    rtol: 0.0,
                },
            )?);
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_support::run;

    #[test]
    fn the_comparison_counts_differences_and_non_finite_values() {
        let got = HostTensor::new(vec![4], vec![1.0, 2.0, f32::NAN, -4.0]);
        let want = HostTensor::new(vec![4], vec![1.0, 2.5, 3.0, 4.0]);
        let rows = run(&TuneCompare, &[&got, &want]).unwrap();
        let s = CompareSummary::of(&rows.data);
        assert_eq!(s.max_err, 8.0);
        assert_eq!(s.max_ref, 4.0);
        assert_eq!(s.differing, 3);
        assert_eq!(s.non_finite, 1);
        assert!(!s.within(Tolerance {
            atol: 100.0,
            rtol: 0.0
        }));
    }

    #[test]
    fn the_epilogue_applies_bias_gelu_residual_then_film() {
        let x = HostTensor::new(vec![2, 1, 2], vec![1.0, -1.0, 0.5, 2.0]);
        let bias = HostTensor::new(vec![2], vec![0.5, 0.25]);
        let r = HostTensor::new(vec![2, 1, 2], vec![1.0, 1.0, 1.0, 1.0]);
        let ab = HostTensor::new(vec![2, 4], vec![0.0, 1.0, 2.0, 3.0, 0.5, 0.5, -1.0, -1.0]);
        let op = GemmEpilogue {
            bias: true,
            gelu: true,
            residual: true,
            film: Some(1.0),
            grn_stats: false,
            out: DType::F32,
        };
        let y = run(&op, &[&x, &bias, &r, &ab]).unwrap();
        let want = |v: f32, b: f32, a: f32, beta: f32| (gelu_ref(v + b) + 1.0) * (1.0 + a) + beta;
        let expect = [
            want(1.0, 0.5, 0.0, 2.0),
            want(-1.0, 0.25, 1.0, 3.0),
            want(0.5, 0.5, 0.5, -1.0),
            want(2.0, 0.25, 0.5, -1.0),
        ];
        for (g, w) in y.data.iter().zip(expect) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
    }
}
