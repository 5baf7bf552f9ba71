//! The GDF sampler both stages use (Stable Cascade's `gdf`): cosine schedule t → logSNR,
//! cosine-t noise condition (the `r` the models see), VP scalers, epsilon target, the DDPM
//! (= DDIM with η = 1) step, and classifier-free guidance with std rescaling.
//!
//! Every scalar is computed in f32 in the official order (transcendentals accurate), so the
//! host-side schedule matches the reference to a few ulps. The ops run on device in f32 in
//! every build: `CfgCombine` then `DdpmStep`, with the per-row coefficients of
//! [`StepCoefficients`] computed on the host.

use super::math::{accurate, linspace};
use super::rows_launch;
use super::{inputs_n, require_f32, Shaped};
use crate::runtime::abi::mirror_kernel_struct;
use crate::runtime::graph::{DevTensor, LaunchIo, OpImpl, OutSpec, TensorDesc};
use crate::runtime::kernel_choice::KernelChoice;
use crate::runtime::kernels::KernelId;
use crate::runtime::launch::{ceil_div, Args, Launch};
use crate::tensor::{DType, HostTensor};
use crate::verify::input_values;
use crate::verify::{seed_sequence, CheckBuilder, OpCheck, Scale, Tolerance};
use crate::{Error, Result};
use std::f32::consts::{FRAC_PI_2, PI};

/// The cosine schedule's offset s.
pub const COSINE_S: f32 = 0.008;
/// The schedule clamps ᾱ(t) to this range before taking the logit.
const VAR_RANGE: (f32, f32) = (1e-4, 0.9999);
/// Guards the rescale's division (`std(p) + 1e-9`).
const STD_EPS: f32 = 1e-9;
/// Threads per block of the CFG kernels.
const CFG_THREADS: usize = 256;
/// Group elements per `cfg_stats` block: each thread sums at least 16.
const CFG_STAT_ELEMS_PER_BLOCK: usize = CFG_THREADS * 16;
/// At most one statistics record per thread of a `cfg_apply` block, which merges them all.
const CFG_MAX_STAT_BLOCKS: usize = CFG_THREADS;
/// Group elements per `cfg_apply` block, and the most blocks per group: every block re-merges
/// the group's records, so blocks should not be tiny or too many.
const CFG_APPLY_ELEMS_PER_BLOCK: usize = CFG_THREADS * 4;
const CFG_MAX_APPLY_BLOCKS: usize = 1024;

/// v₀ = cos(s/(1+s)·π/2)², which normalizes ᾱ(0) to 1.
fn min_var() -> f32 {
    let s = COSINE_S;
    let c = accurate(f64::cos, s / (1.0 + s) * PI * 0.5);
    c * c
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + accurate(f64::exp, -x))
}

/// logSNR(t) before the clamp to the limits.
fn unclamped_logsnr(t: f32) -> f32 {
    let s = COSINE_S;
    let c = accurate(f64::cos, (s + t) / (1.0 + s) * PI * 0.5).clamp(0.0, 1.0);
    let var = (c * c / min_var()).clamp(VAR_RANGE.0, VAR_RANGE.1);
    accurate(f64::ln, var / (1.0 - var))
}

/// The schedule's limits [logSNR(1), logSNR(0)] ≈ [−9.210240, 9.210074]: every logSNR is
/// clamped to them.
pub fn logsnr_limits() -> (f32, f32) {
    (unclamped_logsnr(1.0), unclamped_logsnr(0.0))
}

/// The cosine schedule: t (clamped to [0, 1]) → logSNR (clamped to [`logsnr_limits`]).
pub fn logsnr(t: f32) -> f32 {
    shifted_logsnr(t, 1.0)
}

/// The cosine schedule with the official sampler's `shift` (GDF `BaseSchedule.__call__`):
/// logSNR(t) + 2·ln(1/shift), then clamped to the limits of the unshifted schedule (which
/// the official schedule computes once, at shift 1). Shift 1 is [`logsnr`] to the bit; the
/// ControlNet script samples Stage C at shift 2.
pub fn shifted_logsnr(t: f32, shift: f32) -> f32 {
    let (lo, hi) = logsnr_limits();
    let offset = (2.0 * (1.0 / shift as f64).ln()) as f32;
    (unclamped_logsnr(t.clamp(0.0, 1.0)) + offset).clamp(lo, hi)
}

/// The cosine-t noise condition: the `r` fed to the models for a logSNR. It inverts the
/// schedule where ᾱ was not clamped (so r(logSNR(1)) = 0.993583, not 1). Clamped to [0, 1]
/// like the official `BaseNoiseCond` (`tests/cases/README.md` omits this clamp; it only catches
/// rounding).
pub fn noise_cond(logsnr: f32) -> f32 {
    let s = COSINE_S;
    let var = sigmoid(logsnr).clamp(0.0, 1.0);
    let t = accurate(f64::acos, (var * min_var()).sqrt()) / FRAC_PI_2 * (1.0 + s) - s;
    t.clamp(0.0, 1.0)
}

/// The VP scalers (a, b) = (√σ(logSNR), √(1 − σ(logSNR))): x_t = a·x0 + b·ε.
pub fn scalers(logsnr: f32) -> (f32, f32) {
    let a2 = sigmoid(logsnr);
    (a2.sqrt(), (1.0 - a2).sqrt())
}

/// The DDPM noise level σ = √(b′²/b²)·√(1 − a²/a′²) of a step from (a, b) to (a′, b′). NaN
/// when the step goes towards more noise (a > a′).
pub fn ddpm_sigma(a: f32, b: f32, a_prev: f32, b_prev: f32) -> f32 {
    (b_prev * b_prev / (b * b)).sqrt() * (1.0 - a * a / (a_prev * a_prev)).sqrt()
}

