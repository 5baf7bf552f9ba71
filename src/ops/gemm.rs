//! bf16 GEMM on tensor cores with fused epilogues (`kernels/gemm.cu`).
//!
//! `C = epilogue(A·Wᵀ)`: a PyTorch Linear (W `[N, K]`) applied to every row of A (`[…, K]`),
//! i.e. also a 1×1 conv on channels-last maps. The epilogue adds a bias, applies exact GELU
//! and adds a residual, in that order, each optional.

use super::dot::{accumulate, pack_panels, LANES};
use super::elementwise::Film;
use super::gemm_epilogue::GemmScaleA;
use super::math::gelu_ref;
use super::{arity, rows_channels, to_i32};
use crate::runtime::abi::mirror_kernel_struct;
use crate::runtime::graph::DevTensor;
use crate::runtime::graph::{Cost, LaunchIo, OpImpl, OutSpec, Role, TensorDesc, TensorId};
use crate::runtime::kernel_choice::KernelChoice;
use crate::runtime::kernels::KernelId;
use crate::runtime::launch::{ceil_div, Args, Launch};
use crate::tensor::{DType, HostTensor};
use crate::verify::{CheckBuilder, OpCheck, Scale, Tolerance};
use crate::{Error, Result};
use rayon::prelude::*;

const TILE_M: usize = 128;
const TILE_N: usize = 128;
/// STAGES · (TILE_M + TILE_N) · padded row pitch 40 · 2 bytes.
const SMEM_BYTES: u32 = 3 * (128 + 128) * 40 * 2;

/// The parameters of `gemm_bf16_*` and `gemm_sm90a_*`: `struct GemmParams` of
/// kernels/common/gemm_params.cuh, whose comments say what each field is. Device pointers are
/// addresses, 0 for null.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct GemmParams {
    pub a: u64,
    pub w: u64,
    pub bias: u64,
    pub r: u64,
    pub c: u64,
    pub ab: u64,
    pub partials: u64,
    pub a_mod: u64,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub gelu: i32,
    pub rows_per_sample: i32,
    pub film_k: f32,
    pub a_k: f32,
    pub pad: i32,
}
mirror_kernel_struct!(GemmParams);

#[derive(Clone, Debug, PartialEq)]
pub struct Gemm {
    /// Inputs include an f32 `[N]` bias after W.
    pub bias: bool,
    pub gelu: bool,
    /// Inputs end with a residual `[…, N]` of the output dtype, added last.
    pub residual: bool,
    pub out: DType,
}

impl Gemm {
    /// A Linear layer with bias and nothing else.
    pub fn linear(out: DType) -> Self {
        Gemm {
            bias: true,
            gelu: false,
            residual: false,
            out,
        }
    }

    fn n_inputs(&self) -> usize {
        2 + self.bias as usize + self.residual as usize
    }

    /// (M, N, K) of a validated input list.
    fn dims(&self, a: &[usize], w: &[usize]) -> Result<(usize, usize, usize)> {
        let (m, k) = rows_channels(self.name(), a)?;
        match w {
            [n, kw] if *kw == k && *n > 0 => Ok((m, *n, k)),
            _ => Err(Error::shape(
                self.name(),
                format!("weight must be [N, {k}] for input {a:?}, got {w:?}"),
            )),
        }
    }
}

/// Rows per block of the reference's inner loop: they share each loaded row of a W panel.
const REF_ROWS: usize = 4;
/// Rows per parallel task: every W panel is used by all of them while it is in cache.
const REF_TASK_ROWS: usize = 32;

/// The f32 reference: Σ_k a·w in f64 (k in order from −0.0), rounded to f32, then the
/// epilogue in f32. Tasks of rows in parallel, `LANES` columns side by side (the same
/// sums, bit for bit, as one serial dot product per element).
pub fn gemm_ref(
    a: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    gelu: bool,
    residual: Option<&[f32]>,
    (n, k): (usize, usize),
    c: &mut [f32],
) {
    let panels = pack_panels(w, n, k);
    c.par_chunks_mut(REF_TASK_ROWS * n)
        .enumerate()
        .for_each(|(task, out)| {
            let task_row0 = task * REF_TASK_ROWS;
            let rows = out.len() / n;
            for (p, panel) in panels.chunks_exact(k * LANES).enumerate() {
                let col0 = p * LANES;
                for r0 in (0..rows).step_by(REF_ROWS) {
                    let a_row = |r: usize| &a[(task_row0 + r0 + r) * k..][..k];
                    let block = REF_ROWS.min(rows - r0);
                    let mut sums = [[-0.0f64; LANES]; REF_ROWS];
                    if block == REF_ROWS {
                        accumulate(&mut sums, std::array::from_fn(a_row), panel);
                    } else {
                        for (r, s) in sums.iter_mut().enumerate().take(block) {
                            let mut one = [*s];
                            accumulate(&mut one, [a_row(r)], panel);
                            *s = one[0];
                        }
                    }
                    for (r, row_sums) in sums.iter().enumerate().take(block) {
                        let row = task_row0 + r0 + r;
                        for (j, &sum) in row_sums.iter().enumerate().take(n - col0) {
                            let col = col0 + j;
                            let mut v = sum as f32;
                            if let Some(b) = bias {
                                v += b[col];
                            }
                            if gelu {
                                v = gelu_ref(v);
                            }
                            if let Some(r) = residual {
                                v += r[row * n + col];
                            }
                            out[(r0 + r) * n + col] = v;
                        }
                    }
                }
            }
        });
}

