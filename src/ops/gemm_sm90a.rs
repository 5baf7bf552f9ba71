//! The Hopper GEMM (`kernels/gemm_sm90a.cu`): the launcher and its TMA tensor maps. The
//! [`Gemm`](super::gemm::Gemm) ops call [`launch`] instead of the portable kernel when
//! `UPX_KERNELS` allows it on the target (`runtime::kernel_choice`) and the shape
//! [`qualifies`]; the math, layouts and epilogues are the portable kernel's.

use super::gemm::GemmParams;
use crate::runtime::abi::mirror_kernel_struct;
use crate::runtime::kernel_choice::KernelTarget;
use crate::runtime::kernels::KernelId;
use crate::runtime::launch::{Args, Launch};
use crate::runtime::tensor_map::{TensorMap, TensorMapSpec, TmaDtype, TmaSwizzle};
use crate::runtime::BackendKind;
use crate::tensor::DType;
use crate::{Error, Result};

/// Output tile (rows × columns) of one block iteration, and the k-tile of a pipeline stage.
pub const TILE_M: usize = 128;
pub const TILE_N: usize = 128;
pub const TILE_K: usize = 64;
/// 1024 alignment slack + 4 stages · (A + W tiles of 128 × 64 bf16) + 8 KiB GRN scratch +
/// 8 mbarriers (kernels/gemm_sm90a.cu, gemm_sm90a::SMEM_BYTES).
pub const SMEM_BYTES: u32 = 1024 + 4 * 2 * (128 * 64 * 2) + 2 * 4 * 2 * 128 * 4 + 2 * 4 * 8;
/// 3 warpgroups: the producer and two consumers.
pub const THREADS: u32 = 384;
/// The kernel name prefix (every launch of it is an sm_90a GEMM).
pub const KERNEL_PREFIX: &str = "gemm_sm90a_";

/// `struct GemmSm90aParams` of kernels/gemm_sm90a.cu: the fields of [`GemmParams`], same
/// layout (`a_mod` must be 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct GemmSm90aParams {
    pub a: u64,
    pub w: u64,
    pub bias: u64,
    pub r: u64,
    pub c: u64,
    pub ab: u64,
    pub partials: u64,
    pub a_mod: u64,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub gelu: i32,
    pub rows_per_sample: i32,
    pub film_k: f32,
    pub a_k: f32,
    pub pad: i32,
}
mirror_kernel_struct!(GemmSm90aParams);

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
    let tiles = (p.m as u64).div_ceil(TILE_M as u64) * (p.n as u64).div_ceil(TILE_N as u64);
    if tiles > i32::MAX as u64 {
        return Some(format!("{tiles} tiles exceed the tile index range"));
    }
    None
}

/// Whether `p` qualifies for the Hopper kernel ([`why_not`] is None).
pub fn qualifies(p: &GemmParams) -> bool {
    why_not(p).is_none()
}

/// The tensor map of a row-major bf16 `[rows, k]` operand: dims {k, rows}, box {64, 128},
/// 128-byte swizzle (the kernel's stage layout).
pub fn operand_map(backend: BackendKind, addr: u64, rows: usize, k: usize) -> Result<TensorMap> {
    TensorMapSpec {
        dtype: TmaDtype::Bf16,
        global_address: addr,
        dims: vec![k as u64, rows as u64],
        strides: vec![2 * k as u64],
        box_dims: vec![TILE_K as u32, TILE_M as u32],
        element_strides: vec![1, 1],
        swizzle: TmaSwizzle::B128,
    }
    .encode(backend)
}

/// Blocks of the persistent grid: one per SM at most.
pub fn grid(m: usize, n: usize, sms: u32) -> u32 {
    let tiles = m.div_ceil(TILE_M) * n.div_ceil(TILE_N);
    (tiles as u64).min(sms.max(1) as u64).max(1) as u32
}

/// The launch of `gemm_sm90a_bf16_<out>` for parameters that [`qualify`](qualifies), on
/// `target` (its backend encodes the tensor maps; its SM count sizes the grid).
pub fn launch(target: &KernelTarget, p: &GemmParams, out: DType) -> Result<Launch> {
    if let Some(why) = why_not(p) {
        return Err(Error::InvalidArgument(format!(
            "gemm_sm90a: this GEMM does not qualify: {why}"
        )));
    }
    let backend = target.backend.ok_or_else(|| {
        Error::InvalidArgument("gemm_sm90a: no backend to encode the tensor maps for".into())
    })?;
    let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
    let a_map = operand_map(backend, p.a, m, k)?;
    let w_map = operand_map(backend, p.w, n, k)?;
    let params: GemmSm90aParams = bytemuck::cast(*p);
    let name = format!("{KERNEL_PREFIX}bf16_{}", out.suffix());
    Ok(Launch {
        kernel: KernelId::lookup(&name)?,
        grid: [
            grid(m, n, if target.sms == 0 { 132 } else { target.sms }),
            1,
            1,
        ],
        block: [THREADS, 1, 1],
        smem: SMEM_BYTES,
        args: Args::new()
            .tensor_map(&a_map)
            .tensor_map(&w_map)
            .by_value(&params),
    })
}

/// Whether a launch runs the Hopper GEMM.
pub fn is_sm90a_gemm(l: &Launch) -> bool {
    l.kernel.name().starts_with(KERNEL_PREFIX)
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
        assert_eq!(grid(128, 128, 132), 1);
        assert_eq!(grid(129, 257, 132), 6);
        assert_eq!(grid(4096, 4096, 132), 132);
        assert_eq!(SMEM_BYTES, 140_352);
    }
}
