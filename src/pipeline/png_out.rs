//! PNG output: 8-bit RGB from the decoder's [0, 1] floats, with the generation settings as
//! text chunks other tools read (A1111's `parameters`, and our JSON under `ultrapixel`).

use super::control::ControlUse;
use super::request::{Request, Size, StageSettings};
use crate::atomic_file::write_atomic;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::path::Path;

/// The A1111 / ComfyUI-readable settings line (tEXt, or iTXt when not Latin-1).
pub const PARAMETERS_KEY: &str = "parameters";
/// Our settings as JSON ([`ImageMetadata`]), always iTXt (UTF-8).
pub const JSON_KEY: &str = "ultrapixel";
/// The standard PNG keyword naming the program that made the file.
pub const SOFTWARE_KEY: &str = "Software";

/// The sampler every stage uses (docs/MODEL.md §4.4), as A1111 names it.
const SAMPLER: &str = "DDPM";

/// An 8-bit RGB image, rows top to bottom, pixels interleaved R, G, B.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rgb8Image {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

impl Rgb8Image {
    /// From planar floats `[3, height, width]` (the Stage A decoder's NCHW output).
    pub fn from_chw(data: &[f32], height: usize, width: usize) -> Result<Rgb8Image> {
        check_len(data, height, width, "[3, H, W]")?;
        let plane = height * width;
        let pixels = (0..plane)
            .flat_map(|i| (0..3).map(move |c| quantize(data[c * plane + i])))
            .collect();
        Self::with_pixels(pixels, height, width)
    }

    /// From interleaved floats `[height, width, 3]` (channels-last activations).
    pub fn from_hwc(data: &[f32], height: usize, width: usize) -> Result<Rgb8Image> {
        check_len(data, height, width, "[H, W, 3]")?;
        Self::with_pixels(data.iter().map(|&v| quantize(v)).collect(), height, width)
    }

    fn with_pixels(pixels: Vec<u8>, height: usize, width: usize) -> Result<Rgb8Image> {
        let side = |v: usize| {
            u32::try_from(v)
                .map_err(|_| Error::InvalidArgument(format!("image side {v} is too large")))
        };
        Ok(Rgb8Image {
            width: side(width)?,
            height: side(height)?,
            pixels,
        })
    }
}

fn check_len(data: &[f32], height: usize, width: usize, layout: &str) -> Result<()> {
    let want = 3 * height * width;
    if data.len() != want || want == 0 {
        return Err(Error::InvalidArgument(format!(
            "image {layout} with H={height}, W={width} needs {want} values, got {}",
            data.len()
        )));
    }
    Ok(())
}

/// The official pipeline's quantization (docs/MODEL.md §1.2 step 5): clamp to [0, 1], ×255, then
/// truncate (torchvision's `to_pil_image` does `.mul(255).byte()`), not round. NaN gives 0.
fn quantize(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0) as u8
}

/// How one image was made: enough to make it again, and to tell which weights made it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageMetadata {
    pub prompt: String,
    pub negative_prompt: String,
    pub size: Size,
    /// This image's own seed (image k of a batch: the batch seed + k).
    pub seed: u64,
    pub stage_c: StageSettings,
    pub stage_b: StageSettings,
    pub sampler: String,
    /// Model file name → sha256 (hex), for the files whose hash is known.
    pub models: BTreeMap<String, String>,
    /// The LoRAs that changed the image (scale ≠ 0), in order; none for a plain one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraUse>,
    /// The ControlNet conditioning, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlUse>,
    /// `ultrapixel <version>`.
    pub version: String,
}

/// A LoRA as an image's metadata names it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraUse {
    /// The file name (without its directory).
    pub file: String,
    pub scale: f32,
}

impl ImageMetadata {
    /// The metadata of the image made with `seed` by `request`.
    pub fn new(request: &Request, seed: u64, models: BTreeMap<String, String>) -> ImageMetadata {
        ImageMetadata {
            prompt: request.prompt.clone(),
            negative_prompt: request.negative_prompt.clone(),
            size: request.size,
            seed,
            stage_c: request.stage_c,
            stage_b: request.stage_b,
            sampler: SAMPLER.to_string(),
            models,
            loras: Vec::new(),
            control: None,
            version: software(),
        }
    }

