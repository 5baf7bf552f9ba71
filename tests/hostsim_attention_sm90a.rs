//! The Hopper attention (`kernels/attention_sm90a.cu`) on the emulator: fresh random inputs,
//! odd sequence lengths (query and key tails, own-token tiles then extra-token tiles, the
//! 2-stage K/V ring wrapping), with and without the extra text tokens, causal and key masks,
//! several heads and samples, bf16 and f32 out, outputs poisoned first, against the op's CPU reference (f64,
//! `Attention::reference`) within `ops::attention::attention_bounds`. Dispatch: with
//! `UPX_KERNELS=sm90a` a qualifying Attention launches the sm_90a kernel on hostsim, and
//! shapes that do not qualify (head dim 16) fall back to the portable kernel. Runs in both thread orders (`HOSTSIM_REVERSE=1`).
#![cfg(feature = "hostsim")]

use half::bf16;
use rand::rngs::StdRng;
use rand::RngExt;
use ultrapixel::ops::attention::{attention_bounds, Attention};
use ultrapixel::ops::attention_sm90a;
use ultrapixel::runtime::kernel_choice::KernelTarget;
use ultrapixel::tensor::DType;

#[path = "common/guarded_buf.rs"]
mod guarded_buf;

#[path = "common/sm90a_op.rs"]
mod sm90a_op;

use guarded_buf::{rng, Buf};
use sm90a_op::{OpCall, Operand};

fn values(rng: &mut StdRng, n: usize, range: f32) -> Vec<f32> {
    (0..n)
        .map(|_| bf16::from_f32(rng.random_range(-range..range)).to_f32())
        .collect()
}

#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    /// N: own tokens (queries and keys).
    n: usize,
    /// M: extra keys (0: none).
    m: usize,
    heads: usize,
    d: usize,
    causal: bool,
    key_mask: bool,
    out: DType,
}

fn case(batch: usize, n: usize, m: usize, heads: usize, out: DType) -> Case {
    Case {
        batch,
        n,
        m,
        heads,
        d: 64,
        causal: false,
        key_mask: false,
        out,
    }
}

