//! Stage B (docs/MODEL.md §2.3): effnet and pixel conditioning, levels joined by 2×2 stride-2 convs
//! and transposed convs, up levels repeated with the skip concatenated again on every pass,
//! bilinear fixes where odd sizes floor-halved, and the patch-2 output.

use super::blocks::{
    attn_block, linear, linear_gelu, ln_conv, norm, normalized_tokens, res_block, sin_embedding,
    timestep_block, token_mapper,
};
use super::config::StageBConfig;
use super::ModelBuilder;
use crate::ops::conv_transpose::ConvTranspose2d;
use crate::ops::elementwise::{Add, Film};
use crate::ops::gemm::Gemm;
use crate::ops::layout::{Cast, PixelShuffle, PixelUnshuffle};
use crate::ops::math::gelu_ref;
use crate::ops::math::layernorm_ref;
use crate::ops::resample::ResizeBilinear;
use crate::runtime::graph::TensorId;
use crate::tensor::{DType, HostTensor};
use crate::{Error, Result};

use super::blocks::LN_EPS;

/// Stage B's inputs, recorded by the caller.
#[derive(Clone, Copy, Debug)]
pub struct StageBInputs {
    /// bf16 `[B, H, W, c_in]`, H and W even.
    pub x: TensorId,
    /// f32 `[B]`.
    pub r: TensorId,
    /// f32 `[B, he, we, c_effnet]`: the Stage C latent (zeros for the unconditional rows).
    pub effnet: TensorId,
    /// bf16 `[B, 1, c_clip]`: the pooled text embedding.
    pub clip: TensorId,
}

/// Spatial size of an NHWC tensor.
fn hw(mb: &ModelBuilder, x: TensorId) -> (usize, usize) {
    let s = mb.g.shape(x);
    (s[1], s[2])
}

/// Records Stage B's forward pass; returns the ε prediction, f32 `[B, H, W, c_out]`.
pub fn stage_b(
    mb: &mut ModelBuilder,
    cfg: &StageBConfig,
    inputs: &StageBInputs,
) -> Result<TensorId> {
    cfg.validate()?;
    let (f32t, bf) = (DType::F32, DType::BF16);
    let widths = &cfg.c_hidden;
    let depth = widths.len();
    let xs = mb.g.shape(inputs.x).to_vec();
    if xs[1] % 2 != 0 || xs[2] % 2 != 0 {
        return Err(Error::shape(
            "stage_b",
            format!("the latent must have even sides (patch size 2), got {xs:?}"),
        ));
    }
    let b = xs[0];

    let emb = sin_embedding(mb, inputs.r, cfg.c_r)?;
    let r_embed = mb.g.op1(Cast { out: bf }, &[emb])?;
    let toks = token_mapper(
        mb,
        "clip_mapper",
        inputs.clip,
        (cfg.c_cond, cfg.c_clip),
        cfg.c_clip_seq,
    )?;
    let cond = normalized_tokens(mb, &toks, bf)?;

    // Input: unshuffle, embedding conv, LayerNorm2d; effnet and pixel conditioning added.
    let c0 = widths[0];
    let u = mb.g.op1(
        PixelUnshuffle {
            r: 2,
            crop: false,
            out: bf,
        },
        &[inputs.x],
    )?;
    let e = linear(
        mb,
        "embedding.1",
        u,
        (c0, 4 * cfg.c_in),
        true,
        Gemm::linear(f32t),
        None,
    )?;
    let mut x = mb.g.op1(norm(f32t), &[e])?;
    let (h0, w0) = hw(mb, x);
    let effr = mb.g.op1(
        ResizeBilinear {
            h: h0,
            w: w0,
            out: bf,
        },
        &[inputs.effnet],
    )?;
    let eh = linear(
        mb,
        "effnet_mapper.0",
        effr,
        (4 * c0, cfg.c_effnet),
        true,
        linear_gelu(bf),
        None,
    )?;
    let em = linear(
        mb,
        "effnet_mapper.2",
        eh,
        (c0, 4 * c0),
        true,
        Gemm::linear(f32t),
        None,
    )?;
    let em = mb.g.op1(norm(f32t), &[em])?;
    x = mb.g.op1(Add::plain(f32t), &[x, em])?;
    let pixels = pixels_constant(mb, cfg, b)?;
    x = mb.g.op1(Film { k: 1.0, out: f32t }, &[x, pixels])?;

    let heads = |level: usize| cfg.nhead[level].max(1) as usize;
    let run_level = |mb: &mut ModelBuilder,
                     prefix: &str,
                     x: TensorId,
                     level: usize,
                     count: usize,
                     mut skip: Option<TensorId>|
     -> Result<TensorId> {
        let letters: Vec<char> = cfg.level_config[level].chars().collect();
        let c = widths[level];
        let mut x = x;
        for j in 0..count {
            for (l, letter) in letters.iter().enumerate() {
                let p = format!("{prefix}.{}.", j * letters.len() + l);
                x = match letter {
                    'C' => {
                        if let Some(s) = skip {
                            let (sh, sw) = hw(mb, s);
                            if hw(mb, x) != (sh, sw) {
                                let resize = ResizeBilinear {
                                    h: sh,
                                    w: sw,
                                    out: f32t,
                                };
                                x = mb.g.op1(resize, &[x])?;
                            }
                        }
                        res_block(mb, &p, x, skip.take(), c, cfg.kernel_size)?
                    }
                    'T' => timestep_block(mb, &p, x, r_embed, c, cfg.c_r, &cfg.t_conds)?,
                    _ => attn_block(mb, &p, x, cond, cfg.c_cond, heads(level))?,
                };
            }
        }
        Ok(x)
    };
    let mut skips = Vec::new();
    for level in 0..depth {
        if level > 0 {
            // LayerNorm2d, then the 2×2 stride-2 conv: unshuffle (floor) + GEMM; PyTorch's
            // [out, in, 2, 2] weight is already the [out, 4·in] matrix of unshuffled channels.
            let ln = mb.g.op1(norm(bf), &[x])?;
            let un = mb.g.op1(
                PixelUnshuffle {
                    r: 2,
                    crop: true,
                    out: bf,
                },
                &[ln],
            )?;
            let key = format!("down_downscalers.{level}.1");
            let (ci, co) = (widths[level - 1], widths[level]);
            let w = mb.weight_as(&format!("{key}.weight"), &[co, ci, 2, 2], &[co, 4 * ci], bf)?;
            let bias = mb.weight(&format!("{key}.bias"), &[co], f32t)?;
            x = mb.g.op1(Gemm::linear(f32t), &[un, w, bias])?;
        }
        let count = cfg.blocks[0][level];
        x = run_level(mb, &format!("down_blocks.{level}"), x, level, count, None)?;
        skips.push(x);
    }
    for (u, level) in (0..depth).rev().enumerate() {
        let passes = cfg.block_repeat[1][u];
        for pass in 0..passes {
            let skip = (level + 1 < depth).then(|| skips[level]);
            let count = cfg.blocks[1][u];
            x = run_level(mb, &format!("up_blocks.{u}"), x, level, count, skip)?;
            if pass + 1 < passes {
                let c = widths[level];
                let xb = mb.g.op1(Cast { out: bf }, &[x])?;
                let key = format!("up_repeat_mappers.{u}.{pass}");
                x = linear(mb, &key, xb, (c, c), true, Gemm::linear(f32t), None)?;
            }
        }
        if level > 0 {
            let key = format!("up_upscalers.{u}.1");
            let (ci, co) = (widths[level], widths[level - 1]);
            let ln = mb.g.op1(norm(f32t), &[x])?;
            let w = mb.weight(&format!("{key}.weight"), &[ci, co, 2, 2], bf)?;
            let bias = mb.weight(&format!("{key}.bias"), &[co], f32t)?;
            x = mb.g.op1(
                ConvTranspose2d {
                    k: 2,
                    stride: 2,
                    pad: 0,
                    out: f32t,
                },
                &[ln, w, bias],
            )?;
        }
    }
    let o = ln_conv(mb, "clf.1", x, c0, 4 * cfg.c_out)?;
    mb.g.op1(PixelShuffle { r: 2, out: f32t }, &[o])
}

