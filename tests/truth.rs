//! Hardware truth fixtures (src/truth.rs): the captured GPU fixture replays bit-exactly on the
//! emulator; a capture survives the file round trip; one wrong element is reported as exactly
//! that case and index; every output element is written; the new truth kernels compute what
//! their headers say. On a machine with a GPU, a CUDA capture also replays on the GPU.
#![cfg(feature = "hostsim")]

use std::path::{Path, PathBuf};
use ultrapixel::runtime::device::Device;
use ultrapixel::runtime::hostsim::HostsimDevice;
use ultrapixel::truth::{self, Elem, Mismatch, Raw, TruthSet};

#[path = "common/guarded_buf.rs"]
mod guarded_buf;
use guarded_buf::seed;

const FIXTURE: &str = "tests/fixtures/truth-sm90.safetensors";

fn emulator() -> HostsimDevice {
    HostsimDevice::new()
}

fn saved(set: &TruthSet, dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    set.save(
        &path,
        &truth::capture_metadata(&emulator(), "tests/truth.rs"),
    )
    .unwrap();
    path
}

fn case<'a>(set: &'a TruthSet, name: &str) -> &'a truth::CaseRecord {
    set.case(name)
        .unwrap_or_else(|| panic!("no case {name} in the capture"))
}

#[test]
fn the_gpu_fixture_replays_bit_exactly_on_the_emulator() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE);
    if !path.exists() {
        println!("skipped: no truth fixture");
        return;
    }
    let mismatches = truth::check_file(&emulator(), &path).unwrap();
    assert!(
        mismatches.is_empty(),
        "the emulator disagrees with {FIXTURE}:\n{}",
        truth::report(&mismatches, usize::MAX)
    );
}

#[test]
fn a_capture_survives_the_file_round_trip_and_replays_clean() {
    let set = truth::capture(&emulator(), seed()).unwrap();
    assert_eq!(set.cases.len(), truth::CASES.len());
    let dir = tempfile::tempdir().unwrap();
    let path = saved(&set, dir.path(), "truth.safetensors");
    let bytes = std::fs::metadata(&path).unwrap().len();
    assert!(
        bytes < 1 << 20,
        "{bytes} bytes: a truth file must stay small"
    );

    let loaded = TruthSet::load(&path).unwrap();
    assert_eq!(loaded.cases, set.cases);
    let meta = &loaded.metadata;
    assert_eq!(meta["format"], truth::FORMAT);
    assert_eq!(meta["format_version"], truth::FORMAT_VERSION.to_string());
    assert_eq!(meta["compute_capability"], "none");
    assert_eq!(meta["description"], "tests/truth.rs");
    assert_eq!(meta["device"], emulator().describe());
    assert!(meta["created"].len() == 10 && meta["created"].starts_with("20"));
    for def in truth::CASES {
        assert_eq!(meta[&format!("case.{}", def.name)], def.launch_signature());
    }

    let mismatches = truth::replay(&loaded, &emulator()).unwrap();
    assert!(mismatches.is_empty(), "{}", truth::report(&mismatches, 10));
}

#[test]
fn capture_to_file_and_check_file_agree() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fixture.safetensors");
    let summary = truth::capture_to_file(&emulator(), &path, "round trip").unwrap();
    assert_eq!(summary.cases, truth::CASES.len());
    assert_eq!(summary.bytes, std::fs::metadata(&path).unwrap().len());
    assert_eq!(truth::check_file(&emulator(), &path).unwrap(), vec![]);
}

