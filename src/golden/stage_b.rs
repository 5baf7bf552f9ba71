use super::blocks::{attn_block, res_block, string_list, timestep_block};
use super::stage_c::{ln_conv, nested, usize_list};
use super::*;
use crate::ops::conv::ConvTranspose2d;
use crate::ops::elementwise::{gelu_ref, Add};
use crate::ops::layout::{Cast, PixelShuffle, PixelUnshuffle};
use crate::ops::norm::layernorm_ref;
use crate::ops::resample::ResizeBilinear;

/// Spatial size of an NHWC tensor.
fn hw(mb: &ModelBuilder, x: TensorId) -> (usize, usize) {
    let s = mb.g.shape(x);
    (s[1], s[2])
}

/// Stable Cascade's Stage B (spec §2.3): effnet and pixel conditioning, four levels with
/// 2×2 stride-2 down/up convs, repeated up passes with the skip concatenated again on each,
/// bilinear fixes for odd sizes, and the patch-2 output.
pub(super) fn stage_b(case: &Case) -> Result<Built> {
    let cfg = |k: &str| case.config_usize(k);
    let (c_in, c_out, c_r, c_cond, k) = (
        cfg("c_in")?,
        cfg("c_out")?,
        cfg("c_r")?,
        cfg("c_cond")?,
        cfg("kernel_size")?,
    );
    let (c_effnet, seq, c_clip) = (cfg("c_effnet")?, cfg("c_clip_seq")?, cfg("c_clip")?);
    let (widths, heads, blocks, repeats) = (
        usize_list(case, "c_hidden")?,
        case.config
            .get("nhead")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .map(|v| v.as_i64().unwrap_or(-1))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default(),
        nested(case, "blocks")?,
        nested(case, "block_repeat")?,
    );
    let levels = string_list(case, "level_config");
    let t_conds = string_list(case, "t_conds");
    let depth = widths.len();
    if cfg("patch_size")? != 2
        || heads.len() != depth
        || levels.len() != depth
        || blocks.len() != 2
        || repeats.len() != 2
    {
        return Err(case.error(
            "config disagrees with the Stage B layout (patch 2, one entry per level)".into(),
        ));
    }
    let (f32t, bf) = (DType::F32, DType::BF16);
    let mut mb = ModelBuilder::new();
    let (x_in, shape, xd) = image_input(&mut mb, case, "x", bf)?;
    let (eff, _, ed) = image_input(&mut mb, case, "effnet", f32t)?;
    let (r_in, clip_in) = (case.input("r")?, case.input("clip")?);
    let b = shape[0];
    let clip = mb.g.input("clip", &clip_in.shape, bf)?;
    let r = mb.g.input("r", &[b], f32t)?;
    let zero = mb.g.input("zero", &[b], f32t)?;
    let inputs = vec![
        (x_in, xd),
        (eff, ed),
        (clip, clip_in.data.clone()),
        (r, r_in.data.clone()),
        (zero, vec![0.0; b]),
    ];

    // Conditioning: r_embed and the clip tokens (mapper rows as `seq` consecutive tokens).
    let emb = mb.g.op1(SinEmbedding { c: c_r }, &[r])?;
    let emb0 = mb.g.op1(SinEmbedding { c: c_r }, &[zero])?;
    let mut parts = vec![emb];
    parts.extend(std::iter::repeat_n(emb0, t_conds.len()));
    let r_embed = mb.g.op1(Concat { axis: 1, out: f32t }, &parts)?;
    let r_embed = mb.g.op1(Cast { out: bf }, &[r_embed])?;
    let mut toks = Vec::new();
    for j in 0..seq {
        let w = mb.derived(
            &format!("clip_mapper.weight[{j}]"),
            &[c_cond, c_clip],
            bf,
            &[("clip_mapper.weight", &[seq * c_cond, c_clip])],
            move |t| {
                Ok(HostTensor::new(
                    vec![c_cond, c_clip],
                    t[0].data[j * c_cond * c_clip..][..c_cond * c_clip].to_vec(),
                ))
            },
        )?;
        let bias = mb.derived(
            &format!("clip_mapper.bias[{j}]"),
            &[c_cond],
            f32t,
            &[("clip_mapper.bias", &[seq * c_cond])],
            move |t| {
                Ok(HostTensor::new(
                    vec![c_cond],
                    t[0].data[j * c_cond..][..c_cond].to_vec(),
                ))
            },
        )?;
        toks.push(mb.g.op1(Gemm::linear(f32t), &[clip, w, bias])?);
    }
    let toks = mb.g.op1(Concat { axis: 1, out: f32t }, &toks)?;
    let cond = mb.g.op1(
        LayerNorm {
            eps: LN_EPS,
            affine: false,
            out: bf,
        },
        &[toks],
    )?;

    // Input: unshuffle, embedding conv, LayerNorm2d; effnet and pixel conditioning added.
    let c0 = widths[0];
    let u = mb.g.op1(
        PixelUnshuffle {
            r: 2,
            crop: false,
            out: bf,
        },
        &[x_in],
    )?;
    let w = conv1x1(&mut mb, "embedding.1.weight", c0, 4 * c_in)?;
    let bias = mb.weight("embedding.1.bias", &[c0], f32t)?;
    let e = mb.g.op1(Gemm::linear(f32t), &[u, w, bias])?;
    let mut x = mb.g.op1(
        LayerNorm {
            eps: LN_EPS,
            affine: false,
            out: f32t,
        },
        &[e],
    )?;
    let (h0, w0) = hw(&mb, x);
    let effr = mb.g.op1(
        ResizeBilinear {
            h: h0,
            w: w0,
            out: bf,
        },
        &[eff],
    )?;
    let ew0 = conv1x1(&mut mb, "effnet_mapper.0.weight", 4 * c0, c_effnet)?;
    let eb0 = mb.weight("effnet_mapper.0.bias", &[4 * c0], f32t)?;
    let eh = mb.g.op1(
        Gemm {
            bias: true,
            gelu: true,
            residual: false,
            out: bf,
        },
        &[effr, ew0, eb0],
    )?;
    let ew2 = conv1x1(&mut mb, "effnet_mapper.2.weight", c0, 4 * c0)?;
    let eb2 = mb.weight("effnet_mapper.2.bias", &[c0], f32t)?;
    let em = mb.g.op1(Gemm::linear(f32t), &[eh, ew2, eb2])?;
    let em = mb.g.op1(
        LayerNorm {
            eps: LN_EPS,
            affine: false,
            out: f32t,
        },
        &[em],
    )?;
    x = mb.g.op1(Add::plain(f32t), &[x, em])?;
    // pixels_mapper(zeros) is one constant vector per pixel: LN(W2·GELU(b0) + b2).
    let pk = [
        "pixels_mapper.0.bias",
        "pixels_mapper.2.weight",
        "pixels_mapper.2.bias",
    ];
    let pixels = mb.derived(
        "pixels_mapper(0) as FiLM",
        &[b, 2 * c0],
        f32t,
        &[
            (pk[0], &[4 * c0]),
            (pk[1], &[c0, 4 * c0, 1, 1]),
            (pk[2], &[c0]),
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
    )?;
    x = mb.g.op1(Film { k: 1.0, out: f32t }, &[x, pixels])?;

    let run_level = |mb: &mut ModelBuilder,
                     prefix: &str,
                     x: TensorId,
                     level: usize,
                     skip: Option<TensorId>|
     -> Result<TensorId> {
        let letters: Vec<char> = levels[level].chars().collect();
        let c = widths[level];
        let mut x = x;
        let mut skip = skip;
        let count = if prefix.starts_with("down") {
            blocks[0][level]
        } else {
            blocks[1][depth - 1 - level]
        };
        for j in 0..count {
            for (l, letter) in letters.iter().enumerate() {
                let p = format!("{prefix}.{}.", j * letters.len() + l);
                x = match letter {
                    'C' => {
                        if let Some(s) = skip {
                            let (sh, sw) = hw(mb, s);
                            if hw(mb, x) != (sh, sw) {
                                x = mb.g.op1(
                                    ResizeBilinear {
                                        h: sh,
                                        w: sw,
                                        out: f32t,
                                    },
                                    &[x],
                                )?;
                            }
                        }
                        res_block(mb, &p, x, skip.take(), c, k)?
                    }
                    'T' => timestep_block(mb, &p, x, r_embed, c, c_r, &t_conds)?,
                    'A' => attn_block(mb, &p, x, cond, c_cond, heads[level].max(1) as usize)?,
                    other => return Err(case.error(format!("unknown level_config letter {other}"))),
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
            let ln = mb.g.op1(
                LayerNorm {
                    eps: LN_EPS,
                    affine: false,
                    out: bf,
                },
                &[x],
            )?;
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
        x = run_level(&mut mb, &format!("down_blocks.{level}"), x, level, None)?;
        skips.push(x);
    }
    for (u, level) in (0..depth).rev().enumerate() {
        let passes = repeats[1][depth - 1 - level];
        for pass in 0..passes {
            let skip = (level + 1 < depth).then(|| skips[level]);
            x = run_level(&mut mb, &format!("up_blocks.{u}"), x, level, skip)?;
            if pass + 1 < passes {
                let key = format!("up_repeat_mappers.{u}.{pass}");
                let c = widths[level];
                let w = conv1x1(&mut mb, &format!("{key}.weight"), c, c)?;
                let bias = mb.weight(&format!("{key}.bias"), &[c], f32t)?;
                let xb = mb.g.op1(Cast { out: bf }, &[x])?;
                x = mb.g.op1(Gemm::linear(f32t), &[xb, w, bias])?;
            }
        }
        if level > 0 {
            let key = format!("up_upscalers.{u}.1");
            let (ci, co) = (widths[level], widths[level - 1]);
            let ln = mb.g.op1(
                LayerNorm {
                    eps: LN_EPS,
                    affine: false,
                    out: f32t,
                },
                &[x],
            )?;
            let w = mb.weight(&format!("{key}.weight"), &[ci, co, 2, 2], f32t)?;
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
    let o = ln_conv(&mut mb, "clf.1", x, c0, 4 * c_out)?;
    let out = mb.g.op1(PixelShuffle { r: 2, out: f32t }, &[o])?;
    Ok(Built::graph(
        mb,
        inputs,
        vec![("out".into(), out, Layout::Image(shape))],
    ))
}
