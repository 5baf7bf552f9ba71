//! The Hopper GEMM (`kernels/gemm_sm90a.cu`) on the emulator: fresh random inputs, odd M, N
//! and K that still qualify (tails in every dimension, several tiles per block of the
//! persistent grid so the 4-stage ring wraps), each tile width (64, 128, 256), every epilogue
//! (bias, GELU-erf, residual, FiLM, GRN slab sums, bf16 and f32 out), outputs poisoned first,
//! against the CPU reference (`ops::gemm::gemm_ref` plus FiLM and the GRN sums) with a
//! tolerance that scales with K. The widths give bit-identical C and partials; the grouped
//! tile order computes every tile exactly once (residual added in place). Dispatch: with
//! `UPX_KERNELS=sm90a` a qualifying Gemm launches the sm_90a kernel on hostsim, and shapes
//! that do not qualify (misaligned operands, the A modulation) fall back to the portable
//! kernel and still compute the right product. Runs in both thread orders
//! (`HOSTSIM_REVERSE=1`) and under the race check (tools/racecheck.sh).
#![cfg(feature = "hostsim")]

use half::bf16;
use rand::rngs::StdRng;
use rand::RngExt;
use ultrapixel::ops::gemm::{gemm_ref, Gemm, GemmParams, GemmScaledA};
use ultrapixel::ops::gemm_sm90a::{self, TileWidth};
use ultrapixel::ops::math::gelu_ref;
use ultrapixel::runtime::device::KernelSession;
use ultrapixel::runtime::graph::OpImpl;
use ultrapixel::runtime::hostsim::launch;
use ultrapixel::runtime::kernel_choice::{KernelChoice, KernelTarget};
use ultrapixel::runtime::session::{Session, SessionOptions};
use ultrapixel::runtime::{Backend, BackendKind};
use ultrapixel::tensor::DType;
use ultrapixel::verify::{self, Scale};

#[path = "common/guarded_buf.rs"]
mod guarded_buf;

#[path = "common/sm90a_op.rs"]
mod sm90a_op;

use guarded_buf::{rng, Buf};
use sm90a_op::{OpCall, Operand};

fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

fn values(rng: &mut StdRng, n: usize, range: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-range..range)).collect()
}

#[derive(Clone, Copy, Debug)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    out: DType,
    bias: bool,
    gelu: bool,
    residual: bool,
    /// FiLM k (rows_per_sample from `samples`).
    film: Option<f32>,
    grn: bool,
    samples: usize,
    /// SMs of the persistent grid.
    sms: u32,
    /// The tile width (None: the launcher's rule).
    width: Option<TileWidth>,
    /// R is C (the residual added in place): a tile computed twice would add it twice.
    in_place: bool,
}

fn case(m: usize, n: usize, k: usize, out: DType) -> Case {
    Case {
        m,
        n,
        k,
        out,
        bias: false,
        gelu: false,
        residual: false,
        film: None,
        grn: false,
        samples: 1,
        sms: 132,
        width: None,
        in_place: false,
    }
}

/// A case's random inputs: A, W, bias, R, FiLM a | β.
struct Inputs {
    a: Vec<f32>,
    w: Vec<f32>,
    bias: Vec<f32>,
    res: Vec<f32>,
    ab: Vec<f32>,
}

fn inputs(rng: &mut StdRng, c: &Case) -> Inputs {
    let Case { m, n, k, out, .. } = *c;
    let a = bf16_round(&values(rng, m * k, 1.0));
    let w = bf16_round(&values(rng, n * k, 1.0));
    let bias = values(rng, n, 0.5);
    let mut res = values(rng, m * n, 1.0);
    if out == DType::BF16 {
        res = bf16_round(&res);
    }
    let ab = values(rng, c.samples * 2 * n, 0.5);
    Inputs {
        a,
        w,
        bias,
        res,
        ab,
    }
}

/// Runs one case on fresh random inputs ([`check_on`]).
fn check(rng: &mut StdRng, c: Case) -> (Vec<f32>, Vec<f32>) {
    let x = inputs(rng, &c);
    check_on(&x, c)
}

