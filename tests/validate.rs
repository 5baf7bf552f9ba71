//! Golden cases (tests/cases, from the official PyTorch code) through `ultrapixel validate`
//! and the library: every supported kind passes on the cpu executor with the f32 tolerances
//! and on the emulator with the bf16 rule; failures, unknown kinds and broken files are
//! reported with the documented exit codes, never as a pass.

mod common;

use common::rewrite_safetensors;
use std::path::{Path, PathBuf};
use std::process::Command;
use ultrapixel::golden::{run_case, Case, SUPPORTED_KINDS};
use ultrapixel::runtime::{Backend, BackendKind};

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases")
}

/// Every case file whose kind this build runs (there must be some of each kind).
fn supported_cases() -> Vec<Case> {
    let mut cases: Vec<Case> = std::fs::read_dir(cases_dir())
        .expect("tests/cases")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|p| Case::load(&p).unwrap())
        .filter(|c| SUPPORTED_KINDS.contains(&c.module.as_str()))
        .collect();
    cases.sort_by(|a, b| a.path.cmp(&b.path));
    for kind in SUPPORTED_KINDS {
        assert!(
            cases.iter().any(|c| c.module == *kind),
            "no case file of kind {kind}"
        );
    }
    cases
}

fn assert_all_pass(kind: BackendKind, except: &[&str]) {
    let backend = Backend::open(kind).unwrap();
    for case in supported_cases()
        .into_iter()
        .filter(|c| !except.contains(&c.module.as_str()))
    {
        for c in run_case(&case, &backend).unwrap() {
            eprintln!(
                "{} {}: {} {:.3e} (limit {:.3e})",
                c.case, c.output, c.rule, c.error, c.limit
            );
            assert!(
                c.passed(),
                "{} {} on {kind:?}: {:.3e} > {:.3e}",
                c.case,
                c.output,
                c.error,
                c.limit
            );
        }
    }
}

#[test]
fn every_supported_case_passes_on_the_cpu_executor() {
    assert_all_pass(BackendKind::Cpu, &[]);
}

#[cfg(feature = "hostsim")]
#[test]
fn every_supported_case_passes_on_the_emulator() {
    assert_all_pass(BackendKind::Hostsim, &[]);
}

fn validate(args: &[&Path]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ultrapixel"))
        .arg("validate")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("upx-validate-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn validate_passes_prints_a_line_per_output_and_a_summary() {
    let files = [
        cases_dir().join("resblock.safetensors"),
        cases_dir().join("cfg_combine.safetensors"),
    ];
    let (code, out, err) = validate(&files.iter().map(PathBuf::as_path).collect::<Vec<_>>());
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out.lines().filter(|l| l.ends_with("PASS")).count(),
        4,
        "{out}"
    );
    assert!(out.contains("4 passed, 0 failed"), "{out}");
}

#[test]
fn a_perturbed_expected_output_fails_with_exit_1() {
    let dir = scratch("perturbed");
    let path = dir.join("timestepblock.safetensors");
    rewrite_safetensors(
        &cases_dir().join("timestepblock.safetensors"),
        &path,
        |tensors, _| {
            let out = tensors.iter_mut().find(|t| t.0 == "output.out").unwrap();
            let first = f32::from_le_bytes(out.3[..4].try_into().unwrap()) + 0.5;
            out.3[..4].copy_from_slice(&first.to_le_bytes());
        },
    );
    let (code, out, _) = validate(&[&path]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL") && out.contains("0 passed, 1 failed"),
        "{out}"
    );
}

