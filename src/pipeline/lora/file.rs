//! Reading a LoRA file: its tensors sorted into layer updates and learned tokens, every key
//! checked against the model, every bad one named in one error.

use super::keys::{official_layers, slot, Factor, Slot};
use crate::models::{Checkpoint, Manifest};
use crate::pipeline::open_models::safetensors_of;
use crate::tensor::HostTensor;
use crate::weights::{KeyNames, SafetensorsFile};
use crate::{Error, Result};
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The official LoRA's α (`modules/lora.py`: the update is scaled by α / rank, α = 1).
pub const ALPHA: f32 = 1.0;

/// The low-rank update of one weight: `up · down`, `[out, rank] · [rank, in]`.
#[derive(Clone, Debug)]
pub struct LayerUpdate {
    pub down: HostTensor,
    pub up: HostTensor,
}

impl LayerUpdate {
    pub fn rank(&self) -> usize {
        self.down.shape[0]
    }
}

/// A token the LoRA adds to the vocabulary (the official `train_tokens` entries written
/// `[word]` or `<word>`), with how its embedding starts before the learned offset.
#[derive(Clone, Debug, PartialEq)]
pub struct NewToken {
    pub text: String,
    /// The vocabulary entries whose mean embedding it starts from (the official
    /// aggregation pattern); none: zeros.
    pub init: Option<String>,
}

/// The official `ReToken`: offsets added to embedding rows.
#[derive(Clone, Debug)]
pub struct LearnedTokens {
    /// The rows, in the order of `offsets`; rows past the base vocabulary are
    /// [`LearnedTokens::new_tokens`], in order.
    pub rows: Vec<usize>,
    /// `[rows, width]`.
    pub offsets: HostTensor,
    pub new_tokens: Vec<NewToken>,
}

/// A LoRA file read and checked against a model.
#[derive(Clone, Debug)]
pub struct Lora {
    pub path: PathBuf,
    /// By the original key of the Stage C weight they update.
    pub layers: BTreeMap<String, LayerUpdate>,
    pub tokens: Option<LearnedTokens>,
}

/// What a LoRA is checked against.
pub struct ModelShapes<'a> {
    /// Every Stage C weight with its shape.
    pub stage_c: &'a Manifest,
    /// The text encoder's embedding width and vocabulary size.
    pub text_width: usize,
    pub vocab: usize,
}

/// The optional `<stem>.json` beside a LoRA file: the official config's `train_tokens`.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Sidecar {
    #[serde(default)]
    train_tokens: Vec<(String, Option<String>)>,
}

