//! A model directory opened for generation: every network's configuration (the optional
//! `<file stem>.json` beside each weight file, `text_encoder/config.json`; absent means the
//! released configuration) and its checkpoint, memory-mapped and checked key by key against
//! what the network reads before anything runs. UltraPixel's file, a PyTorch pickle as
//! released, is converted once (restricted unpickler) into the conversion cache.

use super::control::ControlKind;
use super::model_dir::ModelDir;
use crate::models::config::{
    parse, parse_over, ClipTextConfig, PreviewerConfig, StageAConfig, StageBConfig, StageCConfig,
};
use crate::models::controlnet::{self, ControlNetConfig};
use crate::models::effnet_encoder::{self, EffNetEncoderConfig};
use crate::models::{clip_text, previewer, stage_a, stage_b, stage_c, Checkpoint, Manifest};
use crate::tensor::HostTensor;
use crate::weights::{
    check_manifest_allowing, convert_named, CheckpointSet, KeyNames, OriginalNames, SafetensorsFile,
};
use crate::{Error, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

/// A checkpoint served under the original names (from any of the supported namings).
pub struct Weights(OriginalNames<CheckpointSet>);

impl Checkpoint for Weights {
    fn tensor(&self, key: &str) -> Result<HostTensor> {
        self.0.tensor(key)
    }
}

/// One network: its configuration and weights.
pub struct Stage<C> {
    pub config: C,
    pub weights: Weights,
}

/// The configurations of every network; `Default` is the released model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Configs {
    pub text: ClipTextConfig,
    pub stage_c: StageCConfig,
    pub stage_b: StageBConfig,
    pub stage_a: StageAConfig,
}

/// Every network text-to-image runs.
pub struct Models {
    pub text: Stage<ClipTextConfig>,
    pub stage_c: Stage<StageCConfig>,
    pub stage_b: Stage<StageBConfig>,
    pub stage_a: Stage<StageAConfig>,
    /// Things about the files worth telling the user.
    pub warnings: Vec<String>,
}

pub const STAGE_C_FILE: &str = "stage_c_bf16.safetensors";
pub const ULTRAPIXEL_FILE: &str = "ultrapixel_t2i.safetensors";
pub const STAGE_B_FILE: &str = "stage_b_lite_bf16.safetensors";
pub const STAGE_A_FILE: &str = "stage_a.safetensors";
pub const TEXT_ENCODER_FILE: &str = "text_encoder/model.safetensors";
pub const TEXT_CONFIG_FILE: &str = "text_encoder/config.json";
pub const PREVIEWER_FILE: &str = "previewer.safetensors";
pub const SPECIAL_TOKENS_FILE: &str = "tokenizer/special_tokens_map.json";

impl Configs {
    /// The configurations of `dir`'s networks (validated); absent files mean released.
    pub fn read(dir: &ModelDir) -> Result<Configs> {
        let cfg = Configs {
            text: read_config(dir.path(TEXT_CONFIG_FILE)?, "CLIP text")?,
            stage_c: read_config(&beside(dir.path(STAGE_C_FILE)?), "Stage C")?,
            stage_b: read_config(&beside(dir.path(STAGE_B_FILE)?), "Stage B")?,
            stage_a: read_config(&beside(dir.path(STAGE_A_FILE)?), "Stage A")?,
        };
        cfg.text.validate()?;
        cfg.stage_c.validate()?;
        cfg.stage_b.validate()?;
        cfg.stage_a.validate()?;
        Ok(cfg)
    }
}

impl Models {
    pub fn configs(&self) -> Configs {
        Configs {
            text: self.text.config.clone(),
            stage_c: self.stage_c.config.clone(),
            stage_b: self.stage_b.config.clone(),
            stage_a: self.stage_a.config.clone(),
        }
    }

