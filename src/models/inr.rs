//! UltraPixel's INR guidance module (`TransInr_withnorm`, docs/MODEL.md §3.2), in two parts:
//!
//! - [`reconstruct`] (steps A–E.2): LR tokens and weight tokens through one transformer
//!   layer, the modulated hyper-MLP over the HR pixel grid, the output layer plus the
//!   nearest-upsampled LR features. It depends only on the LR features and the HR size, so
//!   the pipeline runs it once per generation, not once per step.
//! - [`fuse`] (E.3–E.6): the fusion with the HR features, the time FiLM, LayerNorm2d and the
//!   scale-aware norm, every step.

use super::blocks::{
    affine_norm, linear, linear_gelu, linear_residual, norm, scale_norm, table_rows, TORCH_LN_EPS,
};
use super::config::InrConfig;
use super::{stack_rows, ModelBuilder};
use crate::ops::attention::Attention;
use crate::ops::elementwise::{Act, Activation, Add};
use crate::ops::embed::scale_signal;
use crate::ops::gemm::Gemm;
use crate::ops::inr::{CoordPosEnc, HyperMlp, ModulatedWeights, POSENC_WIDTH};
use crate::ops::layout::{Broadcast, Concat, Reshape, Slice};
use crate::ops::resample::ResizeNearest;
use crate::runtime::graph::TensorId;
use crate::tensor::{DType, HostTensor};
use crate::{Error, Result};

/// Rows of `tokenizer.posemb`: the LR token count may not exceed it.
pub const POSEMB_ROWS: usize = 1024;

/// Steps A–E.2 for the module under `p` (e.g. `agg_net.0.`): `dtokens` bf16 `[B, h, w, ind]`
/// → hr_rec f32 `[B, H, W, ind]` at `hr_size` = (H, W).
pub fn reconstruct(
    mb: &mut ModelBuilder,
    p: &str,
    cfg: &InrConfig,
    dtokens: TensorId,
    hr_size: (usize, usize),
) -> Result<TensorId> {
    cfg.validate()?;
    let (ind, ch, f, heads) = (cfg.ind, cfg.ch, cfg.f_dim, cfg.n_head);
    let (hh, ww) = hr_size;
    let ds = mb.g.shape(dtokens).to_vec();
    let (b, n) = (ds[0], ds[1] * ds[2]);
    if n > POSEMB_ROWS {
        return Err(Error::InvalidArgument(format!(
            "INR: {} × {} = {n} low-resolution tokens exceed the {POSEMB_ROWS} rows of its \
             positional table",
            ds[1], ds[2]
        )));
    }
    let key = |k: &str| format!("{p}{k}");
    let (bf, f32t) = (DType::BF16, DType::F32);
    let n_w = wtoken_count(cfg);

    // A. LR tokens + positional rows.
    let u = linear(
        mb,
        &key("input_layer"),
        dtokens,
        (f, ind),
        true,
        Gemm::linear(bf),
        None,
    )?;
    let u = mb.g.op1(
        Reshape {
            shape: vec![b, n, f],
        },
        &[u],
    )?;
    let pos = table_rows(mb, &key("tokenizer.posemb"), (POSEMB_ROWS, f), n, b)?;
    let tok = linear(
        mb,
        &key("tokenizer.prefc"),
        u,
        (f, f),
        false,
        linear_residual(f32t),
        Some(pos),
    )?;
    let wt = mb.weight(&key("wtokens"), &[n_w, f], f32t)?;
    let wt = mb.g.op1(
        Broadcast {
            batch: b,
            out: f32t,
        },
        &[wt],
    )?;
    let s0 = mb.g.op1(Concat { axis: 1, out: f32t }, &[tok, wt])?;

    // B. One pre-norm transformer layer (no output projection in the attention).
    let layer = key("transformer_encoder.layers.0");
    let z = affine_norm(mb, &format!("{layer}.0.norm"), s0, f, TORCH_LN_EPS, bf)?;
    let z = mb.g.op1(
        Activation {
            act: Act::Silu,
            out: bf,
        },
        &[z],
    )?;
    let (q_w, kv_w) = (
        format!("{layer}.0.fn.to_q.1.weight"),
        format!("{layer}.0.fn.to_kv.1.weight"),
    );
    let (q_b, kv_b) = (
        format!("{layer}.0.fn.to_q.1.bias"),
        format!("{layer}.0.fn.to_kv.1.bias"),
    );
    let wqkv = mb.derived(
        &format!("{layer}.0.fn.to_qkv.weight"),
        &[3 * f, f],
        bf,
        &[(&q_w, &[f, f]), (&kv_w, &[2 * f, f])],
        stack_rows,
    )?;
    let bqkv = mb.derived(
        &format!("{layer}.0.fn.to_qkv.bias"),
        &[3 * f],
        f32t,
        &[(&q_b, &[f]), (&kv_b, &[2 * f])],
        stack_rows,
    )?;
    let qkv = mb.g.op1(Gemm::linear(bf), &[z, wqkv, bqkv])?;
    let a = mb.g.op1(Attention::new(heads, f32t), &[qkv])?;
    let s1 = mb.g.op1(Add::plain(f32t), &[s0, a])?;
    let z = affine_norm(mb, &format!("{layer}.1.norm"), s1, f, TORCH_LN_EPS, bf)?;
    let hmid = linear(
        mb,
        &format!("{layer}.1.fn.net.0"),
        z,
        (f, f),
        false,
        linear_gelu(bf),
        None,
    )?;
    let s2 = linear(
        mb,
        &format!("{layer}.1.fn.net.3"),
        hmid,
        (f, f),
        false,
        linear_residual(f32t),
        Some(s1),
    )?;
    let wtok = mb.g.op1(
        Slice {
            axis: 1,
            start: n,
            len: n_w,
            out: f32t,
        },
        &[s2],
    )?;

    // C. Modulated hyper-network weights, one layer after the other.
    let mut start = 0;
    let mut layers = Vec::new();
    for (l, (din, dout)) in hyper_layers(cfg).into_iter().enumerate() {
        let g = cfg.n_groups.min(dout);
        let toks = mb.g.op1(
            Slice {
                axis: 1,
                start,
                len: g,
                out: f32t,
            },
            &[wtok],
        )?;
        start += g;
        let z = affine_norm(
            mb,
            &key(&format!("wtoken_postfc.wb{l}.0")),
            toks,
            f,
            TORCH_LN_EPS,
            bf,
        )?;
        let m = linear(
            mb,
            &key(&format!("wtoken_postfc.wb{l}.1")),
            z,
            (din, f),
            false,
            Gemm::linear(f32t),
            None,
        )?;
        let base = mb.weight(&key(&format!("base_params.wb{l}")), &[din + 1, dout], f32t)?;
        layers.push(mb.g.op1(
            ModulatedWeights {
                groups: g,
                out: f32t,
            },
            &[base, m],
        )?);
    }

    // D–E.2. Encoding of the HR grid, hyper-MLP, output layer + nearest-upsampled features.
    let pe = mb.g.op1(CoordPosEnc { h: hh, w: ww }, &[])?;
    let r =
        mb.g.op1(HyperMlp { out: bf }, &[pe, layers[0], layers[1]])?;
    let r = mb.g.op1(
        Reshape {
            shape: vec![b, hh, ww, ch],
        },
        &[r],
    )?;
    let up = mb.g.op1(
        ResizeNearest {
            h: hh,
            w: ww,
            out: f32t,
        },
        &[dtokens],
    )?;
    linear(
        mb,
        &key("output_layer"),
        r,
        (ind, ch),
        true,
        linear_residual(f32t),
        Some(up),
    )
}

