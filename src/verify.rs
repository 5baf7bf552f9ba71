//! Kernel checks: every op on fresh random inputs (odd shapes included) through a backend,
//! compared with its f32 CPU reference. Used by the test suite on the host emulator and by
//! `ultrapixel verify` on the GPU, so the same checks run everywhere.

use crate::runtime::device::dry_launches_for;
use crate::runtime::graph::{Graph, OpImpl, TensorId};
use crate::runtime::kernel_choice::{KernelChoice, KernelTarget};
use crate::runtime::session::SessionOptions;
use crate::runtime::Backend;
use crate::tensor::{bf16_bits_to_f32, f32_to_bf16_bits, DType, HostTensor};
use crate::Result;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::collections::HashMap;
use std::sync::Arc;

/// Pass when every element has |out − ref| ≤ atol + rtol · m, where m is max|ref| over the
/// output, or the element's own magnitude when the check has a [`ScaleFn`] (a bound that
/// rests on the magnitudes of the terms the op adds, not on the result's).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    pub atol: f32,
    pub rtol: f32,
}

/// Per-element magnitudes of a check's outputs, computed from the check's values and the
/// reference outputs: output o's limit at element i is `atol + rtol·m[o][i]`. An empty vector
/// leaves that output on max|ref|.
pub type ScaleFn = Arc<dyn Fn(&OpCheck, &[Vec<f32>]) -> Vec<Vec<f32>> + Send + Sync>;

impl Tolerance {
    /// For checks whose [`ScaleFn`] returns the error bound itself: limit = bound.
    pub const BOUND: Tolerance = Tolerance {
        atol: 0.0,
        rtol: 1.0,
    };
}

/// The error model the tolerances rest on. A bound covers the difference between a kernel
/// (on a GPU or on the emulator) and the reference, both sides' roundings included.
/// Transcendentals: CUDA's non-fast-math expf, exp2f, erff and rsqrtf err by at most 2 ulp
/// (CUDA C++ Programming Guide, mathematical functions); sqrtf and division are correctly
/// rounded (nvcc's defaults -prec-sqrt=true, -prec-div=true); the emulator uses precise libm,
/// so these bounds cover both. nvcc (and the emulator's g++) may fuse a·b + c: every
/// per-operation bound below counts an FMA's single rounding as at most that of the pair.
pub mod bound {
    /// f32 unit roundoff 2⁻²⁴: round to nearest errs by at most U·|x|.
    pub const U: f64 = 1.0 / 16_777_216.0;
    /// bf16 unit roundoff 2⁻⁸ (8 significant bits).
    pub const U_BF16: f64 = 1.0 / 256.0;
    /// The f32 accumulation of tensor-core MMAs truncates (Fasi et al. 2021, "Numerical
    /// behavior of NVIDIA tensor cores"): 2⁻²³ per step.
    pub const U_MMA: f64 = 2.0 * U;
    /// A 2-ulp function (expf, exp2f, erff, rsqrtf) errs by at most 2⁻²² relative.
    pub const ULP2: f64 = 4.0 * U;

    /// The coefficient c with |error| ≤ c·Σ|terms| of a sum of n terms rounded with unit `u`
    /// in any order: n·u for n ≤ 16 (the deterministic γ_n), beyond that 4·√n·u, the
    /// probabilistic bound λ√n·u with λ = 4 (Higham & Mary 2019, "A new approach to
    /// probabilistic rounding error analysis": rounding errors independent and of mean
    /// zero, as round-to-nearest's are; the tensor cores' truncation is biased towards zero,
    /// which keeps mean zero over the random-sign partial sums of the checks' products).
    /// The deterministic bound overestimates real errors by about √n.
    pub fn sum(n: usize, u: f64) -> f64 {
        let n = n as f64;
        n.min(4.0 * n.sqrt()) * u
    }

    /// A bound `e` on a value `v` plus the final rounding of the stored result to bf16 (when
    /// `bf16`): RN errs by at most U_BF16·(|v| + e).
    pub fn stored(e: f64, v: f64, bf16: bool) -> f64 {
        if bf16 {
            e + U_BF16 * (v.abs() + e)
        } else {
            e
        }
    }
}

impl Tolerance {
    /// A value copied and stored as bf16: one round to nearest, ≤ 2⁻⁸·|y|.
    pub const BF16_OUT: Tolerance = Tolerance {
        atol: 0.0,
        rtol: bound::U_BF16 as f32,
    };
}

