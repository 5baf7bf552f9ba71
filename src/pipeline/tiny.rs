//! `ultrapixel make-tiny-model DIR`: a complete model directory in the hub layout
//! (docs/ARCHITECTURE.md §9) with tiny configurations and random, well-scaled weights, so the whole
//! pipeline runs anywhere in seconds. Its key sets are what the networks read plus the keys the
//! released files store without using, so loading checks behave as with real files.

use super::open_models::{
    Configs, PREVIEWER_FILE, STAGE_A_FILE, STAGE_B_FILE, STAGE_C_FILE, TEXT_CONFIG_FILE,
    TEXT_ENCODER_FILE, ULTRAPIXEL_FILE,
};
use crate::models::config::{
    ClipTextConfig, InrConfig, PreviewerConfig, StageAConfig, StageBConfig, StageCConfig,
};
use crate::models::{clip_text, previewer, stage_a, stage_b, stage_c, Manifest};
use crate::ops::noise::gaussian_noise_ref;
use crate::tensor::{numel, HostTensor};
use crate::weights::{write_safetensors, RawTensor, WeightDtype};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// The tiny configurations (the shapes of the golden cases: width 32, head size 16 or 8).
pub fn tiny_configs() -> Configs {
    let text = ClipTextConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_attention_heads: 2,
        num_hidden_layers: 2,
        projection_dim: 32,
        ..ClipTextConfig::default()
    };
    let stage_c = StageCConfig {
        c_cond: 32,
        c_hidden: vec![32, 32],
        nhead: vec![2, 2],
        blocks: vec![vec![1, 1], vec![1, 1]],
        c_clip_text: text.hidden_size,
        c_clip_text_pooled: text.projection_dim,
        c_clip_img: 16,
        inr: Some(InrConfig {
            ind: 32,
            ch: 16,
            n_head: 2,
            head_dim: 8,
            n_groups: 4,
            f_dim: 16,
            time_dim: 64,
            t_conds: Vec::new(),
        }),
        ..StageCConfig::default()
    };
    let stage_b = StageBConfig {
        c_cond: 32,
        c_hidden: vec![16, 32, 32, 32],
        nhead: vec![-1, -1, 2, 2],
        blocks: vec![vec![1, 1, 1, 1], vec![1, 1, 1, 1]],
        c_clip: text.projection_dim,
        ..StageBConfig::default()
    };
    let stage_a = StageAConfig {
        bottleneck_blocks: 1,
        c_hidden: 16,
        codebook_size: 16,
        ..StageAConfig::default()
    };
    Configs {
        text,
        stage_c,
        stage_b,
        stage_a,
    }
}

/// The tiny previewer (its hidden width a quarter of the released one's eighth).
pub fn tiny_previewer_config() -> PreviewerConfig {
    PreviewerConfig {
        c_hidden: 32,
        ..PreviewerConfig::default()
    }
}

/// What was written.
pub struct TinyModel {
    pub files: Vec<String>,
    pub tensors: usize,
}

/// Writes the tiny model into `dir` (created if needed); `seed` picks the weights.
pub fn make_tiny_model(dir: &Path, seed: u64) -> Result<TinyModel> {
    let cfg = tiny_configs();
    let preview_cfg = tiny_previewer_config();
    std::fs::create_dir_all(dir.join("text_encoder")).map_err(|e| Error::io(dir, e))?;
    std::fs::create_dir_all(dir.join("tokenizer")).map_err(|e| Error::io(dir, e))?;
    let mut written = TinyModel {
        files: Vec::new(),
        tensors: 0,
    };
    let base = stage_c::manifest(&cfg.stage_c, false)?;
    let inr: Manifest = stage_c::manifest(&cfg.stage_c, true)?
        .into_iter()
        .filter(|k| !base.contains(k))
        .chain(stage_c::unused_guidance_keys(&cfg.stage_c))
        .collect();
    let stage_b_keys: Manifest = stage_b::manifest(&cfg.stage_b)?
        .into_iter()
        .chain(stage_b::unused_keys(&cfg.stage_b))
        .collect();
    let files = [
        (STAGE_C_FILE, base, WeightDtype::BF16),
        (ULTRAPIXEL_FILE, inr, WeightDtype::BF16),
        (STAGE_B_FILE, stage_b_keys, WeightDtype::BF16),
        (
            STAGE_A_FILE,
            stage_a::manifest(&cfg.stage_a)?,
            WeightDtype::F32,
        ),
        (
            TEXT_ENCODER_FILE,
            clip_text::manifest(&cfg.text)?,
            WeightDtype::F32,
        ),
        (
            PREVIEWER_FILE,
            previewer::manifest(&preview_cfg)?
                .into_iter()
                .chain(previewer::unused_keys(&preview_cfg))
                .collect(),
            WeightDtype::F32,
        ),
    ];
    for (name, manifest, dtype) in files {
        let tensors: BTreeMap<String, RawTensor> = manifest
            .iter()
            .map(|(k, s)| {
                (
                    k.clone(),
                    RawTensor::from_host(&random_weight(seed, k, s), dtype),
                )
            })
            .collect();
        written.tensors += tensors.len();
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(&dir.join(name), &tensors, &meta)?;
        written.files.push(name.to_string());
    }
    let mut text_config = serde_json::to_value(&cfg.text).expect("config serializes");
    text_config["architectures"] = serde_json::json!(["CLIPTextModelWithProjection"]);
    let json_files = [
        (
            STAGE_C_FILE.replace(".safetensors", ".json"),
            serde_json::to_value(&cfg.stage_c),
        ),
        (
            STAGE_B_FILE.replace(".safetensors", ".json"),
            serde_json::to_value(&cfg.stage_b),
        ),
        (
            STAGE_A_FILE.replace(".safetensors", ".json"),
            serde_json::to_value(&cfg.stage_a),
        ),
        (TEXT_CONFIG_FILE.to_string(), Ok(text_config)),
        (
            PREVIEWER_FILE.replace(".safetensors", ".json"),
            serde_json::to_value(&preview_cfg),
        ),
    ];
    for (name, value) in json_files {
        let text = serde_json::to_string_pretty(&value.expect("config serializes"))
            .expect("JSON serializes");
        write_text(dir, &name, &text)?;
        written.files.push(name);
    }
    for (name, text) in tokenizer_files()? {
        write_text(dir, &name, &text)?;
        written.files.push(name);
    }
    written
        .files
        .extend(super::tiny_lora::write_tiny_lora(dir, seed)?);
    written
        .files
        .extend(super::control::tiny::write_tiny_controlnet(dir, seed)?);
    Ok(written)
}