/// The sampler's time grid: `torch.linspace(1, 0, n + 1)` in f32 (t_start 1, t_end 0, no
/// shift). Step k evaluates the model at t_k and moves to t_{k+1}.
pub fn timesteps(n: usize) -> Vec<f32> {
    linspace(1.0, 0.0, n + 1)
}

/// The per-row coefficients of one sampler step from t to t_prev: the scalers at both ends
/// and the noise level σ. One row of [`DdpmStep`]'s `coef` input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepCoefficients {
    pub a: f32,
    pub b: f32,
    pub a_prev: f32,
    pub b_prev: f32,
    pub sigma: f32,
}

impl StepCoefficients {
    fn deterministic(t: f32, t_prev: f32, shift: f32) -> Self {
        let (a, b) = scalers(shifted_logsnr(t, shift));
        let (a_prev, b_prev) = scalers(shifted_logsnr(t_prev, shift));
        StepCoefficients {
            a,
            b,
            a_prev,
            b_prev,
            sigma: 0.0,
        }
    }

    /// The DDPM step (DDIM with η = 1) the pipelines use. t_prev must not exceed t.
    pub fn ddpm(t: f32, t_prev: f32) -> Result<Self> {
        Self::ddpm_shifted(t, t_prev, 1.0)
    }

    /// [`StepCoefficients::ddpm`] on the schedule with `shift` ([`shifted_logsnr`]).
    pub fn ddpm_shifted(t: f32, t_prev: f32, shift: f32) -> Result<Self> {
        let c = Self::deterministic(t, t_prev, shift);
        let sigma = ddpm_sigma(c.a, c.b, c.a_prev, c.b_prev);
        if !sigma.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "DDPM step from t = {t} to t_prev = {t_prev}: t_prev must not be later than t"
            )));
        }
        Ok(StepCoefficients { sigma, ..c })
    }

    /// The deterministic DDIM step (η = 0, σ = 0).
    pub fn ddim(t: f32, t_prev: f32) -> Self {
        Self::deterministic(t, t_prev, 1.0)
    }

    /// (a, b, a′, b′, σ): the layout of a `coef` row.
    pub fn row(&self) -> [f32; 5] {
        [self.a, self.b, self.a_prev, self.b_prev, self.sigma]
    }
}

/// `torch.lerp(start, end, w)` on the CPU: fused multiply-add, from the nearer end.
fn lerp(start: f32, end: f32, w: f32) -> f32 {
    let diff = end - start;
    if w.abs() < 0.5 {
        w.mul_add(diff, start)
    } else {
        (w - 1.0).mul_add(diff, end)
    }
}

/// Unbiased (N − 1) standard deviation, two-pass in f64.
fn std_unbiased(v: &[f32]) -> f32 {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let ss = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>();
    (ss / (n - 1.0)).sqrt() as f32
}

/// Classifier-free guidance with std rescaling. Input `pred [2B, …]`: the conditional rows,
/// then the unconditional ones. Output f32 `[B, …]`:
/// p = lerp(u, c, cfg) = u + cfg·(c − u), then if rho > 0:
/// rho·(p·std(c)/(std(p) + 1e-9)) + (1 − rho)·p, with the unbiased std over the whole
/// half-batch (`per_sample = false`: the official semantics, which couples the samples) or
/// over each sample's elements (`per_sample = true`: B = 1 semantics for every sample).
#[derive(Clone, Debug, PartialEq)]
pub struct CfgCombine {
    pub cfg: f32,
    pub rho: f32,
    pub per_sample: bool,
}

impl CfgCombine {
    /// (B, elements per sample).
    fn dims<T: Shaped>(&self, ins: &[&T]) -> Result<(usize, usize)> {
        let op = self.name();
        let [pred] = inputs_n(op, ins)?;
        let shape = pred.shape();
        if !self.cfg.is_finite() || !self.rho.is_finite() || self.rho < 0.0 {
            return Err(Error::shape(
                op,
                format!(
                    "cfg must be finite and rho finite and ≥ 0, got cfg {} rho {}",
                    self.cfg, self.rho
                ),
            ));
        }
        let per: usize = shape.iter().skip(1).product();
        let rows = shape.first().copied().unwrap_or(0);
        if rows == 0 || rows % 2 != 0 || per == 0 {
            return Err(Error::shape(
                op,
                format!("pred must be a non-empty [2B, …] (cond rows, then uncond), got {shape:?}"),
            ));
        }
        let b = rows / 2;
        let group = if self.per_sample { per } else { b * per };
        if self.rho > 0.0 && group < 2 {
            return Err(Error::shape(
                op,
                format!("the rescale's unbiased std needs at least 2 elements, got {group}"),
            ));
        }
        Ok((b, per))
    }

    /// Elements per rescale group: one sample, or the whole half-batch.
    fn group_len(&self, b: usize, per: usize) -> usize {
        if self.per_sample {
            per
        } else {
            b * per
        }
    }

    /// (1 − rho) is a Python double in the official code, rounded to f32 by torch.
    fn keep(&self) -> f32 {
        (1.0 - self.rho as f64) as f32
    }

    /// Blocks per group of `cfg_stats` (0 without rescale: no statistics).
    fn stat_blocks(&self, group_len: usize) -> usize {
        if self.rho > 0.0 {
            ceil_div(group_len, CFG_STAT_ELEMS_PER_BLOCK).clamp(1, CFG_MAX_STAT_BLOCKS)
        } else {
            0
        }
    }
}