impl OpImpl for Gemm {
    fn name(&self) -> &'static str {
        "gemm"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let ins = arity(self.name(), inputs, self.n_inputs())?;
        let (a, w) = (ins[0], ins[1]);
        let (_, n, k) = self.dims(&a.shape, &w.shape)?;
        if a.dtype != DType::BF16 || w.dtype != DType::BF16 {
            return Err(Error::shape(self.name(), "A and W must be bf16"));
        }
        if k % 8 != 0 {
            return Err(Error::shape(
                self.name(),
                format!("K = {k} is not a multiple of 8: the kernel loads 16-byte rows; pad the channels"),
            ));
        }
        let mut out_shape = a.shape.clone();
        *out_shape.last_mut().unwrap() = n;
        if self.bias && (ins[2].shape != [n] || ins[2].dtype != DType::F32) {
            return Err(Error::shape(
                self.name(),
                format!(
                    "bias must be f32 [{n}], got {:?} {:?}",
                    ins[2].dtype, ins[2].shape
                ),
            ));
        }
        if self.residual {
            let r = ins[ins.len() - 1];
            if r.shape != out_shape || r.dtype != self.out {
                return Err(Error::shape(
                    self.name(),
                    format!(
                        "residual must be {:?} {out_shape:?}, got {:?} {:?}",
                        self.out, r.dtype, r.shape
                    ),
                ));
            }
        }
        Ok(vec![(out_shape, self.out)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let (_, n, k) = self.dims(&inputs[0].shape, &inputs[1].shape)?;
        let bias = self.bias.then(|| inputs[2].data.as_slice());
        let res = self
            .residual
            .then(|| inputs[inputs.len() - 1].data.as_slice());
        gemm_ref(
            &inputs[0].data,
            &inputs[1].data,
            bias,
            self.gelu,
            res,
            (n, k),
            &mut outputs[0].data,
        );
        Ok(())
    }

    fn cost(&self, inputs: &[&TensorDesc], outputs: &[&TensorDesc]) -> Cost {
        let (m, n, k) = self
            .dims(&inputs[0].shape, &inputs[1].shape)
            .unwrap_or((0, 0, 0));
        Cost {
            flops: 2.0 * m as f64 * n as f64 * k as f64,
            bytes: inputs.iter().chain(outputs).map(|d| d.bytes() as f64).sum(),
        }
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        self.launch(io, &Extras::default())
    }

    fn sm90a_fallback(&self, io: &LaunchIo) -> Result<Option<String>> {
        self.sm90a_fallback_with(io, &Extras::default())
    }
}

/// The per-sample features of a launch beyond the plain epilogue (device pointers; 0 = off).
struct Extras {
    rows_per_sample: usize,
    /// FiLM modulation `[samples, 2N]` and its k.
    film: u64,
    film_k: f32,
    /// Per-slab GRN statistics `[ceil(M / 64)][2][N]` (rows per sample ≥ 64).
    partials: u64,
    /// A-operand modulation `[samples, 2K]` (its first half) and its k.
    a_mod: u64,
    a_k: f32,
}

impl Default for Extras {
    fn default() -> Self {
        Extras {
            rows_per_sample: 1,
            film: 0,
            film_k: 0.0,
            partials: 0,
            a_mod: 0,
            a_k: 0.0,
        }
    }
}

/// The GEMM's own inputs and output of a composite op's launch: the composite's first
/// `n_inputs` inputs and first output.
fn gemm_io<'a>(io: &LaunchIo<'a>, n_inputs: usize) -> LaunchIo<'a> {
    LaunchIo {
        inputs: io.inputs[..n_inputs].to_vec(),
        outputs: io.outputs[..1].to_vec(),
        workspace: io.workspace,
        target: io.target,
    }
}

/// The fused GRN statistics' slab count and N, when the samples are at least one 64-row slab
/// (the epilogue's precondition); None for the fallback.
fn grn_slabs(op: &str, inputs: &[&TensorDesc]) -> Result<Option<(usize, usize)>> {
    let (b, rows_per_sample) = samples_of(op, &inputs[0].shape)?;
    let n = inputs[1].shape[0];
    Ok((rows_per_sample >= GRN_SLAB).then(|| ((b * rows_per_sample).div_ceil(GRN_SLAB), n)))
}

/// Rows per slab of the fused GRN statistics (one warp's rows of a tile, kernels/gemm.cu).
const GRN_SLAB: usize = 64;

/// Samples of a composite op: the first axis of A, which must split A's rows evenly.
fn samples_of(op: &str, a: &[usize]) -> Result<(usize, usize)> {
    let (m, _) = rows_channels(op, a)?;
    match a.first() {
        Some(&b) if a.len() >= 3 && b > 0 => Ok((b, m / b)),
        _ => Err(Error::shape(
            op,
            format!("A must be [samples, rows, K] to tell the samples apart, got {a:?}"),
        )),
    }
}

impl Gemm {
    /// The kernel parameters of a launch on the operands of `io` with the extras `x`.
    fn params(&self, io: &LaunchIo, x: &Extras) -> Result<GemmParams> {
        let (a, w) = (io.inputs[0], io.inputs[1]);
        let (m, n, k) = self.dims(&a.desc.shape, &w.desc.shape)?;
        let bias = if self.bias { io.inputs[2].ptr } else { 0 };
        let res = if self.residual {
            io.inputs[io.inputs.len() - 1].ptr
        } else {
            0
        };
        let op = self.name();
        Ok(GemmParams {
            a: a.ptr,
            w: w.ptr,
            bias,
            r: res,
            c: io.outputs[0].ptr,
            ab: x.film,
            partials: x.partials,
            a_mod: x.a_mod,
            m: to_i32(op, "M", m)?,
            n: to_i32(op, "N", n)?,
            k: to_i32(op, "K", k)?,
            gelu: self.gelu as i32,
            rows_per_sample: to_i32(op, "rows per sample", x.rows_per_sample)?,
            film_k: x.film_k,
            a_k: x.a_k,
            pad: 0,
        })
    }

