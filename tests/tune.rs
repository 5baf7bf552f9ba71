//! The tuning table at run time (loading, staleness, fallback with a reason, the winner a GEMM
//! node gets) with synthetic tables, and the tuner itself on the host emulator.

use std::path::Path;
use ultrapixel::ops::gemm_sm90a::TileWidth;
use ultrapixel::runtime::cuda::cublaslt::AlgoRecord;
use ultrapixel::runtime::graph::{OpImpl, Role, TensorDesc};
use ultrapixel::tensor::DType;
use ultrapixel::tune::table::{
    kernels_hash, AttentionEntry, Candidate, GemmChoice, GemmEntry, LtChoice, OurConfig, Table,
    TableKey, Use, EMBEDDED, FORMAT,
};
use ultrapixel::tune::table::{sm90a_candidate, OURS_SM90A};
use ultrapixel::tune::{AttentionDims, Epilogue, GemmKey, Selection};

fn key() -> TableKey {
    TableKey {
        device_name: "NVIDIA H200".into(),
        compute_capability: "9.0".into(),
        driver_version: 13000,
        cublaslt_version: Some(130002),
        kernels_hash: kernels_hash(),
    }
}

fn candidate(name: &str, kind: &str, seconds: f64) -> Candidate {
    Candidate {
        name: name.into(),
        kind: kind.into(),
        config: None,
        cublaslt: None,
        status: "ok".into(),
        detail: None,
        seconds: Some(seconds),
        tflops: Some(1.0),
        max_err: Some(0.0),
        limit: Some(1e-2),
    }
}

fn ours() -> Candidate {
    let mut c = candidate("ours/128x128x32s3", "ours", 2e-3);
    c.config = Some(OurConfig {
        name: "128x128x32s3".into(),
        tile: [128, 128, 32],
        stages: 3,
        mma: "mma.sync".into(),
    });
    c
}

fn lt(name: &str, seconds: f64) -> Candidate {
    let mut c = candidate(name, "cublaslt+epilogue", seconds);
    c.cublaslt = Some(LtChoice {
        product: "f32".into(),
        epilogue: "default".into(),
        residual_as_c: false,
        scale_a: false,
        epilogue_pass: true,
        algo: AlgoRecord {
            bytes: "ab".repeat(64),
            id: 21,
            tile_id: 20,
            stages_id: 8,
            splitk: 1,
            reduction_scheme: 0,
            cta_swizzling: 1,
            custom_option: 0,
            inner_shape_id: 0,
            cluster_shape_id: 0,
            workspace_bytes: 0,
            waves: 1.5,
        },
    });
    c
}

const GELU: GemmKey = GemmKey {
    m: 18432,
    n: 5120,
    k: 1280,
    samples: 2,
    epilogue: Epilogue {
        bias: true,
        gelu: true,
        residual: false,
        film: false,
        grn_stats: true,
        scaled_a: false,
    },
    out: DType::BF16,
};

const PLAIN: GemmKey = GemmKey {
    m: 4096,
    n: 1280,
    k: 1280,
    samples: 1,
    epilogue: Epilogue {
        bias: true,
        gelu: false,
        residual: false,
        film: false,
        grn_stats: false,
        scaled_a: false,
    },
    out: DType::F32,
};

fn entry(k: GemmKey, candidates: Vec<Candidate>, winner: &str) -> GemmEntry {
    GemmEntry {
        m: k.m,
        n: k.n,
        k: k.k,
        samples: k.samples,
        epilogue: k.epilogue.name(),
        out_dtype: k.out.suffix().into(),
        uses: vec![Use {
            size: "4096x4096".into(),
            per_image: 40,
            example: "stage C high-res step: gemm#3".into(),
        }],
        candidates,
        winner: winner.into(),
    }
}