impl OpImpl for CfgCombine {
    fn name(&self) -> &'static str {
        "cfg_combine"
    }

    /// The statistics records of `cfg_stats`: 5 f32 per block and group.
    fn workspace_bytes(&self, inputs: &[&TensorDesc], _: KernelChoice) -> usize {
        self.dims(inputs).map_or(0, |(b, per)| {
            let len = self.group_len(b, per);
            b * per / len * self.stat_blocks(len) * 5 * 4
        })
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let (b, _) = self.dims(inputs)?;
        let mut shape = inputs[0].shape.clone();
        shape[0] = b;
        Ok(vec![(shape, DType::F32)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let (b, per) = self.dims(inputs)?;
        let (cond, uncond) = inputs[0].data.split_at(b * per);
        let out = &mut outputs[0].data;
        for ((o, &c), &u) in out.iter_mut().zip(cond).zip(uncond) {
            *o = lerp(u, c, self.cfg);
        }
        if self.rho > 0.0 {
            let (group, keep) = (self.group_len(b, per), self.keep());
            for (p, c) in out.chunks_mut(group).zip(cond.chunks(group)) {
                let (std_c, std_p) = (std_unbiased(c), std_unbiased(p) + STD_EPS);
                for v in p {
                    *v = self.rho * (*v * std_c / std_p) + *v * keep;
                }
            }
        }
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        self.launch(io, io.outputs[0].ptr, None)
    }
}

/// The device pointers of a step fused onto CFG's apply pass: x, noise, coef, x0, x_next.
type StepPtrs = [u64; 5];

/// The parameters of `cfg_apply_*`: `struct CfgApplyParams` of kernels/sampler.cu, whose
/// comments say what each field is. Device pointers are addresses, 0 for null.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CfgApplyParams {
    pub pred: u64,
    pub parts: u64,
    pub y: u64,
    pub x: u64,
    pub noise: u64,
    pub coef: u64,
    pub x0: u64,
    pub next: u64,
    pub group_len: i64,
    pub half: i64,
    pub per: i64,
    pub n_parts: i32,
    pub cfg: f32,
    pub rho: f32,
    pub keep: f32,
}
mirror_kernel_struct!(CfgApplyParams);

impl CfgCombine {
    /// The statistics (when rescaling) and apply launches, writing the guided prediction to
    /// `y` and, with `step`, taking the sampler step on it.
    fn launch(&self, io: &LaunchIo, y: u64, step: Option<StepPtrs>) -> Result<Vec<Launch>> {
        let pred = io.inputs[0];
        let (b, per) = self.dims(&[pred.desc])?;
        let len = self.group_len(b, per);
        let groups = b * per / len;
        if groups > 65535 {
            return Err(Error::shape(
                self.name(),
                format!("{groups} rescale groups exceed the kernel's 65535 (grid y)"),
            ));
        }
        let dt = pred.desc.dtype.suffix();
        let (parts, half) = (self.stat_blocks(len), (b * per) as u64);
        let block = [CFG_THREADS as u32, 1, 1];
        let [x, noise, coef, x0, next] = step.unwrap_or_default();
        let mut launches = Vec::new();
        if parts > 0 {
            launches.push(Launch {
                kernel: KernelId::lookup(&format!("cfg_stats_{dt}"))?,
                grid: [parts as u32, groups as u32, 1],
                block,
                smem: 0,
                args: Args::new()
                    .ptr(pred.ptr)
                    .ptr(io.workspace)
                    .u64(len as u64)
                    .u64(half)
                    .f32(self.cfg),
            });
        }
        let apply_blocks = ceil_div(len, CFG_APPLY_ELEMS_PER_BLOCK).clamp(1, CFG_MAX_APPLY_BLOCKS);
        launches.push(Launch {
            kernel: KernelId::lookup(&format!("cfg_apply_{dt}"))?,
            grid: [apply_blocks as u32, groups as u32, 1],
            block,
            smem: 0,
            args: Args::new().by_value(&CfgApplyParams {
                pred: pred.ptr,
                parts: if parts > 0 { io.workspace } else { 0 },
                y,
                x,
                noise,
                coef,
                x0,
                next,
                group_len: len as i64,
                half: half as i64,
                per: per as i64,
                n_parts: parts as i32,
                cfg: self.cfg,
                rho: self.rho,
                keep: self.keep(),
            }),
        });
        Ok(launches)
    }
}

/// One whole sampler iteration after the model: [`CfgCombine`] on `pred [2B, …]`, then
/// [`DdpmStep`] with the guided prediction as eps, in two launches (the step rides on CFG's
/// apply pass). Inputs `pred`, f32 `x`, `noise` `[B, …]`, `coef [B, 5]`; outputs f32 `x0`,
/// `x_next`, and the guided prediction.
#[derive(Clone, Debug, PartialEq)]
pub struct GuidedStep {
    pub guidance: CfgCombine,
}

