//! The host emulator itself: warp collectives, block reductions, the mma.sync / ldmatrix
//! fragment layouts and cp.async reproduce CUDA semantics on fresh random data, and broken
//! kernels (divergent barrier, deadlock, partial-warp collective, un-waited copy) are
//! reported as errors, never run to a wrong answer. Runs in both thread orders in CI.
#![cfg(feature = "hostsim")]

use half::bf16;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use ultrapixel::runtime::hostsim::launch;
use ultrapixel::runtime::kernels::KernelId;
use ultrapixel::runtime::launch::{Args, Launch};

fn rng() -> StdRng {
    let seed = std::env::var("UPX_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (rerun with UPX_TEST_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

fn ptr<T>(v: &[T]) -> u64 {
    v.as_ptr() as u64
}

/// A pointer the kernel writes through.
fn mut_ptr<T>(v: &mut [T]) -> u64 {
    v.as_mut_ptr() as u64
}

fn run(name: &str, grid: u32, block: u32, args: Args) -> ultrapixel::Result<()> {
    launch(&mut Launch::linear(
        KernelId::lookup(name)?,
        grid,
        block,
        args,
    ))
}

fn error_of(name: &str, block: u32, args: Args) -> String {
    match run(name, 1, block, args) {
        Ok(()) => panic!("{name}: the emulator accepted a broken kernel"),
        Err(e) => e.to_string(),
    }
}

/// Random values exactly representable in bf16.
fn bf16_values(rng: &mut StdRng, n: usize) -> Vec<bf16> {
    (0..n)
        .map(|_| bf16::from_f32(rng.random_range(-2.0f32..2.0)))
        .collect()
}

#[test]
fn warp_collectives_follow_cuda_semantics() {
    let mut rng = rng();
    let (blocks, threads) = (2u32, 96u32);
    let n = (blocks * threads) as usize;
    let input: Vec<i32> = (0..n).map(|_| rng.random_range(0..1100)).collect();
    let mut out = vec![i32::MIN; 8 * n];
    run(
        "selftest_warp_collectives",
        blocks,
        threads,
        Args::new().ptr(ptr(&input)).ptr(mut_ptr(&mut out)),
    )
    .unwrap();
    for i in 0..n {
        let (base, lane) = (i - i % 32, i % 32);
        let warp = &input[base..base + 32];
        let v = input[i];
        let ballot = warp
            .iter()
            .enumerate()
            .fold(0u32, |b, (l, &x)| b | (((x & 1) as u32) << l));
        let expected = [
            warp[(7 * lane) % 32],
            warp[lane ^ 5],
            if lane >= 3 { warp[lane - 3] } else { v },
            if lane + 3 < 32 { warp[lane + 3] } else { v },
            ballot as i32,
            warp.iter().any(|&x| x > 1000) as i32,
            warp.iter().all(|&x| x >= 0) as i32,
            warp[lane ^ 1],
        ];
        assert_eq!(&out[8 * i..8 * i + 8], &expected, "thread {i}");
    }
}

#[test]
fn block_reductions_cover_every_warp() {
    let mut rng = rng();
    for threads in [32u32, 96, 256, 1024] {
        let blocks = 3u32;
        let x: Vec<f32> = (0..(blocks * threads) as usize)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let mut out = vec![f32::NAN; 2 * blocks as usize];
        run(
            "selftest_block_reduce",
            blocks,
            threads,
            Args::new().ptr(ptr(&x)).ptr(mut_ptr(&mut out)),
        )
        .unwrap();
        for (b, chunk) in x.chunks(threads as usize).enumerate() {
            let sum: f64 = chunk.iter().map(|&v| v as f64).sum();
            let max = chunk.iter().copied().fold(f32::MIN, f32::max);
            assert!(
                (out[2 * b] as f64 - sum).abs() < 1e-4 * threads as f64,
                "{threads} threads: sum"
            );
            assert_eq!(out[2 * b + 1], max, "{threads} threads: max");
        }
    }
}

/// D[16×8] = A[16×16]·B[16×8] in f64, with Bt = Bᵀ ([8][16]).
fn naive_product(a: &[bf16], bt: &[bf16]) -> Vec<f64> {
    let mut d = vec![0.0; 128];
    for m in 0..16 {
        for n in 0..8 {
            d[m * 8 + n] = (0..16)
                .map(|k| a[m * 16 + k].to_f64() * bt[n * 16 + k].to_f64())
                .sum();
        }
    }
    d
}

fn assert_product(got: &[f32], want: &[f64], what: &str) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "{what}: D[{}][{}] = {g}, expected {w}",
            i / 8,
            i % 8
        );
    }
}

#[test]
fn mma_fragments_match_the_ptx_layout() {
    let mut rng = rng();
    let a = bf16_values(&mut rng, 256);
    let bt = bf16_values(&mut rng, 128);
    let mut d = vec![f32::NAN; 128];
    run(
        "selftest_mma_fragments",
        1,
        32,
        Args::new().ptr(ptr(&a)).ptr(ptr(&bt)).ptr(mut_ptr(&mut d)),
    )
    .unwrap();
    assert_product(&d, &naive_product(&a, &bt), "direct fragments");
}