/// Flips a random bit of one random element of one output of each element type; the replay
/// must name exactly those three elements, with the stored and the recomputed bits.
#[test]
fn one_wrong_element_per_output_is_reported_as_exactly_that_element() {
    let seed = seed();
    let mut set = truth::capture(&emulator(), seed).unwrap();
    let mut rng = seed ^ 0x5eed;
    let mut next = |n: usize| {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) as usize % n
    };
    let mut flipped = Vec::new();
    for elem in [Elem::I32, Elem::F32, Elem::Bf16] {
        let candidates: Vec<(usize, usize)> = set
            .cases
            .iter()
            .enumerate()
            .flat_map(|(c, rec)| {
                rec.outputs
                    .iter()
                    .enumerate()
                    .filter(move |(_, t)| t.elem == elem)
                    .map(move |(o, _)| (c, o))
            })
            .collect();
        assert!(!candidates.is_empty(), "no {elem:?} output to corrupt");
        let (c, o) = candidates[next(candidates.len())];
        let out = &mut set.cases[c].outputs[o];
        let index = next(out.len());
        let original = out.bits(index);
        let wrong = original ^ (1 << next(8 * elem.size()));
        out.set_bits(index, wrong);
        flipped.push(Mismatch::Element {
            case: set.cases[c].name.clone(),
            output: o,
            index,
            elem,
            expected: wrong,
            got: original,
            at: String::new(),
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let path = saved(&set, dir.path(), "corrupt.safetensors");
    let mut got = truth::check_file(&emulator(), &path).unwrap();
    // `at` is the case's description of the index; compare everything else exactly.
    for m in &mut got {
        if let Mismatch::Element { at, .. } = m {
            assert!(!at.is_empty(), "{m}");
            *at = String::new();
        }
    }
    // Replay reports in file order; the flips were made in element-type order.
    got.sort_by_key(element_key);
    flipped.sort_by_key(element_key);
    assert_eq!(got, flipped, "{}", truth::report(&got, 10));
    assert_eq!(
        truth::count_by_case(&got)
            .iter()
            .map(|(_, n)| n)
            .sum::<usize>(),
        3
    );
}

fn element_key(m: &Mismatch) -> (String, usize, usize) {
    match m {
        Mismatch::Element {
            case,
            output,
            index,
            ..
        } => (case.clone(), *output, *index),
        other => (other.to_string(), 0, 0),
    }
}

#[test]
fn mismatch_reports_name_case_output_index_and_both_values() {
    let m = Mismatch::Element {
        case: "mma_order_big_small".into(),
        output: 0,
        index: 37,
        elem: Elem::F32,
        expected: 16777218f32.to_bits(),
        got: 16777216f32.to_bits(),
        at: "after k-step 0, D[4][5]".into(),
    };
    let line = m.to_string();
    for part in [
        "mma_order_big_small",
        "out0[37]",
        "D[4][5]",
        "0x4b800001 (16777218.0)",
        "0x4b800000 (16777216.0)",
    ] {
        assert!(line.contains(part), "{part:?} missing from {line}");
    }
    let report = truth::report(&[m.clone(), m.clone(), m], 1);
    assert!(
        report.starts_with("mma_order_big_small: 3 mismatches\n"),
        "{report}"
    );
    assert!(report.contains("... and 2 more"), "{report}");
}

/// A set captured with 0xFF-poisoned outputs, replayed with zeroed outputs: an element no
/// thread writes would keep each run's poison and differ.
#[test]
fn every_output_element_is_written() {
    let set = truth::capture(&emulator(), seed()).unwrap();
    let mismatches = truth::replay_poisoned(&set, &emulator(), 0x00).unwrap();
    assert!(
        mismatches.is_empty(),
        "unwritten outputs:\n{}",
        truth::report(&mismatches, 10)
    );
}

#[test]
fn unknown_missing_and_redefined_cases_are_reported_not_skipped() {
    let mut set = truth::capture(&emulator(), seed()).unwrap();
    let renamed = set.cases[0].name.clone();
    set.cases[0].name = "from_a_future_build".into();
    let relaunched = set.cases[1].name.clone();
    set.cases[1].launch = "kernel=selftest_block_reduce grid=7 block=64".into();
    let reshaped = set.cases[2].name.clone();
    set.cases[2].inputs[0].shape.push(1);
    let got = truth::replay(&set, &emulator()).unwrap();
    assert_eq!(got.len(), 4, "{}", truth::report(&got, 10));
    assert!(got.contains(&Mismatch::UnknownCase {
        case: "from_a_future_build".into()
    }));
    assert!(got.contains(&Mismatch::MissingCase { case: renamed }));
    for case in [relaunched, reshaped] {
        assert!(
            got.iter()
                .any(|m| matches!(m, Mismatch::Definition { case: c, .. } if *c == case)),
            "{case}: {}",
            truth::report(&got, 10)
        );
    }
}

#[test]
fn malformed_truth_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let error_of = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let e = TruthSet::load(&path).unwrap_err().to_string();
        assert!(e.contains(name), "the error names the file: {e}");
        e
    };
    assert!(error_of("garbage", b"not a tensor file").contains("not safetensors"));

    let plain = |meta: Option<Vec<(&str, &str)>>| {
        let data = [0u8; 4];
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &data).unwrap();
        let meta = meta.map(|m| {
            m.into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        });
        safetensors::serialize([("x/out0", view)], meta).unwrap()
    };
    assert!(error_of("weights", &plain(None)).contains("no \"format\" metadata"));
    let newer = plain(Some(vec![
        ("format", truth::FORMAT),
        ("format_version", "99"),
    ]));
    assert!(error_of("newer", &newer).contains("format version \"99\""));
    let stray = plain(Some(vec![
        ("format", truth::FORMAT),
        ("format_version", "1"),
        ("cases", ""),
    ]));
    assert!(error_of("stray", &stray).contains("x/out0"));
    let missing = dir.path().join("absent.safetensors");
    assert!(TruthSet::load(&missing).is_err());
}

