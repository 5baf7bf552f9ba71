//! Golden case files (`tests/cases/`, format: the cases README): computations recorded from the
//! official PyTorch code — weights, inputs, expected outputs — run here on any backend and
//! compared with the README's rule. Behind `ultrapixel validate`.
//!
//! The kind comes from the `module` metadata, every size from the tensors and the `config`
//! metadata. An unknown kind is an error, never a pass.

use crate::models::ModelBuilder;
use crate::ops::attention::Attention;
use crate::ops::conv::DwConvLn;
use crate::ops::elementwise::{Act, Activation, Film};
use crate::ops::embed::SinEmbedding;
use crate::ops::gemm::{Gemm, GemmGrnStats, GemmScaledA};
use crate::ops::grn::GrnFromSumsq;
use crate::ops::layout::Concat;
use crate::ops::norm::LayerNorm;
use crate::ops::sampler::CfgCombine;
use crate::runtime::graph::TensorId;
use crate::runtime::session::SessionOptions;
use crate::runtime::{Backend, BackendKind};
use crate::tensor::{DType, HostTensor};
use crate::weights::SafetensorsFile;
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// LayerNorm2d's eps in Stages B and C.
const LN_EPS: f32 = 1e-6;

/// One case file, loaded.
pub struct Case {
    pub path: PathBuf,
    pub module: String,
    pub config: serde_json::Value,
    /// `weights.*` under their state-dict keys.
    pub weights: HashMap<String, HostTensor>,
    pub inputs: BTreeMap<String, HostTensor>,
    pub outputs: BTreeMap<String, HostTensor>,
}

impl Case {
    /// Reads and validates a case file; a malformed file is an error naming it.
    pub fn load(path: &Path) -> Result<Case> {
        let file = SafetensorsFile::open(path)?;
        let fail = |message: String| Error::Case {
            case: path.display().to_string(),
            message,
        };
        let meta = file.metadata();
        let module = meta
            .get("module")
            .cloned()
            .ok_or_else(|| fail("no `module` metadata: not a case file".into()))?;
        let config = match meta.get("config") {
            Some(c) => {
                serde_json::from_str(c).map_err(|e| fail(format!("bad config JSON: {e}")))?
            }
            None => serde_json::Value::Null,
        };
        let (mut weights, mut inputs, mut outputs) =
            (HashMap::new(), BTreeMap::new(), BTreeMap::new());
        for key in file.keys().map(str::to_string).collect::<Vec<_>>() {
            let (group, name) = key.split_once('.').ok_or_else(|| {
                fail(format!(
                    "tensor {key}: expected weights.*, input.* or output.*"
                ))
            })?;
            if name.ends_with("num_batches_tracked") {
                continue; // an unused BatchNorm counter (int64)
            }
            let raw = file.bytes(&key)?;
            let t = if raw.dtype == safetensors::Dtype::I64 {
                // Token ids and masks: small integers, exact in f32.
                let values = raw
                    .data
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().expect("8-byte chunk")) as f32)
                    .collect();
                HostTensor::new(raw.shape.to_vec(), values)
            } else {
                crate::models::Checkpoint::tensor(&file, &key)?
            };
            match group {
                "weights" => weights.insert(name.to_string(), t),
                "input" => inputs.insert(name.to_string(), t),
                "output" => outputs.insert(name.to_string(), t),
                _ => return Err(fail(format!("tensor {key}: unknown group {group}"))),
            };
        }
        if outputs.is_empty() {
            return Err(fail("no output.* tensors".into()));
        }
        Ok(Case {
            path: path.to_path_buf(),
            module,
            config,
            weights,
            inputs,
            outputs,
        })
    }

    fn name(&self) -> String {
        self.path
            .file_stem()
            .map_or_else(|| "case".into(), |s| s.to_string_lossy().into_owned())
    }

    fn input(&self, name: &str) -> Result<&HostTensor> {
        self.inputs
            .get(name)
            .ok_or_else(|| self.error(format!("missing input.{name}")))
    }

    fn config_usize(&self, key: &str) -> Result<usize> {
        self.config
            .get(key)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| self.error(format!("config has no integer `{key}`")))
    }

    fn error(&self, message: String) -> Error {
        Error::Case {
            case: self.path.display().to_string(),
            message,
        }
    }
}

/// Case kinds this build can run.
pub const SUPPORTED_KINDS: &[&str] = &[
    "resblock",
    "feedforwardblock",
    "timestepblock",
    "attnblock",
    "r_embedding",
    "cfg_combine",
    "sampler_step",
    "stage_c_clip_embed",
    "scale_aware_norm",
    "inr_upsampler",
    "stage_a_resblock",
    "stage_a_decode",
    "clip_text",
];

/// Kinds without weights use the f32 rule on every backend.
fn weightless(kind: &str) -> bool {
    matches!(kind, "r_embedding" | "sampler_step" | "cfg_combine")
}

/// The README's f32 (atol, rtol) of a kind.
fn f32_tolerance(kind: &str) -> (f32, f32) {
    match kind {
        "sampler_step" => (1e-4, 1e-4),
        "r_embedding"
        | "scale_aware_norm"
        | "inr_upsampler"
        | "stage_c"
        | "stage_c_ultrapixel_lr"
        | "stage_c_ultrapixel_hr"
        | "stage_b" => (1e-4, 1e-3),
        "sample_ultrapixel" | "sample_stage_b" => (0.0, 2e-3),
        _ => (1e-5, 1e-5),
    }
}

/// One output compared.
#[derive(Clone, Debug)]
pub struct OutputCheck {
    pub case: String,
    pub output: String,
    /// max |out − ref| (f32 rule) or ‖out − ref‖₂/‖ref‖₂ (bf16 rule).
    pub error: f64,
    pub limit: f64,
    pub rule: &'static str,
}

impl OutputCheck {
    pub fn passed(&self) -> bool {
        self.error <= self.limit
    }
}

/// Compares with the f32 rule on the cpu backend (and for weightless kinds), else with the
/// bf16 rule (rel-L2 ≤ 3e-2). Non-finite values fail.
fn compare(
    case: &str,
    kind: &str,
    backend: BackendKind,
    output: &str,
    got: &[f32],
    want: &[f32],
) -> OutputCheck {
    let finite = got.iter().all(|v| v.is_finite()) && got.len() == want.len();
    let (error, limit, rule) = if backend == BackendKind::Cpu || weightless(kind) {
        let (atol, rtol) = f32_tolerance(kind);
        let max_ref = want.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
        let err = got
            .iter()
            .zip(want)
            .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
        (err, atol as f64 + rtol as f64 * max_ref, "max-abs")
    } else {
        let num: f64 = got
            .iter()
            .zip(want)
            .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
            .sum();
        let den: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum();
        ((num / den.max(f64::MIN_POSITIVE)).sqrt(), 3e-2, "rel-L2")
    };
    OutputCheck {
        case: case.to_string(),
        output: output.to_string(),
        error: if finite { error } else { f64::INFINITY },
        limit,
        rule,
    }
}

/// What a kind's graph needs: the recorded model, the inputs to set (in graph layout), and
/// for each case output the graph tensor and how to bring it back to the file's layout.
struct Built {
    mb: ModelBuilder,
    inputs: Vec<(TensorId, Vec<f32>)>,
    outputs: Vec<(String, TensorId, Layout)>,
    /// Outputs computed on the host (the sampler's scalar tables).
    host_outputs: Vec<(String, Vec<f32>)>,
}

