//! The CLIP ViT-bigG/14 text tower (`CLIPTextModelWithProjection`, docs/MODEL.md §5): token and
//! position embeddings, pre-norm layers of causal (and padding-masked) attention and a GELU
//! MLP, the final LayerNorm, and the projection of the pooled position (normally the first
//! EOS: `text::pooled_position`).

use super::blocks::{affine_norm, linear, linear_gelu, linear_residual, table_rows};
use super::config::ClipTextConfig;
use super::{stack_rows, ModelBuilder};
use crate::ops::attention::Attention;
use crate::ops::elementwise::Add;
use crate::ops::gemm::Gemm;
use crate::ops::layout::{Embedding, GatherRows};
use crate::runtime::graph::TensorId;
use crate::tensor::DType;
use crate::{Error, Result};

/// The tower's inputs (f32 values: token ids are exact in f32).
#[derive(Clone, Copy, Debug)]
pub struct ClipTextInputs {
    /// `[B, T]` token ids.
    pub ids: TensorId,
    /// `[B, T]`: 1 for BOS, text and the first EOS, 0 for padding; `None`: no padding mask.
    pub mask: Option<TensorId>,
    /// `[B]`: where each row is pooled ([`crate::text::pooled_position`] of its ids).
    pub pooled_at: TensorId,
}

pub struct ClipTextOutputs {
    /// f32 `[B, T, width]`: the last layer's output before the final LayerNorm — the
    /// `clip_text` Stage C reads.
    pub hidden: TensorId,
    /// f32 `[B, T, width]`: after the final LayerNorm.
    pub last: TensorId,
    /// f32 `[B, projection_dim]`: the projected state at the pooled position
    /// (`clip_text_pooled`).
    pub pooled: TensorId,
}

pub fn clip_text(
    mb: &mut ModelBuilder,
    cfg: &ClipTextConfig,
    inputs: &ClipTextInputs,
) -> Result<ClipTextOutputs> {
    cfg.validate()?;
    let (c, heads, inter) = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.intermediate_size,
    );
    let (vocab, ctx, eps) = (
        cfg.vocab_size,
        cfg.max_position_embeddings,
        cfg.layer_norm_eps,
    );
    let [b, t] = mb.g.shape(inputs.ids)[..] else {
        return Err(Error::shape("clip_text", "input ids must be [B, T]"));
    };
    if t > ctx {
        return Err(Error::shape(
            "clip_text",
            format!("{t} tokens exceed the {ctx} positions"),
        ));
    }
    let (f32t, bf) = (DType::F32, DType::BF16);
    let m = "text_model";
    let table = mb.weight(
        &format!("{m}.embeddings.token_embedding.weight"),
        &[vocab, c],
        f32t,
    )?;
    let tok = mb.g.op1(Embedding { out: f32t }, &[inputs.ids, table])?;
    let pos = table_rows(
        mb,
        &format!("{m}.embeddings.position_embedding.weight"),
        (ctx, c),
        t,
        b,
    )?;
    let mut h = mb.g.op1(Add::plain(f32t), &[tok, pos])?;
    for l in 0..cfg.num_hidden_layers {
        let p = format!("{m}.encoder.layers.{l}");
        let z = affine_norm(mb, &format!("{p}.layer_norm1"), h, c, eps, bf)?;
        let keys: Vec<String> = ["q", "k", "v"]
            .iter()
            .map(|x| format!("{p}.self_attn.{x}_proj"))
            .collect();
        let (ws, bs): (Vec<String>, Vec<String>) = keys
            .iter()
            .map(|k| (format!("{k}.weight"), format!("{k}.bias")))
            .unzip();
        let (wshape, bshape) = ([c, c], [c]);
        let wsrc: Vec<(&str, &[usize])> = ws.iter().map(|k| (k.as_str(), &wshape[..])).collect();
        let bsrc: Vec<(&str, &[usize])> = bs.iter().map(|k| (k.as_str(), &bshape[..])).collect();
        let wqkv = mb.derived(
            &format!("{p}.self_attn.qkv.weight"),
            &[3 * c, c],
            bf,
            &wsrc,
            stack_rows,
        )?;
        let bqkv = mb.derived(
            &format!("{p}.self_attn.qkv.bias"),
            &[3 * c],
            f32t,
            &bsrc,
            stack_rows,
        )?;
        let qkv = mb.g.op1(Gemm::linear(bf), &[z, wqkv, bqkv])?;
        let attn = Attention {
            heads,
            causal: true,
            extra_kv: false,
            key_mask: inputs.mask.is_some(),
            out: bf,
        };
        let a = match inputs.mask {
            Some(mask) => mb.g.op1(attn, &[qkv, mask])?,
            None => mb.g.op1(attn, &[qkv])?,
        };
        h = linear(
            mb,
            &format!("{p}.self_attn.out_proj"),
            a,
            (c, c),
            false,
            linear_residual(f32t),
            Some(h),
        )?;
        let z = affine_norm(mb, &format!("{p}.layer_norm2"), h, c, eps, bf)?;
        let u = linear(
            mb,
            &format!("{p}.mlp.fc1"),
            z,
            (inter, c),
            false,
            linear_gelu(bf),
            None,
        )?;
        h = linear(
            mb,
            &format!("{p}.mlp.fc2"),
            u,
            (c, inter),
            false,
            linear_residual(f32t),
            Some(h),
        )?;
    }
    let last = affine_norm(mb, &format!("{m}.final_layer_norm"), h, c, eps, f32t)?;
    let pooled = pool(mb, cfg, last, inputs.pooled_at)?;
    Ok(ClipTextOutputs {
        hidden: h,
        last,
        pooled,
    })
}

/// The pooled embedding: `text_projection` (no bias) of the final-normed states `last`
/// (`[B, T, width]`) at the positions `pooled_at` (`[B]`).
pub fn pool(
    mb: &mut ModelBuilder,
    cfg: &ClipTextConfig,
    last: TensorId,
    pooled_at: TensorId,
) -> Result<TensorId> {
    let (c, proj) = (cfg.hidden_size, cfg.projection_dim);
    let state =
        mb.g.op1(GatherRows { out: DType::BF16 }, &[last, pooled_at])?;
    let w_proj = mb.weight("text_projection.weight", &[proj, c], DType::BF16)?;
    let no_bias = Gemm {
        bias: false,
        gelu: false,
        residual: false,
        out: DType::F32,
    };
    mb.g.op1(no_bias, &[state, w_proj])
}

/// The checkpoint keys the text tower reads.
pub fn manifest(cfg: &ClipTextConfig) -> Result<super::Manifest> {
    super::manifest_of(|mb| {
        let t = cfg.max_position_embeddings;
        let inputs = ClipTextInputs {
            ids: mb.g.input("ids", &[1, t], DType::F32)?,
            mask: Some(mb.g.input("mask", &[1, t], DType::F32)?),
            pooled_at: mb.g.input("pooled_position", &[1], DType::F32)?,
        };
        clip_text(mb, cfg, &inputs).map(|_| ())
    })
}

/// Prefixes of stored keys the text tower never reads: the position-id buffer of older
/// exports, and the vision half of a full CLIP checkpoint.
pub const UNUSED_PREFIXES: &[&str] = &[
    "text_model.embeddings.position_ids",
    "vision_model.",
    "visual_projection.",
    "logit_scale",
];
