//! Stable Cascade's ControlNet (`modules/controlnet.py`): the control input through a
//! backbone, then for each entry i of `proj_blocks` a projection `projections.{i}`: 1×1
//! conv (no bias), LeakyReLU(0.2), 1×1 conv to `c_proj` (no bias). The result is a list of
//! control maps indexed by ResBlock visit: map `proj_blocks[i]` is projection i, the other
//! indices up to the largest are empty. Stage C adds them before its ResBlocks
//! ([`super::stage_c::ControlInjection`]).
//!
//! Two backbones (`bottleneck_mode`, checkpoint prefix `backbone.`), the two the released
//! ControlNets use:
//! - `effnet` (Canny, inpainting): the control image through the EfficientNetV2 feature
//!   stack ([`super::effnet`]), 32× smaller, `backbone.last_channel` wide;
//! - `large` (super-resolution, whose input is already an EfficientNet latent): a 1×1 conv
//!   to `expand` channels, LeakyReLU(0.2), a 1×1 conv to `width`, `blocks` residual blocks
//!   (LayerNorm2d with affine parameters, GELU, 3×3 conv, twice), a 1×1 conv to `out`; every
//!   conv with a bias, the size unchanged ([`LargeBottleneck`]).

use super::effnet::{features, EffNetConfig};
use super::ModelBuilder;
use crate::ops::conv2d::{Act, Conv2d};
use crate::ops::elementwise::{self, Activation};
use crate::ops::norm::LayerNorm;
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
    /// `effnet` or `large` (the released ControlNets' backbones).
    pub bottleneck_mode: String,
    /// The `effnet` backbone.
    pub backbone: EffNetConfig,
    /// The `large` backbone.
    pub large: LargeBottleneck,
}

/// The shape of the `large` backbone (official: 4096·4, 1024, 8 blocks, 1280).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LargeBottleneck {
    pub expand: usize,
    pub width: usize,
    pub blocks: usize,
    pub out: usize,
}

impl Default for LargeBottleneck {
    fn default() -> Self {
        LargeBottleneck {
            expand: 4096 * 4,
            width: 1024,
            blocks: 8,
            out: 1280,
        }
    }
}

