//! `ultrapixel tune`: every candidate of every distinct GEMM and attention shape, checked
//! against our kernel and timed, and the table of winners.
//!
//! Per GEMM (with its epilogue): our kernel in each compiled tile configuration; cuBLASLt's
//! top heuristics alone where its own epilogue covers the op (bias; a residual as C with
//! β = 1); and cuBLASLt's product (f32, or bf16 where the output is bf16) followed by our
//! epilogue pass for everything else (exact GELU, FiLM, GRN sums; our operand-scaling pass
//! first for the GRN-modulated GEMM). The pair is what runs at generation time, so the pair is
//! what is timed. Every candidate is first run on the same inputs as our kernel and compared
//! on the device: more than the bf16 bound away from ours, or two runs that differ in any bit,
//! and it cannot win. Times are device time over CUDA-graph replays, the iteration count
//! chosen so each candidate replays for about `target` seconds.

use super::dispatch::{pair_entries, plan_layout, PairPlan};
use super::engine::Engine;
use super::pair;
use super::problems::{problems, AttentionProblem, Epilogue, GemmProblem};
use super::table::{
    dtype_name, now_utc, AttentionEntry, Candidate, GemmEntry, LtChoice, OurConfig, Table, FORMAT,
};
use crate::bench::{hash, uniform};
use crate::ops::gemm_epilogue::{CompareSummary, TuneCompare};
use crate::pipeline::open_models::Configs;
use crate::pipeline::Size;
use crate::runtime::cuda::cublaslt::{LtCall, LtMatmul, LtSpec};
use crate::runtime::device::{Device, DeviceBuffer, WeightCache};
use crate::runtime::graph::{DevTensor, LaunchIo, OpImpl, Role, TensorDesc};
use crate::runtime::launch::Entry;
use crate::tensor::{encode, DType};
use crate::verify::Tolerance;
use crate::{Error, Result};
use std::io::Write;
use std::sync::Arc;

/// How long to replay each candidate, its vendor heuristics, a fixed iteration count.
#[derive(Clone, Debug)]
pub struct Options {
    /// Seconds of replays per candidate (adaptive engines).
    pub target_seconds: f64,
    /// cuBLASLt algorithms asked of the heuristic per variant.
    pub algos: usize,
    /// A fixed iteration count instead of the time target.
    pub iters: Option<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            target_seconds: 0.02,
            algos: 8,
            iters: None,
        }
    }
}

/// Our GEMM kernel's compiled tile configurations, in the order they are tried. The kernel
/// is compiled in one today (kernels/gemm.cu); Hopper configurations join this list as
/// `wgmma` entries when their kernels exist, each launched by the GEMM op for its config.
pub fn our_configs() -> Vec<OurConfig> {
    vec![OurConfig {
        name: "128x128x32s3".into(),
        tile: [128, 128, 32],
        stages: 3,
        mma: "mma.sync".into(),
    }]
}

/// The bound a candidate must meet against our kernel's output: both are bf16-rounded
/// approximations of the same product (the GRN statistics of bf16-rounded values), so this
/// is a few bf16 units of the largest value; a wrong algorithm misses it by far.
pub const BOUND: Tolerance = Tolerance {
    atol: 1e-5,
    rtol: 1.6e-2,
};

/// Element shift between the inputs read from one random pool (a multiple of 128 elements,
/// so every input starts 256-byte aligned), so no two inputs hold the same values.
const SHIFT: usize = 16_512;

/// Random bf16 and f32 values that every problem's inputs are read from.
struct Pools {
    bf16: DeviceBuffer,
    f32: DeviceBuffer,
}

