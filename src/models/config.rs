//! The constructor arguments of every network, under the official keyword names (the
//! `config` metadata of the case files, and the optional `*.json` next to a model file).
//! `Default` is the released configuration of each network (docs/MODEL.md §2, §3, §5); a JSON
//! object overrides any subset of the keys.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Stable Cascade's Stage C (UltraPixel's `StageC`): docs/MODEL.md §2.2, released 3.6B model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StageCConfig {
    pub c_in: usize,
    pub c_out: usize,
    pub c_r: usize,
    pub patch_size: usize,
    pub c_cond: usize,
    pub c_hidden: Vec<usize>,
    pub nhead: Vec<usize>,
    /// `[down per level, up per level (deepest first)]`.
    pub blocks: Vec<Vec<usize>>,
    pub block_repeat: Vec<Vec<usize>>,
    pub level_config: Vec<String>,
    pub c_clip_text: usize,
    pub c_clip_text_pooled: usize,
    pub c_clip_img: usize,
    pub c_clip_seq: usize,
    pub kernel_size: usize,
    pub self_attn: bool,
    pub t_conds: Vec<String>,
    pub switch_level: Vec<bool>,
    /// UltraPixel's guidance modules (`agg_net*`), when the model has them.
    #[serde(rename = "_init_extra_parameter.TransInr")]
    pub inr: Option<InrConfig>,
}

impl Default for StageCConfig {
    fn default() -> Self {
        StageCConfig {
            c_in: 16,
            c_out: 16,
            c_r: 64,
            patch_size: 1,
            c_cond: 2048,
            c_hidden: vec![2048, 2048],
            nhead: vec![32, 32],
            blocks: vec![vec![8, 24], vec![24, 8]],
            block_repeat: vec![vec![1, 1], vec![1, 1]],
            level_config: vec!["CTA".into(), "CTA".into()],
            c_clip_text: 1280,
            c_clip_text_pooled: 1280,
            c_clip_img: 768,
            c_clip_seq: 4,
            kernel_size: 3,
            self_attn: true,
            t_conds: vec!["sca".into(), "crp".into()],
            switch_level: vec![false],
            inr: Some(InrConfig::default()),
        }
    }
}

impl StageCConfig {
    /// Checks what this runtime implements: patch size 1, no repeats, no level switching,
    /// and lists that agree on the depth.
    pub fn validate(&self) -> Result<()> {
        let depth = self.c_hidden.len();
        let bad = |m: String| Err(Error::InvalidArgument(format!("Stage C config: {m}")));
        if depth == 0 {
            return bad("c_hidden is empty".into());
        }
        if self.nhead.len() != depth || self.level_config.len() != depth {
            return bad("c_hidden, nhead and level_config disagree on the depth".into());
        }
        check_blocks(&self.blocks, depth, "blocks")?;
        check_blocks(&self.block_repeat, depth, "block_repeat")?;
        if self.block_repeat.iter().flatten().any(|&r| r != 1) {
            return bad("block repeats other than 1 are not supported".into());
        }
        if self.patch_size != 1 || self.switch_level.iter().any(|&s| s) {
            return bad("only patch_size 1 without level switching is supported".into());
        }
        if !self.self_attn {
            return bad("self_attn false is not supported".into());
        }
        check_letters(&self.level_config, "CTA")?;
        check_heads(
            &self.c_hidden,
            &self.nhead.iter().map(|&h| h as i64).collect::<Vec<_>>(),
        )
    }

    /// Width of the r-embedding the TimestepBlocks read: r plus one per condition.
    pub fn r_embed_width(&self) -> usize {
        self.c_r * (1 + self.t_conds.len())
    }
}

/// UltraPixel's INR guidance module (`TransInr_withnorm`): docs/MODEL.md §3.2.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InrConfig {
    pub ind: usize,
    pub ch: usize,
    pub n_head: usize,
    /// Unused by the module (the head size is `f_dim / n_head`); kept for the key set.
    pub head_dim: usize,
    pub n_groups: usize,
    pub f_dim: usize,
    pub time_dim: usize,
    pub t_conds: Vec<String>,
}