pub(super) fn write_text(dir: &Path, name: &str, text: &str) -> Result<()> {
    let path = dir.join(name);
    crate::atomic_file::write_atomic(&path, |out| {
        out.write_all(text.as_bytes())
            .map_err(|e| Error::io(&path, e))
    })
}

/// The `tokenizer/` files of the hub layout, from the embedded tokenizer: its vocabulary,
/// merges and special tokens (pad = `<|endoftext|>`, docs/MODEL.md §5).
fn tokenizer_files() -> Result<Vec<(String, String)>> {
    let json: serde_json::Value = serde_json::from_slice(crate::text::TOKENIZER_JSON)
        .map_err(|e| Error::InvalidArgument(format!("embedded tokenizer: {e}")))?;
    let model = &json["model"];
    let merges: Vec<String> = model["merges"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|p| match p {
                    serde_json::Value::String(s) => s.clone(),
                    other => other
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|x| x.as_str())
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                        .unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default();
    let special = serde_json::json!({
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    });
    let config = serde_json::json!({
        "model_max_length": crate::text::CONTEXT,
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    });
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).expect("JSON serializes");
    Ok(vec![
        ("tokenizer/vocab.json".into(), pretty(&model["vocab"])),
        (
            "tokenizer/merges.txt".into(),
            format!("#version: 0.2\n{}\n", merges.join("\n")),
        ),
        ("tokenizer/special_tokens_map.json".into(), pretty(&special)),
        ("tokenizer/tokenizer_config.json".into(), pretty(&config)),
    ])
}

/// A random parameter of a sensible scale for its role (so activations stay finite through
/// every network): weights ~ N(0, 1/fan_in), biases and scales small, norm gains near 1.
pub(super) fn random_weight(seed: u64, key: &str, shape: &[usize]) -> HostTensor {
    let mut values = vec![0f32; numel(shape)];
    let h = key_hash(key);
    let words = [seed as u32, (seed >> 32) as u32, h as u32, (h >> 32) as u32];
    gaussian_noise_ref(words, &mut values);
    let last = key.rsplit('.').next().unwrap_or(key);
    let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
    let norm_gain = key.contains("norm") && last == "weight" && shape.len() == 1;
    let (scale, offset) = if norm_gain {
        (0.1, 1.0)
    } else if key.starts_with("out_block.") {
        // Stage A's output: mid-grey images with some contrast, rather than saturated ones.
        if last == "bias" {
            (0.05, 0.5)
        } else {
            (0.25 / (fan_in as f32).sqrt(), 0.0)
        }
    } else if last == "bias" || last == "gammas" || last == "gamma" || last == "beta" {
        (0.1, 0.0)
    } else if key.ends_with("embedding.weight") {
        (0.5, 0.0)
    } else {
        ((1.0 / fan_in as f32).sqrt(), 0.0)
    };
    for v in &mut values {
        *v = *v * scale + offset;
    }
    if last == "running_var" {
        // BatchNorm variances are positive.
        values.iter_mut().for_each(|v| *v = 0.5 + v.abs());
    }
    HostTensor::new(shape.to_vec(), values)
}

/// FNV-1a of a key: a stable per-tensor noise stream.
fn key_hash(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}
