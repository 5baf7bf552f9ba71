//! The tiny model's Canny ControlNet (`make-tiny-model` writes it beside the model): the
//! shape of the `controlnet_canny_tiny` golden case, projecting to the tiny Stage C's width,
//! with random weights like the rest of the tiny model.

use super::ControlKind;
use crate::models::controlnet::{manifest, ControlNetConfig};
use crate::models::effnet::{BlockKind, EffNetConfig, Stage};
use crate::pipeline::tiny::{random_weight, tiny_configs, write_text};
use crate::weights::{write_safetensors, RawTensor, WeightDtype};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// The tiny ControlNet: a five-stage EfficientNetV2 stack 64 wide, maps at ResBlock visits
/// 0, 1 and 3 of the tiny Stage C (which has four).
pub fn tiny_controlnet_config() -> ControlNetConfig {
    use BlockKind::{Fused, Mb};
    ControlNetConfig {
        c_in: 1,
        c_proj: tiny_configs().stage_c.c_hidden[0],
        proj_blocks: vec![0, 1, 3],
        bottleneck_mode: "effnet".into(),
        backbone: EffNetConfig {
            stem_out: 24,
            stages: vec![
                Stage(Fused, 1, 3, 1, 24, 24, 1),
                Stage(Fused, 4, 3, 2, 24, 16, 2),
                Stage(Mb, 4, 3, 2, 16, 24, 2),
                Stage(Mb, 6, 3, 1, 24, 32, 1),
                Stage(Mb, 6, 3, 2, 32, 40, 1),
            ],
            last_channel: 64,
            ..EffNetConfig::default()
        },
    }
}

/// Writes the tiny Canny ControlNet and its configuration into `dir`; returns the names.
pub fn write_tiny_controlnet(dir: &Path, seed: u64) -> Result<Vec<String>> {
    let cfg = tiny_controlnet_config();
    let file = ControlKind::Canny.file();
    let path = dir.join(file);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let tensors: BTreeMap<String, RawTensor> = manifest(&cfg)?
        .iter()
        .map(|(k, s)| {
            let w = random_weight(seed, k, s);
            (k.clone(), RawTensor::from_host(&w, WeightDtype::BF16))
        })
        .collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&path, &tensors, &meta)?;
    let config = file.replace(".safetensors", ".json");
    let text = serde_json::to_string_pretty(&cfg).expect("JSON serializes");
    write_text(dir, &config, &text)?;
    Ok(vec![file.into(), config])
}
