//! `generate --control canny` (and `inpaint`) on the tiny model (`make-tiny-model` writes
//! tiny ControlNets): control changes the image, strength 0 makes the control input irrelevant, a
//! ready map is what the image's edges give, bad inputs are refused before any output, and
//! the library path, metadata and memory plan carry the control.

mod common;

use common::{
    load_on_cpu, ok, png_image, poisoned, quick_generate, quick_request, refused, seed, tiny_model,
};
use std::path::Path;
use std::process::Command;
use ultrapixel::pipeline::control::{ControlKind, ControlSource};
use ultrapixel::pipeline::{read_metadata, Control};

/// A fresh random control image (rectangles of random colours, so it has edges) at `path`.
fn random_image(path: &Path, seed: u64) {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (w, h) = (rng.random_range(48..160u32), rng.random_range(48..160u32));
    let mut img = image::RgbImage::from_pixel(w, h, image::Rgb(rng.random()));
    for _ in 0..6 {
        let (x0, y0) = (rng.random_range(0..w), rng.random_range(0..h));
        let (x1, y1) = (rng.random_range(x0..w), rng.random_range(y0..h));
        let colour = image::Rgb(rng.random());
        for y in y0..=y1.min(h - 1) {
            for x in x0..=x1.min(w - 1) {
                img.put_pixel(x, y, colour);
            }
        }
    }
    img.save(path).unwrap();
}

#[test]
fn control_changes_the_image_and_at_strength_0_the_control_image_is_irrelevant() {
    let model = tiny_model(3);
    let work = tempfile::tempdir().unwrap();
    let s = seed();
    let (a, b) = (work.path().join("a.png"), work.path().join("b.png"));
    random_image(&a, s);
    random_image(&b, s + 1);
    let run = |name: &str, extra: &[&str]| {
        let out_path = poisoned(work.path(), name);
        let mut args = vec!["--seed", "9"];
        args.extend(extra);
        args.push("a house by a lake");
        ok(&quick_generate(model.path(), &out_path, "cpu", &args));
        png_image(&out_path).pixels
    };
    let (a_arg, b_arg) = (a.to_str().unwrap(), b.to_str().unwrap());
    let plain = run("plain.png", &[]);
    let with_a = run(
        "with-a.png",
        &["--control", "canny", "--control-image", a_arg],
    );
    let with_b = run(
        "with-b.png",
        &["--control", "canny", "--control-image", b_arg],
    );
    assert_ne!(with_a, plain, "control changed nothing");
    assert_ne!(with_a, with_b, "two control images gave the same image");
    let zero = ["--control-strength", "0"];
    let zero_a = run(
        "a0.png",
        &[
            "--control",
            "canny",
            "--control-image",
            a_arg,
            zero[0],
            zero[1],
        ],
    );
    let zero_b = run(
        "b0.png",
        &[
            "--control",
            "canny",
            "--control-image",
            b_arg,
            zero[0],
            zero[1],
        ],
    );
    assert_eq!(
        zero_a, zero_b,
        "strength 0 still depends on the control image"
    );
    assert_ne!(zero_a, with_a, "the strength changed nothing");

    // The settings are recorded.
    let meta = read_metadata(&work.path().join("with-a.png"))
        .unwrap()
        .ultrapixel
        .unwrap();
    let control = meta.control.expect("control in the metadata");
    assert_eq!(control.kind, ControlKind::Canny);
    assert_eq!(control.strength, 0.7);
    assert_eq!(control.shift, 2.0);
    assert_eq!(control.source, ControlSource::Image(Some("a.png".into())));
    assert_eq!(
        meta.stage_c.cfg, 1.0,
        "the official Stage C CFG with control"
    );
    assert_eq!(meta.prompt, "a house by a lake", "the prompt as given");
    let plain_meta = read_metadata(&work.path().join("plain.png"))
        .unwrap()
        .ultrapixel
        .unwrap();
    assert!(plain_meta.control.is_none());
    assert_eq!(plain_meta.stage_c.cfg, 4.0);
}

