//! Control preprocessing kinds, computed on the host (no weights, the f32 rule everywhere):
//! `canny_filter` (the official `CannyFilter(resize=224)`) and `control_image_resize`
//! (`resize_image`: short side to `size`, antialiased bilinear).

use super::*;
use crate::control::{canny::canny_filter, resize::resize_short_side};

/// The file's `[1, c, h, w]` image as `[c, h, w]`.
fn single_image(case: &Case, name: &str) -> Result<HostTensor> {
    let t = case.input(name)?;
    match t.shape.as_slice() {
        [1, c, h, w] => Ok(HostTensor::new(vec![*c, *h, *w], t.data.clone())),
        s => Err(case.error(format!("input.{name}: expected [1, c, h, w], got {s:?}"))),
    }
}

pub(super) fn canny(case: &Case) -> Result<Vec<(String, Vec<f32>)>> {
    for (key, want) in [
        ("resize", 224.0),
        ("low_threshold", 100.0),
        ("high_threshold", 200.0),
    ] {
        let got = case.config.get(key).and_then(|v| v.as_f64());
        if got != Some(want) {
            return Err(case.error(format!(
                "config {key} is {got:?}; this build implements the official {want}"
            )));
        }
    }
    let steps = canny_filter(&single_image(case, "image")?);
    Ok(vec![
        (
            "quantized".into(),
            steps.quantized.iter().map(|&v| v as f32).collect(),
        ),
        ("edges_224".into(), steps.edges_small.data),
        ("edges".into(), steps.edges.data),
    ])
}

pub(super) fn resize(case: &Case) -> Result<Vec<(String, Vec<f32>)>> {
    let size = case.config_usize("size")?;
    let pixels = case.input("pixels")?;
    let &[h, w, 3] = pixels.shape.as_slice() else {
        return Err(case.error(format!(
            "input.pixels: expected [h, w, 3], got {:?}",
            pixels.shape
        )));
    };
    let chw = (0..3)
        .flat_map(|k| (0..h * w).map(move |i| pixels.data[i * 3 + k] / 255.0))
        .collect();
    let out = resize_short_side(&HostTensor::new(vec![3, h, w], chw), size);
    Ok(vec![("image".into(), out.data)])
}