impl Built {
    fn graph(
        mb: ModelBuilder,
        inputs: Vec<(TensorId, Vec<f32>)>,
        outputs: Vec<(String, TensorId, Layout)>,
    ) -> Built {
        Built {
            mb,
            inputs,
            outputs,
            host_outputs: Vec::new(),
        }
    }
}

/// How a case tensor maps to a graph tensor.
#[derive(Clone, Copy)]
enum Layout {
    /// Same element order.
    Same,
    /// NCHW in the file, NHWC in the graph.
    Image([usize; 4]),
    /// NCHW in the file, tokens `[B, H·W, C]` in the graph.
    Tokens([usize; 4]),
}

impl Layout {
    fn of_image(t: &HostTensor) -> Result<([usize; 4], Vec<f32>)> {
        let s: [usize; 4] = t.shape.as_slice().try_into().map_err(|_| {
            Error::shape(
                "case",
                format!("expected an NCHW tensor, got {:?}", t.shape),
            )
        })?;
        Ok((s, t.nchw_to_nhwc().data))
    }

    fn back(self, data: Vec<f32>) -> Vec<f32> {
        match self {
            Layout::Same => data,
            Layout::Image([b, c, h, w]) | Layout::Tokens([b, c, h, w]) => {
                HostTensor::new(vec![b, h, w, c], data).nhwc_to_nchw().data
            }
        }
    }
}

/// Runs a case on `backend` and compares every expected output.
pub fn run_case(case: &Case, backend: &Backend) -> Result<Vec<OutputCheck>> {
    let built = match case.module.as_str() {
        "resblock" => resblock(case)?,
        "feedforwardblock" => feedforward(case)?,
        "timestepblock" => timestep(case)?,
        "attnblock" => attnblock(case)?,
        "r_embedding" => r_embedding(case)?,
        "cfg_combine" => cfg_combine(case)?,
        "sampler_step" => sampler_step(case)?,
        "stage_c_clip_embed" => clip_embed(case)?,
        "scale_aware_norm" => scale_aware_norm(case)?,
        "inr_upsampler" => inr_upsampler(case)?,
        "stage_a_resblock" => stage_a_resblock(case)?,
        "stage_a_decode" => stage_a_decode(case)?,
        "clip_text" => clip_text(case)?,
        other => {
            return Err(case.error(format!(
                "unknown or unsupported case kind `{other}` (this build runs: {})",
                SUPPORTED_KINDS.join(", ")
            )))
        }
    };
    let Built {
        mut mb,
        inputs,
        outputs,
        host_outputs,
    } = built;
    for (name, id, _) in &outputs {
        mb.g.output(*id, name)?;
    }
    let (graph, plan) = mb.finish();
    let weights = plan.bind(&case.weights);
    let mut session = backend.session(graph, &weights, SessionOptions { poison: true })?;
    for (id, values) in &inputs {
        session.set_input(*id, values)?;
    }
    session.run()?;
    let name = case.name();
    let mut results = Vec::new();
    for (out, id, layout) in outputs {
        results.push((out, layout.back(session.read(id)?)));
    }
    results.extend(host_outputs);
    let mut checks = Vec::new();
    for (out, got) in results {
        let want = case
            .outputs
            .get(&out)
            .ok_or_else(|| case.error(format!("missing output.{out}")))?;
        checks.push(compare(
            &name,
            &case.module,
            backend.kind(),
            &out,
            &got,
            &want.data,
        ));
    }
    if checks.len() != case.outputs.len() {
        return Err(case.error(format!(
            "{} outputs in the file, {} computed",
            case.outputs.len(),
            checks.len()
        )));
    }
    Ok(checks)
}

/// The ResBlock / FeedForwardBlock MLP with GRN across its two GEMMs, plus the residual:
/// `channelwise.{0,2,4}` of `prefix`. `h` is bf16 `[B, H, W, Cin]`, `x` the f32 residual.
fn grn_mlp(
    mb: &mut ModelBuilder,
    h: TensorId,
    x: TensorId,
    c: usize,
    cin: usize,
) -> Result<TensorId> {
    let hidden = 4 * c;
    let w1 = mb.weight("channelwise.0.weight", &[hidden, cin], DType::BF16)?;
    let b1 = mb.weight("channelwise.0.bias", &[hidden], DType::F32)?;
    let gamma = mb.weight_as(
        "channelwise.2.gamma",
        &[1, 1, 1, hidden],
        &[hidden],
        DType::F32,
    )?;
    let beta = mb.weight_as(
        "channelwise.2.beta",
        &[1, 1, 1, hidden],
        &[hidden],
        DType::F32,
    )?;
    let w2 = mb.weight("channelwise.4.weight", &[c, hidden], DType::BF16)?;
    // GRN's β passes through the second Linear: fold W2·β into its bias.
    let b2 = mb.derived(
        "channelwise.4.bias+W·beta",
        &[c],
        DType::F32,
        &[
            ("channelwise.4.bias", &[c]),
            ("channelwise.4.weight", &[c, hidden]),
            ("channelwise.2.beta", &[1, 1, 1, hidden]),
        ],
        move |t| {
            let (bias, w, beta) = (&t[0].data, &t[1].data, &t[2].data);
            let folded = (0..bias.len())
                .map(|o| {
                    bias[o]
                        + w[o * hidden..][..hidden]
                            .iter()
                            .zip(beta)
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                })
                .collect();
            Ok(HostTensor::new(vec![bias.len()], folded))
        },
    )?;
    let first = Gemm {
        bias: true,
        gelu: true,
        residual: false,
        out: DType::BF16,
    };
    let hs = mb.g.op(GemmGrnStats { gemm: first }, &[h, w1, b1])?;
    let ab =
        mb.g.op1(GrnFromSumsq { eps: LN_EPS }, &[hs[1], gamma, beta])?;
    let second = Gemm {
        bias: true,
        gelu: false,
        residual: true,
        out: DType::F32,
    };
    mb.g.op1(
        GemmScaledA {
            gemm: second,
            k: 1.0,
        },
        &[hs[0], w2, b2, x, ab],
    )
}

fn image_input(
    mb: &mut ModelBuilder,
    case: &Case,
    name: &str,
    dtype: DType,
) -> Result<(TensorId, [usize; 4], Vec<f32>)> {
    let (s @ [b, c, h, w], data) = Layout::of_image(case.input(name)?)?;
    let id = mb.g.input(name, &[b, h, w, c], dtype)?;
    Ok((id, s, data))
}

fn resblock(case: &Case) -> Result<Built> {
    let (c, c_skip, k) = (
        case.config_usize("c")?,
        case.config_usize("c_skip")?,
        case.config_usize("kernel_size")?,
    );
    let mut mb = ModelBuilder::new();
    let (x, shape, xd) = image_input(&mut mb, case, "x", DType::F32)?;
    let mut inputs = vec![(x, xd)];
    let dw_w = mb.weight_as("depthwise.weight", &[c, 1, k, k], &[c, k * k], DType::F32)?;
    let dw_b = mb.weight("depthwise.bias", &[c], DType::F32)?;
    let mut h = mb.g.op1(
        DwConvLn {
            k,
            eps: LN_EPS,
            out: DType::BF16,
        },
        &[x, dw_w, dw_b],
    )?;
    if c_skip > 0 {
        let (skip, _, sd) = image_input(&mut mb, case, "x_skip", DType::BF16)?;
        inputs.push((skip, sd));
        h = mb.g.op1(
            Concat {
                axis: 3,
                out: DType::BF16,
            },
            &[h, skip],
        )?;
    }
    let out = grn_mlp(&mut mb, h, x, c, c + c_skip)?;
    Ok(Built::graph(
        mb,
        inputs,
        vec![("out".into(), out, Layout::Image(shape))],
    ))
}