impl Pools {
    fn new(dev: &Arc<dyn Device>, gemms: &[GemmProblem]) -> Result<Pools> {
        let need = |dtype: DType| {
            gemms
                .iter()
                .flat_map(|p| {
                    p.inputs
                        .iter()
                        .enumerate()
                        .filter(move |(_, d)| d.dtype == dtype)
                        .map(|(i, d)| i * SHIFT + d.numel())
                })
                .max()
                .unwrap_or(1)
        };
        let fill = |dtype: DType, scale: f32, seed: u64| -> Result<DeviceBuffer> {
            let n = need(dtype);
            let buf = dev.alloc(n * dtype.size())?;
            dev.write(buf.ptr, &encode(&uniform(seed, n, scale), dtype))?;
            Ok(buf)
        };
        Ok(Pools {
            bf16: fill(DType::BF16, 1.0, hash("tune bf16 pool"))?,
            f32: fill(DType::F32, 0.5, hash("tune f32 pool"))?,
        })
    }

    /// Where input `i` of this dtype reads.
    fn input(&self, i: usize, dtype: DType) -> u64 {
        let base = match dtype {
            DType::BF16 => self.bf16.ptr,
            DType::F32 => self.f32.ptr,
        };
        base + (i * SHIFT * dtype.size()) as u64
    }
}

/// The buffers of one problem: inputs in the pools, our outputs (the reference), the
/// candidate's outputs and a copy of them (determinism), the workspace, the pairs' scratch,
/// the comparison rows.
struct Buffers {
    inputs: Vec<u64>,
    reference: Vec<DeviceBuffer>,
    candidate: Vec<DeviceBuffer>,
    previous: Vec<DeviceBuffer>,
    workspace: DeviceBuffer,
    /// The pairs' f32 product and scaled operand (as a GEMM node's scratch).
    scratch: DeviceBuffer,
    compare: DeviceBuffer,
}

/// Seconds an unknown GEMM is assumed to take, for its first iteration count.
fn estimate(flops: f64) -> f64 {
    flops / 4e14
}

fn iterations(opts: &Options, engine: &dyn Engine, seconds: f64) -> usize {
    match opts.iters {
        Some(n) => n.max(1),
        None if engine.adaptive() => {
            ((opts.target_seconds / seconds.max(1e-7)).round() as usize).clamp(3, 10_000)
        }
        None => 1,
    }
}

fn tflops(flops: f64, seconds: f64) -> f64 {
    flops / seconds / 1e12
}

/// A candidate before it is run: its record and its steps.
struct Trial {
    record: Candidate,
    steps: Vec<Entry>,
}

fn record(name: String, kind: &str) -> Candidate {
    Candidate {
        name,
        kind: kind.into(),
        config: None,
        cublaslt: None,
        status: "ok".into(),
        detail: None,
        seconds: None,
        tflops: None,
        max_err: None,
        limit: None,
    }
}

struct Problem<'a> {
    p: &'a GemmProblem,
    bufs: Buffers,
}

impl<'a> Problem<'a> {
    fn new(dev: &Arc<dyn Device>, pools: &Pools, p: &'a GemmProblem) -> Result<Self> {
        let outs = || -> Result<Vec<DeviceBuffer>> {
            p.outputs.iter().map(|d| dev.alloc(d.bytes())).collect()
        };
        let refs: Vec<&TensorDesc> = p.inputs.iter().collect();
        // The epilogue pass needs what the fused GEMM needs (the GRN partials), at most.
        let product = pair::product_desc(&p.outputs[0], DType::F32);
        let ins: Vec<DevTensor> = p
            .inputs
            .iter()
            .map(|desc| DevTensor { ptr: 0, desc })
            .collect();
        let pass_ins: Vec<&TensorDesc> = pair::epilogue_inputs(
            &p.key,
            &ins,
            DevTensor {
                ptr: 0,
                desc: &product,
            },
        )
        .iter()
        .map(|t| t.desc)
        .collect();
        let pass_ws = pair::epilogue_op(p.op.as_ref(), &p.key).workspace_bytes(&pass_ins);
        let ws = p.op.workspace_bytes(&refs).max(pass_ws);
        let widest = PairPlan {
            product: DType::F32,
            scale_a: p.key.epilogue.scaled_a,
            epilogue_pass: true,
        };
        let scratch = plan_layout(&p.key, widest).bytes;
        let largest = p.outputs.iter().map(|d| d.numel()).max().unwrap_or(1);
        Ok(Problem {
            p,
            bufs: Buffers {
                inputs: p
                    .inputs
                    .iter()
                    .enumerate()
                    .map(|(i, d)| pools.input(i, d.dtype))
                    .collect(),
                reference: outs()?,
                candidate: outs()?,
                previous: outs()?,
                workspace: dev.alloc(ws.max(256))?,
                scratch: dev.alloc(scratch.max(256))?,
                compare: dev.alloc(crate::ops::gemm_epilogue::compare_blocks(largest) * 16)?,
            },
        })
    }