    /// The A1111 infotext: prompt, `Negative prompt:` line (when there is one), then one line
    /// of `Key: value` pairs. Stage C's settings take A1111's `Steps` and `CFG scale` keys.
    pub fn a1111_parameters(&self) -> String {
        let mut pairs = vec![
            format!("Steps: {}", self.stage_c.steps),
            format!("Sampler: {}", self.sampler),
            format!("CFG scale: {}", self.stage_c.cfg),
            format!("Seed: {}", self.seed),
            format!("Size: {}", self.size),
        ];
        if let Some(hash) = self.models.get(STAGE_C_FILE) {
            pairs.push(format!("Model hash: {}", &hash[..hash.len().min(10)]));
        }
        pairs.extend(
            self.loras
                .iter()
                .map(|l| format!("LoRA: {}:{}", l.file, l.scale)),
        );
        if let Some(c) = &self.control {
            pairs.push(format!("ControlNet: {}", c.kind));
            pairs.push(format!("Control strength: {}", c.strength));
        }
        pairs.extend([
            "Model: UltraPixel".to_string(),
            format!("Stage B steps: {}", self.stage_b.steps),
            format!("Stage B CFG scale: {}", self.stage_b.cfg),
            format!("Version: {}", self.version),
        ]);
        let mut text = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            text.push_str(&format!("\nNegative prompt: {}", self.negative_prompt));
        }
        text.push('\n');
        text.push_str(&pairs.join(", "));
        text
    }
}

/// The weight file whose short hash A1111's `Model hash` shows.
const STAGE_C_FILE: &str = "stage_c_bf16.safetensors";

fn software() -> String {
    format!("ultrapixel {}", env!("CARGO_PKG_VERSION"))
}

/// Writes `image` to `path` as PNG, atomically (no partial file on error; an existing file is
/// replaced only by a complete one), with `metadata` as text chunks unless `None`.
pub fn write_png(path: &Path, image: &Rgb8Image, metadata: Option<&ImageMetadata>) -> Result<()> {
    check_pixels(image)?;
    write_atomic(path, |out| {
        encode(out, image, metadata).map_err(|e| Error::format(path, format!("writing PNG: {e}")))
    })
}

/// `image` as the bytes of a PNG file (what [`write_png`] writes), for answers sent over the
/// network.
pub fn png_bytes(image: &Rgb8Image, metadata: Option<&ImageMetadata>) -> Result<Vec<u8>> {
    check_pixels(image)?;
    let mut out = Vec::new();
    encode(&mut out, image, metadata)
        .map_err(|e| Error::InvalidArgument(format!("encoding PNG: {e}")))?;
    Ok(out)
}

fn check_pixels(image: &Rgb8Image) -> Result<()> {
    let want = 3 * image.width as usize * image.height as usize;
    if image.pixels.len() != want {
        return Err(Error::InvalidArgument(format!(
            "image {}x{} needs {want} bytes, got {}",
            image.width,
            image.height,
            image.pixels.len()
        )));
    }
    Ok(())
}

fn encode(
    out: &mut dyn Write,
    image: &Rgb8Image,
    metadata: Option<&ImageMetadata>,
) -> std::result::Result<(), png::EncodingError> {
    let mut encoder = png::Encoder::new(out, image.width, image.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    // Fast (fdeflate) keeps a 6K image's encode well under a second.
    encoder.set_compression(png::Compression::Fast);
    if let Some(meta) = metadata {
        encoder.add_text_chunk(SOFTWARE_KEY.into(), meta.version.clone())?;
        let parameters = meta.a1111_parameters();
        if parameters.chars().all(|c| u32::from(c) <= 0xFF) {
            encoder.add_text_chunk(PARAMETERS_KEY.into(), parameters)?;
        } else {
            encoder.add_itxt_chunk(PARAMETERS_KEY.into(), parameters)?;
        }
        let json = serde_json::to_string(meta).expect("metadata serializes");
        encoder.add_itxt_chunk(JSON_KEY.into(), json)?;
    }
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&image.pixels)?;
    writer.finish()
}

/// What a PNG file says about itself: its size and every text chunk, with our JSON parsed.
#[derive(Clone, Debug)]
pub struct PngMetadata {
    pub width: u32,
    pub height: u32,
    /// (keyword, text) of every tEXt, zTXt and iTXt chunk, in that order.
    pub text: Vec<(String, String)>,
    /// The parsed `ultrapixel` chunk, when the file has one.
    pub ultrapixel: Option<ImageMetadata>,
}

impl PngMetadata {
    /// The text of the first chunk with this keyword.
    pub fn get(&self, keyword: &str) -> Option<&str> {
        self.text
            .iter()
            .find(|(k, _)| k == keyword)
            .map(|(_, t)| t.as_str())
    }
}

/// Reads the text chunks of any PNG (ours or another tool's), for `ultrapixel meta`.
pub fn read_metadata(path: &Path) -> Result<PngMetadata> {
    let bad = |e: png::DecodingError| Error::format(path, format!("reading PNG: {e}"));
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = png::Decoder::new(BufReader::new(file))
        .read_info()
        .map_err(bad)?;
    // Text chunks may also follow the image data.
    reader.finish().map_err(bad)?;
    let info = reader.info();
    let mut meta = PngMetadata {
        width: info.width,
        height: info.height,
        text: text_chunks(info, bad)?,
        ultrapixel: None,
    };
    if let Some(json) = meta.get(JSON_KEY) {
        meta.ultrapixel = Some(serde_json::from_str(json).map_err(|e| {
            Error::format(path, format!("the `{JSON_KEY}` metadata is not valid: {e}"))
        })?);
    }
    Ok(meta)
}