#[test]
fn ldmatrix_and_cp_async_feed_the_mma() {
    let mut rng = rng();
    let a = bf16_values(&mut rng, 256);
    let bt = bf16_values(&mut rng, 128);
    // B as [k][n], the layout ldmatrix .trans reads.
    let bk: Vec<bf16> = (0..128).map(|i| bt[(i % 8) * 16 + i / 8]).collect();
    let mut d = vec![f32::NAN; 256];
    run(
        "selftest_mma_ldmatrix",
        1,
        32,
        Args::new()
            .ptr(ptr(&a))
            .ptr(ptr(&bt))
            .ptr(ptr(&bk))
            .ptr(mut_ptr(&mut d)),
    )
    .unwrap();
    let want = naive_product(&a, &bt);
    assert_product(&d[..128], &want, "ldmatrix_a_frag + ldmatrix_b_pair");
    assert_product(&d[128..], &want, "ldmatrix_a_frag + ldmatrix_b_pair_trans");
}

#[test]
fn reading_before_cp_async_wait_sees_poison() {
    /// cp.async copies 16 bytes, from a 16-byte aligned source (the emulator checks it, like
    /// the hardware); a plain `[f32; 4]` is only 4-byte aligned.
    #[repr(C, align(16))]
    struct Aligned([f32; 4]);
    let x = Aligned([1.0, 2.0, 3.0, 4.0]);
    let mut y = [0.0f32; 2];
    run(
        "selftest_cp_async_unwaited_read",
        1,
        32,
        Args::new().ptr(ptr(&x.0)).ptr(mut_ptr(&mut y)),
    )
    .unwrap();
    assert!(
        y[0].is_nan(),
        "an un-waited copy must not be visible, got {}",
        y[0]
    );
    assert_eq!(y[1], 2.0);
}

#[test]
fn bf16_rounding_is_nearest_even_and_nan_preserving() {
    let mut rng = rng();
    let n = 100_000;
    let mut x: Vec<f32> = (0..n).map(|_| f32::from_bits(rng.random())).collect();
    // Ties and the boundaries: exact halfway cases round to even.
    x.extend([
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
        f32::MAX,
        f32::MIN_POSITIVE,
        -0.0,
    ]);
    let mut y = vec![0xAAAAu16; x.len()];
    run(
        "selftest_bf16_round",
        x.len().div_ceil(256) as u32,
        256,
        Args::new()
            .ptr(ptr(&x))
            .ptr(mut_ptr(&mut y))
            .i32(x.len() as i32),
    )
    .unwrap();
    for (&v, &b) in x.iter().zip(&y) {
        if v.is_nan() {
            assert_eq!(b, 0x7FFF, "NaN {:#x}", v.to_bits());
        } else {
            assert_eq!(b, bf16::from_f32(v).to_bits(), "{v:e} ({:#x})", v.to_bits());
        }
    }
}

#[test]
fn divergent_barrier_is_reported_with_both_lines() {
    let mut y = vec![0.0f32; 64];
    let e = error_of(
        "selftest_bad_divergent_barrier",
        64,
        Args::new().ptr(mut_ptr(&mut y)),
    );
    assert!(e.contains("divergent barrier"), "{e}");
    assert_eq!(e.matches("selftest.cu:").count(), 2, "{e}");
}

#[test]
fn deadlock_is_reported() {
    let mut y = vec![0.0f32; 64];
    let e = error_of(
        "selftest_bad_deadlock",
        64,
        Args::new().ptr(mut_ptr(&mut y)),
    );
    assert!(e.contains("deadlock"), "{e}");
}

#[test]
fn partial_warp_collective_is_reported() {
    let mut y = vec![0.0f32; 64];
    let e = error_of(
        "selftest_bad_partial_warp",
        64,
        Args::new().ptr(mut_ptr(&mut y)),
    );
    assert!(e.contains("exited"), "{e}");
}

#[test]
fn exiting_with_pending_copies_is_reported() {
    let x = [0.0f32; 4];
    let mut y = vec![0.0f32; 32];
    let e = error_of(
        "selftest_bad_pending_copy",
        32,
        Args::new().ptr(ptr(&x)).ptr(mut_ptr(&mut y)),
    );
    assert!(e.contains("never waited"), "{e}");
}

#[test]
fn bad_launch_shapes_are_errors() {
    let mut y = vec![0.0f32; 64];
    for block in [0u32, 2048] {
        let e = error_of(
            "selftest_bad_deadlock",
            block,
            Args::new().ptr(mut_ptr(&mut y)),
        );
        assert!(e.contains("invalid launch shape"), "{e}");
    }
}

#[test]
fn launches_on_parallel_threads_are_independent() {
    let handles: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let x: Vec<f32> = (0..256 * 8).map(|i| ((i * 7 + t) % 13) as f32).collect();
                let mut out = vec![f32::NAN; 16];
                for _ in 0..20 {
                    run(
                        "selftest_block_reduce",
                        8,
                        256,
                        Args::new().ptr(ptr(&x)).ptr(mut_ptr(&mut out)),
                    )
                    .unwrap();
                    for (b, chunk) in x.chunks(256).enumerate() {
                        assert_eq!(out[2 * b], chunk.iter().sum::<f32>());
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}
