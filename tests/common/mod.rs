//! Helpers shared by the integration tests.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};
use ultrapixel::hub::HubOptions;
use ultrapixel::pipeline::control::ControlKind;
use ultrapixel::pipeline::{
    decode_png, ModelDir, Pipeline, PipelineOptions, Request, Rgb8Image, Size,
};
use ultrapixel::runtime::{Backend, BackendKind};

/// A stored tensor: name, dtype, shape, little-endian bytes.
pub type Stored = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// Copies the safetensors file `src` to `dst` (which may be the same path) after `edit`
/// changed its tensors or metadata.
pub fn rewrite_safetensors(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut Vec<Stored>, &mut HashMap<String, String>),
) {
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = meta.metadata().clone().unwrap_or_default();
    let mut tensors: Vec<Stored> = st
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                v.dtype(),
                v.shape().to_vec(),
                v.data().to_vec(),
            )
        })
        .collect();
    edit(&mut tensors, &mut meta);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, t, s, d)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(*t, s.clone(), d).unwrap(),
            )
        })
        .collect();
    let meta = (!meta.is_empty()).then_some(meta);
    safetensors::serialize_to_file(views, meta, dst).unwrap();
}

/// A copy of the model in `model` whose Stage A output conv is NaN: every generation fails
/// in Stage A. (Each test file compiles this module; not all of them use every helper.)
#[allow(dead_code)]
pub fn broken_copy(model: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(model, dir.path());
    let path = dir.path().join("stage_a.safetensors");
    rewrite_safetensors(&path, &path, |tensors, _| {
        let t = tensors
            .iter_mut()
            .find(|t| t.0 == "out_block.0.bias")
            .unwrap();
        t.3[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    dir
}

/// A fresh tiny model (`make_tiny_model` with `seed`) in a temporary directory.
#[allow(dead_code)]
pub fn tiny_model(seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    ultrapixel::pipeline::tiny::make_tiny_model(dir.path(), seed).unwrap();
    dir
}

/// The model in `model` loaded on the CPU backend, its conversion cache inside it, with the
/// ControlNet `control` (None: without one).
#[allow(dead_code)]
pub fn load_on_cpu(model: &Path, control: Option<ControlKind>) -> ultrapixel::Result<Pipeline> {
    let md = ModelDir::resolve(Some(model), &HubOptions::from_env())?;
    let options = PipelineOptions {
        conversion_cache: model.join("cache"),
        control,
        ..PipelineOptions::default()
    };
    Pipeline::load(&md, Backend::open(BackendKind::Cpu)?, options)
}

#[allow(dead_code)]
pub fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dst).unwrap();
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// `ultrapixel generate` of `model` on `backend` into `out`, quiet, at 512×512 with one step
/// per stage; `extra` adds options and ends with the prompt.
#[allow(dead_code)]
pub fn quick_generate(model: &Path, out: &Path, backend: &str, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ultrapixel"))
        .args(["generate", "--backend", backend, "-q", "--model-dir"])
        .arg(model)
        .args([
            "--size",
            "512x512",
            "--steps-c",
            "1",
            "--steps-b",
            "1",
            "--out",
        ])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// The library request that [`quick_generate`]'s settings make: 512×512, one step per stage.
#[allow(dead_code)]
pub fn quick_request(prompt: &str, seed: u64) -> Request {
    let mut request = Request::new(prompt);
    request.size = Size::new(512, 512).unwrap();
    (request.stage_c.steps, request.stage_b.steps, request.seed) = (1, 1, Some(seed));
    request
}

/// The pixels of a PNG that `generate` wrote.
#[allow(dead_code)]
pub fn png_image(path: &Path) -> Rgb8Image {
    decode_png(&std::fs::read(path).unwrap()).unwrap().0
}

/// What `poisoned` writes: a file still holding it was not written by the run.
#[allow(dead_code)]
pub const POISON: &[u8] = b"poison: not written by this run";

/// An output path holding [`POISON`], so that only a file the run wrote can pass.
#[allow(dead_code)]
pub fn poisoned(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, POISON).unwrap();
    path
}

/// Asserts that a run was refused with exit code 2 and `reason` in its stderr, and that it
/// wrote no `out`; `what` (the arguments) names the run in a failure.
#[allow(dead_code)]
pub fn refused(run: &Output, out: &Path, reason: &str, what: impl std::fmt::Debug) {
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{what:?}: {stderr}");
    assert!(stderr.contains(reason), "{what:?}: {stderr}");
    assert!(!out.exists(), "{what:?} wrote {}", out.display());
}

/// Asserts that a command succeeded, showing its stderr otherwise.
#[allow(dead_code)]
pub fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh random seed, printed so a failure can be rerun.
#[allow(dead_code)]
pub fn seed() -> u64 {
    let s = rand::random::<u64>() >> 12;
    eprintln!("random seed {s}");
    s
}