fn feedforward(case: &Case) -> Result<Built> {
    let c = case.config_usize("c")?;
    let mut mb = ModelBuilder::new();
    let (x, shape, xd) = image_input(&mut mb, case, "x", DType::F32)?;
    let ln = LayerNorm {
        eps: LN_EPS,
        affine: false,
        out: DType::BF16,
    };
    let h = mb.g.op1(ln, &[x])?;
    let out = grn_mlp(&mut mb, h, x, c, c)?;
    Ok(Built::graph(
        mb,
        vec![(x, xd)],
        vec![("out".into(), out, Layout::Image(shape))],
    ))
}

/// TimestepBlock: the mappers of t₀, t₁, … as one GEMM over the concatenated chunks.
fn timestep(case: &Case) -> Result<Built> {
    let (c, ct) = (case.config_usize("c")?, case.config_usize("c_timestep")?);
    let conds: Vec<String> = case
        .config
        .get("conds")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let names: Vec<String> = std::iter::once("mapper".to_string())
        .chain(conds.iter().map(|c| format!("mapper_{c}")))
        .collect();
    let width = ct * names.len();
    let mut mb = ModelBuilder::new();
    let (x, shape, xd) = image_input(&mut mb, case, "x", DType::F32)?;
    let t_in = case.input("t")?;
    let b = shape[0];
    let t = mb.g.input("t", &[b, width], DType::BF16)?;
    let w_keys: Vec<String> = names.iter().map(|n| format!("{n}.weight")).collect();
    let b_keys: Vec<String> = names.iter().map(|n| format!("{n}.bias")).collect();
    let (w_shape, b_shape) = ([2 * c, ct], [2 * c]);
    let w_sources: Vec<(&str, &[usize])> =
        w_keys.iter().map(|k| (k.as_str(), &w_shape[..])).collect();
    let w = mb.derived(
        "mappers.weight (concatenated)",
        &[2 * c, width],
        DType::BF16,
        &w_sources,
        move |ts| {
            let mut out = Vec::with_capacity(2 * c * width);
            for row in 0..2 * c {
                for t in ts {
                    out.extend_from_slice(&t.data[row * ct..][..ct]);
                }
            }
            Ok(HostTensor::new(vec![2 * c, width], out))
        },
    )?;
    let b_sources: Vec<(&str, &[usize])> =
        b_keys.iter().map(|k| (k.as_str(), &b_shape[..])).collect();
    let bias = mb.derived(
        "mappers.bias (summed)",
        &[2 * c],
        DType::F32,
        &b_sources,
        move |ts| {
            let sum = (0..2 * c)
                .map(|i| ts.iter().map(|t| t.data[i]).sum())
                .collect();
            Ok(HostTensor::new(vec![2 * c], sum))
        },
    )?;
    let ab = mb.g.op1(Gemm::linear(DType::F32), &[t, w, bias])?;
    let out = mb.g.op1(
        Film {
            k: 1.0,
            out: DType::F32,
        },
        &[x, ab],
    )?;
    Ok(Built::graph(
        mb,
        vec![(x, xd), (t, t_in.data.clone())],
        vec![("out".into(), out, Layout::Image(shape))],
    ))
}

/// AttnBlock on tokens `[B, H·W, C]` (LayerNorm2d is per pixel, so the token view is exact).
fn attnblock(case: &Case) -> Result<Built> {
    let (c, c_cond, heads) = (
        case.config_usize("c")?,
        case.config_usize("c_cond")?,
        case.config_usize("nhead")?,
    );
    let mut mb = ModelBuilder::new();
    let (shape @ [b, _, h, w], xd) = Layout::of_image(case.input("x")?)?;
    let x = mb.g.input("x", &[b, h * w, c], DType::F32)?;
    let kv_in = case.input("kv")?;
    let s = kv_in.shape.get(1).copied().unwrap_or(0);
    let kv = mb.g.input("kv", &[b, s, c_cond], DType::BF16)?;
    let silu = mb.g.op1(
        Activation {
            act: Act::Silu,
            out: DType::BF16,
        },
        &[kv],
    )?;
    let kv_w = mb.weight("kv_mapper.1.weight", &[c, c_cond], DType::BF16)?;
    let kv_b = mb.weight("kv_mapper.1.bias", &[c], DType::F32)?;
    let mapped = mb.g.op1(Gemm::linear(DType::BF16), &[silu, kv_w, kv_b])?;
    let in_w = mb.weight("attention.attn.in_proj_weight", &[3 * c, c], DType::BF16)?;
    let in_b = mb.weight("attention.attn.in_proj_bias", &[3 * c], DType::F32)?;
    // K and V of the text tokens: rows C..3C of the packed projection.
    let kv_rows = mb.derived(
        "attention.attn.in_proj_weight[k,v]",
        &[2 * c, c],
        DType::BF16,
        &[("attention.attn.in_proj_weight", &[3 * c, c])],
        move |t| Ok(HostTensor::new(vec![2 * c, c], t[0].data[c * c..].to_vec())),
    )?;
    let kv_bias = mb.derived(
        "attention.attn.in_proj_bias[k,v]",
        &[2 * c],
        DType::F32,
        &[("attention.attn.in_proj_bias", &[3 * c])],
        move |t| Ok(HostTensor::new(vec![2 * c], t[0].data[c..].to_vec())),
    )?;
    let extra =
        mb.g.op1(Gemm::linear(DType::BF16), &[mapped, kv_rows, kv_bias])?;
    let ln = LayerNorm {
        eps: LN_EPS,
        affine: false,
        out: DType::BF16,
    };
    let t = mb.g.op1(ln, &[x])?;
    let qkv = mb.g.op1(Gemm::linear(DType::BF16), &[t, in_w, in_b])?;
    let attn = Attention {
        heads,
        causal: false,
        extra_kv: true,
        key_mask: false,
        out: DType::BF16,
    };
    let a = mb.g.op1(attn, &[qkv, extra])?;
    let out_w = mb.weight("attention.attn.out_proj.weight", &[c, c], DType::BF16)?;
    let out_b = mb.weight("attention.attn.out_proj.bias", &[c], DType::F32)?;
    let proj = Gemm {
        bias: true,
        gelu: false,
        residual: true,
        out: DType::F32,
    };
    let out = mb.g.op1(proj, &[a, out_w, out_b, x])?;
    Ok(Built::graph(
        mb,
        vec![(x, xd), (kv, kv_in.data.clone())],
        vec![("out".into(), out, Layout::Tokens(shape))],
    ))
}

