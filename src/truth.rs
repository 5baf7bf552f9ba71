//! Hardware truth fixtures: the selftest kernels (`kernels/selftest.cu`) run on small,
//! deterministic inputs, their raw outputs kept bit for bit in one safetensors file.
//!
//! Captured on a GPU (`verify --truth FILE`), the file is the hardware's answer to questions
//! the emulator (`kernels/common/hostsim.h`) answers from the PTX manual alone: the mma.sync
//! and ldmatrix fragment layouts, cp.async zero-fill and partial source sizes, warp shuffles
//! and votes, block reductions, bf16 rounding, and the order and rounding in which the tensor
//! core accumulates f32. Replayed on the emulator (tests/truth.rs), every case reruns its
//! kernel on the stored inputs and the outputs must agree bit for bit; each difference is
//! reported by case, output and flat index.
//!
//! The same code drives any [`Device`] (the CUDA executor or the emulator). File layout:
//! tensors `<case>/in<i>` and `<case>/out<i>` with their raw dtypes (I32, F32, BF16);
//! metadata `format`, `format_version`, `cases` (the case names in order), `case.<name>` (the
//! kernel and launch shape), and where it came from (`device`, `description`,
//! `compute_capability`, `cuda_driver`, `created`, `seed`, `nvcc`).
//!
//! Adding a case (the extension point for wgmma, TMA and mbarrier once those kernels exist):
//! write the kernel in `kernels/selftest.cu` (or a Hopper-only `kernels/selftest_sm90a.cu`),
//! with a header comment saying what it computes and its launch shape, and add a [`CaseDef`]
//! to [`CASES`]. A fixture captured before the case existed reports it as missing from the
//! file; recapture on the GPU. Hopper-only kernels are emulated like the others; their cases
//! can only be captured on a compute-capability-9.0 GPU.

use crate::runtime::device::{Device, DeviceBuffer, LaunchList};
use crate::runtime::kernels::{KernelId, NVCC_VERSION};
use crate::runtime::launch::{Args, Launch};
use crate::{Error, Result};
use half::bf16;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// The `format` metadata value of a truth file.
pub const FORMAT: &str = "ultrapixel-truth";
/// Bumped when the layout of the file changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;
/// The seed of the inputs `capture_to_file` uses (any seed gives a valid fixture).
pub const DEFAULT_SEED: u64 = 0x7472_7574_6831;
/// Outputs are filled with this byte before every launch: 0xFF is NaN as f32 and bf16, so an
/// element a kernel forgets to write cannot pass for a number.
pub const POISON: u8 = 0xFF;

/// Element types of truth tensors (stored raw, compared as bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    I32,
    F32,
    Bf16,
}

impl Elem {
    pub fn size(self) -> usize {
        match self {
            Elem::I32 | Elem::F32 => 4,
            Elem::Bf16 => 2,
        }
    }

    fn dtype(self) -> Dtype {
        match self {
            Elem::I32 => Dtype::I32,
            Elem::F32 => Dtype::F32,
            Elem::Bf16 => Dtype::BF16,
        }
    }

    fn from_dtype(d: Dtype) -> Option<Elem> {
        match d {
            Dtype::I32 => Some(Elem::I32),
            Dtype::F32 => Some(Elem::F32),
            Dtype::BF16 => Some(Elem::Bf16),
            _ => None,
        }
    }

    /// The bits in hex and the value they stand for.
    fn show(self, bits: u32) -> String {
        match self {
            Elem::I32 => format!("{bits:#010x} ({})", bits as i32),
            Elem::F32 => format!("{bits:#010x} ({:?})", f32::from_bits(bits)),
            Elem::Bf16 => format!("{bits:#06x} ({:?})", bf16::from_bits(bits as u16).to_f32()),
        }
    }
}

/// One tensor as raw little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Raw {
    pub elem: Elem,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Raw {
    fn from_bits(elem: Elem, shape: &[usize], bits: impl IntoIterator<Item = u32>) -> Raw {
        let mut bytes = Vec::with_capacity(shape.iter().product::<usize>() * elem.size());
        for b in bits {
            bytes.extend_from_slice(&b.to_le_bytes()[..elem.size()]);
        }
        assert_eq!(
            bytes.len(),
            shape.iter().product::<usize>() * elem.size(),
            "tensor data does not fill its shape {shape:?}"
        );
        Raw {
            elem,
            shape: shape.to_vec(),
            bytes,
        }
    }

    pub fn i32s(shape: &[usize], v: &[i32]) -> Raw {
        Raw::from_bits(Elem::I32, shape, v.iter().map(|&x| x as u32))
    }

    pub fn f32s(shape: &[usize], v: &[f32]) -> Raw {
        Raw::from_bits(Elem::F32, shape, v.iter().map(|x| x.to_bits()))
    }

    /// bf16 values given as f32; each must be exact in bf16 (inputs are never rounded, so
    /// the file holds exactly the values the generator meant).
    pub fn bf16s(shape: &[usize], v: &[f32]) -> Raw {
        Raw::from_bits(
            Elem::Bf16,
            shape,
            v.iter().map(|&x| {
                let b = bf16::from_f32(x);
                assert_eq!(
                    b.to_f32().to_bits(),
                    x.to_bits(),
                    "{x} is not exact in bf16"
                );
                b.to_bits() as u32
            }),
        )
    }

    pub fn len(&self) -> usize {
        self.bytes.len() / self.elem.size()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The bits of element `i`.
    pub fn bits(&self, i: usize) -> u32 {
        let s = self.elem.size();
        let mut b = [0u8; 4];
        b[..s].copy_from_slice(&self.bytes[i * s..(i + 1) * s]);
        u32::from_le_bytes(b)
    }

    pub fn set_bits(&mut self, i: usize, bits: u32) {
        let s = self.elem.size();
        self.bytes[i * s..(i + 1) * s].copy_from_slice(&bits.to_le_bytes()[..s]);
    }

    /// Element `i` read as f32 (f32 and bf16 tensors).
    pub fn f32(&self, i: usize) -> f32 {
        match self.elem {
            Elem::F32 => f32::from_bits(self.bits(i)),
            Elem::Bf16 => bf16::from_bits(self.bits(i) as u16).to_f32(),
            Elem::I32 => self.bits(i) as i32 as f32,
        }
    }
}

/// One case as it ran: the inputs it was given and the outputs the device produced.
#[derive(Clone, Debug, PartialEq)]
pub struct CaseRecord {
    pub name: String,
    /// Kernel and launch shape ([`CaseDef::launch_signature`]).
    pub launch: String,
    pub inputs: Vec<Raw>,
    pub outputs: Vec<Raw>,
}

/// A set of truth cases with the metadata of where they were captured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TruthSet {
    pub metadata: BTreeMap<String, String>,
    pub cases: Vec<CaseRecord>,
}