#[test]
fn unknown_kinds_broken_files_and_no_files_exit_2() {
    // A kind this build does not know: an error, not a pass.
    let dir = scratch("broken");
    let unknown = dir.join("unknown.safetensors");
    rewrite_safetensors(
        &cases_dir().join("cfg_combine.safetensors"),
        &unknown,
        |_, meta| {
            meta.insert("module".into(), "made_up_kind".into());
        },
    );
    let (code, out, err) = validate(&[&unknown]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("unknown or unsupported case kind `made_up_kind`"),
        "{err}"
    );

    let truncated = dir.join("truncated.safetensors");
    let bytes = std::fs::read(cases_dir().join("resblock.safetensors")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let (code, _, err) = validate(&[&truncated]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("truncated.safetensors"), "{err}");

    let (code, _, _) = validate(&[]);
    assert_eq!(code, 2);
}

/// The LoRA case needs its LoRA: with the base weights alone (the `input.lora.*` tensors
/// dropped) the Stage C pass misses the expected outputs.
#[test]
fn the_lora_case_fails_without_its_lora() {
    let mut case = Case::load(&cases_dir().join("stage_c_lora.safetensors")).unwrap();
    case.module = "stage_c_ultrapixel_lr".into();
    let backend = Backend::open(BackendKind::Cpu).unwrap();
    let checks = run_case(&case, &backend).unwrap();
    assert!(checks.iter().any(|c| !c.passed()), "{checks:?}");
}

/// A LoRA file whose keys do not match the model is refused, every bad key listed:
/// a name that is no LoRA tensor, an index past the model's layers, a factor whose shape
/// does not fit, and a layer with only one factor.
#[test]
fn a_lora_with_bad_keys_is_refused_with_every_bad_key_listed() {
    use ultrapixel::golden::{lora_case_manifest, write_lora_file};
    use ultrapixel::pipeline::lora::{Lora, ModelShapes};
    let case = Case::load(&cases_dir().join("stage_c_lora.safetensors")).unwrap();
    let dir = scratch("lora-keys");
    let good = dir.join("good.safetensors");
    write_lora_file(&case, &good).unwrap();
    let manifest = lora_case_manifest(&case);
    let shapes = ModelShapes {
        stage_c: &manifest,
        text_width: 0,
        vocab: 0,
    };
    let lora = Lora::open(&good, &shapes, &dir).unwrap();
    assert_eq!(
        lora.layers.len(),
        8,
        "every attention projection of the tiny model"
    );

    let bad = dir.join("bad.safetensors");
    rewrite_safetensors(&good, &bad, |tensors, _| {
        let rename = |t: &mut Vec<common::Stored>, from: &str, to: &str| {
            t.iter_mut().find(|s| s.0 == from).unwrap().0 = to.into();
        };
        rename(tensors, "0.lora_down", "0.lora_middle");
        rename(tensors, "1.lora_up", "41.lora_up");
        rename(tensors, "1.lora_down", "41.lora_down");
        // Layer 2's down factor with a transposed shape.
        let t = tensors.iter_mut().find(|s| s.0 == "2.lora_down").unwrap();
        t.2.reverse();
    });
    let err = Lora::open(&bad, &shapes, &dir).unwrap_err().to_string();
    for key in [
        "0.lora_middle",
        "41.lora_up",
        "41.lora_down",
        "2.lora_down",
        "0.lora_up",
    ] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
    assert!(!err.contains("3.lora_"), "a good layer was listed: {err}");
}

/// The Canny golden case is matched exactly: the same quantized bytes and edge pixels as
/// the official filter (OpenCV), not merely within a tolerance.
#[test]
fn the_canny_case_matches_bit_for_bit() {
    let case = Case::load(&cases_dir().join("canny_filter.safetensors")).unwrap();
    let backend = Backend::open(BackendKind::Cpu).unwrap();
    for c in run_case(&case, &backend).unwrap() {
        assert_eq!(c.error, 0.0, "{} differs by {}", c.output, c.error);
    }
}

/// The learned-token case checks each part of the official path: a new token's starting
/// row (the mean of its aggregation rows), the grown tokenizer (a prompt the ids were not
/// made from is an error), and the table (a row it reads that is not stored is NaN).
#[test]
fn the_retoken_case_fails_when_any_part_of_the_learned_tokens_differs() {
    let load = || Case::load(&cases_dir().join("clip_text_retoken.safetensors")).unwrap();
    let backend = Backend::open(BackendKind::Cpu).unwrap();
    let fails = |case: &Case| {
        run_case(case, &backend)
            .unwrap()
            .iter()
            .any(|c| !c.passed())
    };
    assert!(!fails(&load()));

    let mut case = load();
    let zeros = r#"[["[roubaobao]", null], ["<sks>", null], ["^dog", null]]"#;
    case.metadata.insert("train_tokens".into(), zeros.into());
    assert!(fails(&case), "[roubaobao] starting from zeros, not cat</w>");

    let mut case = load();
    let mut prompts: Vec<String> = serde_json::from_str(&case.metadata["prompts"]).unwrap();
    prompts[0] = prompts[0].replace("[roubaobao]", "[roubao]");
    let prompts = serde_json::to_string(&prompts).unwrap();
    case.metadata.insert("prompts".into(), prompts);
    let err = run_case(&case, &backend).err().unwrap().to_string();
    assert!(err.contains("other ids"), "{err}");

    // The stored `cat</w>` row (2368) moved to row 0 ("!"), which no prompt uses.
    let mut case = load();
    let ids = case.inputs.get_mut("token_embedding_ids").unwrap();
    let at = ids.data.iter().position(|&v| v == 2368.0).unwrap();
    ids.data[at] = 0.0;
    assert!(fails(&case), "reading a row that is not stored");
}