    fn launch(&self, io: &LaunchIo, x: &Extras) -> Result<Vec<Launch>> {
        let params = self.params(io, x)?;
        // The Hopper kernel where the kernel choice allows it on this target and the shape
        // qualifies (ops/gemm_sm90a.rs); the portable one otherwise.
        if io.target.sm90a_allowed()? && super::gemm_sm90a::qualifies(&params) {
            return Ok(vec![super::gemm_sm90a::launch(
                &io.target, &params, self.out,
            )?]);
        }
        let (op, m, n) = (self.name(), params.m as usize, params.n as usize);
        let name = format!("gemm_bf16_{}", self.out.suffix());
        let args = Args::new().by_value(&params);
        let grid_n = ceil_div(n, TILE_N);
        if grid_n > 65535 {
            return Err(Error::shape(
                op,
                format!("N = {n} exceeds the grid's y range"),
            ));
        }
        Ok(vec![Launch {
            kernel: KernelId::lookup(&name)?,
            grid: [
                to_i32(op, "row tiles", ceil_div(m, TILE_M))? as u32,
                grid_n as u32,
                1,
            ],
            block: [256, 1, 1],
            smem: SMEM_BYTES,
            args,
        }])
    }

    /// [`OpImpl::sm90a_fallback`] of a launch with the extras `x`.
    fn sm90a_fallback_with(&self, io: &LaunchIo, x: &Extras) -> Result<Option<String>> {
        if !io.target.sm90a_allowed()? {
            return Ok(None);
        }
        Ok(super::gemm_sm90a::why_not(&self.params(io, x)?))
    }
}

/// A [`Gemm`] followed by [`Film`] `{ k }` in its epilogue: `y·(k + a[s]) + β[s]` per sample s
/// (a TimestepBlock after the ResBlock's last GEMM). Inputs: the GEMM's, then f32
/// `ab [B, 2N]`; A's rows split evenly into the B samples.
#[derive(Clone, Debug, PartialEq)]
pub struct GemmFilm {
    pub gemm: Gemm,
    pub k: f32,
}

impl GemmFilm {
    fn film(&self) -> Film {
        Film {
            k: self.k,
            out: self.gemm.out,
        }
    }

    fn split<'a, T>(&self, inputs: &'a [T]) -> Result<(&'a [T], &'a T)> {
        match inputs.split_last() {
            Some((ab, gemm)) if gemm.len() == self.gemm.n_inputs() => Ok((gemm, ab)),
            _ => Err(Error::shape(
                self.name(),
                format!(
                    "expected {} inputs, got {}",
                    self.gemm.n_inputs() + 1,
                    inputs.len()
                ),
            )),
        }
    }
}

impl OpImpl for GemmFilm {
    fn name(&self) -> &'static str {
        "gemm_film"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let (gemm_in, ab) = self.split(inputs)?;
        let (shape, dtype) = self.gemm.infer(gemm_in)?.remove(0);
        let y = TensorDesc {
            name: "gemm output".into(),
            shape,
            dtype,
            role: Role::Activation,
        };
        self.film().infer(&[&y, ab])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let (gemm_in, ab) = self.split(inputs)?;
        let mut y = vec![outputs[0].clone()];
        self.gemm.reference(gemm_in, &mut y)?;
        self.film().reference(&[&y[0], ab], outputs)
    }

    fn cost(&self, inputs: &[&TensorDesc], outputs: &[&TensorDesc]) -> Cost {
        let mut c = self.gemm.cost(&inputs[..inputs.len() - 1], outputs);
        c.bytes += inputs[inputs.len() - 1].bytes() as f64;
        c
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        self.gemm
            .launch(&gemm_io(io, self.gemm.n_inputs()), &self.extras(io)?)
    }

    fn sm90a_fallback(&self, io: &LaunchIo) -> Result<Option<String>> {
        self.gemm
            .sm90a_fallback_with(&gemm_io(io, self.gemm.n_inputs()), &self.extras(io)?)
    }
}

impl GemmFilm {
    /// The FiLM epilogue's extras (after checking the inputs).
    fn extras(&self, io: &LaunchIo) -> Result<Extras> {
        let descs: Vec<&TensorDesc> = io.inputs.iter().map(|t| t.desc).collect();
        self.infer(&descs)?;
        let (m, _) = rows_channels(self.name(), &descs[0].shape)?;
        let samples = descs[descs.len() - 1].shape[0];
        Ok(Extras {
            rows_per_sample: m / samples,
            film: io.inputs[io.inputs.len() - 1].ptr,
            film_k: self.k,
            ..Extras::default()
        })
    }
}

/// GlobalResponseNorm's statistics fused into the GEMM that makes its input (a ResBlock's
/// first MLP GEMM): outputs the GEMM result `y` and f32 `sumsq [B, N]`, Σ over each sample's
/// rows of y² (of the stored values). A is `[B, rows, K]`.
#[derive(Clone, Debug, PartialEq)]
pub struct GemmGrnStats {
    pub gemm: Gemm,
}

