//! The product end to end on the tiny random model (`make-tiny-model`): `generate` on the
//! emulator and the reference backend, PNG metadata, batches, failures that must leave no
//! partial file, memory refusal, offline mode, bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use ultrapixel::hub::HubOptions;
use ultrapixel::pipeline::png_out::read_metadata;
use ultrapixel::pipeline::{ModelDir, Pipeline, PipelineOptions, Request, Size};
use ultrapixel::runtime::{Backend, BackendKind};

fn open(kind: BackendKind) -> Backend {
    Backend::open(kind).unwrap()
}

/// One tiny model for every test of this file.
fn tiny_model() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = upx(&["make-tiny-model", dir.path().to_str().unwrap()], &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        dir
    })
    .path()
}

fn upx(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ultrapixel"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `generate` on the tiny model with `extra` arguments, writing into `out_dir`.
fn generate(out_dir: &Path, extra: &[&str]) -> Output {
    let pattern = out_dir.join("img-{seed}.png");
    let mut args = vec![
        "generate",
        "--model-dir",
        tiny_model().to_str().unwrap(),
        "--out",
        pattern.to_str().unwrap(),
        "-q",
    ];
    args.extend_from_slice(extra);
    upx(&args, &[])
}

/// Width, height and RGB bytes of a PNG.
fn pixels(path: &Path) -> (u32, u32, Vec<u8>) {
    let image = common::png_image(path);
    (image.width, image.height, image.pixels)
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn library_request(prompt: &str, seed: u64) -> Request {
    let mut r = Request::new(prompt);
    r.size = Size::new(512, 512).unwrap();
    r.seed = Some(seed);
    r
}

#[cfg(feature = "hostsim")]
#[test]
fn the_emulator_makes_a_512_png_with_metadata_and_the_library_makes_it_again_bit_for_bit() {
    let out = tempfile::tempdir().unwrap();
    let o = generate(
        out.path(),
        &[
            "--backend",
            "hostsim",
            "--size",
            "512x512",
            "--seed",
            "42",
            "a lighthouse on a cliff",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let path = out.path().join("img-42.png");
    assert_eq!(
        files_in(out.path()),
        std::slice::from_ref(&path),
        "only the image, no temporaries"
    );
    let (w, h, first) = pixels(&path);
    assert_eq!((w, h), (512, 512));
    let distinct: std::collections::HashSet<u8> = first.iter().copied().collect();
    assert!(distinct.len() > 16, "a real picture, not a constant");
    let meta = read_metadata(&path).unwrap();
    let ours = meta.ultrapixel.clone().expect("our metadata");
    assert_eq!(ours.prompt, "a lighthouse on a cliff");
    assert_eq!(ours.seed, 42);
    assert_eq!((ours.stage_c.steps, ours.stage_b.steps), (20, 10));
    assert!(meta.get("parameters").unwrap().contains("Seed: 42"));

    // The same request through the library: the same pixels.
    let dir = ModelDir::resolve(Some(tiny_model()), &HubOptions::from_env()).unwrap();
    let p = Pipeline::load(&dir, open(BackendKind::Hostsim), PipelineOptions::default()).unwrap();
    let images = p
        .generate(&library_request("a lighthouse on a cliff", 42))
        .unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].rgb.pixels, first, "two runs differ");
}

#[test]
fn batch_image_k_uses_seed_plus_k_and_can_be_made_again_alone() {
    let out = tempfile::tempdir().unwrap();
    let args = [
        "--backend",
        "cpu",
        "--size",
        "512x520",
        "--steps-c",
        "3",
        "--steps-b",
        "2",
    ];
    let mut batch = args.to_vec();
    batch.extend(["--seed", "7", "--batch", "2", "a red boat"]);
    let o = generate(out.path(), &batch);
    assert!(o.status.success(), "{}", stderr(&o));
    let names = files_in(out.path());
    assert_eq!(
        names,
        [out.path().join("img-7.png"), out.path().join("img-8.png")]
    );
    let second = pixels(&names[1]);
    assert_eq!((second.0, second.1), (512, 520));
    assert_ne!(
        pixels(&names[0]).2,
        second.2,
        "different seeds, different images"
    );

    let alone = tempfile::tempdir().unwrap();
    let mut one = args.to_vec();
    one.extend(["--seed", "8", "a red boat"]);
    let o = generate(alone.path(), &one);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(pixels(&alone.path().join("img-8.png")), second);
    assert_eq!(
        read_metadata(&names[1]).unwrap().ultrapixel.unwrap().seed,
        8
    );
}

/// A copy of the tiny model whose Stage A output conv is NaN.
fn broken_model() -> tempfile::TempDir {
    common::broken_copy(tiny_model())
}

#[test]
fn a_failing_stage_names_itself_and_leaves_the_existing_file_untouched() {
    let model = broken_model();
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("x.png");
    std::fs::write(&target, b"an older image").unwrap();
    let o = common::quick_generate(model.path(), &target, "cpu", &["a test"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("stage A produced") && err.contains("NaN/Inf"),
        "{err}"
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"an older image");
    assert_eq!(files_in(out.path()), [target]);
}

#[test]
fn too_little_gpu_memory_is_refused_before_any_work_with_both_numbers() {
    let out = tempfile::tempdir().unwrap();
    let o = generate(
        out.path(),
        &[
            "--backend",
            "cpu",
            "--memory-limit",
            "1",
            "--size",
            "4096x4096",
            "a test",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("not enough GPU memory"), "{err}");
    assert!(err.contains("MiB needed, 1 MiB free"), "{err}");
    assert!(err.contains("smaller size"), "{err}");
    assert!(files_in(out.path()).is_empty());
}

#[test]
fn offline_mode_names_the_missing_files_and_the_command_that_fetches_them() {
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = upx(
        &[
            "generate",
            "--backend",
            "cpu",
            "--out",
            out.path().join("x.png").to_str().unwrap(),
            "a test",
        ],
        &[
            ("HF_HUB_CACHE", cache.path().to_str().unwrap()),
            ("HF_HUB_OFFLINE", "1"),
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("stage_c_bf16.safetensors"), "{err}");
    assert!(err.contains("ultrapixel download"), "{err}");
}

#[test]
fn bad_requests_are_refused_before_loading_anything() {
    let out = tempfile::tempdir().unwrap();
    for (args, want) in [
        (vec!["--size", "1001x1000", "x"], "nearest valid: 1000x1000"),
        (vec!["--size", "300x300", "x"], "nearest valid: 512x512"),
        (vec!["--steps-c", "0", "x"], "--steps-c 0"),
        (vec!["--batch", "2", "--out", "same.png", "x"], "same name"),
        (vec![""], "the prompt is empty"),
    ] {
        let mut a = vec!["generate", "--model-dir", "/nonexistent"];
        let pattern = out.path().join("y-{seed}.png");
        if !args.contains(&"--out") {
            a.extend(["--out", pattern.to_str().unwrap()]);
        }
        a.extend(args.iter().copied());
        let o = upx(&a, &[]);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
    let model = tiny_model().to_str().unwrap();
    let o = upx(
        &[
            "generate",
            "--model-dir",
            model,
            "--out",
            "/nonexistent-dir/x.png",
            "x",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("output directory /nonexistent-dir"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn without_a_gpu_the_cuda_backend_says_which_backends_work() {
    if ultrapixel::runtime::Backend::open(BackendKind::Cuda).is_ok() {
        eprintln!("skipped: a GPU is present");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let o = generate(out.path(), &["a test"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("--backend hostsim") && err.contains("--backend cpu"),
        "{err}"
    );
}

#[test]
fn an_overlong_prompt_warns_with_the_dropped_words_and_json_reports_the_run() {
    let out = tempfile::tempdir().unwrap();
    let words: Vec<String> = (0..120).map(|i| format!("word{i}")).collect();
    let prompt = words.join(" ");
    let pattern = out.path().join("j-{seed}.png");
    let o = common::quick_generate(
        tiny_model(),
        &pattern,
        "cpu",
        &["--seed", "3", "--json", &prompt],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("longer than CLIP's 75 tokens") && err.contains("word119"),
        "{err}"
    );
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["completed"], true);
    assert_eq!(json["images"][0]["seed"], 3);
    let secs = &json["images"][0]["seconds"];
    for stage in ["text encoder", "stage C", "stage B", "stage A"] {
        assert!(secs[stage].as_f64().is_some(), "{stage}: {json}");
    }
    assert!(
        json["memory_plan"]["sequential_peak_bytes"]
            .as_u64()
            .unwrap()
            > 0
    );
    // `meta` prints the settings back.
    let o = upx(&["meta", out.path().join("j-3.png").to_str().unwrap()], &[]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("word0 word1") && text.contains("\"seed\": 3"),
        "{text}"
    );
}

#[test]
fn one_pipeline_serves_several_threads_one_generation_at_a_time() {
    let dir = ModelDir::resolve(Some(tiny_model()), &HubOptions::from_env()).unwrap();
    let p = Pipeline::load(&dir, open(BackendKind::Cpu), PipelineOptions::default()).unwrap();
    let request = |seed| {
        let mut r = library_request("two threads", seed);
        r.stage_c.steps = 2;
        r.stage_b.steps = 1;
        r
    };
    let (a, b) = std::thread::scope(|s| {
        let ta = s.spawn(|| p.generate(&request(1)).unwrap());
        let tb = s.spawn(|| p.generate(&request(2)).unwrap());
        (ta.join().unwrap(), tb.join().unwrap())
    });
    assert_eq!(a[0].seed, 1);
    assert_eq!(b[0].seed, 2);
    // The same as one after the other on this thread.
    assert_eq!(p.generate(&request(1)).unwrap()[0].rgb, a[0].rgb);
    assert_eq!(p.generate(&request(2)).unwrap()[0].rgb, b[0].rgb);
}

#[test]
fn past_twenty_stage_c_steps_the_high_res_pass_continues_unguided_as_one_phase() {
    use ultrapixel::pipeline::stages::{Phase, Progress};
    use ultrapixel::pipeline::Event;
    let dir = ModelDir::resolve(Some(tiny_model()), &HubOptions::from_env()).unwrap();
    let p = Pipeline::load(&dir, open(BackendKind::Cpu), PipelineOptions::default()).unwrap();
    let mut r = library_request("a long schedule", 4);
    r.stage_c.steps = 22;
    r.stage_b.steps = 1;
    let (mut started, mut steps) = (0, Vec::new());
    let images = p
        .generate_with(&r, &mut |e| {
            if let Event::Progress { progress, .. } = e {
                match progress {
                    Progress::Started {
                        phase: Phase::StageCHighRes,
                        steps: n,
                    } => {
                        started += 1;
                        assert_eq!(*n, 22);
                    }
                    Progress::Step(s) if s.phase == Phase::StageCHighRes => steps.push(s.step),
                    _ => {}
                }
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(started, 1);
    assert_eq!(steps, (0..22).collect::<Vec<_>>());
}

/// Previews: every n-th Stage C step and each pass's last, for every image of a batch, at 8×
/// the pass's latent, not all alike; the images are the ones made without previews, bit for
/// bit.
#[test]
fn previews_come_every_n_steps_of_both_stage_c_passes_and_change_nothing() {
    use ultrapixel::pipeline::plan::LatentSizes;
    use ultrapixel::pipeline::stages::Phase;
    use ultrapixel::pipeline::Event;
    let dir = ModelDir::resolve(Some(tiny_model()), &HubOptions::from_env()).unwrap();
    let mut r = library_request("a preview", 9);
    r.size = Size::new(512, 640).unwrap();
    r.stage_c.steps = 5;
    r.stage_b.steps = 2;
    r.batch = 2;
    let plain = Pipeline::load(&dir, open(BackendKind::Cpu), PipelineOptions::default())
        .unwrap()
        .generate(&r)
        .unwrap();
    let options = PipelineOptions {
        preview_every: Some(2),
        ..PipelineOptions::default()
    };
    let p = Pipeline::load(&dir, open(BackendKind::Cpu), options).unwrap();
    let mut seen = Vec::new();
    let images = p
        .generate_with(&r, &mut |e| {
            if let Event::Preview { image, preview } = e {
                assert_eq!(preview.steps, 5);
                seen.push((image, preview.phase, preview.step, preview.rgb.clone()));
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(images.len(), 2);
    for (a, b) in images.iter().zip(&plain) {
        assert_eq!(a.rgb.pixels, b.rgb.pixels, "previews changed the image");
    }
    use Phase::{StageCHighRes as Hr, StageCLowRes as Lr};
    let one = [(Lr, 1), (Lr, 3), (Lr, 4), (Hr, 1), (Hr, 3), (Hr, 4)];
    let want: Vec<(usize, Phase, usize)> = (0..2)
        .flat_map(|i| one.iter().map(move |&(p, s)| (i, p, s)))
        .collect();
    let steps: Vec<(usize, Phase, usize)> = seen.iter().map(|(i, p, s, _)| (*i, *p, *s)).collect();
    assert_eq!(steps, want);
    let sizes = LatentSizes::of(r.size);
    for (_, phase, _, rgb) in &seen {
        let (h, w) = if *phase == Lr {
            sizes.stage_c_lr
        } else {
            sizes.stage_c
        };
        assert_eq!((rgb.height, rgb.width), (8 * h as u32, 8 * w as u32));
    }
    assert_ne!(
        seen[0].3.pixels, seen[2].3.pixels,
        "previews of different steps differ"
    );
    assert_ne!(
        seen[0].3.pixels, seen[6].3.pixels,
        "images of different seeds differ"
    );
    // Previews count in the memory plan: Stage C needs more with them.
    let c = |p: &Pipeline| p.plan(r.size).unwrap().stages[1].clone();
    let without = Pipeline::load(&dir, open(BackendKind::Cpu), PipelineOptions::default()).unwrap();
    assert_eq!(c(&p).stage, ultrapixel::pipeline::stages::StageId::StageC);
    assert!(c(&p).arena_bytes > c(&without).arena_bytes);
    assert!(c(&p).weight_bytes > c(&without).weight_bytes);
}

/// `--preview DIR` writes one PNG per preview there (created if needed), the image as usual.
#[test]
fn generate_with_preview_writes_the_previews_into_their_directory() {
    let out = tempfile::tempdir().unwrap();
    let previews = out.path().join("previews/run");
    let o = generate(
        out.path(),
        &[
            "--backend",
            "cpu",
            "--size",
            "512x512",
            "--seed",
            "5",
            "--steps-c",
            "3",
            "--steps-b",
            "1",
            "--preview",
            previews.to_str().unwrap(),
            "--preview-every",
            "2",
            "--json",
            "a preview",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.path().join("img-5.png").is_file());
    let names: Vec<String> = files_in(&previews)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "5-c-highres-02.png",
            "5-c-highres-03.png",
            "5-c-lowres-02.png",
            "5-c-lowres-03.png"
        ]
    );
    let (w, h, _) = pixels(&previews.join("5-c-lowres-02.png"));
    assert!(w >= 8 && h >= 8 && w % 8 == 0 && h % 8 == 0, "{w}x{h}");
    // --json lists them.
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let listed: Vec<String> = json["previews"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed.len(), 4);
    assert!(listed.iter().all(|p| Path::new(p).is_file()), "{listed:?}");
    assert_eq!(json["previews"][0]["pass"], "lowres");
    assert_eq!(json["previews"][0]["step"], 2);
}

/// Without previewer weights `--preview` is refused before any work, naming the file and the
/// command that fetches it; `--preview-every` needs `--preview`.
#[test]
fn preview_without_previewer_weights_is_refused_with_the_fix() {
    let model = tempfile::tempdir().unwrap();
    common::copy_dir(tiny_model(), model.path());
    std::fs::remove_file(model.path().join("previewer.safetensors")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let pattern = out.path().join("img.png");
    let previews = out.path().join("previews");
    let preview = ["--preview", previews.to_str().unwrap(), "x"];
    let o = common::quick_generate(model.path(), &pattern, "cpu", &preview);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("previewer.safetensors") && err.contains("ultrapixel download"),
        "{err}"
    );
    assert!(!err.contains("  "), "one message, evenly spaced: {err}");
    assert!(!pattern.exists());
    // The rest of the model still generates without previews.
    let o = common::quick_generate(model.path(), &pattern, "cpu", &["x"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = upx(&["generate", "--preview-every", "2", "x"], &[]);
    assert_eq!(o.status.code(), Some(2));
}

/// A pipeline keeps its step sessions for the next request of the same size (placed once:
/// arenas, launch lists, captured graphs) and still makes exactly the image a fresh pipeline
/// makes for another prompt and seed; another size replaces them; where memory holds the
/// resident weights but not every session, none is kept.
#[cfg(feature = "hostsim")]
#[test]
fn kept_sessions_serve_later_requests_of_one_size_with_unchanged_images() {
    let dir = ModelDir::resolve(Some(tiny_model()), &HubOptions::from_env()).unwrap();
    let load = |options| Pipeline::load(&dir, open(BackendKind::Hostsim), options).unwrap();
    let request = |prompt: &str, seed, (w, h)| {
        let mut r = library_request(prompt, seed);
        r.size = Size::new(w, h).unwrap();
        r.stage_c.steps = 2;
        r.stage_b.steps = 1;
        r
    };
    let first = request("a red barn", 1, (512, 512));
    let second = request("a blue sea at night", 2, (512, 512));
    let other_size = request("a red barn", 1, (512, 576));

    let p = load(PipelineOptions::default());
    p.generate(&first).unwrap();
    let (hits, placed) = p.kept_session_counts();
    assert!(hits == 0 && placed > 0, "{hits} {placed}");
    let reused = p.generate(&second).unwrap();
    assert_eq!(
        p.kept_session_counts(),
        (placed, placed),
        "all reused, none placed"
    );
    let fresh = load(PipelineOptions::default()).generate(&second).unwrap();
    assert_eq!(
        reused[0].rgb, fresh[0].rgb,
        "a reused session changed the image"
    );
    p.generate(&other_size).unwrap();
    let (hits2, placed2) = p.kept_session_counts();
    assert!(hits2 == placed && placed2 > placed, "{hits2} {placed2}");

    // Room for the resident weights but not for every session: nothing is kept.
    let plan = p.plan(first.size).unwrap();
    assert!(plan.resident_peak() < plan.reuse_peak());
    let tight = load(PipelineOptions {
        memory_limit: Some(plan.resident_peak()),
        ..PipelineOptions::default()
    });
    assert_eq!(tight.generate(&second).unwrap()[0].rgb, fresh[0].rgb);
    assert_eq!(tight.kept_session_counts(), (0, 0));
}