impl OpImpl for GuidedStep {
    fn name(&self) -> &'static str {
        "guided_step"
    }

    fn workspace_bytes(&self, inputs: &[&TensorDesc], kernels: KernelChoice) -> usize {
        self.guidance.workspace_bytes(&inputs[..1], kernels)
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let [pred, x, noise, coef] = inputs_n(self.name(), inputs)?;
        let (y_shape, _) = self.guidance.infer(&[pred])?.remove(0);
        let y = TensorDesc {
            name: "guided prediction".into(),
            shape: y_shape.clone(),
            dtype: DType::F32,
            role: pred.role,
        };
        let mut outs = DdpmStep.infer(&[x, &y, noise, coef])?;
        for (what, t) in [("x", x), ("noise", noise)] {
            require_f32(self.name(), what, t)?;
        }
        outs.push((y_shape, DType::F32));
        Ok(outs)
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let (steps, guided) = outputs.split_at_mut(2);
        self.guidance.reference(&inputs[..1], guided)?;
        DdpmStep.reference(&[inputs[1], &guided[0], inputs[2], inputs[3]], steps)
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let ptr = |t: &DevTensor| t.ptr;
        let step = [
            ptr(&io.inputs[1]),
            ptr(&io.inputs[2]),
            ptr(&io.inputs[3]),
            ptr(&io.outputs[0]),
            ptr(&io.outputs[1]),
        ];
        let cfg_io = LaunchIo {
            inputs: io.inputs[..1].to_vec(),
            outputs: Vec::new(),
            workspace: io.workspace,
            target: io.target,
        };
        self.guidance.launch(&cfg_io, io.outputs[2].ptr, Some(step))
    }
}

/// One sampler step per batch row. Inputs `x`, `eps` (the guided prediction), `noise`, all
/// `[B, …]`, and f32 `coef [B, 5]` = (a, b, a′, b′, σ) per row ([`StepCoefficients::row`]).
/// Outputs f32: `x0 = (x − b·eps)/a` and `x_next = a′·x0 + √(b′² − σ²)·eps + σ·noise`
/// (σ = 0 makes it the DDIM step).
#[derive(Clone, Debug, PartialEq)]
pub struct DdpmStep;

impl DdpmStep {
    /// (B, elements per sample).
    fn dims<T: Shaped>(&self, ins: &[&T]) -> Result<(usize, usize)> {
        let op = self.name();
        let [x, eps, noise, coef] = inputs_n(op, ins)?;
        let shape = x.shape();
        let b = shape.first().copied().unwrap_or(0);
        let per: usize = shape.iter().skip(1).product();
        if b == 0 || per == 0 {
            return Err(Error::shape(
                op,
                format!("x must be a non-empty [B, …], got {shape:?}"),
            ));
        }
        for (what, t) in [("eps", eps), ("noise", noise)] {
            if t.shape() != shape {
                return Err(Error::shape(
                    op,
                    format!("{what} must have x's shape {shape:?}, got {:?}", t.shape()),
                ));
            }
        }
        if coef.shape() != [b, 5] {
            return Err(Error::shape(
                op,
                format!(
                    "coef must be [{b}, 5] (a, b, a′, b′, σ per row), got {:?}",
                    coef.shape()
                ),
            ));
        }
        Ok((b, per))
    }
}

