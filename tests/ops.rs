//! Every op's kernels on the host emulator against the op's f32 CPU reference, on fresh
//! random inputs (odd shapes included) and on each family's regression seeds, with outputs
//! poisoned beforehand; the checks whose launches change with the sm_90a kernels forced run
//! again with them, as `verify` runs them. Run in both emulator thread orders (`HOSTSIM_REVERSE=1`). Plus: every kernel is exercised by some
//! check, every launch matches its kernel's parameters, and ptxas reports no spills.

use std::collections::BTreeSet;
use ultrapixel::bench::shapes::is_gemm;
use ultrapixel::runtime::device::{dry_launches, dry_launches_for, KernelSession};
use ultrapixel::runtime::kernel_choice::{KernelChoice, KernelTarget};
use ultrapixel::runtime::kernels::{KernelId, CUDA_ARCHS, KERNELS_COMPILED, PTXAS};
use ultrapixel::runtime::session::SessionOptions;
use ultrapixel::runtime::{Backend, BackendKind};
use ultrapixel::verify::{self, OpCheck, Scale};

#[path = "common/guarded_buf.rs"]
mod guarded_buf;

/// A seed for the checks ([`guarded_buf::seed`]), which `ultrapixel verify --seed` takes too.
fn seed() -> u64 {
    let s = guarded_buf::seed();
    eprintln!("(the same checks: ultrapixel verify --seed {s})");
    s
}

/// Seeds (`verify --seed` values) that every run checks besides a fresh one, per family:
/// where a tolerance once broke (the 1796397897505234371: ddpm_step's x0 cancelling
/// at t = 1) or where `ultrapixel verify --sweep` found a family's largest error/limit ratio.
const REGRESSION_SEEDS: &[(&str, &[u64])] = &[
    ("norm", &[7322627660151822854, 9398715412399963066]),
    (
        "elementwise",
        &[
            444529769392614675,
            7075883509774426401,
            5710879542708852814,
            13214800971078148629,
        ],
    ),
    (
        "gemm",
        &[
            16369961869418870480,
            12214606849823611937,
            4620974141188107049,
            15634421929439833706,
        ],
    ),
    ("attention", &[3074210644246611059, 6659359259908158599]),
    (
        "conv",
        &[
            14999851746961343238,
            6747716388797709767,
            329695608669618955,
            673534115901673924,
        ],
    ),
    ("grn", &[14365024382127626956]),
    (
        "inr",
        &[
            14896500004833414353,
            6023321513404532099,
            1962670532513073835,
        ],
    ),
    // Bit-identical on the emulator for every seed swept: no seed stands out.
    ("noise", &[]),
    ("layout", &[13522350183912501025, 14874004217094917245]),
    ("resample", &[13151461177966062082, 13469799137962766343]),
    ("embed", &[]),
    (
        "sampler",
        &[
            1796397897505234371,
            4428075849387610579,
            3940087231610759263,
            10027761927561222779,
            2954935037164537299,
        ],
    ),
    ("conv2d", &[]),
    ("squeeze_excite", &[]),
    (
        "conv_transpose",
        &[5833679380957638813, 7322627660151822854],
    ),
];

