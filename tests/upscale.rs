//! `ultrapixel upscale` and `--control sr` on the tiny model (`make-tiny-model` writes a
//! tiny super-resolution ControlNet and EfficientNet encoder): the output has the requested
//! size, depends on the input image and the seed (and on nothing else), differs from a plain
//! generation, matches the library path, and bad inputs exit 2 before any output.

mod common;

use common::{
    load_on_cpu, ok, png_image, poisoned, quick_generate, quick_request, refused, seed, tiny_model,
};
use std::path::Path;
use std::process::{Command, Output};
use ultrapixel::pipeline::control::{ControlKind, ControlSource};
use ultrapixel::pipeline::{read_metadata, Control};

/// A fresh random image (a smooth gradient plus noise) of a random size at `path`.
fn random_image(path: &Path, seed: u64) {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (w, h) = (rng.random_range(64..200u32), rng.random_range(64..200u32));
    let base: [u8; 3] = rng.random();
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let noise: u8 = rng.random_range(0..64);
        image::Rgb(base.map(|b| b.wrapping_add((x + 2 * y) as u8).wrapping_add(noise)))
    });
    img.save(path).unwrap();
}

/// `ultrapixel upscale` of `input` on the tiny model (cpu, one step per stage) into `out`.
fn upscale(model: &Path, input: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ultrapixel"))
        .arg("upscale")
        .arg(input)
        .args(["--backend", "cpu", "-q", "--steps-c", "1", "--steps-b", "1"])
        .arg("--model-dir")
        .arg(model)
        .arg("-o")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn upscale_has_the_size_asked_depends_on_the_image_and_seed_and_records_its_source() {
    let model = tiny_model(5);
    let work = tempfile::tempdir().unwrap();
    let s = seed();
    let (a, b) = (work.path().join("a.png"), work.path().join("b.png"));
    random_image(&a, s);
    random_image(&b, s + 1);
    let seed_arg = (s % 1000).to_string();
    let run = |input: &Path, name: &str, seed: &str, size: &str| {
        let out = poisoned(work.path(), name);
        let args = ["--seed", seed, "--size", size, "--prompt", "a lake at dawn"];
        ok(&upscale(model.path(), input, &out, &args));
        png_image(&out)
    };
    // Without --prompt, a generic one.
    let tall = poisoned(work.path(), "tall.png");
    ok(&upscale(model.path(), &a, &tall, &["--size", "512x768"]));
    let tall = png_image(&tall);
    assert_eq!((tall.width, tall.height), (512, 768));
    let first = run(&a, "a1.png", &seed_arg, "512x512");
    let again = run(&a, "a2.png", &seed_arg, "512x512");
    assert_eq!(
        first.pixels, again.pixels,
        "the same seed gave another image"
    );
    let other_seed = run(&a, "a3.png", "1001", "512x512");
    assert_ne!(first.pixels, other_seed.pixels, "the seed changed nothing");
    let other_image = run(&b, "b1.png", &seed_arg, "512x512");
    assert_ne!(
        first.pixels, other_image.pixels,
        "the input changed nothing"
    );

    // A plain generation of the same seed and prompt is another image.
    let plain = poisoned(work.path(), "plain.png");
    let args = ["--seed", &seed_arg, "a lake at dawn"];
    ok(&quick_generate(model.path(), &plain, "cpu", &args));
    assert_ne!(png_image(&plain).pixels, first.pixels);

    // `generate --control sr --control-image` is the same request.
    let via_generate = poisoned(work.path(), "generate.png");
    let args = ["--seed", &seed_arg, "--control", "sr", "--control-image"];
    let mut args: Vec<&str> = args.to_vec();
    args.extend([a.to_str().unwrap(), "a lake at dawn"]);
    ok(&quick_generate(model.path(), &via_generate, "cpu", &args));
    assert_eq!(png_image(&via_generate).pixels, first.pixels);

    let meta = read_metadata(&work.path().join("a1.png"))
        .unwrap()
        .ultrapixel
        .unwrap();
    let control = meta.control.expect("control in the metadata");
    assert_eq!(control.kind, ControlKind::SuperResolution);
    assert_eq!(control.source, ControlSource::Image(Some("a.png".into())));
    assert_eq!(control.strength, 1.0, "the official SR strength");
    assert_eq!(meta.stage_c.cfg, 1.0);
    assert_eq!(meta.prompt, "a lake at dawn");
}

#[test]
fn the_library_super_resolution_control_is_what_the_cli_runs() {
    let model = tiny_model(5);
    let work = tempfile::tempdir().unwrap();
    let s = seed();
    let input = work.path().join("in.png");
    random_image(&input, s);
    let pipeline = load_on_cpu(model.path(), Some(ControlKind::SuperResolution)).unwrap();
    let request = quick_request("a lake", 4);
    let control = Control::super_resolution_image_file(&input).unwrap();
    let rgb = ultrapixel::control::image_file::read_rgb(&input).unwrap();
    assert_eq!(control.map, rgb, "the image is kept as read");
    let generate = |control: Control| {
        let mut r = request.clone();
        r.set_control(control);
        pipeline.generate(&r).unwrap().remove(0)
    };
    let from_file = generate(control.clone());
    let from_tensor = generate(Control::super_resolution_image(rgb).unwrap());
    assert_eq!(from_file.rgb.pixels, from_tensor.rgb.pixels);
    let weak = generate(control.clone().with_strength(0.25));
    assert_ne!(
        weak.rgb.pixels, from_file.rgb.pixels,
        "the strength changed nothing"
    );

    let out = poisoned(work.path(), "cli.png");
    let args = ["--seed", "4", "--prompt", "a lake", "--size", "512x512"];
    ok(&upscale(model.path(), &input, &out, &args));
    assert_eq!(png_image(&out).pixels, from_file.rgb.pixels);

    // A pipeline with the Canny ControlNet refuses a super-resolution request.
    let canny = load_on_cpu(model.path(), Some(ControlKind::Canny)).unwrap();
    let mut r = request.clone();
    r.set_control(control);
    let err = canny.generate(&r).unwrap_err().to_string();
    assert!(err.contains("sr control"), "{err}");
}

#[test]
fn bad_upscale_inputs_exit_2_with_the_reason_and_write_nothing() {
    let model = tiny_model(5);
    let work = tempfile::tempdir().unwrap();
    let not_image = work.path().join("notes.png");
    std::fs::write(&not_image, b"some text, not pixels").unwrap();
    let missing = work.path().join("missing.jpg");
    let good = work.path().join("good.png");
    random_image(&good, seed());
    let cases: [(&Path, Vec<&str>, &str); 4] = [
        (&not_image, vec!["--size", "512x512"], "PNG, JPEG or WebP"),
        (&missing, vec!["--size", "512x512"], "missing.jpg"),
        (&good, vec!["--size", "100x100"], "--size"),
        (
            &good,
            vec!["--size", "512x512", "--control-strength", "3"],
            "from 0 to 2",
        ),
    ];
    for (i, (input, extra, reason)) in cases.into_iter().enumerate() {
        let out = work.path().join(format!("out{i}.png"));
        let run = upscale(model.path(), input, &out, &extra);
        refused(&run, &out, reason, &extra);
    }
    // A map is no input for --control sr.
    let out = work.path().join("map.png");
    let args = [
        "--control",
        "sr",
        "--control-map",
        good.to_str().unwrap(),
        "x",
    ];
    let run = quick_generate(model.path(), &out, "cpu", &args);
    refused(&run, &out, "not a map", args);
}
