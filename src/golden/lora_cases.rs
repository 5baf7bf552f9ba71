//! `stage_c_lora`: UltraPixel's Stage C (the low-resolution pass with feature capture) with
//! a LoRA merged the official way. The file's `input.lora.*` tensors are the LoRA file as
//! the official trainer saves it; they are written to a real file and loaded through the
//! library's LoRA path (key check, official layer order, α / rank scaling, merge), exactly
//! as `generate --lora` loads one.

use super::*;
use crate::models::Checkpoint;
use crate::pipeline::lora::{LoraSet, LoraSpec, ModelShapes};
use crate::weights::{write_safetensors, RawTensor, WeightDtype};

/// The prefix of the LoRA file's tensors among the case inputs.
const LORA: &str = "lora.";

/// Writes the case's LoRA tensors (under their file keys) as a safetensors file.
pub fn write_lora_file(case: &Case, path: &Path) -> Result<()> {
    let tensors: BTreeMap<String, RawTensor> = case
        .inputs
        .iter()
        .filter_map(|(k, t)| Some((k.strip_prefix(LORA)?.to_string(), t)))
        .map(|(k, t)| (k, RawTensor::from_host(t, WeightDtype::F32)))
        .collect();
    if tensors.is_empty() {
        return Err(case.error(format!("no input.{LORA}* tensors")));
    }
    write_safetensors(path, &tensors, &BTreeMap::new())
}

/// The Stage C weights `case.weights` describe, as the LoRA check sees them.
pub fn manifest(case: &Case) -> crate::models::Manifest {
    let mut m: Vec<_> = case
        .weights
        .iter()
        .map(|(k, t)| (k.clone(), t.shape.clone()))
        .collect();
    m.sort();
    m
}

/// The case's LoRA loaded at scale 1 through the library's LoRA path, checked against
/// `shapes`: its `input.lora.*` tensors written as a LoRA file, with the `<stem>.json` of
/// the `train_tokens` metadata beside it when the case has one.
pub(super) fn load_case_lora(case: &Case, shapes: &ModelShapes) -> Result<LoraSet> {
    let dir = std::env::temp_dir().join(format!(
        "upx-lora-case-{}-{}",
        std::process::id(),
        case.name()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let path = dir.join("lora.safetensors");
    let loaded = write_lora_file(case, &path)
        .and_then(|()| match case.metadata.get("train_tokens") {
            Some(tokens) => {
                let sidecar = format!("{{\"train_tokens\": {tokens}}}");
                let json = path.with_extension("json");
                std::fs::write(&json, sidecar).map_err(|e| Error::io(&json, e))
            }
            None => Ok(()),
        })
        .and_then(|()| LoraSet::load(&[LoraSpec::new(&path, 1.0)], shapes, &dir));
    let _ = std::fs::remove_dir_all(&dir);
    loaded
}

/// The base weights with the case's LoRA merged at scale 1.
fn merged_weights(case: &Case) -> Result<HashMap<String, HostTensor>> {
    let manifest = manifest(case);
    let shapes = ModelShapes {
        stage_c: &manifest,
        text_width: 0,
        vocab: 0,
    };
    let set = load_case_lora(case, &shapes)?;
    let merged = set.stage_c(&case.weights);
    case.weights
        .keys()
        .map(|k| Ok((k.clone(), merged.tensor(k)?)))
        .collect()
}

pub(super) fn stage_c_lora(case: &Case) -> Result<Built> {
    let lora = case.config.get("lora");
    let field = |k: &str| lora.and_then(|l| l.get(k)).and_then(|v| v.as_f64());
    if field("alpha") != Some(crate::pipeline::lora::file::ALPHA as f64) {
        return Err(case.error(format!(
            "config lora.alpha is {:?}; the official LoRA (and this build) uses {}",
            field("alpha"),
            crate::pipeline::lora::file::ALPHA
        )));
    }
    let merged = Case {
        path: case.path.clone(),
        module: case.module.clone(),
        config: case.config.clone(),
        metadata: case.metadata.clone(),
        weights: merged_weights(case)?,
        inputs: case.inputs.clone(),
        outputs: case.outputs.clone(),
    };
    let mut built = super::stage_c::stage_c(&merged, super::stage_c::Pass::LowRes, false)?;
    built.weights = Some(merged.weights);
    Ok(built)
}