/// What `capture_to_file` wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub cases: usize,
    pub bytes: u64,
}

/// One disagreement between a truth file and a replay.
#[derive(Clone, Debug, PartialEq)]
pub enum Mismatch {
    /// An output element whose bits differ.
    Element {
        case: String,
        output: usize,
        index: usize,
        elem: Elem,
        expected: u32,
        got: u32,
        /// What the element is (row and column, lane and register, ...).
        at: String,
    },
    /// The file's case does not describe the experiment this build runs under that name.
    Definition { case: String, message: String },
    /// A case in the file that this build does not know.
    UnknownCase { case: String },
    /// A case of this build that the file does not have.
    MissingCase { case: String },
    /// The kernel could not run on the replaying device.
    LaunchFailed { case: String, error: String },
}

impl Mismatch {
    pub fn case(&self) -> &str {
        match self {
            Mismatch::Element { case, .. }
            | Mismatch::Definition { case, .. }
            | Mismatch::UnknownCase { case }
            | Mismatch::MissingCase { case }
            | Mismatch::LaunchFailed { case, .. } => case,
        }
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Element {
                case,
                output,
                index,
                elem,
                expected,
                got,
                at,
            } => write!(
                f,
                "{case}: out{output}[{index}] ({at}): expected {}, got {}",
                elem.show(*expected),
                elem.show(*got)
            ),
            Mismatch::Definition { case, message } => {
                write!(
                    f,
                    "{case}: the file's case differs from this build's: {message}"
                )
            }
            Mismatch::UnknownCase { case } => write!(
                f,
                "{case}: in the truth file but unknown to this build (not replayed)"
            ),
            Mismatch::MissingCase { case } => write!(
                f,
                "{case}: a case of this build missing from the truth file (recapture it on a GPU)"
            ),
            Mismatch::LaunchFailed { case, error } => {
                write!(f, "{case}: the kernel did not run: {error}")
            }
        }
    }
}

/// The number of mismatches of each case, in first-seen order.
pub fn count_by_case(mismatches: &[Mismatch]) -> Vec<(String, usize)> {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for m in mismatches {
        match counts.iter_mut().find(|(c, _)| c == m.case()) {
            Some((_, n)) => *n += 1,
            None => counts.push((m.case().to_string(), 1)),
        }
    }
    counts
}

/// A readable report: per case its mismatch count, then at most `per_case` of them.
pub fn report(mismatches: &[Mismatch], per_case: usize) -> String {
    let mut out = String::new();
    for (case, n) in count_by_case(mismatches) {
        out.push_str(&format!(
            "{case}: {n} mismatch{}\n",
            if n == 1 { "" } else { "es" }
        ));
        for m in mismatches
            .iter()
            .filter(|m| m.case() == case)
            .take(per_case)
        {
            out.push_str(&format!("  {m}\n"));
        }
        if n > per_case {
            out.push_str(&format!("  ... and {} more\n", n - per_case));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

/// splitmix64: the inputs of a seed must never change with a dependency's version.
struct Rng(u64);

impl Rng {
    /// One stream per case, so adding a case leaves the others' inputs as they were.
    fn for_case(seed: u64, case: &str) -> Rng {
        let h = case.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
        Rng(seed ^ h)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn u32(&mut self) -> u32 {
        (self.next() >> 32) as u32
    }

    /// Uniform in lo..=hi.
    fn int(&mut self, lo: i32, hi: i32) -> i32 {
        lo + (self.next() % (hi - lo + 1) as u64) as i32
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.next() % xs.len() as u64) as usize]
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.next() % one_in == 0
    }

    fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            xs.swap(i, (self.next() % (i as u64 + 1)) as usize);
        }
    }

    fn ints(&mut self, n: usize, lo: i32, hi: i32) -> Vec<f32> {
        (0..n).map(|_| self.int(lo, hi) as f32).collect()
    }
}

/// ±m·2^e with an 8-bit significand m (exact in bf16), e in lo..=hi: sums of products of such
/// values span many binades, so f32 accumulation must round.
fn spread(rng: &mut Rng, lo: i32, hi: i32) -> f32 {
    let m = rng.int(128, 255) as f32;
    let sign = if rng.chance(2) { -1.0 } else { 1.0 };
    sign * m * 2f32.powi(rng.int(lo, hi) - 7)
}

// ---------------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------------

/// Element type and shape of one output.
type OutputSpec = (Elem, Vec<usize>);

