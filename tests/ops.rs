//! Every op's kernels on the host emulator against the op's f32 CPU reference, on fresh
//! random inputs (odd shapes included) with outputs poisoned beforehand. Run in both
//! emulator thread orders (`HOSTSIM_REVERSE=1`). Plus: every kernel is exercised by some
//! check, and ptxas reports no spills.

use std::collections::BTreeSet;
use ultrapixel::runtime::device::dry_launches;
use ultrapixel::runtime::kernels::{KernelId, CUDA_ARCHS, KERNELS_COMPILED, PTXAS};
use ultrapixel::runtime::{Backend, BackendKind};
use ultrapixel::verify::{self, OpCheck, Scale};

fn seed() -> u64 {
    let s = std::env::var("UPX_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {s} (rerun with UPX_TEST_SEED={s})");
    s
}

fn run_all(checks: Vec<OpCheck>) {
    let backend = Backend::open(BackendKind::Hostsim).unwrap();
    let mut failures = Vec::new();
    for c in &checks {
        match verify::run_check(c, &backend) {
            Ok(results) => failures.extend(results.iter().filter(|r| !r.passed()).map(|r| {
                format!(
                    "{} {}: max_err {:.3e} > limit {:.3e} (non-finite {})",
                    r.check, r.output, r.max_err, r.limit, r.non_finite
                )
            })),
            Err(e) => failures.push(format!("{}: {e}", c.name)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} checks failed:\n{}",
        failures.len(),
        checks.len(),
        failures.join("\n")
    );
}

#[test]
fn layernorm_matches_reference() {
    run_all(ultrapixel::ops::norm::checks(seed(), Scale::Emulator).unwrap());
}

#[test]
fn elementwise_ops_match_reference() {
    run_all(ultrapixel::ops::elementwise::checks(seed(), Scale::Emulator).unwrap());
}

#[test]
fn gemm_matches_reference() {
    run_all(ultrapixel::ops::gemm::checks(seed(), Scale::Emulator).unwrap());
}

#[test]
fn attention_matches_reference() {
    run_all(ultrapixel::ops::attention::checks(seed(), Scale::Emulator).unwrap());
}

#[test]
fn convolutions_match_reference() {
    run_all(ultrapixel::ops::conv::checks(seed(), Scale::Emulator).unwrap());
}

#[test]
fn layout_ops_match_reference() {
    run_all(ultrapixel::ops::layout::checks(seed(), Scale::Emulator).unwrap());
}

#[test]
fn grn_matches_reference() {
    run_all(ultrapixel::ops::grn::checks(seed(), Scale::Emulator).unwrap());
}

#[test]
fn inr_ops_match_reference() {
    run_all(ultrapixel::ops::inr::checks(seed(), Scale::Emulator).unwrap());
}

#[test]
fn resizes_match_reference() {
    run_all(ultrapixel::ops::resample::checks(seed(), Scale::Emulator).unwrap());
}

#[test]
fn sin_embedding_matches_reference() {
    run_all(ultrapixel::ops::embed::checks(seed(), Scale::Emulator).unwrap());
}

#[test]
fn sampler_ops_match_reference() {
    run_all(ultrapixel::ops::sampler::checks(seed(), Scale::Emulator).unwrap());
}

#[test]
fn noise_matches_reference() {
    run_all(ultrapixel::ops::noise::checks(seed(), Scale::Emulator).unwrap());
}

#[test]
fn every_kernel_is_exercised_by_a_check() {
    let mut used = BTreeSet::new();
    // The emulator-size checks launch every kernel the GPU-size ones do, and build quickly.
    for c in verify::all_checks(1, Scale::Emulator).unwrap() {
        used.extend(
            dry_launches(&c.graph)
                .unwrap()
                .into_iter()
                .map(|l| l.kernel),
        );
    }
    let unused: Vec<&str> = KernelId::ALL
        .iter()
        .filter(|k| !used.contains(k) && !k.name().starts_with("selftest_"))
        .map(|k| k.name())
        .collect();
    assert!(unused.is_empty(), "kernels no check launches: {unused:?}");
}

#[test]
fn ptxas_reports_every_kernel_without_spills() {
    if !KERNELS_COMPILED {
        assert!(
            std::env::var("UPX_REQUIRE_NVCC").as_deref() != Ok("1"),
            "UPX_REQUIRE_NVCC=1 but the kernels were not compiled"
        );
        eprintln!("skipped: built without nvcc, no ptxas report");
        return;
    }
    for k in KernelId::ALL {
        for arch in CUDA_ARCHS {
            let e = PTXAS
                .iter()
                .find(|e| e.kernel == k.name() && e.arch == *arch)
                .unwrap_or_else(|| panic!("no ptxas entry for {} on {arch}", k.name()));
            assert_eq!(
                e.spill_stores + e.spill_loads,
                0,
                "{} spills on {arch}",
                k.name()
            );
            assert_eq!(e.stack_bytes, 0, "{} uses local memory on {arch}", k.name());
            assert!(
                e.registers <= 255,
                "{} uses {} registers on {arch}",
                k.name(),
                e.registers
            );
        }
    }
}

/// The CPU side of `ultrapixel verify` at GPU size: building every Scale::Gpu check and
/// running its reference, timed per check (the GPU part is not run). Run with
/// `cargo test --release --test ops -- --ignored --nocapture gpu_scale_references`.
#[test]
#[ignore = "timing: minutes of CPU"]
fn gpu_scale_references_time() {
    use std::time::Instant;
    let t0 = Instant::now();
    let checks = verify::all_checks(1, Scale::Gpu).unwrap();
    let build = t0.elapsed();
    // UPX_TIME_FILTER=<text>: only the checks whose name contains it.
    let filter = std::env::var("UPX_TIME_FILTER").unwrap_or_default();
    let mut times = Vec::new();
    for c in checks.iter().filter(|c| c.name.contains(&filter)) {
        let t = Instant::now();
        verify::run_on(c, &Backend::Cpu).unwrap();
        times.push((t.elapsed(), c.name.clone()));
    }
    let total = t0.elapsed();
    // CPU seconds of the process (user + system), so a busy machine does not hide the work.
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let f: Vec<f64> = s
                .rsplit(')')
                .next()?
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse().ok())
                .collect();
            Some(f.iter().sum::<f64>() / 100.0)
        })
        .unwrap_or(f64::NAN);
    times.sort();
    for (t, name) in times.iter().rev().take(25) {
        eprintln!("{:>8.3}s  {name}", t.as_secs_f64());
    }
    eprintln!(
        "threads {}: {} checks, build {:.2}s, references {:.2}s, total {:.2}s wall, {cpu:.1}s CPU",
        rayon::current_num_threads(),
        checks.len(),
        build.as_secs_f64(),
        (total - build).as_secs_f64(),
        total.as_secs_f64()
    );
}

/// A digest of every reference output's bits at emulator size (`UPX_DIGEST_SEED`, default 1,
/// and `UPX_DIGEST_SCALE=gpu` for GPU size): compare it before and after a change to the
/// references that must not change any result.
#[test]
#[ignore = "a tool: prints a digest"]
fn reference_digest() {
    let seed = std::env::var("UPX_DIGEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let scale = match std::env::var("UPX_DIGEST_SCALE").as_deref() {
        Ok("gpu") => Scale::Gpu,
        _ => Scale::Emulator,
    };
    let mut total: u64 = 0xcbf2_9ce4_8422_2325;
    for c in verify::all_checks(seed, scale).unwrap() {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for out in verify::run_on(&c, &Backend::Cpu).unwrap() {
            for v in out {
                h = (h ^ v.to_bits() as u64).wrapping_mul(0x100_0000_01b3);
            }
        }
        eprintln!("{h:016x} {}", c.name);
        total = (total ^ h).wrapping_mul(0x100_0000_01b3);
    }
    eprintln!("digest {total:016x}");
}
