//! The program on machines without a usable GPU: no driver at all, or a driver that reports
//! no device (a stand-in libcuda.so.1 built here). Both must give clear messages and exit
//! codes, never a panic.

use std::path::PathBuf;
use std::process::{Command, Output};

fn ultrapixel(args: &[&str], lib_dir: Option<&PathBuf>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ultrapixel"));
    c.args(args).env_remove("UPX_REQUIRE_GPU");
    if let Some(d) = lib_dir {
        c.env("LD_LIBRARY_PATH", d);
    }
    c.output().expect("run ultrapixel")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A fake driver whose cuInit says CUDA_ERROR_NO_DEVICE.
fn fake_driver() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("upx-fake-cuda-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("fake.c");
    std::fs::write(
        &src,
        r#"
static const char* msg = "no CUDA-capable device is detected";
int cuInit(unsigned int flags) { (void)flags; return 100; }
int cuGetErrorString(int e, const char** s) { (void)e; *s = msg; return 0; }
int cuGetErrorName(int e, const char** s) { (void)e; *s = "CUDA_ERROR_NO_DEVICE"; return 0; }
int cuDriverGetVersion(int* v) { *v = 13000; return 0; }
int cuDeviceGetCount(int* n) { *n = 0; return 0; }
int cuDeviceGet(int* d, int o) { (void)d; (void)o; return 100; }
"#,
    )
    .unwrap();
    for name in ["libcuda.so.1", "libcuda.so"] {
        let status = Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(dir.join(name))
            .arg(&src)
            .status()
            .expect("a C compiler (cc) to build the fake driver");
        assert!(status.success());
    }
    dir
}

fn real_driver_present() -> bool {
    ultrapixel::runtime::cuda::driver_present()
}

#[test]
fn info_without_driver_says_so_and_exits_zero() {
    if real_driver_present() {
        eprintln!("skipped: a real CUDA driver is installed on this machine");
        return;
    }
    let o = ultrapixel(&["info"], None);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("no CUDA driver found"), "{}", text(&o));
}

#[test]
fn info_with_a_driver_but_no_device_says_no_device() {
    if real_driver_present() {
        eprintln!("skipped: a real CUDA driver is installed on this machine");
        return;
    }
    let dir = fake_driver();
    let o = ultrapixel(&["info"], Some(&dir));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("no CUDA device"), "{}", text(&o));
}

#[test]
fn verify_requiring_a_gpu_fails_cleanly_without_one() {
    if real_driver_present() {
        eprintln!("skipped: a real CUDA driver is installed on this machine");
        return;
    }
    let o = Command::new(env!("CARGO_BIN_EXE_ultrapixel"))
        .args(["verify", "--filter", "no-such-check"])
        .env("UPX_REQUIRE_GPU", "1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("skipped: no GPU"), "{}", text(&o));
}

/// `info --size` plans a generation of the released model with no GPU: every stage's memory,
/// the peaks, and every part's kernel launches with its runs per image, summed.
#[test]
fn info_with_a_size_prints_the_memory_plan_and_the_launches_per_part() {
    let o = ultrapixel(&["info", "--size", "2048x1536"], None);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("GPU memory plan for 2048x1536 (the released model)"),
        "{out}"
    );
    for stage in ["text encoder", "stage C", "stage B", "stage A"] {
        assert!(out.lines().any(|l| l.starts_with(stage)), "{stage}: {out}");
    }
    let mut sum = 0;
    let mut parts = 0;
    for line in out.lines().filter(|l| l.contains(" × ")) {
        let (left, runs) = line.rsplit_once(" × ").unwrap();
        let launches: usize = left.split_whitespace().last().unwrap().parse().unwrap();
        let runs: usize = runs.trim().parse().unwrap();
        assert!(launches > 0, "{line}");
        sum += launches * runs;
        parts += 1;
    }
    assert_eq!(parts, 6, "{out}");
    assert!(out.contains(&format!("per image: {sum} launches")), "{out}");
}
