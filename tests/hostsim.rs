//! The host emulator itself: warp collectives, block reductions, the mma.sync / ldmatrix
//! fragment layouts and cp.async reproduce CUDA semantics on fresh random data, and broken
//! kernels (divergent barrier, deadlock, partial-warp collective, un-waited copy) are
//! reported as errors, never run to a wrong answer. The Hopper part: wgmma against a CPU GEMM
//! in every operand layout, its layouts against tables transcribed from the PTX ISA, mbarrier
//! phases, and the broken Hopper kernels (missing wait_group, wrong parity, wrong expect_tx,
//! deadlock, partial warpgroup). Runs in both thread orders in CI.
#![cfg(feature = "hostsim")]

use half::bf16;
use rand::rngs::StdRng;
use rand::RngExt;
use ultrapixel::runtime::hostsim::{launch, set_race_check};
use ultrapixel::runtime::kernels::KernelId;
use ultrapixel::runtime::launch::{Args, Launch};
use ultrapixel::runtime::tensor_map::{TensorMap, TensorMapSpec, TmaDtype, TmaSwizzle};
use ultrapixel::runtime::BackendKind;

#[path = "common/guarded_buf.rs"]
mod guarded_buf;
use guarded_buf::rng;

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
    let x = vec![0.0f32; 4]; // heap: 16-byte aligned, as cp.async needs
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

// ---------------------------------------------------------------------------------------------
// Hopper: wgmma and mbarrier (kernels/selftest_sm90a.cu, kernels/common/hopper_sm90a.cuh)
// ---------------------------------------------------------------------------------------------

/// A launch of one block with `smem` bytes of dynamic shared memory.
fn run_smem(name: &str, block: u32, smem: u32, args: Args) -> ultrapixel::Result<()> {
    let mut l = Launch::linear(KernelId::lookup(name)?, 1, block, args);
    l.smem = smem;
    launch(&mut l)
}

fn smem_error_of(name: &str, block: u32, smem: u32, args: Args) -> String {
    match run_smem(name, block, smem, args) {
        Ok(()) => panic!("{name}: the emulator accepted a broken kernel"),
        Err(e) => e.to_string(),
    }
}

/// The 64-bit wgmma matrix descriptor as the PTX ISA defines it ("Matrix Descriptor Format"):
/// start address, leading and stride dimension byte offsets as (bytes & 0x3FFFF) >> 4 in bits
/// 0-13, 16-29 and 32-45; base offset 0 (bits 49-51); swizzle mode in bits 62-63 (0 none,
/// 1 128-byte, 2 64-byte, 3 32-byte).
fn matrix_desc(start: usize, lbo: usize, sbo: usize, swizzle: usize) -> u64 {
    let mode: u64 = match swizzle {
        0 => 0,
        128 => 1,
        64 => 2,
        32 => 3,
        _ => unreachable!("swizzle {swizzle}"),
    };
    let field = |bytes: usize| ((bytes as u64) & 0x3FFFF) >> 4;
    field(start) | field(lbo) << 16 | field(sbo) << 32 | mode << 62
}

/// Writes a bf16 into a shared-memory image.
fn put(image: &mut [u8], at: usize, v: bf16) {
    image[at..at + 2].copy_from_slice(&v.to_bits().to_le_bytes());
}

/// One wgmma selftest launch: (image, descriptors per step, mode, A registers) → the raw
/// accumulator fragments, 128 threads × n/2, poisoned before the launch.
struct WgmmaRun<'a> {
    n: usize,
    image: &'a [u8],
    descs_a: &'a [u64],
    descs_b: &'a [u64],
    a_regs: &'a [u32],
    mode: i32,
}

impl WgmmaRun<'_> {
    fn run(&self) -> Vec<f32> {
        let mut d = vec![f32::from_bits(0x7FC0_1234); 64 * self.n];
        assert_eq!(self.image.len() % 16, 0);
        // An absent register operand still needs a valid address.
        let regs: &[u32] = if self.a_regs.is_empty() {
            &[0]
        } else {
            self.a_regs
        };
        run_smem(
            &format!("selftest_wgmma_n{}", self.n),
            128,
            self.image.len() as u32,
            Args::new()
                .ptr(ptr(self.image))
                .i32(self.image.len() as i32)
                .ptr(ptr(regs))
                .ptr(ptr(self.descs_a))
                .ptr(ptr(self.descs_b))
                .i32(self.descs_b.len() as i32)
                .i32(self.mode)
                .ptr(mut_ptr(&mut d)),
        )
        .unwrap();
        d
    }
}

// --- the PTX ISA's layouts, transcribed ------------------------------------------------------
// Written from the figures and tables of the PTX ISA ("Register Fragments and Shared Memory
// Matrix Layouts" of wgmma), not derived from the emulator or the kernels.

/// Figure "WGMMA .m64nNk16 register fragment layout for accumulator matrix D", rows 0-15 and
/// columns 0-7: thread:value holding D[row][col]. Warp w holds rows 16w.. (threads + 32w);
/// each further 8 columns use the next 4 values (d4-d7 for columns 8-15, ...).
const D_FIGURE: [&str; 16] = [
    "T0:d0 T0:d1 T1:d0 T1:d1 T2:d0 T2:d1 T3:d0 T3:d1",
    "T4:d0 T4:d1 T5:d0 T5:d1 T6:d0 T6:d1 T7:d0 T7:d1",
    "T8:d0 T8:d1 T9:d0 T9:d1 T10:d0 T10:d1 T11:d0 T11:d1",
    "T12:d0 T12:d1 T13:d0 T13:d1 T14:d0 T14:d1 T15:d0 T15:d1",
    "T16:d0 T16:d1 T17:d0 T17:d1 T18:d0 T18:d1 T19:d0 T19:d1",
    "T20:d0 T20:d1 T21:d0 T21:d1 T22:d0 T22:d1 T23:d0 T23:d1",
    "T24:d0 T24:d1 T25:d0 T25:d1 T26:d0 T26:d1 T27:d0 T27:d1",
    "T28:d0 T28:d1 T29:d0 T29:d1 T30:d0 T30:d1 T31:d0 T31:d1",
    "T0:d2 T0:d3 T1:d2 T1:d3 T2:d2 T2:d3 T3:d2 T3:d3",
    "T4:d2 T4:d3 T5:d2 T5:d3 T6:d2 T6:d3 T7:d2 T7:d3",
    "T8:d2 T8:d3 T9:d2 T9:d3 T10:d2 T10:d3 T11:d2 T11:d3",
    "T12:d2 T12:d3 T13:d2 T13:d3 T14:d2 T14:d3 T15:d2 T15:d3",
    "T16:d2 T16:d3 T17:d2 T17:d3 T18:d2 T18:d3 T19:d2 T19:d3",
    "T20:d2 T20:d3 T21:d2 T21:d3 T22:d2 T22:d3 T23:d2 T23:d3",
    "T24:d2 T24:d3 T25:d2 T25:d3 T26:d2 T26:d3 T27:d2 T27:d3",
    "T28:d2 T28:d3 T29:d2 T29:d3 T30:d2 T30:d3 T31:d2 T31:d3",
];