impl Default for InrConfig {
    fn default() -> Self {
        InrConfig {
            ind: 2048,
            ch: 1024,
            n_head: 32,
            head_dim: 32,
            n_groups: 64,
            f_dim: 1024,
            time_dim: 64,
            t_conds: Vec::new(),
        }
    }
}

impl InrConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidArgument(format!("INR config: {m}")));
        if self.ch != self.f_dim {
            return bad("ch must equal f_dim");
        }
        if self.n_head == 0 || self.f_dim % self.n_head != 0 {
            return bad("f_dim must be a multiple of n_head");
        }
        if self.ind % 4 != 0 || self.n_groups == 0 || !self.t_conds.is_empty() {
            return bad("ind must be a multiple of 4, n_groups positive, t_conds empty");
        }
        Ok(())
    }
}

/// Stable Cascade's Stage B: docs/MODEL.md §2.3, released lite (700M) model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StageBConfig {
    pub c_in: usize,
    pub c_out: usize,
    pub c_r: usize,
    pub patch_size: usize,
    pub c_cond: usize,
    pub c_hidden: Vec<usize>,
    /// Heads per level; −1 where the level has no attention.
    pub nhead: Vec<i64>,
    pub blocks: Vec<Vec<usize>>,
    pub block_repeat: Vec<Vec<usize>>,
    pub level_config: Vec<String>,
    pub c_clip: usize,
    pub c_clip_seq: usize,
    pub c_effnet: usize,
    pub c_pixels: usize,
    pub kernel_size: usize,
    pub self_attn: bool,
    pub t_conds: Vec<String>,
}

impl Default for StageBConfig {
    fn default() -> Self {
        StageBConfig {
            c_in: 4,
            c_out: 4,
            c_r: 64,
            patch_size: 2,
            c_cond: 1280,
            c_hidden: vec![320, 576, 1152, 1152],
            nhead: vec![-1, 9, 18, 18],
            blocks: vec![vec![2, 4, 14, 4], vec![4, 14, 4, 2]],
            block_repeat: vec![vec![1, 1, 1, 1], vec![2, 2, 2, 2]],
            level_config: ["CT", "CT", "CTA", "CTA"].map(String::from).to_vec(),
            c_clip: 1280,
            c_clip_seq: 4,
            c_effnet: 16,
            c_pixels: 3,
            kernel_size: 3,
            self_attn: true,
            t_conds: vec!["sca".into()],
        }
    }
}

impl StageBConfig {
    pub fn validate(&self) -> Result<()> {
        let depth = self.c_hidden.len();
        let bad = |m: &str| Err(Error::InvalidArgument(format!("Stage B config: {m}")));
        if depth == 0 || self.nhead.len() != depth || self.level_config.len() != depth {
            return bad("c_hidden, nhead and level_config disagree on the depth");
        }
        check_blocks(&self.blocks, depth, "blocks")?;
        check_blocks(&self.block_repeat, depth, "block_repeat")?;
        if self.block_repeat[0].iter().any(|&r| r != 1) {
            return bad("down-path block repeats are not supported");
        }
        if self.block_repeat[1].contains(&0) {
            return bad("up-path block repeats must be at least 1");
        }
        if self.patch_size != 2 || !self.self_attn {
            return bad("only patch_size 2 with self_attn is supported");
        }
        check_letters(&self.level_config, "CTA")?;
        let attn_heads: Vec<i64> = self
            .level_config
            .iter()
            .zip(&self.nhead)
            .map(|(l, &h)| if l.contains('A') { h } else { 1 })
            .collect();
        check_heads(&self.c_hidden, &attn_heads)
    }

    pub fn r_embed_width(&self) -> usize {
        self.c_r * (1 + self.t_conds.len())
    }
}

/// Stage A (Paella VQGAN) decoder: docs/MODEL.md §2.4.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StageAConfig {
    pub levels: usize,
    pub bottleneck_blocks: usize,
    pub c_hidden: usize,
    pub c_latent: usize,
    pub codebook_size: usize,
    pub scale_factor: f32,
}

impl Default for StageAConfig {
    fn default() -> Self {
        StageAConfig {
            levels: 2,
            bottleneck_blocks: 12,
            c_hidden: 384,
            c_latent: 4,
            codebook_size: 8192,
            scale_factor: 0.43,
        }
    }
}