/// The residual blocks' LayerNorm2d: `nn.LayerNorm`'s default eps and affine parameters.
const LARGE_LN_EPS: f32 = 1e-5;

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
            large: LargeBottleneck::default(),
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
        if self.proj_blocks.is_empty() || self.c_proj == 0 || self.c_in == 0 {
            return bad("needs input channels and at least one projection".into());
        }
        match self.bottleneck_mode.as_str() {
            "effnet" => self.backbone().validate(),
            "large" => {
                let l = &self.large;
                if [l.expand, l.width, l.out].contains(&0) {
                    return bad(format!("the large backbone has zero channels: {l:?}"));
                }
                Ok(())
            }
            other => bad(format!(
                "bottleneck_mode {other:?} is not supported (the released ControlNets' \
                 \"effnet\" and \"large\")"
            )),
        }
    }

    /// Channels of the backbone's output (the projections' input).
    pub fn embedding_channels(&self) -> usize {
        if self.bottleneck_mode == "large" {
            self.large.out
        } else {
            self.backbone.last_channel
        }
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
    let feats = if cfg.bottleneck_mode == "large" {
        large_backbone(mb, &cfg.large, cfg.c_in, x)?
    } else {
        features(mb, "backbone.", x, &cfg.backbone())?
    };
    let width = cfg.embedding_channels();
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

/// A biased `Conv2d(cin, cout, k, padding (k − 1)/2)` at `backbone.{i}`, with `act` and an
/// optional residual added after it.
fn biased_conv(
    mb: &mut ModelBuilder,
    at: &str,
    x: TensorId,
    (cin, cout, k): (usize, usize, usize),
    act: Act,
    residual: Option<TensorId>,
) -> Result<TensorId> {
    let w = mb.weight(&format!("{at}.weight"), &[cout, cin, k, k], DType::BF16)?;
    let b = mb.weight(&format!("{at}.bias"), &[cout], DType::F32)?;
    let op = Conv2d {
        residual: residual.is_some(),
        ..Conv2d::plain(k, 1, (k - 1) / 2, act, DType::BF16)
    };
    let mut inputs = vec![x, w, b];
    inputs.extend(residual);
    mb.g.op1(op, &inputs)
}

/// LayerNorm2d (affine) then GELU, at `{at}`.
fn norm_gelu(mb: &mut ModelBuilder, at: &str, x: TensorId, c: usize) -> Result<TensorId> {
    let g = mb.weight(&format!("{at}.weight"), &[c], DType::F32)?;
    let b = mb.weight(&format!("{at}.bias"), &[c], DType::F32)?;
    let h =
        mb.g.op1(LayerNorm::affine(LARGE_LN_EPS, DType::BF16), &[x, g, b])?;
    let gelu = Activation {
        act: elementwise::Act::Gelu,
        out: DType::BF16,
    };
    mb.g.op1(gelu, &[h])
}

/// The `large` backbone on `x` (`[B, H, W, c_in]`): bf16 `[B, H, W, out]`. Keys
/// `backbone.{0,2}` (the two 1×1 convs), `backbone.{3 + i}.blocks.{0,3}` (the norms) and
/// `.blocks.{2,5}` (the 3×3 convs) of residual block i, `backbone.{3 + blocks}` (the output
/// conv).
fn large_backbone(
    mb: &mut ModelBuilder,
    l: &LargeBottleneck,
    c_in: usize,
    x: TensorId,
) -> Result<TensorId> {
    let leaky = Act::LeakyRelu(0.2);
    let h = biased_conv(mb, "backbone.0", x, (c_in, l.expand, 1), leaky, None)?;
    let mut h = biased_conv(mb, "backbone.2", h, (l.expand, l.width, 1), Act::None, None)?;
    for i in 0..l.blocks {
        let p = format!("backbone.{}.blocks.", 3 + i);
        let a = norm_gelu(mb, &format!("{p}0"), h, l.width)?;
        let a = biased_conv(
            mb,
            &format!("{p}2"),
            a,
            (l.width, l.width, 3),
            Act::None,
            None,
        )?;
        let a = norm_gelu(mb, &format!("{p}3"), a, l.width)?;
        h = biased_conv(
            mb,
            &format!("{p}5"),
            a,
            (l.width, l.width, 3),
            Act::None,
            Some(h),
        )?;
    }
    let last = format!("backbone.{}", 3 + l.blocks);
    biased_conv(mb, &last, h, (l.width, l.out, 1), Act::None, None)
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
    Ok(super::effnet::batchnorm_counters(&manifest(cfg)?))
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

    /// The released super-resolution ControlNet: a 16-channel EfficientNet latent through
    /// the `large` backbone, ≈ 204 M parameters (its 814 MB float32 file).
    #[test]
    fn the_large_backbone_has_the_official_names_and_keeps_the_size() {
        let cfg = ControlNetConfig {
            c_in: 16,
            bottleneck_mode: "large".into(),
            ..ControlNetConfig::default()
        };
        let m = manifest(&cfg).unwrap();
        let get = |k: &str| m.iter().find(|(n, _)| n == k).map(|(_, s)| s.clone());
        assert_eq!(get("backbone.0.weight"), Some(vec![16384, 16, 1, 1]));
        assert_eq!(get("backbone.2.bias"), Some(vec![1024]));
        assert_eq!(get("backbone.3.blocks.0.weight"), Some(vec![1024]));
        assert_eq!(
            get("backbone.10.blocks.5.weight"),
            Some(vec![1024, 1024, 3, 3])
        );
        assert_eq!(get("backbone.11.weight"), Some(vec![1280, 1024, 1, 1]));
        assert_eq!(get("projections.7.2.weight"), Some(vec![2048, 1280, 1, 1]));
        assert!(get("backbone.12.weight").is_none());
        assert_eq!(get("backbone.0.bias"), Some(vec![16384]));
        let params: usize = m.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!((params * 4 + 500_000) / 1_000_000, 814, "{params}");
        assert!(unused_keys(&cfg).unwrap().is_empty());
        let mut mb = ModelBuilder::new();
        let x = mb.g.input("x", &[1, 6, 10, 16], DType::F32).unwrap();
        let maps = controlnet(&mut mb, &cfg, x).unwrap();
        assert_eq!(mb.g.shape(maps[63].unwrap()), [1, 6, 10, 2048]);
    }
}