/// Two GEMMs (cuBLASLt + our epilogue wins one, ours the other) and one attention.
fn table(key: TableKey) -> Table {
    Table {
        format: FORMAT,
        key,
        created: "2026-01-01T00:00:00Z".into(),
        sizes: vec!["4096x4096".into()],
        gemm: vec![
            entry(
                GELU,
                vec![ours(), lt("cublaslt/f32/0", 1.5e-3)],
                "cublaslt/f32/0",
            ),
            entry(
                PLAIN,
                vec![ours(), lt("cublaslt/f32/0", 3e-3)],
                "ours/128x128x32s3",
            ),
        ],
        attention: vec![AttentionEntry {
            dims: AttentionDims {
                batch: 2,
                queries: 9216,
                extra: 85,
                heads: 32,
                head_dim: 64,
                causal: false,
                key_mask: false,
            },
            // As tables written before the output dtype was recorded: matches either.
            out_dtype: None,
            uses: vec![],
            candidates: vec![candidate("ours/flash", "ours", 1e-3)],
            winner: "ours/flash".into(),
        }],
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn built_in_reason(s: &Selection) -> &str {
    match s {
        Selection::BuiltIn { reason } => reason,
        Selection::Table { source, .. } => panic!("expected the built-in rules, got {source}"),
    }
}

#[test]
fn a_matching_table_is_loaded_and_its_winners_picked_per_shape() {
    let dir = tempfile::tempdir().unwrap();
    let t = table(key());
    write(dir.path(), "nvidia-h200.json", &t.to_json());
    let s = Selection::load_from(Some(dir.path()), &[], &key());
    match &s {
        Selection::Table { table, source } => {
            assert_eq!(**table, t);
            assert!(source.ends_with("nvidia-h200.json"), "{source}");
        }
        Selection::BuiltIn { reason } => panic!("{reason}"),
    }
    assert!(
        s.describe().contains("2 GEMM and 1 attention shapes"),
        "{}",
        s.describe()
    );
    match s.gemm(&GELU) {
        Some(GemmChoice::CublasLt(c)) => {
            assert_eq!(c.algo.bytes, "ab".repeat(64));
            assert!(c.epilogue_pass && c.product == "f32");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(s.gemm(&PLAIN), Some(GemmChoice::Ours(c)) if c.tile == [128, 128, 32]));
    // A shape the table lacks (another epilogue of the same M, N, K) gets no choice: the
    // built-in rule (our kernel).
    let other = GemmKey {
        epilogue: Epilogue::default(),
        ..PLAIN
    };
    assert_eq!(s.gemm(&other), None);
}

/// A GEMM node with the key's shape: A `[samples, rows, K]`, W, the bias, the residual, the
/// scaling's modulation, as the op takes them.
fn gemm_node(k: &GemmKey) -> (std::sync::Arc<dyn OpImpl>, Vec<TensorDesc>) {
    use ultrapixel::ops::gemm::{Gemm, GemmGrnStats, GemmScaledA};
    let e = k.epilogue;
    let gemm = Gemm {
        bias: e.bias,
        gelu: e.gelu,
        residual: e.residual,
        out: k.out,
    };
    let desc = |name: &str, shape: Vec<usize>, dtype| TensorDesc {
        name: name.into(),
        shape,
        dtype,
        role: Role::Input,
    };
    let mut inputs = vec![
        desc("a", vec![k.samples, k.m / k.samples, k.k], DType::BF16),
        desc("w", vec![k.n, k.k], DType::BF16),
    ];
    if e.bias {
        inputs.push(desc("bias", vec![k.n], DType::F32));
    }
    if e.residual {
        inputs.push(desc("r", vec![k.samples, k.m / k.samples, k.n], k.out));
    }
    let op: std::sync::Arc<dyn OpImpl> = if e.scaled_a {
        inputs.push(desc("ab", vec![k.samples, 2 * k.k], DType::F32));
        std::sync::Arc::new(GemmScaledA { gemm, k: 1.0 })
    } else if e.grn_stats {
        std::sync::Arc::new(GemmGrnStats { gemm })
    } else {
        std::sync::Arc::new(gemm)
    };
    assert_eq!(
        ultrapixel::tune::gemm_key(op.as_ref(), &inputs.iter().collect::<Vec<_>>()),
        Some(*k)
    );
    (op, inputs)
}

/// The attention of [`table`]'s entry (which has no output dtype: either matches).
fn attention_node(out: DType) -> (std::sync::Arc<dyn OpImpl>, Vec<TensorDesc>) {
    let op = ultrapixel::ops::attention::Attention {
        heads: 32,
        causal: false,
        extra_kv: true,
        key_mask: false,
        out,
    };
    let desc = |name: &str, shape: Vec<usize>| TensorDesc {
        name: name.into(),
        shape,
        dtype: DType::BF16,
        role: Role::Input,
    };
    let inputs = vec![
        desc("qkv", vec![2, 9216, 3 * 2048]),
        desc("kv", vec![2, 85, 2 * 2048]),
    ];
    (std::sync::Arc::new(op), inputs)
}

/// [`table`] with our Hopper GEMM winning two more GEMMs (returned: one that scales A, in
/// tile width 64; one in width 256) and our Hopper attention winning the attention.
fn mixed_table() -> (Table, [GemmKey; 2]) {
    let scaled = GemmKey {
        m: 2 * 300,
        n: 640,
        k: 1280,
        samples: 2,
        epilogue: Epilogue::parse("bias+residual+scaled_a").unwrap(),
        out: DType::F32,
    };
    let hopper_plain = GemmKey {
        epilogue: Epilogue::parse("bias+gelu").unwrap(),
        ..PLAIN
    };
    let mut t = table(key());
    let widths = |win: TileWidth| {
        let mut cs = vec![ours()];
        cs.extend(TileWidth::ALL.map(|w| sm90a(w, if w == win { 1e-3 } else { 1.5e-3 })));
        cs
    };
    t.gemm.push(entry(
        scaled,
        widths(TileWidth::N64),
        &sm90a_candidate(TileWidth::N64),
    ));
    t.gemm.push(entry(
        hopper_plain,
        widths(TileWidth::N256),
        &sm90a_candidate(TileWidth::N256),
    ));
    t.attention[0]
        .candidates
        .push(candidate("ours/sm90a", "ours-sm90a", 5e-4));
    t.attention[0].winner = "ours/sm90a".into();
    (t, [scaled, hopper_plain])
}

/// Our Hopper GEMM's candidate in tile width `width`, as the tuner records it.
fn sm90a(width: TileWidth, seconds: f64) -> Candidate {
    let mut c = candidate(&sm90a_candidate(width), OURS_SM90A, seconds);
    c.config = Some(OurConfig::sm90a(width));
    c
}

/// The dispatch decision per node under each `UPX_KERNELS` value, on a synthetic table where
/// cuBLASLt wins one GEMM, our Hopper GEMM two (one that scales A) and ours one, and our
/// Hopper attention wins the attention: `auto` follows each winner, the forced choices keep
/// their family (forced `sm90a` takes a Hopper GEMM winner's tile width), and shapes the table
/// lacks, a stale table and no table give the op's own launches.
#[test]
fn the_dispatch_follows_the_table_under_auto_and_forced_choices_keep_their_family() {
    use ultrapixel::runtime::kernel_choice::KernelChoice;
    use ultrapixel::tune::dispatch::{decide, sm90a_layout, Decision, Sm90aGemm};
    let (t, [scaled, hopper_plain]) = mixed_table();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "nvidia-h200.json", &t.to_json());
    let fresh = Selection::load_from(Some(dir.path()), &[], &key());
    assert!(fresh.table().is_some(), "{}", fresh.describe());
    let stale = Selection::load_from(
        Some(dir.path()),
        &[],
        &TableKey {
            driver_version: 12080,
            ..key()
        },
    );
    let none = Selection::load_from(None, &[], &key());
    assert!(stale.table().is_none() && none.table().is_none());

    let lacking = GemmKey {
        epilogue: Epilogue::default(),
        ..PLAIN
    };
    let nodes = [
        gemm_node(&GELU),
        gemm_node(&PLAIN),
        gemm_node(&scaled),
        gemm_node(&hopper_plain),
        gemm_node(&lacking),
        attention_node(DType::BF16),
        attention_node(DType::F32),
    ];
    let decisions = |choice, selection: &Selection| -> Vec<Decision> {
        nodes
            .iter()
            .map(|(op, inputs)| {
                decide(
                    choice,
                    selection,
                    op.as_ref(),
                    &inputs.iter().collect::<Vec<_>>(),
                )
            })
            .collect()
    };
    let auto = decisions(KernelChoice::Auto, &fresh);
    match &auto[0] {
        Decision::CublasLt(k, c) => assert!(*k == GELU && c.algo.bytes == "ab".repeat(64)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        auto[1..],
        [
            Decision::Own,
            Decision::Sm90a(Some(Sm90aGemm {
                key: scaled,
                width: TileWidth::N64
            })),
            Decision::Sm90a(Some(Sm90aGemm {
                key: hopper_plain,
                width: TileWidth::N256
            })),
            Decision::Own,
            Decision::Sm90a(None),
            Decision::Sm90a(None),
        ]
    );
    // The scaled A of the Hopper GEMM lives in the node's scratch; other GEMMs need none.
    let l = sm90a_layout(&scaled);
    assert_eq!((l.scaled_a, l.product), (Some(0), None));
    assert_eq!(l.bytes, 600 * 1280 * 2);
    assert_eq!(sm90a_layout(&hopper_plain).bytes, 0);
    assert!(decisions(KernelChoice::Portable, &fresh)
        .iter()
        .all(|d| *d == Decision::Own));
    // Forced sm90a: the op's own launches, the Hopper GEMM winners in their widths.
    let forced = decisions(KernelChoice::Sm90a, &fresh);
    assert_eq!(
        forced[..5],
        [
            Decision::Own,
            Decision::Own,
            Decision::OwnInWidth(TileWidth::N64),
            Decision::OwnInWidth(TileWidth::N256),
            Decision::Own,
        ]
    );
    assert!(forced[5..].iter().all(|d| *d == Decision::Own));
    for selection in [&stale, &none] {
        for choice in [
            KernelChoice::Auto,
            KernelChoice::Portable,
            KernelChoice::Sm90a,
        ] {
            assert!(
                decisions(choice, selection)
                    .iter()
                    .all(|d| *d == Decision::Own),
                "{choice:?} {}",
                selection.describe()
            );
        }
    }
    // `table` as the GPU's table, and what it makes of node `i`.
    let load = |table: &Table, i: usize| {
        write(dir.path(), "nvidia-h200.json", &table.to_json());
        let selection = Selection::load_from(Some(dir.path()), &[], &key());
        let (op, inputs) = &nodes[i];
        let inputs: Vec<&TensorDesc> = inputs.iter().collect();
        let decision = decide(KernelChoice::Auto, &selection, op.as_ref(), &inputs);
        (selection, decision)
    };
    // An entry that does not fit its node is refused, with the reason.
    let mut bad = t.clone();
    bad.gemm[0].candidates[1].cublaslt.as_mut().unwrap().scale_a = true;
    match load(&bad, 0).1 {
        Decision::Unfit(why) => assert!(why.contains("operand scaling"), "{why}"),
        other => panic!("{other:?}"),
    }
    // So is a Hopper winner whose name records no tile width of this build (a stale or
    // hand-edited entry): the op's own launches, not a panic.
    for name in [
        "ours-sm90a/128x96x64s4",
        "ours-sm90a/128x128x64s3",
        "ours-sm90a",
    ] {
        let mut bad = t.clone();
        let e = &mut bad.gemm[3];
        e.candidates[3].name = name.into();
        e.winner = name.into();
        let (selection, decision) = load(&bad, 3);
        assert_eq!(
            selection.gemm(&hopper_plain),
            Some(GemmChoice::OursSm90a(None))
        );
        match decision {
            Decision::Unfit(why) => assert!(why.contains("no tile width"), "{name}: {why}"),
            other => panic!("{name}: {other:?}"),
        }
    }
}

/// `info`'s census goes through the dispatch's decision: under `auto` with [`mixed_table`]
/// matched, each GEMM runs its winner (cuBLASLt, our Hopper GEMM in the
/// winner's width, our portable GEMM; a shape the table lacks the portable one) and the
/// attention our Hopper kernel, counted per run; a stale table, no table and a forced
/// `portable` put every op on the portable kernels.
#[test]
fn the_kernel_census_counts_the_table_winners_per_family() {
    use ultrapixel::runtime::graph::Graph;
    use ultrapixel::runtime::kernel_choice::{KernelCensus, KernelChoice, KernelTarget};
    use ultrapixel::tune::dispatch::Dispatch;
    let (t, [scaled, hopper_plain]) = mixed_table();
    let lacking = GemmKey {
        epilogue: Epilogue::default(),
        ..PLAIN
    };
    let mut g = Graph::new();
    let nodes = [
        gemm_node(&GELU),
        gemm_node(&PLAIN),
        gemm_node(&scaled),
        gemm_node(&hopper_plain),
        gemm_node(&lacking),
        attention_node(DType::BF16),
    ];
    for (i, (op, inputs)) in nodes.into_iter().enumerate() {
        let ids: Vec<_> = inputs
            .iter()
            .map(|d| {
                g.input(&format!("{}{i}", d.name), &d.shape, d.dtype)
                    .unwrap()
            })
            .collect();
        let y = g.op_shared(op, &ids).unwrap()[0];
        g.output(y, &format!("y{i}")).unwrap();
    }
    // The emulator builds every kernel, the Hopper ones included (their tensor maps without
    // a driver), as `info` lists them without a GPU.
    let target = KernelTarget::hostsim();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "nvidia-h200.json", &t.to_json());
    let stale_key = TableKey {
        kernels_hash: "0".repeat(16),
        ..key()
    };
    let runs = 3;
    let census = |key: &TableKey, choice| {
        let selection = Selection::load_from(Some(dir.path()), &[], key);
        let dispatch = Dispatch::with(selection);
        let mut c = KernelCensus::default();
        c.add(&g, target.with_choice(choice), Some(&dispatch), runs)
            .unwrap();
        c
    };
    let auto = census(&key(), KernelChoice::Auto);
    let (gemm, attention) = (&auto.ops["gemm"], &auto.ops["attention"]);
    assert_eq!((gemm.vendor, gemm.sm90a, gemm.portable), (3, 6, 6));
    assert_eq!(
        gemm.sm90a_variants,
        [("n64".to_string(), 3), ("n256".to_string(), 3)].into()
    );
    assert_eq!(
        (attention.vendor, attention.sm90a, attention.portable),
        (0, 3, 0)
    );
    assert!(
        auto.ops.values().all(|k| k.fallbacks.is_empty()),
        "{auto:?}"
    );
    assert_eq!(
        auto.lines(),
        [
            "attention: 3 sm90a (d64: 3), 0 portable",
            "gemm: 3 cublaslt, 6 sm90a (n64: 3, n256: 3), 6 portable",
        ]
    );
    let all_portable = |c: &KernelCensus| {
        c.ops["gemm"].portable == 15
            && c.ops["attention"].portable == 3
            && c.ops.values().all(|k| k.vendor + k.sm90a == 0)
    };
    for (key, choice) in [
        (&stale_key, KernelChoice::Auto),
        (&key(), KernelChoice::Portable),
    ] {
        let c = census(key, choice);
        assert!(all_portable(&c), "{choice:?}: {c:?}");
    }
    let mut none = KernelCensus::default();
    none.add(&g, target.with_choice(KernelChoice::Auto), None, runs)
        .unwrap();
    assert!(all_portable(&none), "{none:?}");
    // A table file given as is (`info --tuning-table`): used when its kernels are this
    // build's, whatever device it names.
    let given = |t: &Table| {
        let path = dir.path().join("given.json");
        write(dir.path(), "given.json", &t.to_json());
        Selection::load_file(&path)
    };
    let mut elsewhere = t.clone();
    elsewhere.key.device_name = "some other GPU".into();
    assert_eq!(given(&elsewhere).table(), Some(&elsewhere));
    elsewhere.key.kernels_hash = stale_key.kernels_hash.clone();
    let stale = given(&elsewhere);
    assert!(
        built_in_reason(&stale).contains("kernels_hash"),
        "{stale:?}"
    );
}

/// A GEMM node whose table winner is our Hopper GEMM in each tile width launches that
/// width's kernel, as the dispatch builds it under `auto` and under a forced `sm90a` (a GEMM
/// that scales A: after its scaling pass); without an entry, the forced Hopper kernel takes
/// the launcher's modelled width.
#[test]
fn a_hopper_winner_runs_in_its_measured_tile_width() {
    use ultrapixel::runtime::device::dry_launches_for;
    use ultrapixel::runtime::graph::{DevTensor, Graph, LaunchIo};
    use ultrapixel::runtime::kernel_choice::{KernelChoice, KernelTarget};
    use ultrapixel::runtime::launch::Entry;
    use ultrapixel::tune::dispatch::{
        decide, own_entries_in_width, sm90a_entries, sm90a_layout, Decision,
    };
    // N = 200: 4, 2 or 1 column tiles, no width dominated; odd M.
    let keys = [
        ("bias+gelu", 1, DType::BF16),
        ("bias+residual+scaled_a", 3, DType::F32),
    ]
    .map(|(e, samples, out)| GemmKey {
        m: samples * 101,
        n: 200,
        k: 72,
        samples,
        epilogue: Epilogue::parse(e).unwrap(),
        out,
    });
    let hostsim = KernelTarget::hostsim();
    for k in keys {
        let (op, inputs) = gemm_node(&k);
        let descs: Vec<&TensorDesc> = inputs.iter().collect();
        let out_desc = TensorDesc {
            name: "y".into(),
            shape: op.infer(&descs).unwrap()[0].0.clone(),
            dtype: k.out,
            role: Role::Activation,
        };
        let kernel = |w: TileWidth| format!("gemm_sm90a_n{}_bf16_{}", w.columns(), k.out.suffix());
        for win in TileWidth::ALL {
            let mut t = table(key());
            let mut cs = vec![ours()];
            cs.extend(TileWidth::ALL.map(|w| sm90a(w, if w == win { 1e-4 } else { 2e-4 })));
            t.gemm.push(entry(k, cs, &sm90a_candidate(win)));
            let s = Selection::Table {
                table: Box::new(t),
                source: "test".into(),
            };
            let Decision::Sm90a(Some(g)) = decide(KernelChoice::Auto, &s, op.as_ref(), &descs)
            else {
                panic!("{}: not the Hopper GEMM", k.describe());
            };
            assert_eq!((g.key, g.width), (k, win));
            let io = |choice| LaunchIo {
                inputs: inputs
                    .iter()
                    .enumerate()
                    .map(|(i, desc)| DevTensor {
                        ptr: 0x1000_0000 * (i as u64 + 1),
                        desc,
                    })
                    .collect(),
                outputs: vec![DevTensor {
                    ptr: 0x9000_0000,
                    desc: &out_desc,
                }],
                workspace: 0xa000_0000,
                target: hostsim.with_choice(choice),
            };
            let scratch = if sm90a_layout(&k).bytes > 0 {
                0xb000_0000
            } else {
                0
            };
            let auto = sm90a_entries(op.as_ref(), Some(&g), &io(KernelChoice::Auto), scratch)
                .unwrap()
                .unwrap();
            // Forced sm90a: the op's own launches (its workspace), in the winner's width.
            assert_eq!(
                decide(KernelChoice::Sm90a, &s, op.as_ref(), &descs),
                Decision::OwnInWidth(win)
            );
            let forced = own_entries_in_width(op.as_ref(), win, &io(KernelChoice::Sm90a)).unwrap();
            for entries in [auto, forced] {
                let names: Vec<&str> = entries
                    .iter()
                    .filter_map(|e| match e {
                        Entry::Kernel(l) => Some(l.kernel.name()),
                        _ => None,
                    })
                    .collect();
                // The scaling pass first where the op scales A, then the GEMM.
                let gemm = kernel(win);
                assert_eq!(names.last(), Some(&gemm.as_str()), "{}", k.describe());
                assert_eq!(names.len(), 1 + k.epilogue.scaled_a as usize, "{names:?}");
            }
        }
        // No table entry: the forced Hopper kernel in the modelled width.
        let mut g = Graph::new();
        let ids: Vec<_> = inputs
            .iter()
            .map(|d| g.input(&d.name, &d.shape, d.dtype).unwrap())
            .collect();
        let y = g.op_shared(op.clone(), &ids).unwrap()[0];
        g.output(y, "y").unwrap();
        let modelled = TileWidth::for_shape(k.m, k.n, hostsim.sms);
        let names: Vec<String> = dry_launches_for(&g, hostsim.with_choice(KernelChoice::Sm90a))
            .unwrap()
            .iter()
            .map(|l| l.kernel.name().to_string())
            .filter(|n| n.starts_with(ultrapixel::ops::gemm_sm90a::KERNEL_PREFIX))
            .collect();
        assert_eq!(names, [kernel(modelled)], "{}", k.describe());
    }
}

/// A table of the format this build writes, with an sm_90a winner and an attention output
/// dtype, still loads; so does an attention entry without the dtype (older tables), matching
/// only its own shape.
#[test]
fn new_candidate_kinds_and_old_entries_load() {
    use ultrapixel::tune::{AttentionChoice, AttentionKey};
    let mut t = table(key());
    t.gemm[1].candidates.push(sm90a(TileWidth::N128, 1e-3));
    t.gemm[1].winner = sm90a_candidate(TileWidth::N128);
    let mut with_dtype = t.attention[0].clone();
    with_dtype.dims.queries = 4096;
    with_dtype.out_dtype = Some("f32".into());
    with_dtype.candidates = vec![candidate("ours/sm90a", "ours-sm90a", 1e-4)];
    with_dtype.winner = "ours/sm90a".into();
    t.attention.push(with_dtype);
    let text = t.to_json();
    assert!(!text.contains("\"out_dtype\": null"), "absent, not null");
    let back = Table::parse(&text).unwrap();
    assert_eq!(back, t);
    assert_eq!(
        back.gemm[1].choice(),
        Some(GemmChoice::OursSm90a(Some(TileWidth::N128)))
    );
    let k = |queries, out| AttentionKey {
        dims: AttentionDims {
            queries,
            ..t.attention[0].dims
        },
        out,
    };
    let s = Selection::Table {
        table: Box::new(back),
        source: "test".into(),
    };
    assert_eq!(
        s.attention(&k(9216, DType::BF16)),
        Some(AttentionChoice::Ours)
    );
    assert_eq!(
        s.attention(&k(9216, DType::F32)),
        Some(AttentionChoice::Ours)
    );
    assert_eq!(
        s.attention(&k(4096, DType::F32)),
        Some(AttentionChoice::OursSm90a)
    );
    assert_eq!(s.attention(&k(4096, DType::BF16)), None);
    assert_eq!(s.attention(&k(4095, DType::F32)), None);
}

#[test]
fn a_table_goes_stale_when_any_key_field_differs() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "nvidia-h200.json", &table(key()).to_json());
    type Edit = (&'static str, fn(&mut TableKey));
    let edits: [Edit; 5] = [
        ("device_name", |k| k.device_name = "NVIDIA  H200".into()),
        ("compute_capability", |k| {
            k.compute_capability = "9.1".into()
        }),
        ("driver_version", |k| k.driver_version = 12080),
        ("cublaslt_version", |k| k.cublaslt_version = None),
        ("kernels_hash", |k| k.kernels_hash = "0".repeat(32)),
    ];
    for (field, edit) in edits {
        let mut now = key();
        edit(&mut now);
        let s = Selection::load_from(Some(dir.path()), &[], &now);
        let reason = built_in_reason(&s);
        assert!(
            reason.starts_with("stale tuning table")
                && reason.contains(&format!("{field} differs")),
            "{field}: {reason}"
        );
        assert!(reason.contains("rerun `ultrapixel tune`"), "{reason}");
        assert!(
            s.describe().starts_with("built-in rules ("),
            "{}",
            s.describe()
        );
        assert_eq!(s.gemm(&GELU), None);
    }
}

#[test]
fn without_a_table_the_built_in_rules_apply_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let s = Selection::load_from(Some(dir.path()), &[], &key());
    let reason = built_in_reason(&s);
    assert!(
        reason.contains("no tuning table nvidia-h200.json in"),
        "{reason}"
    );
    let s = Selection::load_from(None, &[], &key());
    assert!(built_in_reason(&s).contains("UPX_TUNING_DIR"));
    // Another device's table is not this one's.
    write(dir.path(), "nvidia-h100.json", &table(key()).to_json());
    let s = Selection::load_from(Some(dir.path()), &[], &key());
    assert!(built_in_reason(&s).contains("no tuning table nvidia-h200.json"));
}

