//! Faults during `generate` on the tiny model: Ctrl-C in every stage, a failing kernel launch,
//! an unwritable output directory. Each must give a clear error and a non-zero exit, and
//! leave no partial output.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

fn tiny_model() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        ultrapixel::pipeline::tiny::make_tiny_model(dir.path(), 3).unwrap();
        dir
    })
    .path()
}

fn generate_cmd(out: &Path, backend: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ultrapixel"));
    cmd.args(["generate", "--model-dir"])
        .arg(tiny_model())
        .args([
            "--backend",
            backend,
            "--size",
            "512x512",
            "--steps-c",
            "3",
            "--steps-b",
            "2",
        ])
        .arg("--out")
        .arg(out.join("x-{seed}.png"))
        .arg("a fault test");
    cmd
}

fn assert_nothing_written(out: &Path) {
    let left: Vec<_> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Runs a generation on the emulator and sends SIGINT as soon as stderr shows `after`
/// (the line a phase prints when it ends, i.e. once the next one runs).
#[cfg(feature = "hostsim")]
fn interrupt_after(after: &str) {
    let out = tempfile::tempdir().unwrap();
    let mut child = generate_cmd(out.path(), "hostsim")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let mut seen = Vec::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        let hit = line.contains(after);
        seen.push(line);
        if hit {
            let k = Command::new("kill").args(["-INT", &pid]).status().unwrap();
            assert!(k.success());
        }
    }
    let status = child.wait().unwrap();
    let log = seen.join("\n");
    assert!(log.contains(after), "never reached `{after}`:\n{log}");
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(log.contains("interrupted: 0 of 1 images written"), "{log}");
    assert_nothing_written(out.path());
}

#[cfg(feature = "hostsim")]
#[test]
fn ctrl_c_during_the_low_res_pass_stops_cleanly() {
    interrupt_after("image 1 text encoder:");
}

#[cfg(feature = "hostsim")]
#[test]
fn ctrl_c_during_the_high_res_pass_stops_cleanly() {
    interrupt_after("image 1 stage C low-res:");
}

#[cfg(feature = "hostsim")]
#[test]
fn ctrl_c_during_stage_b_stops_cleanly() {
    interrupt_after("image 1 stage C:");
}

#[cfg(feature = "hostsim")]
#[test]
fn ctrl_c_during_stage_a_writes_nothing() {
    interrupt_after("image 1 stage B:");
}

fn run(cmd: &mut Command) -> (Output, String) {
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    (o, err)
}

#[cfg(feature = "hostsim")]
#[test]
fn a_failing_kernel_launch_names_the_kernel_and_op_and_writes_nothing() {
    let out = tempfile::tempdir().unwrap();
    let (o, err) =
        run(generate_cmd(out.path(), "hostsim").env("UPX_HOSTSIM_FAIL_KERNEL", "attention_d16"));
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("attention_d16_bf16") && err.contains("launch failed"),
        "{err}"
    );
    assert!(err.contains("attention#"), "the failing op is named: {err}");
    assert_nothing_written(out.path());
}

#[test]
fn an_unwritable_output_directory_is_refused_before_any_work() {
    let out = tempfile::tempdir().unwrap();
    let ro = out.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let (o, err) = run(&mut generate_cmd(&ro, "cpu"));
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("is not a writable directory"), "{err}");
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_nothing_written(&ro);
}