/// Figure "WGMMA .m64nNk16 register fragment layout for matrix A", rows 0-15 (all 16
/// columns): thread:element holding A[row][col], element i in register i/2 (low half first).
/// Warp w holds rows 16w.. (threads + 32w).
const A_FIGURE: [&str; 16] = [
    "T0:a0 T0:a1 T1:a0 T1:a1 T2:a0 T2:a1 T3:a0 T3:a1 T0:a4 T0:a5 T1:a4 T1:a5 T2:a4 T2:a5 T3:a4 T3:a5",
    "T4:a0 T4:a1 T5:a0 T5:a1 T6:a0 T6:a1 T7:a0 T7:a1 T4:a4 T4:a5 T5:a4 T5:a5 T6:a4 T6:a5 T7:a4 T7:a5",
    "T8:a0 T8:a1 T9:a0 T9:a1 T10:a0 T10:a1 T11:a0 T11:a1 T8:a4 T8:a5 T9:a4 T9:a5 T10:a4 T10:a5 T11:a4 T11:a5",
    "T12:a0 T12:a1 T13:a0 T13:a1 T14:a0 T14:a1 T15:a0 T15:a1 T12:a4 T12:a5 T13:a4 T13:a5 T14:a4 T14:a5 T15:a4 T15:a5",
    "T16:a0 T16:a1 T17:a0 T17:a1 T18:a0 T18:a1 T19:a0 T19:a1 T16:a4 T16:a5 T17:a4 T17:a5 T18:a4 T18:a5 T19:a4 T19:a5",
    "T20:a0 T20:a1 T21:a0 T21:a1 T22:a0 T22:a1 T23:a0 T23:a1 T20:a4 T20:a5 T21:a4 T21:a5 T22:a4 T22:a5 T23:a4 T23:a5",
    "T24:a0 T24:a1 T25:a0 T25:a1 T26:a0 T26:a1 T27:a0 T27:a1 T24:a4 T24:a5 T25:a4 T25:a5 T26:a4 T26:a5 T27:a4 T27:a5",
    "T28:a0 T28:a1 T29:a0 T29:a1 T30:a0 T30:a1 T31:a0 T31:a1 T28:a4 T28:a5 T29:a4 T29:a5 T30:a4 T30:a5 T31:a4 T31:a5",
    "T0:a2 T0:a3 T1:a2 T1:a3 T2:a2 T2:a3 T3:a2 T3:a3 T0:a6 T0:a7 T1:a6 T1:a7 T2:a6 T2:a7 T3:a6 T3:a7",
    "T4:a2 T4:a3 T5:a2 T5:a3 T6:a2 T6:a3 T7:a2 T7:a3 T4:a6 T4:a7 T5:a6 T5:a7 T6:a6 T6:a7 T7:a6 T7:a7",
    "T8:a2 T8:a3 T9:a2 T9:a3 T10:a2 T10:a3 T11:a2 T11:a3 T8:a6 T8:a7 T9:a6 T9:a7 T10:a6 T10:a7 T11:a6 T11:a7",
    "T12:a2 T12:a3 T13:a2 T13:a3 T14:a2 T14:a3 T15:a2 T15:a3 T12:a6 T12:a7 T13:a6 T13:a7 T14:a6 T14:a7 T15:a6 T15:a7",
    "T16:a2 T16:a3 T17:a2 T17:a3 T18:a2 T18:a3 T19:a2 T19:a3 T16:a6 T16:a7 T17:a6 T17:a7 T18:a6 T18:a7 T19:a6 T19:a7",
    "T20:a2 T20:a3 T21:a2 T21:a3 T22:a2 T22:a3 T23:a2 T23:a3 T20:a6 T20:a7 T21:a6 T21:a7 T22:a6 T22:a7 T23:a6 T23:a7",
    "T24:a2 T24:a3 T25:a2 T25:a3 T26:a2 T26:a3 T27:a2 T27:a3 T24:a6 T24:a7 T25:a6 T25:a7 T26:a6 T26:a7 T27:a6 T27:a7",
    "T28:a2 T28:a3 T29:a2 T29:a3 T30:a2 T30:a3 T31:a2 T31:a3 T28:a6 T28:a7 T29:a6 T29:a7 T30:a6 T30:a7 T31:a6 T31:a7",
];

/// The swizzle atoms of the figures "K major / MN major 128B, 64B, 32B swizzling": 8 rows of
/// `span` bytes in 16-byte chunks; entry [row][logical chunk] is the chunk it is stored in.
/// (The pattern repeats every 1024 / 512 / 256 bytes from an aligned start; rows are along
/// M/N for K-major operands and along K for MN-major ones.)
const SWIZZLE_128B: [[usize; 8]; 8] = [
    [0, 1, 2, 3, 4, 5, 6, 7],
    [1, 0, 3, 2, 5, 4, 7, 6],
    [2, 3, 0, 1, 6, 7, 4, 5],
    [3, 2, 1, 0, 7, 6, 5, 4],
    [4, 5, 6, 7, 0, 1, 2, 3],
    [5, 4, 7, 6, 1, 0, 3, 2],
    [6, 7, 4, 5, 2, 3, 0, 1],
    [7, 6, 5, 4, 3, 2, 1, 0],
];
const SWIZZLE_64B: [[usize; 4]; 8] = [
    [0, 1, 2, 3],
    [0, 1, 2, 3],
    [1, 0, 3, 2],
    [1, 0, 3, 2],
    [2, 3, 0, 1],
    [2, 3, 0, 1],
    [3, 2, 1, 0],
    [3, 2, 1, 0],
];
const SWIZZLE_32B: [[usize; 2]; 8] = [
    [0, 1],
    [0, 1],
    [0, 1],
    [0, 1],
    [1, 0],
    [1, 0],
    [1, 0],
    [1, 0],
];