/// Runs one case on the sm_90a kernel and checks C (and the GRN partials) against the CPU;
/// returns them (C as f32 values, the partials empty without GRN).
fn check_on(x: &Inputs, c: Case) -> (Vec<f32>, Vec<f32>) {
    let Case { m, n, k, out, .. } = c;
    let Inputs {
        a,
        w,
        bias,
        res,
        ab,
    } = x;
    let rows_per_sample = m / c.samples;
    assert_eq!(rows_per_sample * c.samples, m);
    let slabs = m.div_ceil(64);

    let (ga, gw, gbias, gres, gab) = (
        Buf::of_bf16(a),
        Buf::of_bf16(w),
        Buf::of_f32(bias),
        Buf::of(res, out),
        Buf::of_f32(ab),
    );
    // In place: C starts as R (a tile left out keeps R, one computed twice adds R twice);
    // otherwise poisoned.
    let gc = if c.in_place {
        Buf::of(res, out)
    } else {
        Buf::new(m * n * if out == DType::BF16 { 2 } else { 4 })
    };
    let gp = Buf::new(slabs * 2 * n * 4);
    let p = GemmParams {
        a: ga.addr(),
        w: gw.addr(),
        bias: if c.bias { gbias.addr() } else { 0 },
        r: match (c.residual, c.in_place) {
            (false, _) => 0,
            (true, false) => gres.addr(),
            (true, true) => gc.addr(),
        },
        c: gc.addr(),
        ab: if c.film.is_some() { gab.addr() } else { 0 },
        partials: if c.grn { gp.addr() } else { 0 },
        a_mod: 0,
        m: m as i32,
        n: n as i32,
        k: k as i32,
        gelu: c.gelu as i32,
        rows_per_sample: rows_per_sample as i32,
        film_k: c.film.unwrap_or(0.0),
        a_k: 0.0,
        pad: 0,
    };
    assert!(
        gemm_sm90a::qualifies(&p),
        "{c:?}: {:?}",
        gemm_sm90a::why_not(&p)
    );
    let target = KernelTarget {
        sms: c.sms,
        ..KernelTarget::hostsim()
    };
    let mut l = match c.width {
        Some(width) => gemm_sm90a::launch_width(&target, &p, out, width),
        None => gemm_sm90a::launch(&target, &p, out),
    }
    .unwrap();
    assert!(gemm_sm90a::is_sm90a_gemm(&l));
    launch(&mut l).unwrap_or_else(|e| panic!("{c:?}: {e}"));

    // The reference: Σ in f64 → f32, bias, GELU, residual (gemm_ref), then FiLM in f32.
    let mut want = vec![0f32; m * n];
    gemm_ref(
        a,
        w,
        c.bias.then_some(&bias[..]),
        c.gelu,
        c.residual.then_some(&res[..]),
        (n, k),
        &mut want,
    );
    let got = gc.read(out);
    assert!(gc.guard_intact(), "{c:?}: a store past C");
    // Tolerance: the f32 accumulation error grows with K (a bound of K·2⁻²³ per unit of
    // Σ|a·w|), through the epilogue's gain (GELU' ≤ 1.13, FiLM's scale), plus the rounding of
    // the output and of the epilogue's own f32 steps.
    let mut worst = 0f64;
    for i in 0..m {
        let s = i / rows_per_sample;
        for j in 0..n {
            let mut v = want[i * n + j];
            let mut gain: f64 = if c.gelu { 1.13 } else { 1.0 };
            if let Some(fk) = c.film {
                let scale = fk + ab[s * 2 * n + j];
                v = v * scale + ab[s * 2 * n + n + j];
                gain *= scale.abs().max(1.0) as f64;
            }
            let terms: f64 = (0..k)
                .map(|kk| (a[i * k + kk] as f64 * w[j * k + kk] as f64).abs())
                .sum();
            let acc_err = k as f64 * f32::EPSILON as f64 * terms * gain;
            let round = match out {
                DType::BF16 => v.abs() as f64 / 128.0,
                _ => 0.0,
            };
            let tol = acc_err + round + 1e-5 * (1.0 + v.abs() as f64);
            let g = got[i * n + j];
            let err = (g as f64 - v as f64).abs();
            assert!(
                err <= tol,
                "{c:?}: C[{i}][{j}] = {g}, expected {v} (tolerance {tol:e})"
            );
            worst = worst.max(err / tol);
        }
    }
    let mut parts = Vec::new();
    if c.grn {
        // Slab q's sums of the stored values' squares, split at the sample boundary.
        parts = gp.read(DType::F32);
        assert!(gp.guard_intact(), "{c:?}: a store past the partials");
        for q in 0..slabs {
            let s0 = q * 64 / rows_per_sample;
            for part in 0..2 {
                for j in 0..n {
                    let want: f64 = (q * 64..(q * 64 + 64).min(m))
                        .filter(|&r| (r / rows_per_sample != s0) == (part == 1))
                        .map(|r| (got[r * n + j] as f64).powi(2))
                        .sum();
                    let g = parts[(q * 2 + part) * n + j] as f64;
                    assert!(
                        (g - want).abs() <= 1e-5 * (1.0 + want),
                        "{c:?}: partials[{q}][{part}][{j}] = {g}, expected {want}"
                    );
                }
            }
        }
    }
    eprintln!(
        "{c:?} ({}): worst error {worst:.3} of the tolerance",
        l.kernel.name()
    );
    (got, parts)
}