impl OpImpl for GemmGrnStats {
    fn name(&self) -> &'static str {
        "gemm_grn_stats"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let y = self.gemm.infer(inputs)?.remove(0);
        let (b, _) = samples_of(self.name(), &inputs[0].shape)?;
        let n = y.0[y.0.len() - 1];
        Ok(vec![y, (vec![b, n], DType::F32)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        self.gemm.reference(inputs, &mut outputs[..1])?;
        let (y, ss) = outputs.split_at_mut(1);
        let n = ss[0].shape[1];
        let (b, _) = samples_of(self.name(), &inputs[0].shape)?;
        for (sample, acc_row) in y[0]
            .data
            .chunks_exact(y[0].data.len() / b)
            .zip(ss[0].data.chunks_exact_mut(n))
        {
            let acc = super::math::sums_of_squares(sample, n);
            for (o, a) in acc_row.iter_mut().zip(acc) {
                *o = a as f32;
            }
        }
        Ok(())
    }

    fn cost(&self, inputs: &[&TensorDesc], outputs: &[&TensorDesc]) -> Cost {
        self.gemm.cost(inputs, outputs)
    }

    /// The per-slab partial sums live in the workspace (the fused path).
    fn workspace_bytes(&self, inputs: &[&TensorDesc], _: KernelChoice) -> usize {
        match grn_slabs(self.name(), inputs) {
            Ok(Some((slabs, n))) => slabs * 2 * n * 4,
            _ => 0,
        }
    }

    /// Samples of at least one 64-row slab: GEMM1's epilogue writes per-slab sums, one small
    /// kernel adds each sample's slabs in order. Smaller samples (test shapes only): the plain
    /// GEMM, then the statistics from its stored output. Both are deterministic.
    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let descs: Vec<&TensorDesc> = io.inputs.iter().map(|t| t.desc).collect();
        self.infer(&descs)?;
        let op = self.name();
        let (b, rows_per_sample) = samples_of(op, &descs[0].shape)?;
        let (y, ss) = (io.outputs[0], io.outputs[1]);
        let n = ss.desc.shape[1];
        let gemm_io = gemm_io(io, self.gemm.n_inputs());
        let batch = to_i32(op, "samples", b)?;
        if batch > 65535 {
            return Err(Error::shape(op, format!("{b} samples exceed 65535")));
        }
        // (kernel, source, channels per block): both kernels have 256 threads.
        let tail = |kernel: &str, src: u64, per_block: usize| -> Result<Launch> {
            Ok(Launch {
                kernel: KernelId::lookup(kernel)?,
                grid: [ceil_div(n, per_block) as u32, batch as u32, 1],
                block: [256, 1, 1],
                smem: 0,
                args: Args::new()
                    .ptr(src)
                    .ptr(ss.ptr)
                    .u64(rows_per_sample as u64)
                    .i32(to_i32(op, "N", n)?),
            })
        };
        let mut launches = self.gemm.launch(&gemm_io, &self.extras(io)?)?;
        launches.push(match grn_slabs(op, &descs)? {
            Some(_) => tail("grn_reduce_partials", io.workspace, 256)?,
            None => tail(&format!("grn_sumsq_{}", y.desc.dtype.suffix()), y.ptr, 32)?,
        });
        Ok(launches)
    }

    fn sm90a_fallback(&self, io: &LaunchIo) -> Result<Option<String>> {
        self.gemm
            .sm90a_fallback_with(&gemm_io(io, self.gemm.n_inputs()), &self.extras(io)?)
    }
}

impl GemmGrnStats {
    /// The GEMM's extras: on the fused path (samples of at least one slab) the per-slab sums
    /// into the workspace; none otherwise.
    fn extras(&self, io: &LaunchIo) -> Result<Extras> {
        let descs: Vec<&TensorDesc> = io.inputs.iter().map(|t| t.desc).collect();
        let (_, rows_per_sample) = samples_of(self.name(), &descs[0].shape)?;
        Ok(match grn_slabs(self.name(), &descs)? {
            Some(_) => Extras {
                rows_per_sample,
                partials: io.workspace,
                ..Extras::default()
            },
            None => Extras::default(),
        })
    }
}

/// A GEMM whose A operand is modulated per sample and input channel:
/// `y = ((k + a[s, :])·A[s]) · Wᵀ + …` with `a` the first half of f32 `ab [B, 2K]` (the
/// [`GrnFromSumsq`](super::grn::GrnFromSumsq) output; its β half is not applied here — a
/// model folds W·β into the bias). Inputs: the GEMM's, then `ab`. A is `[B, rows, K]`.
#[derive(Clone, Debug, PartialEq)]
pub struct GemmScaledA {
    pub gemm: Gemm,
    pub k: f32,
}

impl OpImpl for GemmScaledA {
    fn name(&self) -> &'static str {
        "gemm_scaled_a"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let n = self.gemm.n_inputs();
        if inputs.len() != n + 1 {
            return Err(Error::shape(
                self.name(),
                format!("expected {} inputs, got {}", n + 1, inputs.len()),
            ));
        }
        let (b, _) = samples_of(self.name(), &inputs[0].shape)?;
        let k = inputs[0].shape[inputs[0].shape.len() - 1];
        let ab = inputs[n];
        if ab.shape != [b, 2 * k] || ab.dtype != DType::F32 {
            return Err(Error::shape(
                self.name(),
                format!(
                    "ab must be f32 [{b}, {}], got {:?} {:?}",
                    2 * k,
                    ab.dtype,
                    ab.shape
                ),
            ));
        }
        self.gemm.infer(&inputs[..n])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let n = self.gemm.n_inputs();
        let (a, ab) = (inputs[0], inputs[n]);
        let (b, _) = samples_of(self.name(), &a.shape)?;
        let k = a.shape[a.shape.len() - 1];
        let mut scaled = a.clone();
        let rows_per_sample = a.data.len() / b / k;
        scaled
            .data
            .par_chunks_exact_mut(k)
            .enumerate()
            .for_each(|(row, v)| {
                let m = &ab.data[row / rows_per_sample * 2 * k..][..k];
                for (v, &f) in v.iter_mut().zip(m) {
                    *v *= self.k + f;
                }
            });
        let mut gemm_in: Vec<&HostTensor> = inputs[..n].to_vec();
        gemm_in[0] = &scaled;
        self.gemm.reference(&gemm_in, outputs)
    }

    fn cost(&self, inputs: &[&TensorDesc], outputs: &[&TensorDesc]) -> Cost {
        self.gemm.cost(&inputs[..inputs.len() - 1], outputs)
    }

    /// With the Hopper kernels forced: room for the scaled A, which the Hopper GEMM reads
    /// after a scale pass (it has no A modulation of its own). Not under `auto`, whose
    /// tuned dispatch supplies its own scratch where it picks them.
    fn workspace_bytes(&self, inputs: &[&TensorDesc], kernels: KernelChoice) -> usize {
        match kernels {
            KernelChoice::Sm90a => inputs[0].bytes(),
            KernelChoice::Portable | KernelChoice::Auto => 0,
        }
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let descs: Vec<&TensorDesc> = io.inputs.iter().map(|t| t.desc).collect();
        self.infer(&descs)?;
        let (_, rows_per_sample) = samples_of(self.name(), &descs[0].shape)?;
        let n = self.gemm.n_inputs();
        if io.workspace != 0 && io.target.sm90a_allowed()? {
            // The scale pass (gemm_scale_a_bf16, the portable kernel's arithmetic) into the
            // workspace, then the Hopper GEMM on the scaled A, where it qualifies.
            let scaled = TensorDesc {
                name: "scaled A".into(),
                shape: descs[0].shape.clone(),
                dtype: DType::BF16,
                role: Role::Activation,
            };
            let (gemm_in, extras) = self.scaled_gemm(io, rows_per_sample);
            let gemm = self.gemm.launch(&gemm_in, &extras)?;
            if gemm.iter().all(super::gemm_sm90a::is_sm90a_gemm) {
                let mut launches = GemmScaleA { k: self.k }.launches(&LaunchIo {
                    inputs: vec![io.inputs[0], io.inputs[n]],
                    outputs: vec![DevTensor {
                        ptr: io.workspace,
                        desc: &scaled,
                    }],
                    workspace: 0,
                    target: io.target,
                })?;
                launches.extend(gemm);
                return Ok(launches);
            }
        }
        let extras = Extras {
            rows_per_sample,
            a_mod: io.inputs[io.inputs.len() - 1].ptr,
            a_k: self.k,
            ..Extras::default()
        };
        self.gemm
            .launch(&gemm_io(io, self.gemm.n_inputs()), &extras)
    }

    fn sm90a_fallback(&self, io: &LaunchIo) -> Result<Option<String>> {
        if !io.target.sm90a_allowed()? {
            return Ok(None);
        }
        if io.workspace == 0 {
            return Ok(Some(
                "no workspace for the scaled A (reserved where the sm_90a kernels are forced)"
                    .into(),
            ));
        }
        let descs: Vec<&TensorDesc> = io.inputs.iter().map(|t| t.desc).collect();
        let (_, rows_per_sample) = samples_of(self.name(), &descs[0].shape)?;
        let (gemm_in, extras) = self.scaled_gemm(io, rows_per_sample);
        self.gemm.sm90a_fallback_with(&gemm_in, &extras)
    }
}

