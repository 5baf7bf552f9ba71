//! Control-image preprocessing for Stable Cascade's ControlNets, as the official UltraPixel
//! `inference/test_controlnet.py` does it: read the image ([`image_file`]), resize it so its
//! short side is 768 ([`resize`]), and for the Canny ControlNet run the official
//! `CannyFilter(resize=224)` on it ([`canny`]); the result is the 1-channel map the
//! ControlNet takes, at the resized image's size. The super-resolution ControlNet reads the
//! image's EfficientNet latent instead ([`super_resolution`]).

pub mod canny;
pub mod image_file;
pub mod inpaint;
pub mod resize;
pub mod super_resolution;

use crate::tensor::HostTensor;
use crate::Result;
use std::path::Path;

/// The Canny control map of an RGB image `[3, h, w]` in [0, 1]: `[1, h', w']` at the
/// official control size (short side 768).
pub fn canny_map(image: &HostTensor) -> HostTensor {
    let resized = resize::resize_short_side(image, resize::CONTROL_SHORT_SIDE);
    canny::canny_filter(&resized).edges
}

/// A ready control map `[c, h, w]` in [0, 1] at the official control size: resized as the
/// image it stands for would be (unchanged when its short side is already 768).
pub fn sized_map(map: &HostTensor) -> HostTensor {
    resize::resize_short_side(map, resize::CONTROL_SHORT_SIDE)
}

/// [`canny_map`] of an image file.
pub fn canny_map_of_file(path: &Path) -> Result<HostTensor> {
    Ok(canny_map(&image_file::read_rgb(path)?))
}