    /// The op's inputs (in the pools) and outputs (`outs`), and the workspace.
    fn io<'d>(&'d self, outs: &[DeviceBuffer]) -> LaunchIo<'d> {
        let p = self.p;
        LaunchIo {
            inputs: p
                .inputs
                .iter()
                .zip(&self.bufs.inputs)
                .map(|(desc, &ptr)| DevTensor { ptr, desc })
                .collect(),
            outputs: p
                .outputs
                .iter()
                .zip(outs)
                .map(|(desc, b)| DevTensor { ptr: b.ptr, desc })
                .collect(),
            workspace: self.bufs.workspace.ptr,
            target: Default::default(),
        }
    }

    /// Our op's launches, writing into `outs`.
    fn ours(&self, outs: &[DeviceBuffer]) -> Result<Vec<Entry>> {
        Ok(pair::kernels(self.p.op.launches(&self.io(outs))?))
    }

    /// A vendor product `vendor(a, d)` completed by our passes, as a GEMM node runs it
    /// ([`pair_entries`]), into the candidate outputs.
    fn pair(
        &self,
        plan: PairPlan,
        vendor: &mut dyn FnMut(u64, u64) -> Result<Entry>,
    ) -> Result<Vec<Entry>> {
        pair_entries(
            self.p.op.as_ref(),
            &self.p.key,
            self.bufs.workspace.bytes,
            &self.io(&self.bufs.candidate),
            self.bufs.scratch.ptr,
            plan,
            vendor,
        )?
        .ok_or_else(|| Error::InvalidArgument("the epilogue pass needs more workspace".into()))
    }

    /// The stand-in vendor GEMM: our plain kernel, A at `a` to the product at `d`.
    fn stand_in(&self, a: u64, d: u64, product: DType) -> Result<Entry> {
        let w = DevTensor {
            ptr: self.bufs.inputs[1],
            desc: &self.p.inputs[1],
        };
        pair::plain_gemm(&self.p.key, a, w, d, product)
    }

    /// Every candidate of this problem on `engine` (records of variants without an algorithm
    /// or whose setup failed come back already marked).
    fn trials(&self, engine: &dyn Engine, opts: &Options) -> Result<Vec<Trial>> {
        let p = self.p;
        let e = p.key.epilogue;
        let mut trials = Vec::new();
        for config in our_configs() {
            let mut r = record(format!("ours/{}", config.name), "ours");
            r.config = Some(config);
            trials.push(Trial {
                record: r,
                steps: self.ours(&self.bufs.candidate)?,
            });
        }
        // (variant, plan): cuBLASLt alone where its own epilogue covers the op, else its
        // product in f32 (and in bf16 for bf16 outputs) completed by our passes.
        let alone = PairPlan {
            product: p.key.out,
            scale_a: false,
            epilogue_pass: false,
        };
        let completed = |product| PairPlan {
            product,
            scale_a: e.scaled_a,
            epilogue_pass: true,
        };
        let mut variants: Vec<(&str, PairPlan)> = Vec::new();
        if e.vendor_fusable() && !engine.stand_in() {
            variants.push(("fused", alone));
        }
        if e != Epilogue::default() {
            variants.push(("f32", completed(DType::F32)));
            if p.key.out == DType::BF16 {
                variants.push(("bf16", completed(DType::BF16)));
            }
        }
        for (variant, plan) in variants {
            if engine.stand_in() {
                let steps = self.pair(plan, &mut |a, d| self.stand_in(a, d, plan.product))?;
                trials.push(Trial {
                    record: record(format!("standin/{variant}"), "standin+epilogue"),
                    steps,
                });
                continue;
            }
            let lt = match engine.vendor() {
                Ok(lt) => lt,
                Err(_) => continue,
            };
            let fused = !plan.epilogue_pass;
            let kind = if fused {
                "cublaslt"
            } else {
                "cublaslt+epilogue"
            };
            let spec = LtSpec {
                m: p.key.m,
                n: p.key.n,
                k: p.key.k,
                product: plan.product,
                bias: fused && e.bias,
                residual_as_c: fused && e.residual,
            };
            let failed = |detail: String| {
                let mut r = record(format!("cublaslt/{variant}"), kind);
                r.status = if detail.starts_with("no algorithm") {
                    "unsupported"
                } else {
                    "failed"
                }
                .into();
                r.detail = Some(detail);
                Trial {
                    record: r,
                    steps: Vec::new(),
                }
            };
            let bias = if spec.bias {
                self.bufs.inputs[pair::bias_index()]
            } else {
                0
            };
            let mm = match LtMatmul::new(spec, bias) {
                Ok(mm) => Arc::new(mm),
                Err(err) => {
                    trials.push(failed(err));
                    continue;
                }
            };
            let heuristics = match mm.heuristics(lt, opts.algos) {
                Ok(h) if h.is_empty() => {
                    trials.push(failed("no algorithm for this combination".into()));
                    continue;
                }
                Ok(h) => h,
                // cuBLASLt 13.1 refuses an f32 bias vector with a bf16 output this way.
                Err(err)
                    if spec.bias
                        && spec.product == DType::BF16
                        && err.contains("INVALID_VALUE") =>
                {
                    trials.push(failed(format!(
                        "no algorithm: cuBLASLt takes no f32 bias with a bf16 output ({err})"
                    )));
                    continue;
                }
                Err(err) => {
                    trials.push(failed(err));
                    continue;
                }
            };
            let residual = if spec.residual_as_c {
                self.bufs.inputs[pair::residual_index(&p.key)]
            } else {
                0
            };
            for (rank, h) in heuristics.iter().enumerate() {
                let mut r = record(format!("cublaslt/{variant}/{rank}"), kind);
                r.cublaslt = Some(LtChoice {
                    product: dtype_name(plan.product).into(),
                    epilogue: if spec.bias { "bias" } else { "default" }.into(),
                    residual_as_c: spec.residual_as_c,
                    scale_a: plan.scale_a,
                    epilogue_pass: plan.epilogue_pass,
                    algo: h.algo.record(h),
                });
                let steps = self.pair(plan, &mut |a, d| {
                    Ok(Entry::Vendor(Arc::new(LtCall {
                        lt: lt.clone(),
                        mm: mm.clone(),
                        algo: h.algo,
                        a,
                        w: self.bufs.inputs[1],
                        c: residual,
                        d,
                    })))
                })?;
                trials.push(Trial { record: r, steps });
            }
        }
        Ok(trials)
    }

    /// Compares every candidate output with `against` on the device.
    fn compare(
        &self,
        engine: &dyn Engine,
        against: &[DeviceBuffer],
    ) -> Result<Vec<CompareSummary>> {
        let dev = engine.device();
        let mut v = Vec::new();
        for ((desc, got), want) in self.p.outputs.iter().zip(&self.bufs.candidate).zip(against) {
            let rows = crate::ops::gemm_epilogue::compare_blocks(desc.numel());
            let out = TensorDesc {
                name: "compare".into(),
                shape: vec![rows, 4],
                dtype: DType::F32,
                role: Role::Activation,
            };
            let io = LaunchIo {
                inputs: vec![
                    DevTensor { ptr: got.ptr, desc },
                    DevTensor {
                        ptr: want.ptr,
                        desc,
                    },
                ],
                outputs: vec![DevTensor {
                    ptr: self.bufs.compare.ptr,
                    desc: &out,
                }],
                workspace: 0,
                target: Default::default(),
            };
            let mut steps: Vec<Entry> = TuneCompare
                .launches(&io)?
                .into_iter()
                .map(Entry::Kernel)
                .collect();
            engine.run(&mut steps)?;
            let mut bytes = vec![0u8; rows * 16];
            dev.read(self.bufs.compare.ptr, &mut bytes)?;
            v.push(CompareSummary::of(&crate::tensor::decode(
                &bytes,
                DType::F32,
            )));
        }
        Ok(v)
    }

    /// Runs a trial twice: within the bound of ours, and bit-identical across the runs.
    fn check(&self, engine: &dyn Engine, t: &mut Trial) -> Result<()> {
        engine.run(&mut t.steps)?;
        let mut worst = (0f32, 0f32);
        for s in self.compare(engine, &self.bufs.reference)? {
            let limit = BOUND.atol + BOUND.rtol * s.max_ref;
            if s.max_err - limit >= worst.0 - worst.1 || worst == (0.0, 0.0) {
                worst = (s.max_err, limit);
            }
            if !s.within(BOUND) {
                t.record.status = "wrong".into();
                t.record.detail = Some(format!(
                    "max error {:.3e} > {:.3e}{}",
                    s.max_err,
                    limit,
                    if s.non_finite > 0 {
                        format!(", {} non-finite", s.non_finite)
                    } else {
                        String::new()
                    }
                ));
            }
        }
        t.record.max_err = Some(worst.0);
        t.record.limit = Some(worst.1);
        if t.record.status != "ok" {
            return Ok(());
        }
        for (prev, cand) in self.bufs.previous.iter().zip(&self.bufs.candidate) {
            engine.copy(prev.ptr, cand.ptr, cand.bytes)?;
        }
        engine.run(&mut t.steps)?;
        let differing: u64 = self
            .compare(engine, &self.bufs.previous)?
            .iter()
            .map(|s| s.differing)
            .sum();
        if differing > 0 {
            t.record.status = "nondeterministic".into();
            t.record.detail = Some(format!("{differing} elements differ between two runs"));
        }
        Ok(())
    }
}

