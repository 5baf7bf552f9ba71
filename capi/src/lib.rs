//! The C ABI of ultrapixel (`libultrapixel.so` / `libultrapixel.a`, header
//! `include/ultrapixel.h`, generated from this crate by cbindgen: see `tests/header.rs`).
//!
//! Every entry point runs through [`guard::run`]: errors become a [`UpxStatus`] plus the
//! thread's `upx_last_error`, panics are caught, NULL pointers and invalid UTF-8 are errors.
//! The ownership rules are in the header's preamble (`cbindgen.toml`).

mod cancel;
mod guard;
mod output;
mod settings;

pub use output::UpxImage;
pub use settings::{UpxLoadOptions, UpxSettings, UpxStageSettings, UPX_OUTPUT_PNG, UPX_OUTPUT_RGB};

use cancel::Cancel;
use guard::{null_arg, run, str_arg};
use std::ffi::{c_char, c_void};
use std::path::Path;
use upx::pipeline::stages::{Phase, Progress};
use upx::{Backend, BackendKind, Error, Event, HubOptions, ModelDir, Pipeline, Result};

/// What a call did: the classes of the CLI's exit codes (0, 1, 2, 130), and a Rust panic's
/// code (101) for a bug caught at the boundary.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpxStatus {
    Ok = 0,
    /// A failure while running (a kernel or CUDA error, NaN/Inf): trying again may succeed.
    Failed = 1,
    /// Bad input or a refusal before any work (an argument, a setting, missing or invalid
    /// model files, too little GPU memory, no usable device): it fails the same way until
    /// something changes.
    InvalidInput = 2,
    /// A bug in ultrapixel, caught before it reached the caller; please report it.
    Internal = 101,
    /// Stopped by `upx_cancel`: no image.
    Cancelled = 130,
}

/// The part of a generation a progress report is about, in the order they run.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpxStage {
    TextEncoder,
    /// Stage C's low-res guidance pass.
    CLowRes,
    /// Stage C's high-res pass.
    CHighRes,
    B,
    A,
}

impl From<Phase> for UpxStage {
    fn from(p: Phase) -> Self {
        match p {
            Phase::Text => UpxStage::TextEncoder,
            Phase::StageCLowRes => UpxStage::CLowRes,
            Phase::StageCHighRes => UpxStage::CHighRes,
            Phase::StageB => UpxStage::B,
            Phase::StageA => UpxStage::A,
        }
    }
}

/// Progress of a generation, on the thread that called `upx_generate`: `step` of `steps`
/// done in `stage` (0 of N when the stage starts; `steps` is 0 for a stage without sampling
/// steps). It may call `upx_cancel`; it must not unwind (no C++ exception may leave it) and
/// must not call `upx_generate` on the same pipeline.
pub type UpxProgressFn =
    Option<unsafe extern "C" fn(user_data: *mut c_void, stage: UpxStage, step: u32, steps: u32)>;

/// A loaded model on a backend (opaque).
pub struct UpxPipeline {
    pipeline: Pipeline,
    cancel: Cancel,
}

// The header promises calls on one pipeline from several threads.
const _: () = {
    const fn shared_across_threads<T: Send + Sync>() {}
    shared_across_threads::<UpxPipeline>()
};

/// The library's version, e.g. "0.1.0" (a static string).
#[no_mangle]
pub extern "C" fn upx_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of this thread's last failed call, or "" when its last call succeeded. The
/// string belongs to the library and stays valid until this thread's next `upx_` call.
#[no_mangle]
pub extern "C" fn upx_last_error() -> *const c_char {
    guard::last_error()
}

/// Fills `options` with the defaults (`struct_size` included); pass `sizeof(UpxLoadOptions)`.
///
/// # Safety
/// `options` is NULL or points to `struct_size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn upx_load_options_init(
    options: *mut UpxLoadOptions,
    struct_size: usize,
) -> UpxStatus {
    status(run(|| {
        settings::init(options, struct_size, UpxLoadOptions::defaults())
    }))
}

/// Fills `settings` with the defaults of `ultrapixel generate` (`struct_size` included);
/// pass `sizeof(UpxSettings)`.
///
/// # Safety
/// `settings` is NULL or points to `struct_size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn upx_settings_init(
    settings: *mut UpxSettings,
    struct_size: usize,
) -> UpxStatus {
    status(run(|| {
        settings::init(settings, struct_size, UpxSettings::defaults())
    }))
}

/// Opens the model files of `model_dir` (NULL: the Hugging Face cache, where
/// `ultrapixel download` puts them; nothing is downloaded here) on `backend` ("cuda",
/// "hostsim" or "cpu"), checking every tensor. `options` NULL: the defaults. Returns the
/// pipeline, or NULL with the reason in `upx_last_error`.
///
/// # Safety
/// The strings are NULL or NUL-terminated; `options` is NULL or filled by
/// `upx_load_options_init`.
#[no_mangle]
pub unsafe extern "C" fn upx_pipeline_load(
    model_dir: *const c_char,
    backend: *const c_char,
    options: *const UpxLoadOptions,
) -> *mut UpxPipeline {
    let loaded = run(|| {
        let dir = match model_dir.is_null() {
            true => None,
            false => Some(Path::new(str_arg(model_dir, "model_dir")?)),
        };
        let kind = backend_kind(str_arg(backend, "backend")?)?;
        let options = settings::read(options, UpxLoadOptions::defaults())?;
        // The device first, as the CLI does: no reading of weights for a device that is absent.
        let backend = Backend::open(kind)?;
        let dir = ModelDir::resolve(dir, &HubOptions::from_env())?;
        let pipeline = Pipeline::load(&dir, backend, options.pipeline_options())?;
        Ok(Box::into_raw(Box::new(UpxPipeline {
            pipeline,
            cancel: Cancel::default(),
        })))
    });
    loaded.unwrap_or(std::ptr::null_mut())
}

