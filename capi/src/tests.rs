//! The entry points called as C calls them, on the tiny random model and the cpu backend.

use super::*;
use std::ffi::{CStr, CString};
use std::sync::{Barrier, OnceLock};
use upx::pipeline::{PipelineOptions, Request, Size};

fn tiny_model() -> &'static CStr {
    static DIR: OnceLock<(tempfile::TempDir, CString)> = OnceLock::new();
    let (_, path) = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        upx::pipeline::tiny::make_tiny_model(dir.path(), 5).unwrap();
        let path = CString::new(dir.path().to_str().unwrap()).unwrap();
        (dir, path)
    });
    path
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(upx_last_error()) }
        .to_str()
        .unwrap()
        .to_string()
}

/// A pipeline on the tiny model and the cpu backend, freed when dropped.
struct Loaded(*mut UpxPipeline);

impl Loaded {
    fn cpu() -> Loaded {
        let p = unsafe { upx_pipeline_load(tiny_model().as_ptr(), c"cpu".as_ptr(), null()) };
        assert!(!p.is_null(), "{}", last_error());
        Loaded(p)
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        unsafe { upx_pipeline_free(self.0) }
    }
}

fn null<T>() -> *const T {
    std::ptr::null()
}

/// Quick settings: 512x520 (an odd aspect), one step per stage, a fixed seed.
fn quick(seed: u64, outputs: u32) -> UpxSettings {
    let mut s = std::mem::MaybeUninit::<UpxSettings>::uninit();
    let status = unsafe { upx_settings_init(s.as_mut_ptr(), size_of::<UpxSettings>()) };
    assert_eq!(status, UpxStatus::Ok);
    UpxSettings {
        width: 512,
        height: 520,
        stage_c: UpxStageSettings { steps: 1, cfg: 4.0 },
        stage_b: UpxStageSettings { steps: 1, cfg: 1.1 },
        use_seed: true,
        seed,
        outputs,
        ..unsafe { s.assume_init() }
    }
}

/// Every progress report, and what to do at one of them.
#[derive(Default)]
struct Recorder<'a> {
    reports: Vec<(UpxStage, u32, u32)>,
    cancel_at: Option<(UpxStage, u32, *const UpxPipeline)>,
    on_report: Option<&'a (dyn Fn(UpxStage, u32) + Sync)>,
}

unsafe extern "C" fn record(user_data: *mut c_void, stage: UpxStage, step: u32, steps: u32) {
    let r = &mut *user_data.cast::<Recorder>();
    r.reports.push((stage, step, steps));
    if let Some(f) = r.on_report {
        f(stage, step);
    }
    if let Some((at, at_step, p)) = r.cancel_at {
        if (at, at_step) == (stage, step) {
            assert_eq!(upx_cancel(p), UpxStatus::Ok);
        }
    }
}

fn generate(
    p: *const UpxPipeline,
    prompt: &CStr,
    settings: &UpxSettings,
    recorder: &mut Recorder,
) -> (UpxStatus, *mut UpxImage) {
    let mut out = std::ptr::dangling_mut::<UpxImage>();
    let user = (recorder as *mut Recorder).cast();
    let status =
        unsafe { upx_generate(p, prompt.as_ptr(), settings, Some(record), user, &mut out) };
    (status, out)
}

/// Width, height, RGB bytes and A1111 `parameters` text of a PNG.
fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>, String) {
    let (image, text) = upx::pipeline::decode_png(bytes).unwrap();
    let params = text
        .into_iter()
        .find(|(k, _)| k == upx::pipeline::png_out::PARAMETERS_KEY)
        .map(|(_, t)| t)
        .unwrap_or_default();
    (image.width, image.height, image.pixels, params)
}