/// Runs `family`'s checks on the emulator for a fresh seed and the family's regression seeds.
fn run_family(family: &str) {
    let (_, fixed) = REGRESSION_SEEDS
        .iter()
        .find(|(f, _)| *f == family)
        .expect("a regression list for every family");
    let backend = Backend::open(BackendKind::Hostsim).unwrap();
    let mut failures = Vec::new();
    let mut total = 0;
    for s in std::iter::once(seed()).chain(fixed.iter().copied()) {
        let checks = ultrapixel::ops::family(family)
            .unwrap()
            .checks_for(s, Scale::Emulator)
            .unwrap();
        total += checks.len();
        failures.extend(
            run_all(&checks, &backend)
                .into_iter()
                .map(|f| format!("seed {s}: {f}")),
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {total} checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Runs every check, and its sm_90a run where there is one (`OpCheck::sm90a_variant`);
/// returns one line per failing output.
fn run_all(checks: &[OpCheck], backend: &Backend) -> Vec<String> {
    let mut failures = Vec::new();
    let forced: Vec<OpCheck> = checks
        .iter()
        .filter_map(|c| c.sm90a_variant(KernelTarget::hostsim()).unwrap())
        .collect();
    for c in checks.iter().chain(&forced) {
        match verify::run_check(c, backend) {
            Ok(results) => failures.extend(results.iter().filter(|r| !r.passed()).map(|r| {
                format!(
                    "{} {}: max_err {:.3e} > limit {:.3e} (non-finite {})",
                    r.check, r.output, r.max_err, r.limit, r.non_finite
                )
            })),
            Err(e) => failures.push(format!("{}: {e}", c.name)),
        }
    }
    failures
}

#[test]
fn regression_seeds_cover_every_family() {
    let listed: Vec<&str> = REGRESSION_SEEDS.iter().map(|(f, _)| *f).collect();
    let families: Vec<&str> = ultrapixel::ops::FAMILIES.iter().map(|f| f.name).collect();
    assert_eq!(listed, families);
}

#[test]
fn layernorm_matches_reference() {
    run_family("norm");
}

#[test]
fn elementwise_ops_match_reference() {
    run_family("elementwise");
}

#[test]
fn gemm_matches_reference() {
    run_family("gemm");
}

#[test]
fn attention_matches_reference() {
    run_family("attention");
}

#[test]
fn convolutions_match_reference() {
    run_family("conv");
}

#[test]
fn dense_convolutions_match_reference() {
    run_family("conv2d");
}

#[test]
fn transposed_convolutions_match_reference() {
    run_family("conv_transpose");
}

#[test]
fn squeeze_excite_gates_match_reference() {
    run_family("squeeze_excite");
}

#[test]
fn layout_ops_match_reference() {
    run_family("layout");
}

#[test]
fn grn_matches_reference() {
    run_family("grn");
}

#[test]
fn inr_ops_match_reference() {
    run_family("inr");
}

#[test]
fn resizes_match_reference() {
    run_family("resample");
}

#[test]
fn sin_embedding_matches_reference() {
    run_family("embed");
}

#[test]
fn sampler_ops_match_reference() {
    run_family("sampler");
}

#[test]
fn noise_matches_reference() {
    run_family("noise");
}

/// A graph's own kernel choice decides, whatever `UPX_KERNELS` says: the GRN pair (a GEMM
/// with the fused statistics, the modulation, a GEMM on the modulated A) and an hd64
/// attention run the sm_90a kernels under `Some(Sm90a)` and the portable ones under
/// `Some(Portable)` and `Some(Auto)` (auto picks them on Hopper hardware only), each matching
/// the CPU reference; only the forced sm_90a choice reserves the scaled A's workspace.
#[test]
fn a_graph_kernel_choice_overrides_the_environment() {
    let s = seed();
    let pick = |family: &str, name: &str| -> OpCheck {
        let checks = ultrapixel::ops::family(family)
            .unwrap()
            .checks_for(s, Scale::Emulator)
            .unwrap();
        checks.into_iter().find(|c| c.name.contains(name)).unwrap()
    };
    let hostsim = Backend::open(BackendKind::Hostsim).unwrap();
    for c in [
        pick("gemm", "grn pair b3 rows97"),
        pick("attention", "b2 n37 m5 h2x64"),
    ] {
        let reference = verify::run_on(&c, &Backend::Cpu).unwrap();
        for choice in [
            KernelChoice::Sm90a,
            KernelChoice::Portable,
            KernelChoice::Auto,
        ] {
            let mut check = c.clone();
            check.graph.set_kernels(Some(choice));
            let g = &check.graph;
            for n in g.nodes.iter().filter(|n| n.op.name() == "gemm_scaled_a") {
                let scaled_a = g.desc(n.inputs[0]).bytes();
                let want = if choice == KernelChoice::Sm90a {
                    scaled_a
                } else {
                    0
                };
                assert_eq!(n.workspace, want, "{choice:?}");
            }
            let session = KernelSession::new(
                hostsim.device().unwrap(),
                check.graph.clone(),
                &check.weights,
                SessionOptions { poison: true },
                None,
            )
            .unwrap();
            let kernels = session.kernel_names();
            let hopper = kernels.iter().filter(|k| k.contains("_sm90a_")).count();
            let portable = kernels
                .iter()
                .filter(|k| k.starts_with("gemm_bf16_") || k.starts_with("attention_d"))
                .count();
            match choice {
                KernelChoice::Sm90a => assert!(hopper > 0 && portable == 0, "{kernels:?}"),
                _ => assert!(hopper == 0 && portable > 0, "{choice:?}: {kernels:?}"),
            }
            let got = verify::run_on(&check, &hostsim).unwrap();
            for r in check.compare(&reference, &got, 1.0) {
                assert!(r.passed(), "{choice:?} {kernels:?}: {r:?}");
            }
        }
    }
}

/// `verify`'s sm_90a runs: exactly the GEMM and attention checks whose launches change with
/// the sm_90a kernels forced get one (every GEMM check; the attentions of head dims 32 and
/// 64, not those without an sm_90a kernel), named `op[sm90a] …` and built under the forced
/// choice; a GPU that cannot run them gets none. (The family tests run and check them.)
#[test]
fn verify_reruns_the_qualifying_checks_with_the_sm90a_kernels() {
    let sim = KernelTarget::hostsim();
    let a100 = KernelTarget {
        backend: Some(BackendKind::Cuda),
        compute_capability: Some((8, 0)),
        sms: 108,
        choice: None,
        gemm_tile_n: None,
    };
    // Unless UPX_KERNELS already picks them on the emulator (then the checks' own runs do).
    let env_picks_them = sim.sm90a_allowed().unwrap();
    let hopper = |c: &OpCheck, t| {
        dry_launches_for(&c.graph, t)
            .unwrap()
            .iter()
            .any(|l| l.kernel.name().contains("_sm90a_"))
    };
    let s = seed();
    let (mut gemms, mut attentions) = (0, 0);
    for family in ["gemm", "attention"] {
        let checks = ultrapixel::ops::family(family)
            .unwrap()
            .checks_for(s, Scale::Emulator)
            .unwrap();
        for c in &checks {
            assert!(c.sm90a_variant(a100).unwrap().is_none(), "{}", c.name);
            let forced = c.sm90a_variant(sim).unwrap();
            let qualifies = hopper(c, sim.with_choice(KernelChoice::Sm90a));
            assert_eq!(forced.is_some(), qualifies && !env_picks_them, "{}", c.name);
            // Every check with one of our GEMM ops qualifies, and the attentions of head
            // dims 32 and 64.
            let expected = match family {
                "attention" => c.name.contains("x64 ") || c.name.contains("x32 "),
                _ => c.graph.nodes.iter().any(|n| is_gemm(n.op.name())),
            };
            assert_eq!(qualifies, expected, "{}", c.name);
            let Some(f) = forced else { continue };
            *if family == "gemm" {
                &mut gemms
            } else {
                &mut attentions
            } += 1;
            let (op, rest) = c.name.split_once(' ').unwrap();
            assert_eq!(f.name, format!("{op}[sm90a] {rest}"));
            assert_eq!(f.name, c.sm90a_name());
            assert_eq!(f.graph.kernels(), Some(KernelChoice::Sm90a));
            assert!(hopper(&f, sim), "{}", f.name);
        }
    }
    if !env_picks_them {
        assert!(gemms > 20 && attentions > 4, "{gemms} {attentions}");
    }
}

#[test]
fn every_kernel_is_exercised_by_a_check() {
    let mut used = BTreeSet::new();
    // The emulator-size checks launch every kernel the GPU-size ones do, and build quickly;
    // the Hopper kernels: the same checks built for the emulator with them forced, for an
    // H100's 132 SMs and for 1 and 2 SMs (where the GEMM's wider tiles win at these sizes).
    let sm90a = KernelTarget::hostsim().with_choice(KernelChoice::Sm90a);
    for c in ultrapixel::ops::all_checks(1, Scale::Emulator).unwrap() {
        used.extend(dry_launches(&c.graph).unwrap().iter().map(|l| l.kernel));
        for sms in [132, 1, 2] {
            let target = KernelTarget { sms, ..sm90a };
            let hopper = dry_launches_for(&c.graph, target).unwrap();
            used.extend(hopper.iter().map(|l| l.kernel));
        }
    }
    let unused: Vec<&str> = KernelId::ALL
        .iter()
        .filter(|k| !used.contains(k) && !k.name().starts_with("selftest_"))
        .map(|k| k.name())
        .collect();
    assert!(unused.is_empty(), "kernels no check launches: {unused:?}");
}

/// Every launch of every op (each check's graph, every kernel among them) passes its kernel's
/// parameter list as build.rs read it from kernels/*.cu: the count, each argument's width,
/// pointer or scalar, integer or float, struct name and size. Debug builds check this on every
/// launch they execute; this test checks every op's launches without running them, in any build.
#[test]
fn every_launch_matches_its_kernel_parameters() {
    let mut failures = Vec::new();
    let mut launches = 0;
    let sm90a = KernelTarget::hostsim().with_choice(KernelChoice::Sm90a);
    for c in ultrapixel::ops::all_checks(1, Scale::Emulator).unwrap() {
        let hopper = dry_launches_for(&c.graph, sm90a).unwrap();
        for l in dry_launches(&c.graph).unwrap().into_iter().chain(hopper) {
            launches += 1;
            if let Err(e) = l.check_abi() {
                failures.push(format!("{}: {e}", c.name));
            }
        }
    }
    assert!(launches > 0);
    assert!(
        failures.is_empty(),
        "{} of {launches} launches do not match their kernels:\n{}",
        failures.len(),
        failures.join("\n")
    );
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
        // Hopper-only kernels are built for sm_90a alone, the others for every listed arch.
        let archs: &[&str] = if k.sm90a() { &["sm_90a"] } else { CUDA_ARCHS };
        for arch in archs {
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
    let checks = ultrapixel::ops::all_checks(1, Scale::Gpu).unwrap();
    let build = t0.elapsed();
    // UPX_TIME_FILTER=<text>: only the checks whose name contains it.
    let filter = std::env::var("UPX_TIME_FILTER").unwrap_or_default();
    let mut times = Vec::new();
    let mut bounds = std::time::Duration::ZERO;
    for c in checks.iter().filter(|c| c.name.contains(&filter)) {
        let t = Instant::now();
        let reference = verify::run_on(c, &Backend::Cpu).unwrap();
        times.push((t.elapsed(), c.name.clone()));
        // The per-element error bounds `verify` computes to compare against.
        let t = Instant::now();
        if let Some(f) = &c.scale {
            f(c, &reference);
        }
        bounds += t.elapsed();
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
        "threads {}: {} checks, build {:.2}s, references {:.2}s, bounds {:.2}s, total {:.2}s wall, {cpu:.1}s CPU",
        rayon::current_num_threads(),
        checks.len(),
        build.as_secs_f64(),
        (total - build - bounds).as_secs_f64(),
        bounds.as_secs_f64(),
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
    for c in ultrapixel::ops::all_checks(seed, scale).unwrap() {
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