/// emb(r) and the Stage C conditioning row [emb(r), emb(0), emb(0)].
fn r_embedding(case: &Case) -> Result<Built> {
    let c = case.config_usize("c_r")?;
    let conds = case
        .config
        .get("t_conds")
        .and_then(|v| v.as_array())
        .map_or(0, |a| a.len());
    let r_in = case.input("r")?;
    let n = r_in.data.len();
    let mut mb = ModelBuilder::new();
    let r = mb.g.input("r", &[n], DType::F32)?;
    let zero = mb.g.input("zero", &[n], DType::F32)?;
    let emb = mb.g.op1(SinEmbedding { c }, &[r])?;
    let emb0 = mb.g.op1(SinEmbedding { c }, &[zero])?;
    let mut parts = vec![emb];
    parts.extend(std::iter::repeat_n(emb0, conds));
    let full = mb.g.op1(
        Concat {
            axis: 1,
            out: DType::F32,
        },
        &parts,
    )?;
    Ok(Built::graph(
        mb,
        vec![(r, r_in.data.clone()), (zero, vec![0.0; n])],
        vec![
            ("emb".into(), emb, Layout::Same),
            ("r_embed_full".into(), full, Layout::Same),
        ],
    ))
}

/// Every (cfg, rho) pair of the config on [cond; uncond].
fn cfg_combine(case: &Case) -> Result<Built> {
    let pairs = case
        .config
        .get("pairs")
        .and_then(|v| v.as_array())
        .ok_or_else(|| case.error("config has no `pairs`".into()))?;
    let (cond, uncond) = (case.input("pred_cond")?, case.input("pred_uncond")?);
    let mut mb = ModelBuilder::new();
    let c = mb.g.input("pred_cond", &cond.shape, DType::F32)?;
    let u = mb.g.input("pred_uncond", &uncond.shape, DType::F32)?;
    let both = mb.g.op1(
        Concat {
            axis: 0,
            out: DType::F32,
        },
        &[c, u],
    )?;
    let mut outputs = Vec::new();
    for p in pairs {
        let (cfg, rho) = match p.as_array().map(|a| (a[0].as_f64(), a[1].as_f64())) {
            Some((Some(cfg), Some(rho))) => (cfg, rho),
            _ => return Err(case.error(format!("bad pair {p}"))),
        };
        let op = CfgCombine {
            cfg: cfg as f32,
            rho: rho as f32,
            per_sample: false,
        };
        let y = mb.g.op1(op, &[both])?;
        outputs.push((format!("pred_cfg{cfg:?}_rho{rho:?}"), y, Layout::Same));
    }
    Ok(Built::graph(
        mb,
        vec![(c, cond.data.clone()), (u, uncond.data.clone())],
        outputs,
    ))
}

/// The GDF scalars on the host (they are what the sampler computes per step) and the DDPM /
/// DDIM update as the graph op.
fn sampler_step(case: &Case) -> Result<Built> {
    use crate::ops::sampler::{logsnr, noise_cond, scalers, DdpmStep, StepCoefficients};
    let (x, pred, noise) = (case.input("x")?, case.input("pred")?, case.input("noise")?);
    let (r, r_prev, range) = (
        case.input("r")?,
        case.input("r_prev")?,
        case.input("r_range_20")?,
    );
    let b = r.data.len();
    let mut mb = ModelBuilder::new();
    let ids: Vec<TensorId> = ["x", "pred", "noise"]
        .iter()
        .map(|n| mb.g.input(n, &x.shape, DType::F32))
        .collect::<Result<_>>()?;
    let coef_ddpm = mb.g.input("coef_ddpm", &[b, 5], DType::F32)?;
    let coef_ddim = mb.g.input("coef_ddim", &[b, 5], DType::F32)?;
    let ddpm = mb.g.op(DdpmStep, &[ids[0], ids[1], ids[2], coef_ddpm])?;
    let ddim = mb.g.op(DdpmStep, &[ids[0], ids[1], ids[2], coef_ddim])?;
    let (mut rows_ddpm, mut rows_ddim) = (Vec::new(), Vec::new());
    for (&t, &tp) in r.data.iter().zip(&r_prev.data) {
        rows_ddpm.extend(StepCoefficients::ddpm(t, tp)?.row());
        rows_ddim.extend(StepCoefficients::ddim(t, tp).row());
    }
    let ls: Vec<f32> = r.data.iter().map(|&t| logsnr(t)).collect();
    let host_outputs = vec![
        ("logSNR".into(), ls.clone()),
        (
            "logSNR_prev".into(),
            r_prev.data.iter().map(|&t| logsnr(t)).collect(),
        ),
        (
            "noise_cond".into(),
            ls.iter().map(|&l| noise_cond(l)).collect(),
        ),
        ("a".into(), ls.iter().map(|&l| scalers(l).0).collect()),
        ("b".into(), ls.iter().map(|&l| scalers(l).1).collect()),
        ("epsilon".into(), pred.data.clone()),
        (
            "logSNR_range_20".into(),
            range.data.iter().map(|&t| logsnr(t)).collect(),
        ),
        (
            "noise_cond_range_20".into(),
            range.data.iter().map(|&t| noise_cond(logsnr(t))).collect(),
        ),
    ];
    Ok(Built {
        mb,
        inputs: vec![
            (ids[0], x.data.clone()),
            (ids[1], pred.data.clone()),
            (ids[2], noise.data.clone()),
            (coef_ddpm, rows_ddpm),
            (coef_ddim, rows_ddim),
        ],
        outputs: vec![
            ("x0".into(), ddpm[0], Layout::Same),
            ("x_next".into(), ddpm[1], Layout::Same),
            ("x_next_ddim".into(), ddim[1], Layout::Same),
        ],
        host_outputs,
    })
}

/// Stage C's conditioning tokens: the text mapper per token, the pooled and image mappers as
/// `c_clip_seq` row blocks each (their outputs are consecutive tokens), then LayerNorm.
fn clip_embed(case: &Case) -> Result<Built> {
    let (cc, seq) = (
        case.config_usize("c_cond")?,
        case.config_usize("c_clip_seq")?,
    );
    let mut mb = ModelBuilder::new();
    let mut inputs = Vec::new();
    let mut tokens = Vec::new();
    for (input, mapper, width_key, blocks) in [
        ("clip_text", "clip_txt_mapper", "c_clip_text", 1),
        (
            "clip_text_pooled",
            "clip_txt_pooled_mapper",
            "c_clip_text_pooled",
            seq,
        ),
        ("clip_img", "clip_img_mapper", "c_clip_img", seq),
    ] {
        let t = case.input(input)?;
        let width = case.config_usize(width_key)?;
        let id = mb.g.input(input, &t.shape, DType::BF16)?;
        inputs.push((id, t.data.clone()));
        let (wkey, bkey) = (format!("{mapper}.weight"), format!("{mapper}.bias"));
        for j in 0..blocks {
            let w = mb.derived(
                &format!("{wkey}[{j}]"),
                &[cc, width],
                DType::BF16,
                &[(&wkey, &[blocks * cc, width])],
                move |t| {
                    Ok(HostTensor::new(
                        vec![cc, width],
                        t[0].data[j * cc * width..][..cc * width].to_vec(),
                    ))
                },
            )?;
            let b = mb.derived(
                &format!("{bkey}[{j}]"),
                &[cc],
                DType::F32,
                &[(&bkey, &[blocks * cc])],
                move |t| {
                    Ok(HostTensor::new(
                        vec![cc],
                        t[0].data[j * cc..][..cc].to_vec(),
                    ))
                },
            )?;
            tokens.push(mb.g.op1(Gemm::linear(DType::F32), &[id, w, b])?);
        }
    }
    let all = mb.g.op1(
        Concat {
            axis: 1,
            out: DType::F32,
        },
        &tokens,
    )?;
    let ln = LayerNorm {
        eps: LN_EPS,
        affine: false,
        out: DType::F32,
    };
    let clip = mb.g.op1(ln, &[all])?;
    Ok(Built::graph(
        mb,
        inputs,
        vec![("clip".into(), clip, Layout::Same)],
    ))
}

