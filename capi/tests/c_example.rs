//! `examples/c/generate.c`, compiled with the system C compiler against the built
//! libultrapixel, run on a tiny model from `make-tiny-model`: its PNG is the CLI's `generate`
//! output, byte for byte, and its cancelled second generation ends as cancelled. The command
//! line runs in this process (the binary is another package's, which `cargo test -p` would
//! not build); `ultrapixel()` parses and runs it exactly as `src/main.rs` does.

use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::Command;
use upx::cli::{run, Cli};

/// The directory of the built cdylib: the test binary lives in `<target>/<profile>/deps`,
/// the library one level up (wherever CARGO_TARGET_DIR puts it).
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let lib = dir.join(format!(
        "{}ultrapixel{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    assert!(
        lib.is_file(),
        "{} is missing: cargo builds it before this test",
        lib.display()
    );
    dir
}

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn compiler(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

/// The command line `ultrapixel ARGS...` runs, in this process (the same code as the binary).
fn ultrapixel(args: &[&str]) {
    let cli = Cli::try_parse_from(std::iter::once("ultrapixel").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert_eq!(run(cli).unwrap_or_else(|e| panic!("{args:?}: {e}")), 0);
}

fn checked(cmd: &mut Command) -> (String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{stdout}{stderr}",
        out.status
    );
    (stdout, stderr)
}

/// Builds the example, runs it on `backend` and compares its PNG with the CLI's.
fn c_example_matches_the_cli(backend: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let (model, exe) = (tmp.path().join("tiny"), tmp.path().join("generate"));
    let lib = library_dir();
    checked(
        Command::new(compiler("CC", "cc"))
            .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-I"])
            .arg(workspace_root().join("capi/include"))
            .arg(workspace_root().join("examples/c/generate.c"))
            .arg("-L")
            .arg(&lib)
            .arg(format!("-Wl,-rpath,{}", lib.display()))
            .args(["-lultrapixel", "-o"])
            .arg(&exe),
    );
    ultrapixel(&["make-tiny-model", model.to_str().unwrap()]);

    let (prompt, seed) = ("a lighthouse on a cliff", "42");
    let from_c = tmp.path().join("c.png");
    let (stdout, stderr) = checked(
        Command::new(&exe)
            .arg(&model)
            .arg(backend)
            .arg(&from_c)
            .args([prompt, seed, "512", "520", "2", "1"]),
    );
    assert!(
        stdout.contains(&format!("512x520, seed {seed}\n")),
        "{stdout}"
    );
    assert!(
        stdout.contains("second generation cancelled: interrupted"),
        "{stdout}"
    );
    for line in [
        "text encoder\n",
        "stage C low-res: 2/2\n",
        "stage C: 0/2\n",
        "stage B: 1/1\n",
        "stage A\n",
    ] {
        assert!(
            stderr.contains(line),
            "no `{line}` in the progress:\n{stderr}"
        );
    }

    let from_cli = tmp.path().join("cli.png");
    ultrapixel(&[
        "generate",
        "--model-dir",
        model.to_str().unwrap(),
        "--backend",
        backend,
        "--size",
        "512x520",
        "--steps-c",
        "2",
        "--steps-b",
        "1",
        "--seed",
        seed,
        "-q",
        "--out",
        from_cli.to_str().unwrap(),
        prompt,
    ]);
    let (c, cli) = (
        std::fs::read(&from_c).unwrap(),
        std::fs::read(&from_cli).unwrap(),
    );
    let (image, _) = upx::pipeline::decode_png(&c).unwrap();
    assert_eq!((image.width, image.height), (512, 520));
    let distinct: std::collections::HashSet<u8> = image.pixels.iter().copied().collect();
    assert!(distinct.len() > 16, "a real picture, not a constant");
    assert!(c == cli, "the C example's PNG differs from the CLI's");
}

#[test]
fn the_c_example_makes_the_clis_png_and_cancels_its_second_generation() {
    c_example_matches_the_cli("cpu");
}

/// The same on our kernels under the emulator (the C ABI only passes the backend's name on;
/// `tests/pipeline.rs` checks that the emulator's images are the library's).
#[test]
#[ignore = "minutes on the emulator: cargo test -p ultrapixel-capi -- --ignored"]
fn the_c_example_makes_the_clis_png_on_the_emulator() {
    c_example_matches_the_cli("hostsim");
}

/// The header is valid C++ too (extern "C", no C-only constructs), strictly compiled.
#[test]
fn the_header_compiles_as_cpp() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("use.cpp");
    std::fs::write(
        &src,
        "#include \"ultrapixel.h\"\nint main() { UpxSettings s; \
         return upx_settings_init(&s, sizeof s) == UPX_STATUS_OK ? 0 : 1; }\n",
    )
    .unwrap();
    checked(
        Command::new(compiler("CXX", "c++"))
            .args([
                "-std=c++17",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-pedantic",
                "-fsyntax-only",
                "-I",
            ])
            .arg(workspace_root().join("capi/include"))
            .arg(&src),
    );
}