#[test]
fn an_image_comes_as_rgb_and_png_with_progress_and_matches_the_library() {
    let p = Loaded::cpu();
    let mut rec = Recorder::default();
    let settings = quick(11, UPX_OUTPUT_RGB | UPX_OUTPUT_PNG);
    let (status, img) = generate(p.0, c"a red boat", &settings, &mut rec);
    assert_eq!(status, UpxStatus::Ok, "{}", last_error());
    assert_eq!(last_error(), "");
    let img = unsafe { &*img };
    assert_eq!((img.width, img.height, img.seed), (512, 520, 11));
    let rgb = unsafe { std::slice::from_raw_parts(img.rgb, img.rgb_len) };
    let png = unsafe { std::slice::from_raw_parts(img.png, img.png_len) };
    assert_eq!(rgb.len(), 512 * 520 * 3);
    let (w, h, decoded, params) = decode_png(png);
    assert_eq!((w, h), (512, 520));
    assert_eq!(decoded, rgb, "the PNG holds the RGB buffer");
    assert!(
        params.starts_with("a red boat\n") && params.contains("Seed: 11"),
        "{params}"
    );

    // The same request through the Rust library: the same pixels.
    let dir = ModelDir::resolve(
        Some(Path::new(tiny_model().to_str().unwrap())),
        &HubOptions::from_env(),
    )
    .unwrap();
    let lib = Pipeline::load(
        &dir,
        Backend::open(BackendKind::Cpu).unwrap(),
        PipelineOptions::default(),
    )
    .unwrap();
    let mut request = Request::new("a red boat");
    request.size = Size::new(512, 520).unwrap();
    (request.stage_c.steps, request.stage_b.steps, request.seed) = (1, 1, Some(11));
    assert_eq!(lib.generate(&request).unwrap()[0].rgb.pixels, rgb);

    // Each stage in order, from 0 of N to N of N.
    use UpxStage::*;
    let want = [
        (TextEncoder, 0, 0),
        (CLowRes, 0, 1),
        (CLowRes, 1, 1),
        (CHighRes, 0, 1),
        (CHighRes, 1, 1),
        (B, 0, 1),
        (B, 1, 1),
        (A, 0, 0),
    ];
    assert_eq!(rec.reports, want);

    // A buffer taken from the image outlives it.
    let img = img as *const UpxImage as *mut UpxImage;
    let taken = unsafe { std::mem::replace(&mut (*img).png, std::ptr::null_mut()) };
    unsafe { upx_image_free(img) };
    assert_eq!(
        unsafe { std::slice::from_raw_parts(taken, png.len()) }[1..4],
        *b"PNG"
    );
    unsafe { upx_free(taken.cast()) };
}

#[test]
fn only_the_outputs_asked_for_are_made() {
    let p = Loaded::cpu();
    let mut png_only = quick(3, UPX_OUTPUT_PNG);
    png_only.png_metadata = false;
    let (status, img) = generate(p.0, c"a tree", &png_only, &mut Recorder::default());
    assert_eq!(status, UpxStatus::Ok, "{}", last_error());
    let i = unsafe { &*img };
    assert!(i.rgb.is_null() && i.rgb_len == 0 && !i.png.is_null());
    let (_, _, _, params) = decode_png(unsafe { std::slice::from_raw_parts(i.png, i.png_len) });
    assert_eq!(params, "", "no metadata asked for");
    unsafe { upx_image_free(img) };
    let (status, img) = generate(
        p.0,
        c"a tree",
        &quick(3, UPX_OUTPUT_RGB),
        &mut Recorder::default(),
    );
    assert_eq!(status, UpxStatus::Ok, "{}", last_error());
    let i = unsafe { &*img };
    assert!(i.png.is_null() && i.png_len == 0 && i.rgb_len == 512 * 520 * 3);
    unsafe { upx_image_free(img) };
}

#[test]
fn a_cancel_from_the_progress_callback_stops_at_once_and_does_not_leak_into_the_next_call() {
    let p = Loaded::cpu();
    let mut rec = Recorder {
        cancel_at: Some((UpxStage::CLowRes, 1, p.0)),
        ..Recorder::default()
    };
    let (status, img) = generate(p.0, c"a cat", &quick(1, UPX_OUTPUT_PNG), &mut rec);
    assert_eq!(status, UpxStatus::Cancelled);
    assert!(img.is_null(), "no output after a cancel");
    assert_eq!(last_error(), "interrupted");
    assert_eq!(
        rec.reports.last(),
        Some(&(UpxStage::CLowRes, 1, 1)),
        "nothing ran after the cancel"
    );
    let (status, img) = generate(
        p.0,
        c"a cat",
        &quick(1, UPX_OUTPUT_PNG),
        &mut Recorder::default(),
    );
    assert_eq!(status, UpxStatus::Ok, "{}", last_error());
    unsafe { upx_image_free(img) };
}

#[test]
fn a_cancel_from_another_thread_stops_the_running_generation() {
    struct Shared(*const UpxPipeline);
    unsafe impl Sync for Shared {}
    let p = Loaded::cpu();
    let shared = Shared(p.0);
    // The generation waits in Stage B's first report until the other thread has cancelled.
    let (reached, cancelled) = (Barrier::new(2), Barrier::new(2));
    let pause = |stage: UpxStage, step: u32| {
        if (stage, step) == (UpxStage::B, 0) {
            reached.wait();
            cancelled.wait();
        }
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            reached.wait();
            let shared = &shared;
            assert_eq!(unsafe { upx_cancel(shared.0) }, UpxStatus::Ok);
            cancelled.wait();
        });
        let mut rec = Recorder {
            on_report: Some(&pause),
            ..Recorder::default()
        };
        let (status, img) = generate(shared.0, c"a cat", &quick(2, UPX_OUTPUT_PNG), &mut rec);
        assert_eq!(status, UpxStatus::Cancelled, "{}", last_error());
        assert!(img.is_null());
        assert_eq!(rec.reports.last(), Some(&(UpxStage::B, 0, 1)));
    });
}