/// UltraPixel's scale-aware norm on every `x_*` input: [a | b] = mapper(emb₆₄(s(H·W))), then
/// out = x + (x·(1 + a) + b) = x·(2 + a) + b.
fn scale_aware_norm(case: &Case) -> Result<Built> {
    use crate::ops::embed::scale_signal;
    let c = case.config_usize("c")?;
    let sc = case.config_usize("scale_c")?;
    let mut mb = ModelBuilder::new();
    let w = mb.weight("mapping.mapper.weight", &[2 * c, sc], DType::BF16)?;
    let bias = mb.weight("mapping.mapper.bias", &[2 * c], DType::F32)?;
    let (mut inputs, mut outputs) = (Vec::new(), Vec::new());
    let names: Vec<String> = case
        .inputs
        .keys()
        .filter(|k| k.starts_with("x_"))
        .cloned()
        .collect();
    for name in names {
        let (x, shape @ [b, _, h, wd], xd) = image_input(&mut mb, case, &name, DType::F32)?;
        let s = mb.g.input(&format!("s_{name}"), &[b], DType::F32)?;
        inputs.push((x, xd));
        inputs.push((s, vec![scale_signal(h, wd); b]));
        let out = scale_norm(&mut mb, x, s, w, bias, sc)?;
        outputs.push((format!("out{}", &name[1..]), out, Layout::Image(shape)));
    }
    Ok(Built::graph(mb, inputs, outputs))
}

/// out = x·(2 + a) + b with [a | b] = mapper(emb(s)): the scale-aware norm, `s` the f32 scale
/// signal per sample.
fn scale_norm(
    mb: &mut ModelBuilder,
    x: TensorId,
    s: TensorId,
    w: TensorId,
    bias: TensorId,
    c_r: usize,
) -> Result<TensorId> {
    use crate::ops::layout::Cast;
    let e = mb.g.op1(SinEmbedding { c: c_r }, &[s])?;
    let e = mb.g.op1(Cast { out: DType::BF16 }, &[e])?;
    let ab = mb.g.op1(Gemm::linear(DType::F32), &[e, w, bias])?;
    mb.g.op1(
        Film {
            k: 2.0,
            out: DType::F32,
        },
        &[x, ab],
    )
}

/// `[out, in, 1, 1]` conv weights as a GEMM's `[out, in]`.
fn conv1x1(mb: &mut ModelBuilder, key: &str, out: usize, inp: usize) -> Result<TensorId> {
    mb.weight_as(key, &[out, inp, 1, 1], &[out, inp], DType::BF16)
}

/// An affine LayerNorm (eps 1e-5, `nn.LayerNorm` defaults) with weights under `prefix`.
fn layer_norm(mb: &mut ModelBuilder, prefix: &str, x: TensorId, c: usize) -> Result<TensorId> {
    let g = mb.weight(&format!("{prefix}.weight"), &[c], DType::F32)?;
    let b = mb.weight(&format!("{prefix}.bias"), &[c], DType::F32)?;
    let ln = LayerNorm {
        eps: 1e-5,
        affine: true,
        out: DType::BF16,
    };
    mb.g.op1(ln, &[x, g, b])
}