/// `pixels_mapper` of the absent pixel input (zeros) is one vector at every pixel,
/// LN(W2·GELU(b0) + b2): returned as the FiLM row `[0 | v]` per sample, f32 `[B, 2·c0]`.
fn pixels_constant(mb: &mut ModelBuilder, cfg: &StageBConfig, b: usize) -> Result<TensorId> {
    let c0 = cfg.c_hidden[0];
    let keys = [
        "pixels_mapper.0.bias",
        "pixels_mapper.2.weight",
        "pixels_mapper.2.bias",
    ];
    mb.derived(
        "pixels_mapper(0) as FiLM",
        &[b, 2 * c0],
        DType::F32,
        &[
            (keys[0], &[4 * c0]),
            (keys[1], &[c0, 4 * c0, 1, 1]),
            (keys[2], &[c0]),
        ],
        move |t| {
            let hidden: Vec<f32> = t[0].data.iter().map(|&v| gelu_ref(v)).collect();
            let v: Vec<f32> = (0..c0)
                .map(|o| {
                    t[2].data[o]
                        + t[1].data[o * 4 * c0..][..4 * c0]
                            .iter()
                            .zip(&hidden)
                            .map(|(a, h)| a * h)
                            .sum::<f32>()
                })
                .collect();
            let mut n = vec![0f32; c0];
            layernorm_ref(&v, c0, LN_EPS, None, None, &mut n);
            let row: Vec<f32> = std::iter::repeat_n(0.0, c0).chain(n).collect();
            Ok(HostTensor::new(vec![b, 2 * c0], row.repeat(b)))
        },
    )
}

/// The checkpoint keys Stage B reads (recorded on the smallest latent its levels allow).
pub fn manifest(cfg: &StageBConfig) -> Result<super::Manifest> {
    super::manifest_of(|mb| {
        let side = 2 << cfg.c_hidden.len();
        let x = mb.g.input("x", &[1, side, side, cfg.c_in], DType::BF16)?;
        let r = mb.g.input("r", &[1], DType::F32)?;
        let effnet = mb.g.input("effnet", &[1, 2, 2, cfg.c_effnet], DType::F32)?;
        let clip = mb.g.input("clip", &[1, 1, cfg.c_clip], DType::BF16)?;
        stage_b(mb, cfg, &StageBInputs { x, r, effnet, clip }).map(|_| ())
    })
}

/// Keys of the released file that are never read: `pixels_mapper`'s first weight, which
/// only ever multiplies the absent (zero) pixel input.
pub fn unused_keys(cfg: &StageBConfig) -> super::Manifest {
    vec![(
        "pixels_mapper.0.weight".into(),
        vec![4 * cfg.c_hidden[0], cfg.c_pixels, 1, 1],
    )]
}
