//! Stable Cascade's ControlNet (`modules/controlnet.py`, bottleneck `effnet`): the control
//! image through the EfficientNetV2 feature stack ([`super::effnet`], checkpoint prefix
//! `backbone.`), then for each entry i of `proj_blocks` a projection `projections.{i}`:
//! 1×1 conv (no bias), LeakyReLU(0.2), 1×1 conv to `c_proj` (no bias). The result is a list
//! of control maps indexed by ResBlock visit: map `proj_blocks[i]` is projection i, the
//! other indices up to the largest are empty. Stage C adds them before its ResBlocks
//! ([`super::stage_c::ControlInjection`]).

use super::effnet::{features, EffNetConfig};
use super::ModelBuilder;
use crate::ops::conv2d::{Act, Conv2d};
use crate::runtime::graph::TensorId;
use crate::tensor::DType;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// The official constructor arguments, plus the backbone's shape (torchvision's
/// `efficientnet_v2_s` by default; the golden cases use a tiny stack). The backbone's input
/// channels and stem padding follow `c_in` as in the official code: 3 channels keep
/// torchvision's padded stem, any other count gets the replaced stem without padding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ControlNetConfig {
    pub c_in: usize,
    pub c_proj: usize,
    pub proj_blocks: Vec<usize>,
    /// Only `effnet` (the released ControlNets) is implemented.
    pub bottleneck_mode: String,
    pub backbone: EffNetConfig,
}

impl Default for ControlNetConfig {
    /// The released Canny ControlNet (`configs/training/cfg_control_lr.yaml` of UltraPixel,
    /// Stable Cascade's `canny.safetensors`): one input channel, Stage C's 2048 width, eight
    /// maps at the first and last four ResBlocks of each half.
    fn default() -> Self {
        ControlNetConfig {
            c_in: 1,
            c_proj: 2048,
            proj_blocks: vec![0, 4, 8, 12, 51, 55, 59, 63],
            bottleneck_mode: "effnet".into(),
            backbone: EffNetConfig::default(),
        }
    }
}

impl ControlNetConfig {
    /// The backbone as the official code builds it for `c_in`.
    pub fn backbone(&self) -> EffNetConfig {
        EffNetConfig {
            c_in: self.c_in,
            stem_padding: if self.c_in == 3 { 1 } else { 0 },
            ..self.backbone.clone()
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("ControlNet config: {m}")));
        if self.bottleneck_mode != "effnet" {
            return bad(format!(
                "bottleneck_mode {:?} is not supported (only the released ControlNets' \"effnet\")",
                self.bottleneck_mode
            ));
        }
        if self.proj_blocks.is_empty() || self.c_proj == 0 || self.c_in == 0 {
            return bad("needs input channels and at least one projection".into());
        }
        self.backbone().validate()
    }
}

/// Records the ControlNet on the control image `x` (`[B, H, W, c_in]`): the maps, f32
/// `[B, h, w, c_proj]`, indexed by ResBlock visit (None where no projection delivers).
pub fn controlnet(
    mb: &mut ModelBuilder,
    cfg: &ControlNetConfig,
    x: TensorId,
) -> Result<Vec<Option<TensorId>>> {
    cfg.validate()?;
    let feats = features(mb, "backbone.", x, &cfg.backbone())?;
    let width = cfg.backbone.last_channel;
    let n = cfg.proj_blocks.iter().max().map_or(0, |m| m + 1);
    let mut maps = vec![None; n];
    for (i, &at) in cfg.proj_blocks.iter().enumerate() {
        let p = format!("projections.{i}.");
        let w0 = mb.weight(&format!("{p}0.weight"), &[width, width, 1, 1], DType::BF16)?;
        let leaky = Conv2d {
            bias: false,
            ..Conv2d::plain(1, 1, 0, Act::LeakyRelu(0.2), DType::BF16)
        };
        let h = mb.g.op1(leaky, &[feats, w0])?;
        let w2 = mb.weight(
            &format!("{p}2.weight"),
            &[cfg.c_proj, width, 1, 1],
            DType::BF16,
        )?;
        let out = Conv2d {
            bias: false,
            ..Conv2d::plain(1, 1, 0, Act::None, DType::F32)
        };
        maps[at] = Some(mb.g.op1(out, &[h, w2])?);
    }
    Ok(maps)
}

