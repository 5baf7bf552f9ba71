//! The command line itself: every help text reads as written.

use clap::CommandFactory;
use ultrapixel::cli::Cli;

/// Text with every run of whitespace made one space.
fn squeeze(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Item 8 of issue 18: clap turns a literal `{n}` in a help text into a line break, so the
/// `--out` help lost its `{n}` placeholder. Every argument's and command's help must appear
/// in the rendered help exactly as written.
#[test]
fn every_help_text_renders_as_written() {
    fn check(cmd: &mut clap::Command, path: &str, problems: &mut Vec<String>) {
        cmd.build();
        let short = squeeze(&cmd.render_help().to_string());
        let long = squeeze(&cmd.render_long_help().to_string());
        for arg in cmd.get_arguments() {
            for (help, rendered) in [(arg.get_help(), &short), (arg.get_long_help(), &long)] {
                let Some(help) = help else { continue };
                let text = squeeze(&help.to_string());
                if !rendered.contains(&text) {
                    problems.push(format!("{path} --{}: {text:?}", arg.get_id()));
                }
            }
        }
        let names: Vec<String> = cmd
            .get_subcommands()
            .map(|s| s.get_name().to_string())
            .collect();
        for sub in cmd.get_subcommands() {
            if let Some(about) = sub.get_about() {
                let text = squeeze(&about.to_string());
                if !short.contains(&text) {
                    problems.push(format!("{path} {}: {text:?}", sub.get_name()));
                }
            }
        }
        for name in names {
            let sub = cmd.find_subcommand_mut(&name).unwrap();
            check(sub, &format!("{path} {name}"), problems);
        }
    }
    let mut problems = Vec::new();
    check(&mut Cli::command(), "ultrapixel", &mut problems);
    assert!(
        problems.is_empty(),
        "help texts rendered differently:\n{}",
        problems.join("\n")
    );
    // The placeholder itself, as a user sees it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ultrapixel"))
        .args(["generate", "--help"])
        .output()
        .unwrap();
    let text = squeeze(&String::from_utf8_lossy(&out.stdout));
    assert!(
        text.contains("{seed} and {n} (index in the batch)"),
        "{text}"
    );
}

/// Item 7 of issue 18: every command's failures exit as the README's table says (0 success,
/// 1 a failure while running, 2 bad input or a refusal before any work). `download`'s own
/// codes are checked against a mock hub in `tests/hub.rs`, Ctrl-C (130) in `tests/faults.rs`.
#[test]
fn every_command_exits_as_the_readme_table_says() {
    let empty = tempfile::tempdir().unwrap();
    let cache = empty.path().to_str().unwrap();
    let case = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cases"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .unwrap();
    let case = case.to_str().unwrap();
    let mut cases: Vec<(Vec<&str>, i32)> = vec![
        (vec!["--version"], 0),
        (vec![], 2),
        (vec!["no-such-command"], 2),
        (vec!["generate", "", "--backend", "cpu"], 2),
        (
            vec!["generate", "x", "--size", "100x100", "--backend", "cpu"],
            2,
        ),
        (
            vec!["generate", "x", "--backend", "cpu", "--out", "x.jpg"],
            2,
        ),
        // Offline with the model files missing: refused, nothing fetched.
        (vec!["generate", "x", "--backend", "cpu"], 2),
        (vec!["meta", "/nonexistent/x.png"], 2),
        (
            vec![
                "convert",
                "/nonexistent/x.ckpt",
                "/nonexistent/y.safetensors",
            ],
            2,
        ),
        (vec!["validate", "/nonexistent/case.safetensors"], 2),
        (vec!["make-tiny-model", "/proc/no-such-dir/tiny"], 2),
        (
            vec!["info", "--size", "512x512", "--model-dir", "/nonexistent"],
            2,
        ),
    ];
    // Without a GPU: a refusal before any work, as `generate --backend cuda` already did.
    if !ultrapixel::runtime::cuda::driver_present() {
        cases.push((vec!["bench", "--filter", "no-such-kernel"], 2));
        cases.push((vec!["validate", "--backend", "cuda", case], 2));
    }
    let mut wrong = Vec::new();
    for (args, expected) in &cases {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_ultrapixel"))
            .args(args)
            .current_dir(empty.path())
            .env("HF_HUB_CACHE", cache)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        if o.status.code() != Some(*expected) {
            wrong.push(format!(
                "{args:?}: exit {:?}, expected {expected}: {}",
                o.status.code(),
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// `info --size` lists the work per image by stage and op kind, most bytes first: the
/// transposed convs with their tensor-core FLOPs, and no reshape (a view moves nothing).
#[test]
fn info_lists_the_work_per_op() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ultrapixel"))
        .args(["info", "--size", "1024x1536", "--backend", "hostsim"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let section: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("work per image by op"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    let rows: Vec<(String, String, f64, f64)> = section
        .iter()
        .filter(|l| l.ends_with(" runs"))
        .map(|l| {
            let (stage, rest) = l.split_at(13);
            let f: Vec<&str> = rest.split_whitespace().collect();
            (
                stage.trim().into(),
                f[0].into(),
                f[1].parse().unwrap(),
                f[3].parse().unwrap(),
            )
        })
        .collect();
    assert!(rows.len() > 10, "{text}");
    assert!(rows.windows(2).all(|w| w[0].3 >= w[1].3), "{text}");
    for stage in ["stage A", "stage B"] {
        let up = rows
            .iter()
            .find(|r| r.0 == stage && r.1 == "conv_transpose2d");
        assert!(up.is_some_and(|r| r.2 > 0.0), "{stage}:\n{text}");
    }
    assert!(!rows.iter().any(|r| r.1 == "reshape"), "{text}");
    assert!(
        section.last().unwrap().contains("smaller op kinds"),
        "{text}"
    );
}

/// `info --size` names the kernel each GEMM and attention op of a generation runs under
/// `UPX_KERNELS` on the chosen backend: on the emulator, forced sm_90a puts every op of the
/// released model on the sm_90a kernels (each shape qualifies; the GEMMs by tile width), the
/// default on the portable ones (the emulator's sessions use no tuning table), and the
/// committed H200 table given with `--tuning-table` its GEMMs on its winners (cuBLASLt for
/// every shape it measured); the executions per image are the same every way.
#[test]
fn info_names_the_kernel_of_every_gemm_and_attention_op() {
    let table = concat!(env!("CARGO_MANIFEST_DIR"), "/tuning/nvidia-h200.json");
    let run_with = |kernels: &str, extra: &[&str]| -> String {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ultrapixel"))
            .args(["info", "--size", "1024x1024", "--backend", "hostsim"])
            .args(extra)
            .env("UPX_KERNELS", kernels)
            .env_remove("UPX_TUNING")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let run = |kernels: &str| run_with(kernels, &[]);
    let line = |text: &str, op: &str| -> String {
        text.lines()
            .find(|l| l.trim_start().starts_with(&format!("{op}: ")))
            .unwrap_or_else(|| panic!("no {op} line:\n{text}"))
            .to_string()
    };
    // The executions per image on one implementation, from "gemm: 12 cublaslt, 120 sm90a
    // (n128: 40, n256: 80), 8 portable …" (0 where the line has no such count).
    let count = |text: &str, op: &str, kind: &str| -> usize {
        let line = line(text, op);
        let w: Vec<&str> = line.split_whitespace().collect();
        w.iter()
            .position(|&x| x.trim_end_matches(',') == kind)
            .map_or(0, |at| w[at - 1].parse().unwrap())
    };
    // Per op family: (sm_90a, portable) executions per image.
    let counts = |text: &str, op: &str| (count(text, op, "sm90a"), count(text, op, "portable"));
    // The sm_90a executions by kernel variant (the GEMM's tile width): (variant, count).
    let variants = |text: &str, op: &str| -> Vec<(String, usize)> {
        let line = line(text, op);
        let Some((_, rest)) = line.split_once(" sm90a (") else {
            return Vec::new();
        };
        let inside = rest.split_once(')').unwrap().0;
        inside
            .split(", ")
            .map(|v| {
                let (name, n) = v.split_once(": ").unwrap();
                (name.to_string(), n.parse().unwrap())
            })
            .collect()
    };
    let (forced, portable) = (run("sm90a"), run("portable"));
    for (text, kernels) in [(&forced, "sm90a"), (&portable, "portable")] {
        assert!(
            text.contains(&format!(
                "GEMM and attention kernels per image (UPX_KERNELS={kernels} on the emulator)"
            )),
            "{text}"
        );
    }
    let auto = run("auto");
    assert!(
        auto.contains("tuning: none (the emulator's sessions use no tuning table"),
        "{auto}"
    );
    let tuned = run_with("auto", &["--tuning-table", table]);
    assert!(
        tuned.contains(&format!("  tuning: tuning table {table} (")),
        "{tuned}"
    );
    // The launches follow the table too: a cuBLASLt call replaces a GEMM launch, and the
    // GEMMs whose epilogue (GELU, FiLM, ...) cuBLASLt cannot fuse add our epilogue pass.
    let per_image = |text: &str| -> usize {
        let at = text.find(" launches\n").unwrap();
        text[..at].rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(per_image(&tuned) > per_image(&auto), "{tuned}\n{auto}");
    for op in ["gemm", "attention"] {
        let (hopper, rest) = counts(&forced, op);
        assert!(hopper > 0 && rest == 0, "{forced}");
        assert_eq!(counts(&portable, op), (0, hopper), "{portable}");
        assert_eq!(counts(&auto, op), (0, hopper), "{auto}");
        // The committed table: cuBLASLt wins every GEMM, our portable kernel every attention.
        let vendor = count(&tuned, op, "cublaslt");
        let want = match op {
            "gemm" => (hopper, (0, 0)),
            _ => (0, (0, hopper)),
        };
        assert_eq!((vendor, counts(&tuned, op)), want, "{tuned}");
        assert!(count(&forced, op, "cublaslt") == 0, "{forced}");
        let by_variant = variants(&forced, op);
        assert_eq!(by_variant.iter().map(|v| v.1).sum::<usize>(), hopper);
        assert!(variants(&portable, op).is_empty(), "{portable}");
        if op == "gemm" {
            // The GEMMs' tile widths, named as the kernels are.
            assert!(
                by_variant
                    .iter()
                    .all(|(w, _)| ["n64", "n128", "n256"].contains(&w.as_str())),
                "{forced}"
            );
        }
    }
    // The memory a server needs to keep its sessions: at least the resident peak.
    let mib_before = |text: &str, marker: &str| -> u64 {
        let at = text
            .find(marker)
            .unwrap_or_else(|| panic!("no {marker:?}:\n{text}"));
        let words: Vec<&str> = text[..at].split_whitespace().collect();
        words[words.len() - 1].parse().unwrap()
    };
    let resident = mib_before(&portable, " MiB with them kept");
    let kept = mib_before(&portable, " MiB (placed once");
    assert!(kept > resident, "{portable}");
}