impl Lora {
    /// Reads `path` (safetensors, or a PyTorch pickle converted once into `conversions`)
    /// and its `<stem>.json`, checking every tensor against `model`.
    pub fn open(path: &Path, model: &ModelShapes, conversions: &Path) -> Result<Lora> {
        let file = SafetensorsFile::open(safetensors_of(path, conversions, KeyNames::AsStored)?)?;
        let new_tokens = read_sidecar(&path.with_extension("json"))?;
        let mut bad = Vec::new();
        // Per Stage C weight: its factors and the file keys they came from.
        let mut factors: BTreeMap<String, ([Option<HostTensor>; 2], Vec<&str>)> = BTreeMap::new();
        let (mut offsets, mut indices) = (None, None);
        let official = official_layers(model.stage_c);
        for key in file.keys() {
            let read = || file.tensor(key).map_err(|e| format!("{key}: {e}"));
            let layer = match slot(key) {
                None => {
                    bad.push(format!("{key}: not a LoRA tensor name"));
                    continue;
                }
                Some(Slot::TokenOffsets) => {
                    match (read(), &offsets) {
                        (Ok(t), None) => offsets = Some((key.to_string(), t)),
                        (Ok(_), Some((first, _))) => {
                            bad.push(format!("{key}: token offsets again (first {first})"))
                        }
                        (Err(why), _) => bad.push(why),
                    }
                    continue;
                }
                Some(Slot::TokenIndices) => {
                    match (token_rows(&file, key), &indices) {
                        (Ok(rows), None) => indices = Some((key.to_string(), rows)),
                        (Ok(_), Some((first, _))) => {
                            bad.push(format!("{key}: token indices again (first {first})"))
                        }
                        (Err(why), _) => bad.push(format!("{key}: {why}")),
                    }
                    continue;
                }
                Some(Slot::Layer(name, f)) => (name, f),
                Some(Slot::Indexed(i, f)) => match official.get(i) {
                    Some(name) => (name.clone(), f),
                    None => {
                        bad.push(format!(
                            "{key}: layer {i} of the official order, but this Stage C has {} \
                             (LoRAs trained with the `.attn` filter are supported)",
                            official.len()
                        ));
                        continue;
                    }
                },
            };
            let (name, factor) = layer;
            let (pair, sources) = factors.entry(name.clone()).or_default();
            let at = match factor {
                Factor::Down => 0,
                Factor::Up => 1,
            };
            match read() {
                Ok(_) if pair[at].is_some() => bad.push(format!(
                    "{key}: a second tensor for the same factor of {name} (first {})",
                    sources.join(", ")
                )),
                Ok(t) => {
                    pair[at] = Some(t);
                    sources.push(key);
                }
                Err(why) => bad.push(why),
            }
        }
        let mut layers = BTreeMap::new();
        for (name, (pair, sources)) in factors {
            match check_layer(pair, model.stage_c.iter().find(|(k, _)| *k == name)) {
                Ok(update) => {
                    layers.insert(name, update);
                }
                Err(why) => bad.push(format!("{} → {name}: {why}", sources.join(", "))),
            }
        }
        let tokens = match (offsets, indices) {
            (None, None) => None,
            (Some((key, _)), None) | (None, Some((key, _))) => {
                bad.push(format!(
                    "{key}: learned tokens need both their offsets and their indices"
                ));
                None
            }
            (Some((okey, offsets)), Some((_, rows))) => {
                match check_tokens(offsets, rows, new_tokens, model) {
                    Ok(t) => Some(t),
                    Err(why) => {
                        bad.push(format!("{okey}: {why}"));
                        None
                    }
                }
            }
        };
        if layers.is_empty() && tokens.is_none() && bad.is_empty() {
            bad.push("(none): the file holds no LoRA tensor".into());
        }
        if !bad.is_empty() {
            let mut msg = format!(
                "not a LoRA for this model ({} bad key{}); use one trained for this Stage C \
                 (UltraPixel / Stable Cascade) and its text encoder:",
                bad.len(),
                if bad.len() == 1 { "" } else { "s" }
            );
            for line in &bad {
                msg.push_str(&format!("\n  {line}"));
            }
            return Err(Error::format(path, msg));
        }
        Ok(Lora {
            path: path.to_path_buf(),
            layers,
            tokens,
        })
    }
}

/// The new tokens `<stem>.json` declares (none when there is no such file).
fn read_sidecar(path: &Path) -> Result<Vec<NewToken>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let sidecar: Sidecar = serde_json::from_str(&text).map_err(|e| {
        Error::format(
            path,
            format!("not a LoRA token list ({e}); expected {{\"train_tokens\": [[\"[word]\", \"^init</w>\"]]}}"),
        )
    })?;
    Ok(sidecar
        .train_tokens
        .into_iter()
        .filter(|(t, _)| {
            (t.starts_with('[') && t.ends_with(']')) || (t.starts_with('<') && t.ends_with('>'))
        })
        .map(|(text, init)| NewToken { text, init })
        .collect())
}

/// Vocabulary rows stored as integers (torch's int64) or whole floats.
fn token_rows(file: &SafetensorsFile, key: &str) -> std::result::Result<Vec<usize>, String> {
    let t = file.bytes(key).map_err(|e| e.to_string())?;
    if t.shape.len() != 1 {
        return Err(format!(
            "indices must be one-dimensional, found {:?}",
            t.shape
        ));
    }
    let values: Vec<i64> = match t.dtype {
        Dtype::I64 => t
            .data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect(),
        Dtype::I32 => t
            .data
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64)
            .collect(),
        Dtype::F32 | Dtype::F16 | Dtype::BF16 => {
            let v = file.tensor(key).map_err(|e| e.to_string())?.data;
            if let Some(x) = v.iter().find(|x| x.fract() != 0.0 || !x.is_finite()) {
                return Err(format!("index {x} is not a whole number"));
            }
            v.into_iter().map(|x| x as i64).collect()
        }
        d => return Err(format!("indices of dtype {d:?}; expected I64")),
    };
    values
        .into_iter()
        .map(|v| usize::try_from(v).map_err(|_| format!("negative index {v}")))
        .collect()
}

