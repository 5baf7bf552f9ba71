//! The tiny model's ControlNets (`make-tiny-model` writes them beside the model), with
//! random weights like the rest of the tiny model, projecting to the tiny Stage C's width:
//! Canny in the shape of the `controlnet_canny_tiny` golden case, and super-resolution (a
//! small `large` backbone) with a tiny EfficientNet encoder, inpainting like Canny with four
//! input channels.

use super::ControlKind;
use crate::models::controlnet::{manifest, ControlNetConfig, LargeBottleneck};
use crate::models::effnet::{BlockKind, EffNetConfig, Stage};
use crate::models::effnet_encoder::{self, EffNetEncoderConfig};
use crate::models::Manifest;
use crate::pipeline::tiny::{random_weight, tiny_configs, write_text};
use crate::weights::{write_safetensors, RawTensor, WeightDtype};
use crate::{Error, Result};
use serde::Serialize;
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
        large: LargeBottleneck::default(),
    }
}

/// The tiny super-resolution ControlNet: the tiny encoder's latent through a `large`
/// backbone 32 wide with two blocks, maps at the Canny one's visits.
pub fn tiny_sr_controlnet_config() -> ControlNetConfig {
    ControlNetConfig {
        c_in: tiny_encoder_config().c_latent,
        bottleneck_mode: "large".into(),
        large: LargeBottleneck {
            expand: 48,
            width: 32,
            blocks: 2,
            out: 40,
        },
        ..tiny_controlnet_config()
    }
}

/// The tiny EfficientNet encoder: the tiny ControlNet's stack with an RGB stem, 16 latent
/// channels like the released one.
pub fn tiny_encoder_config() -> EffNetEncoderConfig {
    EffNetEncoderConfig {
        c_latent: 16,
        backbone: tiny_controlnet_config().backbone,
    }
}

/// Writes the tiny ControlNets, the encoder and their configurations into `dir`; returns
/// the names.
pub fn write_tiny_controlnet(dir: &Path, seed: u64) -> Result<Vec<String>> {
    let canny = tiny_controlnet_config();
    let sr = tiny_sr_controlnet_config();
    let encoder = tiny_encoder_config();
    let encoder_file = ControlKind::SuperResolution
        .encoder_file()
        .expect("the SR ControlNet has an encoder");
    let mut names = write_network(
        dir,
        ControlKind::Canny.file(),
        &manifest(&canny)?,
        &canny,
        seed,
    )?;
    names.extend(write_network(
        dir,
        ControlKind::SuperResolution.file(),
        &manifest(&sr)?,
        &sr,
        seed,
    )?);
    let inpaint = ControlNetConfig {
        c_in: 4,
        ..tiny_controlnet_config()
    };
    names.extend(write_network(
        dir,
        ControlKind::Inpainting.file(),
        &manifest(&inpaint)?,
        &inpaint,
        seed,
    )?);
    names.extend(write_network(
        dir,
        encoder_file,
        &effnet_encoder::manifest(&encoder)?,
        &encoder,
        seed,
    )?);
    Ok(names)
}

/// Writes random weights for `manifest` at `file` (bf16; variances positive) and `config`
/// as the `.json` beside it; returns both names.
fn write_network(
    dir: &Path,
    file: &str,
    manifest: &Manifest,
    config: &impl Serialize,
    seed: u64,
) -> Result<Vec<String>> {
    let path = dir.join(file);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let tensors: BTreeMap<String, RawTensor> = manifest
        .iter()
        .map(|(k, s)| {
            let w = random_weight(seed, k, s);
            (k.clone(), RawTensor::from_host(&w, WeightDtype::BF16))
        })
        .collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&path, &tensors, &meta)?;
    let config_name = file.replace(".safetensors", ".json");
    let text = serde_json::to_string_pretty(config).expect("JSON serializes");
    write_text(dir, &config_name, &text)?;
    Ok(vec![file.into(), config_name])
}