/// One truth case: a selftest kernel, its launch shape and how its inputs are made.
pub struct CaseDef {
    pub name: &'static str,
    pub kernel: &'static str,
    /// 1-d launch: blocks and threads per block.
    pub grid: u32,
    pub block: u32,
    /// Deterministic inputs from a case's random stream.
    inputs: fn(&mut Rng) -> Vec<Raw>,
    /// Element type and shape of each output, from the inputs.
    outputs: fn(&[Raw]) -> Vec<OutputSpec>,
    /// Scalar kernel parameters after the pointers (inputs', then outputs').
    scalars: fn(&[Raw]) -> Vec<i32>,
    /// What output element (output, index) is, for mismatch reports.
    locate: fn(usize, usize) -> String,
}

impl CaseDef {
    /// The kernel and launch shape, as recorded in the file.
    pub fn launch_signature(&self) -> String {
        format!(
            "kernel={} grid={} block={}",
            self.kernel, self.grid, self.block
        )
    }
}

fn no_scalars(_: &[Raw]) -> Vec<i32> {
    Vec::new()
}

/// "row r, col c" of a row-major matrix with `cols` columns.
fn matrix_at(prefix: &str, index: usize, cols: usize) -> String {
    format!("{prefix}[{}][{}]", index / cols, index % cols)
}

// --- warp collectives ------------------------------------------------------------------------

const WARP_OPS: [&str; 8] = [
    "shfl idx 7·lane",
    "shfl xor 5",
    "shfl up 3",
    "shfl down 3",
    "ballot(odd)",
    "any(>1000)",
    "all(>=0)",
    "shfl xor 1 width 4",
];

/// Two blocks of three warps; each warp's range makes a different vote come out false.
fn warp_inputs(rng: &mut Rng) -> Vec<Raw> {
    let v: Vec<i32> = (0..192)
        .map(|i| match (i / 32) % 3 {
            0 => rng.int(0, 1100),
            1 => rng.int(-100, 999),
            _ => rng.int(0, 1000),
        })
        .collect();
    vec![Raw::i32s(&[192], &v)]
}

fn warp_outputs(_: &[Raw]) -> Vec<OutputSpec> {
    vec![(Elem::I32, vec![192, 8])]
}

fn warp_at(_: usize, i: usize) -> String {
    format!(
        "thread {} lane {}, {}",
        i / 8,
        (i / 8) % 32,
        WARP_OPS[i % 8]
    )
}

// --- block reductions ------------------------------------------------------------------------

fn reduce_outputs_for(blocks: usize) -> Vec<OutputSpec> {
    vec![(Elem::F32, vec![blocks, 2])]
}

fn reduce_at(_: usize, i: usize) -> String {
    format!("block {} {}", i / 2, if i % 2 == 0 { "sum" } else { "max" })
}

/// One warp per block, small integers: every order gives the same exact sum.
fn reduce_w1_inputs(rng: &mut Rng) -> Vec<Raw> {
    vec![Raw::f32s(&[2 * 32], &rng.ints(64, -64, 64))]
}

/// Three warps (fewer than 32, so the second stage pads with the identity).
fn reduce_w3_inputs(rng: &mut Rng) -> Vec<Raw> {
    vec![Raw::f32s(&[3 * 96], &rng.ints(288, -1000, 1000))]
}

/// 32 warps; values whose sum depends on the order the butterfly and the second stage add
/// them in: block 0 integers around 2^24 with ±1 and ±3, block 1 only zeros of both signs and
/// negatives (the sign of a zero sum, fmaxf of -0 and +0), block 2 values over 40 binades.
fn reduce_w32_inputs(rng: &mut Rng) -> Vec<Raw> {
    let big = [16777216.0, -16777216.0, 33554432.0, 8388609.0, -8388609.0];
    let mut v = Vec::with_capacity(3 * 1024);
    for _ in 0..1024 {
        v.push(if rng.chance(4) {
            rng.pick(&big)
        } else {
            rng.pick(&[1.0, -1.0, 3.0, -3.0])
        });
    }
    for _ in 0..1024 {
        v.push(if rng.chance(64) {
            -(rng.int(1, 9) as f32)
        } else {
            rng.pick(&[0.0, -0.0, -0.0])
        });
    }
    for _ in 0..1024 {
        v.push(spread(rng, -20, 20) * (1.0 + rng.int(0, 0xFFFF) as f32 * 2f32.powi(-23)));
    }
    vec![Raw::f32s(&[3 * 1024], &v)]
}

// --- mma fragments and ldmatrix --------------------------------------------------------------

/// A [16][16] and Bt [8][16] small integers: the product is exact in any order.
fn mma_fragments_inputs(rng: &mut Rng) -> Vec<Raw> {
    vec![
        Raw::bf16s(&[16, 16], &rng.ints(256, -8, 8)),
        Raw::bf16s(&[8, 16], &rng.ints(128, -8, 8)),
    ]
}

fn mma_fragments_outputs(_: &[Raw]) -> Vec<OutputSpec> {
    vec![(Elem::F32, vec![16, 8])]
}

fn mma_fragments_at(_: usize, i: usize) -> String {
    matrix_at("D", i, 8)
}

/// A, Bt as above and Bk = B ([k][n]) for the .trans path.
fn mma_ldmatrix_inputs(rng: &mut Rng) -> Vec<Raw> {
    let a = rng.ints(256, -8, 8);
    let bt = rng.ints(128, -8, 8);
    let bk: Vec<f32> = (0..128).map(|i| bt[(i % 8) * 16 + i / 8]).collect();
    vec![
        Raw::bf16s(&[16, 16], &a),
        Raw::bf16s(&[8, 16], &bt),
        Raw::bf16s(&[16, 8], &bk),
    ]
}

fn mma_ldmatrix_outputs(_: &[Raw]) -> Vec<OutputSpec> {
    vec![(Elem::F32, vec![2, 16, 8])]
}

fn mma_ldmatrix_at(_: usize, i: usize) -> String {
    let via = if i < 128 {
        "B by ldmatrix_b_pair"
    } else {
        "B by ldmatrix_b_pair_trans"
    };
    format!("{}, {via}", matrix_at("D", i % 128, 8))
}