impl OpImpl for DdpmStep {
    fn name(&self) -> &'static str {
        "ddpm_step"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        self.dims(inputs)?;
        require_f32(self.name(), "coef", inputs[3])?;
        let shape = inputs[0].shape.clone();
        Ok(vec![(shape.clone(), DType::F32), (shape, DType::F32)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let (_, per) = self.dims(inputs)?;
        let [x, eps, noise, coef] = [0, 1, 2, 3].map(|i| inputs[i].data.as_slice());
        let [x0_out, next_out] = outputs else {
            return Err(Error::shape(self.name(), "expects two output buffers"));
        };
        let rows = x0_out
            .data
            .chunks_exact_mut(per)
            .zip(next_out.data.chunks_exact_mut(per))
            .zip(coef.chunks_exact(5));
        for (row, ((x0r, nextr), c)) in rows.enumerate() {
            let (a, b, a_prev, b_prev, sigma) = (c[0], c[1], c[2], c[3], c[4]);
            let eps_scale = (b_prev * b_prev - sigma * sigma).sqrt();
            let at = |t: &[f32], i: usize| t[row * per + i];
            for (i, (x0, next)) in x0r.iter_mut().zip(nextr.iter_mut()).enumerate() {
                let e = at(eps, i);
                *x0 = (at(x, i) - e * b) / a;
                *next = a_prev * *x0 + eps_scale * e + sigma * at(noise, i);
            }
        }
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let descs: Vec<&TensorDesc> = io.inputs.iter().map(|t| t.desc).collect();
        let (b, per) = self.dims(&descs)?;
        for (what, t) in [("x", descs[0]), ("noise", descs[2]), ("coef", descs[3])] {
            require_f32(self.name(), what, t)?;
        }
        // The kernel's pointers in order: x, eps, noise, coef, x0, x_next.
        let args = io
            .inputs
            .iter()
            .chain(&io.outputs)
            .fold(Args::new(), |a, t| a.ptr(t.ptr))
            .u64(b as u64)
            .u64(per as u64);
        let name = format!("ddpm_step_{}", descs[1].dtype.suffix());
        Ok(vec![rows_launch(&name, b, per, args)?])
    }
}

/// Checks for `verify` and the emulator tests: CFG with and without rescale, batch-wide and
/// per-sample statistics over groups from 3 elements to several statistics blocks; DDPM and
/// DDIM steps with per-row coefficients of real schedule steps; f32 and bf16 predictions.
pub fn checks(seed: u64, scale: Scale) -> Result<Vec<OpCheck>> {
    let (f, h) = (DType::F32, DType::BF16);
    // (pred shape [2B, …], dtype, cfg, rho, per_sample)
    let mut cfgs: Vec<(&[usize], DType, f32, f32, bool)> = vec![
        (&[2, 7, 5, 3], f, 4.0, 0.7, false),
        (&[6, 37, 3], h, 1.1, 0.7, true),
        (&[6, 37, 3], f, 4.0, 0.0, false),
        (&[2, 3], h, 4.0, 0.7, false),
        (&[4, 16, 24, 24], h, 4.0, 0.7, false),
        (&[4, 16, 24, 24], f, 7.5, 0.7, true),
        (&[2, 1000], h, 0.3, 0.0, true),
    ];
    // (x shape [B, …], eps dtype, DDPM rather than DDIM)
    let mut steps: Vec<(&[usize], DType, bool)> = vec![
        (&[5, 16, 3, 5], f, true),
        (&[3, 4, 7, 9], h, false),
        (&[1, 1], f, true),
        (&[2, 1000], h, true),
    ];
    if scale == Scale::Gpu {
        cfgs.extend([
            (&[4, 16, 128, 128][..], f, 4.0, 0.7, false),
            (&[4, 4, 256, 256], h, 1.1, 0.7, true),
        ]);
        steps.push((&[2, 16, 128, 128], f, true));
    }
    let mut v = Vec::new();
    let mut next = seed_sequence(seed);
    // Both tolerances are bounds computed per element: see `cfg_bounds` and `step_bounds`.
    for (shape, dt, cfg, rho, per_sample) in cfgs {
        let mut b = CheckBuilder::new(next());
        let pred = b.input(shape, dt, 2.0)?;
        let op = CfgCombine {
            cfg,
            rho,
            per_sample,
        };
        let y = b.graph.op1(op.clone(), &[pred])?;
        let name =
            format!("cfg_combine {shape:?} {dt:?} cfg {cfg} rho {rho} per_sample {per_sample}");
        let check = b.finish(name, &[y], Tolerance::BOUND)?;
        let per = shape[1..].iter().product();
        v.push(check.with_scale(move |c, _| vec![cfg_bounds(&op, per, c.values(pred))]));
    }
    let (t, t_prev) = ([1.0, 0.9, 0.55, 0.1, 0.05], [0.95, 0.8, 0.5, 0.05, 0.0]);
    for (shape, dt, ddpm) in steps {
        let mut b = CheckBuilder::new(next());
        let x = b.input(shape, f, 1.0)?;
        let eps = b.input(shape, dt, 1.0)?;
        let noise = b.input(shape, f, 1.0)?;
        let coef = b.input(&[shape[0], 5], f, 1.0)?;
        let outs = b.graph.op(DdpmStep, &[x, eps, noise, coef])?;
        let name = format!("ddpm_step {shape:?} eps {dt:?} ddpm {ddpm}");
        let mut check = b
            .finish(name, &outs, Tolerance::BOUND)?
            .with_scale(move |c, _| {
                let [x, e, n, k] = [x, eps, noise, coef].map(|id| c.values(id));
                let (x0, next) = step_bounds(x, e, n, k, None);
                vec![x0, next]
            });
        let rows = (0..shape[0]).map(|r| {
            let (tr, tp) = (t[r % t.len()], t_prev[r % t.len()]);
            let c = if ddpm {
                StepCoefficients::ddpm(tr, tp)
            } else {
                Ok(StepCoefficients::ddim(tr, tp))
            };
            c.map(|c| c.row())
        });
        *input_values(&mut check, coef) = rows.collect::<Result<Vec<_>>>()?.concat();
        v.push(check);
    }
    // The fused iteration (CFG, rescale, step in the apply pass): groups across and within
    // samples, without rescale, bf16 and f32 predictions.
    let fused: [(&[usize], DType, f32, bool); 4] = [
        (&[2, 7, 5, 3], f, 0.7, false),
        (&[6, 37, 3], h, 0.7, true),
        (&[4, 16, 9, 11], h, 0.7, false),
        (&[2, 1000], f, 0.0, false),
    ];
    for (shape, dt, rho, per_sample) in fused {
        let mut b = CheckBuilder::new(next());
        let pred = b.input(shape, dt, 2.0)?;
        let half: Vec<usize> = std::iter::once(shape[0] / 2)
            .chain(shape[1..].iter().copied())
            .collect();
        let x = b.input(&half, f, 1.0)?;
        let noise = b.input(&half, f, 1.0)?;
        let coef = b.input(&[half[0], 5], f, 1.0)?;
        let guidance = CfgCombine {
            cfg: 4.0,
            rho,
            per_sample,
        };
        let op = GuidedStep {
            guidance: guidance.clone(),
        };
        let outs = b.graph.op(op, &[pred, x, noise, coef])?;
        let name = format!("guided_step {shape:?} {dt:?} rho {rho} per_sample {per_sample}");
        let check = b.finish(name, &outs, Tolerance::BOUND)?;
        // The step takes the guided prediction as eps: its error propagates into x0, x_next.
        let per = shape[1..].iter().product();
        let mut check = check.with_scale(move |c, r| {
            let dy = cfg_bounds(&guidance, per, c.values(pred));
            let [x, n, k] = [x, noise, coef].map(|id| c.values(id));
            let (x0, next) = step_bounds(x, &r[2], n, k, Some(&dy));
            vec![x0, next, dy]
        });
        let rows =
            (0..half[0]).map(|r| StepCoefficients::ddpm(t[r % 5], t_prev[r % 5]).map(|c| c.row()));
        *input_values(&mut check, coef) = rows.collect::<Result<Vec<_>>>()?.concat();
        v.push(check);
    }
    Ok(v)
}

/// Per-element bounds on |kernel − reference| of [`DdpmStep`]'s (x0, x_next), both sides
/// evaluating the same f32 formulas (either may fuse multiply-adds), from the magnitudes of
/// the terms rather than of the results: x0 = (x − b·eps)/a cancels when x ≈ b·eps.
/// - x0: each side rounds b·eps, the difference and the quotient: ≤ 3u·m₀ with
///   m₀ = (|x| + |b·eps|)/a ≥ |x0|, so the sides differ by ≤ 6u·m₀ (7u: second order).
/// - s = √(b′² − σ²) cancels too (b′ ≈ σ in early DDPM steps): the radicands differ by
///   ≤ 4u·(b′² + σ²), so s by ≤ min(2u·(b′² + σ²)/s, √(4u·(b′² + σ²))) + 2u·s.
/// - x_next = a′·x0 + s·eps + σ·noise: 3u·(a′·m₀ + s·|eps| + σ·|noise|) per side, plus a′
///   times x0's bound and |eps| times s's.
///
/// `d_eps`: a bound on eps's own error (the guided prediction of [`GuidedStep`]), which
/// enters x0 as b/a·d and x_next as at most (a′·b/a + s)·d.
fn step_bounds(
    x: &[f32],
    eps: &[f32],
    noise: &[f32],
    coef: &[f32],
    d_eps: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>) {
    use crate::verify::bound::U;
    let per = x.len() / (coef.len() / 5);
    let (mut b0, mut b1) = (vec![0f32; x.len()], vec![0f32; x.len()]);
    for (i, (o0, o1)) in b0.iter_mut().zip(b1.iter_mut()).enumerate() {
        let c = &coef[i / per * 5..][..5];
        let [a, b, a_prev, b_prev, sigma] = [0, 1, 2, 3, 4].map(|j| c[j].abs() as f64);
        let (xv, e, n) = (
            x[i].abs() as f64,
            eps[i].abs() as f64,
            noise[i].abs() as f64,
        );
        let d = d_eps.map_or(0.0, |d| d[i] as f64);
        let m0 = (xv + b * e) / a;
        let dx0 = 7.0 * U * m0 + b / a * d;
        let rad = b_prev * b_prev + sigma * sigma;
        let s = (c[3] * c[3] - c[4] * c[4]).max(0.0).sqrt() as f64;
        let ds_cancel = (4.0 * U * rad).sqrt();
        let ds = if s > 0.0 {
            (2.0 * U * rad / s).min(ds_cancel)
        } else {
            ds_cancel
        } + 2.0 * U * s;
        let dnext = a_prev * dx0
            + e * ds
            + 7.0 * U * (a_prev * m0 + s * e + sigma * n)
            + (a_prev * b / a + s) * d;
        (*o0, *o1) = (dx0 as f32, dnext as f32);
    }
    (b0, b1)
}

/// Per-element bounds on |kernel − reference| of [`CfgCombine`]'s output y. The lerp is the
/// same f32 fma sequence on both sides (bit-identical p); y = p·(ρ·σ_c/(σ_p + 1e-9) + keep):
/// the first term errs relatively by (rel. error of σ_c) + (of σ_p), and four roundings a
/// side add 8u·|p|·(ρ·σ_c/σ_p + |keep|). The kernel's σ (f32): per-thread shifted sums over n_t ≤ ⌈len/(256·P)⌉
/// elements err by ≤ 3(n_t + 1)·u·Σ(v − v₀)² ≤ 6(n_t + 1)·u·M2·(1 + R) with R =
/// max(v − μ)²/σ² over the group (the shift v₀ is one of the group's values), and each of
/// the ≤ 16 Chan merge levels (warp, block, records) by ≤ 6u·M2·(1 + μ²/σ²) (the mean
/// difference term); σ = √(M2/(n − 1)) halves that and adds 2u. The reference is f64.
fn cfg_bounds(op: &CfgCombine, per: usize, pred: &[f32]) -> Vec<f32> {
    use crate::verify::bound::U;
    let half = pred.len() / 2;
    let group = if op.per_sample { per } else { half };
    let n_t = group.div_ceil(CFG_THREADS * op.stat_blocks(group).max(1)) as f64;
    let mut out = vec![0f32; half];
    if op.rho == 0.0 {
        // p alone: bit-identical on both sides.
        return out;
    }
    // (σ unbiased, bound on σ's relative error) of a group's values.
    let sigma = |v: &[f64]| -> (f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        if var == 0.0 {
            return (0.0, 0.0);
        }
        let r = v.iter().map(|x| (x - mean).powi(2)).fold(0f64, f64::max) / var;
        let rel_m2 = 6.0 * (n_t + 1.0) * U * (1.0 + r) + 16.0 * 6.0 * U * (1.0 + mean * mean / var);
        ((var * n / (n - 1.0)).sqrt(), 0.5 * rel_m2 + 2.0 * U)
    };
    let keep = op.keep().abs() as f64;
    let (cond, uncond) = pred.split_at(half);
    for (g, (c, u)) in cond.chunks(group).zip(uncond.chunks(group)).enumerate() {
        let cv: Vec<f64> = c.iter().map(|&v| v as f64).collect();
        let pv: Vec<f64> = c
            .iter()
            .zip(u)
            .map(|(&c, &u)| lerp(u, c, op.cfg) as f64)
            .collect();
        let ((sc, rc), (sp, rp)) = (sigma(&cv), sigma(&pv));
        // y = p·(ρ·σ_c/σ_p + keep): the σ errors scale the first term only.
        let factor = op.rho as f64 * sc / (sp + STD_EPS as f64);
        for (o, &p) in out[g * group..][..c.len()].iter_mut().zip(&pv) {
            let p = p.abs();
            *o = (p * factor * (rc + rp) + 8.0 * U * p * (factor + keep)) as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_data;
    use crate::ops::test_support::{desc, run};

    fn close(got: f32, want: f64, tol: f64) -> bool {
        (got as f64 - want).abs() <= tol
    }

    /// Runs [`DdpmStep`]'s reference; returns (x0, x_next).
    fn step(
        x: &HostTensor,
        eps: &HostTensor,
        noise: &HostTensor,
        coef: &HostTensor,
    ) -> (Vec<f32>, Vec<f32>) {
        let ins = [x, eps, noise, coef];
        let descs: Vec<_> = ins.iter().map(|t| desc(&t.shape, DType::F32)).collect();
        let specs = DdpmStep.infer(&descs.iter().collect::<Vec<_>>()).unwrap();
        let mut outs: Vec<_> = specs
            .iter()
            .map(|(s, _)| HostTensor::full(s, f32::NAN))
            .collect();
        DdpmStep.reference(&ins, &mut outs).unwrap();
        let next = outs.pop().unwrap().data;
        (outs.pop().unwrap().data, next)
    }

    fn coef_rows(r: &[f32], r_prev: &[f32], ddpm: bool) -> HostTensor {
        let data = r
            .iter()
            .zip(r_prev)
            .flat_map(|(&t, &tp)| {
                let c = if ddpm {
                    StepCoefficients::ddpm(t, tp).unwrap()
                } else {
                    StepCoefficients::ddim(t, tp)
                };
                c.row()
            })
            .collect();
        HostTensor::new(vec![r.len(), 5], data)
    }

    #[test]
    fn matches_the_sampler_step_case() {
        let (t, meta) = test_data::load("sampler_step");
        let (lo, hi) = logsnr_limits();
        let limits: Vec<f32> = serde_json::from_str(&meta["schedule_limits"]).unwrap();
        assert_eq!(vec![lo, hi], limits, "schedule limits");

        let (r, r_prev) = (&t["input.r"].data, &t["input.r_prev"].data);
        let range = &t["input.r_range_20"].data;
        assert_eq!(
            &timesteps(20),
            range,
            "the time grid is torch.linspace bit for bit"
        );
        let map = |v: &[f32], f: fn(f32) -> f32| v.iter().map(|&x| f(x)).collect::<Vec<f32>>();
        let nc = |t: f32| noise_cond(logsnr(t));
        let (x, pred, noise) = (&t["input.x"], &t["input.pred"], &t["input.noise"]);
        let (x0, x_next) = step(x, pred, noise, &coef_rows(r, r_prev, true));
        let (_, x_ddim) = step(x, pred, noise, &coef_rows(r, r_prev, false));
        let computed: Vec<(&str, Vec<f32>)> = vec![
            ("logSNR", map(r, logsnr)),
            ("logSNR_prev", map(r_prev, logsnr)),
            ("noise_cond", map(r, nc)),
            ("a", map(r, |t| scalers(logsnr(t)).0)),
            ("b", map(r, |t| scalers(logsnr(t)).1)),
            ("logSNR_range_20", map(range, logsnr)),
            ("noise_cond_range_20", map(range, nc)),
            ("x0", x0),
            ("epsilon", pred.data.clone()),
            ("x_next", x_next),
            ("x_next_ddim", x_ddim),
        ];
        for (name, got) in computed {
            let (err, limit) =
                test_data::error(&got, &t[&format!("output.{name}")].data, 1e-4, 1e-4);
            eprintln!("sampler_step {name}: max err {err:.3e} (limit {limit:.3e})");
            assert!(err <= limit, "{name}");
        }
    }

    #[test]
    fn matches_the_spec_table() {
        // docs/MODEL.md §4.6, T = 20: (row, logSNR, a, b, r fed to the model).
        let rows: [(usize, f64, f64, f64, f64); 5] = [
            (0, -9.210240, 0.010000, 0.999950, 0.993583),
            (1, -5.100027, 0.077844, 0.996966, 0.95),
            (10, -0.024627, 0.702740, 0.711447, 0.50),
            (19, 4.821204, 0.995996, 0.089402, 0.05),
            (20, 9.210074, 0.999950, 0.010001, 0.002257),
        ];
        let t = timesteps(20);
        for (i, l, a, b, r) in rows {
            let ls = logsnr(t[i]);
            let (ga, gb) = scalers(ls);
            assert!(close(ls, l, 2e-6), "row {i}: logSNR {ls} vs {l}");
            assert!(close(ga, a, 2e-6) && close(gb, b, 2e-6), "row {i}: a, b");
            assert!(close(noise_cond(ls), r, 2e-6), "row {i}: r");
        }
    }

    #[test]
    fn a_shift_lowers_log_snr_by_2_ln_shift_within_the_unshifted_limits() {
        let (lo, hi) = logsnr_limits();
        for t in [0.0f32, 0.25, 0.5, 0.75, 0.95, 1.0] {
            assert_eq!(shifted_logsnr(t, 1.0).to_bits(), logsnr(t).to_bits(), "{t}");
            let want = (logsnr(t) - 2.0 * 2f32.ln()).clamp(lo, hi);
            assert!((shifted_logsnr(t, 2.0) - want).abs() < 1e-5, "{t}");
        }
        // The ends stay at the limits the schedule computed without shift.
        assert_eq!(shifted_logsnr(1.0, 2.0), lo);
        assert!(shifted_logsnr(0.0, 2.0) < hi);
        let plain = StepCoefficients::ddpm(0.5, 0.45).unwrap();
        let shifted = StepCoefficients::ddpm_shifted(0.5, 0.45, 2.0).unwrap();
        assert!(
            shifted.a < plain.a && shifted.b > plain.b,
            "more noise at the same t"
        );
    }

    #[test]
    fn ddpm_step_refuses_to_go_backwards() {
        assert!(StepCoefficients::ddpm(0.5, 0.6).is_err());
        let c = StepCoefficients::ddpm(0.5, 0.5).unwrap();
        assert_eq!(c.sigma, 0.0);
        assert_eq!(StepCoefficients::ddim(1.0, 0.95).sigma, 0.0);
    }

    #[test]
    fn matches_the_cfg_combine_case() {
        let (t, _) = test_data::load("cfg_combine");
        let (c, u) = (&t["input.pred_cond"], &t["input.pred_uncond"]);
        let mut shape = c.shape.clone();
        shape[0] *= 2;
        let pred = HostTensor::new(shape, [c.data.as_slice(), &u.data].concat());
        let mut n = 0;
        for (name, want) in &t {
            // Outputs are named pred_cfg{cfg}_rho{rho}.
            let Some(params) = name.strip_prefix("output.pred_cfg") else {
                continue;
            };
            let (cfg, rho) = params.split_once("_rho").unwrap();
            let op = CfgCombine {
                cfg: cfg.parse().unwrap(),
                rho: rho.parse().unwrap(),
                per_sample: false,
            };
            let got = run(&op, &[&pred]).unwrap();
            assert_eq!(got.shape, want.shape);
            let (err, limit) = test_data::error(&got.data, &want.data, 1e-5, 1e-5);
            eprintln!("cfg_combine {name}: max err {err:.3e} (limit {limit:.3e})");
            assert!(err <= limit, "{name}");
            n += 1;
        }
        assert!(n > 0, "no pred_cfg outputs in the case file");
    }

    #[test]
    fn per_sample_rescale_treats_each_sample_alone() {
        let mut b = crate::verify::CheckBuilder::new(7);
        let (per, bs) = (3 * 5 * 2, 2);
        let cond = b.values(bs * per, 2.0, DType::F32);
        let uncond = b.values(bs * per, 1.0, DType::F32);
        let op = CfgCombine {
            cfg: 4.0,
            rho: 0.7,
            per_sample: true,
        };
        let both = HostTensor::new(vec![2 * bs, 3, 5, 2], [cond.as_slice(), &uncond].concat());
        let joint = run(&op, &[&both]).unwrap();
        for s in 0..bs {
            let rows = |v: &[f32]| v[s * per..][..per].to_vec();
            let one = HostTensor::new(vec![2, 3, 5, 2], [rows(&cond), rows(&uncond)].concat());
            let whole = CfgCombine {
                per_sample: false,
                ..op.clone()
            };
            assert_eq!(run(&whole, &[&one]).unwrap().data, rows(&joint.data));
        }
        // Batch-wide statistics differ from per-sample ones.
        let coupled = CfgCombine {
            per_sample: false,
            ..op.clone()
        };
        assert_ne!(run(&coupled, &[&both]).unwrap().data, joint.data);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let p = |s: &[usize]| HostTensor::zeros(s);
        let cfg = |rho: f32, per_sample| CfgCombine {
            cfg: 4.0,
            rho,
            per_sample,
        };
        assert!(run(&cfg(0.7, false), &[&p(&[3, 4])]).is_err(), "odd batch");
        assert!(run(&cfg(0.7, false), &[&p(&[0, 4])]).is_err(), "empty");
        assert!(
            run(&cfg(0.7, false), &[&p(&[2])]).is_err(),
            "one element per half"
        );
        assert!(
            run(&cfg(0.7, true), &[&p(&[4, 1])]).is_err(),
            "one element per sample"
        );
        assert!(
            run(&cfg(0.0, true), &[&p(&[4, 1])]).is_ok(),
            "no rescale, no std"
        );
        assert!(
            run(&cfg(-0.1, false), &[&p(&[2, 4])]).is_err(),
            "negative rho"
        );
        assert!(
            run(&cfg(f32::NAN, false), &[&p(&[2, 4])]).is_err(),
            "NaN rho"
        );
        assert!(
            run(&cfg(0.7, false), &[&p(&[2, 4]), &p(&[2, 4])]).is_err(),
            "arity"
        );

        let x = p(&[2, 3]);
        let infer = |ins: &[&HostTensor], coef_dtype: DType| {
            let mut d: Vec<_> = ins.iter().map(|t| desc(&t.shape, DType::F32)).collect();
            if let Some(last) = d.last_mut() {
                last.dtype = coef_dtype;
            }
            DdpmStep.infer(&d.iter().collect::<Vec<_>>())
        };
        assert!(infer(&[&x, &x, &x, &p(&[2, 5])], DType::F32).is_ok());
        assert!(
            infer(&[&x, &x, &x, &p(&[2, 5])], DType::BF16).is_err(),
            "bf16 coef"
        );
        assert!(
            infer(&[&x, &x, &x, &p(&[2, 4])], DType::F32).is_err(),
            "coef width"
        );
        assert!(
            infer(&[&x, &p(&[2, 4]), &x, &p(&[2, 5])], DType::F32).is_err(),
            "eps shape"
        );
        assert!(
            infer(&[&x, &x, &p(&[1, 3]), &p(&[2, 5])], DType::F32).is_err(),
            "noise shape"
        );
        assert!(infer(&[&x, &x, &x], DType::F32).is_err(), "arity");
        let mut outs = vec![HostTensor::zeros(&[2, 3])];
        let c = p(&[2, 5]);
        assert!(
            DdpmStep.reference(&[&x, &x, &x, &c], &mut outs).is_err(),
            "one output buffer"
        );
    }
}
