//! `ultrapixel tune`: every candidate of every distinct GEMM and attention shape, checked
//! against our kernel and timed, and the table of winners.
//!
//! Per GEMM (with its epilogue): our kernel in each compiled tile configuration; our Hopper
//! kernel in each tile width ([`sm90a_widths`]) where the shape qualifies and the device runs
//! it (compute capability 9.0, or the emulator), after its operand-scaling pass for a GEMM
//! that modulates A (the winner's width is the one a GEMM node then runs); cuBLASLt's
//! top heuristics alone where its own epilogue covers the op (bias; a residual as C with
//! β = 1); and cuBLASLt's product (f32, or bf16 where the output is bf16) followed by our
//! epilogue pass for everything else (exact GELU, FiLM, GRN sums; our operand-scaling pass
//! first for the GRN-modulated GEMM). The pair is what runs at generation time, so the pair is
//! what is timed. Every candidate is first run on the same inputs as our kernel and compared
//! on the device: more than the bf16 bound away from ours, or two runs that differ in any bit,
//! and it cannot win. Times are device time over CUDA-graph replays, the iteration count
//! chosen so each candidate replays for about `target` seconds.

use super::checking::{measure, record, Outputs, Trial};
use super::dispatch::{pair_entries, plan_layout, sm90a_entries, PairPlan, Sm90aGemm};
use super::engine::Engine;
use super::pair;
use super::problems::{problems, AttentionProblem, Epilogue, GemmKey, GemmProblem};
use super::table::{
    dtype_name, now_utc, sm90a_candidate, Candidate, GemmEntry, LtChoice, OurConfig, Table, FORMAT,
    OURS, OURS_SM90A,
};
use crate::bench::{hash, uniform};
use crate::ops::gemm_sm90a::{self, TileWidth};
use crate::pipeline::open_models::Configs;
use crate::pipeline::Size;
use crate::runtime::cuda::cublaslt::{LtCall, LtMatmul, LtSpec};
use crate::runtime::device::{Device, DeviceBuffer};
use crate::runtime::graph::{DevTensor, LaunchIo, OpImpl, TensorDesc};
use crate::runtime::kernel_choice::KernelChoice;
use crate::runtime::launch::Entry;
use crate::tensor::{encode, DType};
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

/// Our portable GEMM kernel's compiled tile configurations, in the order they are tried. The
/// kernel is compiled in one today (kernels/gemm.cu).
pub fn our_configs() -> Vec<OurConfig> {
    vec![OurConfig {
        name: "128x128x32s3".into(),
        tile: [128, 128, 32],
        stages: 3,
        mma: "mma.sync".into(),
    }]
}

/// The tile widths of our Hopper GEMM timed for a GEMM: every width but those a narrower one
/// beats by construction (as many column tiles, more padding: `TileWidth::pads_only`), so
/// each GEMM adds at most three candidates (two where N ≤ 128, one where N ≤ 64).
pub fn sm90a_widths(key: &GemmKey) -> Vec<TileWidth> {
    TileWidth::ALL
        .into_iter()
        .filter(|w| !w.pads_only(key.n))
        .collect()
}

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

/// The buffers of one problem: inputs in the pools, the outputs, the workspace, the scratch
/// (of the pairs, and of the Hopper GEMM's scaled A).
struct Buffers {
    inputs: Vec<u64>,
    outputs: Outputs,
    workspace: DeviceBuffer,
    /// The pairs' f32 product and scaled operand (as a GEMM node's scratch).
    scratch: DeviceBuffer,
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

struct Problem<'a> {
    p: &'a GemmProblem,
    bufs: Buffers,
}

impl<'a> Problem<'a> {
    fn new(engine: &dyn Engine, pools: &Pools, p: &'a GemmProblem) -> Result<Self> {
        let dev = engine.device();
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
        // The tuner's launches are the portable kernels'.
        let portable = crate::runtime::kernel_choice::KernelChoice::Portable;
        let pass_ws = pair::epilogue_op(p.op.as_ref(), &p.key).workspace_bytes(&pass_ins, portable);
        let ws = p.op.workspace_bytes(&refs, portable).max(pass_ws);
        let widest = PairPlan {
            product: DType::F32,
            scale_a: p.key.epilogue.scaled_a,
            epilogue_pass: true,
        };
        let scratch = plan_layout(&p.key, widest).bytes;
        Ok(Problem {
            p,
            bufs: Buffers {
                inputs: p
                    .inputs
                    .iter()
                    .enumerate()
                    .map(|(i, d)| pools.input(i, d.dtype))
                    .collect(),
                outputs: Outputs::new(engine, &p.outputs)?,
                workspace: dev.alloc(ws.max(256))?,
                scratch: dev.alloc(scratch.max(256))?,
            },
        })
    }

    /// The op's inputs (in the pools) and outputs (`outs`), and the workspace, for portable
    /// launches.
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

