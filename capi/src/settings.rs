//! The C structs that carry options in (`UpxLoadOptions`, `UpxSettings`), their defaults, and
//! their translation into the library's `PipelineOptions` and `Request` (whose validation
//! gives the messages).

use crate::guard::{null_arg, str_arg};
use std::ffi::c_char;
use upx::pipeline::request::{OutputPattern, Request, Size, StageSettings};
use upx::{Error, PipelineOptions, Result};

/// Output flag: the image carries the 8-bit RGB pixels.
pub const UPX_OUTPUT_RGB: u32 = 1;
/// Output flag: the image carries the PNG file's bytes.
pub const UPX_OUTPUT_PNG: u32 = 2;

/// How a pipeline runs. Fill it with `upx_load_options_init` first, then change fields.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UpxLoadOptions {
    /// `sizeof(UpxLoadOptions)` as the caller was compiled with (`upx_load_options_init`
    /// sets it): later versions only append fields, and know an older caller by its size.
    pub struct_size: u32,
    /// Free each stage's weights after it ran (less GPU memory, slower).
    pub low_vram: bool,
    /// Check every step's latent for NaN/Inf (each stage's result is always checked).
    pub check_every_step: bool,
    /// Plan as if the GPU had this many MiB free; 0: ask the device.
    pub memory_limit_mib: u64,
}

/// One generation: the prompt is an argument of `upx_generate`, everything else is here.
/// Fill it with `upx_settings_init` (the CLI's defaults), then change fields. Field names
/// are the ones the error messages use (`stage_c.steps`, ...).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UpxSettings {
    /// `sizeof(UpxSettings)` as the caller was compiled with (`upx_settings_init` sets it):
    /// later versions only append fields, and know an older caller by its size.
    pub struct_size: u32,
    /// Pixels: multiples of 8 from 512 to 6144, any aspect (default 2048x2048).
    pub width: u32,
    pub height: u32,
    /// Stage C's steps (each of its two passes) and guidance scale.
    pub stage_c: UpxStageSettings,
    pub stage_b: UpxStageSettings,
    /// `UPX_OUTPUT_RGB` and/or `UPX_OUTPUT_PNG` (default: PNG).
    pub outputs: u32,
    /// With `UPX_OUTPUT_PNG`: the generation settings as PNG text chunks, as the CLI
    /// writes them (default true).
    pub png_metadata: bool,
    /// Use `seed` (default false: a random seed, reported in the image).
    pub use_seed: bool,
    pub seed: u64,
    /// What the image should not show; NULL or "" for nothing (the default).
    pub negative_prompt: *const c_char,
}

/// Steps and classifier-free guidance scale of one sampling stage.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UpxStageSettings {
    pub steps: u32,
    pub cfg: f32,
}

impl From<StageSettings> for UpxStageSettings {
    fn from(s: StageSettings) -> Self {
        UpxStageSettings {
            steps: s.steps,
            cfg: s.cfg,
        }
    }
}

impl From<UpxStageSettings> for StageSettings {
    fn from(s: UpxStageSettings) -> Self {
        StageSettings {
            steps: s.steps,
            cfg: s.cfg,
        }
    }
}

/// A C struct whose first field is its `struct_size` (a `u32`), which must be ours.
pub(crate) trait Versioned: Copy {
    const NAME: &'static str;
}

impl Versioned for UpxLoadOptions {
    const NAME: &'static str = "UpxLoadOptions";
}

impl Versioned for UpxSettings {
    const NAME: &'static str = "UpxSettings";
}

fn check_size<T: Versioned>(size: usize) -> Result<()> {
    let ours = std::mem::size_of::<T>();
    if size == ours {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "{}.struct_size {size}: this library (ultrapixel {}) takes {ours}; fill the struct \
         with its init function and rebuild against the header of the library you link",
        T::NAME,
        env!("CARGO_PKG_VERSION")
    )))
}

/// Writes `value` into the caller's struct after checking the size the caller gave.
///
/// # Safety
/// `out` is NULL or points to `size` writable bytes.
pub(crate) unsafe fn init<T: Versioned>(out: *mut T, size: usize, value: T) -> Result<()> {
    if out.is_null() {
        return Err(null_arg(T::NAME));
    }
    check_size::<T>(size)?;
    out.write(value);
    Ok(())
}

/// The caller's struct (NULL: `default`), once its size is checked.
///
/// # Safety
/// `ptr` is NULL or points to a struct that starts with its `u32` size, and is that long.
pub(crate) unsafe fn read<T: Versioned>(ptr: *const T, default: T) -> Result<T> {
    if ptr.is_null() {
        return Ok(default);
    }
    check_size::<T>(ptr.cast::<u32>().read() as usize)?;
    Ok(ptr.read())
}

impl UpxLoadOptions {
    pub(crate) fn defaults() -> Self {
        let d = PipelineOptions::default();
        UpxLoadOptions {
            struct_size: std::mem::size_of::<Self>() as u32,
            low_vram: d.low_vram,
            check_every_step: d.check_every_step,
            memory_limit_mib: d.memory_limit.map_or(0, |b| b >> 20),
        }
    }

    pub(crate) fn pipeline_options(&self) -> PipelineOptions {
        PipelineOptions {
            low_vram: self.low_vram,
            check_every_step: self.check_every_step,
            memory_limit: (self.memory_limit_mib > 0)
                .then_some(self.memory_limit_mib.saturating_mul(1 << 20)),
            ..PipelineOptions::default()
        }
    }
}