#[test]
fn a_ready_map_gives_what_the_image_gives_and_the_library_matches_the_cli() {
    let model = tiny_model(3);
    let work = tempfile::tempdir().unwrap();
    let s = seed();
    let image_path = work.path().join("control.png");
    random_image(&image_path, s);
    let pipeline = load_on_cpu(model.path(), Some(ControlKind::Canny)).unwrap();
    let request = quick_request("a house by a lake", 9);
    let from_image = Control::canny_image_file(&image_path).unwrap();
    let rgb = ultrapixel::control::image_file::read_rgb(&image_path).unwrap();
    let edges = ultrapixel::control::canny_map(&rgb);
    assert_eq!(edges.shape[0], 1);
    assert_eq!(edges.shape[1].min(edges.shape[2]), 768);
    let from_map = Control::canny_map(edges).unwrap();
    assert_eq!(from_map.map, from_image.map);

    let generate = |control: Control| {
        let mut r = request.clone();
        r.set_control(control);
        pipeline.generate(&r).unwrap().remove(0)
    };
    let by_image = generate(from_image.clone());
    let by_map = generate(from_map);
    assert_eq!(by_image.rgb.pixels, by_map.rgb.pixels);
    assert_eq!(
        by_map.metadata.control.unwrap().source,
        ControlSource::Map(None)
    );

    // The CLI's --control-image is the library's Control::canny_image_file.
    let out = poisoned(work.path(), "cli.png");
    let args = [
        "--seed",
        "9",
        "--json",
        "--control",
        "canny",
        "--control-image",
    ];
    let mut args: Vec<&str> = args.to_vec();
    args.extend([image_path.to_str().unwrap(), "a house by a lake"]);
    let run = quick_generate(model.path(), &out, "cpu", &args);
    ok(&run);
    assert_eq!(png_image(&out).pixels, by_image.rgb.pixels);
    let json: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(json["control"]["kind"], "canny", "{json}");
    assert_eq!(json["control"]["source"]["image"], "control.png", "{json}");
    let planned = json["memory_plan"]["stages"].as_array().unwrap();
    assert!(planned.iter().any(|s| s["stage"] == "controlnet"), "{json}");

    // A map file goes through --control-map as through Control::canny_map_file.
    let map_path = work.path().join("map.png");
    random_image(&map_path, s + 7);
    let out = poisoned(work.path(), "cli-map.png");
    let args = ["--seed", "9", "--control", "canny", "--control-map"];
    let mut args: Vec<&str> = args.to_vec();
    args.extend([map_path.to_str().unwrap(), "a house by a lake"]);
    ok(&quick_generate(model.path(), &out, "cpu", &args));
    let by_map_file = generate(Control::canny_map_file(&map_path).unwrap());
    assert_eq!(png_image(&out).pixels, by_map_file.rgb.pixels);
    assert_ne!(by_map_file.rgb.pixels, by_image.rgb.pixels);

    // Past the 20 guided high-resolution steps, the unguided ones inject the maps too (their
    // graph reads them: see the stages unit test); the run completes with control.
    let mut long = request.clone();
    long.stage_c.steps = 21;
    long.set_control(from_image.clone());
    let long_image = pipeline.generate(&long).unwrap().remove(0);
    assert_ne!(long_image.rgb.pixels, by_image.rgb.pixels);

    // A pipeline loaded without the ControlNet refuses a controlled request, saying why.
    let plain = load_on_cpu(model.path(), None).unwrap();
    let mut r = request.clone();
    r.set_control(from_image);
    let err = plain.generate(&r).unwrap_err().to_string();
    assert!(err.contains("PipelineOptions::control"), "{err}");
}