/// Checks and times every candidate of one GEMM (inputs read from the pools); the entry with
/// its winner: the fastest candidate that passed its checks (the earlier on a tie, ours first).
fn tune_gemm(
    engine: &dyn Engine,
    pools: &Pools,
    p: &GemmProblem,
    opts: &Options,
) -> Result<GemmEntry> {
    let dev = engine.device();
    let prob = Problem::new(&dev, pools, p)?;
    let mut reference = prob.ours(&prob.bufs.reference)?;
    engine.run(&mut reference)?;
    let flops = p.key.flops();
    let mut trials = prob.trials(engine, opts)?;
    let mut ours_seconds = None;
    for t in &mut trials {
        if t.record.status != "ok" {
            continue;
        }
        let checked = prob.check(engine, t);
        if let Err(e) = checked {
            t.record.status = "failed".into();
            t.record.detail = Some(e.to_string());
            continue;
        }
        if t.record.status != "ok" {
            continue;
        }
        let guess = ours_seconds.unwrap_or_else(|| estimate(flops));
        match engine.time(&mut t.steps, iterations(opts, engine, guess)) {
            Ok(s) => {
                t.record.seconds = Some(s);
                t.record.tflops = Some(tflops(flops, s));
                if t.record.kind == "ours" && ours_seconds.is_none() {
                    ours_seconds = Some(s);
                }
            }
            Err(e) => {
                t.record.status = "failed".into();
                t.record.detail = Some(e.to_string());
            }
        }
    }
    let candidates: Vec<Candidate> = trials.into_iter().map(|t| t.record).collect();
    let winner = candidates
        .iter()
        .filter(|c| c.ok())
        .fold(None::<&Candidate>, |best, c| match best {
            Some(b) if b.seconds <= c.seconds => Some(b),
            _ => Some(c),
        })
        .map(|c| c.name.clone())
        .unwrap_or_default();
    Ok(GemmEntry {
        m: p.key.m,
        n: p.key.n,
        k: p.key.k,
        samples: p.key.samples,
        epilogue: p.key.epilogue.name(),
        out_dtype: dtype_name(p.key.out).into(),
        uses: p.uses.clone(),
        candidates,
        winner,
    })
}