#[test]
fn a_malformed_or_newer_table_falls_back_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let good = table(key()).to_json();
    let newer = good.replacen(&format!("\"format\": {FORMAT}"), "\"format\": 99", 1);
    let truncated = &good[..good.len() / 2];
    let missing_key = good.replacen("\"key\"", "\"kex\"", 1);
    for (text, expect) in [
        (truncated, "unreadable tuning table"),
        ("[1, 2]", "no format field"),
        (newer.as_str(), "format 99, this build reads format 1"),
        (missing_key.as_str(), "missing field `key`"),
    ] {
        write(dir.path(), "nvidia-h200.json", text);
        let s = Selection::load_from(Some(dir.path()), &[], &key());
        let reason = built_in_reason(&s);
        assert!(reason.contains(expect), "{expect}: {reason}");
        assert!(reason.contains("nvidia-h200.json"), "{reason}");
    }
}

#[test]
fn embedded_tables_are_used_unless_the_directory_has_one() {
    let embedded_text = table(key()).to_json();
    let embedded = [("nvidia-h200.json", embedded_text.as_str())];
    let s = Selection::load_from(None, &embedded, &key());
    match &s {
        Selection::Table { source, .. } => assert_eq!(source, "tuning/nvidia-h200.json (embedded)"),
        Selection::BuiltIn { reason } => panic!("{reason}"),
    }
    // The directory's table wins, even when stale: an explicit override is never silently
    // passed over.
    let dir = tempfile::tempdir().unwrap();
    let mut old = key();
    old.driver_version = 12080;
    write(dir.path(), "nvidia-h200.json", &table(old).to_json());
    let s = Selection::load_from(Some(dir.path()), &embedded, &key());
    assert!(built_in_reason(&s).contains("driver_version differs"));
}

