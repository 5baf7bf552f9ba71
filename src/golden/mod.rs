//! Golden case files (`tests/cases/`, format: `tests/cases/README.md`): computations recorded
//! from the official PyTorch code — weights, inputs, expected outputs — run here on any backend
//! and compared with that README's rule. Behind `ultrapixel validate`.
//!
//! The kind comes from the `module` metadata, every size from the tensors and the `config`
//! metadata. An unknown kind is an error, never a pass.

mod blocks;
mod clip;
mod control_cases;
mod effnet;
mod inr;
mod lora_cases;
mod sampler_cases;
mod sampling_loop_cases;
mod stage_a;
mod stage_b;
mod stage_c;

pub use lora_cases::{manifest as lora_case_manifest, write_lora_file};

use crate::models::ModelBuilder;
use crate::ops::layout::Concat;
use crate::ops::sampler::CfgCombine;
use crate::runtime::graph::TensorId;
use crate::runtime::session::SessionOptions;
use crate::runtime::{Backend, BackendKind};
use crate::tensor::{DType, HostTensor};
use crate::weights::SafetensorsFile;
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// One case file, loaded.
pub struct Case {
    pub path: PathBuf,
    pub module: String,
    pub config: serde_json::Value,
    /// Every metadata field (informational ones included).
    pub metadata: BTreeMap<String, String>,
    /// `weights.*` under their state-dict keys.
    pub weights: HashMap<String, HostTensor>,
    pub inputs: BTreeMap<String, HostTensor>,
    pub outputs: BTreeMap<String, HostTensor>,
}

impl Case {
    /// Reads and validates a case file; a malformed file is an error naming it.
    pub fn load(path: &Path) -> Result<Case> {
        Self::from_file(path, SafetensorsFile::open(path)?)
    }