impl GemmScaledA {
    /// The Hopper path's GEMM: on the scaled A in the workspace, without the A modulation.
    fn scaled_gemm<'a>(&self, io: &LaunchIo<'a>, rows_per_sample: usize) -> (LaunchIo<'a>, Extras) {
        let mut gemm_in = gemm_io(io, self.gemm.n_inputs());
        gemm_in.inputs[0].ptr = io.workspace;
        let extras = Extras {
            rows_per_sample,
            ..Extras::default()
        };
        (gemm_in, extras)
    }
}

/// Checks for `verify` and the emulator tests: M, N, K off the tile sizes, every epilogue.
pub fn checks(seed: u64, scale: Scale) -> Result<Vec<OpCheck>> {
    let mut shapes = vec![
        (1, 8, 8),
        (7, 37, 40),
        (37, 130, 72),
        (130, 200, 264),
        (1000, 24, 32),
    ];
    if scale == Scale::Gpu {
        shapes.extend([(2048, 2048, 2048), (1000, 4096, 1280), (18432, 2048, 2048)]);
    }
    let mut v = Vec::new();
    for (i, &(m, n, k)) in shapes.iter().enumerate() {
        for (j, &(bias, gelu, residual, out)) in [
            (false, false, false, DType::F32),
            (true, true, false, DType::BF16),
            (true, false, true, DType::F32),
            (true, true, true, DType::BF16),
        ]
        .iter()
        .enumerate()
        {
            let mut b = CheckBuilder::new(seed.wrapping_add((i * 4 + j) as u64));
            let mut ins = vec![
                b.input(&[m, k], DType::BF16, 1.0)?,
                b.weight(&[n, k], DType::BF16, 1.0)?,
            ];
            if bias {
                ins.push(b.weight(&[n], DType::F32, 1.0)?);
            }
            if residual {
                ins.push(b.input(&[m, n], out, 2.0)?);
            }
            let op = Gemm {
                bias,
                gelu,
                residual,
                out,
            };
            let y = b.graph.op1(op.clone(), &ins)?;
            let operands = Operands::of(&op, &ins, None);
            v.push(
                b.finish(
                    format!("gemm [{m},{k}]x[{n},{k}] bias={bias} gelu={gelu} residual={residual} ->{out:?}"),
                    &[y],
                    Tolerance::BOUND,
                )?
                .with_scale(move |c, r| vec![operands.bounds(c, &r[0], None).0]),
            );
            // The same GEMM with a FiLM epilogue, over samples that split the rows unevenly
            // across the 128-row tiles.
            if let Some(samples) = [37, 7, 5, 1]
                .into_iter()
                .find(|s| m % s == 0 && (j + i) % 2 == 0)
            {
                let mut b = CheckBuilder::new(seed.wrapping_add(1000 + (i * 4 + j) as u64));
                let mut ins = vec![
                    b.input(&[samples, m / samples, k], DType::BF16, 1.0)?,
                    b.weight(&[n, k], DType::BF16, 1.0)?,
                ];
                if bias {
                    ins.push(b.weight(&[n], DType::F32, 1.0)?);
                }
                if residual {
                    ins.push(b.input(&[samples, m / samples, n], out, 2.0)?);
                }
                ins.push(b.input(&[samples, 2 * n], DType::F32, 0.5)?);
                let gemm = Gemm {
                    bias,
                    gelu,
                    residual,
                    out,
                };
                let film_k = 1.0 + j as f32 % 2.0;
                let operands = Operands::of(&gemm, &ins, Some((film_k, ins[ins.len() - 1])));
                let y = b.graph.op1(GemmFilm { gemm, k: film_k }, &ins)?;
                v.push(
                    b.finish(
                        format!("gemm_film [{m},{k}]x[{n},{k}] samples={samples} bias={bias} gelu={gelu} residual={residual} ->{out:?}"),
                        &[y],
                        Tolerance::BOUND,
                    )?
                    .with_scale(move |c, r| vec![operands.bounds(c, &r[0], None).0]),
                );
            }
        }
    }
    v.extend(grn_pair_checks(seed ^ 0x5eed, scale)?);
    // The passes that complete a vendor GEMM (kernels/gemm_epilogue.cu).
    v.extend(super::gemm_epilogue::checks(seed ^ 0xe91, scale)?);
    Ok(v)
}

