//! The Hopper GEMM (`kernels/gemm_sm90a.cu`): the launcher and its TMA tensor maps. The
//! [`Gemm`](super::gemm::Gemm) ops call [`launch`] instead of the portable kernel when
//! `UPX_KERNELS` allows it on the target (`runtime::kernel_choice`) and the shape
//! [`qualifies`]; the math, layouts, epilogues and parameter struct ([`GemmParams`]) are the
//! portable kernel's. The kernel comes in three tile widths ([`TileWidth`]: 128×64, 128×128,
//! 128×256 output tiles) that compute the same bits; [`launch`] picks one per shape
//! ([`TileWidth::for_shape`]: wave quantisation over the SMs, padded columns, operand
//! traffic) unless the target names the width a tuning table measured fastest;
//! [`launch_width`] takes one. The persistent blocks walk the tiles in groups of 8
//! row tiles so the tiles in flight share A and W panels in L2 (the kernel's header comment).

use super::gemm::GemmParams;
use crate::runtime::kernel_choice::KernelTarget;
use crate::runtime::kernels::KernelId;
use crate::runtime::launch::{Args, Launch};
use crate::runtime::tensor_map::{TensorMap, TensorMapSpec, TmaDtype, TmaSwizzle};
use crate::runtime::BackendKind;
use crate::tensor::DType;
use crate::{Error, Result};

/// Rows of the output tile, and the k-tile of a pipeline stage.
pub const TILE_M: usize = 128;
pub const TILE_K: usize = 64;
/// Pipeline stages (every width fits 4 in the 227 KiB of shared memory).
pub const STAGES: u32 = 4;
/// 3 warpgroups: the producer and two consumers.
pub const THREADS: u32 = 384;
/// The kernel name prefix (every launch of it is an sm_90a GEMM).
pub const KERNEL_PREFIX: &str = "gemm_sm90a_";

/// The output tile's width (BN columns): one kernel instantiation each,
/// `gemm_sm90a_n<BN>_bf16_<out>`, all computing bit-identical outputs (the accumulation and
/// the GRN slab order do not depend on the width).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileWidth {
    /// 128×64 tiles: N that 128 would pad by more than an eighth (N = 192, 320, 16, …).
    N64,
    /// 128×128 tiles.
    N128,
    /// 128×256 tiles (128 f32 accumulators per consumer thread): wide N with enough tiles.
    N256,
}

impl TileWidth {
    pub const ALL: [TileWidth; 3] = [TileWidth::N64, TileWidth::N128, TileWidth::N256];

    /// BN, the tile's columns.
    pub fn columns(self) -> usize {
        match self {
            TileWidth::N64 => 64,
            TileWidth::N128 => 128,
            TileWidth::N256 => 256,
        }
    }

    /// The width of `columns` BN columns (None: no kernel has that width).
    pub fn from_columns(columns: usize) -> Option<TileWidth> {
        TileWidth::ALL.into_iter().find(|w| w.columns() == columns)
    }

    /// Whether a narrower width covers N in as many column tiles: then this one only computes
    /// more padded columns with the same tiles in flight, and can never be faster (the tuner
    /// does not time it).
    pub fn pads_only(self, n: usize) -> bool {
        TileWidth::ALL.into_iter().any(|w| {
            w.columns() < self.columns() && n.div_ceil(w.columns()) == n.div_ceil(self.columns())
        })
    }

    /// Dynamic shared memory: 1024 alignment slack + STAGES · (A 128×64 + W BN×64 bf16
    /// tiles) + the GRN scratch (2 consumers · 4 warps · 2 parts · BN f32) + 2 · STAGES
    /// mbarriers (kernels/gemm_sm90a.cu, gemm_sm90a::Plan).
    pub fn smem_bytes(self) -> u32 {
        let bn = self.columns() as u32;
        let stage = (TILE_M * TILE_K * 2) as u32 + bn * TILE_K as u32 * 2;
        1024 + STAGES * stage + 2 * 4 * 2 * bn * 4 + 2 * STAGES * 8
    }