/// Both factors of an update, shaped for its Stage C weight (None: there is none).
fn check_layer(
    [down, up]: [Option<HostTensor>; 2],
    weight: Option<&(String, Vec<usize>)>,
) -> std::result::Result<LayerUpdate, String> {
    let (Some(down), Some(up)) = (down, up) else {
        return Err("has only one of lora_down and lora_up".into());
    };
    let Some((_, w)) = weight else {
        return Err("Stage C has no such weight".into());
    };
    let (ds, us) = (&down.shape, &up.shape);
    let fits = w.len() >= 2
        && ds.len() == 2
        && us.len() == 2
        && ds[0] > 0
        && ds[0] == us[1]
        && us[0] == w[0]
        && ds[1] == w[1];
    if !fits {
        return Err(format!(
            "lora_up {us:?} · lora_down {ds:?} does not give the weight's {w:?} \
             (expected [{}, r] and [r, {}])",
            w.first().unwrap_or(&0),
            w.get(1).unwrap_or(&0)
        ));
    }
    Ok(LayerUpdate { down, up })
}

fn check_tokens(
    offsets: HostTensor,
    rows: Vec<usize>,
    new_tokens: Vec<NewToken>,
    model: &ModelShapes,
) -> std::result::Result<LearnedTokens, String> {
    if offsets.shape != [rows.len(), model.text_width] {
        return Err(format!(
            "{} token offsets of shape {:?}; the text encoder needs [{}, {}]",
            rows.len(),
            offsets.shape,
            rows.len(),
            model.text_width
        ));
    }
    let limit = model.vocab + new_tokens.len();
    if let Some(r) = rows.iter().find(|&&r| r >= limit) {
        return Err(format!(
            "token row {r} is past the vocabulary ({} entries, {} new token{} declared in \
             the .json beside the file); name the new tokens there as the training config \
             did: {{\"train_tokens\": [[\"[word]\", \"^init</w>\"]]}}",
            model.vocab,
            new_tokens.len(),
            if new_tokens.len() == 1 { "" } else { "s" }
        ));
    }
    let mut seen = rows.clone();
    seen.sort_unstable();
    if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("token row {} appears twice", w[0]));
    }
    Ok(LearnedTokens {
        rows,
        offsets,
        new_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_data::random;
    use crate::pipeline::tiny::tiny_configs;
    use safetensors::tensor::TensorView;

    const VOCAB: usize = 49408;

    /// A stored tensor: key, dtype, shape, little-endian bytes.
    type Stored = (String, Dtype, Vec<usize>, Vec<u8>);
    /// A naming: the key of factor `f` of layer `i`.
    type KeyOf<'a> = Box<dyn Fn(usize, &str) -> String + 'a>;

    /// Writes `(key, dtype, shape, little-endian bytes)` as a safetensors file.
    fn write(path: &Path, tensors: &[Stored]) {
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    fn f32s(key: String, t: &HostTensor) -> Stored {
        let bytes = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        (key, Dtype::F32, t.shape.clone(), bytes)
    }

    fn shapes(manifest: &Manifest) -> ModelShapes<'_> {
        ModelShapes {
            stage_c: manifest,
            text_width: 32,
            vocab: VOCAB,
        }
    }

    #[test]
    fn the_three_namings_give_the_same_updates_and_tokens() {
        let manifest = crate::models::stage_c::manifest(&tiny_configs().stage_c, true).unwrap();
        let layers = official_layers(&manifest);
        assert_eq!(layers.len(), 8, "four AttnBlocks, two projections each");
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let factors: Vec<(HostTensor, HostTensor)> = layers
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let w = &manifest.iter().find(|(m, _)| m == k).unwrap().1;
                let seed = 10 * i as u64;
                (
                    random(seed, &[3, w[1]], 1.0),
                    random(seed + 1, &[w[0], 3], 1.0),
                )
            })
            .collect();
        let offsets = random(99, &[2, 32], 1.0);
        let rows = [VOCAB as i64, 7];
        let i64_rows: Vec<u8> = rows.iter().flat_map(|r| r.to_le_bytes()).collect();
        let f32_rows = HostTensor::new(vec![2], rows.iter().map(|&r| r as f32).collect());
        let namings: [(&str, KeyOf, Vec<Stored>); 3] = [
            (
                "named",
                Box::new(|i, f| {
                    let (module, param) = layers[i].rsplit_once('.').unwrap();
                    format!("{module}.parametrizations.{param}.0.{f}")
                }),
                vec![
                    f32s("embeddings.embeddings".into(), &offsets),
                    (
                        "embeddings.indices".into(),
                        Dtype::I64,
                        vec![2],
                        i64_rows.clone(),
                    ),
                ],
            ),
            (
                "stable_cascade",
                Box::new(|i, f| format!("weights.{i}.{f}")),
                vec![
                    f32s("embeddings.embeddings".into(), &offsets),
                    (
                        "embeddings.indices".into(),
                        Dtype::I64,
                        vec![2],
                        i64_rows.clone(),
                    ),
                ],
            ),
            (
                "ultrapixel",
                Box::new(|i, f| format!("module.{i}.{f}")),
                vec![
                    f32s("module.8.embeddings".into(), &offsets),
                    f32s("module.8.indices".into(), &f32_rows),
                ],
            ),
        ];
        for (name, key, extra) in namings {
            let path = dir.path().join(format!("{name}.safetensors"));
            let mut tensors = extra;
            for (i, (down, up)) in factors.iter().enumerate() {
                tensors.push(f32s(key(i, "lora_down"), down));
                tensors.push(f32s(key(i, "lora_up"), up));
            }
            write(&path, &tensors);
            std::fs::write(
                path.with_extension("json"),
                r#"{"train_tokens": [["[tok]", "^cat</w>"], ["^dog", null]]}"#,
            )
            .unwrap();
            let lora = Lora::open(&path, &shapes(&manifest), &cache).unwrap();
            assert_eq!(lora.layers.len(), layers.len(), "{name}");
            for (k, (down, up)) in layers.iter().zip(&factors) {
                let u = &lora.layers[k];
                assert_eq!(
                    (&u.down.data, &u.up.data),
                    (&down.data, &up.data),
                    "{name} {k}"
                );
            }
            let t = lora.tokens.expect("learned tokens");
            assert_eq!(t.rows, [VOCAB, 7], "{name}");
            assert_eq!(t.offsets.data, offsets.data, "{name}");
            let new = NewToken {
                text: "[tok]".into(),
                init: Some("^cat</w>".into()),
            };
            assert_eq!(
                t.new_tokens,
                [new],
                "{name}: only bracketed entries are new"
            );
        }
    }

    #[test]
    fn a_file_that_does_not_fit_is_refused_naming_every_bad_key() {
        let manifest = crate::models::stage_c::manifest(&tiny_configs().stage_c, true).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        let out_proj = "down_blocks.0.2.attention.attn.out_proj";
        write(
            &path,
            &[
                // Rank 2 down, rank 3 up.
                f32s(
                    format!("{out_proj}.parametrizations.weight.0.lora_down"),
                    &random(1, &[2, 32], 1.0),
                ),
                f32s(
                    format!("{out_proj}.parametrizations.weight.0.lora_up"),
                    &random(2, &[32, 3], 1.0),
                ),
                f32s("module.5.lora_down".into(), &random(3, &[2, 32], 1.0)),
                // Layer 0 of the official order is that out_proj: its down factor again.
                f32s("weights.0.lora_down".into(), &random(3, &[2, 32], 1.0)),
                f32s("module.40.lora_down".into(), &random(4, &[2, 32], 1.0)),
                f32s("module.40.lora_up".into(), &random(5, &[32, 2], 1.0)),
                f32s(
                    "nothere.1.parametrizations.weight.0.lora_up".into(),
                    &random(6, &[16, 2], 1.0),
                ),
                f32s(
                    "nothere.1.parametrizations.weight.0.lora_down".into(),
                    &random(7, &[2, 32], 1.0),
                ),
                f32s("text_model.something".into(), &random(8, &[2], 1.0)),
                f32s("embeddings.embeddings".into(), &random(9, &[1, 32], 1.0)),
                f32s(
                    "embeddings.indices".into(),
                    &HostTensor::new(vec![1], vec![VOCAB as f32]),
                ),
            ],
        );
        let err = Lora::open(&path, &shapes(&manifest), dir.path())
            .unwrap_err()
            .to_string();
        for needle in [
            "bad.safetensors",
            "8 bad keys",
            "weights.0.lora_down: a second tensor for the same factor of \
             down_blocks.0.2.attention.attn.out_proj.weight",
            &format!("{out_proj}.weight: lora_up [32, 3] · lora_down [2, 32]"),
            "module.5.lora_down → up_blocks.0.2.attention.attn.in_proj_weight: has only one of",
            "module.40.lora_down: layer 40 of the official order, but this Stage C has 8",
            "module.40.lora_up: layer 40",
            "nothere.1.parametrizations.weight.0.lora_down, \
             nothere.1.parametrizations.weight.0.lora_up → nothere.1.weight: Stage C has no \
             such weight",
            "text_model.something: not a LoRA tensor name",
            "embeddings.embeddings: token row 49408 is past the vocabulary",
        ] {
            assert!(err.contains(needle), "{needle:?} not in:\n{err}");
        }
        // One line per bad layer or key, nothing else.
        assert_eq!(err.lines().count(), 9, "{err}");
    }
}