/// Times our attention kernel on one shape (the only candidate today; the entry keeps a
/// candidate list for the Hopper kernel and others).
fn tune_attention(
    engine: &dyn Engine,
    p: &AttentionProblem,
    opts: &Options,
    cache: &WeightCache,
) -> Result<AttentionEntry> {
    let s = &p.shape;
    let iters = iterations(opts, engine, s.flops() / 2.5e14);
    let mut r = record("ours/flash".into(), "ours");
    match crate::bench::stages::time_graph(&engine.device(), s.graph.clone(), iters, cache) {
        Ok((seconds, _)) => {
            r.seconds = Some(seconds);
            r.tflops = Some(tflops(s.flops(), seconds));
        }
        Err(e) => {
            r.status = "failed".into();
            r.detail = Some(e.to_string());
        }
    }
    let winner = if r.ok() {
        r.name.clone()
    } else {
        String::new()
    };
    Ok(AttentionEntry {
        batch: s.batch,
        queries: s.queries,
        extra: s.extra,
        heads: s.op.heads,
        head_dim: s.head_dim,
        causal: s.op.causal,
        key_mask: s.op.key_mask,
        uses: p.uses.clone(),
        candidates: vec![r],
        winner,
    })
}

fn ms(s: Option<f64>) -> String {
    s.map_or("-".into(), |s| format!("{:.3} ms", s * 1e3))
}

