//! ControlNet conditioning (`generate --control canny`), as the official UltraPixel
//! `inference/test_controlnet.py` applies it:
//!
//! - the control image is resized to a short side of 768 and run through the Canny filter
//!   ([`crate::control`]); a ready map is resized the same way;
//! - the ControlNet runs once per request on that map ([`net`]); its maps, times the
//!   strength (`--control_weight`, 0.7 by default), are added before Stage C's ResBlocks;
//! - they are injected wherever Stage C runs without UltraPixel's LR guidance: every step
//!   of the low-resolution pass, and only the high-resolution steps past the guided ones
//!   (the official `lr_guide=... if i <= 19 else None`: none with the default 20 steps);
//! - with control the script samples Stage C at CFG 1 ([`CONTROL_CFG_C`], unless the
//!   request sets another) and shift 2 ([`CONTROL_SHIFT`]), and appends " high quality" to
//!   the positive prompt ([`PROMPT_SUFFIX`]).
//!
//! The super-resolution ControlNet ([`ControlKind::SuperResolution`], `--control sr`,
//! `ultrapixel upscale`) is the same mechanism with another input: Stable Cascade trained it
//! on its `SREffnetFilter(scale_factor=0.5)`, which halves the training image (nearest),
//! encodes it with the EfficientNet encoder and doubles the latent back (nearest); its
//! example script upscales an image to twice its size with the maps at strength 1. So the
//! control image plays the halved image: it is resized to half the output size, encoded
//! and doubled ([`crate::control::super_resolution`], [`net::encode`]), and the default
//! strength is 1 ([`ControlKind::default_strength`]). Injection, CFG, shift and suffix are
//! the Canny ones.
//!
//! The inpainting ControlNet ([`ControlKind::Inpainting`], `--control inpaint`) reads
//! Stable Cascade's `InpaintFilter` with a given mask: the image with the masked pixels set
//! to 1 (white), and the mask as a fourth channel, both at the control size
//! ([`crate::control::inpaint`]); strength 1 as in Stable Cascade's script.

pub mod net;
pub mod tiny;

use crate::models::controlnet::{ControlNetConfig, LargeBottleneck};
use crate::models::stage_c::DEFAULT_CONTROL_WEIGHT;
use crate::tensor::HostTensor;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The official control strength of the Canny ControlNet.
pub const DEFAULT_STRENGTH: f32 = DEFAULT_CONTROL_WEIGHT;
/// The super-resolution and inpainting ControlNets' strength in Stable Cascade's script
/// (`cnet_multiplier`).
pub const SR_STRENGTH: f32 = 1.0;
/// Strengths accepted: 0 (the maps add nothing) to 2 (the official script suggests 0.3–0.8).
pub const MAX_STRENGTH: f32 = 2.0;
/// Stage C's CFG in the official script (`sampling_configs['cfg'] = 1`).
pub const CONTROL_CFG_C: f32 = 1.0;
/// Stage C's schedule shift in the official script (`sampling_configs['shift'] = 2`).
pub const CONTROL_SHIFT: f32 = 2.0;
/// What the official script appends to the prompt (`caption + ' high quality'`); the
/// negative prompt is left as it is.
pub const PROMPT_SUFFIX: &str = " high quality";

/// A released ControlNet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlKind {
    /// Stable Cascade's Canny ControlNet: edges of the control image.
    Canny,
    /// Stable Cascade's super-resolution ControlNet: the EfficientNet latent of the image.
    #[serde(rename = "sr")]
    SuperResolution,
    /// Stable Cascade's inpainting ControlNet: the image with a region masked out, and the
    /// mask.
    #[serde(rename = "inpaint")]
    Inpainting,
}

impl ControlKind {
    pub fn name(self) -> &'static str {
        match self {
            ControlKind::Canny => "canny",
            ControlKind::SuperResolution => "sr",
            ControlKind::Inpainting => "inpaint",
        }
    }

    /// Its weights in the model directory (and in `stabilityai/stable-cascade`).
    pub fn file(self) -> &'static str {
        match self {
            ControlKind::Canny => "controlnet/canny.safetensors",
            ControlKind::SuperResolution => "controlnet/super_resolution.safetensors",
            ControlKind::Inpainting => "controlnet/inpainting.safetensors",
        }
    }

    /// Every file it needs from `stabilityai/stable-cascade`.
    pub fn files(self) -> impl Iterator<Item = &'static str> {
        std::iter::once(self.file()).chain(self.encoder_file())
    }

    /// The network that turns the control image into the ControlNet's input, when it is one
    /// (the EfficientNet encoder of the super-resolution ControlNet).
    pub fn encoder_file(self) -> Option<&'static str> {
        match self {
            ControlKind::Canny | ControlKind::Inpainting => None,
            ControlKind::SuperResolution => Some(ENCODER_FILE),
        }
    }

    /// The released ControlNet's configuration: Stable Cascade's
    /// `configs/inference/controlnet_c_3b_{canny,sr}.yaml`. The `.json` beside the weights,
    /// if any, is read over it: the keys it leaves out keep these values
    /// ([`crate::pipeline::open_models::read_controlnet_config`]).
    pub fn released_config(self) -> ControlNetConfig {
        match self {
            ControlKind::Canny => ControlNetConfig::default(),
            ControlKind::SuperResolution => ControlNetConfig {
                c_in: 16,
                bottleneck_mode: "large".into(),
                large: LargeBottleneck::default(),
                ..ControlNetConfig::default()
            },
            ControlKind::Inpainting => ControlNetConfig {
                c_in: 4,
                ..ControlNetConfig::default()
            },
        }
    }

    /// The official strength.
    pub fn default_strength(self) -> f32 {
        match self {
            ControlKind::Canny => DEFAULT_STRENGTH,
            ControlKind::SuperResolution | ControlKind::Inpainting => SR_STRENGTH,
        }
    }
}