/// UltraPixel's INR guidance module (`TransInr_withnorm`, spec §3.2): LR tokens and weight
/// tokens through one transformer layer, the modulated hyper-MLP over the HR pixel grid, the
/// fusion with the HR features, the time FiLM, LayerNorm2d and the scale-aware norm.
fn inr_upsampler(case: &Case) -> Result<Built> {
    use crate::ops::elementwise::Add;
    use crate::ops::embed::scale_signal;
    use crate::ops::inr::{CoordPosEnc, HyperMlp, ModulatedWeights, POSENC_WIDTH};
    use crate::ops::layout::{Broadcast, Reshape, Slice};
    use crate::ops::resample::ResizeNearest;
    let (ind, ch, f) = (
        case.config_usize("ind")?,
        case.config_usize("ch")?,
        case.config_usize("f_dim")?,
    );
    let (heads, groups, tdim) = (
        case.config_usize("n_head")?,
        case.config_usize("n_groups")?,
        case.config_usize("time_dim")?,
    );
    let mut mb = ModelBuilder::new();
    let (target, tshape @ [b, _, hh, ww], td) = image_input(&mut mb, case, "target", DType::F32)?;
    let (dtok, [_, _, h, w], dd) = image_input(&mut mb, case, "dtokens", DType::BF16)?;
    let temb_in = case.input("t_emb")?;
    let temb = mb.g.input("t_emb", &[b, tdim], DType::BF16)?;
    let n = h * w;
    let n_w = case
        .weights
        .get("wtokens")
        .map(|t| t.shape[0])
        .ok_or_else(|| case.error("missing weights.wtokens".into()))?;
    let bf = DType::BF16;
    let f32 = DType::F32;

    // A. LR tokens + positional rows.
    let w_in = conv1x1(&mut mb, "input_layer.weight", f, ind)?;
    let b_in = mb.weight("input_layer.bias", &[f], f32)?;
    let u = mb.g.op1(Gemm::linear(bf), &[dtok, w_in, b_in])?;
    let u = mb.g.op1(
        Reshape {
            shape: vec![b, n, f],
        },
        &[u],
    )?;
    let pos = mb.derived(
        "tokenizer.posemb[..n]",
        &[n, f],
        f32,
        &[("tokenizer.posemb", &[1024, f])],
        move |t| Ok(HostTensor::new(vec![n, f], t[0].data[..n * f].to_vec())),
    )?;
    let pos = mb.g.op1(Broadcast { batch: b, out: f32 }, &[pos])?;
    let w_pre = mb.weight("tokenizer.prefc.weight", &[f, f], bf)?;
    let b_pre = mb.weight("tokenizer.prefc.bias", &[f], f32)?;
    let res = Gemm {
        bias: true,
        gelu: false,
        residual: true,
        out: f32,
    };
    let tok = mb.g.op1(res.clone(), &[u, w_pre, b_pre, pos])?;
    let wt = mb.weight("wtokens", &[n_w, f], f32)?;
    let wt = mb.g.op1(Broadcast { batch: b, out: f32 }, &[wt])?;
    let s0 = mb.g.op1(Concat { axis: 1, out: f32 }, &[tok, wt])?;

    // B. One pre-norm transformer layer (no output projection in the attention).
    let layer = "transformer_encoder.layers.0";
    let z = layer_norm(&mut mb, &format!("{layer}.0.norm"), s0, f)?;
    let z = mb.g.op1(
        Activation {
            act: Act::Silu,
            out: bf,
        },
        &[z],
    )?;
    let (q_w, kv_w) = (
        format!("{layer}.0.fn.to_q.1.weight"),
        format!("{layer}.0.fn.to_kv.1.weight"),
    );
    let (q_b, kv_b) = (
        format!("{layer}.0.fn.to_q.1.bias"),
        format!("{layer}.0.fn.to_kv.1.bias"),
    );
    let concat_rows = |t: &[HostTensor]| {
        let mut d = t[0].data.clone();
        d.extend_from_slice(&t[1].data);
        let mut shape = t[0].shape.clone();
        shape[0] += t[1].shape[0];
        Ok(HostTensor::new(shape, d))
    };
    let wqkv = mb.derived(
        "to_qkv.weight",
        &[3 * f, f],
        bf,
        &[(&q_w, &[f, f]), (&kv_w, &[2 * f, f])],
        concat_rows,
    )?;
    let bqkv = mb.derived(
        "to_qkv.bias",
        &[3 * f],
        f32,
        &[(&q_b, &[f]), (&kv_b, &[2 * f])],
        concat_rows,
    )?;
    let qkv = mb.g.op1(Gemm::linear(bf), &[z, wqkv, bqkv])?;
    let a = mb.g.op1(Attention::new(heads, f32), &[qkv])?;
    let s1 = mb.g.op1(Add::plain(f32), &[s0, a])?;
    let z = layer_norm(&mut mb, &format!("{layer}.1.norm"), s1, f)?;
    let w0 = mb.weight(&format!("{layer}.1.fn.net.0.weight"), &[f, f], bf)?;
    let b0 = mb.weight(&format!("{layer}.1.fn.net.0.bias"), &[f], f32)?;
    let hmid = mb.g.op1(
        Gemm {
            bias: true,
            gelu: true,
            residual: false,
            out: bf,
        },
        &[z, w0, b0],
    )?;
    let w3 = mb.weight(&format!("{layer}.1.fn.net.3.weight"), &[f, f], bf)?;
    let b3 = mb.weight(&format!("{layer}.1.fn.net.3.bias"), &[f], f32)?;
    let s2 = mb.g.op1(res.clone(), &[hmid, w3, b3, s1])?;
    let wtok = mb.g.op1(
        Slice {
            axis: 1,
            start: n,
            len: n_w,
            out: f32,
        },
        &[s2],
    )?;

    // C. Modulated hyper-network weights, one layer after the other.
    let dims = [(POSENC_WIDTH, f), (f, ch)];
    let mut start = 0;
    let mut layers = Vec::new();
    for (l, &(din, dout)) in dims.iter().enumerate() {
        let g = groups.min(dout);
        let toks = mb.g.op1(
            Slice {
                axis: 1,
                start,
                len: g,
                out: f32,
            },
            &[wtok],
        )?;
        start += g;
        let z = layer_norm(&mut mb, &format!("wtoken_postfc.wb{l}.0"), toks, f)?;
        let pw = mb.weight(&format!("wtoken_postfc.wb{l}.1.weight"), &[din, f], bf)?;
        let pb = mb.weight(&format!("wtoken_postfc.wb{l}.1.bias"), &[din], f32)?;
        let m = mb.g.op1(Gemm::linear(f32), &[z, pw, pb])?;
        let base = mb.weight(&format!("base_params.wb{l}"), &[din + 1, dout], f32)?;
        layers.push(mb.g.op1(
            ModulatedWeights {
                groups: g,
                out: f32,
            },
            &[base, m],
        )?);
    }

    // D–E. Encoding of the HR grid, hyper-MLP, output layer + nearest-upsampled LR features.
    let pe = mb.g.op1(CoordPosEnc { h: hh, w: ww }, &[])?;
    let r =
        mb.g.op1(HyperMlp { out: bf }, &[pe, layers[0], layers[1]])?;
    let r = mb.g.op1(
        Reshape {
            shape: vec![b, hh, ww, ch],
        },
        &[r],
    )?;
    let up = mb.g.op1(
        ResizeNearest {
            h: hh,
            w: ww,
            out: f32,
        },
        &[dtok],
    )?;
    let w_out = conv1x1(&mut mb, "output_layer.weight", ind, ch)?;
    let b_out = mb.weight("output_layer.bias", &[ind], f32)?;
    let hr = mb.g.op1(res, &[r, w_out, b_out, up])?;
    let cat = mb.g.op1(Concat { axis: 3, out: bf }, &[hr, target])?;
    let t0w = mb.weight("toout.0.weight", &[ind / 4, 2 * ind], bf)?;
    let t0b = mb.weight("toout.0.bias", &[ind / 4], f32)?;
    let o = mb.g.op1(
        Gemm {
            bias: true,
            gelu: true,
            residual: false,
            out: bf,
        },
        &[cat, t0w, t0b],
    )?;
    let t2w = mb.weight("toout.2.weight", &[ind, ind / 4], bf)?;
    let t2b = mb.weight("toout.2.bias", &[ind], f32)?;
    let o = mb.g.op1(Gemm::linear(f32), &[o, t2w, t2b])?;
    let mw = mb.weight("mapp_t.mapper.weight", &[2 * ind, tdim], bf)?;
    let mbias = mb.weight("mapp_t.mapper.bias", &[2 * ind], f32)?;
    let ab = mb.g.op1(Gemm::linear(f32), &[temb, mw, mbias])?;
    let o = mb.g.op1(Film { k: 1.0, out: f32 }, &[o, ab])?;
    let ln = LayerNorm {
        eps: LN_EPS,
        affine: false,
        out: f32,
    };
    let o = mb.g.op1(ln, &[o])?;
    let s = mb.g.input("scale_signal", &[b], f32)?;
    let sw = mb.weight("hr_norm.mapping.mapper.weight", &[2 * ind, tdim], bf)?;
    let sb = mb.weight("hr_norm.mapping.mapper.bias", &[2 * ind], f32)?;
    let out = scale_norm(&mut mb, o, s, sw, sb, tdim)?;
    let inputs = vec![
        (target, td),
        (dtok, dd),
        (temb, temb_in.data.clone()),
        (s, vec![scale_signal(hh, ww); b]),
    ];
    Ok(Built::graph(
        mb,
        inputs,
        vec![("out".into(), out, Layout::Image(tshape))],
    ))
}

