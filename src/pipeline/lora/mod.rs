//! LoRAs for Stage C with learned tokens (`generate --lora FILE[:SCALE]`, the official
//! `test_personalized.py`): each named Stage C weight becomes W + scale · (α / rank) · up · down
//! as it is served to the device, and the file's learned token embeddings extend the
//! tokenizer and the text encoder's embedding table so its trigger words work.
//!
//! - [`keys`]: the key namings of LoRA files and the official layer order.
//! - [`mod@file`]: reading and checking a file against the model.
//! - [`merge`]: the merged Stage C weights.
//! - [`tokens`]: the grown token embedding table.
//!
//! Scale 0 leaves a LoRA out entirely (layers and tokens), so it is bit-identical to no
//! LoRA; the scale multiplies the learned token offsets as it does the layer updates.

pub mod file;
pub mod keys;
pub mod merge;
pub mod tokens;

pub use file::{LayerUpdate, LearnedTokens, Lora, ModelShapes, NewToken};
pub use merge::MergedWeights;
pub use tokens::TokenTable;

use crate::models::config::ClipTextConfig;
use crate::models::Checkpoint;
use crate::pipeline::png_out::LoraUse;
use crate::text::Tokenizer;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A LoRA file and its strength, as `--lora FILE[:SCALE]` gives them (scale 1 by default).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub scale: f32,
}

impl LoraSpec {
    pub fn new(path: impl Into<PathBuf>, scale: f32) -> LoraSpec {
        LoraSpec {
            path: path.into(),
            scale,
        }
    }
}

impl std::str::FromStr for LoraSpec {
    type Err = Error;

    /// `FILE` or `FILE:SCALE`; a suffix after the last `:` that is no number belongs to the
    /// file name.
    fn from_str(s: &str) -> Result<LoraSpec> {
        let (path, scale) = match s
            .rsplit_once(':')
            .map(|(p, n)| (p, n.trim().parse::<f32>()))
        {
            Some((p, Ok(scale))) => (p, scale),
            _ => (s, 1.0),
        };
        if path.is_empty() || !scale.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "--lora {s:?}: expected FILE or FILE:SCALE with a finite SCALE"
            )));
        }
        Ok(LoraSpec::new(path, scale))
    }
}

/// A LoRA in use.
#[derive(Clone, Debug)]
pub struct LoadedLora {
    pub spec: LoraSpec,
    pub lora: Lora,
}

/// The LoRAs of a pipeline, applied in order (their updates add up).
#[derive(Default)]
pub struct LoraSet {
    loaded: Vec<LoadedLora>,
    /// The aggregation rows of every new token of the active LoRAs, in table order.
    inits: Vec<Vec<usize>>,
    /// The tokenizer with the active LoRAs' new tokens.
    tokenizer: Option<Tokenizer>,
}

