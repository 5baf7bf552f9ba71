//! The stage benchmark harness (`bench --stages`), exercised on the emulator with the tiny
//! configuration: every part of a generation is built, run and reported.

#[cfg(feature = "hostsim")]
#[test]
fn the_stage_benchmark_times_every_part_of_a_generation() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ultrapixel"))
        .args([
            "bench",
            "--stages",
            "--tiny",
            "--backend",
            "hostsim",
            "--size",
            "512x520",
            "--iters",
            "1",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ultrapixel"))
        .args(["bench", "--stages", "--tiny", "--backend", "cpu"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("use --backend cuda or hostsim"));
}