#[test]
fn sm90a_gemm_plain_products_with_tails_in_every_dimension() {
    let mut rng = rng();
    // K tail (72 = 64 + 8), N tail, M tail in each width; then several tiles per block so the
    // ring's phases wrap (1 and 2 SMs), and a real K (768, the model's width) on a cut-down
    // M × N.
    for width in TileWidth::ALL {
        check(
            &mut rng,
            Case {
                width: Some(width),
                ..case(77, 200, 72, DType::F32)
            },
        );
    }
    check(
        &mut rng,
        Case {
            sms: 1,
            width: Some(TileWidth::N128),
            ..case(130, 136, 200, DType::BF16)
        },
    );
    check(
        &mut rng,
        Case {
            sms: 2,
            width: Some(TileWidth::N64),
            ..case(200, 130, 40, DType::F32)
        },
    );
    check(
        &mut rng,
        Case {
            sms: 1,
            width: Some(TileWidth::N256),
            ..case(150, 300, 136, DType::BF16)
        },
    );
    check(&mut rng, case(64, 128, 768, DType::BF16));
}

#[test]
fn sm90a_gemm_every_epilogue() {
    let mut rng = rng();
    check(
        &mut rng,
        Case {
            bias: true,
            gelu: true,
            width: Some(TileWidth::N256),
            ..case(70, 136, 88, DType::BF16)
        },
    );
    check(
        &mut rng,
        Case {
            bias: true,
            residual: true,
            sms: 1,
            width: Some(TileWidth::N128),
            ..case(131, 72, 136, DType::F32)
        },
    );
    check(
        &mut rng,
        Case {
            bias: true,
            residual: true,
            width: Some(TileWidth::N64),
            ..case(66, 40, 64, DType::BF16)
        },
    );
    // FiLM per sample, with GELU and bias (a TimestepBlock after a GEMM).
    check(
        &mut rng,
        Case {
            bias: true,
            gelu: true,
            film: Some(1.0),
            samples: 3,
            sms: 2,
            width: Some(TileWidth::N128),
            ..case(3 * 45, 136, 72, DType::BF16)
        },
    );
    // GRN slab sums: 2 samples of 97 rows, the boundary inside slab 1; f32 and bf16 out.
    check(
        &mut rng,
        Case {
            bias: true,
            gelu: true,
            grn: true,
            samples: 2,
            sms: 1,
            width: Some(TileWidth::N64),
            ..case(2 * 97, 136, 64, DType::BF16)
        },
    );
    check(
        &mut rng,
        Case {
            bias: true,
            residual: true,
            film: Some(0.0),
            grn: true,
            samples: 2,
            width: Some(TileWidth::N256),
            ..case(2 * 70, 200, 48, DType::F32)
        },
    );
}

