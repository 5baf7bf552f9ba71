//! Reading a control image file (PNG, JPEG or WebP, by content) into the tensor the
//! preprocessing takes, as the official script does with `Image.open(..).convert("RGB")`
//! and `to_tensor`: RGB (alpha dropped, grey replicated), channels first, values / 255.

use crate::tensor::HostTensor;
use crate::{Error, Result};
use std::path::Path;

/// The image at `path` as `[3, h, w]` in [0, 1]. A missing, unreadable or undecodable
/// file is an error that names it and says what is accepted.
pub fn read_rgb(path: &Path) -> Result<HostTensor> {
    Ok(from_rgb8(&decode(path)?.to_rgb8()))
}

/// The image at `path` as one channel `[1, h, w]` in [0, 1]: its luminance (a ready control
/// map, white edges on black); errors as [`read_rgb`].
pub fn read_grey(path: &Path) -> Result<HostTensor> {
    let grey = decode(path)?.to_luma8();
    let (w, h) = (grey.width() as usize, grey.height() as usize);
    let data = grey.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    Ok(HostTensor::new(vec![1, h, w], data))
}

fn decode(path: &Path) -> Result<image::DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .decode()
        .map_err(|e| {
            Error::format(
                path,
                format!("cannot decode the control image ({e}); use a PNG, JPEG or WebP file"),
            )
        })
}

/// An 8-bit RGB image as `[3, h, w]` in [0, 1].
pub fn from_rgb8(img: &image::RgbImage) -> HostTensor {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let raw = img.as_raw();
    let data = (0..3)
        .flat_map(|k| (0..h * w).map(move |i| raw[i * 3 + k] as f32 / 255.0))
        .collect();
    HostTensor::new(vec![3, h, w], data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("upx-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    #[test]
    fn png_and_grey_images_read_as_rgb_channels_first() {
        let (w, h) = (5u32, 3u32);
        let rgb =
            image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8 * 40, y as u8 * 90, 7]));
        let path = scratch("rgb.png");
        rgb.save(&path).unwrap();
        let t = read_rgb(&path).unwrap();
        assert_eq!(t.shape, [3, 3, 5]);
        assert_eq!(t.data[2 * 5 + 4], 160.0 / 255.0); // red of (x 4, y 2)
        assert_eq!(t.data[15 + 2 * 5 + 4], 180.0 / 255.0); // green
        assert_eq!(t.data[30], 7.0 / 255.0); // blue
        let grey = image::GrayImage::from_fn(w, h, |x, _| image::Luma([x as u8 * 50]));
        let gpath = scratch("grey.png");
        grey.save(&gpath).unwrap();
        let g = read_rgb(&gpath).unwrap();
        assert!((0..3).all(|k| g.data[k * 15 + 3] == 150.0 / 255.0));
        let one = read_grey(&gpath).unwrap();
        assert_eq!(one.shape, [1, 3, 5]);
        assert_eq!(one.data[3], 150.0 / 255.0);
        std::fs::remove_file(path).unwrap();
        std::fs::remove_file(gpath).unwrap();
    }

    #[test]
    fn unreadable_files_are_clear_errors() {
        let missing = read_rgb(Path::new("/nonexistent/control.png")).unwrap_err();
        assert!(
            missing.to_string().contains("/nonexistent/control.png"),
            "{missing}"
        );
        let path = scratch("not-an-image.png");
        std::fs::write(&path, b"this is text, not pixels").unwrap();
        let bad = read_rgb(&path).unwrap_err().to_string();
        assert!(
            bad.contains("not-an-image.png") && bad.contains("PNG, JPEG or WebP"),
            "{bad}"
        );
        std::fs::remove_file(path).unwrap();
    }
}
