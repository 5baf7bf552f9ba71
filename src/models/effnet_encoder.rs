//! Stable Cascade's EfficientNet encoder (`modules/effnet.py EfficientNetEncoder`,
//! `effnet_encoder.safetensors`): an RGB image, normalized with the ImageNet statistics,
//! through torchvision's EfficientNetV2-S feature stack (head included, checkpoint prefix
//! `backbone.`), then the `mapper`: a 1×1 conv to `c_latent` channels (no bias, `mapper.0`)
//! and a BatchNorm without affine parameters (`mapper.1`, eps 1e-5), folded into the conv.
//! Its 16-channel latent, 32× smaller than the image, is Stage C's image space; the
//! super-resolution ControlNet reads it.

use super::effnet::{features, EffNetConfig};
use super::{Manifest, ModelBuilder};
use crate::ops::conv2d::{fold_batchnorm, Act, Conv2d};
use crate::runtime::graph::TensorId;
use crate::tensor::{DType, HostTensor};
use crate::Result;
use serde::{Deserialize, Serialize};

/// The mapper's BatchNorm eps (`nn.BatchNorm2d`'s default).
const MAPPER_EPS: f64 = 1e-5;

/// The ImageNet mean and standard deviation the official `effnet_preprocess` normalizes with.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The encoder's shape: the released one is `efficientnet_v2_s` and 16 latent channels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EffNetEncoderConfig {
    pub c_latent: usize,
    pub backbone: EffNetConfig,
}

impl Default for EffNetEncoderConfig {
    fn default() -> Self {
        EffNetEncoderConfig {
            c_latent: 16,
            backbone: EffNetConfig::default(),
        }
    }
}

impl EffNetEncoderConfig {
    /// The feature stack with torchvision's RGB stem.
    fn stack(&self) -> EffNetConfig {
        EffNetConfig {
            c_in: 3,
            stem_padding: 1,
            ..self.backbone.clone()
        }
    }
}

/// Records the encoder on `x` (f32 `[B, H, W, 3]`, already normalized): f32 `[B, h, w,
/// c_latent]`.
pub fn encoder(mb: &mut ModelBuilder, cfg: &EffNetEncoderConfig, x: TensorId) -> Result<TensorId> {
    let feats = features(mb, "backbone.", x, &cfg.stack())?;
    let (cin, c) = (cfg.backbone.last_channel, cfg.c_latent);
    let conv = [c, cin, 1, 1];
    let sources: [(&str, &[usize]); 3] = [
        ("mapper.0.weight", &conv),
        ("mapper.1.running_mean", &[c]),
        ("mapper.1.running_var", &[c]),
    ];
    let fold = move |t: &[HostTensor]| {
        let ones = vec![1.0; c];
        let zeros = vec![0.0; c];
        let stats = [&ones[..], &zeros[..], &t[1].data[..], &t[2].data[..]];
        fold_batchnorm(&t[0], None, stats, MAPPER_EPS)
    };
    let w = mb.derived(
        "mapper.folded.weight",
        &conv,
        DType::BF16,
        &sources,
        move |t| Ok(fold(t).0),
    )?;
    let b = mb.derived("mapper.folded.bias", &[c], DType::F32, &sources, move |t| {
        Ok(fold(t).1)
    })?;
    mb.g.op1(
        Conv2d::plain(1, 1, 0, Act::None, DType::F32),
        &[feats, w, b],
    )
}

/// The checkpoint keys the encoder reads (no key depends on the image size).
pub fn manifest(cfg: &EffNetEncoderConfig) -> Result<Manifest> {
    super::manifest_of(|mb| {
        let x = mb.g.input("x", &[1, 64, 64, 3], DType::F32)?;
        encoder(mb, cfg, x).map(|_| ())
    })
}

/// The BatchNorm counters a torch state dict stores beside the norms read (never read).
pub fn unused_keys(cfg: &EffNetEncoderConfig) -> Result<Manifest> {
    Ok(super::effnet::batchnorm_counters(&manifest(cfg)?))
}

/// An RGB image `[3, h, w]` in [0, 1] as the encoder's input: channels last, normalized.
pub fn normalized_input(image: &HostTensor) -> Vec<f32> {
    let (h, w) = (image.shape[1], image.shape[2]);
    (0..h * w)
        .flat_map(|i| {
            (0..3).map(move |k| (image.data[k * h * w + i] - IMAGENET_MEAN[k]) / IMAGENET_STD[k])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_released_encoder_reads_the_official_keys_and_maps_32x_down() {
        let cfg = EffNetEncoderConfig::default();
        let m = manifest(&cfg).unwrap();
        let get = |k: &str| m.iter().find(|(n, _)| n == k).map(|(_, s)| s.clone());
        assert_eq!(get("backbone.0.0.weight"), Some(vec![24, 3, 3, 3]));
        assert_eq!(get("backbone.7.0.weight"), Some(vec![1280, 256, 1, 1]));
        assert_eq!(get("mapper.0.weight"), Some(vec![16, 1280, 1, 1]));
        assert_eq!(get("mapper.1.running_var"), Some(vec![16]));
        assert!(
            get("mapper.1.weight").is_none(),
            "the mapper's norm has no affine"
        );
        let unused = unused_keys(&cfg).unwrap();
        assert!(unused.contains(&("mapper.1.num_batches_tracked".into(), vec![])));
        let mut mb = ModelBuilder::new();
        let x = mb.g.input("x", &[1, 96, 64, 3], DType::F32).unwrap();
        let z = encoder(&mut mb, &cfg, x).unwrap();
        assert_eq!(mb.g.shape(z), [1, 3, 2, 16]);
    }

    #[test]
    fn the_input_is_normalized_channels_last() {
        let img = HostTensor::new(vec![3, 1, 2], vec![0.0, 1.0, 0.5, 0.5, 1.0, 0.0]);
        let x = normalized_input(&img);
        assert_eq!(x.len(), 6);
        assert!((x[0] - (0.0 - 0.485) / 0.229).abs() < 1e-6);
        assert!((x[3] - (1.0 - 0.485) / 0.229).abs() < 1e-6);
        assert!((x[5] - (0.0 - 0.406) / 0.225).abs() < 1e-6);
    }
}