// --- the truth kernels on the emulator, against the PTX manual's definitions ----------------

fn bits16(t: &Raw, i: usize) -> u32 {
    t.bits(i) & 0xFFFF
}

#[test]
fn ldmatrix_registers_follow_the_ptx_fragment_layout() {
    let set = truth::capture(&emulator(), seed()).unwrap();
    let rec = case(&set, "ldmatrix");
    let (m, rows, out) = (&rec.inputs[0], &rec.inputs[1], &rec.outputs[0]);
    // Matrix j's row r is the shared row lane 8j + r points at.
    let at = |j: usize, r: usize, c: usize| bits16(m, 8 * rows.bits(8 * j + r) as usize + c);
    let mut reg = 0;
    for (form, matrices) in truth::LDMATRIX_FORMS {
        let trans = form.ends_with("trans");
        for j in 0..matrices {
            for lane in 0..32 {
                let (g, t) = (lane / 4, lane % 4);
                let want = if trans {
                    at(j, 2 * t, g) | at(j, 2 * t + 1, g) << 16
                } else {
                    at(j, g, 2 * t) | at(j, g, 2 * t + 1) << 16
                };
                assert_eq!(
                    out.bits(32 * reg + lane),
                    want,
                    "{form} matrix {j} lane {lane}"
                );
            }
            reg += 1;
        }
    }
    assert_eq!(32 * reg, out.len());
}

#[test]
fn cp_async_copies_the_source_bytes_and_zero_fills_the_rest() {
    let set = truth::capture(&emulator(), seed()).unwrap();
    let rec = case(&set, "cp_async_zfill");
    let (src, sizes, out) = (&rec.inputs[0], &rec.inputs[1], &rec.outputs[0]);
    for c in 0..64 {
        let n = sizes.bits(c) as usize;
        let copied = if c < 32 {
            if n == 0 {
                0
            } else {
                16
            }
        } else {
            n
        };
        for b in 0..16 {
            let want = if b < copied { src.bytes[16 * c + b] } else { 0 };
            assert_eq!(
                out.bytes[16 * c + b],
                want,
                "chunk {c} (src-size {n}) byte {b}"
            );
        }
    }
    // Every source size 0..=16 was exercised.
    for n in 0..=16 {
        assert!(
            (32..64).any(|c| sizes.bits(c) == n),
            "src-size {n} never used"
        );
    }
}

/// D_s = C + Σ_{s' ≤ s} A_s'·B_s' of `selftest_mma_chain`, in f64.
fn chain_reference(rec: &truth::CaseRecord) -> (Vec<f64>, Vec<f64>) {
    let (a, bt, c) = (&rec.inputs[0], &rec.inputs[1], &rec.inputs[2]);
    let steps = a.len() / 256;
    let mut exact = Vec::with_capacity(steps * 128);
    let mut magnitude = Vec::with_capacity(steps * 128);
    let mut acc: Vec<f64> = (0..128).map(|i| c.f32(i) as f64).collect();
    let mut mag: Vec<f64> = acc.iter().map(|v| v.abs()).collect();
    for s in 0..steps {
        for i in 0..128 {
            let (row, col) = (i / 8, i % 8);
            for k in 0..16 {
                let p =
                    a.f32(256 * s + 16 * row + k) as f64 * bt.f32(128 * s + 16 * col + k) as f64;
                acc[i] += p;
                mag[i] += p.abs();
            }
        }
        exact.extend(&acc);
        magnitude.extend(&mag);
    }
    (exact, magnitude)
}