impl LoraSet {
    /// Reads and checks every file of `specs` against `model` (nothing is kept unless all
    /// are good); pickled files are converted once into `conversions`.
    pub fn load(specs: &[LoraSpec], model: &ModelShapes, conversions: &Path) -> Result<LoraSet> {
        let mut loaded = Vec::new();
        for spec in specs {
            if !spec.scale.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "LoRA {}: scale {} is not a finite number",
                    spec.path.display(),
                    spec.scale
                )));
            }
            let lora = Lora::open(&spec.path, model, conversions)?;
            loaded.push(LoadedLora {
                spec: spec.clone(),
                lora,
            });
        }
        let mut set = LoraSet {
            loaded,
            inits: Vec::new(),
            tokenizer: None,
        };
        let words: Vec<String> = set
            .new_tokens()
            .map(|(_, t)| t.text.to_lowercase())
            .collect();
        if !words.is_empty() {
            let tokenizer = Tokenizer::with_added(&words, model.vocab as u32)?;
            let mut inits = Vec::new();
            for (lora, t) in set.new_tokens() {
                let rows = match &t.init {
                    Some(p) => tokenizer
                        .vocab_matching(p)
                        .map_err(|e| Error::format(&lora.path, e.to_string()))?,
                    None => Vec::new(),
                };
                inits.push(rows.into_iter().map(|r| r as usize).collect());
            }
            set.inits = inits;
            set.tokenizer = Some(tokenizer);
        }
        Ok(set)
    }

    /// The LoRAs in use, in order.
    pub fn loaded(&self) -> &[LoadedLora] {
        &self.loaded
    }

    /// The LoRAs that change the images, as their metadata names them.
    pub fn uses(&self) -> Vec<LoraUse> {
        self.active()
            .map(|l| LoraUse {
                file: l
                    .spec
                    .path
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
                scale: l.spec.scale,
            })
            .collect()
    }

    /// The LoRAs that change anything (scale 0 leaves one out).
    fn active(&self) -> impl Iterator<Item = &LoadedLora> {
        self.loaded.iter().filter(|l| l.spec.scale != 0.0)
    }

    /// The new tokens of the active LoRAs, in table order.
    fn new_tokens(&self) -> impl Iterator<Item = (&Lora, &NewToken)> {
        self.active().flat_map(|l| {
            l.lora
                .tokens
                .iter()
                .flat_map(move |t| t.new_tokens.iter().map(move |n| (&l.lora, n)))
        })
    }

    /// The tokenizer that knows the new tokens, when there are any.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// Stage C's weights with every active LoRA merged in.
    pub fn stage_c<'a>(&'a self, base: &'a dyn Checkpoint) -> MergedWeights<'a> {
        let mut updates: BTreeMap<&str, Vec<_>> = BTreeMap::new();
        for l in self.active() {
            for (key, u) in &l.lora.layers {
                updates
                    .entry(key.as_str())
                    .or_default()
                    .push((u, l.spec.scale));
            }
        }
        MergedWeights { base, updates }
    }

    /// The text encoder's configuration and weights with the learned tokens applied (its
    /// vocabulary grown by the new tokens).
    pub fn text<'a>(
        &'a self,
        cfg: &ClipTextConfig,
        base: &'a dyn Checkpoint,
    ) -> (ClipTextConfig, TokenTable<'a>) {
        let mut first_new = cfg.vocab_size;
        let mut placed = Vec::new();
        for l in self.active() {
            if let Some(tokens) = &l.lora.tokens {
                placed.push(tokens::PlacedTokens {
                    tokens,
                    scale: l.spec.scale,
                    first_new,
                });
                first_new += tokens.new_tokens.len();
            }
        }
        let grown = ClipTextConfig {
            vocab_size: first_new,
            ..cfg.clone()
        };
        let table = TokenTable {
            base,
            vocab: cfg.vocab_size,
            inits: self.inits.clone(),
            placed,
        };
        (grown, table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_data::random;
    use crate::pipeline::tiny::tiny_configs;
    use crate::pipeline::tiny_lora::{write_tiny_lora, TINY_LORA_FILE};
    use crate::tensor::HostTensor;
    use std::collections::HashMap;

    #[test]
    fn merged_weights_keep_the_base_bits_without_a_lora_or_at_scale_0() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_lora(dir.path(), 3).unwrap();
        let cfg = tiny_configs();
        let manifest = crate::models::stage_c::manifest(&cfg.stage_c, true).unwrap();
        // Random weights with a negative zero first: 0 · update added to it would be +0.
        let base: HashMap<String, HostTensor> = manifest
            .iter()
            .enumerate()
            .map(|(i, (k, s))| {
                let mut t = random(i as u64, s, 1.0);
                t.data[0] = -0.0;
                (k.clone(), t)
            })
            .collect();
        let shapes = ModelShapes {
            stage_c: &manifest,
            text_width: cfg.text.hidden_size,
            vocab: cfg.text.vocab_size,
        };
        let cache = dir.path().join("cache");
        let spec = |s| LoraSpec::new(dir.path().join(TINY_LORA_FILE), s);
        // The same layers again, teaching another token (one token cannot be added twice).
        let copy = dir.path().join("copy.safetensors");
        std::fs::copy(dir.path().join(TINY_LORA_FILE), &copy).unwrap();
        let other = r#"{"train_tokens": [["[other]", null]]}"#;
        std::fs::write(copy.with_extension("json"), other).unwrap();
        let load = |specs: &[LoraSpec]| LoraSet::load(specs, &shapes, &cache).unwrap();
        let (none, zero, one, two) = (
            LoraSet::default(),
            load(&[spec(0.0)]),
            load(&[spec(1.0)]),
            load(&[spec(1.0), LoraSpec::new(&copy, 1.0)]),
        );
        let bits = |t: HostTensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let layers = &one.loaded()[0].lora.layers;
        for (k, _) in &manifest {
            let b = bits(base[k].clone());
            assert_eq!(bits(none.stage_c(&base).tensor(k).unwrap()), b, "{k}");
            assert_eq!(bits(zero.stage_c(&base).tensor(k).unwrap()), b, "{k}");
            let once = one.stage_c(&base).tensor(k).unwrap();
            let Some(u) = layers.get(k) else {
                assert_eq!(bits(once), b, "{k} has no update");
                continue;
            };
            // Once: base + up·down / rank; twice: base + 2 · up·down / rank.
            let (rank, cols) = (u.rank(), u.down.shape[1]);
            let twice = two.stage_c(&base).tensor(k).unwrap();
            for (at, w) in base[k].data.iter().enumerate() {
                let (o, i) = (at / cols, at % cols);
                let d: f32 = (0..rank)
                    .map(|r| u.up.data[o * rank + r] * u.down.data[r * cols + i])
                    .sum::<f32>()
                    / rank as f32;
                assert!((once.data[at] - (w + d)).abs() < 1e-5, "{k}[{at}]");
                assert!((twice.data[at] - (w + 2.0 * d)).abs() < 1e-5, "{k}[{at}]");
            }
        }
    }

    #[test]
    fn a_spec_is_a_file_with_an_optional_scale() {
        let s = |t: &str| t.parse::<LoraSpec>().unwrap();
        assert_eq!(s("cat.safetensors"), LoraSpec::new("cat.safetensors", 1.0));
        assert_eq!(
            s("cat.safetensors:0.5"),
            LoraSpec::new("cat.safetensors", 0.5)
        );
        assert_eq!(s("dir/a:b.pt:-2"), LoraSpec::new("dir/a:b.pt", -2.0));
        assert_eq!(s("C:lora"), LoraSpec::new("C:lora", 1.0));
        assert!("".parse::<LoraSpec>().is_err());
        assert!(":0.5".parse::<LoraSpec>().is_err());
        assert!("x:inf".parse::<LoraSpec>().is_err());
    }
}