/// Stage A's ResBlock on an f32 NHWC stream, its six gammas folded into the weights (spec
/// §2.4): the affine after each LayerNorm moves into the next linear map (replication padding
/// makes every depthwise tap valid, so the shift becomes a bias), the output scales g₂, g₅
/// into the last weights.
fn stage_a_block(
    mb: &mut ModelBuilder,
    prefix: &str,
    x: TensorId,
    c: usize,
    hidden: usize,
) -> Result<TensorId> {
    use crate::ops::conv::{DwConv, Pad};
    use crate::ops::elementwise::Add;
    let key = |k: &str| format!("{prefix}{k}");
    let gammas = key("gammas");
    let (dw_w, dw_b) = (key("depthwise.1.weight"), key("depthwise.1.bias"));
    let w = mb.derived(
        &format!("{dw_w}*gammas"),
        &[c, 9],
        DType::F32,
        &[(&dw_w, &[c, 1, 3, 3]), (&gammas, &[6])],
        |t| {
            let g = &t[1].data;
            let data = t[0].data.iter().map(|&v| v * (1.0 + g[0]) * g[2]).collect();
            Ok(HostTensor::new(vec![t[0].shape[0], 9], data))
        },
    )?;
    let b = mb.derived(
        &format!("{dw_b}*gammas"),
        &[c],
        DType::F32,
        &[(&dw_b, &[c]), (&dw_w, &[c, 1, 3, 3]), (&gammas, &[6])],
        |t| {
            let g = &t[2].data;
            let data = t[0]
                .data
                .iter()
                .zip(t[1].data.chunks_exact(9))
                .map(|(&bias, taps)| (bias + g[1] * taps.iter().sum::<f32>()) * g[2])
                .collect();
            Ok(HostTensor::new(t[0].shape.clone(), data))
        },
    )?;
    let norm = |out| LayerNorm {
        eps: LN_EPS,
        affine: false,
        out,
    };
    let t = mb.g.op1(norm(DType::F32), &[x])?;
    let d = mb.g.op1(
        DwConv {
            k: 3,
            pad: Pad::Replicate,
            out: DType::F32,
        },
        &[t, w, b],
    )?;
    let x = mb.g.op1(Add::plain(DType::F32), &[x, d])?;
    let (w1, b1) = (key("channelwise.0.weight"), key("channelwise.0.bias"));
    let (w2, b2) = (key("channelwise.2.weight"), key("channelwise.2.bias"));
    let w1f = mb.derived(
        &format!("{w1}*gammas"),
        &[hidden, c],
        DType::BF16,
        &[(&w1, &[hidden, c]), (&gammas, &[6])],
        |t| {
            let g = &t[1].data;
            Ok(HostTensor::new(
                t[0].shape.clone(),
                t[0].data.iter().map(|&v| v * (1.0 + g[3])).collect(),
            ))
        },
    )?;
    let b1f = mb.derived(
        &format!("{b1}*gammas"),
        &[hidden],
        DType::F32,
        &[(&b1, &[hidden]), (&w1, &[hidden, c]), (&gammas, &[6])],
        move |t| {
            let g = &t[2].data;
            let data = t[0]
                .data
                .iter()
                .zip(t[1].data.chunks_exact(c))
                .map(|(&bias, row)| bias + g[4] * row.iter().sum::<f32>())
                .collect();
            Ok(HostTensor::new(t[0].shape.clone(), data))
        },
    )?;
    let scaled = |t: &[HostTensor]| {
        let g5 = t[1].data[5];
        Ok(HostTensor::new(
            t[0].shape.clone(),
            t[0].data.iter().map(|&v| v * g5).collect(),
        ))
    };
    let w2f = mb.derived(
        &format!("{w2}*gammas"),
        &[c, hidden],
        DType::BF16,
        &[(&w2, &[c, hidden]), (&gammas, &[6])],
        scaled,
    )?;
    let b2f = mb.derived(
        &format!("{b2}*gammas"),
        &[c],
        DType::F32,
        &[(&b2, &[c]), (&gammas, &[6])],
        scaled,
    )?;
    let v = mb.g.op1(norm(DType::BF16), &[x])?;
    let h = mb.g.op1(
        Gemm {
            bias: true,
            gelu: true,
            residual: false,
            out: DType::BF16,
        },
        &[v, w1f, b1f],
    )?;
    mb.g.op1(
        Gemm {
            bias: true,
            gelu: false,
            residual: true,
            out: DType::F32,
        },
        &[h, w2f, b2f, x],
    )
}

fn stage_a_resblock(case: &Case) -> Result<Built> {
    let (c, hidden) = (case.config_usize("c")?, case.config_usize("c_hidden")?);
    let mut mb = ModelBuilder::new();
    let (x, shape, xd) = image_input(&mut mb, case, "x", DType::F32)?;
    let out = stage_a_block(&mut mb, "", x, c, hidden)?;
    Ok(Built::graph(
        mb,
        vec![(x, xd)],
        vec![("out".into(), out, Layout::Image(shape))],
    ))
}

/// Stage A's decoder (spec §2.4): scale, 1×1 conv, bottleneck blocks, the 4/2/1 transposed
/// conv, one block at half width, the output conv and PixelShuffle(2).
fn stage_a_decode(case: &Case) -> Result<Built> {
    use crate::ops::conv::ConvTranspose2d;
    use crate::ops::layout::PixelShuffle;
    if case.config_usize("levels")? != 2 {
        return Err(case.error("only the released 2-level Stage A is supported".into()));
    }
    let (blocks, c, latent) = (
        case.config_usize("bottleneck_blocks")?,
        case.config_usize("c_hidden")?,
        case.config_usize("c_latent")?,
    );
    let scale = case
        .config
        .get("scale_factor")
        .and_then(|v| v.as_f64())
        .ok_or_else(|| case.error("config has no scale_factor".into()))? as f32;
    let half = c / 2;
    let mut mb = ModelBuilder::new();
    // The GEMM reads 16-byte rows: the 4 latent channels are zero-padded to 8.
    let kp = latent.next_multiple_of(8);
    let ([b, _, h, w], xd) = Layout::of_image(case.input("x")?)?;
    let padded: Vec<f32> = xd
        .chunks_exact(latent)
        .flat_map(|px| {
            px.iter()
                .copied()
                .chain(std::iter::repeat_n(0.0, kp - latent))
        })
        .collect();
    let x = mb.g.input("x", &[b, h, w, kp], DType::BF16)?;
    // The latent scale folds into the first conv.
    let w0 = mb.derived(
        "up_blocks.0.0.weight*scale (padded)",
        &[c, kp],
        DType::BF16,
        &[("up_blocks.0.0.weight", &[c, latent, 1, 1])],
        move |t| {
            let data = t[0]
                .data
                .chunks_exact(latent)
                .flat_map(|row| {
                    row.iter()
                        .map(|&v| v * scale)
                        .chain(std::iter::repeat_n(0.0, kp - latent))
                })
                .collect();
            Ok(HostTensor::new(vec![c, kp], data))
        },
    )?;
    let b0 = mb.weight("up_blocks.0.0.bias", &[c], DType::F32)?;
    let mut y = mb.g.op1(Gemm::linear(DType::F32), &[x, w0, b0])?;
    for i in 1..=blocks {
        y = stage_a_block(&mut mb, &format!("up_blocks.{i}."), y, c, 4 * c)?;
    }
    let up = format!("up_blocks.{}", blocks + 1);
    let wt = mb.weight(&format!("{up}.weight"), &[c, half, 4, 4], DType::F32)?;
    let bt = mb.weight(&format!("{up}.bias"), &[half], DType::F32)?;
    y = mb.g.op1(
        ConvTranspose2d {
            k: 4,
            stride: 2,
            pad: 1,
            out: DType::F32,
        },
        &[y, wt, bt],
    )?;
    y = stage_a_block(
        &mut mb,
        &format!("up_blocks.{}.", blocks + 2),
        y,
        half,
        4 * half,
    )?;
    let yb =
        mb.g.op1(crate::ops::layout::Cast { out: DType::BF16 }, &[y])?;
    let wo = conv1x1(&mut mb, "out_block.0.weight", 12, half)?;
    let bo = mb.weight("out_block.0.bias", &[12], DType::F32)?;
    let o = mb.g.op1(Gemm::linear(DType::F32), &[yb, wo, bo])?;
    let out = mb.g.op1(
        PixelShuffle {
            r: 2,
            out: DType::F32,
        },
        &[o],
    )?;
    Ok(Built::graph(
        mb,
        vec![(x, padded)],
        vec![("out".into(), out, Layout::Image([b, 3, 4 * h, 4 * w]))],
    ))
}