/// Tensors with at least this many values are drawn in parallel chunks of `DRAW_CHUNK`
/// (above every emulator-size tensor, whose values stay those of one serial stream).
pub const PARALLEL_DRAW: usize = 1 << 20;
const DRAW_CHUNK: usize = 1 << 16;

/// `op`'s reference on the absolute values of `inputs` (shape, values): for an op that sums
/// products (a conv, a resize, an MLP), Σ|terms| of each output, the magnitude its rounding
/// errors scale with.
pub fn reference_on_abs(
    op: &dyn crate::runtime::graph::OpImpl,
    inputs: &[(&[usize], &[f32])],
) -> Result<Vec<Vec<f32>>> {
    use crate::runtime::graph::{Role, TensorDesc};
    let descs: Vec<TensorDesc> = inputs
        .iter()
        .map(|(shape, _)| TensorDesc {
            name: "abs".into(),
            shape: shape.to_vec(),
            dtype: DType::F32,
            role: Role::Input,
        })
        .collect();
    let mut outs: Vec<HostTensor> = op
        .infer(&descs.iter().collect::<Vec<_>>())?
        .iter()
        .map(|(shape, _)| HostTensor::full(shape, f32::NAN))
        .collect();
    let abs: Vec<HostTensor> = inputs
        .iter()
        .map(|(shape, v)| HostTensor::new(shape.to_vec(), v.iter().map(|x| x.abs()).collect()))
        .collect();
    op.reference(&abs.iter().collect::<Vec<_>>(), &mut outs)?;
    Ok(outs.into_iter().map(|t| t.data).collect())
}

/// How big the shapes get: the emulator runs small shapes, a GPU adds larger ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    Emulator,
    Gpu,
}

/// One op instance with its inputs, ready to run on any backend.
#[derive(Clone)]
pub struct OpCheck {
    pub name: String,
    pub graph: Graph,
    pub inputs: Vec<(TensorId, Vec<f32>)>,
    pub weights: HashMap<String, HostTensor>,
    pub tol: Tolerance,
    /// Per-element magnitudes for `tol` (None: max|ref| of each output).
    pub scale: Option<ScaleFn>,
}

impl OpCheck {
    /// The values of input or weight `id`.
    pub fn values(&self, id: TensorId) -> &[f32] {
        if let Some((_, v)) = self.inputs.iter().find(|(i, _)| *i == id) {
            return v;
        }
        let name = &self.graph.desc(id).name;
        &self
            .weights
            .get(name)
            .unwrap_or_else(|| panic!("{}: {name} is neither an input nor a weight", self.name))
            .data
    }

    /// This check with the Hopper kernels forced ([`KernelChoice::Sm90a`]) and its op
    /// tagged with them (`gemm[sm90a] [7,40]x[37,40] …`, so a failure names the op and the
    /// kernel), where `target` can run them and forcing them changes one of the check's
    /// launches; None where the run would repeat the check's own (a shape that does not
    /// qualify, a target that cannot run them, or `UPX_KERNELS` picking them already).
    pub fn sm90a_variant(&self, target: KernelTarget) -> Result<Option<OpCheck>> {
        let forced = target.with_choice(KernelChoice::Sm90a);
        if target.why_not_sm90a(KernelChoice::Sm90a).is_some() {
            return Ok(None);
        }
        let names = |t| -> Result<Vec<&'static str>> {
            Ok(dry_launches_for(&self.graph, t)?
                .iter()
                .map(|l| l.kernel.name())
                .collect())
        };
        if names(forced)? == names(target)? {
            return Ok(None);
        }
        let mut forced = self.clone();
        forced.graph.set_kernels(Some(KernelChoice::Sm90a));
        forced.name = self.sm90a_name();
        Ok(Some(forced))
    }

    /// The name of [`Self::sm90a_variant`]: the op (the first word) tagged `[sm90a]`.
    pub fn sm90a_name(&self) -> String {
        match self.name.split_once(' ') {
            Some((op, rest)) => format!("{op}[sm90a] {rest}"),
            None => format!("{}[sm90a]", self.name),
        }
    }

    /// The same check with per-element magnitudes.
    pub fn with_scale(
        mut self,
        f: impl Fn(&OpCheck, &[Vec<f32>]) -> Vec<Vec<f32>> + Send + Sync + 'static,
    ) -> Self {
        self.scale = Some(Arc::new(f));
        self
    }

    /// Compares `got` with the reference outputs, each output under `tol` scaled by `slack`
    /// (1 against the reference; 2 between two backends that each err by the bound).
    pub fn compare(
        &self,
        reference: &[Vec<f32>],
        got: &[Vec<f32>],
        slack: f32,
    ) -> Vec<CheckResult> {
        let scales = self.scale.as_ref().map(|f| f(self, reference));
        let tol = Tolerance {
            atol: self.tol.atol * slack,
            rtol: self.tol.rtol * slack,
        };
        self.graph
            .outputs
            .iter()
            .zip(reference.iter().zip(got))
            .enumerate()
            .map(|(i, (&o, (r, g)))| {
                let scale = scales
                    .as_ref()
                    .map(|s| s[i].as_slice())
                    .filter(|s| !s.is_empty());
                compare_scaled(&self.name, &self.graph.desc(o).name, g, r, tol, scale)
            })
            .collect()
    }
}