    /// Opens and checks every network of `dir`; pickles are converted into `conversions`.
    pub fn open(dir: &ModelDir, conversions: &Path) -> Result<Models> {
        let Configs {
            text: text_cfg,
            stage_c: stage_c_cfg,
            stage_b: stage_b_cfg,
            stage_a: stage_a_cfg,
        } = Configs::read(dir)?;
        let (stage_c_path, stage_b_path, stage_a_path) = (
            dir.path(STAGE_C_FILE)?,
            dir.path(STAGE_B_FILE)?,
            dir.path(STAGE_A_FILE)?,
        );

        // Stage C: the base network plus UltraPixel's modules, each file checked alone.
        let base_manifest = stage_c::manifest(&stage_c_cfg, false)?;
        let base = open_checked(stage_c_path, &base_manifest, &[])?;
        let guided = stage_c::manifest(&stage_c_cfg, true)?;
        let inr_manifest: Manifest = guided
            .into_iter()
            .filter(|k| !base_manifest.contains(k))
            .collect();
        let unused = stage_c::unused_guidance_keys(&stage_c_cfg);
        let unused = keys(&unused);
        let ultrapixel = safetensors_of(
            dir.path(ULTRAPIXEL_FILE)?,
            conversions,
            KeyNames::UltraPixel,
        )?;
        let ultrapixel = open_checked(&ultrapixel, &inr_manifest, &unused)?;
        let stage_c_weights = Weights(OriginalNames::new(CheckpointSet::new(vec![
            Box::new(base),
            Box::new(ultrapixel),
        ])?));

        let b_unused = stage_b::unused_keys(&stage_b_cfg);
        let b_unused = keys(&b_unused);
        let stage_b = open_checked(stage_b_path, &stage_b::manifest(&stage_b_cfg)?, &b_unused)?;
        let stage_a = open_checked(
            stage_a_path,
            &stage_a::manifest(&stage_a_cfg)?,
            stage_a::UNUSED_PREFIXES,
        )?;
        let text = open_checked(
            dir.path(TEXT_ENCODER_FILE)?,
            &clip_text::manifest(&text_cfg)?,
            clip_text::UNUSED_PREFIXES,
        )?;
        Ok(Models {
            text: Stage {
                config: text_cfg,
                weights: single(text)?,
            },
            stage_c: Stage {
                config: stage_c_cfg,
                weights: stage_c_weights,
            },
            stage_b: Stage {
                config: stage_b_cfg,
                weights: single(stage_b)?,
            },
            stage_a: Stage {
                config: stage_a_cfg,
                weights: single(stage_a)?,
            },
            warnings: pad_token_warning(dir)?.into_iter().collect(),
        })
    }
}

/// The previewer of `dir` (`generate --preview`), checked against its manifest; a clear error
/// naming the command that fetches it when the directory has none.
pub fn open_previewer(dir: &ModelDir) -> Result<Stage<PreviewerConfig>> {
    let path = dir.optional(PREVIEWER_FILE).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "previews need {PREVIEWER_FILE}, which {} does not have: fetch it (`ultrapixel \
             download` does) or ask for no previews",
            dir.location
        ))
    })?;
    let config: PreviewerConfig = read_config(&beside(path), "previewer")?;
    config.validate()?;
    let unused = previewer::unused_keys(&config);
    let unused = keys(&unused);
    let file = open_checked(path, &previewer::manifest(&config)?, &unused)?;
    Ok(Stage {
        config,
        weights: single(file)?,
    })
}

/// A loaded ControlNet, with the encoder of its input when it has one.
pub struct ControlStage {
    pub kind: ControlKind,
    pub net: Stage<ControlNetConfig>,
    /// The EfficientNet encoder of the super-resolution ControlNet.
    pub encoder: Option<Stage<EffNetEncoderConfig>>,
}

/// The ControlNet of `kind` in `dir` (`generate --control`), and its encoder if it has one,
/// each checked against its manifest (the BatchNorm counters of a torch state dict are
/// accepted and ignored); a configuration is the `.json` beside the file, read over the
/// released one of `kind` ([`read_controlnet_config`]). A clear error naming the command that fetches a missing file.
pub fn open_controlnet(dir: &ModelDir, kind: ControlKind) -> Result<ControlStage> {
    let path = control_file(dir, kind, kind.file())?;
    let config = read_controlnet_config(&beside(path), kind)?;
    config.validate()?;
    let unused = controlnet::unused_keys(&config)?;
    let file = open_checked(path, &controlnet::manifest(&config)?, &keys(&unused))?;
    let encoder = match kind.encoder_file() {
        Some(name) => {
            let path = control_file(dir, kind, name)?;
            let config: EffNetEncoderConfig = read_config(&beside(path), "EfficientNet encoder")?;
            config.backbone.validate()?;
            let unused = effnet_encoder::unused_keys(&config)?;
            let manifest = effnet_encoder::manifest(&config)?;
            let file = open_checked(path, &manifest, &keys(&unused))?;
            Some(Stage {
                config,
                weights: single(file)?,
            })
        }
        None => None,
    };
    Ok(ControlStage {
        kind,
        net: Stage {
            config,
            weights: single(file)?,
        },
        encoder,
    })
}

