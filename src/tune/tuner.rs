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

use super::cublaslt::{LtMatmul, LtSpec};
use super::engine::{Engine, Step};
use super::problems::{problems, AttentionProblem, Epilogue, GemmProblem};
use super::table::{
    dtype_name, now_utc, AttentionEntry, Candidate, GemmEntry, LtChoice, OurConfig, Table, FORMAT,
};
use crate::bench::{hash, uniform};
use crate::ops::gemm::{Gemm, GemmFilm, GemmScaledA};
use crate::ops::gemm_epilogue::{CompareSummary, GemmEpilogue, GemmScaleA, TuneCompare};
use crate::ops::{DevTensor, LaunchIo, OpImpl};
use crate::pipeline::models::Configs;
use crate::pipeline::Size;
use crate::runtime::device::{Device, DeviceBuffer, WeightCache};
use crate::runtime::graph::{Role, TensorDesc};
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
/// candidate's outputs and a copy of them (determinism), the workspace, the pair's product
/// and scaled operand, the comparison rows.
struct Buffers {
    inputs: Vec<u64>,
    reference: Vec<DeviceBuffer>,
    candidate: Vec<DeviceBuffer>,
    previous: Vec<DeviceBuffer>,
    workspace: DeviceBuffer,
    product: DeviceBuffer,
    scaled_a: Option<DeviceBuffer>,
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
    steps: Vec<Step>,
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

/// The k of a FiLM epilogue and of the operand scaling.
fn film_k(op: &dyn OpImpl) -> f32 {
    op.as_any().downcast_ref::<GemmFilm>().map_or(1.0, |f| f.k)
}

fn scale_k(op: &dyn OpImpl) -> f32 {
    op.as_any()
        .downcast_ref::<GemmScaledA>()
        .map_or(1.0, |s| s.k)
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
        let pair_ws = self::epilogue_op(p)
            .workspace_bytes(&pair_inputs_descs(p, DType::F32).iter().collect::<Vec<_>>());
        let ws = p.op.workspace_bytes(&refs).max(pair_ws);
        let (m, n, k) = (p.key.m, p.key.n, p.key.k);
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
                product: dev.alloc(m * n * 4)?,
                scaled_a: if p.key.epilogue.scaled_a {
                    Some(dev.alloc(m * k * 2)?)
                } else {
                    None
                },
                compare: dev.alloc(crate::ops::gemm_epilogue::compare_blocks(largest) * 16)?,
            },
        })
    }

    fn tensors<'d>(
        descs: &'d [TensorDesc],
        ptrs: impl IntoIterator<Item = u64>,
    ) -> Vec<DevTensor<'d>> {
        descs
            .iter()
            .zip(ptrs)
            .map(|(desc, ptr)| DevTensor { ptr, desc })
            .collect()
    }

    /// Our op's launches, writing into `outs`.
    fn ours(&self, outs: &[DeviceBuffer]) -> Result<Vec<Step>> {
        let io = LaunchIo {
            inputs: Self::tensors(&self.p.inputs, self.bufs.inputs.iter().copied()),
            outputs: Self::tensors(&self.p.outputs, outs.iter().map(|b| b.ptr)),
            workspace: self.bufs.workspace.ptr,
        };
        Ok(self
            .p
            .op
            .launches(&io)?
            .into_iter()
            .map(Step::Kernel)
            .collect())
    }

    /// The vendor product's operand: A, or A scaled by our pass first (its steps).
    fn operand(&self) -> Result<(u64, Vec<Step>)> {
        let p = self.p;
        let a = self.bufs.inputs[0];
        let Some(scaled) = &self.bufs.scaled_a else {
            return Ok((a, Vec::new()));
        };
        let ab = p.inputs.len() - 1;
        let out = TensorDesc {
            name: "scaled A".into(),
            shape: p.inputs[0].shape.clone(),
            dtype: DType::BF16,
            role: Role::Activation,
        };
        let op = GemmScaleA {
            k: scale_k(p.op.as_ref()),
        };
        let io = LaunchIo {
            inputs: vec![
                DevTensor {
                    ptr: a,
                    desc: &p.inputs[0],
                },
                DevTensor {
                    ptr: self.bufs.inputs[ab],
                    desc: &p.inputs[ab],
                },
            ],
            outputs: vec![DevTensor {
                ptr: scaled.ptr,
                desc: &out,
            }],
            workspace: 0,
        };
        Ok((
            scaled.ptr,
            op.launches(&io)?.into_iter().map(Step::Kernel).collect(),
        ))
    }

    /// Our epilogue pass from the product (of dtype `product`) into the candidate outputs.
    fn epilogue_pass(&self, product: DType) -> Result<Vec<Step>> {
        let p = self.p;
        let descs = pair_inputs_descs(p, product);
        let e = p.key.epilogue;
        let mut ptrs = vec![self.bufs.product.ptr];
        let mut next = 2;
        if e.bias {
            ptrs.push(self.bufs.inputs[next]);
            next += 1;
        }
        if e.residual {
            ptrs.push(self.bufs.inputs[next]);
        }
        if e.film {
            ptrs.push(self.bufs.inputs[p.inputs.len() - 1]);
        }
        let io = LaunchIo {
            inputs: Self::tensors(&descs, ptrs),
            outputs: Self::tensors(&p.outputs, self.bufs.candidate.iter().map(|b| b.ptr)),
            workspace: self.bufs.workspace.ptr,
        };
        Ok(epilogue_op(p)
            .launches(&io)?
            .into_iter()
            .map(Step::Kernel)
            .collect())
    }

    /// The stand-in vendor GEMM: our plain kernel into the product buffer.
    fn stand_in_product(&self, a: u64, product: DType) -> Result<Vec<Step>> {
        let p = self.p;
        let (m, n) = (p.key.m, p.key.n);
        let gemm = Gemm {
            bias: false,
            gelu: false,
            residual: false,
            out: product,
        };
        let a_desc = TensorDesc {
            name: "A".into(),
            shape: vec![m, p.key.k],
            dtype: DType::BF16,
            role: Role::Input,
        };
        let out = TensorDesc {
            name: "product".into(),
            shape: vec![m, n],
            dtype: product,
            role: Role::Activation,
        };
        let io = LaunchIo {
            inputs: vec![
                DevTensor {
                    ptr: a,
                    desc: &a_desc,
                },
                DevTensor {
                    ptr: self.bufs.inputs[1],
                    desc: &p.inputs[1],
                },
            ],
            outputs: vec![DevTensor {
                ptr: self.bufs.product.ptr,
                desc: &out,
            }],
            workspace: 0,
        };
        Ok(gemm.launches(&io)?.into_iter().map(Step::Kernel).collect())
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
        // (variant, product dtype, cuBLASLt alone)
        let mut variants: Vec<(&str, DType, bool)> = Vec::new();
        if e.vendor_fusable() && !engine.stand_in() {
            variants.push(("fused", p.key.out, true));
        }
        if e != Epilogue::default() {
            variants.push(("f32", DType::F32, false));
            if p.key.out == DType::BF16 {
                variants.push(("bf16", DType::BF16, false));
            }
        }
        for (variant, product, alone) in variants {
            let (a, mut pre) = if alone {
                (self.bufs.inputs[0], Vec::new())
            } else {
                self.operand()?
            };
            let post = if alone {
                Vec::new()
            } else {
                self.epilogue_pass(product)?
            };
            if engine.stand_in() {
                let mut steps = std::mem::take(&mut pre);
                steps.extend(self.stand_in_product(a, product)?);
                steps.extend(post);
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
            let kind = if alone {
                "cublaslt"
            } else {
                "cublaslt+epilogue"
            };
            let bias_idx = 2;
            let residual_idx = 2 + e.bias as usize;
            let spec = LtSpec {
                m: p.key.m,
                n: p.key.n,
                k: p.key.k,
                product,
                bias: alone && e.bias,
                residual_as_c: alone && e.residual,
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
            let bias_ptr = if spec.bias {
                self.bufs.inputs[bias_idx]
            } else {
                0
            };
            let mm = match LtMatmul::new(spec, bias_ptr) {
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
                Err(err) => {
                    trials.push(failed(err));
                    continue;
                }
            };
            let (c, d) = if alone {
                let c = if spec.residual_as_c {
                    self.bufs.inputs[residual_idx]
                } else {
                    0
                };
                (c, self.bufs.candidate[0].ptr)
            } else {
                (0, self.bufs.product.ptr)
            };
            for (rank, h) in heuristics.iter().enumerate() {
                let mut r = record(format!("cublaslt/{variant}/{rank}"), kind);
                r.cublaslt = Some(LtChoice {
                    product: dtype_name(product).into(),
                    epilogue: if spec.bias { "bias" } else { "default" }.into(),
                    residual_as_c: spec.residual_as_c,
                    scale_a: !alone && e.scaled_a,
                    epilogue_pass: !alone,
                    algo: h.algo.record(h),
                });
                let mut steps: Vec<Step> = Vec::new();
                if !alone {
                    steps.extend(self.operand()?.1);
                }
                steps.push(Step::Lt {
                    mm: mm.clone(),
                    algo: h.algo,
                    a,
                    w: self.bufs.inputs[1],
                    c,
                    d,
                });
                if !alone {
                    steps.extend(self.epilogue_pass(product)?);
                }
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
            };
            let mut steps: Vec<Step> = TuneCompare
                .launches(&io)?
                .into_iter()
                .map(Step::Kernel)
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

/// The epilogue pass that completes a vendor product for this problem.
fn epilogue_op(p: &GemmProblem) -> GemmEpilogue {
    let e = p.key.epilogue;
    GemmEpilogue {
        bias: e.bias,
        gelu: e.gelu,
        residual: e.residual,
        film: e.film.then(|| film_k(p.op.as_ref())),
        grn_stats: e.grn_stats,
        out: p.key.out,
    }
}

/// The epilogue pass's input descriptions: the product (the output's shape), then the
/// problem's bias, residual and FiLM modulation.
fn pair_inputs_descs(p: &GemmProblem, product: DType) -> Vec<TensorDesc> {
    let e = p.key.epilogue;
    let mut v = vec![TensorDesc {
        name: "product".into(),
        shape: p.outputs[0].shape.clone(),
        dtype: product,
        role: Role::Activation,
    }];
    let mut next = 2;
    if e.bias {
        v.push(p.inputs[next].clone());
        next += 1;
    }
    if e.residual {
        v.push(p.inputs[next].clone());
    }
    if e.film {
        v.push(p.inputs[p.inputs.len() - 1].clone());
    }
    v
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