/// One progress line of a tuned GEMM.
pub fn progress_line(i: usize, total: usize, key_text: &str, e: &GemmEntry) -> String {
    let ours = e.candidates.iter().find(|c| c.kind == "ours" && c.ok());
    let vendor = e
        .candidates
        .iter()
        .filter(|c| c.kind != "ours" && c.ok())
        .min_by(|a, b| a.seconds.partial_cmp(&b.seconds).expect("finite times"));
    let rejected = e
        .candidates
        .iter()
        .filter(|c| matches!(c.status.as_str(), "wrong" | "nondeterministic"))
        .count();
    let rate = |c: Option<&Candidate>| {
        c.and_then(|c| c.tflops)
            .map_or(String::new(), |t| format!(" ({t:.0} TFLOP/s)"))
    };
    let runs: usize = e.uses.iter().map(|u| u.per_image).sum();
    format!(
        "[{i:>3}/{total}] {key_text} ×{runs}: ours {}{}, best other {}{} {}; {} candidates, {rejected} rejected → {}",
        ms(ours.and_then(|c| c.seconds)),
        rate(ours),
        ms(vendor.and_then(|c| c.seconds)),
        rate(vendor),
        vendor.map_or(String::new(), |c| format!("[{}]", c.name)),
        e.candidates.len(),
        if e.winner.is_empty() { "none".into() } else { e.winner.clone() },
    )
}

