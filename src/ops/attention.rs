//! Multi-head softmax attention on packed projections: Stable Cascade's AttnBlock (image
//! tokens attending to themselves and the mapped CLIP tokens), the INR transformer, and CLIP's
//! causal, padding-masked self-attention. The projections are GEMMs before this op; the
//! output projection (where there is one) is a GEMM after it.
//!
//! Per head h (channels [h·d, (h+1)·d), d = C/heads): softmax(q·kᵀ/√d + masks)·v, the heads
//! concatenated. `kernels/attention.cu` runs it flash-style (online softmax, no N² buffer).

use super::dot::{accumulate, pack_panels, LANES};
use super::{require_f32, to_i32, Shaped};
use crate::runtime::abi::mirror_kernel_struct;
use crate::runtime::graph::{Cost, LaunchIo, OpImpl, OutSpec, TensorDesc};
use crate::runtime::kernels::KernelId;
use crate::runtime::launch::Launch;
use crate::runtime::launch::{ceil_div, Args};
use crate::tensor::{DType, HostTensor};
use crate::verify::{CheckBuilder, OpCheck, Scale, Tolerance};
use crate::{Error, Result};
use rayon::prelude::*;

/// The parameters of `attention_*` and `attention_sm90a_*`: `struct AttentionParams` of
/// kernels/common/attention.cuh, whose comments say what each field is. Device pointers are addresses, 0 for null.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AttentionParams {
    pub qkv: u64,
    pub kv: u64,
    pub mask: u64,
    pub out: u64,
    pub n: i32,
    pub m: i32,
    pub c: i32,
    pub causal: i32,
    pub scale: f32,
    pub pad: i32,
}
mirror_kernel_struct!(AttentionParams);

/// Inputs, in order:
/// - `qkv [B, N, 3C]`: each token row is q (C) | k (C) | v (C);
/// - if `extra_kv`: `kv [B, M, 2C]`, rows k | v: M more keys/values after the N own tokens
///   (Stable Cascade's mapped CLIP tokens);
/// - if `key_mask`: f32 `mask [B, N + M]`, 0 = key masked, anything else = allowed (CLIP's
///   padding mask).
///
/// Output `[B, N, C]`. A query whose keys are all masked gets zeros (the models never do
/// this: CLIP's BOS is always visible).
#[derive(Clone, Debug, PartialEq)]
pub struct Attention {
    pub heads: usize,
    /// Key j > query i is masked. Only without `extra_kv`.
    pub causal: bool,
    pub extra_kv: bool,
    pub key_mask: bool,
    pub out: DType,
}

#[derive(Clone, Copy, Debug)]
struct AttnDims {
    batch: usize,
    /// N: own tokens, each a query and a key.
    queries: usize,
    /// M: extra keys.
    extra: usize,
    channels: usize,
    head_dim: usize,
}

impl AttnDims {
    fn keys(&self) -> usize {
        self.queries + self.extra
    }
}

impl Attention {
    /// Plain self-attention without masks.
    pub fn new(heads: usize, out: DType) -> Self {
        Attention {
            heads,
            causal: false,
            extra_kv: false,
            key_mask: false,
            out,
        }
    }

    fn n_inputs(&self) -> usize {
        1 + self.extra_kv as usize + self.key_mask as usize
    }