/// The file `name` of the `kind` ControlNet in `dir`, or an error naming the command that
/// fetches it.
fn control_file<'a>(dir: &'a ModelDir, kind: ControlKind, name: &str) -> Result<&'a Path> {
    dir.optional(name).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "--control {kind} needs {name}, which {} does not have: fetch it with `ultrapixel \
             download --control {kind}` (add the same --model-dir)",
            dir.location
        ))
    })
}

/// The embedded tokenizer pads with `<|endoftext|>` as the Stable Cascade export does
/// (docs/MODEL.md §5); a model directory whose tokenizer says otherwise gets a warning.
fn pad_token_warning(dir: &ModelDir) -> Result<Option<String>> {
    let Ok(path) = dir.path(SPECIAL_TOKENS_FILE) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
    let pad = &json["pad_token"];
    let pad = pad
        .as_str()
        .or_else(|| pad["content"].as_str())
        .unwrap_or("");
    Ok((pad != "<|endoftext|>").then(|| {
        format!(
            "{} pads with {pad:?}; ultrapixel pads with \"<|endoftext|>\" like the Stable \
             Cascade export (only Stage C's text tokens at padding positions depend on it)",
            path.display()
        )
    }))
}

/// The keys of a manifest.
fn keys(m: &Manifest) -> Vec<&str> {
    m.iter().map(|(k, _)| k.as_str()).collect()
}

fn single(file: OriginalNames<SafetensorsFile>) -> Result<Weights> {
    Ok(Weights(OriginalNames::new(CheckpointSet::new(vec![
        Box::new(file),
    ])?)))
}

/// `<stem>.json` next to a weight file.
fn beside(path: &Path) -> PathBuf {
    path.with_extension("json")
}

/// A JSON config; an absent file means the released configuration.
fn read_config<T: serde::de::DeserializeOwned + Default>(path: &Path, what: &str) -> Result<T> {
    match read_json(path)? {
        Some(value) => parse(&value, what).map_err(|e| Error::format(path, e.to_string())),
        None => Ok(T::default()),
    }
}

/// The configuration of the `kind` ControlNet at `path` (the `.json` beside its weights):
/// the keys it gives over the released configuration of that kind
/// ([`ControlKind::released_config`]), which an absent file means. A key the configuration
/// does not have, or a mistyped one, is an error naming the file and the key.
pub fn read_controlnet_config(path: &Path, kind: ControlKind) -> Result<ControlNetConfig> {
    let released = kind.released_config();
    match read_json(path)? {
        Some(value) => parse_over(&value, &released, &format!("{kind} ControlNet"))
            .map_err(|e| Error::format(path, e.to_string())),
        None => Ok(released),
    }
}

/// The JSON at `path`, None when there is no such file.
fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Opens a safetensors file and checks it serves exactly what the network reads.
fn open_checked(
    path: &Path,
    manifest: &Manifest,
    unused_prefixes: &[&str],
) -> Result<OriginalNames<SafetensorsFile>> {
    let file = OriginalNames::new(SafetensorsFile::open(path)?);
    check_manifest_allowing(&file, manifest, unused_prefixes)?;
    Ok(file)
}

/// The first bytes of a PyTorch zip checkpoint.
const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

/// `path` itself when it is safetensors; for a PyTorch pickle (UltraPixel's release, a
/// LoRA) its conversion in `cache` with the key naming `names`, made on first use. The cache
/// name carries the source's size and modification time, so a replaced source is converted
/// again, and the naming.
pub fn safetensors_of(path: &Path, cache: &Path, names: KeyNames) -> Result<PathBuf> {
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let n = file.read(&mut magic).map_err(|e| Error::io(path, e))?;
    if magic[..n] != *ZIP_MAGIC {
        return Ok(path.to_path_buf());
    }
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let stem = path
        .file_stem()
        .map_or_else(|| "checkpoint".into(), |s| s.to_string_lossy().into_owned());
    let naming = match names {
        KeyNames::UltraPixel => "",
        KeyNames::AsStored => "-as-stored",
    };
    let target = cache.join(format!("{stem}-{}-{mtime}{naming}.safetensors", meta.len()));
    if target.is_file() {
        return Ok(target);
    }
    std::fs::create_dir_all(cache).map_err(|e| Error::io(cache, e))?;
    eprintln!(
        "{} is a PyTorch pickle: converting it once to {} (no pickled code is run)",
        path.display(),
        target.display()
    );
    convert_named(path, &target, names)?;
    Ok(target)
}