/// Per size: one image's GEMM time with our kernel alone and with the winners, and its
/// attention time; how many shapes each kind of candidate won.
pub fn summary(table: &Table) -> Vec<String> {
    let mut lines = Vec::new();
    for size in &table.sizes {
        let (mut ours, mut tuned, mut shapes) = (0.0, 0.0, 0);
        let mut wins: std::collections::BTreeMap<String, usize> = Default::default();
        for e in &table.gemm {
            let Some(u) = e.uses.iter().find(|u| &u.size == size) else {
                continue;
            };
            shapes += 1;
            let runs = u.per_image as f64;
            let ours_s = e
                .candidates
                .iter()
                .find(|c| c.kind == "ours" && c.ok())
                .and_then(|c| c.seconds);
            let win = e.candidates.iter().find(|c| c.name == e.winner);
            ours += ours_s.unwrap_or(0.0) * runs;
            tuned += win.and_then(|c| c.seconds).or(ours_s).unwrap_or(0.0) * runs;
            *wins
                .entry(win.map_or("none".into(), |c| c.kind.clone()))
                .or_default() += 1;
        }
        let attention: f64 = table
            .attention
            .iter()
            .filter_map(|e| {
                let u = e.uses.iter().find(|u| &u.size == size)?;
                let c = e.candidates.iter().find(|c| c.name == e.winner)?;
                Some(c.seconds? * u.per_image as f64)
            })
            .sum();
        let wins: Vec<String> = wins.iter().map(|(k, n)| format!("{k} {n}")).collect();
        lines.push(format!(
            "{size}: {shapes} GEMM shapes; GEMMs of one image {ours:.3} s with our kernel, {tuned:.3} s with the winners ({:+.1} %); winners: {}; attention {attention:.3} s",
            if ours > 0.0 { 100.0 * (tuned - ours) / ours } else { 0.0 },
            wins.join(", ")
        ));
    }
    lines
}

/// Tunes every GEMM and attention of a generation at each size on `engine`, printing a
/// progress line per shape to `log`; returns the table.
pub fn tune(
    engine: &dyn Engine,
    cfg: &Configs,
    sizes: &[Size],
    opts: &Options,
    log: &mut dyn Write,
) -> Result<Table> {
    let (gemms, attention) = problems(cfg, sizes)?;
    let sizes: Vec<String> = sizes.iter().map(|s| s.to_string()).collect();
    tune_problems(engine, &sizes, &gemms, &attention, opts, log)
}

/// [`tune`] on given problems (of the generation sizes named in `sizes`).
pub fn tune_problems(
    engine: &dyn Engine,
    sizes: &[String],
    gemms: &[GemmProblem],
    attention: &[AttentionProblem],
    opts: &Options,
    log: &mut dyn Write,
) -> Result<Table> {
    let io = |e: std::io::Error| Error::io("<stdout>", e);
    writeln!(
        log,
        "tuning {} GEMM and {} attention shapes of {} on {}",
        gemms.len(),
        attention.len(),
        sizes.join(", "),
        engine.describe()
    )
    .map_err(io)?;
    let dev = engine.device();
    let pools = Pools::new(&dev, gemms)?;
    let mut gemm_entries = Vec::new();
    for (i, p) in gemms.iter().enumerate() {
        let e = tune_gemm(engine, &pools, p, opts)?;
        writeln!(
            log,
            "{}",
            progress_line(i + 1, gemms.len(), &p.key.describe(), &e)
        )
        .map_err(io)?;
        gemm_entries.push(e);
    }
    drop(pools);
    let cache = WeightCache::new();
    let mut attention_entries = Vec::new();
    for (i, p) in attention.iter().enumerate() {
        let e = tune_attention(engine, p, opts, &cache)?;
        let s = &p.shape;
        let c = &e.candidates[0];
        writeln!(
            log,
            "[{:>3}/{}] attention b{} n{} m{} h{}x{} causal={} mask={}: ours {}{}",
            i + 1,
            attention.len(),
            s.batch,
            s.queries,
            s.extra,
            s.op.heads,
            s.head_dim,
            s.op.causal,
            s.op.key_mask,
            ms(c.seconds),
            c.tflops
                .map_or(String::new(), |t| format!(" ({t:.0} TFLOP/s)")),
        )
        .map_err(io)?;
        attention_entries.push(e);
    }
    Ok(Table {
        format: FORMAT,
        key: engine.key(),
        created: now_utc(),
        sizes: sizes.to_vec(),
        gemm: gemm_entries,
        attention: attention_entries,
    })
}