/// The tile width changes which block computes an element, never how: every width gives the
/// same bits of C and of the GRN partials, for every epilogue and both output types.
#[test]
fn every_tile_width_gives_bit_identical_outputs() {
    let mut rng = rng();
    let cases = [
        Case {
            bias: true,
            gelu: true,
            residual: true,
            film: Some(1.0),
            grn: true,
            samples: 2,
            sms: 3,
            ..case(2 * 83, 330, 88, DType::BF16)
        },
        Case {
            bias: true,
            residual: true,
            grn: true,
            samples: 3,
            sms: 2,
            ..case(3 * 67, 270, 72, DType::F32)
        },
    ];
    for c in cases {
        let x = inputs(&mut rng, &c);
        let runs: Vec<(Vec<f32>, Vec<f32>)> = TileWidth::ALL
            .iter()
            .map(|&w| {
                check_on(
                    &x,
                    Case {
                        width: Some(w),
                        ..c
                    },
                )
            })
            .collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        for (w, run) in TileWidth::ALL.iter().zip(&runs).skip(1) {
            assert!(
                bits(&run.0) == bits(&runs[0].0),
                "{c:?}: C of {w:?} differs from N64's"
            );
            assert!(
                bits(&run.1) == bits(&runs[0].1),
                "{c:?}: partials of {w:?} differ from N64's"
            );
        }
    }
}

/// The grouped tile order (groups of 8 row tiles, the last one shorter) visits every tile
/// exactly once: with C = R updated in place, a tile left out keeps R and a tile computed
/// twice adds R twice. Odd tile counts, several groups, blocks that take many tiles.
#[test]
fn grouped_tile_order_computes_every_tile_once() {
    let mut rng = rng();
    // 11 row tiles (a group of 8 and one of 3) × 3 column tiles of 64 = 33 tiles on 4 SMs;
    // 10 × 3 of 128 = 30 on 7; 9 × 1 of 256 on 2.
    for (m, n, width, sms) in [
        (1300, 136, TileWidth::N64, 4),
        (1200, 300, TileWidth::N128, 7),
        (1100, 200, TileWidth::N256, 2),
    ] {
        check(
            &mut rng,
            Case {
                residual: true,
                in_place: true,
                sms,
                width: Some(width),
                ..case(m, n, 16, DType::F32)
            },
        );
    }
}

/// An op's launches (a bias Gemm, or the GRN-scaled-A Gemm) on the emulator's target under
/// `UPX_KERNELS=sm90a`, run, against the op's CPU reference: the kernels it picked. A has 2
/// samples; `workspace`: give the op the workspace it asks for; `run`: false only lists.
fn run_op(
    rng: &mut StdRng,
    scaled: bool,
    (m, n, k): (usize, usize, usize),
    a_offset: usize,
    workspace: bool,
    run: bool,
) -> Vec<String> {
    let gemm = Gemm {
        bias: true,
        gelu: false,
        residual: false,
        out: DType::F32,
    };
    let op: Box<dyn OpImpl> = if scaled {
        Box::new(GemmScaledA { gemm, k: 0.5 })
    } else {
        Box::new(gemm)
    };
    let a = bf16_round(&values(rng, m * k, 1.0));
    let w = bf16_round(&values(rng, n * k, 1.0));
    let bias = values(rng, n, 0.5);
    let ab = values(rng, 2 * 2 * k, 1.0);
    // A at an offset into its buffer: 8 bytes breaks TMA's 16-byte alignment rule.
    let mut padded = vec![0f32; a_offset / 2];
    padded.extend_from_slice(&a);
    let (ga, gw, gb, gab) = (
        Buf::of_bf16(&padded),
        Buf::of_bf16(&w),
        Buf::of_f32(&bias),
        Buf::of_f32(&ab),
    );
    let gc = Buf::new(m * n * 4);
    let a_ptr = ga.addr() + a_offset as u64;
    let mut inputs = vec![
        Operand::new("a", vec![2, m / 2, k], DType::BF16, a_ptr, &a),
        Operand::new("w", vec![n, k], DType::BF16, gw.addr(), &w),
        Operand::new("bias", vec![n], DType::F32, gb.addr(), &bias),
    ];
    if scaled {
        inputs.push(Operand::new(
            "ab",
            vec![2, 2 * k],
            DType::F32,
            gab.addr(),
            &ab,
        ));
    }
    let call = OpCall {
        op: op.as_ref(),
        inputs,
        output: Operand::new("c", vec![2, m / 2, n], DType::F32, gc.addr(), &[]),
    };
    let names = call.launch(workspace, run).unwrap();
    if !run {
        return names;
    }
    let want = call.reference();
    let got = gc.read(DType::F32);
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        // The scaled A is rounded to bf16 on the device (the reference keeps f32): 2⁻⁸ per term.
        let tol = if scaled {
            4e-3 * k as f32
        } else {
            1e-4 * (1.0 + w.abs()) + k as f32 * 1e-6
        };
        assert!(
            (g - w).abs() <= tol,
            "{names:?}: C[{i}] = {g}, expected {w}"
        );
    }
    assert!(gc.guard_intact());
    names
}