    /// Our op's launches built for `sm90a` in tile width `width` on the engine's device, as a
    /// GEMM node whose winner is that candidate runs them ([`sm90a_entries`]: a scaled A in
    /// the scratch), into the candidate outputs; None when they would not run the Hopper GEMM
    /// (the shape does not qualify, or the device cannot run it).
    fn sm90a(&self, engine: &dyn Engine, width: TileWidth) -> Result<Option<Vec<Entry>>> {
        let mut io = self.io(&self.bufs.outputs.candidate);
        io.target = engine.device().kernel_target();
        let gemm = Sm90aGemm {
            key: self.p.key,
            width,
        };
        let steps = sm90a_entries(self.p.op.as_ref(), Some(&gemm), &io, self.bufs.scratch.ptr)?
            .unwrap_or_default();
        let hopper = steps.iter().any(|e| match e {
            Entry::Kernel(l) => gemm_sm90a::width_of(l) == Some(width),
            _ => false,
        });
        Ok(hopper.then_some(steps))
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
            &self.io(&self.bufs.outputs.candidate),
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
            let mut r = record(format!("ours/{}", config.name), OURS);
            r.config = Some(config);
            trials.push(Trial {
                record: r,
                steps: self.ours(&self.bufs.outputs.candidate)?,
            });
        }
        for width in sm90a_widths(&p.key) {
            if let Some(steps) = self.sm90a(engine, width)? {
                let mut r = record(sm90a_candidate(width), OURS_SM90A);
                r.config = Some(OurConfig::sm90a(width));
                trials.push(Trial { record: r, steps });
            }
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
}

/// Checks and times every candidate of one GEMM (inputs read from the pools); the entry with
/// its winner: the fastest candidate that passed its checks (the earlier on a tie, ours first).
fn tune_gemm(
    engine: &dyn Engine,
    pools: &Pools,
    p: &GemmProblem,
    opts: &Options,
) -> Result<GemmEntry> {
    let prob = Problem::new(engine, pools, p)?;
    let mut reference = prob.ours(&prob.bufs.outputs.reference)?;
    engine.run(&mut reference)?;
    let flops = p.key.flops();
    let trials = prob.trials(engine, opts)?;
    let (candidates, winner) = measure(
        engine,
        &prob.bufs.outputs,
        trials,
        flops,
        estimate(flops),
        &|guess| iterations(opts, engine, guess),
    );
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

fn ms(s: Option<f64>) -> String {
    s.map_or("-".into(), |s| format!("{:.3} ms", s * 1e3))
}

/// One progress line of a tuned GEMM.
pub fn progress_line(i: usize, total: usize, key_text: &str, e: &GemmEntry) -> String {
    let ours = e.candidates.iter().find(|c| c.kind == OURS && c.ok());
    let vendor = e
        .candidates
        .iter()
        .filter(|c| c.kind != OURS && c.ok())
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
                .find(|c| c.kind == OURS && c.ok())
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
    let mut attention_entries = Vec::new();
    for (i, p) in attention.iter().enumerate() {
        let e =
            super::attention::tune_attention(engine, p, &|guess| iterations(opts, engine, guess))?;
        writeln!(
            log,
            "{}",
            super::attention::progress_line(i + 1, attention.len(), p, &e)
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

/// `tune --check`: every cuBLASLt and Hopper-kernel GEMM winner of the table `dev` uses, built
/// as a GEMM node builds it under `UPX_KERNELS=auto` ([`crate::tune::dispatch::Dispatch::entries`]:
/// the recorded algorithm through `cublasLtMatmulAlgoCheck` and our passes, or the op's
/// launches for `sm90a`), run on the shape's inputs against our portable kernel (the bf16
/// bound) and twice (bit-identical). One line per shape to `log`; returns (passed, failed).
/// An error when the device uses the built-in rules.
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
                Some(GemmChoice::CublasLt(_) | GemmChoice::OursSm90a(_))
            )
        })
        .collect();
    writeln!(
        log,
        "checking the {} cuBLASLt and sm_90a winners of {} as GEMM nodes run them",
        chosen.len(),
        super::dispatch::of(dev).selection().describe()
    )
    .map_err(io_err)?;
    let device = engine.device();
    let pools = Pools::new(&device, &chosen)?;
    let (mut passed, mut failed) = (0, 0);
    for (i, p) in chosen.iter().enumerate() {
        let prob = Problem::new(engine, &pools, p)?;
        let mut reference = prob.ours(&prob.bufs.outputs.reference)?;
        engine.run(&mut reference)?;
        let node = crate::runtime::graph::Node {
            op: p.op.clone(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            workspace: prob.bufs.workspace.bytes,
            label: "tune --check".into(),
        };
        // The table's winner whatever UPX_KERNELS says.
        let mut io = prob.io(&prob.bufs.outputs.candidate);
        io.target = device.kernel_target().with_choice(KernelChoice::Auto);
        let winner = table
            .gemm(&p.key)
            .and_then(|e| e.candidates.iter().find(|c| c.name == e.winner))
            .map_or_else(
                || record(String::new(), ""),
                |c| record(c.name.clone(), &c.kind),
            );
        let mut t = Trial {
            record: winner,
            steps: Vec::new(),
        };
        match super::dispatch::of(dev).entries(dev, &node, &io, prob.bufs.scratch.ptr)? {
            None => {
                t.record.status = "refused".into();
                t.record.detail = Some("dispatch runs our kernel (see the warning)".into());
            }
            Some(entries) => {
                t.steps = entries;
                if let Err(e) = prob.bufs.outputs.check(engine, &mut t) {
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