/// The seeds `seed` + 1, + 2, … (wrapping), one per check of a family: each check draws its
/// own inputs, and one `--seed` always gives the same checks.
pub fn seed_sequence(seed: u64) -> impl FnMut() -> u64 {
    let mut k = 0u64;
    move || {
        k += 1;
        seed.wrapping_add(k)
    }
}

/// Builds an [`OpCheck`]: random inputs and weights, exactly representable in their
/// storage dtype so the reference and the kernels see the same values.
pub struct CheckBuilder {
    pub graph: Graph,
    rng: StdRng,
    inputs: Vec<(TensorId, Vec<f32>)>,
    weights: HashMap<String, HostTensor>,
}

impl CheckBuilder {
    pub fn new(seed: u64) -> Self {
        CheckBuilder {
            graph: Graph::new(),
            rng: StdRng::seed_from_u64(seed),
            inputs: Vec::new(),
            weights: HashMap::new(),
        }
    }

    /// Uniform values in [-scale, scale), rounded to the dtype. Tensors of at least
    /// [`PARALLEL_DRAW`] values (GPU-size checks only) are drawn in parallel, in chunks with
    /// their own generators seeded from this one: deterministic for any thread count.
    pub fn values(&mut self, n: usize, scale: f32, dtype: DType) -> Vec<f32> {
        let draw = |rng: &mut StdRng, out: &mut [f32]| {
            for o in out {
                let v = (rng.random::<f32>() * 2.0 - 1.0) * scale;
                *o = match dtype {
                    DType::F32 => v,
                    DType::BF16 => bf16_bits_to_f32(f32_to_bf16_bits(v)),
                };
            }
        };
        let mut v = vec![0f32; n];
        if n < PARALLEL_DRAW {
            draw(&mut self.rng, &mut v);
        } else {
            use rayon::prelude::*;
            let base: u64 = self.rng.random();
            v.par_chunks_mut(DRAW_CHUNK)
                .enumerate()
                .for_each(|(i, chunk)| {
                    let mut rng = StdRng::seed_from_u64(base.wrapping_add(i as u64));
                    draw(&mut rng, chunk);
                });
        }
        v
    }

    pub fn input(&mut self, shape: &[usize], dtype: DType, scale: f32) -> Result<TensorId> {
        let name = format!("in{}", self.inputs.len());
        let id = self.graph.input(&name, shape, dtype)?;
        let v = self.values(id_numel(shape), scale, dtype);
        self.inputs.push((id, v));
        Ok(id)
    }

    /// An f32 key mask: 0 (masked) with probability `p_masked`, 1 otherwise; the first entry
    /// along the last axis always 1, as CLIP's BOS token is always visible.
    pub fn mask(&mut self, shape: &[usize], p_masked: f32) -> Result<TensorId> {
        let name = format!("in{}", self.inputs.len());
        let id = self.graph.input(&name, shape, DType::F32)?;
        let last = *shape.last().unwrap_or(&1);
        let v = (0..id_numel(shape))
            .map(|i| (i % last == 0 || self.rng.random::<f32>() >= p_masked) as u8 as f32)
            .collect();
        self.inputs.push((id, v));
        Ok(id)
    }

    /// An input with the given values (e.g. a noise key).
    pub fn input_values(&mut self, shape: &[usize], values: &[f32]) -> Result<TensorId> {
        let name = format!("in{}", self.inputs.len());
        let id = self.graph.input(&name, shape, DType::F32)?;
        self.inputs.push((id, values.to_vec()));
        Ok(id)
    }

