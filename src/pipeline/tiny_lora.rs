//! The tiny model's LoRA (`make-tiny-model` writes it beside the model): a rank-2 update of
//! every layer the official trainers wrap, stored the way UltraPixel's `lora_cat` is
//! (`module.<i>.lora_down` / `lora_up`, learned tokens last), plus its token list.

use super::lora::keys::official_layers;
use super::tiny::{tiny_configs, write_text};
use crate::models::stage_c;
use crate::ops::noise::gaussian_noise_ref;
use crate::tensor::HostTensor;
use crate::weights::{write_safetensors, RawTensor, WeightDtype};
use crate::Result;
use std::collections::BTreeMap;
use std::path::Path;

pub const TINY_LORA_FILE: &str = "lora_tiny.safetensors";
/// Its token list (the official config's `train_tokens`).
pub const TINY_LORA_TOKENS_FILE: &str = "lora_tiny.json";
/// The new token it teaches, started from `cat`'s embedding like the official example.
pub const TINY_LORA_TOKEN: &str = "[tinycat]";
/// An existing word whose embedding it also shifts.
pub const TINY_LORA_SHIFTED_WORD: &str = "dog</w>";
const RANK: usize = 2;

/// Writes the LoRA of the tiny model into `dir`; returns the file names.
pub fn write_tiny_lora(dir: &Path, seed: u64) -> Result<Vec<String>> {
    let cfg = tiny_configs();
    let layers = official_layers(&stage_c::manifest(&cfg.stage_c, true)?);
    let manifest = stage_c::manifest(&cfg.stage_c, true)?;
    let shape_of = |k: &str| {
        manifest
            .iter()
            .find(|(m, _)| m == k)
            .map(|(_, s)| s.clone())
            .expect("an official layer is in the manifest")
    };
    let mut tensors = BTreeMap::new();
    let mut stream = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut normal = |shape: &[usize], scale: f32| {
        stream = stream.wrapping_add(1);
        let mut v = vec![0f32; shape.iter().product()];
        gaussian_noise_ref(
            [stream as u32, (stream >> 32) as u32, 0x10ab, 0x7e57],
            &mut v,
        );
        v.iter_mut().for_each(|x| *x *= scale);
        RawTensor::from_host(&HostTensor::new(shape.to_vec(), v), WeightDtype::F32)
    };
    for (i, key) in layers.iter().enumerate() {
        let w = shape_of(key);
        // The official initialization draws `up` from N(0, 1); `down` is what training
        // moved from zero.
        let down = normal(&[RANK, w[1]], 1.0 / (w[1] as f32).sqrt());
        let up = normal(&[w[0], RANK], 1.0);
        tensors.insert(format!("module.{i}.lora_down"), down);
        tensors.insert(format!("module.{i}.lora_up"), up);
    }
    let vocab = cfg.text.vocab_size;
    let shifted =
        crate::text::Tokenizer::clip()?.vocab_matching(&format!("^{TINY_LORA_SHIFTED_WORD}$"))?;
    let rows: Vec<f32> = vec![vocab as f32, shifted[0] as f32];
    let n = layers.len();
    tensors.insert(
        format!("module.{n}.embeddings"),
        normal(&[rows.len(), cfg.text.hidden_size], 0.5),
    );
    tensors.insert(
        format!("module.{n}.indices"),
        RawTensor::from_host(&HostTensor::new(vec![rows.len()], rows), WeightDtype::F32),
    );
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join(TINY_LORA_FILE), &tensors, &meta)?;
    let list = serde_json::json!({ "train_tokens": [[TINY_LORA_TOKEN, "^cat</w>"]] });
    let text = serde_json::to_string_pretty(&list).expect("JSON serializes");
    write_text(dir, TINY_LORA_TOKENS_FILE, &text)?;
    Ok(vec![TINY_LORA_FILE.into(), TINY_LORA_TOKENS_FILE.into()])
}