impl StageAConfig {
    pub fn validate(&self) -> Result<()> {
        if self.levels != 2 || self.c_hidden % 2 != 0 || self.c_latent == 0 {
            return Err(Error::InvalidArgument(
                "Stage A config: only the released 2-level decoder (even c_hidden) is supported"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// Stable Cascade's Previewer (docs/MODEL.md §2.5, the official `modules/previewer.py`): Stage C
/// latents to a rough RGB image at 8×.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PreviewerConfig {
    pub c_in: usize,
    pub c_hidden: usize,
    pub c_out: usize,
}

impl Default for PreviewerConfig {
    fn default() -> Self {
        PreviewerConfig {
            c_in: 16,
            c_hidden: 512,
            c_out: 3,
        }
    }
}

impl PreviewerConfig {
    pub fn validate(&self) -> Result<()> {
        if self.c_in == 0 || self.c_out != 3 || self.c_hidden == 0 || self.c_hidden % 4 != 0 {
            return Err(Error::InvalidArgument(format!(
                "previewer config: c_in must be ≥ 1, c_out 3 and c_hidden a positive multiple \
                 of 4 (got {}, {}, {})",
                self.c_in, self.c_out, self.c_hidden
            )));
        }
        Ok(())
    }
}

/// The CLIP text tower (`transformers` `CLIPTextConfig`, as in `text_encoder/config.json`):
/// docs/MODEL.md §5, released ViT-bigG/14.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub max_position_embeddings: usize,
    pub projection_dim: usize,
    pub layer_norm_eps: f32,
    pub hidden_act: String,
    /// Selects the pooling rule, as in `transformers` (`text::pooled_position`): 2, the
    /// legacy value of old configs, pools at the highest id; any other value at its first
    /// occurrence. The released Stable Cascade export (`text_encoder/config.json`) has 49407.
    pub eos_token_id: u32,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 1280,
            intermediate_size: 5120,
            num_attention_heads: 20,
            num_hidden_layers: 32,
            max_position_embeddings: 77,
            projection_dim: 1280,
            layer_norm_eps: 1e-5,
            hidden_act: "gelu".into(),
            eos_token_id: crate::text::EOS,
        }
    }
}

impl ClipTextConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("CLIP text config: {m}")));
        if self.hidden_act != "gelu" {
            return bad(format!(
                "hidden_act `{}` is not supported (only the exact erf `gelu`)",
                self.hidden_act
            ));
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return bad("hidden_size must be a multiple of num_attention_heads".into());
        }
        Ok(())
    }
}

/// Parses a config JSON object over the defaults: unknown keys are ignored (the official
/// configs carry training-only ones), mistyped keys are an error naming `what`.
pub fn parse<T: serde::de::DeserializeOwned + Default>(
    value: &serde_json::Value,
    what: &str,
) -> Result<T> {
    if value.is_null() {
        return Ok(T::default());
    }
    serde_json::from_value(value.clone()).map_err(|e| {
        // serde names the type but not the key: find the first key that fails alone.
        let key = value.as_object().and_then(|o| {
            o.iter().find_map(|(k, v)| {
                let one = serde_json::json!({ k: v });
                serde_json::from_value::<T>(one).is_err().then(|| k.clone())
            })
        });
        match key {
            Some(k) => Error::InvalidArgument(format!("{what} config: key `{k}`: {e}")),
            None => Error::InvalidArgument(format!("{what} config: {e}")),
        }
    })
}