/// Stable Cascade's EfficientNet encoder, beside the Stage C files.
pub const ENCODER_FILE: &str = "effnet_encoder.safetensors";

impl std::fmt::Display for ControlKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ControlKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<ControlKind> {
        match s.trim().to_ascii_lowercase().as_str() {
            "canny" => Ok(ControlKind::Canny),
            "sr" | "super_resolution" => Ok(ControlKind::SuperResolution),
            "inpaint" | "inpainting" => Ok(ControlKind::Inpainting),
            _ => Err(Error::InvalidArgument(format!(
                "control {s:?} is not supported: the ones available are canny, sr and inpaint"
            ))),
        }
    }
}

/// Where a control map came from (for the image's metadata).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlSource {
    /// An image whose edges were extracted (its file name, when read from a file).
    Image(Option<String>),
    /// A ready control map (its file name, when read from a file).
    Map(Option<String>),
}

/// The control of a request: the map the ControlNet reads and its strength.
#[derive(Clone, Debug, PartialEq)]
pub struct Control {
    pub kind: ControlKind,
    /// Canny: the edge map, `[1, h, w]` in [0, 1], short side 768. Super-resolution: the
    /// image, `[3, h, w]` in [0, 1], as read (brought to the output's size when generating).
    /// Inpainting: the masked image and the mask, `[4, h, w]`, short side 768.
    pub map: HostTensor,
    pub source: ControlSource,
    /// 0 to [`MAX_STRENGTH`].
    pub strength: f32,
}

impl Control {
    /// Canny control from an RGB image `[3, h, w]` in [0, 1] (the official preprocessing).
    pub fn canny_image(image: &HostTensor) -> Result<Control> {
        check_rgb(image)?;
        Ok(Self::of(
            ControlKind::Canny,
            crate::control::canny_map(image),
            ControlSource::Image(None),
        ))
    }

    /// Canny control from an image file (PNG, JPEG or WebP).
    pub fn canny_image_file(path: &Path) -> Result<Control> {
        Ok(Self::of(
            ControlKind::Canny,
            crate::control::canny_map_of_file(path)?,
            ControlSource::Image(Some(file_name(path))),
        ))
    }

    /// Super-resolution control from an RGB image `[3, h, w]` in [0, 1]: the image the
    /// output is a larger version of.
    pub fn super_resolution_image(image: HostTensor) -> Result<Control> {
        check_rgb(&image)?;
        Ok(Self::of(
            ControlKind::SuperResolution,
            image,
            ControlSource::Image(None),
        ))
    }

    /// Super-resolution control from an image file (PNG, JPEG or WebP).
    pub fn super_resolution_image_file(path: &Path) -> Result<Control> {
        Ok(Self::of(
            ControlKind::SuperResolution,
            crate::control::image_file::read_rgb(path)?,
            ControlSource::Image(Some(file_name(path))),
        ))
    }