fn swizzled_chunk(span: usize, row: usize, chunk: usize) -> usize {
    match span {
        128 => SWIZZLE_128B[row][chunk],
        64 => SWIZZLE_64B[row][chunk],
        32 => SWIZZLE_32B[row][chunk],
        _ => unreachable!(),
    }
}

/// Parses "T<thread>:<letter><index>".
fn figure_cell(cell: &str) -> (usize, usize) {
    let (t, v) = cell.split_once(':').unwrap();
    (t[1..].parse().unwrap(), v[1..].parse().unwrap())
}

/// (thread, value) holding D[row][col] by D_FIGURE.
fn d_holder(row: usize, col: usize) -> (usize, usize) {
    let (t, v) = figure_cell(D_FIGURE[row % 16].split(' ').nth(col % 8).unwrap());
    (t + 32 * (row / 16), v + 4 * (col / 8))
}

/// (thread, element) holding A[row][col] by A_FIGURE.
fn a_holder(row: usize, col: usize) -> (usize, usize) {
    let (t, i) = figure_cell(A_FIGURE[row % 16].split(' ').nth(col).unwrap());
    (t + 32 * (row / 16), i)
}

/// The 64×n product out of raw accumulator fragments, by the figure.
fn d_matrix(frags: &[f32], n: usize) -> Vec<f32> {
    let mut d = vec![0.0; 64 * n];
    for row in 0..64 {
        for col in 0..n {
            let (t, v) = d_holder(row, col);
            d[row * n + col] = frags[t * n / 2 + v];
        }
    }
    d
}

/// Where the ISA's canonical layout puts element (mn, k) (k < 16) of an operand whose tile
/// starts at `base` (1024-aligned), with the strides named as the ISA's "Strides" section
/// defines them. K-major: no swizzle: core matrices of 8 mn-rows × 16 bytes, LBO between the
/// two k-halves, SBO between 8-row groups; swizzled: rows of `span` bytes along mn, SBO
/// between 8-row groups, the k-step's 32 bytes at byte `k_off` of the row. MN-major: no
/// swizzle: core matrices of 8 k-rows × 8 contiguous mn, SBO between mn groups, LBO between
/// k-halves; swizzled: rows of span/2 contiguous mn along k, SBO between 8-row k groups, LBO
/// between span-wide mn groups.
struct IsaLayout {
    span: usize,
    mn_major: bool,
    lbo: usize,
    sbo: usize,
    k_off: usize,
}

impl IsaLayout {
    fn address(&self, base: usize, mn: usize, k: usize) -> usize {
        let (w, e) = (self.span, self.span / 2);
        if w == 0 {
            return if self.mn_major {
                base + (mn / 8) * self.sbo + (k / 8) * self.lbo + (k % 8) * 16 + (mn % 8) * 2
            } else {
                base + (mn / 8) * self.sbo + (k / 8) * self.lbo + (mn % 8) * 16 + (k % 8) * 2
            };
        }
        // (8-row group offset, row in the atom, byte in the row)
        let (group, row, byte) = if self.mn_major {
            (
                (k / 8) * self.sbo + (mn / e) * self.lbo,
                k % 8,
                (mn % e) * 2,
            )
        } else {
            ((mn / 8) * self.sbo, mn % 8, self.k_off + k * 2)
        };
        base + group + row * w + swizzled_chunk(w, row, byte / 16) * 16 + byte % 16
    }

    /// The descriptor of the operand at `base`, which is where its swizzle pattern starts: off
    /// the pattern's natural boundary, the base offset (bits 49-51) is (base >> 7) & 7.
    fn desc(&self, base: usize) -> u64 {
        let base_offset = if self.span == 0 {
            0
        } else {
            (base as u64 >> 7) & 7
        };
        matrix_desc(base + self.k_off, self.lbo, self.sbo, self.span) | base_offset << 49
    }
}

/// The 1024 distinct values code(i), i < 1024, all exact in bf16: (1 + (i % 128)/128)·2^(i/128).
fn code(i: usize) -> bf16 {
    bf16::from_f32((1.0 + (i % 128) as f32 / 128.0) * (1u32 << (i / 128)) as f32)
}

/// A selector operand S (16 × 16 of an operand, K-major, no swizzle, at `base`) with
/// S[mn][k] = 1 where mn == k: multiplying by it copies the other operand's 16 k-values.
fn put_selector(image: &mut [u8], base: usize, rows: usize) -> u64 {
    let l = IsaLayout {
        span: 0,
        mn_major: false,
        lbo: 128,
        sbo: 256,
        k_off: 0,
    };
    for mn in 0..rows {
        for k in 0..16 {
            let v = if mn == k { 1.0 } else { 0.0 };
            put(image, l.address(base, mn, k), bf16::from_f32(v));
        }
    }
    l.desc(base)
}