/// Steps E.3–E.6: the guide for the HR features `target` (f32 `[B, H, W, ind]`) from
/// `hr` ([`reconstruct`]'s output, same shape), with `temb` = bf16 emb(r) `[B, time_dim]`.
pub fn fuse(
    mb: &mut ModelBuilder,
    p: &str,
    cfg: &InrConfig,
    hr: TensorId,
    target: TensorId,
    temb: TensorId,
) -> Result<TensorId> {
    let (ind, tdim) = (cfg.ind, cfg.time_dim);
    let key = |k: &str| format!("{p}{k}");
    let ts = mb.g.shape(target).to_vec();
    let (b, hh, ww) = (ts[0], ts[1], ts[2]);
    let (bf, f32t) = (DType::BF16, DType::F32);
    let cat = mb.g.op1(Concat { axis: 3, out: bf }, &[hr, target])?;
    let o = linear(
        mb,
        &key("toout.0"),
        cat,
        (ind / 4, 2 * ind),
        false,
        linear_gelu(bf),
        None,
    )?;
    let o = linear(
        mb,
        &key("toout.2"),
        o,
        (ind, ind / 4),
        false,
        Gemm::linear(f32t),
        None,
    )?;
    let ab = linear(
        mb,
        &key("mapp_t.mapper"),
        temb,
        (2 * ind, tdim),
        false,
        Gemm::linear(f32t),
        None,
    )?;
    let o = mb.g.op1(
        crate::ops::elementwise::Film { k: 1.0, out: f32t },
        &[o, ab],
    )?;
    let o = mb.g.op1(norm(f32t), &[o])?;
    // The scale signal of the HR size: a constant of the graph.
    let s = mb.derived(
        &format!("scale signal {hh}x{ww} [{b}]"),
        &[b],
        f32t,
        &[],
        move |_| Ok(HostTensor::full(&[b], scale_signal(hh, ww))),
    )?;
    let sw = mb.weight(&key("hr_norm.mapping.mapper.weight"), &[2 * ind, tdim], bf)?;
    let sb = mb.weight(&key("hr_norm.mapping.mapper.bias"), &[2 * ind], f32t)?;
    scale_norm(mb, o, s, sw, sb, tdim)
}

/// The hyper-MLP's layers (in, out): the 256 positional features to f_dim, then to ch.
fn hyper_layers(cfg: &InrConfig) -> [(usize, usize); 2] {
    [(POSENC_WIDTH, cfg.f_dim), (cfg.f_dim, cfg.ch)]
}

/// Weight tokens: one group of min(n_groups, out) per hyper-MLP layer.
fn wtoken_count(cfg: &InrConfig) -> usize {
    hyper_layers(cfg)
        .iter()
        .map(|&(_, dout)| cfg.n_groups.min(dout))
        .sum()
}