#[test]
fn bad_control_inputs_exit_2_with_the_reason_and_write_nothing() {
    let model = tiny_model(3);
    let work = tempfile::tempdir().unwrap();
    let not_image = work.path().join("notes.png");
    std::fs::write(&not_image, b"just some text").unwrap();
    let missing = work.path().join("missing.jpg");
    let good = work.path().join("good.png");
    random_image(&good, seed());
    let cases: [(Vec<&str>, &str); 5] = [
        (
            vec!["--control-image", not_image.to_str().unwrap()],
            "PNG, JPEG or WebP",
        ),
        (
            vec!["--control-image", missing.to_str().unwrap()],
            "missing.jpg",
        ),
        (
            vec!["--control-map", not_image.to_str().unwrap()],
            "notes.png",
        ),
        (
            vec![
                "--control-image",
                good.to_str().unwrap(),
                "--control-strength",
                "2.5",
            ],
            "--control-strength 2.5: must be a number from 0 to 2",
        ),
        (
            vec![
                "--control-image",
                good.to_str().unwrap(),
                "--control-strength",
                "-1",
            ],
            "from 0 to 2",
        ),
    ];
    for (i, (extra, reason)) in cases.into_iter().enumerate() {
        let out = work.path().join(format!("out{i}.png"));
        let mut args = vec!["--control", "canny"];
        args.extend(extra);
        args.push("a test");
        let run = quick_generate(model.path(), &out, "cpu", &args);
        refused(&run, &out, reason, &args);
    }
    // --control without an input, and an input without --control.
    for args in [
        vec!["--control", "canny", "a test"],
        vec!["--control-image", good.to_str().unwrap(), "a test"],
    ] {
        let out = work.path().join("clap.png");
        let run = quick_generate(model.path(), &out, "cpu", &args);
        assert_eq!(run.status.code(), Some(2), "{args:?}");
        assert!(!out.exists());
    }
}

#[test]
fn info_plans_the_controlnet_weights_and_activations() {
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ultrapixel"))
            .args(["info", "--size", "2048x2048"])
            .args(extra)
            .output()
            .unwrap();
        ok(&out);
        String::from_utf8(out.stdout).unwrap()
    };
    let plain = run(&[]);
    let with = run(&["--control", "canny"]);
    assert!(!plain.contains("controlnet "), "{plain}");
    let row = with
        .lines()
        .find(|l| l.starts_with("controlnet "))
        .unwrap_or_else(|| panic!("no ControlNet row: {with}"));
    let numbers: Vec<u64> = row
        .split_whitespace()
        .skip(1)
        .map(|n| n.parse().unwrap())
        .collect();
    // The released Canny ControlNet: EfficientNetV2-S features and eight projections,
    // ≈ 110 MiB of bf16 weights, and activations at a 768×768 control map.
    assert!((40..400).contains(&numbers[0]), "{row}");
    assert!(numbers[1] > 0, "{row}");
    let stage_c = |text: &str| -> u64 {
        let l = text.lines().find(|l| l.starts_with("stage C")).unwrap();
        l.split_whitespace().nth(3).unwrap().parse().unwrap()
    };
    assert!(
        stage_c(&with) > stage_c(&plain),
        "the maps cost Stage C nothing"
    );
    // The super-resolution ControlNet (≈ 204 M parameters) and its EfficientNet encoder
    // (≈ 20 M), in bf16: ≈ 427 MiB; the ControlNet alone would be ≈ 388.
    let sr = run(&["--control", "sr"]);
    let row = sr
        .lines()
        .find(|l| l.starts_with("controlnet "))
        .unwrap_or_else(|| panic!("no ControlNet row: {sr}"));
    let weights: u64 = row.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!((420..480).contains(&weights), "{row}");
    assert!(
        stage_c(&sr) > stage_c(&plain),
        "the SR maps cost Stage C nothing"
    );
}

/// The released ControlNets are torch state dicts of torchvision's EfficientNetV2-S with
/// BatchNorm: their `num_batches_tracked` counters (int64 scalars) are accepted and ignored,
/// but only beside a norm the ControlNet reads; any other stored key is refused by name.
#[test]
fn batchnorm_counters_are_ignored_and_other_unknown_keys_refused() {
    let model = tiny_model(3);
    let file = model.path().join("controlnet/canny.safetensors");
    let original = std::fs::read(&file).unwrap();
    let counter = |name: &str| {
        let n = rand::random::<u32>() as i64;
        let bytes = n.to_le_bytes().to_vec();
        (name.to_string(), safetensors::Dtype::I64, vec![], bytes)
    };
    let load = || load_on_cpu(model.path(), Some(ControlKind::Canny)).map(|_| ());
    load().expect("the tiny ControlNet as written");
    let norms: Vec<String> = {
        let st = safetensors::SafeTensors::deserialize(&original).unwrap();
        st.names()
            .into_iter()
            .filter_map(|k| k.strip_suffix(".running_mean").map(str::to_string))
            .collect()
    };
    assert!(norms.len() > 10, "{norms:?}");
    common::rewrite_safetensors(&file, &file, |tensors, _| {
        tensors.extend(
            norms
                .iter()
                .map(|n| counter(&format!("{n}.num_batches_tracked"))),
        );
    });
    load().expect("a state dict with BatchNorm counters");
    for extra in [
        "backbone.0.num_batches_tracked",
        "projections.0.1.num_batches_tracked",
        "backbone.0.1.momentum",
    ] {
        std::fs::write(&file, &original).unwrap();
        common::rewrite_safetensors(&file, &file, |tensors, _| tensors.push(counter(extra)));
        let err = load().unwrap_err().to_string();
        assert!(
            err.contains("1 unexpected") && err.contains(extra),
            "{extra}: {err}"
        );
    }
}