/// The ldmatrix forms in the order of `selftest_ldmatrix`'s registers.
pub const LDMATRIX_FORMS: [(&str, usize); 6] = [
    ("x1", 1),
    ("x2", 2),
    ("x4", 4),
    ("x1.trans", 1),
    ("x2.trans", 2),
    ("x4.trans", 4),
];

/// 32 rows of 8 distinct values (a permutation of -128..=127, exact in bf16) and a
/// permutation of the rows for the lanes' addresses.
fn ldmatrix_inputs(rng: &mut Rng) -> Vec<Raw> {
    let mut m: Vec<f32> = (-128..128).map(|v| v as f32).collect();
    rng.shuffle(&mut m);
    let mut rows: Vec<i32> = (0..32).collect();
    rng.shuffle(&mut rows);
    vec![Raw::bf16s(&[32, 8], &m), Raw::i32s(&[32], &rows)]
}

fn ldmatrix_outputs(_: &[Raw]) -> Vec<OutputSpec> {
    vec![(Elem::I32, vec![14, 32])]
}

fn ldmatrix_at(_: usize, i: usize) -> String {
    let (mut reg, lane) = (i / 32, i % 32);
    for (form, n) in LDMATRIX_FORMS {
        if reg < n {
            return format!("{form} matrix {reg}, lane {lane}");
        }
        reg -= n;
    }
    format!("register {reg} of lane {lane}")
}

// --- cp.async --------------------------------------------------------------------------------

/// 64 chunks of random words; chunks 0..31 all-or-nothing (0 or 16 source bytes), chunks
/// 32..63 every source size 0..=16 at least once, the rest random.
fn cp_async_inputs(rng: &mut Rng) -> Vec<Raw> {
    let src: Vec<i32> = (0..256).map(|_| rng.u32() as i32).collect();
    let mut whole: Vec<i32> = (0..32).map(|i| if i % 2 == 0 { 0 } else { 16 }).collect();
    rng.shuffle(&mut whole);
    let mut partial: Vec<i32> = (0..=16).chain((17..32).map(|_| rng.int(0, 16))).collect();
    rng.shuffle(&mut partial);
    whole.extend(partial);
    vec![Raw::i32s(&[64, 4], &src), Raw::i32s(&[64], &whole)]
}

fn cp_async_outputs(_: &[Raw]) -> Vec<OutputSpec> {
    vec![(Elem::I32, vec![64, 4])]
}

fn cp_async_at(_: usize, i: usize) -> String {
    let chunk = i / 4;
    let how = if chunk < 32 { "zfill" } else { "src-size" };
    format!("chunk {chunk} ({how}), word {}", i % 4)
}

// --- bf16 rounding ---------------------------------------------------------------------------

const BF16_ROUND_N: usize = 1000;

/// The rounding boundaries (ties both ways, subnormals, overflow to infinity, NaN payloads)
/// then random bit patterns.
fn bf16_round_inputs(rng: &mut Rng) -> Vec<Raw> {
    let special: [u32; 20] = [
        0x3F80_8000, // 1 + 2^-8: tie, rounds down to even
        0x3F81_8000, // 1 + 3·2^-8: tie, rounds up to even
        0xBF80_8000,
        0x3F80_8001,
        0x3F80_7FFF,
        0x0000_0000,
        0x8000_0000,
        0x0000_0001, // smallest subnormal
        0x0000_8000, // subnormal tie
        0x0001_8000,
        0x007F_FFFF, // largest subnormal: rounds to the smallest normal
        0x0080_0000,
        0x7F7F_FFFF, // f32::MAX: rounds to infinity
        0x7F7F_8000, // tie at the largest bf16: to even, i.e. infinity
        0x7F80_0000,
        0xFF80_0000,
        0x7FC0_0000,
        0x7F80_0001, // signalling NaN
        0xFFC0_0001,
        0x7FBF_FFFF,
    ];
    let bits = special
        .into_iter()
        .chain((special.len()..BF16_ROUND_N).map(|_| rng.u32()));
    vec![Raw::from_bits(Elem::F32, &[BF16_ROUND_N], bits)]
}

fn bf16_round_outputs(x: &[Raw]) -> Vec<OutputSpec> {
    vec![(Elem::Bf16, vec![x[0].len()])]
}

fn bf16_round_scalars(x: &[Raw]) -> Vec<i32> {
    vec![x[0].len() as i32]
}

fn bf16_round_at(_: usize, i: usize) -> String {
    format!("element {i}")
}

// --- mma accumulation order ------------------------------------------------------------------

const CHAIN_STEPS: usize = 4;

/// The inputs of `selftest_mma_chain`: A [steps][16][16], Bt [steps][8][16], C [16][8].
fn chain(a: &[f32], bt: &[f32], c: &[f32]) -> Vec<Raw> {
    vec![
        Raw::bf16s(&[CHAIN_STEPS, 16, 16], a),
        Raw::bf16s(&[CHAIN_STEPS, 8, 16], bt),
        Raw::f32s(&[16, 8], c),
    ]
}

fn chain_outputs(x: &[Raw]) -> Vec<OutputSpec> {
    vec![(Elem::F32, vec![x[0].len() / 256, 16, 8])]
}

fn chain_scalars(x: &[Raw]) -> Vec<i32> {
    vec![(x[0].len() / 256) as i32]
}

fn chain_at(_: usize, i: usize) -> String {
    format!("after k-step {}, {}", i / 128, matrix_at("D", i % 128, 8))
}

/// Small integers everywhere: every partial sum is exact, so any accumulation order agrees.
fn chain_exact_inputs(rng: &mut Rng) -> Vec<Raw> {
    chain(
        &rng.ints(CHAIN_STEPS * 256, -8, 8),
        &rng.ints(CHAIN_STEPS * 128, -8, 8),
        &rng.ints(128, -64, 64),
    )
}

