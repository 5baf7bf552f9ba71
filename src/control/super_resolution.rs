//! The super-resolution ControlNet's input, after Stable Cascade's `SREffnetFilter` with its
//! released `scale_factor` of ½: the filter halves the image (nearest), encodes it with the
//! EfficientNet encoder and doubles the latent (nearest). When upscaling, the given image
//! is the halved one: it is brought to half the output size ([`encoder_image`], the control
//! resize, antialiased bilinear; unchanged when it already is), encoded (the pipeline), and
//! the latent doubled ([`double_nearest`]).

use super::resize::bilinear_antialias;
use crate::tensor::HostTensor;

/// The filter's downscale: the encoder sees the image at 1/`FACTOR` of the output size.
pub const FACTOR: usize = 2;

/// `(height, width)` of the encoder's input for an output of `(h, w)` (at least 32, the
/// encoder's stride).
pub fn encoder_size(h: usize, w: usize) -> (usize, usize) {
    ((h / FACTOR).max(32), (w / FACTOR).max(32))
}

/// The RGB image `[3, h, w]` at the encoder's input size for an output of `out` (h, w).
pub fn encoder_image(image: &HostTensor, out: (usize, usize)) -> HostTensor {
    let (h, w) = encoder_size(out.0, out.1);
    bilinear_antialias(image, h, w)
}

/// `F.interpolate(latent, scale_factor=2, mode="nearest")` on `[c, h, w]`.
pub fn double_nearest(latent: &HostTensor) -> HostTensor {
    let [c, h, w] = latent.shape[..] else {
        panic!("a channels-first latent [c, h, w], got {:?}", latent.shape)
    };
    let (oh, ow) = (h * FACTOR, w * FACTOR);
    let data = (0..c * oh * ow)
        .map(|i| {
            let (k, y, x) = (i / (oh * ow), i / ow % oh, i % ow);
            latent.data[(k * h + y / FACTOR) * w + x / FACTOR]
        })
        .collect();
    HostTensor::new(vec![c, oh, ow], data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_data::random;

    #[test]
    fn the_encoder_sees_half_the_output_and_the_latent_is_doubled() {
        assert_eq!(encoder_size(4096, 2048), (2048, 1024));
        assert_eq!(encoder_size(40, 4096), (32, 2048));
        let img = random(3, &[3, 40, 36], 1.0);
        assert_eq!(encoder_image(&img, (80, 72)).data, img.data, "already half");
        assert_eq!(encoder_image(&img, (512, 256)).shape, [3, 256, 128]);
        let z = random(4, &[2, 3, 5], 1.0);
        let up = double_nearest(&z);
        assert_eq!(up.shape, [2, 6, 10]);
        for (k, y, x) in [(0, 0, 0), (1, 5, 9), (1, 2, 7), (0, 3, 4)] {
            assert_eq!(
                up.data[(k * 6 + y) * 10 + x],
                z.data[(k * 3 + y / 2) * 5 + x / 2]
            );
        }
    }
}