/// Every canonical shared-memory layout of the ISA, for A and for B, with both major-nesses,
/// every swizzle, (K-major swizzled) every k-step inside a row and (swizzled) a pattern that
/// starts off its boundary (a base offset), and the register layouts of A and D: data laid
/// out by the transcribed tables must come back element by element.
#[test]
fn wgmma_layouts_match_the_ptx_isa_tables() {
    let mut cases = 0;
    for (span, base) in [
        (0, 0),
        (32, 0),
        (32, 384),
        (64, 0),
        (64, 384),
        (128, 0),
        (128, 384),
    ] {
        for mn_major in [false, true] {
            let k_offs: Vec<usize> = if mn_major || span == 0 {
                vec![0]
            } else {
                (0..span / 32).map(|s| 32 * s).collect()
            };
            for k_off in k_offs {
                // No swizzle: strides that interleave the groups; swizzled: packed atoms, and
                // for MN-major a second span-wide mn group 4 KiB on.
                let (lbo, sbo) = match (span, mn_major) {
                    (0, _) => (128, 256),
                    (_, false) => (16, 8 * span),
                    (_, true) => (4096, 8 * span),
                };
                let l = IsaLayout {
                    span,
                    mn_major,
                    lbo,
                    sbo,
                    k_off,
                };
                for operand_a in [true, false] {
                    // The operand under test at `base` (64 rows), the selector at 16 KiB.
                    let mut image = vec![0u8; 20 * 1024];
                    for mn in 0..64 {
                        for k in 0..16 {
                            put(&mut image, l.address(base, mn, k), code(mn * 16 + k));
                        }
                    }
                    let sel = put_selector(&mut image, 16 * 1024, 16);
                    let (da, db, mode) = if operand_a {
                        (l.desc(base), sel, mn_major as i32)
                    } else {
                        (sel, l.desc(base), 2 * mn_major as i32)
                    };
                    let frags = WgmmaRun {
                        n: 64,
                        image: &image,
                        descs_a: &[da],
                        descs_b: &[db],
                        a_regs: &[],
                        mode,
                    }
                    .run();
                    let d = d_matrix(&frags, 64);
                    let what = format!(
                        "{} {}-major, swizzle {span} from {base}, k offset {k_off}",
                        if operand_a { "A" } else { "B" },
                        if mn_major { "MN" } else { "K" }
                    );
                    for mn in 0..64 {
                        for k in 0..16 {
                            // A·S: D[m][k] = A[m][k]; S·B: D[k][n] = B[n][k] (B stored N×K).
                            let got = if operand_a {
                                d[mn * 64 + k]
                            } else {
                                d[k * 64 + mn]
                            };
                            assert_eq!(
                                got,
                                code(mn * 16 + k).to_f32(),
                                "{what}: element ({mn}, {k})"
                            );
                        }
                    }
                    cases += 1;
                }
            }
        }
    }
    // Per operand: no swizzle 2; 32-byte 2, 64-byte 3, 128-byte 5 (k offsets 0..span/32),
    // each from two bases.
    assert_eq!(cases, 2 * (2 + 2 * (2 + 3 + 5)));

    // A from registers: thread t's element i holds (2t + 1)·2^i (exact, and distinct per
    // (t, i)); times the selector, D[m][k] = A[m][k] must be what A_FIGURE puts there.
    let mut image = vec![0u8; 4096];
    let sel = put_selector(&mut image, 0, 16);
    let regs: Vec<u32> = (0..128)
        .flat_map(|t| {
            (0..4).map(move |w| {
                let half = |i: usize| {
                    bf16::from_f32((2 * t + 1) as f32 * (1u32 << i) as f32).to_bits() as u32
                };
                half(2 * w) | half(2 * w + 1) << 16
            })
        })
        .collect();
    let frags = WgmmaRun {
        n: 64,
        image: &image,
        descs_a: &[0],
        descs_b: &[sel],
        a_regs: &regs,
        mode: 4,
    }
    .run();
    let d = d_matrix(&frags, 64);
    for m in 0..64 {
        for k in 0..16 {
            let (t, i) = a_holder(m, k);
            assert_eq!(
                d[m * 64 + k],
                ((2 * t + 1) << i) as f32,
                "A[{m}][{k}] from registers"
            );
        }
        for n in 16..64 {
            assert_eq!(d[m * 64 + n], 0.0, "D[{m}][{n}]");
        }
    }
}

/// Step s (k 16s..16s+16) of a rows × 64 operand tile at `base` in the canonical layouts: its
/// layout and the base its addresses start from.
fn step_layout(span: usize, mn_major: bool, rows: usize, s: usize) -> (IsaLayout, usize) {
    let k0 = 16 * s;
    let (lbo, sbo, k_off, base) = match (span, mn_major) {
        // Core matrices interleaved: the two k-halves 128 bytes apart, 8-row groups 256 apart.
        (0, false) => (128, 256, 0, s * rows * 32),
        // Rows of span bytes; the 64 k span/2 at a time in column blocks of rows·span bytes.
        (w, false) => (16, 8 * w, (k0 % (w / 2)) * 2, (k0 / (w / 2)) * rows * w),
        // Core matrices along mn 128 bytes apart, the k-halves rows·16 apart.
        (0, true) => (rows * 16, 128, 0, s * 2 * rows * 16),
        // 8-row k groups of span-byte rows, span-wide mn groups 64·span apart.
        (w, true) => (64 * w, 8 * w, 0, s * 16 * w),
    };
    (
        IsaLayout {
            span,
            mn_major,
            lbo,
            sbo,
            k_off,
        },
        base,
    )
}

/// Lays a rows × 64 operand (row-major [mn][k]) out at `base`; returns each step's descriptor.
fn put_tile(
    image: &mut [u8],
    base: usize,
    x: &[bf16],
    rows: usize,
    span: usize,
    mn_major: bool,
) -> Vec<u64> {
    (0..4)
        .map(|s| {
            let (l, at) = step_layout(span, mn_major, rows, s);
            for mn in 0..rows {
                for k in 0..16 {
                    put(image, l.address(base + at, mn, k), x[mn * 64 + 16 * s + k]);
                }
            }
            l.desc(base + at)
        })
        .collect()
}