impl UpxSettings {
    pub(crate) fn defaults() -> Self {
        let d = Request::new("");
        UpxSettings {
            struct_size: std::mem::size_of::<Self>() as u32,
            width: d.size.width,
            height: d.size.height,
            stage_c: d.stage_c.into(),
            stage_b: d.stage_b.into(),
            outputs: UPX_OUTPUT_PNG,
            png_metadata: true,
            use_seed: d.seed.is_some(),
            seed: d.seed.unwrap_or(0),
            negative_prompt: std::ptr::null(),
        }
    }

    /// The library's request for `prompt` with these settings, validated (one image: the
    /// output pattern is the default and names no file).
    ///
    /// # Safety
    /// `negative_prompt` is NULL or a NUL-terminated string that outlives the call.
    pub(crate) unsafe fn request(&self, prompt: &str) -> Result<Request> {
        if self.outputs == 0 || self.outputs & !(UPX_OUTPUT_RGB | UPX_OUTPUT_PNG) != 0 {
            return Err(Error::InvalidArgument(format!(
                "outputs {:#x}: must be UPX_OUTPUT_RGB, UPX_OUTPUT_PNG or both",
                self.outputs
            )));
        }
        let negative_prompt = match self.negative_prompt.is_null() {
            true => "",
            false => str_arg(self.negative_prompt, "negative_prompt")?,
        };
        let request = Request {
            prompt: prompt.to_string(),
            negative_prompt: negative_prompt.to_string(),
            size: Size::new(self.width, self.height)?,
            stage_c: self.stage_c.into(),
            stage_b: self.stage_b.into(),
            seed: self.use_seed.then_some(self.seed),
            batch: 1,
            output: OutputPattern::default(),
            control: None,
        };
        request.validate()?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    #[test]
    fn the_defaults_are_the_clis() {
        let s = UpxSettings::defaults();
        let r = unsafe { s.request("a cat") }.unwrap();
        let want = Request::new("a cat");
        assert_eq!(r, want);
        let o = UpxLoadOptions::defaults().pipeline_options();
        let d = PipelineOptions::default();
        assert_eq!(
            (o.low_vram, o.check_every_step, o.memory_limit),
            (d.low_vram, d.check_every_step, d.memory_limit)
        );
    }

    #[test]
    fn every_field_reaches_the_request() {
        let negative = CString::new("blurry").unwrap();
        let s = UpxSettings {
            width: 1024,
            height: 520,
            stage_c: UpxStageSettings { steps: 3, cfg: 2.5 },
            stage_b: UpxStageSettings { steps: 4, cfg: 1.5 },
            use_seed: true,
            seed: 99,
            negative_prompt: negative.as_ptr(),
            ..UpxSettings::defaults()
        };
        let r = unsafe { s.request("a dog") }.unwrap();
        assert_eq!(r.size, Size::new(1024, 520).unwrap());
        assert_eq!((r.stage_c.steps, r.stage_c.cfg), (3, 2.5));
        assert_eq!((r.stage_b.steps, r.stage_b.cfg), (4, 1.5));
        assert_eq!((r.seed, r.negative_prompt.as_str()), (Some(99), "blurry"));
        let o = UpxLoadOptions {
            memory_limit_mib: 3,
            low_vram: true,
            ..UpxLoadOptions::defaults()
        };
        let p = o.pipeline_options();
        assert_eq!((p.memory_limit, p.low_vram), (Some(3 << 20), true));
    }

    #[test]
    fn bad_settings_give_the_librarys_messages() {
        let d = UpxSettings::defaults();
        let cases = [
            (
                UpxSettings { width: 100, ..d },
                Size::new(100, 2048).unwrap_err().to_string(),
            ),
            (
                UpxSettings {
                    stage_c: UpxStageSettings { steps: 0, cfg: 4.0 },
                    ..d
                },
                "stage_c.steps 0: must be from 1 to 1000".to_string(),
            ),
            (
                UpxSettings {
                    stage_b: UpxStageSettings {
                        steps: 10,
                        cfg: f32::INFINITY,
                    },
                    ..d
                },
                "stage_b.cfg inf".to_string(),
            ),
            (
                UpxSettings { outputs: 0, ..d },
                "outputs 0x0: must be".to_string(),
            ),
            (
                UpxSettings { outputs: 4, ..d },
                "outputs 0x4: must be".to_string(),
            ),
        ];
        for (s, want) in cases {
            let err = unsafe { s.request("a cat") }.unwrap_err().to_string();
            assert!(err.starts_with(&want), "{want}: {err}");
        }
        let err = unsafe { d.request("  ") }.unwrap_err().to_string();
        assert_eq!(err, "the prompt is empty");
    }

    #[test]
    fn a_struct_of_another_size_is_refused_and_null_means_defaults() {
        let mut s = UpxSettings::defaults();
        s.struct_size -= 8;
        let err = unsafe { read(&s, UpxSettings::defaults()) }.unwrap_err();
        let ours = std::mem::size_of::<UpxSettings>();
        assert!(
            err.to_string().contains(&format!(
                "UpxSettings.struct_size {}: this library",
                ours - 8
            )),
            "{err}"
        );
        let d = unsafe { read(std::ptr::null(), UpxLoadOptions::defaults()) }.unwrap();
        assert_eq!(
            d.struct_size as usize,
            std::mem::size_of::<UpxLoadOptions>()
        );
        let mut out = std::mem::MaybeUninit::<UpxSettings>::uninit();
        let err = unsafe { init(out.as_mut_ptr(), ours + 1, UpxSettings::defaults()) };
        assert!(err.is_err());
        unsafe { init(out.as_mut_ptr(), ours, UpxSettings::defaults()) }.unwrap();
        assert_eq!(unsafe { out.assume_init() }.width, 2048);
    }
}
