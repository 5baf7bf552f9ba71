//! The Hopper attention (`kernels/attention_sm90a.cu`, FA3-style): the launcher and its TMA
//! tensor maps. The [`Attention`](super::attention::Attention) op calls [`launch`] instead of
//! the portable kernel when `UPX_KERNELS` allows it on the target (`runtime::kernel_choice`)
//! and the shape [`qualifies`]; the math, layouts and output are the portable kernel's.

use super::attention::AttentionParams;
use crate::runtime::kernel_choice::KernelTarget;
use crate::runtime::kernels::KernelId;
use crate::runtime::launch::{Args, Launch};
use crate::runtime::tensor_map::{TensorMap, TensorMapSpec, TmaDtype, TmaSwizzle};
use crate::runtime::BackendKind;
use crate::tensor::DType;
use crate::{Error, Result};

/// The head dims with a Hopper kernel: 64 (Stage B/C, CLIP) and 32 (the INR transformer).
pub const HEAD_DIMS: [usize; 2] = [32, 64];
/// Query rows per block (two consumer warpgroups of 64) and keys per K/V tile.
pub const QUERY_TILE: usize = 128;
pub const KEY_TILE: usize = 128;
/// Dynamic shared memory for head dim `d`: 1024 alignment slack + the Q tile + 2 stages ·
/// (K + V tiles), each 128 × d bf16, + 5 mbarriers (kernels/attention_sm90a.cu,
/// attn_sm90a::smem_bytes).
pub const fn smem_bytes(d: usize) -> u32 {
    let tile = (KEY_TILE * d * 2) as u32;
    1024 + tile + 2 * 2 * tile + 5 * 8
}
/// 3 warpgroups: the producer and two consumers.
pub const THREADS: u32 = 384;
/// The kernel name prefix (every launch of it is an sm_90a attention).
pub const KERNEL_PREFIX: &str = "attention_sm90a_";

/// Why an attention cannot run the Hopper kernel (None: it qualifies). `head_dim` is C / heads,
/// `batch` and `heads` the grid's y and z. TMA needs 16-byte-aligned qkv and kv and row strides
/// that are multiples of 16 bytes (C % 8 == 0, true for head dim 64). Causal and key masks
/// work as in the portable kernel (causal only without extra tokens, as the op requires).
pub fn why_not(p: &AttentionParams, head_dim: usize, heads: usize, batch: usize) -> Option<String> {
    if !HEAD_DIMS.contains(&head_dim) {
        return Some(format!(
            "head dim {head_dim} (the kernel has {HEAD_DIMS:?})"
        ));
    }
    if p.causal != 0 && p.m != 0 {
        return Some("a causal mask with extra keys".into());
    }
    if p.n <= 0 || p.m < 0 || p.c <= 0 || p.c % 8 != 0 {
        return Some(format!("N = {}, M = {}, C = {}", p.n, p.m, p.c));
    }
    if p.n as i64 + KEY_TILE as i64 >= i32::MAX as i64
        || p.m as i64 + KEY_TILE as i64 >= i32::MAX as i64
    {
        return Some("the token count is too large for the tile coordinates".into());
    }
    if p.qkv % 16 != 0 || (p.m > 0 && p.kv % 16 != 0) {
        return Some(format!(
            "qkv ({:#x}) or kv ({:#x}) is not 16-byte aligned",
            p.qkv, p.kv
        ));
    }
    if heads == 0 || batch == 0 || heads > 65535 || batch > 65535 {
        return Some(format!("{heads} heads × {batch} samples"));
    }
    None
}

/// Whether the attention qualifies for the Hopper kernel ([`why_not`] is None).
pub fn qualifies(p: &AttentionParams, head_dim: usize, heads: usize, batch: usize) -> bool {
    why_not(p, head_dim, heads, batch).is_none()
}