/// Every committed table is embedded, parses, and has a winner that is one of its checked
/// candidates.
#[test]
fn every_committed_table_is_embedded_and_well_formed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".json"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let mut listed: Vec<String> = EMBEDDED.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(
        files, listed,
        "tuning/*.json and tune::table::EMBEDDED differ"
    );
    for (name, text) in EMBEDDED {
        let t = Table::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(*name, t.key.file_name());
        for e in &t.gemm {
            let key = e.key().unwrap_or_else(|| panic!("{name}: {e:?}"));
            // A cuBLASLt winner is one a GEMM node can run as recorded.
            if let Some(GemmChoice::CublasLt(c)) = e.choice() {
                let why = ultrapixel::tune::dispatch::inconsistency(&key, &c);
                assert_eq!(why, None, "{name}: {}", key.describe());
            }
            assert!(
                e.winner.is_empty() || e.candidates.iter().any(|c| c.name == e.winner && c.ok()),
                "{name}: winner {} of {}x{}x{}",
                e.winner,
                e.m,
                e.n,
                e.k
            );
        }
    }
}

/// The committed table reads back as it was written (the attention entries' shape inline,
/// in its order: the JSON round trip gives the same lines, floats to within their last
/// digit, which serde_json's parser may round) and picks what it always picked:
/// cuBLASLt's recorded call on every GEMM, our portable attention on every attention shape of
/// either output dtype (its entries predate the recorded dtype).
#[test]
fn the_committed_table_reads_back_unchanged_with_its_decisions() {
    use ultrapixel::tune::{AttentionChoice, AttentionKey};
    let (name, text) = EMBEDDED[0];
    assert_eq!(name, "nvidia-h200.json");
    let t = Table::parse(text).unwrap();
    let json = t.to_json();
    assert_eq!(json.lines().count(), text.lines().count());
    for (i, (a, b)) in json.lines().zip(text.lines()).enumerate() {
        let float = |l: &str| -> Option<(String, f64)> {
            let (field, v) = l.split_once(": ")?;
            Some((field.into(), v.trim_end_matches(',').parse().ok()?))
        };
        let same = a == b
            || matches!((float(a), float(b)), (Some((fa, x)), Some((fb, y)))
                if fa == fb && (x - y).abs() <= 1e-15 * y.abs());
        assert!(same, "{name} line {}: {a} vs {b}", i + 1);
    }
    let s = Selection::Table {
        table: Box::new(t.clone()),
        source: name.into(),
    };
    assert_eq!((t.gemm.len(), t.attention.len()), (137, 9));
    for e in &t.gemm {
        let winner = e.candidates.iter().find(|c| c.name == e.winner).unwrap();
        let want = GemmChoice::CublasLt(winner.cublaslt.clone().unwrap());
        assert_eq!(s.gemm(&e.key().unwrap()), Some(want), "{}", e.winner);
    }
    for e in &t.attention {
        assert_eq!(
            (e.out_dtype.as_deref(), e.winner.as_str()),
            (None, "ours/flash")
        );
        for out in [DType::BF16, DType::F32] {
            let k = AttentionKey { dims: e.dims, out };
            assert_eq!(s.attention(&k), Some(AttentionChoice::Ours), "{k:?}");
        }
    }
}