    /// Output tiles of an M × N product.
    pub fn tiles(self, m: usize, n: usize) -> u64 {
        m.div_ceil(TILE_M) as u64 * n.div_ceil(self.columns()) as u64
    }

    /// The assumed time per output column relative to the 128-wide tile, in 112ths: 8/7
    /// for 64 (its operand traffic per flop is 3/2 of the 128-wide tile's, and its m64n64
    /// wgmma reads shared memory at the SM's full 128 bytes per clock), 15/16 for 256 (3/4 of
    /// the traffic). Guesses from the traffic, used where no tuning table measured the shape.
    fn column_weight(self) -> u64 {
        match self {
            TileWidth::N64 => 128,
            TileWidth::N128 => 112,
            TileWidth::N256 => 105,
        }
    }

    /// The modelled time of an M × N product on `sms` SMs: waves of the persistent grid (the
    /// tiles rounded up to a multiple of the SM count) × the columns of a tile × the
    /// per-column weight.
    fn cost(self, m: usize, n: usize, sms: u32) -> u64 {
        let waves = self.tiles(m, n).div_ceil(sms.max(1) as u64);
        waves * self.columns() as u64 * self.column_weight()
    }

    /// The width of least modelled [cost](Self::cost) for an M × N product on `sms` SMs
    /// (ties to the wider): wave quantisation, padded columns and operand traffic all count.
    pub fn for_shape(m: usize, n: usize, sms: u32) -> TileWidth {
        let mut best = TileWidth::N256;
        for w in [TileWidth::N128, TileWidth::N64] {
            if w.cost(m, n, sms) < best.cost(m, n, sms) {
                best = w;
            }
        }
        best
    }
}

/// Why a GEMM cannot run the Hopper kernel (None: it qualifies). TMA needs 16-byte-aligned
/// A and W and row strides that are multiples of 16 bytes (K % 8 == 0); M, N and K tails are
/// handled (zero fill, masked stores). The A modulation is applied by a scale pass first (the
/// caller's job), so the kernel itself never sees one.
pub fn why_not(p: &GemmParams) -> Option<String> {
    if p.k <= 0 || p.k % 8 != 0 {
        return Some(format!("K = {} is not a positive multiple of 8", p.k));
    }
    if p.m <= 0 || p.n <= 0 {
        return Some(format!("empty product ({} × {})", p.m, p.n));
    }
    if p.a % 16 != 0 || p.w % 16 != 0 {
        return Some(format!(
            "A ({:#x}) or W ({:#x}) is not 16-byte aligned",
            p.a, p.w
        ));
    }
    if p.a_mod != 0 {
        return Some("the A modulation needs the scale pass first".into());
    }
    // The narrowest width has the most tiles.
    let tiles = TileWidth::N64.tiles(p.m as usize, p.n as usize);
    if tiles > i32::MAX as u64 {
        return Some(format!("{tiles} tiles exceed the tile index range"));
    }
    None
}

/// Whether `p` qualifies for the Hopper kernel ([`why_not`] is None).
pub fn qualifies(p: &GemmParams) -> bool {
    why_not(p).is_none()
}

/// The tensor map of a row-major bf16 `[rows, k]` operand: dims {k, rows}, box {64, box_rows},
/// 128-byte swizzle (the kernel's stage layout: 128 rows of A, BN rows of W).
pub fn operand_map(
    backend: BackendKind,
    addr: u64,
    rows: usize,
    k: usize,
    box_rows: usize,
) -> Result<TensorMap> {
    TensorMapSpec {
        dtype: TmaDtype::Bf16,
        global_address: addr,
        dims: vec![k as u64, rows as u64],
        strides: vec![2 * k as u64],
        box_dims: vec![TILE_K as u32, box_rows as u32],
        element_strides: vec![1, 1],
        swizzle: TmaSwizzle::B128,
    }
    .encode(backend)
}

/// Blocks of the persistent grid: one per SM at most.
pub fn grid(m: usize, n: usize, width: TileWidth, sms: u32) -> u32 {
    width.tiles(m, n).min(sms.max(1) as u64).max(1) as u32
}