/// CLIP's end-of-text token: the pooled embedding is taken at its first occurrence.
const CLIP_EOS: f32 = 49407.0;

/// The CLIP text transformer (`CLIPTextModelWithProjection`, spec §5), with and without the
/// padding mask: the last layer's output (`clip_text`), after the final LayerNorm, and the
/// projected embedding at the first EOS.
fn clip_text(case: &Case) -> Result<Built> {
    use crate::ops::elementwise::Add;
    use crate::ops::layout::{Broadcast, Embedding, GatherRows};
    let cfg = |k: &str| case.config_usize(k);
    let (c, heads, layers, inter) = (
        cfg("hidden_size")?,
        cfg("num_attention_heads")?,
        cfg("num_hidden_layers")?,
        cfg("intermediate_size")?,
    );
    let (vocab, ctx, proj) = (
        cfg("vocab_size")?,
        cfg("max_position_embeddings")?,
        cfg("projection_dim")?,
    );
    let (ids_in, mask_in) = (case.input("input_ids")?, case.input("attention_mask")?);
    let [b, t] = ids_in.shape[..] else {
        return Err(case.error(format!("input_ids must be [B, T], got {:?}", ids_in.shape)));
    };
    if t > ctx {
        return Err(case.error(format!("{t} tokens exceed the {ctx} positions")));
    }
    let eos: Vec<f32> = ids_in
        .data
        .chunks_exact(t)
        .map(|row| row.iter().position(|&v| v == CLIP_EOS).unwrap_or(t - 1) as f32)
        .collect();
    let (f32t, bf) = (DType::F32, DType::BF16);
    let mut mb = ModelBuilder::new();
    let ids = mb.g.input("input_ids", &[b, t], f32t)?;
    let mask = mb.g.input("attention_mask", &[b, t], f32t)?;
    let eos_at = mb.g.input("eos_position", &[b], f32t)?;
    let m = "text_model";
    let table = mb.weight(
        &format!("{m}.embeddings.token_embedding.weight"),
        &[vocab, c],
        f32t,
    )?;
    let pos_key = format!("{m}.embeddings.position_embedding.weight");
    let pos = mb.derived(
        &format!("{pos_key}[..T]"),
        &[t, c],
        f32t,
        &[(&pos_key, &[ctx, c])],
        move |x| Ok(HostTensor::new(vec![t, c], x[0].data[..t * c].to_vec())),
    )?;
    let tok = mb.g.op1(Embedding { out: f32t }, &[ids, table])?;
    let pos = mb.g.op1(
        Broadcast {
            batch: b,
            out: f32t,
        },
        &[pos],
    )?;
    let h0 = mb.g.op1(Add::plain(f32t), &[tok, pos])?;
    let w_proj = mb.weight("text_projection.weight", &[proj, c], bf)?;
    let mut outputs = Vec::new();
    for (suffix, masked) in [("", true), ("_nomask", false)] {
        let mut h = h0;
        for l in 0..layers {
            let p = format!("{m}.encoder.layers.{l}");
            let z = layer_norm(&mut mb, &format!("{p}.layer_norm1"), h, c)?;
            let keys: Vec<String> = ["q", "k", "v"]
                .iter()
                .map(|x| format!("{p}.self_attn.{x}_proj"))
                .collect();
            let (ws, bs): (Vec<String>, Vec<String>) = keys
                .iter()
                .map(|k| (format!("{k}.weight"), format!("{k}.bias")))
                .unzip();
            let (wshape, bshape) = ([c, c], [c]);
            let wsrc: Vec<(&str, &[usize])> =
                ws.iter().map(|k| (k.as_str(), &wshape[..])).collect();
            let bsrc: Vec<(&str, &[usize])> =
                bs.iter().map(|k| (k.as_str(), &bshape[..])).collect();
            let stack = |x: &[HostTensor]| {
                let data: Vec<f32> = x.iter().flat_map(|t| t.data.iter().copied()).collect();
                let mut shape = x[0].shape.clone();
                shape[0] *= x.len();
                Ok(HostTensor::new(shape, data))
            };
            let wqkv = mb.derived(
                &format!("{p}.self_attn.qkv.weight"),
                &[3 * c, c],
                bf,
                &wsrc,
                stack,
            )?;
            let bqkv = mb.derived(
                &format!("{p}.self_attn.qkv.bias"),
                &[3 * c],
                f32t,
                &bsrc,
                stack,
            )?;
            let qkv = mb.g.op1(Gemm::linear(bf), &[z, wqkv, bqkv])?;
            let attn = Attention {
                heads,
                causal: true,
                extra_kv: false,
                key_mask: masked,
                out: bf,
            };
            let a = if masked {
                mb.g.op1(attn, &[qkv, mask])?
            } else {
                mb.g.op1(attn, &[qkv])?
            };
            let ow = mb.weight(&format!("{p}.self_attn.out_proj.weight"), &[c, c], bf)?;
            let ob = mb.weight(&format!("{p}.self_attn.out_proj.bias"), &[c], f32t)?;
            let res = Gemm {
                bias: true,
                gelu: false,
                residual: true,
                out: f32t,
            };
            h = mb.g.op1(res.clone(), &[a, ow, ob, h])?;
            let z = layer_norm(&mut mb, &format!("{p}.layer_norm2"), h, c)?;
            let w1 = mb.weight(&format!("{p}.mlp.fc1.weight"), &[inter, c], bf)?;
            let b1 = mb.weight(&format!("{p}.mlp.fc1.bias"), &[inter], f32t)?;
            let u = mb.g.op1(
                Gemm {
                    bias: true,
                    gelu: true,
                    residual: false,
                    out: bf,
                },
                &[z, w1, b1],
            )?;
            let w2 = mb.weight(&format!("{p}.mlp.fc2.weight"), &[c, inter], bf)?;
            let b2 = mb.weight(&format!("{p}.mlp.fc2.bias"), &[c], f32t)?;
            h = mb.g.op1(res, &[u, w2, b2, h])?;
        }
        let fg = mb.weight(&format!("{m}.final_layer_norm.weight"), &[c], f32t)?;
        let fb = mb.weight(&format!("{m}.final_layer_norm.bias"), &[c], f32t)?;
        let last = mb.g.op1(
            LayerNorm {
                eps: 1e-5,
                affine: true,
                out: f32t,
            },
            &[h, fg, fb],
        )?;
        let pooled = mb.g.op1(GatherRows { out: bf }, &[last, eos_at])?;
        let no_bias = Gemm {
            bias: false,
            gelu: false,
            residual: false,
            out: f32t,
        };
        let embeds = mb.g.op1(no_bias, &[pooled, w_proj])?;
        outputs.push((format!("clip_text{suffix}"), h, Layout::Same));
        outputs.push((format!("last_hidden_state{suffix}"), last, Layout::Same));
        outputs.push((format!("text_embeds{suffix}"), embeds, Layout::Same));
    }
    let inputs = vec![
        (ids, ids_in.data.clone()),
        (mask, mask_in.data.clone()),
        (eos_at, eos),
    ];
    Ok(Built::graph(mb, inputs, outputs))
}