fn big_or_small(rng: &mut Rng) -> f32 {
    let sign = if rng.chance(2) { -1.0 } else { 1.0 };
    if rng.chance(4) {
        sign * rng.pick(&[2048.0, 4096.0, 6144.0])
    } else {
        sign * rng.pick(&[0.0, 1.0, 1.0])
    }
}

/// A quarter of the operands large (2^11, 2^12, 3·2^11), the rest 0 or ±1: products near 2^24
/// and 2^25 next to ±1 and ±2^12 products, and accumulators up to 2^25, so the result depends
/// on the order of the additions and on how each is rounded.
fn chain_big_small_inputs(rng: &mut Rng) -> Vec<Raw> {
    let a: Vec<f32> = (0..CHAIN_STEPS * 256).map(|_| big_or_small(rng)).collect();
    let bt: Vec<f32> = (0..CHAIN_STEPS * 128).map(|_| big_or_small(rng)).collect();
    let c: Vec<f32> = (0..128)
        .map(|_| rng.pick(&[0.0, 1.0, -1.0, 3.0, 16777216.0, -16777216.0, 33554432.0]))
        .collect();
    chain(&a, &bt, &c)
}

/// Operands over 17 binades with full 8-bit significands: the exact sums need far more than
/// f32's 24 bits, so the bits of the result show where and how the tensor core rounds.
fn chain_exponents_inputs(rng: &mut Rng) -> Vec<Raw> {
    let a: Vec<f32> = (0..CHAIN_STEPS * 256).map(|_| spread(rng, -8, 8)).collect();
    let bt: Vec<f32> = (0..CHAIN_STEPS * 128).map(|_| spread(rng, -8, 8)).collect();
    let c: Vec<f32> = (0..128)
        .map(|_| spread(rng, -8, 16) * (1.0 + rng.int(0, 0xFFFF) as f32 * 2f32.powi(-23)))
        .collect();
    chain(&a, &bt, &c)
}

/// Zeros of both signs (IEEE: a sum is -0 only when every term is -0, and x + -x is +0).
/// Even k-steps: A rows 0..3 are +0 and rows 4..7 are -0, B columns 0..3 are -0 and 4..7 are
/// +0, so D[0..4][0..4] and D[4..8][4..8] add sixteen -0 products to C = ±0; rows 8..15 add
/// zeros of mixed signs. Odd k-steps: rows 8..15 of A and all of B are mostly ±1, so products
/// cancel to exact zeros, added to the zeros the previous step left.
fn chain_zeros_inputs(rng: &mut Rng) -> Vec<Raw> {
    let zero = |negative: bool| if negative { -0.0 } else { 0.0 };
    let mut a = Vec::with_capacity(CHAIN_STEPS * 256);
    let mut bt = Vec::with_capacity(CHAIN_STEPS * 128);
    for step in 0..CHAIN_STEPS {
        let cancel = step % 2 == 1;
        for i in 0..256 {
            let row = i / 16;
            a.push(if row < 8 {
                zero(row >= 4)
            } else if cancel && !rng.chance(4) {
                rng.pick(&[1.0, -1.0])
            } else {
                rng.pick(&[0.0, -0.0])
            });
        }
        for i in 0..128 {
            let col = i / 16;
            bt.push(if !cancel {
                zero(col < 4)
            } else if !rng.chance(4) {
                rng.pick(&[1.0, -1.0])
            } else {
                rng.pick(&[0.0, -0.0])
            });
        }
    }
    let c: Vec<f32> = (0..128).map(|_| rng.pick(&[0.0, -0.0])).collect();
    chain(&a, &bt, &c)
}

/// Every case of this build, in file order.
pub static CASES: &[CaseDef] = &[
    CaseDef {
        name: "warp_collectives",
        kernel: "selftest_warp_collectives",
        grid: 2,
        block: 96,
        inputs: warp_inputs,
        outputs: warp_outputs,
        scalars: no_scalars,
        locate: warp_at,
    },
    CaseDef {
        name: "block_reduce_w1",
        kernel: "selftest_block_reduce",
        grid: 2,
        block: 32,
        inputs: reduce_w1_inputs,
        outputs: |_| reduce_outputs_for(2),
        scalars: no_scalars,
        locate: reduce_at,
    },
    CaseDef {
        name: "block_reduce_w3",
        kernel: "selftest_block_reduce",
        grid: 3,
        block: 96,
        inputs: reduce_w3_inputs,
        outputs: |_| reduce_outputs_for(3),
        scalars: no_scalars,
        locate: reduce_at,
    },
    CaseDef {
        name: "block_reduce_w32_order",
        kernel: "selftest_block_reduce",
        grid: 3,
        block: 1024,
        inputs: reduce_w32_inputs,
        outputs: |_| reduce_outputs_for(3),
        scalars: no_scalars,
        locate: reduce_at,
    },
    CaseDef {
        name: "mma_fragments",
        kernel: "selftest_mma_fragments",
        grid: 1,
        block: 32,
        inputs: mma_fragments_inputs,
        outputs: mma_fragments_outputs,
        scalars: no_scalars,
        locate: mma_fragments_at,
    },
    CaseDef {
        name: "mma_ldmatrix",
        kernel: "selftest_mma_ldmatrix",
        grid: 1,
        block: 32,
        inputs: mma_ldmatrix_inputs,
        outputs: mma_ldmatrix_outputs,
        scalars: no_scalars,
        locate: mma_ldmatrix_at,
    },
    CaseDef {
        name: "ldmatrix",
        kernel: "selftest_ldmatrix",
        grid: 1,
        block: 32,
        inputs: ldmatrix_inputs,
        outputs: ldmatrix_outputs,
        scalars: no_scalars,
        locate: ldmatrix_at,
    },
    CaseDef {
        name: "cp_async_zfill",
        kernel: "selftest_cp_async_zfill",
        grid: 1,
        block: 32,
        inputs: cp_async_inputs,
        outputs: cp_async_outputs,
        scalars: no_scalars,
        locate: cp_async_at,
    },
    CaseDef {
        name: "bf16_round",
        kernel: "selftest_bf16_round",
        grid: BF16_ROUND_N.div_ceil(256) as u32,
        block: 256,
        inputs: bf16_round_inputs,
        outputs: bf16_round_outputs,
        scalars: bf16_round_scalars,
        locate: bf16_round_at,
    },
    CaseDef {
        name: "mma_chain_exact",
        kernel: "selftest_mma_chain",
        grid: 1,
        block: 32,
        inputs: chain_exact_inputs,
        outputs: chain_outputs,
        scalars: chain_scalars,
        locate: chain_at,
    },
    CaseDef {
        name: "mma_order_big_small",
        kernel: "selftest_mma_chain",
        grid: 1,
        block: 32,
        inputs: chain_big_small_inputs,
        outputs: chain_outputs,
        scalars: chain_scalars,
        locate: chain_at,
    },
    CaseDef {
        name: "mma_order_exponents",
        kernel: "selftest_mma_chain",
        grid: 1,
        block: 32,
        inputs: chain_exponents_inputs,
        outputs: chain_outputs,
        scalars: chain_scalars,
        locate: chain_at,
    },
    CaseDef {
        name: "mma_signed_zeros",
        kernel: "selftest_mma_chain",
        grid: 1,
        block: 32,
        inputs: chain_zeros_inputs,
        outputs: chain_outputs,
        scalars: chain_scalars,
        locate: chain_at,
    },
];