/// Decodes an 8-bit RGB PNG (the kind [`write_png`] makes) from memory: its pixels and its
/// text chunks, as a server's or the C API's answer is checked. Other colour types are refused.
pub fn decode_png(bytes: &[u8]) -> Result<(Rgb8Image, Vec<(String, String)>)> {
    let origin = Path::new("<PNG data>");
    let bad = |e: png::DecodingError| Error::format(origin, format!("reading PNG: {e}"));
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .map_err(bad)?;
    let mut pixels = vec![0; reader.output_buffer_size().unwrap_or(0)];
    let frame = reader.next_frame(&mut pixels).map_err(bad)?;
    if (frame.color_type, frame.bit_depth) != (png::ColorType::Rgb, png::BitDepth::Eight) {
        return Err(Error::format(
            origin,
            format!(
                "a {:?} {:?}-bit PNG, not the 8-bit RGB this reads",
                frame.color_type, frame.bit_depth as u8
            ),
        ));
    }
    pixels.truncate(frame.buffer_size());
    reader.finish().map_err(bad)?;
    let text = text_chunks(reader.info(), bad)?;
    let image = Rgb8Image {
        width: frame.width,
        height: frame.height,
        pixels,
    };
    Ok((image, text))
}

/// (keyword, text) of every tEXt, zTXt and iTXt chunk, in that order.
fn text_chunks(
    info: &png::Info,
    bad: impl Fn(png::DecodingError) -> Error,
) -> Result<Vec<(String, String)>> {
    let mut text: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    for chunk in &info.compressed_latin1_text {
        text.push((chunk.keyword.clone(), chunk.get_text().map_err(&bad)?));
    }
    for chunk in &info.utf8_text {
        text.push((chunk.keyword.clone(), chunk.get_text().map_err(&bad)?));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(w: u32, h: u32) -> Rgb8Image {
        let pixels = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
        Rgb8Image {
            width: w,
            height: h,
            pixels,
        }
    }

    #[test]
    fn metadata_round_trips_and_a1111_text_lists_the_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let mut req = Request::new("ein Hund im Garten, 写真");
        req.negative_prompt = "blurry".into();
        req.size = Size::new(640, 512).unwrap();
        let models = BTreeMap::from([(STAGE_C_FILE.to_string(), "ab".repeat(32))]);
        let mut meta = ImageMetadata::new(&req, 99, models);
        meta.loras.push(LoraUse {
            file: "lora_cat.safetensors".into(),
            scale: 0.75,
        });
        write_png(&path, &image(7, 5), Some(&meta)).unwrap();
        let read = read_metadata(&path).unwrap();
        assert_eq!((read.width, read.height), (7, 5));
        assert_eq!(read.ultrapixel.as_ref(), Some(&meta));
        let text = read.get(PARAMETERS_KEY).unwrap();
        assert!(
            text.starts_with("ein Hund im Garten, 写真\nNegative prompt: blurry\n"),
            "{text}"
        );
        for want in [
            "Steps: 20",
            "Seed: 99",
            "Size: 640x512",
            "Model hash: abababab",
            "LoRA: lora_cat.safetensors:0.75",
            "Stage B steps: 10",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
        // The pixels are the ones written, and decoding sees the same text.
        let (pixels, text) = decode_png(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(pixels, image(7, 5));
        assert_eq!(text, read.text);
    }

    #[test]
    fn no_metadata_means_no_text_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.png");
        write_png(&path, &image(3, 3), None).unwrap();
        let read = read_metadata(&path).unwrap();
        assert!(read.text.is_empty() && read.ultrapixel.is_none());
    }

    #[test]
    fn decoding_refuses_what_is_not_an_8_bit_rgb_png() {
        let mut rgba = Vec::new();
        let mut enc = png::Encoder::new(&mut rgba, 2, 3);
        enc.set_color(png::ColorType::Rgba);
        enc.write_header()
            .unwrap()
            .write_image_data(&[9; 24])
            .unwrap();
        let err = decode_png(&rgba).unwrap_err().to_string();
        assert!(err.contains("Rgba") && err.contains("8-bit RGB"), "{err}");
        let err = decode_png(b"\x89PNG not really").unwrap_err().to_string();
        assert!(err.contains("reading PNG"), "{err}");
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keep.png");
        std::fs::write(&path, b"old").unwrap();
        let bad = Rgb8Image {
            width: 4,
            height: 4,
            pixels: vec![0; 5],
        };
        assert!(write_png(&path, &bad, None).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn quantization_clamps_and_truncates_like_the_reference() {
        let data = [0.0, 1.0, 0.999, 0.5, -3.0, 7.0, f32::NAN, 0.00392, 0.0040];
        let img = Rgb8Image::from_hwc(&data, 1, 3).unwrap();
        assert_eq!(img.pixels, [0, 255, 254, 127, 0, 255, 0, 0, 1]);
        assert!(Rgb8Image::from_hwc(&data, 2, 3).is_err());
    }
}