/// The tensor map of a packed bf16 `[batch, tokens, channels]` tensor: dims {channels,
/// tokens, batch}, box {head_dim, 128, 1}, swizzle span 2·head_dim bytes (a 128-row tile of
/// one head of one sample; rows past `tokens` are zeros).
pub fn tokens_map(
    backend: BackendKind,
    addr: u64,
    batch: usize,
    tokens: usize,
    channels: usize,
    head_dim: usize,
) -> Result<TensorMap> {
    TensorMapSpec {
        dtype: TmaDtype::Bf16,
        global_address: addr,
        dims: vec![channels as u64, tokens as u64, batch as u64],
        strides: vec![2 * channels as u64, 2 * (channels * tokens) as u64],
        box_dims: vec![head_dim as u32, KEY_TILE as u32, 1],
        element_strides: vec![1, 1, 1],
        swizzle: if head_dim == 64 {
            TmaSwizzle::B128
        } else {
            TmaSwizzle::B64
        },
    }
    .encode(backend)
}

/// The launch of `attention_sm90a_d<D>_<out>` for parameters that [`qualify`](qualifies), on
/// `target` (its backend encodes the tensor maps).
pub fn launch(
    target: &KernelTarget,
    p: &AttentionParams,
    head_dim: usize,
    heads: usize,
    batch: usize,
    out: DType,
) -> Result<Launch> {
    if let Some(why) = why_not(p, head_dim, heads, batch) {
        return Err(Error::InvalidArgument(format!(
            "attention_sm90a: this attention does not qualify: {why}"
        )));
    }
    let backend = target.backend.ok_or_else(|| {
        Error::InvalidArgument("attention_sm90a: no backend to encode the tensor maps for".into())
    })?;
    let (n, m, c) = (p.n as usize, p.m as usize, p.c as usize);
    let qkv_map = tokens_map(backend, p.qkv, batch, n, 3 * c, head_dim)?;
    // Without extra tokens the kernel never reads the kv map: any valid map will do.
    let kv_map = if m > 0 {
        tokens_map(backend, p.kv, batch, m, 2 * c, head_dim)?
    } else {
        qkv_map
    };
    let name = format!("{KERNEL_PREFIX}d{head_dim}_{}", out.suffix());
    Ok(Launch {
        kernel: KernelId::lookup(&name)?,
        grid: [n.div_ceil(QUERY_TILE) as u32, heads as u32, batch as u32],
        block: [THREADS, 1, 1],
        smem: smem_bytes(head_dim),
        args: Args::new()
            .tensor_map(&qkv_map)
            .tensor_map(&kv_map)
            .by_value(p),
    })
}

/// Whether a launch runs the Hopper attention.
pub fn is_sm90a_attention(l: &Launch) -> bool {
    l.kernel.name().starts_with(KERNEL_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(n: i32, m: i32, c: i32) -> AttentionParams {
        AttentionParams {
            qkv: 0x1000,
            kv: if m > 0 { 0x2000 } else { 0 },
            mask: 0,
            out: 0x3000,
            n,
            m,
            c,
            causal: 0,
            scale: 0.125,
            pad: 0,
        }
    }

    #[test]
    fn qualification_rules() {
        assert!(qualifies(&params(77, 0, 128), 64, 2, 1));
        assert!(qualifies(&params(4096, 85, 2048), 64, 32, 2));
        assert!(qualifies(&params(77, 0, 64), 32, 2, 1));
        assert!(why_not(&params(77, 0, 32), 16, 2, 1)
            .unwrap()
            .contains("head dim"));
        let mut p = params(77, 0, 128);
        p.causal = 1;
        p.mask = 0x4000;
        assert!(qualifies(&p, 64, 2, 1));
        let mut p = params(77, 3, 128);
        p.causal = 1;
        assert!(why_not(&p, 64, 2, 1).unwrap().contains("causal"));
        let mut p = params(77, 5, 128);
        p.kv += 8;
        assert!(why_not(&p, 64, 2, 1).unwrap().contains("16-byte aligned"));
        assert_eq!(smem_bytes(64), 82_984);
        assert_eq!(smem_bytes(32), 42_024);
    }
}