/// The build's case of that name.
pub fn case_def(name: &str) -> Option<&'static CaseDef> {
    CASES.iter().find(|c| c.name == name)
}

// ---------------------------------------------------------------------------------------------
// Running cases
// ---------------------------------------------------------------------------------------------

fn upload(device: &dyn Device, t: &Raw) -> Result<DeviceBuffer> {
    let buf = device.alloc(t.bytes.len())?;
    device.write(buf.ptr, &t.bytes)?;
    Ok(buf)
}

/// Runs one case's kernel on `inputs`, outputs filled with `poison` first; returns the
/// outputs as the device left them.
fn run_case(device: &dyn Device, def: &CaseDef, inputs: &[Raw], poison: u8) -> Result<Vec<Raw>> {
    let specs = (def.outputs)(inputs);
    let in_bufs = inputs
        .iter()
        .map(|t| upload(device, t))
        .collect::<Result<Vec<_>>>()?;
    let mut out_bufs = Vec::with_capacity(specs.len());
    for (elem, shape) in &specs {
        let bytes = shape.iter().product::<usize>() * elem.size();
        let buf = device.alloc(bytes)?;
        device.fill(buf.ptr, poison, bytes)?;
        out_bufs.push(buf);
    }
    let mut args = Args::new()
        .ptrs(&in_bufs.iter().map(|b| b.ptr).collect::<Vec<_>>())
        .ptrs(&out_bufs.iter().map(|b| b.ptr).collect::<Vec<_>>());
    for s in (def.scalars)(inputs) {
        args = args.i32(s);
    }
    let launch = Launch::linear(KernelId::lookup(def.kernel)?, def.grid, def.block, args);
    let mut list = LaunchList {
        launches: vec![launch.into()],
        labels: vec![format!("truth case {}", def.name)],
        replay: None,
    };
    device.execute(&mut list)?;
    specs
        .into_iter()
        .zip(&out_bufs)
        .map(|((elem, shape), buf)| {
            let mut bytes = vec![0u8; buf.bytes];
            device.read(buf.ptr, &mut bytes)?;
            Ok(Raw { elem, shape, bytes })
        })
        .collect()
}

/// Runs every case of this build on `device` with the inputs of `seed`.
pub fn capture(device: &dyn Device, seed: u64) -> Result<TruthSet> {
    let mut cases = Vec::with_capacity(CASES.len());
    for def in CASES {
        let inputs = (def.inputs)(&mut Rng::for_case(seed, def.name));
        let outputs = run_case(device, def, &inputs, POISON)?;
        cases.push(CaseRecord {
            name: def.name.to_string(),
            launch: def.launch_signature(),
            inputs,
            outputs,
        });
    }
    let mut metadata = BTreeMap::new();
    metadata.insert("seed".to_string(), seed.to_string());
    metadata.insert("device".to_string(), device.describe());
    Ok(TruthSet { metadata, cases })
}

/// Reruns every case of `set` on `device` with the set's inputs and compares the outputs bit
/// for bit. Cases only in the file or only in this build are reported, never skipped.
pub fn replay(set: &TruthSet, device: &dyn Device) -> Result<Vec<Mismatch>> {
    replay_poisoned(set, device, POISON)
}

/// As [`replay`], with the outputs filled with `poison` before each launch: replaying a set
/// captured with [`POISON`] under another byte reports every element a kernel left unwritten.
pub fn replay_poisoned(set: &TruthSet, device: &dyn Device, poison: u8) -> Result<Vec<Mismatch>> {
    let mut mismatches = Vec::new();
    for rec in &set.cases {
        let Some(def) = case_def(&rec.name) else {
            mismatches.push(Mismatch::UnknownCase {
                case: rec.name.clone(),
            });
            continue;
        };
        if let Some(message) = definition_difference(def, rec) {
            mismatches.push(Mismatch::Definition {
                case: rec.name.clone(),
                message,
            });
            continue;
        }
        match run_case(device, def, &rec.inputs, poison) {
            Ok(got) => compare_outputs(def, rec, &got, &mut mismatches),
            Err(e) => mismatches.push(Mismatch::LaunchFailed {
                case: rec.name.clone(),
                error: e.to_string(),
            }),
        }
    }
    for def in CASES {
        if !set.cases.iter().any(|c| c.name == def.name) {
            mismatches.push(Mismatch::MissingCase {
                case: def.name.to_string(),
            });
        }
    }
    Ok(mismatches)
}