fn ultrapixel(args: &[&str]) -> (std::process::Output, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ultrapixel"))
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, text)
}

#[test]
fn tune_lists_its_shapes_and_refuses_the_reference_backend() {
    let (out, text) = ultrapixel(&["tune", "--list", "--tiny", "--size", "512x520"]);
    assert!(out.status.success(), "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let gemm = v["gemm"].as_array().unwrap();
    assert!(gemm.len() > 10 && v["attention"].as_array().unwrap().len() > 3);
    for g in gemm {
        let e = g["epilogue"].as_str().unwrap();
        assert!(Epilogue::parse(e).is_some(), "{g}");
        assert!(g["uses"][0]["per_image"].as_u64().unwrap() > 0, "{g}");
    }
    let (out, _) = ultrapixel(&["tune", "--tiny", "--backend", "cpu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("use --backend cuda or hostsim"));
    // --check checks a GPU's table.
    let (out, _) = ultrapixel(&["tune", "--check", "--backend", "hostsim"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("use --backend cuda"));
}

/// The tuner on the emulator, one timed iteration per candidate: its table, its log and the
/// emulator's table key.
#[cfg(feature = "hostsim")]
fn tune_on_emulator(
    sizes: &[String],
    gemms: &[ultrapixel::tune::problems::GemmProblem],
    attention: &[ultrapixel::tune::problems::AttentionProblem],
) -> (Table, String, TableKey) {
    use std::sync::Arc;
    use ultrapixel::runtime::hostsim::HostsimDevice;
    use ultrapixel::tune::engine::{Engine, HostsimEngine};
    use ultrapixel::tune::tuner::{tune_problems, Options};
    let engine = HostsimEngine::new(Arc::new(HostsimDevice::new()));
    let opts = Options {
        iters: Some(1),
        ..Options::default()
    };
    let mut log = Vec::new();
    let t = tune_problems(&engine, sizes, gemms, attention, &opts, &mut log).unwrap();
    (t, String::from_utf8(log).unwrap(), engine.key())
}

/// The tuner on the emulator, on one GEMM of each epilogue kind of the tiny model (the
/// smallest) and its smallest attention: our kernel and the stand-in pair (our plain GEMM,
/// then the epilogue pass) are checked and timed, the stand-in agrees with ours within the
/// bound, the winner is a checked candidate, and the table round-trips and loads.
#[cfg(feature = "hostsim")]
#[test]
fn the_tuner_checks_and_times_every_candidate_on_the_emulator() {
    use ultrapixel::pipeline::Size;
    use ultrapixel::tune::problems::problems;

    let size = Size {
        width: 512,
        height: 520,
    };
    let (gemms, attention) =
        problems(&ultrapixel::pipeline::tiny::tiny_configs(), &[size]).unwrap();
    let mut picked: Vec<_> = Vec::new();
    for g in &gemms {
        let same = |p: &&ultrapixel::tune::problems::GemmProblem| {
            (p.key.epilogue, p.key.out) == (g.key.epilogue, g.key.out)
        };
        match picked.iter_mut().find(|p| same(p)) {
            Some(p) if p.key.flops() > g.key.flops() => *p = g,
            Some(_) => {}
            None => picked.push(g),
        }
    }
    let picked: Vec<_> = picked.into_iter().cloned().collect();
    assert!(picked.iter().any(|p| p.key.epilogue.grn_stats));
    assert!(picked.iter().any(|p| p.key.epilogue.scaled_a));
    let smallest = attention
        .iter()
        .min_by(|a, b| a.shape.flops().total_cmp(&b.shape.flops()))
        .unwrap()
        .clone();
    let (t, log, emulator) = tune_on_emulator(&[size.to_string()], &picked, &[smallest]);
    assert_eq!(log.lines().count(), 1 + picked.len() + 1, "{log}");
    assert_eq!(t.gemm.len(), picked.len());
    for e in &t.gemm {
        let ours = &e.candidates[0];
        assert_eq!(ours.kind, "ours");
        assert!(ours.ok(), "{e:?}");
        // Ours against ours: bit-identical.
        assert_eq!(ours.max_err, Some(0.0), "{e:?}");
        let stand_ins: Vec<_> = e
            .candidates
            .iter()
            .filter(|c| c.kind == "standin+epilogue")
            .collect();
        if e.epilogue == "none" {
            assert!(stand_ins.is_empty());
        } else {
            // f32 product, and bf16 where the output is bf16.
            assert_eq!(
                stand_ins.len(),
                1 + (e.out_dtype == "bf16") as usize,
                "{e:?}"
            );
        }
        for c in stand_ins {
            assert!(c.ok(), "{}: {c:?}", e.epilogue);
            assert!(c.max_err.unwrap() <= c.limit.unwrap(), "{c:?}");
        }
        let w = e.candidates.iter().find(|c| c.name == e.winner).unwrap();
        assert!(w.ok());
        let fastest = e
            .candidates
            .iter()
            .filter_map(|c| c.seconds)
            .fold(f64::INFINITY, f64::min);
        assert_eq!(w.seconds, Some(fastest));
    }
    assert!(t.attention[0].candidates[0].ok());
    // The JSON round trip keeps everything (floats to within their printed digits).
    let back = Table::parse(&t.to_json()).unwrap();
    assert_eq!(
        (&back.key, &back.sizes, &back.created),
        (&t.key, &t.sizes, &t.created)
    );
    for (b, e) in back.gemm.iter().zip(&t.gemm) {
        assert_eq!((b.key(), &b.winner, &b.uses), (e.key(), &e.winner, &e.uses));
        for (x, y) in b.candidates.iter().zip(&e.candidates) {
            assert_eq!(
                (&x.name, &x.kind, &x.status, &x.config),
                (&y.name, &y.kind, &y.status, &y.config)
            );
            let (xs, ys) = (x.seconds.unwrap(), y.seconds.unwrap());
            assert!((xs - ys).abs() <= 1e-12 * ys, "{xs} vs {ys}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &t.key.file_name(), &t.to_json());
    let s = Selection::load_from(Some(dir.path()), &[], &emulator);
    assert!(s.table().is_some(), "{}", s.describe());
}

/// A GEMM node completed as the cuda backend completes a cuBLASLt winner
/// (`dispatch::pair_entries`: operand scaling, vendor product in the session's scratch,
/// epilogue pass), with our plain GEMM standing in for cuBLASLt on the emulator: every GEMM
/// check still matches its reference, through the session's substitution path.
#[cfg(feature = "hostsim")]
mod substitution {
    use std::sync::Arc;
    use ultrapixel::runtime::device::{
        dry_launches, Device, DeviceBuffer, KernelSession, LaunchList,
    };
    use ultrapixel::runtime::graph::{DevTensor, LaunchIo};
    use ultrapixel::runtime::graph::{Node, TensorDesc};
    use ultrapixel::runtime::hostsim::HostsimDevice;
    use ultrapixel::runtime::launch::Entry;
    use ultrapixel::runtime::session::{Session, SessionOptions};
    use ultrapixel::runtime::Backend;
    use ultrapixel::tensor::DType;
    use ultrapixel::tune::dispatch::{pair_entries, plan_layout, PairPlan};
    use ultrapixel::tune::{gemm_key, pair, Epilogue, GemmKey};
    use ultrapixel::verify::{self, Scale};

    struct PairDevice {
        inner: HostsimDevice,
        /// The product's dtype for an output dtype.
        product: fn(DType) -> DType,
    }

    impl PairDevice {
        fn plan(&self, node: &Node, inputs: &[&TensorDesc]) -> Option<(GemmKey, PairPlan)> {
            let key = gemm_key(node.op.as_ref(), inputs)?;
            (key.epilogue != Epilogue::default()).then(|| {
                let plan = PairPlan {
                    product: (self.product)(key.out),
                    scale_a: key.epilogue.scaled_a,
                    epilogue_pass: true,
                };
                (key, plan)
            })
        }
    }

    impl Device for PairDevice {
        fn describe(&self) -> String {
            "emulator with stand-in vendor GEMMs".into()
        }
        fn alloc(&self, bytes: usize) -> ultrapixel::Result<DeviceBuffer> {
            self.inner.alloc(bytes)
        }
        fn write(&self, dst: u64, data: &[u8]) -> ultrapixel::Result<()> {
            self.inner.write(dst, data)
        }
        fn read(&self, src: u64, out: &mut [u8]) -> ultrapixel::Result<()> {
            self.inner.read(src, out)
        }
        fn fill(&self, dst: u64, byte: u8, len: usize) -> ultrapixel::Result<()> {
            self.inner.fill(dst, byte, len)
        }
        fn execute(&self, list: &mut LaunchList) -> ultrapixel::Result<()> {
            self.inner.execute(list)
        }
        fn substitute_scratch(
            &self,
            node: &Node,
            inputs: &[&TensorDesc],
            _: ultrapixel::runtime::kernel_choice::KernelChoice,
        ) -> usize {
            self.plan(node, inputs)
                .map_or(0, |(key, plan)| plan_layout(&key, plan).bytes)
        }
        fn substitute(
            &self,
            node: &Node,
            io: &LaunchIo,
            scratch: u64,
        ) -> ultrapixel::Result<Option<Vec<Entry>>> {
            let descs: Vec<&TensorDesc> = io.inputs.iter().map(|t| t.desc).collect();
            let Some((key, plan)) = self.plan(node, &descs) else {
                return Ok(None);
            };
            let w: DevTensor = io.inputs[1];
            pair_entries(
                node.op.as_ref(),
                &key,
                node.workspace,
                io,
                scratch,
                plan,
                &mut |a, d| pair::plain_gemm(&key, a, w, d, plan.product),
            )
        }
    }

    fn run(product: fn(DType) -> DType) {
        let device: Arc<dyn Device> = Arc::new(PairDevice {
            inner: HostsimDevice::new(),
            product,
        });
        let mut substituted = 0;
        let mut failures = Vec::new();
        let seed: u64 = rand::random();
        for check in ultrapixel::ops::gemm::checks(seed, Scale::Emulator).unwrap() {
            let reference = verify::run_on(&check, &Backend::Cpu).unwrap();
            let mut s = KernelSession::new(
                device.clone(),
                check.graph.clone(),
                &check.weights,
                SessionOptions { poison: true },
                None,
            )
            .unwrap();
            if s.launch_count() != dry_launches(&check.graph).unwrap().len() {
                substituted += 1;
            }
            for (id, v) in &check.inputs {
                s.set_input(*id, v).unwrap();
            }
            s.run().unwrap();
            let got: Vec<Vec<f32>> = check
                .graph
                .outputs
                .iter()
                .map(|&o| s.read(o).unwrap())
                .collect();
            for c in check.compare(&reference, &got, 1.0) {
                if !c.passed() {
                    failures.push(format!(
                        "seed {seed}: {} {}: {:.3e} > {:.3e}",
                        c.check, c.output, c.max_err, c.limit
                    ));
                }
            }
        }
        assert!(substituted > 20, "{substituted} checks substituted");
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// f32 products, for either output dtype.
    #[test]
    fn f32_products_complete_every_gemm_check() {
        run(|_| DType::F32);
    }

    /// Products in the output's dtype (bf16 products for bf16 outputs).
    #[test]
    fn products_in_the_output_dtype_complete_every_gemm_check() {
        run(|out| out);
    }
}

/// The tuner on the emulator with our Hopper kernels as candidates: small GEMMs (plain, with
/// a GELU epilogue and GRN sums, with the operand scaling) and attentions (head dim 64, with
/// extra keys and a key mask; head dim 16, which has no Hopper kernel). Each Hopper candidate
/// is checked against the portable kernel (within the bound, rerun bit-identical) and timed;
/// the winner is the fastest checked candidate.
#[cfg(feature = "hostsim")]
#[test]
fn the_tuner_checks_the_sm90a_candidates_on_the_emulator() {
    use ultrapixel::bench::shapes::AttentionShape;
    use ultrapixel::ops::attention::Attention;
    use ultrapixel::runtime::graph::Graph;
    use ultrapixel::tune::problems::{AttentionProblem, GemmProblem};

    // Odd rows and columns (tails in M and N), K a multiple of 8 but not of the 64-deep tile;
    // N = 136 takes 3, 2 or 1 column tiles (every width timed), N = 40 one tile of each (only
    // the 64-wide one timed: the wider ones only pad more).
    let keys = [
        ("none", 1, 136, DType::BF16),
        ("bias+gelu+grn_stats", 2, 136, DType::BF16),
        ("bias+residual+scaled_a", 2, 136, DType::F32),
        ("bias", 1, 40, DType::BF16),
    ]
    .map(|(e, samples, n, out)| GemmKey {
        m: samples * 70 + 3 * (samples == 1) as usize,
        n,
        k: 72,
        samples,
        epilogue: Epilogue::parse(e).unwrap(),
        out,
    });
    let gemms: Vec<GemmProblem> = keys
        .iter()
        .map(|k| {
            let (op, inputs) = gemm_node(k);
            let outputs = op
                .infer(&inputs.iter().collect::<Vec<_>>())
                .unwrap()
                .into_iter()
                .enumerate()
                .map(|(i, (shape, dtype))| TensorDesc {
                    name: format!("out{i}"),
                    shape,
                    dtype,
                    role: Role::Activation,
                })
                .collect();
            GemmProblem {
                key: *k,
                op,
                inputs,
                outputs,
                uses: vec![],
            }
        })
        .collect();
    let attention = |batch, queries, extra, heads, head_dim| {
        let op = Attention {
            heads,
            causal: false,
            extra_kv: extra > 0,
            key_mask: extra > 0,
            out: DType::BF16,
        };
        let c = heads * head_dim;
        let mut g = Graph::new();
        let mut ins = vec![g
            .input("qkv", &[batch, queries, 3 * c], DType::BF16)
            .unwrap()];
        if extra > 0 {
            ins.push(g.input("kv", &[batch, extra, 2 * c], DType::BF16).unwrap());
            ins.push(
                g.input("mask", &[batch, queries + extra], DType::F32)
                    .unwrap(),
            );
        }
        let y = g.op1(op.clone(), &ins).unwrap();
        g.output(y, "y").unwrap();
        AttentionProblem {
            shape: AttentionShape {
                op,
                batch,
                queries,
                extra,
                head_dim,
                per_image: 1,
                example: "test".into(),
                graph: g,
            },
            uses: vec![],
        }
    };
    let attentions = [attention(2, 130, 5, 2, 64), attention(1, 40, 0, 2, 16)];
    let (t, log, _) = tune_on_emulator(&["test".into()], &gemms, &attentions);
    let fastest = |cs: &[Candidate]| {
        cs.iter()
            .filter(|c| c.ok())
            .map(|c| c.seconds.unwrap())
            .fold(f64::INFINITY, f64::min)
    };
    for e in &t.gemm {
        let widths: &[TileWidth] = match e.n {
            136 => &TileWidth::ALL,
            _ => &[TileWidth::N64],
        };
        let names: Vec<&str> = e.candidates.iter().map(|c| c.name.as_str()).collect();
        let mut want = vec!["ours/128x128x32s3".to_string()];
        want.extend(widths.iter().map(|&w| sm90a_candidate(w)));
        assert_eq!(names[..want.len()], want, "{}", e.epilogue);
        for (h, &w) in e.candidates[1..].iter().zip(widths) {
            assert_eq!(h.kind, OURS_SM90A);
            assert!(h.ok(), "{}: {h:?}\n{log}", e.epilogue);
            assert!(h.max_err.unwrap() <= h.limit.unwrap(), "{h:?}");
            assert_eq!(h.config, Some(OurConfig::sm90a(w)));
        }
        let w = e.candidates.iter().find(|c| c.name == e.winner).unwrap();
        assert_eq!(w.seconds, Some(fastest(&e.candidates)));
        // A Hopper winner is read back in its width.
        match e.choice() {
            Some(GemmChoice::OursSm90a(width)) => {
                assert_eq!(width.map(sm90a_candidate), Some(e.winner.clone()))
            }
            other => assert!(
                matches!(other, Some(GemmChoice::Ours(_)) | None),
                "{other:?}"
            ),
        }
    }
    let names = |i: usize| -> Vec<&str> {
        t.attention[i]
            .candidates
            .iter()
            .map(|c| c.name.as_str())
            .collect()
    };
    assert_eq!(names(0), ["ours/flash", "ours/sm90a"]);
    assert_eq!(names(1), ["ours/flash"]);
    for e in &t.attention {
        assert_eq!(e.out_dtype.as_deref(), Some("bf16"));
        for c in &e.candidates {
            assert!(c.ok(), "{c:?}\n{log}");
        }
        // Ours against ours: bit-identical.
        assert_eq!(e.candidates[0].max_err, Some(0.0));
        let w = e.candidates.iter().find(|c| c.name == e.winner).unwrap();
        assert_eq!(w.seconds, Some(fastest(&e.candidates)));
    }
    assert!(log.contains("sm90a"), "{log}");
}

/// The committed table stays keyed to the kernels it measured: a change to a tuned kernel
/// source (or a header it includes) makes it stale on the GPU, so every GEMM silently falls
/// back to the portable kernels. Such a change must re-tune, or re-key with a reason in
/// tuning/README.md. Checked on the release build's configuration (nvcc 13.0.88, default
/// architectures); other builds hash differently by design.
#[test]
fn the_committed_table_is_keyed_to_these_kernels() {
    use ultrapixel::runtime::kernels::{CUDA_ARCHS, KERNELS_COMPILED, NVCC_VERSION};
    let release = KERNELS_COMPILED
        && NVCC_VERSION.ends_with("V13.0.88")
        && CUDA_ARCHS == ["sm_80", "sm_86", "sm_89", "sm_90"];
    if !release {
        eprintln!("skipped: not the release kernel build ({NVCC_VERSION:?}, {CUDA_ARCHS:?})");
        return;
    }
    for (name, text) in EMBEDDED {
        let t = Table::parse(text).unwrap();
        assert_eq!(
            t.key.kernels_hash,
            kernels_hash(),
            "{name} is stale for these kernel sources: re-tune on the GPU, or re-key it with \
             the reason in tuning/README.md"
        );
    }
}