#[test]
fn a_bad_size_is_refused_with_the_librarys_message_before_any_work() {
    let p = Loaded::cpu();
    let mut rec = Recorder::default();
    let mut s = quick(1, UPX_OUTPUT_PNG);
    s.width = 1020;
    let (status, img) = generate(p.0, c"a cat", &s, &mut rec);
    assert_eq!(status, UpxStatus::InvalidInput);
    assert!(img.is_null());
    assert_eq!(last_error(), Size::new(1020, 520).unwrap_err().to_string());
    assert!(last_error().contains("nearest valid"), "{}", last_error());
    assert!(rec.reports.is_empty(), "nothing ran");
    s.width = 512;
    s.stage_b.steps = 0;
    let (status, _) = generate(p.0, c"a cat", &s, &mut rec);
    assert_eq!(status, UpxStatus::InvalidInput);
    assert_eq!(last_error(), "stage_b.steps 0: must be from 1 to 1000");
}

#[test]
fn a_bad_model_dir_or_backend_gives_null_and_says_why() {
    let missing = tempfile::tempdir().unwrap();
    let dir = CString::new(missing.path().to_str().unwrap()).unwrap();
    let p = unsafe { upx_pipeline_load(dir.as_ptr(), c"cpu".as_ptr(), null()) };
    assert!(p.is_null());
    let msg = last_error();
    assert!(
        msg.contains(missing.path().to_str().unwrap())
            && msg.contains("stage_c_bf16.safetensors")
            && msg.contains("ultrapixel download --model-dir"),
        "{msg}"
    );
    let p = unsafe { upx_pipeline_load(tiny_model().as_ptr(), c"metal".as_ptr(), null()) };
    assert!(p.is_null());
    assert!(
        last_error().contains("backend `metal`: expected cuda"),
        "{}",
        last_error()
    );
    let p = unsafe { upx_pipeline_load(tiny_model().as_ptr(), null(), null()) };
    assert!(p.is_null());
    assert_eq!(last_error(), "backend is NULL");
    let bad = CString::new(vec![b'/', 0xc3, b'(']).unwrap();
    let p = unsafe { upx_pipeline_load(bad.as_ptr(), c"cpu".as_ptr(), null()) };
    assert!(p.is_null());
    assert!(
        last_error().contains("model_dir is not valid UTF-8"),
        "{}",
        last_error()
    );
}

#[test]
fn null_pointers_and_bad_strings_are_errors() {
    let p = Loaded::cpu();
    let s = quick(1, UPX_OUTPUT_PNG);
    let mut out = std::ptr::null_mut();
    let call =
        |p, prompt, out| unsafe { upx_generate(p, prompt, &s, None, std::ptr::null_mut(), out) };
    assert_eq!(
        call(p.0, c"x".as_ptr(), std::ptr::null_mut()),
        UpxStatus::InvalidInput
    );
    assert_eq!(last_error(), "out is NULL");
    assert_eq!(
        call(null(), c"x".as_ptr(), &mut out),
        UpxStatus::InvalidInput
    );
    assert_eq!(last_error(), "pipeline is NULL");
    assert_eq!(call(p.0, null(), &mut out), UpxStatus::InvalidInput);
    assert_eq!(last_error(), "prompt is NULL");
    let bad = CString::new(vec![0xff]).unwrap();
    assert_eq!(call(p.0, bad.as_ptr(), &mut out), UpxStatus::InvalidInput);
    assert!(
        last_error().contains("prompt is not valid UTF-8"),
        "{}",
        last_error()
    );
    let mut neg = s;
    neg.negative_prompt = bad.as_ptr();
    let status = unsafe {
        upx_generate(
            p.0,
            c"x".as_ptr(),
            &neg,
            None,
            std::ptr::null_mut(),
            &mut out,
        )
    };
    assert_eq!(status, UpxStatus::InvalidInput);
    assert!(last_error().contains("negative_prompt is not valid UTF-8"));
    assert!(out.is_null());
    assert_eq!(unsafe { upx_cancel(null()) }, UpxStatus::InvalidInput);
    assert_eq!(
        unsafe { upx_settings_init(std::ptr::null_mut(), size_of::<UpxSettings>()) },
        UpxStatus::InvalidInput
    );
    let mut o = std::mem::MaybeUninit::<UpxLoadOptions>::uninit();
    assert_eq!(
        unsafe { upx_load_options_init(o.as_mut_ptr(), 4) },
        UpxStatus::InvalidInput
    );
    assert!(
        last_error().contains("UpxLoadOptions.struct_size 4"),
        "{}",
        last_error()
    );
    // Releasing NULL does nothing.
    unsafe {
        upx_image_free(std::ptr::null_mut());
        upx_pipeline_free(std::ptr::null_mut());
        upx_free(std::ptr::null_mut());
    }
}

#[test]
fn the_version_is_the_one_images_record() {
    let v = unsafe { CStr::from_ptr(upx_version()) }.to_str().unwrap();
    let meta = upx::ImageMetadata::new(&Request::new("x"), 0, Default::default());
    assert_eq!(meta.version, format!("ultrapixel {v}"));
}