/// The ResBlock MLP with GRN across the GEMM pair: statistics from GEMM1's epilogue, the
/// modulation, GEMM2 on the modulated operand (+ bias, residual). (B, rows, C, hidden).
fn grn_pair_checks(seed: u64, scale: Scale) -> Result<Vec<OpCheck>> {
    // Samples below one 64-row slab take the unfused statistics; at or above it the fused
    // per-slab sums, with slabs inside one sample, across two, and a partial last tile.
    let mut shapes = vec![
        (1, 1, 8, 16),
        (2, 63, 24, 40),
        (3, 50, 16, 136),
        (2, 64, 16, 40),
        (3, 97, 24, 136),
        (1, 200, 8, 264),
    ];
    if scale == Scale::Gpu {
        shapes.push((2, 4096, 1280, 5120));
    }
    let mut v = Vec::new();
    for (i, &(b, rows, c, hidden)) in shapes.iter().enumerate() {
        for out in [DType::BF16, DType::F32] {
            let mut cb =
                CheckBuilder::new(seed.wrapping_add(i as u64 * 2 + (out == DType::F32) as u64));
            let x = cb.input(&[b, rows, c], DType::BF16, 1.0)?;
            let w1 = cb.weight(&[hidden, c], DType::BF16, 0.5)?;
            let b1 = cb.weight(&[hidden], DType::F32, 0.5)?;
            let gamma = cb.weight(&[hidden], DType::F32, 1.0)?;
            let beta = cb.weight(&[hidden], DType::F32, 1.0)?;
            let w2 = cb.weight(&[c, hidden], DType::BF16, 0.5)?;
            let b2 = cb.weight(&[c], DType::F32, 0.5)?;
            let residual = cb.input(&[b, rows, c], out, 1.0)?;
            let first = Gemm {
                bias: true,
                gelu: true,
                residual: false,
                out: DType::BF16,
            };
            let hs = cb.graph.op(
                GemmGrnStats {
                    gemm: first.clone(),
                },
                &[x, w1, b1],
            )?;
            let ab = cb.graph.op1(
                super::grn::GrnFromSumsq { eps: 1e-6 },
                &[hs[1], gamma, beta],
            )?;
            let second = Gemm {
                bias: true,
                gelu: false,
                residual: true,
                out,
            };
            let y = cb.graph.op1(
                GemmScaledA {
                    gemm: second.clone(),
                    k: 1.0,
                },
                &[hs[0], w2, b2, residual, ab],
            )?;
            let g1 = Operands::of(&first, &[x, w1, b1], None);
            let g2 = Operands::of(&second, &[hs[0], w2, b2, residual], None);
            v.push(
                cb.finish(
                    format!("gemm grn pair b{b} rows{rows} {c}->{hidden}->{c} ->{out:?}"),
                    &[hs[0], hs[1], ab, y],
                    Tolerance::BOUND,
                )?
                .with_scale(move |chk, r| grn_pair_bounds(chk, r, &g1, &g2, b)),
            );
        }
    }
    Ok(v)
}

/// The operands of one GEMM in a check (graph ids) and its epilogue, for its error bound.
#[derive(Clone)]
struct Operands {
    gemm: Gemm,
    a: TensorId,
    w: TensorId,
    bias: Option<TensorId>,
    residual: Option<TensorId>,
    /// FiLM k and `ab [samples, 2N]`.
    film: Option<(f32, TensorId)>,
}

impl Operands {
    fn of(gemm: &Gemm, ins: &[TensorId], film: Option<(f32, TensorId)>) -> Self {
        Operands {
            gemm: gemm.clone(),
            a: ins[0],
            w: ins[1],
            bias: gemm.bias.then(|| ins[2]),
            residual: gemm.residual.then(|| ins[2 + gemm.bias as usize]),
            film,
        }
    }