    pub fn weight(&mut self, shape: &[usize], dtype: DType, scale: f32) -> Result<TensorId> {
        let name = format!("w{}", self.weights.len());
        let id = self.graph.weight(&name, shape, dtype)?;
        let v = self.values(id_numel(shape), scale, dtype);
        self.weights
            .insert(name, HostTensor::new(shape.to_vec(), v));
        Ok(id)
    }

    pub fn finish(mut self, name: String, outputs: &[TensorId], tol: Tolerance) -> Result<OpCheck> {
        for (i, &o) in outputs.iter().enumerate() {
            self.graph.output(o, &format!("out{i}"))?;
        }
        Ok(OpCheck {
            name,
            graph: self.graph,
            inputs: self.inputs,
            weights: self.weights,
            tol,
            scale: None,
        })
    }
}

fn id_numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

#[derive(Clone, Debug)]
pub struct CheckResult {
    pub check: String,
    pub output: String,
    /// The error and the limit at the element nearest to failing (largest error/limit); with
    /// a global limit, the largest error.
    pub max_err: f32,
    pub max_ref: f32,
    pub limit: f32,
    /// max over the elements of error/limit: ≤ 1 passes.
    pub ratio: f32,
    /// Elements that are NaN/Inf in the output but finite in the reference (unwritten or
    /// overflowed).
    pub non_finite: usize,
}

impl CheckResult {
    pub fn passed(&self) -> bool {
        self.non_finite == 0 && self.ratio <= 1.0
    }
}

/// Compares one output with its reference under one limit, atol + rtol·max|ref|.
pub fn compare(
    check: &str,
    output: &str,
    out: &[f32],
    reference: &[f32],
    tol: Tolerance,
) -> CheckResult {
    compare_scaled(check, output, out, reference, tol, None)
}

/// Compares one output with its reference: element i passes when |out − ref| ≤ atol +
/// `rtol·scale[i]`, or atol + rtol·max|ref| without `scale`.
pub fn compare_scaled(
    check: &str,
    output: &str,
    out: &[f32],
    reference: &[f32],
    tol: Tolerance,
    scale: Option<&[f32]>,
) -> CheckResult {
    let max_ref = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    let global = tol.atol + tol.rtol * max_ref;
    let (mut max_err, mut limit, mut ratio) = (0f32, global, 0f32);
    let mut non_finite = 0;
    for (i, (&o, &r)) in out.iter().zip(reference).enumerate() {
        if !o.is_finite() && r.is_finite() {
            non_finite += 1;
            continue;
        }
        let err = (o - r).abs();
        if err.is_nan() {
            continue;
        }
        let lim = scale.map_or(global, |s| tol.atol + tol.rtol * s[i]);
        let q = if err == 0.0 {
            0.0
        } else if lim > 0.0 {
            err / lim
        } else {
            f32::INFINITY
        };
        if q > ratio || (scale.is_none() && err > max_err) {
            (max_err, limit, ratio) = (err, lim, q.max(ratio));
        }
    }
    CheckResult {
        check: check.to_string(),
        output: output.to_string(),
        max_err,
        max_ref,
        limit,
        ratio,
        non_finite: non_finite + out.len().abs_diff(reference.len()),
    }
}

/// Runs `check` on the CPU reference and on `backend` (outputs poisoned first) and compares
/// every output.
pub fn run_check(check: &OpCheck, backend: &Backend) -> Result<Vec<CheckResult>> {
    let reference = run_on(check, &Backend::Cpu)?;
    let got = run_on(check, backend)?;
    Ok(check.compare(&reference, &got, 1.0))
}

/// Runs a check's graph on one backend and returns its outputs.
pub fn run_on(check: &OpCheck, backend: &Backend) -> Result<Vec<Vec<f32>>> {
    let mut s = backend.session(
        check.graph.clone(),
        &check.weights,
        SessionOptions { poison: true },
    )?;
    for (id, v) in &check.inputs {
        s.set_input(*id, v)?;
    }
    s.run()?;
    check.graph.outputs.iter().map(|&o| s.read(o)).collect()
}

// Helpers the op families' checks share.