/// `--control inpaint`: the image with a masked region, and the mask, through the tiny
/// inpainting ControlNet; the mask matters, the library path is the CLI's, and a missing
/// mask is refused before any output.
#[test]
fn inpainting_control_reads_the_image_and_its_mask() {
    let model = tiny_model(3);
    let work = tempfile::tempdir().unwrap();
    let s = seed();
    let image = work.path().join("photo.png");
    random_image(&image, s);
    let (w, h) = image::image_dimensions(&image).unwrap();
    let mask = |name: &str, left: bool| {
        let path = work.path().join(name);
        let m = image::GrayImage::from_fn(w, h, |x, y| {
            let inside = if left { x < w / 2 } else { y < h / 3 };
            image::Luma([if inside { 255 } else { 0 }])
        });
        m.save(&path).unwrap();
        path
    };
    let (left, top) = (mask("left.png", true), mask("top.png", false));
    let run = |name: &str, extra: &[&str]| {
        let out = poisoned(work.path(), name);
        let mut args = vec!["--seed", "5"];
        args.extend(extra);
        args.push("a garden");
        ok(&quick_generate(model.path(), &out, "cpu", &args));
        png_image(&out).pixels
    };
    let img = image.to_str().unwrap();
    let (left_arg, top_arg) = (left.to_str().unwrap(), top.to_str().unwrap());
    let inpaint = [
        "--control",
        "inpaint",
        "--control-image",
        img,
        "--control-mask",
    ];
    let plain = run("plain.png", &[]);
    let by_left = run("left-out.png", &[&inpaint[..], &[left_arg]].concat());
    let by_top = run("top-out.png", &[&inpaint[..], &[top_arg]].concat());
    assert_ne!(by_left, plain, "inpainting control changed nothing");
    assert_ne!(by_left, by_top, "the mask changed nothing");
    let meta = read_metadata(&work.path().join("left-out.png"))
        .unwrap()
        .ultrapixel
        .unwrap();
    assert_eq!(meta.control.unwrap().kind, ControlKind::Inpainting);

    let pipeline = load_on_cpu(model.path(), Some(ControlKind::Inpainting)).unwrap();
    let mut request = quick_request("a garden", 5);
    let control = Control::inpainting_image_file(&image, &left).unwrap();
    assert_eq!(control.map.shape[0], 4);
    request.set_control(control);
    assert_eq!(pipeline.generate(&request).unwrap()[0].rgb.pixels, by_left);

    // Without a mask: exit 2, the reason, nothing written.
    let out = work.path().join("no-mask.png");
    let args = ["--control", "inpaint", "--control-image", img, "a garden"];
    let run = quick_generate(model.path(), &out, "cpu", &args);
    refused(&run, &out, "--control-mask", args);
}

/// The same `.cu` kernels on the emulator: the ControlNet runs there and its maps change the
/// image (one controlled run: the ControlNet at the 768-pixel control size is slow emulated).
#[cfg(feature = "hostsim")]
#[test]
fn control_on_the_emulator_changes_the_image() {
    let model = tiny_model(3);
    let work = tempfile::tempdir().unwrap();
    let control = work.path().join("control.png");
    random_image(&control, seed());
    let run = |name: &str, extra: &[&str]| {
        let out = poisoned(work.path(), name);
        let mut args = vec!["--seed", "5"];
        args.extend(extra);
        args.push("a house by a lake");
        ok(&quick_generate(model.path(), &out, "hostsim", &args));
        png_image(&out).pixels
    };
    let plain = run("plain.png", &[]);
    let controlled = run(
        "controlled.png",
        &[
            "--control",
            "canny",
            "--control-image",
            control.to_str().unwrap(),
        ],
    );
    assert_ne!(controlled, plain, "control changed nothing on the emulator");
}