    /// Per-element bounds on |kernel − reference| of the GEMM's output `y` (the reference
    /// values), and per element the magnitude M of the pre-epilogue value (for users of the
    /// output). With `a` given, it replaces A's values (the modulated operand of a pair).
    ///
    /// - The products of bf16 values are exact; S = Σ_k|a·w| ≤ ‖a_row‖·‖w_col‖
    ///   (Cauchy–Schwarz, cheap at GPU size). The tensor cores' truncating f32 accumulation
    ///   errs by ≤ sum(K, 2⁻²³)·S (the emulator's sequential fmaf by less), the reference's
    ///   f64 sum by u·S when rounded.
    /// - The bias: 2u·(S + |b|) for the two sides' additions; v = sum + bias, |v| ≤ S + |b|.
    /// - GELU: |gelu′| ≤ 1.13 carries v's error; erff's 2 ulp (≤ 2u absolute on 1 + erf),
    ///   the argument's and three products' roundings add ≤ 5.5u·|v|.
    /// - The residual: 2u·(|v| + |r|); FiLM z·(k + a) + β: |k + a| times z's error plus
    ///   4u·(|z|·|k + a| + |β|); a bf16 store: U_BF16·(|y| + error).
    /// - A bf16 output with an epilogue admits a bf16 product before it: U_BF16·S more,
    ///   carried through the epilogue. That is the arithmetic of a vendor GEMM completed by
    ///   our epilogue pass with a product in the output's dtype (`tune`'s `bf16` pairs), and
    ///   of the official code, whose bf16 Linear rounds before its GELU and residual add.
    fn bounds(&self, c: &OpCheck, y: &[f32], a: Option<&[f32]>) -> (Vec<f32>, Vec<f32>) {
        use crate::verify::bound::{stored, sum, U, U_BF16, U_MMA};
        let a = a.unwrap_or_else(|| c.values(self.a));
        let w = c.values(self.w);
        let n = c.graph.desc(self.w).shape[0];
        let k = w.len() / n;
        let m = a.len() / k;
        let norms = |v: &[f32]| -> Vec<f64> {
            v.chunks_exact(k)
                .map(|r| r.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt())
                .collect()
        };
        let (na, nw) = (norms(a), norms(w));
        let bias = self.bias.map(|id| c.values(id));
        let res = self.residual.map(|id| c.values(id));
        let film = self.film.map(|(fk, id)| (fk, c.values(id)));
        let rows_per_sample = film.map_or(1, |(_, ab)| m / (ab.len() / (2 * n)));
        let acc = sum(k, U_MMA) + U;
        let bf16 = self.gemm.out == DType::BF16;
        let g = &self.gemm;
        let epilogue = g.bias || g.gelu || g.residual || self.film.is_some();
        let product_rounding = if bf16 && epilogue { U_BF16 } else { 0.0 };
        let mut out = vec![0f32; m * n];
        let mut mags = vec![0f32; m * n];
        let each = out.par_iter_mut().zip(mags.par_iter_mut()).enumerate();
        each.for_each(|(i, (o, mag))| {
            let (row, col) = (i / n, i % n);
            let s = na[row] * nw[col];
            let b = bias.map_or(0.0, |b| b[col].abs() as f64);
            let mut mv = s + b;
            let mut e = (acc + product_rounding) * s + 2.0 * U * mv;
            if self.gemm.gelu {
                e = 1.13 * e + 5.5 * U * mv;
            }
            if let Some(r) = res {
                let rv = r[i].abs() as f64;
                e += 2.0 * U * (mv + rv);
                mv += rv;
            }
            if let Some((fk, ab)) = film {
                let mo = &ab[row / rows_per_sample * 2 * n..][..2 * n];
                let scale = (fk + mo[col]).abs() as f64;
                let beta = mo[n + col].abs() as f64;
                e = scale * e + 4.0 * U * (mv * scale + beta);
                mv = mv * scale + beta;
            }
            *o = stored(e, y[i] as f64, bf16) as f32;
            *mag = mv as f32;
        });
        (out, mags)
    }
}