    fn dims<T: Shaped>(&self, ins: &[&T]) -> Result<AttnDims> {
        let op = self.name();
        let fail = |msg: String| Err(Error::shape(op, msg));
        if ins.len() != self.n_inputs() {
            return fail(format!(
                "expected {} inputs, got {}",
                self.n_inputs(),
                ins.len()
            ));
        }
        if self.causal && self.extra_kv {
            return fail("a causal mask is only defined without extra keys".into());
        }
        let (batch, queries, channels) = match *ins[0].shape() {
            [b, n, c3]
                if b > 0 && n > 0 && self.heads > 0 && c3 > 0 && c3 % (3 * self.heads) == 0 =>
            {
                (b, n, c3 / 3)
            }
            ref s => {
                return fail(format!(
                    "qkv must be [B, N, 3C] with C a multiple of {} heads, got {s:?}",
                    self.heads
                ))
            }
        };
        let extra = if self.extra_kv {
            match *ins[1].shape() {
                [b, m, c2] if b == batch && m > 0 && c2 == 2 * channels => m,
                ref s => {
                    return fail(format!(
                        "kv must be [{batch}, M, {}] with M > 0, got {s:?}",
                        2 * channels
                    ))
                }
            }
        } else {
            0
        };
        if self.key_mask {
            let m = ins[ins.len() - 1].shape();
            if m != [batch, queries + extra] {
                return fail(format!(
                    "mask must be [{batch}, {}], got {m:?}",
                    queries + extra
                ));
            }
        }
        Ok(AttnDims {
            batch,
            queries,
            extra,
            channels,
            head_dim: channels / self.heads,
        })
    }
}