#[test]
fn mma_chains_accumulate_every_k_step() {
    let set = truth::capture(&emulator(), seed()).unwrap();
    let (exact, _) = chain_reference(case(&set, "mma_chain_exact"));
    let out = &case(&set, "mma_chain_exact").outputs[0];
    for (i, &want) in exact.iter().enumerate() {
        assert_eq!(out.f32(i) as f64, want, "exact chain, element {i}");
    }
    // The order cases round, within the f32 bound of 17 additions per k-step.
    for name in [
        "mma_order_big_small",
        "mma_order_exponents",
        "mma_signed_zeros",
    ] {
        let rec = case(&set, name);
        let (exact, magnitude) = chain_reference(rec);
        for (i, (&want, &mag)) in exact.iter().zip(&magnitude).enumerate() {
            let got = rec.outputs[0].f32(i) as f64;
            let bound = 17.0 * 4.0 * f32::EPSILON as f64 * mag;
            assert!(
                (got - want).abs() <= bound,
                "{name} element {i}: {got} vs exact {want}"
            );
        }
    }
}

#[test]
fn order_cases_really_need_rounding() {
    // Inputs whose exact sums f32 cannot hold: otherwise they could not tell orders apart.
    let set = truth::capture(&emulator(), seed()).unwrap();
    for name in ["mma_order_big_small", "mma_order_exponents"] {
        let (exact, _) = chain_reference(case(&set, name));
        let inexact = exact.iter().filter(|&&v| v as f32 as f64 != v).count();
        assert!(inexact >= 16, "{name}: only {inexact} sums round in f32");
    }
}

#[test]
fn the_signed_zero_case_has_sums_of_negative_zeros_only() {
    // Where C and all sixteen products are -0, IEEE addition gives -0: the case must contain
    // such sums, or it could not show whether the tensor core keeps the sign.
    let set = truth::capture(&emulator(), seed()).unwrap();
    let rec = case(&set, "mma_signed_zeros");
    let (a, bt, c) = (&rec.inputs[0], &rec.inputs[1], &rec.inputs[2]);
    let negative_zero = |v: f32| v == 0.0 && v.is_sign_negative();
    let all_negative = (0..128)
        .filter(|&i| {
            let (row, col) = (i / 8, i % 8);
            negative_zero(c.f32(i))
                && (0..16).all(|k| negative_zero(a.f32(16 * row + k) * bt.f32(16 * col + k)))
        })
        .count();
    assert!(all_negative >= 4, "only {all_negative} sums of -0 alone");
    let zero_products_only = (0..128)
        .filter(|&i| (0..16).all(|k| a.f32(16 * (i / 8) + k) * bt.f32(16 * (i % 8) + k) == 0.0))
        .count();
    assert!(
        zero_products_only >= 64,
        "{zero_products_only} sums of zeros alone"
    );
}

/// On a GPU: a CUDA capture replays bit-exactly on the GPU (the hardware is deterministic and
/// the file round trip loses nothing), for the fixture's inputs and for fresh ones; the
/// emulator's disagreements are printed. With UPX_TRUTH_OUT=FILE the fixture capture is kept
/// there (that is how the fixture is made) and the fresh one beside it.
#[test]
fn a_gpu_capture_replays_bit_exactly_on_the_gpu() {
    let gpu = match ultrapixel::runtime::cuda::CudaDevice::new(0) {
        Ok(gpu) => gpu,
        Err(e) => {
            println!("skipped: no GPU ({e})");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let path = std::env::var_os("UPX_TRUTH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("truth-gpu.safetensors"));
    let summary = truth::capture_to_file(gpu.as_ref(), &path, "tests/truth.rs on a GPU").unwrap();
    println!(
        "captured {} cases, {} bytes, on {} into {}",
        summary.cases,
        summary.bytes,
        gpu.describe(),
        path.display()
    );
    let again = truth::check_file(gpu.as_ref(), &path).unwrap();
    assert!(again.is_empty(), "{}", truth::report(&again, 20));
    let emulated = truth::check_file(&emulator(), &path).unwrap();
    println!(
        "emulator vs this GPU: {} mismatches\n{}",
        emulated.len(),
        truth::report(&emulated, 8)
    );
    let meta = TruthSet::load(&path).unwrap().metadata;
    for key in [
        "device",
        "compute_capability",
        "cuda_driver",
        "nvcc",
        "created",
    ] {
        println!("{key}: {}", meta[key]);
    }

    let seed = seed();
    let fresh = truth::capture(gpu.as_ref(), seed).unwrap();
    let again = truth::replay(&fresh, gpu.as_ref()).unwrap();
    assert!(again.is_empty(), "{}", truth::report(&again, 20));
    let fresh_path = path.with_extension(format!("seed{seed}.safetensors"));
    saved(
        &fresh,
        fresh_path.parent().unwrap(),
        fresh_path.file_name().unwrap().to_str().unwrap(),
    );
}