/// Bounds of the GRN pair's four outputs (hidden h, its sums of squares, the modulation ab,
/// the output y), each from the bounds of what it is computed from:
/// - h: [`Operands::bounds`] of the first GEMM (bf16 store included), e per element.
/// - Σh²: the kernel sums the stored values ĥ (|ĥ − h| ≤ e): Σ(2|h|·e + e²) over the rows,
///   plus the f32 sum of positive terms over ≤ rows/8 + 16 steps: sum(rows/8 + 16, u)·Σ(|h| +
///   e)², plus the reference's rounding.
/// - ab: a = γ·G/(mean G + eps), G = √Σh²: G errs relatively by half of Σh²'s relative
///   error + u (sqrtf), the mean by the largest of those + sum(D/256 + 8, u) (a block sum)
///   + 2u, a by both + 2u; the β half is a copy.
/// - y: the second GEMM on A′ = bf16(ĥ·(1 + â)): A′ errs by e·|1 + a| + |h|·Δa + u·|A′| +
///   U_BF16·|A′|, which reaches y through |W2| (≤ ‖ΔA′_row‖·‖w2_col‖), plus the second GEMM's
///   own bound.
fn grn_pair_bounds(
    c: &OpCheck,
    r: &[Vec<f32>],
    g1: &Operands,
    g2: &Operands,
    samples: usize,
) -> Vec<Vec<f32>> {
    use crate::verify::bound::{sum, U, U_BF16};
    let (h, ss, ab, y) = (&r[0], &r[1], &r[2], &r[3]);
    let d = ss.len() / samples;
    let rows = h.len() / d / samples;
    let (eh, _) = g1.bounds(c, h, None);
    // Σh² per (sample, channel).
    let mut ess = vec![0f32; ss.len()];
    ess.par_chunks_exact_mut(d)
        .enumerate()
        .for_each(|(smp, e_row)| {
            let (mut prop, mut mag) = (vec![0f64; d], vec![0f64; d]);
            for row in 0..rows {
                let at = (smp * rows + row) * d;
                for ch in 0..d {
                    let (hv, ev) = (h[at + ch].abs() as f64, eh[at + ch] as f64);
                    prop[ch] += 2.0 * hv * ev + ev * ev;
                    mag[ch] += (hv + ev) * (hv + ev);
                }
            }
            for (ch, e) in e_row.iter_mut().enumerate() {
                let own = sum(rows / 8 + 16, U) * mag[ch] + U * ss[smp * d + ch] as f64;
                *e = (prop[ch] + own) as f32;
            }
        });
    // ab = (a | β) per sample.
    let mut eab = vec![0f32; ab.len()];
    let mut rel_a = vec![0f64; ss.len()];
    for smp in 0..samples {
        let rel_g: Vec<f64> = (0..d)
            .map(|ch| {
                let (v, e) = (ss[smp * d + ch] as f64, ess[smp * d + ch] as f64);
                let rel = if v > 0.0 { e / v } else { 1.0 };
                0.5 * rel + U
            })
            .collect();
        let rel_mean = rel_g.iter().fold(0f64, |m, &v| m.max(v)) + sum(d / 256 + 8, U) + 2.0 * U;
        for ch in 0..d {
            let rel = rel_g[ch] + rel_mean + 2.0 * U;
            rel_a[smp * d + ch] = rel;
            let a = ab[smp * 2 * d + ch].abs() as f64;
            eab[smp * 2 * d + ch] = (rel * a + U * a) as f32;
        }
    }
    // A′ = h·(1 + a) per element, its bound, then y through W2.
    let mut a_mod = vec![0f32; h.len()];
    let mut ea = vec![0f32; h.len()];
    for (i, (am, e)) in a_mod.iter_mut().zip(ea.iter_mut()).enumerate() {
        let (smp, ch) = (i / (rows * d), i % d);
        let av = ab[smp * 2 * d + ch] as f64;
        let f = (1.0 + av).abs();
        let hv = h[i] as f64;
        let da = rel_a[smp * d + ch] * av.abs() + U * av.abs();
        let am_v = hv * (1.0 + av);
        *am = am_v as f32;
        *e = (eh[i] as f64 * f + hv.abs() * da + (U + U_BF16) * (am_v.abs() + eh[i] as f64 * f))
            as f32;
    }
    let (ey_own, _) = g2.bounds(c, y, Some(&a_mod));
    let w2 = c.values(g2.w);
    let n2 = w2.len() / d;
    let norm = |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let ea_norm: Vec<f64> = ea.chunks_exact(d).map(norm).collect();
    let w2_norm: Vec<f64> = w2.chunks_exact(d).map(norm).collect();
    // The own bound has its bf16 store already; the propagated part gets its share of it.
    let store = if g2.gemm.out == DType::BF16 {
        1.0 + U_BF16
    } else {
        1.0
    };
    let ey: Vec<f32> = ey_own
        .iter()
        .enumerate()
        .map(|(i, &e)| (e as f64 + store * ea_norm[i / n2] * w2_norm[i % n2]) as f32)
        .collect();
    vec![eh, ess, eab, ey]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::grn::{GrnFromSumsq, GrnModulation};
    use crate::ops::test_data::random;

    fn apply(op: &dyn OpImpl, inputs: &[&HostTensor], shapes: &[&[usize]]) -> Vec<HostTensor> {
        let mut outs: Vec<HostTensor> = shapes
            .iter()
            .map(|s| HostTensor::full(s, f32::NAN))
            .collect();
        op.reference(inputs, &mut outs).unwrap();
        outs
    }

    /// The blocked reference computes exactly the serial definition: one f64 dot product per
    /// element (k in order), rounded to f32, then bias, GELU and residual in f32.
    #[test]
    fn the_reference_is_the_serial_definition_bit_for_bit() {
        for (m, n, k) in [(7, 13, 37), (1, 1, 8), (9, 17, 64)] {
            let a = random(11, &[m, k], 1.0);
            let w = random(12, &[n, k], 1.0);
            let bias = random(13, &[n], 1.0);
            let res = random(14, &[m, n], 2.0);
            for (b, g, r) in [
                (false, false, false),
                (true, true, true),
                (true, false, true),
            ] {
                let mut got = vec![f32::NAN; m * n];
                let (bo, ro) = (b.then_some(&bias.data[..]), r.then_some(&res.data[..]));
                gemm_ref(&a.data, &w.data, bo, g, ro, (n, k), &mut got);
                for (i, &v) in got.iter().enumerate() {
                    let (row, col) = (i / n, i % n);
                    let dot: f64 = (0..k)
                        .map(|kk| a.data[row * k + kk] as f64 * w.data[col * k + kk] as f64)
                        .sum();
                    let mut want = dot as f32;
                    if b {
                        want += bias.data[col];
                    }
                    if g {
                        want = gelu_ref(want);
                    }
                    if r {
                        want += res.data[i];
                    }
                    assert_eq!(v.to_bits(), want.to_bits(), "[{m},{n},{k}] element {i}");
                }
            }
        }
    }

    /// The fused pair is GRN rewritten: W2·(h·(1 + γN) + β) + b2 = (h·(1 + a))·W2ᵀ + (b2 + W2·β).
    #[test]
    fn the_fused_grn_pair_equals_grn_then_film_then_gemm() {
        let (b, rows, c, hid) = (2, 5, 8, 16);
        let x = random(1, &[b, rows, c], 1.0);
        let (w1, b1) = (random(2, &[hid, c], 0.5), random(3, &[hid], 0.5));
        let (gamma, beta) = (random(4, &[hid], 1.0), random(5, &[hid], 1.0));
        let (w2, b2) = (random(6, &[c, hid], 0.5), random(7, &[c], 0.5));
        let res = random(8, &[b, rows, c], 1.0);
        let first = Gemm {
            bias: true,
            gelu: true,
            residual: false,
            out: DType::F32,
        };
        let second = Gemm {
            bias: true,
            gelu: false,
            residual: true,
            out: DType::F32,
        };

        let h = apply(&first, &[&x, &w1, &b1], &[&[b, rows, hid]]).remove(0);
        let ab = apply(
            &GrnModulation { eps: 1e-6 },
            &[&h, &gamma, &beta],
            &[&[b, 2 * hid]],
        )
        .remove(0);
        let film = Film {
            k: 1.0,
            out: DType::F32,
        };
        let hm = apply(&film, &[&h, &ab], &[&[b, rows, hid]]).remove(0);
        let want = apply(&second, &[&hm, &w2, &b2, &res], &[&[b, rows, c]]).remove(0);

        let hs = apply(
            &GemmGrnStats { gemm: first },
            &[&x, &w1, &b1],
            &[&[b, rows, hid], &[b, hid]],
        );
        let ab2 = apply(
            &GrnFromSumsq { eps: 1e-6 },
            &[&hs[1], &gamma, &beta],
            &[&[b, 2 * hid]],
        )
        .remove(0);
        let folded: Vec<f32> = (0..c)
            .map(|o| {
                b2.data[o]
                    + (0..hid)
                        .map(|j| w2.data[o * hid + j] * beta.data[j])
                        .sum::<f32>()
            })
            .collect();
        let b2f = HostTensor::new(vec![c], folded);
        let op = GemmScaledA {
            gemm: second,
            k: 1.0,
        };
        let got = apply(&op, &[&hs[0], &w2, &b2f, &res, &ab2], &[&[b, rows, c]]).remove(0);
        for (g, w) in got.data.iter().zip(&want.data) {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }
}