/// Parses a config JSON object over `base` (a network's released configuration when there
/// are several, like the ControlNets'): every key the object gives replaces `base`'s, nested
/// objects key by key, and every key it leaves out keeps `base`'s value (null: `base`
/// itself). Unlike [`parse`], a key `base` does not have is an error; errors name the key
/// (dotted path) and `what`.
pub fn parse_over<T: Serialize + serde::de::DeserializeOwned>(
    value: &serde_json::Value,
    base: &T,
    what: &str,
) -> Result<T> {
    use serde_json::Value;
    let bad = |m: String| Error::InvalidArgument(format!("{what} config: {m}"));
    let base = serde_json::to_value(base).map_err(|e| bad(format!("{e}")))?;
    let empty = Value::Object(Default::default());
    let value = match value {
        Value::Null => &empty,
        Value::Object(_) => value,
        _ => return Err(bad("must be a JSON object".into())),
    };
    // The keys given, down to the values that replace one of `base`'s whole.
    let mut leaves: Vec<(Vec<&str>, &Value)> = Vec::new();
    let mut todo: Vec<(Vec<&str>, &Value, &Value)> = vec![(vec![], value, &base)];
    while let Some((path, given, under)) = todo.pop() {
        let (Value::Object(given), Value::Object(under)) = (given, under) else {
            leaves.push((path, given));
            continue;
        };
        for (k, v) in given {
            let mut at = path.clone();
            at.push(k.as_str());
            let Some(u) = under.get(k) else {
                let known: Vec<&str> = under.keys().map(String::as_str).collect();
                return Err(bad(format!(
                    "unknown key `{}` (the keys there: {})",
                    at.join("."),
                    known.join(", ")
                )));
            };
            todo.push((at, v, u));
        }
    }
    leaves.sort_by(|a, b| a.0.cmp(&b.0));
    let over = |leaves: &[(Vec<&str>, &Value)]| {
        let mut out = base.clone();
        for (path, v) in leaves {
            let mut slot = &mut out;
            for k in path {
                slot = &mut slot[*k];
            }
            *slot = (*v).clone();
        }
        serde_json::from_value::<T>(out)
    };
    over(&leaves).map_err(|e| {
        // serde names the type but not the key: find the first key that fails alone.
        match leaves
            .iter()
            .find(|l| over(std::slice::from_ref(*l)).is_err())
        {
            Some((path, _)) => bad(format!("key `{}`: {e}", path.join("."))),
            None => bad(format!("{e}")),
        }
    })
}

fn check_blocks(lists: &[Vec<usize>], depth: usize, key: &str) -> Result<()> {
    if lists.len() != 2 || lists.iter().any(|l| l.len() != depth) {
        return Err(Error::InvalidArgument(format!(
            "config `{key}` must be two lists of {depth} counts (down, then up)"
        )));
    }
    Ok(())
}

fn check_letters(levels: &[String], allowed: &str) -> Result<()> {
    match levels
        .iter()
        .flat_map(|l| l.chars())
        .find(|c| !allowed.contains(*c))
    {
        Some(c) => Err(Error::InvalidArgument(format!(
            "level_config letter `{c}` is not supported (known: {allowed})"
        ))),
        None => Ok(()),
    }
}

fn check_heads(widths: &[usize], heads: &[i64]) -> Result<()> {
    for (&c, &h) in widths.iter().zip(heads) {
        if h <= 0 || c % h as usize != 0 {
            return Err(Error::InvalidArgument(format!(
                "a level of width {c} cannot have {h} attention heads"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_released_models_and_valid() {
        let c = StageCConfig::default();
        c.validate().unwrap();
        assert_eq!(c.r_embed_width(), 192);
        assert_eq!(c.c_hidden[0] / c.nhead[0], 64);
        StageBConfig::default().validate().unwrap();
        StageAConfig::default().validate().unwrap();
        ClipTextConfig::default().validate().unwrap();
        InrConfig::default().validate().unwrap();
    }

    #[test]
    fn json_overrides_some_keys_and_rejects_mistyped_ones() {
        let v = serde_json::json!({"c_hidden": [32, 32], "nhead": [2, 2], "dropout": [0.1, 0.1]});
        let c: StageCConfig = parse(&v, "Stage C").unwrap();
        assert_eq!(c.c_hidden, vec![32, 32]);
        assert_eq!(c.c_cond, 2048);
        let v = serde_json::json!({"c_hidden": "wide"});
        let err = parse::<StageCConfig>(&v, "Stage C")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Stage C config") && err.contains("c_hidden"),
            "{err}"
        );
    }

    #[test]
    fn unsupported_layouts_are_refused_with_the_reason() {
        let mut c = StageCConfig::default();
        c.level_config[1] = "CTX".into();
        assert!(c.validate().unwrap_err().to_string().contains("`X`"));
        let mut b = StageBConfig::default();
        b.nhead[2] = 7;
        assert!(b
            .validate()
            .unwrap_err()
            .to_string()
            .contains("7 attention heads"));
        let a = StageAConfig {
            levels: 3,
            ..Default::default()
        };
        assert!(a.validate().is_err());
    }
}