/// Every (input, output) dtype pair of the data-movement kernels.
pub const DTYPE_PAIRS: [(DType, DType); 4] = [
    (DType::F32, DType::F32),
    (DType::F32, DType::BF16),
    (DType::BF16, DType::F32),
    (DType::BF16, DType::BF16),
];

/// Moving data is exact; only an f32 → bf16 store rounds (once, BF16_OUT: ≤ 2⁻⁸·|y|).
pub fn copy_tolerance(inputs: &[DType], out: DType) -> Tolerance {
    if out == DType::BF16 && inputs.contains(&DType::F32) {
        Tolerance::BF16_OUT
    } else {
        Tolerance {
            atol: 0.0,
            rtol: 0.0,
        }
    }
}

/// The values a check feeds to its input `id`, for inputs that must not be uniform noise
/// (indices, sampler coefficients).
pub fn input_values(check: &mut OpCheck, id: TensorId) -> &mut Vec<f32> {
    let (_, v) = check
        .inputs
        .iter_mut()
        .find(|(i, _)| *i == id)
        .expect("the check has this input");
    v
}

/// Turns the uniform [−1, 1) values of index input `id` into integers in `[0, n)`, the first
/// two the ends of the range.
pub fn make_indices(check: &mut OpCheck, id: TensorId, n: usize) {
    for (k, v) in input_values(check, id).iter_mut().enumerate() {
        *v = match k {
            0 => (n - 1) as f32,
            1 => 0.0,
            _ => (((*v + 1.0) * 0.5 * n as f32) as usize).min(n - 1) as f32,
        };
    }
}

/// A check of one single-input op on a random `shape` input of `din`.
pub fn unary_check(
    seed: u64,
    op: impl OpImpl + 'static,
    shape: &[usize],
    din: DType,
    tol: Tolerance,
) -> Result<OpCheck> {
    let mut b = CheckBuilder::new(seed);
    let name = format!("{op:?} {din:?} {shape:?}");
    let x = b.input(shape, din, 4.0)?;
    let y = b.graph.op1(op, &[x])?;
    b.finish(name, &[y], tol)
}

/// A family of checks (one op module's, registered in `ops::FAMILIES`): its name, the
/// value XORed into the `verify` seed for it (so `verify --seed S` and the family run alone
/// with S draw the same inputs), and the function that builds its checks.
pub struct Family {
    pub name: &'static str,
    pub seed_xor: u64,
    pub checks: fn(u64, Scale) -> Result<Vec<OpCheck>>,
}

impl Family {
    /// The family's checks for the `verify` seed `seed`.
    pub fn checks_for(&self, seed: u64, scale: Scale) -> Result<Vec<OpCheck>> {
        (self.checks)(seed ^ self.seed_xor, scale)
    }
}

/// The worst case of one op (first word of the check names) of one family over a sweep.
#[derive(Clone, Debug, Default)]
pub struct SweepEntry {
    /// Outputs compared (checks × outputs × seeds).
    pub outputs: usize,
    pub worst_ratio: f32,
    pub worst_seed: u64,
    /// "check / output" of the worst ratio.
    pub worst: String,
    pub failures: usize,
    /// The first few failing seeds, each once.
    pub failed_seeds: Vec<u64>,
}

/// What a sweep found so far, per (family, op).
#[derive(Clone, Debug, Default)]
pub struct SweepReport {
    pub seeds_done: usize,
    pub entries: std::collections::BTreeMap<(String, String), SweepEntry>,
    /// Failed runs and failing outputs, one line each (the first few hundred).
    pub lines: Vec<String>,
}

impl SweepReport {
    fn add(
        &mut self,
        family: &str,
        seed: u64,
        check: &OpCheck,
        results: &Result<Vec<CheckResult>>,
    ) {
        let op = check.name.split_whitespace().next().unwrap_or("");
        // One entry per op and output dtype: a bf16 store's rounding, which nearly reaches its
        // bound, would hide the f32 outputs' ratios.
        let key = |suffix: &str| (family.to_string(), format!("{op} ->{suffix}"));
        match results {
            Ok(rs) => {
                for (r, &o) in rs.iter().zip(&check.graph.outputs) {
                    self.add_one(key(check.graph.desc(o).dtype.suffix()), seed, r);
                }
            }
            Err(err) => {
                let e = self.entries.entry(key("")).or_default();
                e.worst_ratio = f32::INFINITY;
                e.worst_seed = seed;
                e.worst = format!("{}: {err}", check.name);
                e.failures += 1;
                if e.failed_seeds.len() < 16 && !e.failed_seeds.contains(&seed) {
                    e.failed_seeds.push(seed);
                }
                if self.lines.len() < 500 {
                    self.lines
                        .push(format!("seed {seed} {family}: {}: {err}", check.name));
                }
            }
        }
    }