/// Where converted checkpoints are kept: `UPX_CACHE`, else `$XDG_CACHE_HOME/ultrapixel`,
/// else `~/.cache/ultrapixel`.
pub fn default_conversion_cache() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("UPX_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("ultrapixel")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/ultrapixel")))
        .unwrap_or_else(|| PathBuf::from(".ultrapixel-cache"))
        .join("converted")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/weights")
            .join(name)
    }

    const KINDS: [ControlKind; 3] = [
        ControlKind::Canny,
        ControlKind::SuperResolution,
        ControlKind::Inpainting,
    ];

    /// The ControlNet config of `kind` read from a file holding `json`, and the file.
    fn controlnet_config_of(
        kind: ControlKind,
        json: &str,
    ) -> (Result<ControlNetConfig>, tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controlnet.json");
        std::fs::write(&path, json).unwrap();
        (read_controlnet_config(&path, kind), dir, path)
    }

    #[test]
    fn a_partial_controlnet_config_keeps_the_released_values_of_its_kind() {
        for kind in KINDS {
            let released = kind.released_config();
            let absent = tempfile::tempdir().unwrap().path().join("none.json");
            assert_eq!(read_controlnet_config(&absent, kind).unwrap(), released);
            for json in ["{}", "null"] {
                let (cfg, _dir, _) = controlnet_config_of(kind, json);
                assert_eq!(cfg.unwrap(), released, "{kind} {json}");
            }
            // One key: every other is the released one of this kind (not Canny's).
            let (cfg, _dir, _) = controlnet_config_of(kind, r#"{"c_proj": 1024}"#);
            let expected = ControlNetConfig {
                c_proj: 1024,
                ..released.clone()
            };
            assert_eq!(cfg.unwrap(), expected, "{kind}");
            let (cfg, _dir, _) = controlnet_config_of(kind, r#"{"proj_blocks": [0, 63]}"#);
            let expected = ControlNetConfig {
                proj_blocks: vec![0, 63],
                ..released.clone()
            };
            assert_eq!(cfg.unwrap(), expected, "{kind}");
            // A nested object gives its keys only.
            let (cfg, _dir, _) =
                controlnet_config_of(kind, r#"{"large": {"blocks": 2}, "backbone": {}}"#);
            let mut expected = released.clone();
            expected.large.blocks = 2;
            assert_eq!(cfg.unwrap(), expected, "{kind}");
        }
        // The kinds' released values the Canny defaults used to replace.
        let (sr, _dir, _) =
            controlnet_config_of(ControlKind::SuperResolution, r#"{"c_proj": 2048}"#);
        let sr = sr.unwrap();
        assert_eq!((sr.c_in, sr.bottleneck_mode.as_str()), (16, "large"));
        sr.validate().unwrap();
        let (inpaint, _dir, _) =
            controlnet_config_of(ControlKind::Inpainting, r#"{"c_proj": 2048}"#);
        let inpaint = inpaint.unwrap();
        assert_eq!(
            (inpaint.c_in, inpaint.bottleneck_mode.as_str()),
            (4, "effnet")
        );
        let (canny, _dir, _) = controlnet_config_of(ControlKind::Canny, r#"{"c_in": 3}"#);
        assert_eq!(canny.unwrap().bottleneck_mode, "effnet");
    }

    #[test]
    fn a_mistyped_or_unknown_controlnet_key_is_an_error_naming_the_file_and_key() {
        for kind in KINDS {
            for (json, key, why) in [
                (r#"{"c_in": "four"}"#, "`c_in`", "invalid type"),
                (
                    r#"{"c_proj": 1024, "proj_blocks": 3}"#,
                    "`proj_blocks`",
                    "invalid type",
                ),
                (
                    r#"{"large": {"blocks": -1}}"#,
                    "`large.blocks`",
                    "invalid value",
                ),
                (r#"{"large": 8}"#, "`large`", "invalid type"),
                (r#"{"c_inn": 4}"#, "unknown key `c_inn`", "c_in"),
                (
                    r#"{"backbone": {"depth": 3}}"#,
                    "unknown key `backbone.depth`",
                    "stem_out",
                ),
            ] {
                let (cfg, _dir, path) = controlnet_config_of(kind, json);
                let err = cfg.unwrap_err().to_string();
                assert!(err.contains(&path.display().to_string()), "{err}");
                assert!(
                    err.contains(key) && err.contains(why),
                    "{kind} {json}: {err}"
                );
                assert!(err.contains(&format!("{kind} ControlNet config")), "{err}");
            }
            for json in ["[1, 2]", "{\"c_in\": 4"] {
                let (cfg, _dir, path) = controlnet_config_of(kind, json);
                let err = cfg.unwrap_err().to_string();
                assert!(err.contains(&path.display().to_string()), "{err}");
            }
        }
    }

    #[test]
    fn a_pickle_is_converted_once_into_the_cache_and_safetensors_pass_through() {
        let cache = tempfile::tempdir().unwrap();
        let pickle = fixture("tiny_t2i.safetensors");
        let converted = safetensors_of(&pickle, cache.path(), KeyNames::UltraPixel).unwrap();
        assert!(converted.starts_with(cache.path()));
        let file = SafetensorsFile::open(&converted).unwrap();
        assert!(
            file.keys().any(|k| k.starts_with("agg_net.0.")),
            "renamed keys"
        );
        assert!(file.keys().all(|k| !k.starts_with("module.")));
        let stamp = std::fs::metadata(&converted).unwrap().modified().unwrap();
        assert_eq!(
            safetensors_of(&pickle, cache.path(), KeyNames::UltraPixel).unwrap(),
            converted
        );
        assert_eq!(
            std::fs::metadata(&converted).unwrap().modified().unwrap(),
            stamp
        );
        assert_eq!(
            safetensors_of(&converted, cache.path(), KeyNames::UltraPixel).unwrap(),
            converted
        );
    }

    #[test]
    fn a_malicious_pickle_is_refused_and_nothing_is_cached() {
        let cache = tempfile::tempdir().unwrap();
        let err = safetensors_of(&fixture("malicious.pt"), cache.path(), KeyNames::AsStored)
            .unwrap_err()
            .to_string();
        assert!(err.contains("os") && err.contains("system"), "{err}");
        let left: Vec<_> = std::fs::read_dir(cache.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_model_file_with_a_wrong_shape_is_refused_naming_the_key_and_both_shapes() {
        let dir = tempfile::tempdir().unwrap();
        crate::pipeline::tiny::make_tiny_model(dir.path(), 1).unwrap();
        let md = ModelDir::resolve(Some(dir.path()), &crate::hub::HubOptions::from_env()).unwrap();
        Models::open(&md, &dir.path().join("cache")).unwrap();
        // A Stage A config that disagrees with its file.
        std::fs::write(dir.path().join("stage_a.json"), r#"{"c_hidden": 32}"#).unwrap();
        let err = match Models::open(&md, &dir.path().join("cache")) {
            Ok(_) => panic!("a mismatched file was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("stage_a.safetensors does not match the model"),
            "{err}"
        );
        assert!(
            err.contains("up_blocks.0.0.weight: expected [32, 4, 1, 1], found [16, 4, 1, 1]"),
            "{err}"
        );
        std::fs::write(dir.path().join("stage_a.json"), "{not json").unwrap();
        let err = match Models::open(&md, &dir.path().join("cache")) {
            Ok(_) => panic!("bad JSON was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("stage_a.json") && err.contains("not valid JSON"),
            "{err}"
        );
    }

    #[test]
    fn a_tokenizer_padding_with_another_token_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        crate::pipeline::tiny::make_tiny_model(dir.path(), 2).unwrap();
        let md = ModelDir::resolve(Some(dir.path()), &crate::hub::HubOptions::from_env()).unwrap();
        let cache = dir.path().join("cache");
        assert!(Models::open(&md, &cache).unwrap().warnings.is_empty());
        std::fs::write(
            dir.path().join(SPECIAL_TOKENS_FILE),
            r#"{"pad_token": {"content": "!", "lstrip": false}}"#,
        )
        .unwrap();
        let w = Models::open(&md, &cache).unwrap().warnings;
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("pads with \"!\""), "{w:?}");
    }
}
