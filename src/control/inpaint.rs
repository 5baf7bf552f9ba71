//! The inpainting ControlNet's input, Stable Cascade's `InpaintFilter` with a given mask:
//! the image with the masked pixels set to 1 (white), then the mask as a fourth channel.
//! Image and mask are first brought to the control size (short side 768, like the Canny
//! control image; the mask to the image's size first, then thresholded at ½ after each
//! resize, so it stays binary).

use super::resize::{bilinear_antialias, resize_short_side, CONTROL_SHORT_SIDE};
use crate::tensor::HostTensor;

/// `[4, h, w]`: the masked image (1 where the mask is) and the mask, at the control size.
pub fn inpaint_map(image: &HostTensor, mask: &HostTensor) -> HostTensor {
    let (h, w) = (image.shape[1], image.shape[2]);
    let mask = binary(&bilinear_antialias(mask, h, w));
    let image = resize_short_side(image, CONTROL_SHORT_SIDE);
    let mask = binary(&resize_short_side(&mask, CONTROL_SHORT_SIDE));
    let plane = mask.data.len();
    let mut data: Vec<f32> = image
        .data
        .iter()
        .enumerate()
        .map(|(i, &v)| if mask.data[i % plane] > 0.5 { 1.0 } else { v })
        .collect();
    data.extend(&mask.data);
    HostTensor::new(vec![4, mask.shape[1], mask.shape[2]], data)
}

fn binary(mask: &HostTensor) -> HostTensor {
    let data = mask
        .data
        .iter()
        .map(|&v| if v > 0.5 { 1.0 } else { 0.0 })
        .collect();
    HostTensor::new(mask.shape.clone(), data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_data::random;

    #[test]
    fn masked_pixels_are_white_and_the_mask_is_the_fourth_channel() {
        let mut image = random(1, &[3, 96, 64], 1.0);
        image.data.iter_mut().for_each(|v| *v = v.abs().min(0.9));
        // Left half masked, given at another size.
        let mask = HostTensor::new(
            vec![1, 12, 8],
            (0..96).map(|i| if i % 8 < 4 { 1.0 } else { 0.0 }).collect(),
        );
        let map = inpaint_map(&image, &mask);
        assert_eq!(map.shape, [4, 1152, 768]);
        let plane = 1152 * 768;
        for (y, x) in [(0, 0), (500, 100), (1151, 383)] {
            let i = y * 768 + x;
            assert_eq!(map.data[3 * plane + i], 1.0);
            assert!((0..3).all(|k| map.data[k * plane + i] == 1.0));
        }
        for (y, x) in [(0, 767), (600, 500)] {
            let i = y * 768 + x;
            assert_eq!(map.data[3 * plane + i], 0.0);
            assert!((0..3).all(|k| map.data[k * plane + i] < 0.95));
        }
    }
}