/// The SM count the grid is sized for (an H100's 132 when the target does not say).
fn target_sms(target: &KernelTarget) -> u32 {
    if target.sms == 0 {
        132
    } else {
        target.sms
    }
}

/// The launch of the Hopper GEMM for parameters that [`qualify`](qualifies), on `target` (its
/// backend encodes the tensor maps; its SM count sizes the grid), in the target's width where
/// it names one (a tuning table's measured winner, `KernelTarget::gemm_tile_n`), else in the
/// width [`TileWidth::for_shape`] models best.
pub fn launch(target: &KernelTarget, p: &GemmParams, out: DType) -> Result<Launch> {
    let width = match target.gemm_tile_n {
        Some(columns) => TileWidth::from_columns(columns).ok_or_else(|| {
            Error::InvalidArgument(format!("gemm_sm90a: no kernel of tile width {columns}"))
        })?,
        None => TileWidth::for_shape(p.m.max(0) as usize, p.n.max(0) as usize, target_sms(target)),
    };
    launch_width(target, p, out, width)
}

/// [`launch`] in a given tile width: `gemm_sm90a_n<BN>_bf16_<out>`.
pub fn launch_width(
    target: &KernelTarget,
    p: &GemmParams,
    out: DType,
    width: TileWidth,
) -> Result<Launch> {
    if let Some(why) = why_not(p) {
        return Err(Error::InvalidArgument(format!(
            "gemm_sm90a: this GEMM does not qualify: {why}"
        )));
    }
    let backend = target.backend.ok_or_else(|| {
        Error::InvalidArgument("gemm_sm90a: no backend to encode the tensor maps for".into())
    })?;
    let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
    let a_map = operand_map(backend, p.a, m, k, TILE_M)?;
    let w_map = operand_map(backend, p.w, n, k, width.columns())?;
    let name = format!("{KERNEL_PREFIX}n{}_bf16_{}", width.columns(), out.suffix());
    Ok(Launch {
        kernel: KernelId::lookup(&name)?,
        grid: [grid(m, n, width, target_sms(target)), 1, 1],
        block: [THREADS, 1, 1],
        smem: width.smem_bytes(),
        args: Args::new()
            .tensor_map(&a_map)
            .tensor_map(&w_map)
            .by_value(p),
    })
}

/// Whether a launch runs the Hopper GEMM.
pub fn is_sm90a_gemm(l: &Launch) -> bool {
    l.kernel.name().starts_with(KERNEL_PREFIX)
}

