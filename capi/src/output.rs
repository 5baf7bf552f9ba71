//! What `upx_generate` hands out: [`UpxImage`] and its buffers, from the C allocator so that
//! a caller may keep one and release it with `upx_free` alone.

use crate::settings::{UPX_OUTPUT_PNG, UPX_OUTPUT_RGB};
use std::ffi::c_void;
use upx::pipeline::png_out::png_bytes;
use upx::{Error, Image, Result};

extern "C" {
    fn malloc(size: usize) -> *mut c_void;
    fn free(ptr: *mut c_void);
}

/// A generated image. Its buffers belong to it: `upx_image_free` releases them with it. To
/// keep one longer, take it (copy the pointer and set the field to NULL) and release it
/// later with `upx_free`.
#[repr(C)]
#[derive(Debug)]
pub struct UpxImage {
    pub width: u32,
    pub height: u32,
    /// The seed that made it (the one asked for, or the one drawn): with the same settings,
    /// it makes the same image again.
    pub seed: u64,
    /// `width * height * 3` bytes, rows top to bottom, pixels R, G, B; NULL unless
    /// `UPX_OUTPUT_RGB` was asked for.
    pub rgb: *mut u8,
    pub rgb_len: usize,
    /// A complete PNG file, byte for byte what `ultrapixel generate` writes for the same
    /// settings; NULL unless `UPX_OUTPUT_PNG` was asked for.
    pub png: *mut u8,
    pub png_len: usize,
}

impl UpxImage {
    /// The C image of `image` with the buffers `outputs` asks for.
    pub(crate) fn new(image: &Image, outputs: u32, png_metadata: bool) -> Result<Box<UpxImage>> {
        let mut out = Box::new(UpxImage {
            width: image.rgb.width,
            height: image.rgb.height,
            seed: image.seed,
            rgb: std::ptr::null_mut(),
            rgb_len: 0,
            png: std::ptr::null_mut(),
            png_len: 0,
        });
        // Filled one by one: on an error, dropping `out` frees what was copied.
        if outputs & UPX_OUTPUT_RGB != 0 {
            out.rgb = c_copy(&image.rgb.pixels)?;
            out.rgb_len = image.rgb.pixels.len();
        }
        if outputs & UPX_OUTPUT_PNG != 0 {
            let png = png_bytes(&image.rgb, png_metadata.then_some(&image.metadata))?;
            out.png = c_copy(&png)?;
            out.png_len = png.len();
        }
        Ok(out)
    }
}

impl Drop for UpxImage {
    fn drop(&mut self) {
        // SAFETY: both come from `c_copy` (malloc) or are NULL, and the image owns them.
        unsafe {
            free(self.rgb.cast());
            free(self.png.cast());
        }
    }
}

/// `bytes` in a buffer from malloc.
fn c_copy(bytes: &[u8]) -> Result<*mut u8> {
    // SAFETY: malloc returns NULL or `len` writable bytes (at least one, so never NULL for a
    // successful empty copy).
    unsafe {
        let ptr = malloc(bytes.len().max(1)).cast::<u8>();
        if ptr.is_null() {
            return Err(Error::InvalidArgument(format!(
                "out of host memory: {} bytes for the image",
                bytes.len()
            )));
        }
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, bytes.len());
        Ok(ptr)
    }
}

/// Releases a buffer taken from an [`UpxImage`].
///
/// # Safety
/// `ptr` is NULL or a buffer this library allocated and nothing else frees.
pub(crate) unsafe fn free_buffer(ptr: *mut c_void) {
    free(ptr)
}