#[test]
fn dispatch_picks_sm90a_where_the_shape_qualifies_and_falls_back_otherwise() {
    let mut rng = rng();
    assert_eq!(
        run_op(&mut rng, false, (66, 72, 24), 0, false, true),
        ["gemm_sm90a_n64_bf16_f32"]
    );
    // The GRN-scaled A: the scale pass into the workspace, then the Hopper kernel ...
    assert_eq!(
        run_op(&mut rng, true, (130, 40, 72), 0, true, true),
        ["gemm_scale_a_bf16", "gemm_sm90a_n64_bf16_f32"]
    );
    // ... and without a workspace the portable kernel, which scales A itself.
    assert_eq!(
        run_op(&mut rng, true, (130, 40, 72), 0, false, true),
        ["gemm_bf16_f32"]
    );
    // A 8 bytes off a 16-byte boundary: TMA cannot read it, so not the Hopper kernel (listed
    // only: the portable kernel's cp.async needs 16-byte rows too).
    assert_eq!(
        run_op(&mut rng, false, (34, 40, 56), 8, false, false),
        ["gemm_bf16_f32"]
    );
    // Without a backend (dry listings, the tuner) launches stay portable.
    assert!(!KernelTarget::default().sm90a_allowed().unwrap());
}

#[test]
fn gelu_reference_is_erf() {
    // The reference the tolerance above leans on is the erf form (cuBLASLt's is tanh).
    assert!((gelu_ref(1.0) - 0.841_344_7).abs() < 1e-6);
}

/// A graph's own kernel choice wins over `UPX_KERNELS=sm90a` (this binary's): the GRN pair
/// check of the gemm family (a GEMM with the fused statistics, the modulation, the GEMM on the
/// modulated A) placed in a session under the environment's choice runs the Hopper GEMMs and
/// reserves the scaled A's workspace; built under `Some(Portable)` it does neither. Both
/// match the CPU reference on fresh random inputs.
#[test]
fn a_graph_built_for_the_portable_kernels_ignores_upx_kernels() {
    std::env::set_var("UPX_KERNELS", "sm90a");
    let check = ultrapixel::ops::family("gemm")
        .unwrap()
        .checks_for(rng().random(), Scale::Emulator)
        .unwrap()
        .into_iter()
        .find(|c| c.name.contains("grn pair b3 rows97"))
        .unwrap();
    let reference = verify::run_on(&check, &Backend::Cpu).unwrap();
    let hostsim = Backend::open(BackendKind::Hostsim).unwrap();
    for choice in [None, Some(KernelChoice::Portable)] {
        let mut c = check.clone();
        c.graph.set_kernels(choice);
        let session = KernelSession::new(
            hostsim.device().unwrap(),
            c.graph.clone(),
            &c.weights,
            SessionOptions { poison: true },
            None,
        )
        .unwrap();
        let kernels = session.kernel_names();
        let hopper = kernels
            .iter()
            .any(|k| k.starts_with(gemm_sm90a::KERNEL_PREFIX));
        let portable = kernels.iter().any(|k| k.starts_with("gemm_bf16_"));
        assert_eq!(
            (hopper, portable),
            (choice.is_none(), choice.is_some()),
            "{kernels:?}"
        );
        // The session sized the workspaces for the choice it resolved.
        let g = session.graph();
        let scaled = g
            .nodes
            .iter()
            .find(|n| n.op.name() == "gemm_scaled_a")
            .unwrap();
        let a_bytes = g.desc(scaled.inputs[0]).bytes();
        assert_eq!(scaled.workspace, if hopper { a_bytes } else { 0 });
        let got = verify::run_on(&c, &hostsim).unwrap();
        for r in c.compare(&reference, &got, 1.0) {
            assert!(r.passed(), "{choice:?}: {r:?}");
        }
    }
}