/// The tile width of an sm_90a GEMM launch (None for any other kernel).
pub fn width_of(l: &Launch) -> Option<TileWidth> {
    let rest = l.kernel.name().strip_prefix(KERNEL_PREFIX)?;
    TileWidth::ALL
        .into_iter()
        .find(|w| rest.starts_with(&format!("n{}_", w.columns())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(m: i32, n: i32, k: i32) -> GemmParams {
        GemmParams {
            a: 0x1000,
            w: 0x2000,
            bias: 0,
            r: 0,
            c: 0x3000,
            ab: 0,
            partials: 0,
            a_mod: 0,
            m,
            n,
            k,
            gelu: 0,
            rows_per_sample: 1,
            film_k: 0.0,
            a_k: 0.0,
            pad: 0,
        }
    }

    #[test]
    fn qualification_rules() {
        assert!(qualifies(&params(77, 200, 72)));
        assert!(why_not(&params(77, 200, 12))
            .unwrap()
            .contains("multiple of 8"));
        let mut p = params(64, 64, 64);
        p.a += 8;
        assert!(why_not(&p).unwrap().contains("16-byte aligned"));
        let mut p = params(64, 64, 64);
        p.a_mod = 0x4000;
        assert!(why_not(&p).unwrap().contains("scale pass"));
    }

    #[test]
    fn the_persistent_grid_is_at_most_the_sm_count() {
        assert_eq!(grid(128, 128, TileWidth::N128, 132), 1);
        assert_eq!(grid(129, 257, TileWidth::N128, 132), 6);
        assert_eq!(grid(129, 257, TileWidth::N64, 132), 10);
        assert_eq!(grid(129, 257, TileWidth::N256, 132), 4);
        assert_eq!(grid(4096, 4096, TileWidth::N256, 132), 132);
    }

    #[test]
    fn a_width_is_read_back_from_its_columns_and_the_target_can_name_it() {
        for w in TileWidth::ALL {
            assert_eq!(TileWidth::from_columns(w.columns()), Some(w));
        }
        assert_eq!(TileWidth::from_columns(96), None);
        let p = params(300, 200, 72);
        let modelled = TileWidth::for_shape(300, 200, 132);
        let width = |t: &KernelTarget| launch(t, &p, DType::BF16).map(|l| width_of(&l));
        assert_eq!(width(&KernelTarget::hostsim()).unwrap(), Some(modelled));
        for w in TileWidth::ALL {
            let t = KernelTarget::hostsim().with_gemm_tile_n(w.columns());
            assert_eq!(width(&t).unwrap(), Some(w));
        }
        let bad = KernelTarget::hostsim().with_gemm_tile_n(96);
        assert!(width(&bad)
            .unwrap_err()
            .to_string()
            .contains("tile width 96"));
    }

    #[test]
    fn only_widths_that_pad_more_in_as_many_tiles_are_dominated() {
        let dominated = |n| TileWidth::ALL.map(|w| w.pads_only(n));
        // One 64-wide tile covers N: the wider ones only pad more.
        assert_eq!(dominated(1), [false, true, true]);
        assert_eq!(dominated(16), [false, true, true]);
        assert_eq!(dominated(64), [false, true, true]);
        // 65..128: two 64-wide tiles or one 128; 256 pads more than 128 in one tile.
        assert_eq!(dominated(100), [false, false, true]);
        assert_eq!(dominated(128), [false, false, true]);
        // Every width a trade-off of tiles against padding.
        for n in [129, 192, 257, 320, 2048, 3456] {
            assert_eq!(dominated(n), [false; 3], "N {n}");
        }
        // The model never picks a width that only pads more.
        for n in [1, 16, 64, 100, 128, 129, 192, 257, 320, 2048] {
            let w = TileWidth::for_shape(1000, n, 132);
            assert!(!w.pads_only(n), "N {n}: {w:?}");
        }
    }

    #[test]
    fn every_width_fits_shared_memory() {
        // The kernel's static_asserts state the same numbers.
        let bytes = TileWidth::ALL.map(TileWidth::smem_bytes);
        assert_eq!(bytes, [103_488, 140_352, 214_080]);
        assert!(bytes.iter().all(|&b| b <= 227 * 1024));
    }

    #[test]
    fn width_rule_on_the_models_shapes() {
        use TileWidth::*;
        // (M, N, width) on 132 SMs, from `bench --shapes --list` (docs/PERF.md's table).
        for (m, n, want) in [
            // Stage C at 4096²: N a multiple of 256, many tiles.
            (18432, 2048, N256),
            (18432, 8192, N256),
            (18432, 6144, N256),
            // Stage C at 1024²: 288 tiles of 256 take 3 waves, 576 of 128 take 5 (640 < 768
            // columns per SM).
            (1152, 8192, N128),
            // 170 rows × 6144: 48 tiles of 256 leave most SMs idle; 96 of 128 take one wave.
            (170, 6144, N128),
            // 144 tiles of 128 are 1.1 waves; 288 of 64 fill 3 waves better.
            (1152, 2048, N64),
            // Stage B: 1152 = 9 · 128; 3456 = 13.5 · 256 still gains from 256; 4608 = 18 · 256.
            (32768, 1152, N128),
            (32768, 3456, N256),
            (32768, 4608, N256),
            // Narrow N that 128 pads by a fifth or more.
            (524288, 320, N64),
            (331776, 192, N64),
            (1152, 16, N64),
            // 576 = 4.5 · 128: 64 saves a tenth of the columns, less than its weight costs.
            (131072, 576, N128),
            (82944, 384, N128),
        ] {
            assert_eq!(TileWidth::for_shape(m, n, 132), want, "M {m}, N {n}");
        }
    }
}