    /// Inpainting control from an RGB image `[3, h, w]` and a mask `[1, h', w']` (any size:
    /// brought to the image's), both in [0, 1]; the mask is 1 (over ½) where to paint.
    pub fn inpainting_image(image: &HostTensor, mask: &HostTensor) -> Result<Control> {
        check_rgb(image)?;
        if mask.shape.len() != 3 || mask.shape[0] != 1 || mask.data.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "an inpainting mask must be one channel [1, h, w], got {:?}",
                mask.shape
            )));
        }
        Ok(Self::of(
            ControlKind::Inpainting,
            crate::control::inpaint::inpaint_map(image, mask),
            ControlSource::Image(None),
        ))
    }

    /// Inpainting control from an image file and a mask file (its luminance: white where
    /// to paint).
    pub fn inpainting_image_file(image: &Path, mask: &Path) -> Result<Control> {
        let rgb = crate::control::image_file::read_rgb(image)?;
        let mask = crate::control::image_file::read_grey(mask)?;
        Ok(Control {
            source: ControlSource::Image(Some(file_name(image))),
            ..Self::inpainting_image(&rgb, &mask)?
        })
    }

    /// Canny control from a ready edge map `[1, h, w]` in [0, 1] (resized as an image is).
    pub fn canny_map(map: HostTensor) -> Result<Control> {
        if map.shape.len() != 3 || map.shape[0] != 1 || map.data.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "a control map must be one channel [1, h, w], got {:?}",
                map.shape
            )));
        }
        Ok(Self::of(
            ControlKind::Canny,
            crate::control::sized_map(&map),
            ControlSource::Map(None),
        ))
    }

    /// Canny control from a ready edge map file (its luminance: white edges on black).
    pub fn canny_map_file(path: &Path) -> Result<Control> {
        let control = Self::canny_map(crate::control::image_file::read_grey(path)?)?;
        Ok(Control {
            source: ControlSource::Map(Some(file_name(path))),
            ..control
        })
    }

    fn of(kind: ControlKind, map: HostTensor, source: ControlSource) -> Control {
        Control {
            kind,
            map,
            source,
            strength: kind.default_strength(),
        }
    }

    /// The same control at `strength`.
    pub fn with_strength(self, strength: f32) -> Control {
        Control { strength, ..self }
    }

    /// Checks the strength (the map was checked when made).
    pub fn validate(&self) -> Result<()> {
        if !(self.strength.is_finite() && (0.0..=MAX_STRENGTH).contains(&self.strength)) {
            return Err(Error::InvalidSetting {
                field: "control.strength",
                value: self.strength.to_string(),
                reason: format!(
                    "must be a number from 0 to {MAX_STRENGTH} (the official default is {})",
                    self.kind.default_strength()
                ),
            });
        }
        Ok(())
    }

    /// How the image's metadata records it.
    pub fn usage(&self) -> ControlUse {
        ControlUse {
            kind: self.kind,
            source: self.source.clone(),
            strength: self.strength,
            shift: CONTROL_SHIFT,
            prompt_suffix: PROMPT_SUFFIX.into(),
        }
    }
}

/// The control of an image, as its metadata records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControlUse {
    pub kind: ControlKind,
    pub source: ControlSource,
    pub strength: f32,
    /// Stage C's schedule shift.
    pub shift: f32,
    /// Appended to the prompt.
    pub prompt_suffix: String,
}

fn check_rgb(image: &HostTensor) -> Result<()> {
    if image.shape.len() != 3 || image.shape[0] != 3 || image.data.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "a control image must be RGB [3, h, w], got {:?}",
            image.shape
        )));
    }
    Ok(())
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_name_their_file() {
        let k: ControlKind = "Canny".parse().unwrap();
        assert_eq!(k.file(), "controlnet/canny.safetensors");
        let err = "depth".parse::<ControlKind>().unwrap_err().to_string();
        assert!(err.contains("depth") && err.contains("canny"), "{err}");
        let sr: ControlKind = "SR".parse().unwrap();
        assert_eq!(sr.file(), "controlnet/super_resolution.safetensors");
        assert_eq!(sr.encoder_file(), Some("effnet_encoder.safetensors"));
        assert_eq!(sr.released_config().c_in, 16);
        assert_eq!(
            sr.released_config().proj_blocks,
            k.released_config().proj_blocks
        );
        assert_eq!(serde_json::to_string(&sr).unwrap(), "\"sr\"");
        let inpaint: ControlKind = "inpaint".parse().unwrap();
        assert_eq!(inpaint.file(), "controlnet/inpainting.safetensors");
        assert_eq!(inpaint.released_config().c_in, 4);
        assert_eq!(inpaint.released_config().bottleneck_mode, "effnet");
    }

    #[test]
    fn maps_are_brought_to_the_control_size_and_strengths_checked() {
        let map = HostTensor::new(vec![1, 4, 8], (0..32).map(|i| i as f32 / 32.0).collect());
        let c = Control::canny_map(map).unwrap();
        assert_eq!(c.map.shape, [1, 768, 1536]);
        assert_eq!(c.strength, 0.7);
        assert!(c.clone().with_strength(2.0).validate().is_ok());
        for bad in [-0.1, 2.5, f32::NAN] {
            let err = c.clone().with_strength(bad).validate().unwrap_err();
            assert!(err.to_string().contains("from 0 to 2"), "{err}");
        }
        let rgb = HostTensor::zeros(&[1, 4, 8]);
        assert!(Control::canny_image(&rgb).is_err());
        assert!(Control::super_resolution_image(rgb).is_err());
        let sr = Control::super_resolution_image(HostTensor::zeros(&[3, 5, 7])).unwrap();
        assert_eq!((sr.kind, sr.strength), (ControlKind::SuperResolution, 1.0));
        assert_eq!(sr.map.shape, [3, 5, 7], "the image is kept as read");
        assert!(Control::canny_map(HostTensor::zeros(&[3, 4, 8])).is_err());
    }
}