    /// A case from an opened file (`path` names it).
    pub fn from_file(path: &Path, file: SafetensorsFile) -> Result<Case> {
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
            metadata: meta.clone().into_iter().collect(),
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

    fn config_usize_list(&self, key: &str) -> Result<Vec<usize>> {
        let fail = || self.error(format!("config `{key}` must be a list of integers"));
        self.config
            .get(key)
            .and_then(|v| v.as_array())
            .ok_or_else(fail)?
            .iter()
            .map(|v| v.as_u64().map(|v| v as usize).ok_or_else(fail))
            .collect()
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
    "clip_text_retoken",
    "stage_c",
    "stage_c_ultrapixel_lr",
    "stage_c_ultrapixel_hr",
    "stage_b",
    "sample_ultrapixel",
    "sample_stage_b",
    "canny_filter",
    "control_image_resize",
    "stage_c_lora",
    "effnet_conv_bn_silu",
    "effnet_fused_mbconv",
    "effnet_mbconv",
    "controlnet",
    "stage_c_ultrapixel_lr_control",
    "stage_c_ultrapixel_hr_control",
];

/// Kinds without weights use the f32 rule on every backend.
fn weightless(kind: &str) -> bool {
    matches!(
        kind,
        "r_embedding" | "sampler_step" | "cfg_combine" | "canny_filter" | "control_image_resize"
    )
}

/// The f32 (atol, rtol) of a kind (`tests/cases/README.md`, docs/MODEL.md §8.2).
fn f32_tolerance(kind: &str) -> (f32, f32) {
    match kind {
        "sampler_step" => (1e-4, 1e-4),
        "r_embedding"
        | "scale_aware_norm"
        | "inr_upsampler"
        | "stage_c"
        | "stage_c_ultrapixel_lr"
        | "stage_c_ultrapixel_hr"
        | "stage_c_lora"
        | "stage_c_ultrapixel_lr_control"
        | "stage_c_ultrapixel_hr_control"
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
/// Graph inputs and the values to set them to.
type Inputs = Vec<(TensorId, Vec<f32>)>;

struct Built {
    mb: ModelBuilder,
    inputs: Vec<(TensorId, Vec<f32>)>,
    outputs: Vec<(String, TensorId, Layout)>,
    /// Outputs computed on the host (the sampler's scalar tables).
    host_outputs: Vec<(String, Vec<f32>)>,
    /// The weights to bind instead of the file's (a merged LoRA).
    weights: Option<HashMap<String, HostTensor>>,
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
            weights: None,
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
            Layout::Image([b, c, h, w]) => {
                HostTensor::new(vec![b, h, w, c], data).nhwc_to_nchw().data
            }
        }
    }
}

/// Runs a case on `backend` and compares every expected output.
pub fn run_case(case: &Case, backend: &Backend) -> Result<Vec<OutputCheck>> {
    let results = match case.module.as_str() {
        "sample_ultrapixel" => sampling_loop_cases::sample_ultrapixel(case, backend)?,
        "sample_stage_b" => sampling_loop_cases::sample_stage_b(case, backend)?,
        "canny_filter" => control_cases::canny(case)?,
        "control_image_resize" => control_cases::resize(case)?,
        _ => run_graph_case(case, backend)?,
    };
    let name = case.name();
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

/// A kind computed by one graph run: its outputs in the file's layout.
fn run_graph_case(case: &Case, backend: &Backend) -> Result<Vec<(String, Vec<f32>)>> {
    let built = match case.module.as_str() {
        "resblock" => blocks::resblock(case)?,
        "feedforwardblock" => blocks::feedforward(case)?,
        "timestepblock" => blocks::timestep(case)?,
        "attnblock" => blocks::attnblock(case)?,
        "r_embedding" => blocks::r_embedding(case)?,
        "cfg_combine" => sampler_cases::cfg_combine(case)?,
        "sampler_step" => sampler_cases::sampler_step(case)?,
        "stage_c_clip_embed" => blocks::clip_embed(case)?,
        "scale_aware_norm" => blocks::scale_aware_norm(case)?,
        "inr_upsampler" => inr::inr_upsampler(case)?,
        "stage_a_resblock" => stage_a::stage_a_resblock(case)?,
        "stage_a_decode" => stage_a::stage_a_decode(case)?,
        "clip_text" => clip::clip_text(case)?,
        "clip_text_retoken" => clip::clip_text_retoken(case)?,
        "stage_c" => stage_c::stage_c(case, stage_c::Pass::Plain, false)?,
        "stage_c_ultrapixel_lr" => stage_c::stage_c(case, stage_c::Pass::LowRes, false)?,
        "stage_c_ultrapixel_hr" => stage_c::stage_c(case, stage_c::Pass::HighRes, false)?,
        "stage_c_ultrapixel_lr_control" => stage_c::stage_c(case, stage_c::Pass::LowRes, true)?,
        "stage_c_ultrapixel_hr_control" => stage_c::stage_c(case, stage_c::Pass::HighRes, true)?,
        "effnet_conv_bn_silu" => effnet::conv_bn_silu_case(case)?,
        "effnet_fused_mbconv" => effnet::block_case(case, true)?,
        "effnet_mbconv" => effnet::block_case(case, false)?,
        "controlnet" => effnet::controlnet_case(case)?,
        "stage_b" => stage_b::stage_b(case)?,
        "stage_c_lora" => lora_cases::stage_c_lora(case)?,
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
        weights,
    } = built;
    for (name, id, _) in &outputs {
        mb.g.output(*id, name)?;
    }
    let (graph, plan) = mb.finish();
    let weights = plan.bind(weights.as_ref().unwrap_or(&case.weights));
    let mut session = backend.session(graph, &weights, SessionOptions { poison: true })?;
    for (id, values) in &inputs {
        session.set_input(*id, values)?;
    }
    session.run()?;
    let mut results = Vec::new();
    for (out, id, layout) in outputs {
        results.push((out, layout.back(session.read(id)?)));
    }
    results.extend(host_outputs);
    Ok(results)
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