/// wgmma against a CPU GEMM: D (64×n) = A (64×64) · B (64×n, stored [n][k]) over 4 k-steps,
/// for n 64, 128 and 256, every swizzle, A K-major, MN-major or in registers, B K-major or
/// MN-major; fresh random operands.
#[test]
fn wgmma_matches_a_cpu_gemm_in_every_layout() {
    let mut rng = rng();
    for n in [64, 128, 256] {
        let a = bf16_values(&mut rng, 64 * 64);
        let b = bf16_values(&mut rng, n * 64);
        // A's register fragments of each step, by the ISA figure.
        let mut regs = vec![0u32; 4 * 128 * 4];
        for s in 0..4 {
            for m in 0..64 {
                for k in 0..16 {
                    let (t, i) = a_holder(m, k);
                    let bits = a[m * 64 + 16 * s + k].to_bits() as u32;
                    regs[(s * 128 + t) * 4 + i / 2] |= bits << (16 * (i % 2));
                }
            }
        }
        for span in [0, 32, 64, 128] {
            for (a_mn_major, a_in_regs) in [(false, false), (true, false), (false, true)] {
                for b_mn_major in [false, true] {
                    let mut image = vec![0u8; 8192 + 128 * n];
                    let descs_a = put_tile(&mut image, 0, &a, 64, span, a_mn_major);
                    let descs_b = put_tile(&mut image, 8192, &b, n, span, b_mn_major);
                    let frags = WgmmaRun {
                        n,
                        image: &image,
                        descs_a: &descs_a,
                        descs_b: &descs_b,
                        a_regs: if a_in_regs { &regs } else { &[] },
                        mode: a_mn_major as i32
                            | (b_mn_major as i32) << 1
                            | (a_in_regs as i32) << 2,
                    }
                    .run();
                    let d = d_matrix(&frags, n);
                    let what = format!(
                        "n {n}, swizzle {span}, A {}, B {}",
                        if a_in_regs {
                            "in registers"
                        } else if a_mn_major {
                            "MN-major"
                        } else {
                            "K-major"
                        },
                        if b_mn_major { "MN-major" } else { "K-major" }
                    );
                    for m in 0..64 {
                        for j in 0..n {
                            let terms =
                                (0..64).map(|k| a[m * 64 + k].to_f64() * b[j * 64 + k].to_f64());
                            let want: f64 = terms.clone().sum();
                            let scale: f64 = terms.map(f64::abs).sum();
                            let got = d[m * n + j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + scale),
                                "{what}: D[{m}][{j}] = {got}, expected {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn reading_accumulators_before_wgmma_wait_sees_nan() {
    let mut y = vec![0.0f32; 256];
    run_smem(
        "selftest_bad_wgmma_missing_wait",
        128,
        2048,
        Args::new().ptr(mut_ptr(&mut y)),
    )
    .unwrap();
    assert!(y[..128].iter().all(|v| v.is_nan()), "{:?}", &y[..4]);
    assert!(y[128..].iter().all(|&v| v == 16.0), "{:?}", &y[128..132]);
}

#[test]
fn warpgroup_instructions_need_four_warps() {
    let mut y = vec![0.0f32; 96];
    let e = error_of(
        "selftest_bad_wgmma_partial_warpgroup",
        96,
        Args::new().ptr(mut_ptr(&mut y)),
    );
    assert!(e.contains("warpgroup 0 has 96 threads"), "{e}");
}

/// A two-stage producer/consumer ring through 7 rounds: both parities of both stages, the
/// producer's pass-through first wait, arrive.expect_tx balanced by complete_tx.
#[test]
fn mbarrier_ring_hands_every_round_over() {
    let mut rng = rng();
    let iters = 7;
    let x: Vec<f32> = (0..32 * iters)
        .map(|_| rng.random_range(0..100) as f32)
        .collect();
    let mut y = vec![f32::NAN; 96];
    run_smem(
        "selftest_mbarrier_ring",
        128,
        64 + 256,
        Args::new()
            .ptr(ptr(&x))
            .ptr(mut_ptr(&mut y))
            .i32(iters as i32),
    )
    .unwrap();
    for (c, &got) in y.iter().enumerate() {
        let want: f32 = (0..iters)
            .map(|r| x[r * 32 + c % 32] * (r + 1) as f32)
            .sum();
        assert_eq!(got, want, "consumer {c}");
    }
}

/// The line of `needle` in kernels/selftest_sm90a.cu, as the emulator reports it.
fn selftest_sm90a_line(needle: &str) -> String {
    let src = include_str!("../kernels/selftest_sm90a.cu");
    let line = src.lines().position(|l| l.contains(needle)).unwrap() + 1;
    format!("selftest_sm90a.cu:{line}")
}

#[test]
fn mbarrier_wait_on_the_wrong_parity_is_a_deadlock_at_its_line() {
    let mut y = vec![0.0f32; 128];
    let e = smem_error_of(
        "selftest_bad_mbarrier_parity",
        128,
        8,
        Args::new().ptr(mut_ptr(&mut y)),
    );
    assert!(e.contains("deadlock"), "{e}");
    assert!(
        e.contains("128 threads wait in mbarrier.try_wait.parity"),
        "{e}"
    );
    assert!(
        e.contains(&selftest_sm90a_line("mbarrier_wait_parity(bar, 1);")),
        "{e}"
    );
    assert!(
        e.contains("for parity 1") && e.contains("completed 1 phases"),
        "{e}"
    );
    assert!(e.contains("0 exited"), "{e}");
}

#[test]
fn mbarrier_missing_arrival_is_a_deadlock() {
    let mut y = vec![0.0f32; 128];
    let e = smem_error_of(
        "selftest_bad_mbarrier_deadlock",
        128,
        8,
        Args::new().ptr(mut_ptr(&mut y)),
    );
    assert!(
        e.contains("deadlock") && e.contains("misses 1 of 2 arrivals"),
        "{e}"
    );
}

#[test]
fn mbarrier_transaction_bytes_must_match_expect_tx() {
    let mut y = vec![0.0f32; 128];
    let mut launch_with = |expected: u32, arrived: u32| {
        smem_error_of(
            "selftest_bad_mbarrier_expect_tx",
            128,
            8,
            Args::new().ptr(mut_ptr(&mut y)).u32(expected).u32(arrived),
        )
    };
    // Too few bytes: the phase never completes.
    let e = launch_with(256, 128);
    assert!(
        e.contains("deadlock") && e.contains("and 128 transaction bytes"),
        "{e}"
    );
    // Too many: reported when they arrive.
    let e = launch_with(128, 256);
    assert!(
        e.contains("128 transaction bytes more than expect_tx announced"),
        "{e}"
    );
}

// --- TMA -----------------------------------------------------------------------------------

/// A 16-byte aligned byte buffer (TMA's global address rule) of `n` bytes.
struct Global(Vec<u128>, usize);

impl Global {
    fn new(rng: &mut StdRng, n: usize) -> Self {
        let mut g = Global(vec![0; n.div_ceil(16)], n);
        g.bytes_mut().iter_mut().for_each(|b| *b = rng.random());
        g
    }
    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.0)[..self.1]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        let n = self.1;
        &mut bytemuck::cast_slice_mut(&mut self.0)[..n]
    }
    fn addr(&self) -> u64 {
        self.0.as_ptr() as u64
    }
}

/// One TMA case: a tensor of `dims` (innermost first) with rows padded to `strides`, a box at
/// `coords` (possibly past either end).
struct TmaCase {
    dtype: TmaDtype,
    dims: Vec<u64>,
    strides: Vec<u64>,
    box_dims: Vec<u32>,
    element_strides: Vec<u32>,
    swizzle: TmaSwizzle,
    coords: Vec<i32>,
}

impl TmaCase {
    fn bytes(&self) -> usize {
        (self.strides.last().unwrap() * self.dims.last().unwrap()) as usize
    }

    fn spec(&self, g: &Global) -> TensorMapSpec {
        TensorMapSpec {
            dtype: self.dtype,
            global_address: g.addr(),
            dims: self.dims.clone(),
            strides: self.strides.clone(),
            box_dims: self.box_dims.clone(),
            element_strides: self.element_strides.clone(),
            swizzle: self.swizzle,
        }
    }

    /// For each element of the box in shared-memory order: its global byte offset, or None
    /// out of range.
    fn elements(&self) -> Vec<Option<usize>> {
        let sides: Vec<usize> = self
            .box_dims
            .iter()
            .zip(&self.element_strides)
            .map(|(&b, &e)| b.div_ceil(e) as usize)
            .collect();
        let esize = self.dtype.bytes() as usize;
        (0..sides.iter().product::<usize>())
            .map(|e| {
                let mut rest = e;
                let mut off = 0usize;
                let mut inside = true;
                for (d, &side) in sides.iter().enumerate() {
                    let g = self.coords[d] as i64
                        + (rest % side) as i64 * self.element_strides[d] as i64;
                    rest /= side;
                    inside &= g >= 0 && g < self.dims[d] as i64;
                    let stride = if d == 0 {
                        esize
                    } else {
                        self.strides[d - 1] as usize
                    };
                    off = off.wrapping_add((g as usize).wrapping_mul(stride));
                }
                inside.then_some(off)
            })
            .collect()
    }

    /// Where byte `o` of the dense box lies in shared memory, by the ISA's swizzle figures
    /// (rows of `span` bytes, the pattern starting at the 1024-aligned tile).
    fn placed(&self, o: usize) -> usize {
        let w = self.swizzle.span() as usize;
        if w == 0 {
            return o;
        }
        let (row, chunk) = ((o / w) % 8, (o % w) / 16);
        o - o % w + swizzled_chunk(w, row, chunk) * 16 + o % 16
    }

    /// The CPU model of the load: the box as it lies in shared memory.
    fn model(&self, src: &[u8]) -> Vec<u8> {
        let esize = self.dtype.bytes() as usize;
        let elements = self.elements();
        let mut tile = vec![0u8; elements.len() * esize];
        for (e, at) in elements.iter().enumerate() {
            for b in 0..esize {
                tile[self.placed(e * esize + b)] = at.map_or(0, |o| src[o + b]);
            }
        }
        tile
    }
}

/// Runs selftest_tma: returns the tile as read before the wait and after it.
fn run_tma(
    case: &TmaCase,
    src: &Global,
    dst: &Global,
    expect: u32,
    flags: i32,
) -> ultrapixel::Result<(Vec<u8>, Vec<u8>)> {
    let box_bytes = case.spec(src).box_bytes() as u32;
    let load = case.spec(src).encode(BackendKind::Hostsim)?;
    let store = case.spec(dst).encode(BackendKind::Hostsim)?;
    let mut coords = case.coords.clone();
    coords.resize(5, 0);
    let mut out = vec![0x11u8; 2 * box_bytes as usize];
    run_smem(
        "selftest_tma",
        128,
        1024 + box_bytes,
        Args::new()
            .tensor_map(&load)
            .tensor_map(&store)
            .i32(case.dims.len() as i32)
            .ptr(ptr(&coords))
            .u32(expect)
            .u32(box_bytes)
            .i32(flags)
            .ptr(mut_ptr(&mut out)),
    )?;
    let after = out.split_off(box_bytes as usize);
    Ok((out, after))
}

/// Odd shapes in every rank and swizzle, boxes hanging off both ends, element strides.
fn tma_cases(rng: &mut StdRng) -> Vec<TmaCase> {
    let mut c = |dtype, dims: Vec<u64>, box_dims: Vec<u32>, es: Vec<u32>, swizzle| {
        let esize = match dtype {
            TmaDtype::F32 => 4,
            _ => 2,
        };
        // Rows padded to 16 bytes and a random extra 0-2 × 16.
        let mut strides = Vec::new();
        let mut s = (dims[0] * esize).div_ceil(16) * 16 + 16 * rng.random_range(0..3u64);
        for &n in &dims[1..] {
            strides.push(s);
            s = (s * n).div_ceil(16) * 16;
        }
        let coords = dims
            .iter()
            .zip(&box_dims)
            .map(|(&n, &b)| rng.random_range(-(b as i32) / 2..n as i32 - b as i32 / 2))
            .collect();
        TmaCase {
            dtype,
            dims,
            strides,
            box_dims,
            element_strides: es,
            swizzle,
            coords,
        }
    };
    vec![
        c(
            TmaDtype::Bf16,
            vec![37, 23],
            vec![24, 5],
            vec![1, 1],
            TmaSwizzle::None,
        ),
        c(
            TmaDtype::Bf16,
            vec![70, 19],
            vec![64, 16],
            vec![1, 1],
            TmaSwizzle::B128,
        ),
        c(
            TmaDtype::F32,
            vec![20, 7, 5],
            vec![16, 4, 3],
            vec![1, 2, 1],
            TmaSwizzle::B64,
        ),
        c(
            TmaDtype::Bf16,
            vec![21, 3, 4, 3],
            vec![16, 3, 2, 2],
            vec![1, 1, 3, 1],
            TmaSwizzle::B32,
        ),
        c(
            TmaDtype::Bf16,
            vec![66, 3, 2, 3, 2],
            vec![64, 2, 2, 2, 2],
            vec![1; 5],
            TmaSwizzle::B128,
        ),
        c(
            TmaDtype::F32,
            vec![9, 5, 2, 3, 4],
            vec![12, 3, 1, 2, 3],
            vec![1, 1, 1, 2, 1],
            TmaSwizzle::None,
        ),
    ]
}

/// TMA loads against a CPU model of the copy (zero fill out of range, the ISA's swizzle
/// figures), and the TMA store writing back exactly the in-range elements.
#[test]
fn tma_loads_and_stores_match_a_cpu_model() {
    let mut rng = rng();
    for case in tma_cases(&mut rng) {
        let src = Global::new(&mut rng, case.bytes());
        let mut dst = Global::new(&mut rng, case.bytes());
        let before = dst.bytes().to_vec();
        let box_bytes = case.spec(&src).box_bytes() as u32;
        let (_, tile) = run_tma(&case, &src, &dst, box_bytes, 2).unwrap();
        let what = format!(
            "{:?} box {:?} at {:?}",
            case.swizzle, case.box_dims, case.coords
        );
        assert_eq!(tile, case.model(src.bytes()), "{what}: the loaded tile");
        let mut want = before;
        let esize = case.dtype.bytes() as usize;
        for at in case.elements().into_iter().flatten() {
            for b in 0..esize {
                want[at + b] = src.bytes()[at + b] ^ 0x5A;
            }
        }
        assert!(
            dst.bytes_mut() == want.as_slice(),
            "{what}: the stored tensor"
        );
    }
}

#[test]
fn tma_destination_is_poison_until_the_barrier_wait() {
    let mut rng = rng();
    let case = tma_cases(&mut rng).swap_remove(1);
    let src = Global::new(&mut rng, case.bytes());
    let dst = Global::new(&mut rng, case.bytes());
    let box_bytes = case.spec(&src).box_bytes() as u32;
    let (early, tile) = run_tma(&case, &src, &dst, box_bytes, 1).unwrap();
    assert!(early.iter().all(|&b| b == 0xFF), "read before the wait");
    assert_eq!(tile, case.model(src.bytes()));
}

#[test]
fn tma_expect_tx_must_be_the_full_box() {
    let mut rng = rng();
    let case = tma_cases(&mut rng).swap_remove(0);
    let src = Global::new(&mut rng, case.bytes());
    let dst = Global::new(&mut rng, case.bytes());
    let box_bytes = case.spec(&src).box_bytes() as u32;
    // Announcing only the in-range bytes (or any fewer): more bytes arrive than announced.
    let e = run_tma(&case, &src, &dst, box_bytes - 16, 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("16 transaction bytes more than expect_tx announced"),
        "{e}"
    );
    let e = run_tma(&case, &src, &dst, box_bytes + 32, 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("deadlock") && e.contains("and 32 transaction bytes"),
        "{e}"
    );
}

#[test]
fn tma_store_of_unfenced_stores_is_reported() {
    let mut rng = rng();
    let case = tma_cases(&mut rng).swap_remove(0);
    let src = Global::new(&mut rng, case.bytes());
    let dst = Global::new(&mut rng, case.bytes());
    let box_bytes = case.spec(&src).box_bytes() as u32;
    let e = run_tma(&case, &src, &dst, box_bytes, 2 | 4)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cp.async.bulk.tensor (store)")
            && e.contains("written by ordinary stores after the last fence.proxy.async")
            && e.contains(&selftest_sm90a_line("case 2: tma_store_2d")),
        "{e}"
    );
}

#[test]
fn tma_refuses_a_map_not_encoded_for_the_emulator() {
    let zero = TensorMap { words: [0; 16] };
    let coords = [0i32; 5];
    let mut out = vec![0u8; 1024];
    let e = smem_error_of(
        "selftest_tma",
        128,
        2048,
        Args::new()
            .tensor_map(&zero)
            .tensor_map(&zero)
            .i32(2)
            .ptr(ptr(&coords))
            .u32(480)
            .u32(480)
            .i32(0)
            .ptr(mut_ptr(&mut out)),
    );
    assert!(e.contains("not encoded for the emulator"), "{e}");
}

/// A and B loaded by TMA with 128-byte swizzle (rows and k past the tensors zero-filled) feed
/// wgmma through 128-byte-swizzled descriptors: the product must be the CPU's.
#[test]
fn tma_loaded_swizzled_tiles_feed_wgmma() {
    let mut rng = rng();
    let (m, n, k) = (50usize, 57usize, 40usize);
    let a = bf16_values(&mut rng, m * k);
    let b = bf16_values(&mut rng, n * k);
    let global = |x: &[bf16], rows: usize| {
        let mut g = Global(vec![0; (rows * k * 2).div_ceil(16)], rows * k * 2);
        g.bytes_mut().copy_from_slice(bytemuck::cast_slice(
            &x.iter().map(|v| v.to_bits()).collect::<Vec<u16>>(),
        ));
        g
    };
    let (ga, gb) = (global(&a, m), global(&b, n));
    let map = |g: &Global, rows: usize| {
        TensorMapSpec {
            dtype: TmaDtype::Bf16,
            global_address: g.addr(),
            dims: vec![k as u64, rows as u64],
            strides: vec![2 * k as u64],
            box_dims: vec![64, 64],
            element_strides: vec![1, 1],
            swizzle: TmaSwizzle::B128,
        }
        .encode(BackendKind::Hostsim)
        .unwrap()
    };
    let mut frags = vec![f32::NAN; 128 * 32];
    run_smem(
        "selftest_tma_wgmma",
        128,
        3 * 8192 + 8,
        Args::new()
            .tensor_map(&map(&ga, m))
            .tensor_map(&map(&gb, n))
            .ptr(mut_ptr(&mut frags)),
    )
    .unwrap();
    let d = d_matrix(&frags, 64);
    for i in 0..64 {
        for j in 0..64 {
            let terms: Vec<f64> = (0..k)
                .map(|kk| {
                    if i < m && j < n {
                        a[i * k + kk].to_f64() * b[j * k + kk].to_f64()
                    } else {
                        0.0
                    }
                })
                .collect();
            let want: f64 = terms.iter().sum();
            let scale: f64 = terms.iter().map(|t| t.abs()).sum();
            let got = d[i * 64 + j] as f64;
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + scale),
                "D[{i}][{j}] = {got}, expected {want}"
            );
        }
    }
}

#[test]
fn wgmma_of_unfenced_stores_is_reported() {
    let mut y = vec![0.0f32; 128];
    let e = smem_error_of(
        "selftest_bad_wgmma_missing_proxy_fence",
        128,
        2048,
        Args::new().ptr(mut_ptr(&mut y)),
    );
    assert!(
        e.contains("wgmma.mma_async operand A")
            && e.contains("after the last fence.proxy.async")
            && e.contains("selftest_sm90a.cu:"),
        "{e}"
    );
}

// --- warpgroup registers and named barriers --------------------------------------------------

#[test]
fn warp_specialized_handover_through_named_barriers() {
    let mut rng = rng();
    let rounds = 5;
    let x: Vec<f32> = (0..128 * rounds)
        .map(|_| rng.random_range(0..50) as f32)
        .collect();
    let mut y = vec![f32::NAN; 256];
    run(
        "selftest_warp_specialized",
        1,
        256,
        Args::new()
            .ptr(ptr(&x))
            .ptr(mut_ptr(&mut y))
            .i32(rounds as i32),
    )
    .unwrap();
    for c in 0..128 {
        let want: f32 = (0..rounds).map(|r| x[r * 128 + c] * (r + 1) as f32).sum();
        assert_eq!(y[c], want, "consumer {c}");
        let w = c / 32 * 32;
        let warp_sum: f32 = x[(rounds - 1) * 128 + w..(rounds - 1) * 128 + w + 32]
            .iter()
            .sum();
        assert_eq!(y[128 + c], warp_sum, "consumer {c}: warp sum");
    }
}

#[test]
fn setmaxnreg_must_be_uniform_across_the_warpgroup() {
    let mut y = vec![0.0f32; 128];
    let e = error_of(
        "selftest_bad_setmaxnreg_divergent",
        128,
        Args::new().ptr(mut_ptr(&mut y)),
    );
    assert!(
        e.contains("setmaxnreg.inc") && e.contains("uniform across the warpgroup"),
        "{e}"
    );
}

#[test]
fn named_barrier_missing_a_warp_is_a_deadlock_at_its_line() {
    let mut y = vec![0.0f32; 128];
    let e = error_of(
        "selftest_bad_named_barrier",
        128,
        Args::new().ptr(mut_ptr(&mut y)),
    );
    assert!(
        e.contains("deadlock")
            && e.contains("96 threads wait at named barriers")
            && e.contains("bar.sync 1")
            && e.contains(&selftest_sm90a_line(
                "if (threadIdx.x < 96) named_barrier_sync(1, 128);"
            ))
            && e.contains("has 96 of its 128 threads"),
        "{e}"
    );
}

// --- shared-memory race check -----------------------------------------------------------------

/// Stores and loads of the same shared bytes by threads of different warps with no barrier
/// between them are reported, in dynamic and in static shared memory; race-free kernels that
/// synchronise through __syncthreads, warp collectives, mbarriers and named barriers pass.
/// Needs the instrumented build (UPX_HOSTSIM_RACECHECK=1, as tools/test.sh's race step does).
#[test]
fn shared_memory_races_are_reported() {
    let instrumented = set_race_check(Some(true));
    if option_env!("UPX_HOSTSIM_RACECHECK") != Some("1") {
        eprintln!("skipped: build with UPX_HOSTSIM_RACECHECK=1 to instrument the kernels");
        set_race_check(None);
        return;
    }
    assert!(
        instrumented,
        "UPX_HOSTSIM_RACECHECK=1 but the emulator library was built without -fsanitize=thread"
    );
    for dynamic in [1, 0] {
        let mut y = vec![0.0f32; 64];
        let e = smem_error_of(
            "selftest_bad_shared_race",
            64,
            256,
            Args::new().ptr(mut_ptr(&mut y)).i32(dynamic),
        );
        let memory = if dynamic == 1 {
            "dynamic shared memory byte"
        } else {
            "a static __shared__ variable"
        };
        assert!(
            e.contains("shared-memory race") && e.contains(memory) && e.contains("addr2line"),
            "{e}"
        );
    }
    // Race-free kernels: block reductions (static shared memory, barriers and shuffles), the
    // mbarrier ring (dynamic), TMA with a store, named barriers.
    let mut rng = rng();
    let x: Vec<f32> = (0..1024).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let mut out = vec![f32::NAN; 2];
    run(
        "selftest_block_reduce",
        1,
        1024,
        Args::new().ptr(ptr(&x)).ptr(mut_ptr(&mut out)),
    )
    .unwrap();
    let mut y = vec![f32::NAN; 96];
    run_smem(
        "selftest_mbarrier_ring",
        128,
        320,
        Args::new().ptr(ptr(&x)).ptr(mut_ptr(&mut y)).i32(7),
    )
    .unwrap();
    let case = tma_cases(&mut rng).swap_remove(1);
    let (src, dst) = (
        Global::new(&mut rng, case.bytes()),
        Global::new(&mut rng, case.bytes()),
    );
    let box_bytes = case.spec(&src).box_bytes() as u32;
    run_tma(&case, &src, &dst, box_bytes, 2).unwrap();
    let mut y = vec![f32::NAN; 256];
    run(
        "selftest_warp_specialized",
        1,
        256,
        Args::new().ptr(ptr(&x)).ptr(mut_ptr(&mut y)).i32(5),
    )
    .unwrap();
    set_race_check(None);
}