/// `tune --check`: every cuBLASLt winner of the table `dev` uses, built as a GEMM node builds
/// it ([`crate::tune::dispatch::Dispatch::entries`]: the recorded algorithm through
/// `cublasLtMatmulAlgoCheck`, our passes), run on the shape's inputs against our kernel (the
/// bf16 bound) and twice (bit-identical). One line per shape to `log`; returns (passed,
/// failed). An error when the device uses the built-in rules.
pub fn check_table(
    engine: &super::engine::CudaEngine,
    dev: &Arc<crate::runtime::cuda::CudaDevice>,
    cfg: &Configs,
    log: &mut dyn Write,
) -> Result<(usize, usize)> {
    use super::table::GemmChoice;
    let io_err = |e: std::io::Error| Error::io("<stdout>", e);
    let Some(table) = super::dispatch::of(dev).selection().table() else {
        return Err(Error::InvalidArgument(format!(
            "no tuning table in use: {}",
            super::dispatch::of(dev).selection().describe()
        )));
    };
    let sizes: Vec<Size> = table.sizes.iter().filter_map(|s| s.parse().ok()).collect();
    let (gemms, _) = problems(cfg, &sizes)?;
    let chosen: Vec<GemmProblem> = gemms
        .into_iter()
        .filter(|p| {
            matches!(
                table.gemm(&p.key).and_then(|e| e.choice()),
                Some(GemmChoice::CublasLt(_))
            )
        })
        .collect();
    writeln!(
        log,
        "checking the {} cuBLASLt winners of {} as GEMM nodes run them",
        chosen.len(),
        super::dispatch::of(dev).selection().describe()
    )
    .map_err(io_err)?;
    let device = engine.device();
    let pools = Pools::new(&device, &chosen)?;
    let (mut passed, mut failed) = (0, 0);
    for (i, p) in chosen.iter().enumerate() {
        let prob = Problem::new(&device, &pools, p)?;
        let mut reference = prob.ours(&prob.bufs.reference)?;
        engine.run(&mut reference)?;
        let node = crate::runtime::graph::Node {
            op: p.op.clone(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            workspace: prob.bufs.workspace.bytes,
            label: "tune --check".into(),
        };
        let io = prob.io(&prob.bufs.candidate);
        let winner = table
            .gemm(&p.key)
            .map_or(String::new(), |e| e.winner.clone());
        let mut t = Trial {
            record: record(winner, "cublaslt"),
            steps: Vec::new(),
        };
        match super::dispatch::of(dev).entries(dev, &node, &io, prob.bufs.scratch.ptr)? {
            None => {
                t.record.status = "refused".into();
                t.record.detail = Some("dispatch runs our kernel (see the warning)".into());
            }
            Some(entries) => {
                t.steps = entries;
                if let Err(e) = prob.check(engine, &mut t) {
                    t.record.status = "failed".into();
                    t.record.detail = Some(e.to_string());
                }
            }
        }
        let ok = t.record.status == "ok";
        if ok {
            passed += 1;
        } else {
            failed += 1;
        }
        writeln!(
            log,
            "[{:>3}/{}] {} {}: {}{}{}",
            i + 1,
            chosen.len(),
            p.key.describe(),
            t.record.name,
            t.record.status,
            t.record
                .max_err
                .zip(t.record.limit)
                .map_or(String::new(), |(e, l)| format!(
                    ", max error {e:.3e} (bound {l:.3e})"
                )),
            t.record
                .detail
                .as_ref()
                .map_or(String::new(), |d| format!(" ({d})")),
        )
        .map_err(io_err)?;
    }
    Ok((passed, failed))
}
