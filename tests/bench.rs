//! The stage benchmark harness (`bench --stages`), exercised on the emulator with the tiny
//! configuration: every part of a generation is built, run and reported.

/// `bench MODE` on the emulator with the tiny configuration at 512x520, one run each: its
/// stdout, after checking it succeeded.
#[cfg(feature = "hostsim")]
fn tiny_emulator_bench(mode: &str) -> String {
    let (out, text) = ultrapixel(&[
        "bench",
        mode,
        "--tiny",
        "--backend",
        "hostsim",
        "--size",
        "512x520",
        "--iters",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn ultrapixel(args: &[&str]) -> (std::process::Output, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ultrapixel"))
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, text)
}

#[cfg(feature = "hostsim")]
#[test]
fn the_stage_benchmark_times_every_part_of_a_generation() {
    let text = tiny_emulator_bench("--stages");
    for (stage, part, runs) in [
        ("text encoder", "prompt + negative", 1),
        ("stage C", "low-res step", 20),
        ("stage C", "INR reconstruction", 1),
        ("stage C", "high-res step", 20),
        ("stage B", "step", 10),
        ("stage A", "tile", 1),
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(stage) && l.contains(part))
            .unwrap_or_else(|| panic!("no line for {stage} {part}:\n{text}"));
        assert!(line.contains(&format!("× {runs:>3}")), "{line}");
    }
    assert!(text.contains("512x520: 20 Stage C steps"), "{text}");
    assert!(
        text.contains("end to end (device time, one image):"),
        "{text}"
    );
}

#[test]
fn the_stage_benchmark_refuses_the_reference_backend() {
    let (out, _) = ultrapixel(&["bench", "--stages", "--tiny", "--backend", "cpu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("use --backend cuda or hostsim"));
}

/// `bench --shapes` on the emulator: one timed row per distinct GEMM and attention shape
/// (as many as the header announces), the per-image sums, and no vendor column.
#[cfg(feature = "hostsim")]
#[test]
fn the_shape_benchmark_times_every_gemm_and_attention_shape() {
    let text = tiny_emulator_bench("--shapes");
    assert!(text.contains("cuBLASLt: skipped"), "{text}");
    let count = |marker: &str| -> usize {
        let line = text.lines().find(|l| l.contains(marker)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let gemm_rows = text
        .lines()
        .filter(|l| l.contains("TFLOP/s") && l.contains(": gemm"))
        .count();
    let attn_rows = text
        .lines()
        .filter(|l| l.starts_with('b') && l.contains(": attention#"))
        .count();
    assert_eq!(gemm_rows, count("GEMM shapes"), "{text}");
    assert_eq!(attn_rows, count("attention shapes"), "{text}");
    let dw_rows = text.lines().filter(|l| l.contains(": dwconv_ln#")).count();
    assert_eq!(
        dw_rows,
        count("depthwise conv + LayerNorm shapes"),
        "{text}"
    );
    assert!(dw_rows > 2, "{text}");
    assert!(gemm_rows > 10 && attn_rows > 3, "{text}");
    assert!(text.contains("GEMMs of one image:") && text.contains("attention of one image:"));
    assert!(text.contains("depthwise conv + LayerNorm of one image:"));
}

/// `--shapes --list` prints the same shapes as JSON for the PyTorch peer, with no device.
#[test]
fn the_shape_list_is_json_for_the_pytorch_peer() {
    let (out, text) = ultrapixel(&["bench", "--shapes", "--list", "--tiny", "--size", "512x520"]);
    assert!(out.status.success(), "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let size = &v["512x520"];
    let gemms = size["gemms"].as_array().unwrap();
    let attention = size["attention"].as_array().unwrap();
    assert!(gemms.len() > 10 && attention.len() > 3, "{text}");
    for g in gemms {
        for key in ["m", "n", "k", "per_image"] {
            assert!(g[key].as_u64().unwrap() > 0, "{g}");
        }
    }
    for a in attention {
        for key in ["batch", "queries", "heads", "head_dim", "per_image"] {
            assert!(a[key].as_u64().unwrap() > 0, "{a}");
        }
        assert!(
            a["causal"].is_boolean() && a["key_mask"].is_boolean(),
            "{a}"
        );
    }
    // --list belongs to --shapes.
    let (out, _) = ultrapixel(&["bench", "--list"]);
    assert_eq!(out.status.code(), Some(2));
}