    fn add_one(&mut self, key: (String, String), seed: u64, r: &CheckResult) {
        let line = format!(
            "seed {seed} {}: {} / {}: err {:.3e} limit {:.3e} ratio {:.3} non-finite {}",
            key.0, r.check, r.output, r.max_err, r.limit, r.ratio, r.non_finite
        );
        let e = self.entries.entry(key).or_default();
        e.outputs += 1;
        let ratio = if r.non_finite > 0 {
            f32::INFINITY
        } else {
            r.ratio
        };
        if ratio > e.worst_ratio || e.worst.is_empty() {
            e.worst_ratio = ratio;
            e.worst_seed = seed;
            e.worst = format!("{} / {}", r.check, r.output);
        }
        if !r.passed() {
            e.failures += 1;
            if e.failed_seeds.len() < 16 && !e.failed_seeds.contains(&seed) {
                e.failed_seeds.push(seed);
            }
            if self.lines.len() < 500 {
                self.lines.push(line);
            }
        }
    }

    pub fn failures(&self) -> usize {
        self.entries.values().map(|e| e.failures).sum()
    }
}

/// Seed i of a sweep from `start`: SplitMix64 of start + i, so that the checks of neighbouring
/// seeds (whose builders add small offsets to the seed) draw unrelated inputs.
pub fn sweep_seed(start: u64, i: u64) -> u64 {
    let mut z = start.wrapping_add(i).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Runs every check of `families` whose name contains `filter` on `backend`
/// against the CPU reference at emulator size, for seeds `sweep_seed(start, 0..n)`, seeds in
/// parallel; with the sm_90a kernels forced too where they change a check's launches
/// ([`OpCheck::sm90a_variant`]: the `op[sm90a]` entries). Stops starting seeds once `stop` is set; `progress` sees the report after each
/// seed.
pub fn sweep(
    backend: &Backend,
    (start, n): (u64, u64),
    families: &[&Family],
    filter: Option<&str>,
    stop: &std::sync::atomic::AtomicBool,
    progress: &(dyn Fn(&SweepReport) + Sync),
) -> SweepReport {
    use rayon::prelude::*;
    use std::sync::atomic::Ordering;
    use std::sync::Mutex;
    let report = Mutex::new(SweepReport::default());
    let target = backend
        .device()
        .map(|d| d.kernel_target())
        .unwrap_or_default();
    (0..n).into_par_iter().for_each(|i| {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let seed = sweep_seed(start, i);
        let mut local = SweepReport::default();
        for family in families {
            let checks = match family.checks_for(seed, Scale::Emulator) {
                Ok(c) => c,
                Err(e) => {
                    local.lines.push(format!(
                        "seed {seed} {}: building the checks: {e}",
                        family.name
                    ));
                    continue;
                }
            };
            for c in &checks {
                let forced = match c.sm90a_variant(target) {
                    Ok(f) => f,
                    Err(e) => {
                        local.add(family.name, seed, c, &Err(e));
                        None
                    }
                };
                for c in std::iter::once(c)
                    .chain(&forced)
                    .filter(|c| filter.is_none_or(|f| c.name.contains(f)))
                {
                    local.add(family.name, seed, c, &run_check(c, backend));
                }
            }
        }
        let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
        r.seeds_done += 1;
        for (key, e) in local.entries {
            let t = r.entries.entry(key).or_default();
            t.outputs += e.outputs;
            t.failures += e.failures;
            for s in e.failed_seeds {
                if t.failed_seeds.len() < 16 && !t.failed_seeds.contains(&s) {
                    t.failed_seeds.push(s);
                }
            }
            if e.worst_ratio > t.worst_ratio || t.worst.is_empty() {
                (t.worst_ratio, t.worst_seed, t.worst) = (e.worst_ratio, e.worst_seed, e.worst);
            }
        }
        let room = 500usize.saturating_sub(r.lines.len());
        r.lines.extend(local.lines.into_iter().take(room));
        progress(&r);
    });
    report.into_inner().unwrap_or_else(|e| e.into_inner())
}