/// Why the file's case is not the experiment this build runs under its name, if it is not:
/// another kernel or launch shape, or inputs and outputs of other types or shapes.
fn definition_difference(def: &CaseDef, rec: &CaseRecord) -> Option<String> {
    if rec.launch != def.launch_signature() {
        return Some(format!(
            "file: {}, build: {}",
            rec.launch,
            def.launch_signature()
        ));
    }
    let want_inputs = (def.inputs)(&mut Rng::for_case(0, def.name));
    let kinds =
        |ts: &[Raw]| -> Vec<OutputSpec> { ts.iter().map(|t| (t.elem, t.shape.clone())).collect() };
    if kinds(&rec.inputs) != kinds(&want_inputs) {
        return Some(format!(
            "inputs {:?} in the file, {:?} in this build",
            kinds(&rec.inputs),
            kinds(&want_inputs)
        ));
    }
    let want_outputs = (def.outputs)(&rec.inputs);
    if kinds(&rec.outputs) != want_outputs {
        return Some(format!(
            "outputs {:?} in the file, {want_outputs:?} in this build",
            kinds(&rec.outputs)
        ));
    }
    None
}

fn compare_outputs(def: &CaseDef, rec: &CaseRecord, got: &[Raw], out: &mut Vec<Mismatch>) {
    for (o, (want, got)) in rec.outputs.iter().zip(got).enumerate() {
        for i in 0..want.len() {
            let (expected, g) = (want.bits(i), got.bits(i));
            if expected != g {
                out.push(Mismatch::Element {
                    case: rec.name.clone(),
                    output: o,
                    index: i,
                    elem: want.elem,
                    expected,
                    got: g,
                    at: (def.locate)(o, i),
                });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The file
// ---------------------------------------------------------------------------------------------

impl TruthSet {
    pub fn case(&self, name: &str) -> Option<&CaseRecord> {
        self.cases.iter().find(|c| c.name == name)
    }

    pub fn case_mut(&mut self, name: &str) -> Option<&mut CaseRecord> {
        self.cases.iter_mut().find(|c| c.name == name)
    }

    /// Writes the set (atomically) with `metadata` added to the format's own keys, which
    /// win over same-named entries of `metadata`.
    pub fn save(&self, path: &Path, metadata: &BTreeMap<String, String>) -> Result<()> {
        let bytes = self
            .serialize(metadata)
            .map_err(|m| Error::format(path, m))?;
        crate::atomic_file::write_atomic(path, |w| {
            w.write_all(&bytes).map_err(|e| Error::io(path, e))
        })
    }

    fn serialize(
        &self,
        metadata: &BTreeMap<String, String>,
    ) -> std::result::Result<Vec<u8>, String> {
        let mut meta: std::collections::HashMap<String, String> = self
            .metadata
            .iter()
            .chain(metadata)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        meta.insert("format".into(), FORMAT.into());
        meta.insert("format_version".into(), FORMAT_VERSION.to_string());
        let names: Vec<&str> = self.cases.iter().map(|c| c.name.as_str()).collect();
        meta.insert("cases".into(), names.join(","));
        let mut views = Vec::new();
        for c in &self.cases {
            if c.name.is_empty() || c.name.contains([',', '/']) {
                return Err(format!("case name {:?} cannot be stored", c.name));
            }
            meta.insert(format!("case.{}", c.name), c.launch.clone());
            for (kind, tensors) in [("in", &c.inputs), ("out", &c.outputs)] {
                for (i, t) in tensors.iter().enumerate() {
                    let view = TensorView::new(t.elem.dtype(), t.shape.clone(), &t.bytes)
                        .map_err(|e| format!("{}/{kind}{i}: {e}", c.name))?;
                    views.push((format!("{}/{kind}{i}", c.name), view));
                }
            }
        }
        safetensors::serialize(views, Some(meta)).map_err(|e| e.to_string())
    }

    /// Reads a truth file; every malformation is an error that says what is wrong.
    pub fn load(path: &Path) -> Result<TruthSet> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        TruthSet::parse(&bytes)
            .map_err(|m| Error::format(path, format!("not a usable truth file: {m}")))
    }

    fn parse(bytes: &[u8]) -> std::result::Result<TruthSet, String> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| format!("not safetensors ({e})"))?;
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
        let metadata: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        match metadata.get("format") {
            Some(f) if f == FORMAT => {}
            Some(f) => return Err(format!("format {f:?}, expected {FORMAT:?}")),
            None => return Err(format!("no \"format\" metadata (expected {FORMAT:?})")),
        }
        let version = metadata
            .get("format_version")
            .map(String::as_str)
            .unwrap_or("");
        if version != FORMAT_VERSION.to_string() {
            return Err(format!(
                "format version {version:?}; this build reads version {FORMAT_VERSION}"
            ));
        }
        let listed = metadata.get("cases").map(String::as_str).unwrap_or("");
        let mut used = 0;
        let mut cases = Vec::new();
        for name in listed.split(',').filter(|n| !n.is_empty()) {
            let launch = metadata
                .get(&format!("case.{name}"))
                .ok_or_else(|| format!("case {name} has no \"case.{name}\" launch metadata"))?;
            let inputs = read_tensors(&st, name, "in")?;
            let outputs = read_tensors(&st, name, "out")?;
            if outputs.is_empty() {
                return Err(format!("case {name} has no outputs ({name}/out0)"));
            }
            used += inputs.len() + outputs.len();
            cases.push(CaseRecord {
                name: name.to_string(),
                launch: launch.clone(),
                inputs,
                outputs,
            });
        }
        if used != st.len() {
            let stray: Vec<String> = st
                .names()
                .into_iter()
                .filter(|n| {
                    !cases
                        .iter()
                        .any(|c| n.split('/').next() == Some(c.name.as_str()))
                })
                .map(str::to_string)
                .collect();
            return Err(format!(
                "tensors that belong to no listed case or are out of sequence: {}",
                stray.join(", ")
            ));
        }
        Ok(TruthSet { metadata, cases })
    }
}

/// `<case>/<kind>0`, `<case>/<kind>1`, ... up to the first missing index.
fn read_tensors(
    st: &SafeTensors<'_>,
    case: &str,
    kind: &str,
) -> std::result::Result<Vec<Raw>, String> {
    let mut out = Vec::new();
    while let Ok(view) = st.tensor(&format!("{case}/{kind}{}", out.len())) {
        let name = format!("{case}/{kind}{}", out.len());
        let elem = Elem::from_dtype(view.dtype()).ok_or_else(|| {
            format!(
                "{name} has dtype {:?}; truth tensors are I32, F32 or BF16",
                view.dtype()
            )
        })?;
        out.push(Raw {
            elem,
            shape: view.shape().to_vec(),
            bytes: view.data().to_vec(),
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The API the CLI uses
// ---------------------------------------------------------------------------------------------

/// Metadata describing where a capture ran: `device` (the executor's description),
/// `description` (the caller's words), `compute_capability` (from the CUDA executor's
/// description; "none" for the emulator), `cuda_driver` (of this machine, if one is
/// installed), `created` (UTC date), `nvcc` (the compiler of the embedded kernels).
pub fn capture_metadata(device: &dyn Device, description: &str) -> BTreeMap<String, String> {
    let describe = device.describe();
    let mut m = BTreeMap::new();
    m.insert(
        "compute_capability".into(),
        compute_capability(&describe).unwrap_or("none").to_string(),
    );
    m.insert("device".into(), describe);
    m.insert("description".into(), description.to_string());
    m.insert(
        "cuda_driver".into(),
        cuda_driver_version().unwrap_or_else(|| "none".into()),
    );
    m.insert("created".into(), utc_date_today());
    m.insert(
        "nvcc".into(),
        if NVCC_VERSION.is_empty() {
            "none".into()
        } else {
            NVCC_VERSION.to_string()
        },
    );
    m
}

/// Captures every case on `device` (inputs of [`DEFAULT_SEED`]) into `path`.
pub fn capture_to_file(device: &dyn Device, path: &Path, description: &str) -> Result<Summary> {
    let set = capture(device, DEFAULT_SEED)?;
    set.save(path, &capture_metadata(device, description))?;
    let bytes = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    Ok(Summary {
        cases: set.cases.len(),
        bytes,
    })
}

/// Replays the truth file at `path` on `device`; an empty list means bit-exact agreement.
pub fn check_file(device: &dyn Device, path: &Path) -> Result<Vec<Mismatch>> {
    replay(&TruthSet::load(path)?, device)
}

/// "9.0" from "NVIDIA H200 (compute capability 9.0)".
fn compute_capability(describe: &str) -> Option<&str> {
    let rest = describe.split("compute capability ").nth(1)?;
    Some(
        rest.split(|c: char| c == ')' || c.is_whitespace())
            .next()
            .unwrap_or(rest),
    )
}

/// The installed driver's CUDA version ("13.0"), without creating a context.
fn cuda_driver_version() -> Option<String> {
    if !crate::runtime::cuda::driver_present() {
        return None;
    }
    let mut v: std::ffi::c_int = 0;
    // SAFETY: the driver library is present; cuDriverGetVersion only writes the int.
    let rc = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    (rc == cudarc::driver::sys::CUresult::CUDA_SUCCESS)
        .then(|| format!("{}.{}", v / 1000, v % 1000 / 10))
}

/// Today's date in UTC, YYYY-MM-DD (civil date from days since 1970-01-01).
fn utc_date_today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Proleptic Gregorian date of a day count since 1970-01-01, by 400-year eras.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_match_known_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_089), (2025, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn compute_capability_is_read_from_the_cuda_description() {
        assert_eq!(
            compute_capability("NVIDIA H200 (compute capability 9.0)"),
            Some("9.0")
        );
        assert_eq!(
            compute_capability("host emulator (kernels compiled by g++)"),
            None
        );
    }

    #[test]
    fn raw_bits_round_trip_for_every_element_type() {
        let mut t = Raw::bf16s(&[3], &[1.0, -2.0, 0.5]);
        assert_eq!(t.bits(1), 0xC000);
        t.set_bits(2, 0x7FC0);
        assert!(t.f32(2).is_nan());
        assert_eq!(t.f32(0), 1.0);
        let f = Raw::f32s(&[2], &[-0.0, 3.5]);
        assert_eq!(f.bits(0), 0x8000_0000);
        let i = Raw::i32s(&[2], &[-1, 7]);
        assert_eq!((i.bits(0), i.bits(1)), (u32::MAX, 7));
    }

    #[test]
    fn every_case_names_a_kernel_once_and_makes_well_formed_inputs() {
        for (n, def) in CASES.iter().enumerate() {
            assert!(
                CASES[..n].iter().all(|d| d.name != def.name),
                "{} twice",
                def.name
            );
            assert!(KernelId::from_name(def.kernel).is_some(), "{}", def.kernel);
            for t in (def.inputs)(&mut Rng::for_case(7, def.name)) {
                assert_eq!(
                    t.bytes.len(),
                    t.shape.iter().product::<usize>() * t.elem.size()
                );
            }
        }
    }
}