/// Σ_j softmax(scores)_j · values_j[t] for each t, in f64; zeros when there are no keys.
fn softmax_mix<'a>(scores: &[f64], values: impl Iterator<Item = &'a [f32]>, out: &mut [f32]) {
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut acc = vec![0f64; out.len()];
    for (w, v) in weights.iter().zip(values) {
        for (a, &x) in acc.iter_mut().zip(v) {
            *a += w * x as f64;
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = if total > 0.0 { (a / total) as f32 } else { 0.0 };
    }
}

impl OpImpl for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let d = self.dims(inputs)?;
        if self.key_mask {
            require_f32(self.name(), "mask", inputs[inputs.len() - 1])?;
        }
        Ok(vec![(vec![d.batch, d.queries, d.channels], self.out)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let dims = self.dims(inputs)?;
        let AttnDims {
            batch,
            queries: n,
            extra: m,
            channels: c,
            head_dim: d,
        } = dims;
        let (keys, heads) = (dims.keys(), self.heads);
        let qkv = &inputs[0].data;
        let kv: &[f32] = if self.extra_kv { &inputs[1].data } else { &[] };
        let mask = self.key_mask.then(|| &inputs[inputs.len() - 1].data);
        let scale = 1.0 / (d as f64).sqrt();
        // Per (sample, head): its keys packed in panels of LANES keys (own tokens first, then
        // the extra ones) and its values as contiguous [keys, d] rows.
        let gathered: Vec<(Vec<f64>, Vec<f32>)> = (0..batch * heads)
            .into_par_iter()
            .map(|bh| {
                let (b, h) = (bh / heads, bh % heads);
                let (mut ks, mut vs) = (Vec::with_capacity(keys * d), Vec::with_capacity(keys * d));
                for j in 0..keys {
                    let (k, v) = if j < n {
                        let r = &qkv[(b * n + j) * 3 * c..][..3 * c];
                        (&r[c..2 * c], &r[2 * c..])
                    } else {
                        kv[(b * m + j - n) * 2 * c..][..2 * c].split_at(c)
                    };
                    ks.extend_from_slice(&k[h * d..][..d]);
                    vs.extend_from_slice(&v[h * d..][..d]);
                }
                (pack_panels(&ks, keys, d), vs)
            })
            .collect();
        // Tasks of REF_QUERY_BLOCK queries of one (sample, head). Every score is the f64 dot
        // product q·k in order (masked keys' scores are computed and left unused), then each
        // query's softmax over its visible keys, as one query alone would compute it.
        let blocks = n.div_ceil(REF_QUERY_BLOCK);
        let results: Vec<Vec<f32>> = (0..batch * heads * blocks)
            .into_par_iter()
            .map(|task| {
                let (bh, blk) = (task / blocks, task % blocks);
                let (b, h) = (bh / heads, bh % heads);
                let (panels, vs) = &gathered[bh];
                let rows = blk * REF_QUERY_BLOCK..n.min((blk + 1) * REF_QUERY_BLOCK);
                let q_of = |i: usize| &qkv[(b * n + i) * 3 * c + h * d..][..d];
                let padded = keys.div_ceil(LANES) * LANES;
                let mut scores = vec![0f64; rows.len() * padded];
                for (r0, block) in rows.clone().step_by(4).zip(scores.chunks_mut(4 * padded)) {
                    let count = block.len() / padded;
                    for (p, panel) in panels.chunks_exact(d * LANES).enumerate() {
                        let mut acc = [[-0.0f64; LANES]; 4];
                        if count == 4 {
                            accumulate(&mut acc, std::array::from_fn(|r| q_of(r0 + r)), panel);
                        } else {
                            for (r, a) in acc.iter_mut().enumerate().take(count) {
                                let mut one = [*a];
                                accumulate(&mut one, [q_of(r0 + r)], panel);
                                *a = one[0];
                            }
                        }
                        for (r, a) in acc.iter().enumerate().take(count) {
                            block[r * padded + p * LANES..][..LANES].copy_from_slice(a);
                        }
                    }
                }
                let mut out = vec![0f32; rows.len() * d];
                for ((i, o), all) in rows
                    .zip(out.chunks_exact_mut(d))
                    .zip(scores.chunks_exact(padded))
                {
                    let visible: Vec<usize> = (0..keys)
                        .filter(|&j| !(self.causal && j > i))
                        .filter(|&j| mask.is_none_or(|mk| mk[b * keys + j] != 0.0))
                        .collect();
                    let s: Vec<f64> = visible.iter().map(|&j| all[j] * scale).collect();
                    let values = visible.iter().map(|&j| &vs[j * d..][..d]);
                    softmax_mix(&s, values, o);
                }
                out
            })
            .collect();
        let y = &mut outputs[0].data;
        for (task, r) in results.iter().enumerate() {
            let (bh, blk) = (task / blocks, task % blocks);
            let (b, h) = (bh / heads, bh % heads);
            for (k, o) in r.chunks_exact(d).enumerate() {
                let i = blk * REF_QUERY_BLOCK + k;
                y[(b * n + i) * c + h * d..][..d].copy_from_slice(o);
            }
        }
        Ok(())
    }

    /// Dense count (a causal mask is not subtracted): q·kᵀ and p·v, 2 FLOPs per MAC.
    fn cost(&self, inputs: &[&TensorDesc], outputs: &[&TensorDesc]) -> Cost {
        let bytes = inputs.iter().chain(outputs).map(|d| d.bytes() as f64).sum();
        let flops = self.dims(inputs).map_or(0.0, |d| {
            4.0 * d.batch as f64 * d.queries as f64 * d.keys() as f64 * d.channels as f64
        });
        Cost { flops, bytes }
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let (params, d) = self.params(io)?;
        let op = self.name();
        // The Hopper kernel where the kernel choice allows it on this target and the shape
        // qualifies (ops/attention_sm90a.rs); the portable one otherwise.
        if io.target.sm90a_allowed()?
            && super::attention_sm90a::qualifies(&params, d.head_dim, self.heads, d.batch)
        {
            let l = super::attention_sm90a::launch(
                &io.target, &params, d.head_dim, self.heads, d.batch, self.out,
            )?;
            return Ok(vec![l]);
        }
        let small = matches!(d.head_dim, 4 | 8);
        let args = Args::new().by_value(&params);
        let name = format!("attention_d{}_{}", d.head_dim, self.out.suffix());
        let grid_y = to_i32(op, "heads", self.heads)?;
        let grid_z = to_i32(op, "batch", d.batch)?;
        if grid_y > 65535 || grid_z > 65535 {
            return Err(Error::shape(op, "heads and batch must each be below 65536"));
        }
        // Small heads: one thread per query row, no shared memory.
        let (rows_per_block, smem) = if small {
            (SMALL_HEAD_THREADS, 0)
        } else {
            (QUERY_TILE, smem_bytes(d.head_dim))
        };
        Ok(vec![Launch {
            kernel: KernelId::lookup(&name)?,
            grid: [
                to_i32(op, "query tiles", ceil_div(d.queries, rows_per_block))? as u32,
                grid_y as u32,
                grid_z as u32,
            ],
            block: [128, 1, 1],
            smem,
            args,
        }])
    }

    fn sm90a_fallback(&self, io: &LaunchIo) -> Result<Option<String>> {
        if !io.target.sm90a_allowed()? {
            return Ok(None);
        }
        let (params, d) = self.params(io)?;
        Ok(super::attention_sm90a::why_not(
            &params, d.head_dim, self.heads, d.batch,
        ))
    }
}

impl Attention {
    /// The kernel parameters of a launch on `io` (after checking that a kernel exists for
    /// its head dim and operand dtypes), and its dimensions.
    fn params(&self, io: &LaunchIo) -> Result<(AttentionParams, AttnDims)> {
        let descs: Vec<&TensorDesc> = io.inputs.iter().map(|t| t.desc).collect();
        let d = self.dims(&descs)?;
        let op = self.name();
        if !matches!(d.head_dim, 4 | 8 | 16 | 32 | 64) {
            return Err(Error::shape(
                op,
                format!(
                    "no kernel for head dim {} (4, 8, 16, 32 and 64 exist)",
                    d.head_dim
                ),
            ));
        }
        let operands = &descs[..1 + self.extra_kv as usize];
        if let Some(t) = operands.iter().find(|t| t.dtype != DType::BF16) {
            return Err(Error::shape(
                op,
                format!("the kernel reads bf16 q/k/v, {} is {:?}", t.name, t.dtype),
            ));
        }
        let ptr_of = |present: bool, i: usize| if present { io.inputs[i].ptr } else { 0 };
        let params = AttentionParams {
            qkv: io.inputs[0].ptr,
            kv: ptr_of(self.extra_kv, 1),
            mask: ptr_of(self.key_mask, io.inputs.len() - 1),
            out: io.outputs[0].ptr,
            n: to_i32(op, "N", d.queries)?,
            m: to_i32(op, "M", d.extra)?,
            c: to_i32(op, "C", d.channels)?,
            causal: self.causal as i32,
            scale: 1.0 / (d.head_dim as f32).sqrt(),
            pad: 0,
        };
        Ok((params, d))
    }
}

/// Queries per task of the reference.
const REF_QUERY_BLOCK: usize = 16;

/// Queries per block (`attn::BQ`); keys per tile are the same.
const QUERY_TILE: usize = 64;
/// Threads (= query rows) per block of the small-head kernels.
const SMALL_HEAD_THREADS: usize = 128;

/// The Q tile plus double-buffered K and V tiles, rows padded by 8 elements.
fn smem_bytes(head_dim: usize) -> u32 {
    (5 * QUERY_TILE * (head_dim + 8) * 2) as u32
}

/// Hostsim/GPU checks: both head dims, both outputs, masks and extra keys, sequence lengths
/// that are not multiples of the tile.
pub fn checks(seed: u64, scale: Scale) -> Result<Vec<OpCheck>> {
    // (batch, queries, extra keys, heads, head dim, causal, key mask)
    let mut cases = vec![
        (1, 1, 0, 1, 64, false, false),
        (2, 37, 5, 2, 64, false, false),
        (1, 70, 0, 3, 32, true, true),
        (2, 65, 13, 1, 32, false, true),
        (1, 63, 85, 2, 16, false, false),
        (1, 130, 85, 2, 64, false, false),
        (2, 77, 0, 2, 64, true, true),
        (3, 77, 0, 2, 4, true, true),
        (1, 130, 0, 2, 8, false, false),
        (2, 99, 7, 3, 8, false, true),
    ];
    if scale == Scale::Gpu {
        cases.extend([
            (2, 2304, 85, 32, 64, false, false),
            (1, 4096, 0, 8, 32, false, false),
        ]);
    }
    let mut v = Vec::new();
    for (i, &(batch, n, m, heads, d, causal, key_mask)) in cases.iter().enumerate() {
        for out in [DType::BF16, DType::F32] {
            let mut b =
                CheckBuilder::new(seed.wrapping_add(i as u64 * 2 + (out == DType::F32) as u64));
            let c = heads * d;
            let mut ins = vec![b.input(&[batch, n, 3 * c], DType::BF16, 2.0)?];
            if m > 0 {
                ins.push(b.input(&[batch, m, 2 * c], DType::BF16, 2.0)?);
            }
            if key_mask {
                ins.push(b.mask(&[batch, n + m], 0.3)?);
            }
            let op = Attention {
                heads,
                causal,
                extra_kv: m > 0,
                key_mask,
                out,
            };
            let y = b.graph.op1(op, &ins)?;
            let check = b.finish(
                format!("attention b{batch} n{n} m{m} h{heads}x{d} causal={causal} mask={key_mask} ->{out:?}"),
                &[y],
                Tolerance::BOUND,
            )?;
            let bf16 = out == DType::BF16;
            let kv_id = (m > 0).then(|| ins[1]);
            v.push(check.with_scale(move |chk, r| {
                let kv = kv_id.map(|id| chk.values(id));
                vec![attention_bounds(
                    chk.values(ins[0]),
                    kv,
                    (batch, n, m, heads, d),
                    &r[0],
                    bf16,
                )]
            }));
        }
    }
    Ok(v)
}

/// Per-element bounds on |kernel − reference| of attention output o[b, i, h·d + t]. With
/// p_j the softmax weights and V_t = max_j |v_j[t]| over the sample's keys (≥ Σp|v|/Σp):
/// - the kernel rounds P to bf16 for P·V: a relative 2⁻⁸ per p_j, ≤ U_BF16·V_t;
/// - a relative error ε of the p_j (numerator and Σp) moves o by ≤ 2ε·V_t, where
///   ε = 2 ulp (exp2f) + 2·(sum(d, 2⁻²³) + 6u)·S_max: each score q·k·scale·log2e errs by
///   sum(d, 2⁻²³)·|q|·|k|·scale (tensor-core accumulation) plus the scaling's and the
///   max-subtraction's roundings, S_max = max_i ‖q_i‖ · max_j ‖k_j‖ · scale bounding |s|;
/// - the f32 accumulations over the keys (P·V, Σp): sum(keys, 2⁻²³) + 4u relative to V_t,
///   and the online softmax's rescaling of o and Σp by the same α once per key tile: a
///   rounding each, 2u per tile (at most ceil(keys / 64) + 1 tiles: the portable kernel's
///   64-key tiles, or the sm_90a kernel's 128-key tiles of own and of extra tokens);
/// - then the store (the scalar small-head path has no bf16 P: the bound covers it).
pub fn attention_bounds(
    qkv: &[f32],
    kv: Option<&[f32]>,
    (batch, n, m, heads, d): (usize, usize, usize, usize, usize),
    y: &[f32],
    bf16: bool,
) -> Vec<f32> {
    use crate::verify::bound::{stored, sum, U, ULP2, U_BF16, U_MMA};
    let c = heads * d;
    let keys = n + m;
    let scale = 1.0 / (d as f64).sqrt();
    let norm = |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let mut out = vec![0f32; y.len()];
    for b in 0..batch {
        for h in 0..heads {
            let key = |j: usize| -> (&[f32], &[f32]) {
                let (k, v) = if j < n {
                    let r = &qkv[(b * n + j) * 3 * c..][..3 * c];
                    (&r[c..2 * c], &r[2 * c..])
                } else {
                    kv.expect("extra keys")[(b * m + j - n) * 2 * c..][..2 * c].split_at(c)
                };
                (&k[h * d..][..d], &v[h * d..][..d])
            };
            let q_max = (0..n)
                .map(|i| norm(&qkv[(b * n + i) * 3 * c + h * d..][..d]))
                .fold(0f64, f64::max);
            let k_max = (0..keys).map(|j| norm(key(j).0)).fold(0f64, f64::max);
            let s_max = q_max * k_max * scale;
            let eps_p = ULP2 + 2.0 * (sum(d, U_MMA) + 6.0 * U) * s_max;
            let tiles = keys.div_ceil(QUERY_TILE) as f64 + 1.0;
            let rel = U_BF16 + 2.0 * eps_p + sum(keys, U_MMA) + (4.0 + 2.0 * tiles) * U;
            let v_max: Vec<f64> = (0..d)
                .map(|t| {
                    (0..keys)
                        .map(|j| key(j).1[t].abs() as f64)
                        .fold(0f64, f64::max)
                })
                .collect();
            for i in 0..n {
                let at = (b * n + i) * c + h * d;
                for t in 0..d {
                    out[at + t] = stored(rel * v_max[t], y[at + t] as f64, bf16) as f32;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_data::random;
    use crate::ops::test_support::{desc, run};

    const B: usize = 2;
    const N: usize = 7;
    const M: usize = 5;
    const HEADS: usize = 3;
    const D: usize = 5;
    const C: usize = HEADS * D;

    fn op(causal: bool, extra_kv: bool, key_mask: bool) -> Attention {
        Attention {
            heads: HEADS,
            causal,
            extra_kv,
            key_mask,
            out: DType::F32,
        }
    }

    /// A mask over N + extra keys with a few zeros, never all of a query's keys.
    fn some_mask(extra: usize) -> HostTensor {
        let l = N + extra;
        let data = (0..B * l)
            .map(|i| if i % l != 0 && i % 3 == 1 { 0.0 } else { 1.0 })
            .collect();
        HostTensor::new(vec![B, l], data)
    }

    /// The same attention via materialized score matrices: S = Q·Kᵀ/√d per (sample, head),
    /// masked entries −∞, row softmax, then P·V.
    fn materialized(
        a: &Attention,
        qkv: &HostTensor,
        kv: Option<&HostTensor>,
        mask: Option<&HostTensor>,
    ) -> Vec<f32> {
        let extra = kv.map_or(0, |t| t.shape[1]);
        let l = N + extra;
        let mut out = vec![0f32; B * N * C];
        for b in 0..B {
            for h in 0..HEADS {
                let col = |row: &[f32], part: usize| -> Vec<f64> {
                    row[part * C + h * D..][..D]
                        .iter()
                        .map(|&x| x as f64)
                        .collect()
                };
                let own = |j: usize| &qkv.data[(b * N + j) * 3 * C..][..3 * C];
                let q: Vec<Vec<f64>> = (0..N).map(|i| col(own(i), 0)).collect();
                let mut k: Vec<Vec<f64>> = (0..N).map(|j| col(own(j), 1)).collect();
                let mut v: Vec<Vec<f64>> = (0..N).map(|j| col(own(j), 2)).collect();
                if let Some(kv) = kv {
                    for j in 0..extra {
                        let r = &kv.data[(b * extra + j) * 2 * C..][..2 * C];
                        k.push(col(r, 0));
                        v.push(col(r, 1));
                    }
                }
                let s: Vec<Vec<f64>> = (0..N)
                    .map(|i| {
                        (0..l)
                            .map(|j| {
                                let masked = (a.causal && j > i)
                                    || mask.is_some_and(|m| m.data[b * l + j] == 0.0);
                                if masked {
                                    f64::NEG_INFINITY
                                } else {
                                    (0..D).map(|t| q[i][t] * k[j][t]).sum::<f64>()
                                        / (D as f64).sqrt()
                                }
                            })
                            .collect()
                    })
                    .collect();
                for (i, srow) in s.iter().enumerate() {
                    let mx = srow.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = srow.iter().map(|&x| (x - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for t in 0..D {
                        let o: f64 = (0..l).map(|j| e[j] * v[j][t]).sum::<f64>() / z;
                        out[(b * N + i) * C + h * D + t] = o as f32;
                    }
                }
            }
        }
        out
    }

    fn attend(
        a: &Attention,
        qkv: &HostTensor,
        kv: Option<&HostTensor>,
        mask: Option<&HostTensor>,
    ) -> HostTensor {
        let ins: Vec<&HostTensor> = [Some(qkv), kv, mask].into_iter().flatten().collect();
        run(a, &ins).unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    #[test]
    fn matches_materialized_scores_in_every_mode() {
        let qkv = random(1, &[B, N, 3 * C], 2.0);
        let kv = random(2, &[B, M, 2 * C], 2.0);
        for (causal, extra, masked) in [
            (false, false, false),
            (true, false, false),
            (true, false, true),
            (false, true, false),
            (false, true, true),
        ] {
            let a = op(causal, extra, masked);
            let kv = extra.then_some(&kv);
            let mask = masked.then(|| some_mask(if extra { M } else { 0 }));
            let got = attend(&a, &qkv, kv, mask.as_ref());
            assert_eq!(got.shape, [B, N, C]);
            let want = materialized(&a, &qkv, kv, mask.as_ref());
            assert!(max_diff(&got.data, &want) <= 1e-6, "{a:?}");
        }
    }

    #[test]
    fn extra_keys_in_any_order_give_the_same_output() {
        let qkv = random(3, &[B, N, 3 * C], 2.0);
        let kv = random(4, &[B, M, 2 * C], 2.0);
        let a = op(false, true, false);
        let base = attend(&a, &qkv, Some(&kv), None);
        let order = [3, 0, 4, 1, 2];
        let permuted: Vec<f32> = (0..B)
            .flat_map(|b| {
                order
                    .iter()
                    .flat_map(move |&j| (0..2 * C).map(move |t| (b, j, t)))
            })
            .map(|(b, j, t)| kv.data[(b * M + j) * 2 * C + t])
            .collect();
        let kv2 = HostTensor::new(kv.shape.clone(), permuted);
        assert!(max_diff(&attend(&a, &qkv, Some(&kv2), None).data, &base.data) <= 1e-6);
    }

    #[test]
    fn permuting_tokens_permutes_the_outputs() {
        let qkv = random(5, &[1, N, 3 * C], 2.0);
        let a = Attention::new(HEADS, DType::F32);
        let base = attend(&a, &qkv, None, None);
        let order = [6, 2, 0, 5, 1, 3, 4];
        let rows = |t: &HostTensor, w: usize| -> Vec<f32> {
            order
                .iter()
                .flat_map(|&j| t.data[j * w..][..w].to_vec())
                .collect()
        };
        let shuffled = HostTensor::new(qkv.shape.clone(), rows(&qkv, 3 * C));
        let got = attend(&a, &shuffled, None, None);
        assert!(max_diff(&got.data, &rows(&base, C)) <= 1e-6);
    }

    #[test]
    fn a_head_dim_without_kernel_is_a_clear_error() {
        // D = 5 (the reference tests' size) has no kernel: launching says so.
        let mut g = crate::runtime::graph::Graph::new();
        let qkv = g.input("qkv", &[B, N, 3 * C], DType::BF16).unwrap();
        g.op1(Attention::new(HEADS, DType::BF16), &[qkv]).unwrap();
        let err = crate::runtime::device::dry_launches(&g)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no kernel for head dim 5"), "{err}");
    }

    #[test]
    fn causal_first_token_sees_only_itself() {
        let qkv = random(6, &[B, N, 3 * C], 2.0);
        let got = attend(&op(true, false, false), &qkv, None, None);
        for b in 0..B {
            let v0 = &qkv.data[b * N * 3 * C + 2 * C..][..C];
            assert!(max_diff(&got.data[b * N * C..][..C], v0) <= 1e-6);
        }
    }

    #[test]
    fn masked_keys_have_no_influence() {
        let qkv = random(7, &[B, N, 3 * C], 2.0);
        let kv = random(8, &[B, M, 2 * C], 2.0);
        let mask = some_mask(M);
        let a = op(false, true, true);
        let base = attend(&a, &qkv, Some(&kv), Some(&mask));
        // Overwrite the k and v of every masked key.
        let (mut qkv2, mut kv2) = (qkv.clone(), kv.clone());
        for b in 0..B {
            for j in (0..N + M).filter(|&j| mask.data[b * (N + M) + j] == 0.0) {
                let kv_part = if j < N {
                    &mut qkv2.data[(b * N + j) * 3 * C + C..][..2 * C]
                } else {
                    &mut kv2.data[(b * M + j - N) * 2 * C..][..2 * C]
                };
                kv_part.iter_mut().for_each(|x| *x = 1e3 - *x);
            }
        }
        assert_eq!(attend(&a, &qkv2, Some(&kv2), Some(&mask)).data, base.data);
    }

    #[test]
    fn extra_kv_equals_self_attention_over_the_concatenation() {
        let qkv = random(9, &[B, N, 3 * C], 2.0);
        let kv = random(10, &[B, M, 2 * C], 2.0);
        let with_extra = attend(&op(false, true, false), &qkv, Some(&kv), None);
        // The extra tokens become own tokens with some query; keep the first N outputs.
        let q_filler = random(11, &[C], 1.0).data;
        let joined: Vec<f32> = (0..B)
            .flat_map(|b| {
                let own = qkv.data[b * N * 3 * C..][..N * 3 * C].to_vec();
                let extra = (0..M).flat_map(|j| {
                    let r = &kv.data[(b * M + j) * 2 * C..][..2 * C];
                    q_filler.iter().chain(r).copied().collect::<Vec<_>>()
                });
                own.into_iter().chain(extra).collect::<Vec<_>>()
            })
            .collect();
        let joined = HostTensor::new(vec![B, N + M, 3 * C], joined);
        let all = attend(&Attention::new(HEADS, DType::F32), &joined, None, None);
        let first_n: Vec<f32> = (0..B)
            .flat_map(|b| all.data[b * (N + M) * C..][..N * C].to_vec())
            .collect();
        assert!(max_diff(&with_extra.data, &first_n) <= 1e-6);
    }

    #[test]
    fn a_query_without_visible_keys_gets_zeros() {
        let qkv = random(12, &[1, 3, 3 * C], 1.0);
        let mask = HostTensor::new(vec![1, 3], vec![0.0, 1.0, 1.0]);
        let a = Attention {
            key_mask: true,
            causal: true,
            ..Attention::new(HEADS, DType::F32)
        };
        let got = attend(&a, &qkv, None, Some(&mask));
        assert!(got.data[..C].iter().all(|&x| x == 0.0));
        assert!(got.data[C..].iter().all(|x| x.is_finite()));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let f = |s: &[usize]| desc(s, DType::F32);
        let infer = |a: &Attention, ins: &[&TensorDesc]| a.infer(ins);
        let (qkv, kv, mask) = (f(&[B, N, 3 * C]), f(&[B, M, 2 * C]), f(&[B, N + M]));
        let plain = op(false, false, false);
        let extra = op(false, true, false);
        let extra_masked = op(false, true, true);
        assert!(infer(&extra_masked, &[&qkv, &kv, &mask]).is_ok());
        let cases = [
            (op(true, true, false), vec![&qkv, &kv], "causal + extra"),
            (extra.clone(), vec![&qkv], "arity"),
            (plain.clone(), vec![&qkv, &kv], "arity"),
            (Attention::new(0, DType::F32), vec![&qkv], "0 heads"),
        ];
        for (a, ins, what) in &cases {
            assert!(infer(a, ins).is_err(), "{what}");
        }
        let bad_qkv = [
            ([B, N, 3 * C + 3], "C % heads"),
            ([B, N, 3 * C + 1], "3C"),
            ([B, 0, 3 * C], "empty"),
        ];
        for (shape, what) in bad_qkv {
            assert!(infer(&plain, &[&f(&shape)]).is_err(), "{what}");
        }
        assert!(infer(&plain, &[&f(&[N, 3 * C])]).is_err(), "rank");
        for (shape, what) in [
            ([B, M, C], "kv width"),
            ([1, M, 2 * C], "kv batch"),
            ([B, 0, 2 * C], "no extra"),
        ] {
            assert!(infer(&extra, &[&qkv, &f(&shape)]).is_err(), "{what}");
        }
        let short_mask = f(&[B, N]);
        assert!(infer(&extra_masked, &[&qkv, &kv, &short_mask]).is_err());
        let bf16_mask = desc(&[B, N + M], DType::BF16);
        assert!(infer(&extra_masked, &[&qkv, &kv, &bf16_mask]).is_err());
        let host = HostTensor::zeros(&[B, N, 3 * C]);
        let mut outs = [HostTensor::zeros(&[1])];
        assert!(extra.reference(&[&host], &mut outs).is_err());
    }
}