fn backend_kind(name: &str) -> Result<BackendKind> {
    match name {
        "cuda" => Ok(BackendKind::Cuda),
        "hostsim" => Ok(BackendKind::Hostsim),
        "cpu" => Ok(BackendKind::Cpu),
        _ => Err(Error::InvalidArgument(format!(
            "backend `{name}`: expected cuda (an NVIDIA GPU), hostsim (our kernels under the \
             CPU emulator) or cpu (the reference code)"
        ))),
    }
}

/// Generates one image of `prompt` with `settings` (NULL: the defaults) and stores it in
/// `*out` (NULL on any error). `progress` (may be NULL) gets `user_data` with every report.
/// Several threads may call it on one pipeline: the generations run one at a time.
///
/// # Safety
/// `pipeline` is NULL or a live pipeline; the strings are NULL or NUL-terminated; `settings`
/// is NULL or filled by `upx_settings_init`; `out` is NULL or writable; `progress` is NULL
/// or a function as `UpxProgressFn` describes.
#[no_mangle]
pub unsafe extern "C" fn upx_generate(
    pipeline: *const UpxPipeline,
    prompt: *const c_char,
    settings: *const UpxSettings,
    progress: UpxProgressFn,
    user_data: *mut c_void,
    out: *mut *mut UpxImage,
) -> UpxStatus {
    status(run(|| {
        if out.is_null() {
            return Err(null_arg("out"));
        }
        out.write(std::ptr::null_mut());
        let p = pipeline.as_ref().ok_or_else(|| null_arg("pipeline"))?;
        let settings = settings::read(settings, UpxSettings::defaults())?;
        let request = settings.request(str_arg(prompt, "prompt")?)?;
        let ticket = p.cancel.ticket();
        let images = p.pipeline.generate_with(&request, &mut |event| {
            if let (Some(report), Event::Progress { progress, .. }) = (progress, &event) {
                let (stage, step, steps) = match progress {
                    Progress::Started { phase, steps } => (*phase, 0, *steps),
                    Progress::Step(e) => (e.phase, e.step + 1, e.steps),
                };
                let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
                report(user_data, stage.into(), count(step), count(steps));
            }
            match p.cancel.is_cancelled(ticket) {
                true => Err(Error::Interrupted),
                false => Ok(()),
            }
        })?;
        let [image] = images.as_slice() else {
            unreachable!("a request of one image made {}", images.len());
        };
        let image = UpxImage::new(image, settings.outputs, settings.png_metadata)?;
        out.write(Box::into_raw(image));
        Ok(())
    }))
}

/// Stops every generation on `pipeline` that has started (or is waiting for its turn) at its
/// next step: those `upx_generate` calls return `UPX_STATUS_CANCELLED`; later calls are not
/// affected. Safe from any thread, the progress callback included.
///
/// # Safety
/// `pipeline` is NULL or a live pipeline.
#[no_mangle]
pub unsafe extern "C" fn upx_cancel(pipeline: *const UpxPipeline) -> UpxStatus {
    status(run(|| {
        let p = pipeline.as_ref().ok_or_else(|| null_arg("pipeline"))?;
        p.cancel.cancel();
        Ok(())
    }))
}

/// Releases an image and its buffers (NULL: nothing).
///
/// # Safety
/// `image` is NULL or from `upx_generate`, released once.
#[no_mangle]
pub unsafe extern "C" fn upx_image_free(image: *mut UpxImage) {
    let _ = run(|| {
        if !image.is_null() {
            drop(Box::from_raw(image));
        }
        Ok(())
    });
}

/// Releases a pipeline and its device memory (NULL: nothing), once no call on it is running.
///
/// # Safety
/// `pipeline` is NULL or from `upx_pipeline_load`, released once, with no call using it.
#[no_mangle]
pub unsafe extern "C" fn upx_pipeline_free(pipeline: *mut UpxPipeline) {
    let _ = run(|| {
        if !pipeline.is_null() {
            drop(Box::from_raw(pipeline));
        }
        Ok(())
    });
}

/// Releases a buffer taken from an `UpxImage` (NULL: nothing).
///
/// # Safety
/// `ptr` is NULL or a buffer taken from an image, released once.
#[no_mangle]
pub unsafe extern "C" fn upx_free(ptr: *mut c_void) {
    output::free_buffer(ptr)
}

fn status(result: Result<(), UpxStatus>) -> UpxStatus {
    result.err().unwrap_or(UpxStatus::Ok)
}

#[cfg(test)]
mod tests;