/// The checkpoint keys the ControlNet reads (recorded on a small image; no key depends on the
/// size).
pub fn manifest(cfg: &ControlNetConfig) -> Result<super::Manifest> {
    super::manifest_of(|mb| {
        let x = mb.g.input("x", &[1, 64, 64, cfg.c_in], DType::F32)?;
        controlnet(mb, cfg, x).map(|_| ())
    })
}

/// The BatchNorm counters of a torch state dict (`{norm}.num_batches_tracked`, int64
/// scalars) beside each norm the ControlNet reads: stored by the released files, never
/// read. Only these may be present without being read.
pub fn unused_keys(cfg: &ControlNetConfig) -> Result<super::Manifest> {
    Ok(manifest(cfg)?
        .iter()
        .filter_map(|(k, _)| k.strip_suffix(".running_mean"))
        .map(|norm| (format!("{norm}.num_batches_tracked"), vec![]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_released_canny_manifest_has_the_official_names() {
        let m = manifest(&ControlNetConfig::default()).unwrap();
        let get = |k: &str| m.iter().find(|(n, _)| n == k).map(|(_, s)| s.clone());
        assert_eq!(get("backbone.0.0.weight"), Some(vec![24, 1, 3, 3]));
        assert_eq!(get("backbone.7.0.weight"), Some(vec![1280, 256, 1, 1]));
        assert_eq!(get("projections.7.0.weight"), Some(vec![1280, 1280, 1, 1]));
        assert_eq!(get("projections.7.2.weight"), Some(vec![2048, 1280, 1, 1]));
        assert!(get("projections.8.0.weight").is_none());
    }

    #[test]
    fn the_unused_keys_are_the_counters_of_the_norms_read() {
        let cfg = ControlNetConfig::default();
        let unused = unused_keys(&cfg).unwrap();
        let m = manifest(&cfg).unwrap();
        let norms = m
            .iter()
            .filter(|(k, _)| k.ends_with(".running_var"))
            .count();
        assert_eq!(unused.len(), norms);
        assert!(unused.contains(&("backbone.0.1.num_batches_tracked".into(), vec![])));
        assert!(unused.contains(&("backbone.6.14.block.3.1.num_batches_tracked".into(), vec![])));
        assert!(unused
            .iter()
            .all(|(k, _)| k.ends_with(".1.num_batches_tracked")));
    }

    #[test]
    fn maps_sit_at_their_proj_block_index() {
        let cfg = ControlNetConfig::default();
        let mut mb = ModelBuilder::new();
        let x = mb.g.input("x", &[1, 96, 64, 1], DType::F32).unwrap();
        let maps = controlnet(&mut mb, &cfg, x).unwrap();
        assert_eq!(maps.len(), 64);
        for (i, m) in maps.iter().enumerate() {
            assert_eq!(m.is_some(), cfg.proj_blocks.contains(&i), "{i}");
        }
        // Stem without padding: 96×64 → 47×31, then strides 2, 2, 2, 2: 3×2.
        let s = mb.g.shape(maps[0].unwrap()).to_vec();
        assert_eq!(s, [1, 3, 2, 2048]);
    }

    #[test]
    fn only_a_non_rgb_stem_drops_the_padding_and_other_bottlenecks_are_refused() {
        let mut cfg = ControlNetConfig::default();
        assert_eq!(cfg.backbone().stem_padding, 0);
        cfg.c_in = 3;
        assert_eq!(cfg.backbone().stem_padding, 1);
        cfg.bottleneck_mode = "simple".into();
        assert!(cfg.validate().unwrap_err().to_string().contains("simple"));
    }
}