/// Runs the op's launches for `c` on hostsim under UPX_KERNELS=sm90a, checks the output
/// against the CPU reference, and returns the kernel names.
fn check(rng: &mut StdRng, c: Case) -> Vec<String> {
    let Case {
        batch,
        n,
        m,
        heads,
        d,
        out,
        ..
    } = c;
    let ch = heads * d;
    let range = 2.0;
    let qkv = values(rng, batch * n * 3 * ch, range);
    let kv = values(rng, batch * m * 2 * ch, range);
    let mask: Vec<f32> = (0..batch * (n + m))
        .map(|j| {
            if j % (n + m) == 0 || rng.random_range(0.0..1.0) > 0.3 {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    let op = Attention {
        heads,
        causal: c.causal,
        extra_kv: m > 0,
        key_mask: c.key_mask,
        out,
    };
    let (gqkv, gkv) = (Buf::of_bf16(&qkv), Buf::of_bf16(&kv));
    let gmask = Buf::of_f32(&mask);
    let gout = Buf::new(batch * n * ch * out.size());
    let mut inputs = vec![Operand::new(
        "qkv",
        vec![batch, n, 3 * ch],
        DType::BF16,
        gqkv.addr(),
        &qkv,
    )];
    if m > 0 {
        let shape = vec![batch, m, 2 * ch];
        inputs.push(Operand::new("kv", shape, DType::BF16, gkv.addr(), &kv));
    }
    if c.key_mask {
        let shape = vec![batch, n + m];
        inputs.push(Operand::new("mask", shape, DType::F32, gmask.addr(), &mask));
    }
    let call = OpCall {
        op: &op,
        inputs,
        output: Operand::new("out", vec![batch, n, ch], out, gout.addr(), &[]),
    };
    let names = call
        .launch(false, true)
        .unwrap_or_else(|e| panic!("{c:?}: {e}"));
    let want = &call.reference();
    let got = gout.read(out);
    assert!(gout.guard_intact(), "{c:?}: a store past O");
    let bounds = attention_bounds(
        &qkv,
        (m > 0).then_some(&kv[..]),
        (batch, n, m, heads, d),
        want,
        out == DType::BF16,
    );
    let mut worst = 0f64;
    for (i, ((&g, &w), &tol)) in got.iter().zip(want).zip(&bounds).enumerate() {
        let err = (g as f64 - w as f64).abs();
        let (b, r, col) = (i / (n * ch), i / ch % n, i % ch);
        assert!(
            err <= tol as f64,
            "{c:?} {names:?}: O[{b}][{r}][{col}] = {g}, expected {w} (bound {tol:e})"
        );
        worst = worst.max(err / tol as f64);
    }
    eprintln!("{c:?} {names:?}: worst error {worst:.3} of the bound");
    names
}

const SM90A: [&str; 2] = ["attention_sm90a_d64_bf16", "attention_sm90a_d64_f32"];
const SM90A_D32: [&str; 2] = ["attention_sm90a_d32_bf16", "attention_sm90a_d32_f32"];

#[test]
fn sm90a_attention_head_dim_32() {
    let mut rng = rng();
    // The INR transformer's shape, cut down: n image tokens + 128 weight tokens as extra keys.
    for c in [
        Case {
            d: 32,
            ..case(1, 70, 128, 3, DType::F32)
        },
        Case {
            d: 32,
            ..case(2, 200, 0, 2, DType::BF16)
        },
        Case {
            d: 32,
            causal: true,
            key_mask: true,
            ..case(1, 150, 0, 1, DType::F32)
        },
    ] {
        let names = check(&mut rng, c);
        assert_eq!(names, [SM90A_D32[(c.out == DType::F32) as usize]], "{c:?}");
    }
}

#[test]
fn sm90a_attention_self_attention_with_tails() {
    let mut rng = rng();
    for c in [
        case(1, 77, 0, 2, DType::F32),
        // Three own-token tiles: the 2-stage ring wraps; two query tiles.
        case(2, 257, 0, 1, DType::BF16),
        case(1, 1, 0, 3, DType::F32),
    ] {
        let names = check(&mut rng, c);
        assert_eq!(names, [SM90A[(c.out == DType::F32) as usize]], "{c:?}");
    }
}

#[test]
fn sm90a_attention_with_extra_text_tokens() {
    let mut rng = rng();
    for c in [
        case(2, 130, 13, 3, DType::BF16),
        // Two own-token tiles and one extra-token tile (Stable Cascade's 85 CLIP tokens).
        case(1, 200, 85, 1, DType::F32),
        case(1, 1, 5, 2, DType::BF16),
        // Extra tokens spanning two tiles.
        case(1, 40, 133, 1, DType::F32),
    ] {
        let names = check(&mut rng, c);
        assert_eq!(names, [SM90A[(c.out == DType::F32) as usize]], "{c:?}");
    }
}

#[test]
fn sm90a_attention_with_causal_and_key_masks() {
    let mut rng = rng();
    // CLIP's self-attention: causal and padding-masked (key 0 always visible); two query
    // tiles, the second one reading two key tiles.
    let causal = Case {
        causal: true,
        key_mask: true,
        ..case(2, 150, 0, 2, DType::F32)
    };
    assert_eq!(check(&mut rng, causal), [SM90A[1]]);
    let causal = Case {
        causal: true,
        ..case(1, 77, 0, 1, DType::BF16)
    };
    assert_eq!(check(&mut rng, causal), [SM90A[0]]);
    let masked = Case {
        key_mask: true,
        ..case(1, 33, 7, 1, DType::BF16)
    };
    assert_eq!(check(&mut rng, masked), [SM90A[0]]);
}

#[test]
fn shapes_that_do_not_qualify_fall_back_to_the_portable_kernel() {
    let mut rng = rng();
    let d16 = Case {
        d: 16,
        ..case(1, 33, 7, 2, DType::BF16)
    };
    assert_eq!(check(&mut rng, d16), ["attention_d16_bf16"]);
    // Without a backend (dry listings, the tuner) launches stay portable.
    assert!(!KernelTarget::default().sm90a_allowed().unwrap());
    const { assert!(attention_sm90a::smem_bytes(64) < 227 * 1024) };
}
