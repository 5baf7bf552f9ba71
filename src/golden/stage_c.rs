use super::blocks::{attn_block, clip_tokens, res_block, string_list, timestep_block};
use super::*;
use crate::ops::layout::Cast;

/// A `[[usize]]` config entry such as `blocks`.
pub(super) fn nested(case: &Case, key: &str) -> Result<Vec<Vec<usize>>> {
    let fail = || case.error(format!("config `{key}` must be a list of integer lists"));
    let rows = case
        .config
        .get(key)
        .and_then(|v| v.as_array())
        .ok_or_else(fail)?;
    rows.iter()
        .map(|r| {
            r.as_array()
                .ok_or_else(fail)?
                .iter()
                .map(|v| v.as_u64().map(|v| v as usize).ok_or_else(fail))
                .collect()
        })
        .collect()
}

pub(super) fn usize_list(case: &Case, key: &str) -> Result<Vec<usize>> {
    let fail = || case.error(format!("config `{key}` must be a list of integers"));
    let v = case
        .config
        .get(key)
        .and_then(|v| v.as_array())
        .ok_or_else(fail)?;
    v.iter()
        .map(|v| v.as_u64().map(|v| v as usize).ok_or_else(fail))
        .collect()
}

/// A 1×1 conv after LayerNorm2d (the scalers and `clf`): `[out, in, 1, 1]` weights at `key`.
pub(super) fn ln_conv(
    mb: &mut ModelBuilder,
    key: &str,
    x: TensorId,
    cin: usize,
    cout: usize,
) -> Result<TensorId> {
    let ln = LayerNorm {
        eps: LN_EPS,
        affine: false,
        out: DType::BF16,
    };
    let h = mb.g.op1(ln, &[x])?;
    let w = conv1x1(mb, &format!("{key}.weight"), cout, cin)?;
    let b = mb.weight(&format!("{key}.bias"), &[cout], DType::F32)?;
    mb.g.op1(Gemm::linear(DType::F32), &[h, w, b])
}

/// Stable Cascade's Stage C (spec §2.2), low-resolution forward: conditioning, embedding,
/// the down and up levels of ResBlock / TimestepBlock / AttnBlock, scalers, `clf`.
pub(super) fn stage_c(case: &Case) -> Result<Built> {
    let cfg = |k: &str| case.config_usize(k);
    let (c_in, c_out, c_r, c_cond, k) = (
        cfg("c_in")?,
        cfg("c_out")?,
        cfg("c_r")?,
        cfg("c_cond")?,
        cfg("kernel_size")?,
    );
    let (widths, heads, blocks) = (
        usize_list(case, "c_hidden")?,
        usize_list(case, "nhead")?,
        nested(case, "blocks")?,
    );
    let levels: Vec<String> = string_list(case, "level_config");
    let t_conds = string_list(case, "t_conds");
    if nested(case, "block_repeat")?
        .iter()
        .flatten()
        .any(|&r| r != 1)
        || cfg("patch_size")? != 1
    {
        return Err(
            case.error("block repeats and patch sizes other than 1 are not supported".into())
        );
    }
    let depth = widths.len();
    if heads.len() != depth
        || levels.len() != depth
        || blocks.len() != 2
        || blocks.iter().any(|b| b.len() != depth)
    {
        return Err(
            case.error("c_hidden, nhead, level_config and blocks disagree on the depth".into())
        );
    }
    let mut mb = ModelBuilder::new();
    let (x_in, shape @ [b, _, _, _], xd) = image_input(&mut mb, case, "x", DType::BF16)?;
    let r_in = case.input("r")?;
    let (clip, mut inputs) = clip_tokens(&mut mb, case, DType::BF16)?;
    inputs.push((x_in, xd));

    // r_embed = [emb(r), emb(0) per t_cond], bf16 for the mapper GEMMs.
    let r = mb.g.input("r", &[b], DType::F32)?;
    let zero = mb.g.input("zero", &[b], DType::F32)?;
    inputs.push((r, r_in.data.clone()));
    inputs.push((zero, vec![0.0; b]));
    let emb = mb.g.op1(SinEmbedding { c: c_r }, &[r])?;
    let emb0 = mb.g.op1(SinEmbedding { c: c_r }, &[zero])?;
    let mut parts = vec![emb];
    parts.extend(std::iter::repeat_n(emb0, t_conds.len()));
    let r_embed = mb.g.op1(
        Concat {
            axis: 1,
            out: DType::F32,
        },
        &parts,
    )?;
    let r_embed = mb.g.op1(Cast { out: DType::BF16 }, &[r_embed])?;

    let w = conv1x1(&mut mb, "embedding.1.weight", widths[0], c_in)?;
    let bias = mb.weight("embedding.1.bias", &[widths[0]], DType::F32)?;
    let e = mb.g.op1(Gemm::linear(DType::F32), &[x_in, w, bias])?;
    let mut x = mb.g.op1(
        LayerNorm {
            eps: LN_EPS,
            affine: false,
            out: DType::F32,
        },
        &[e],
    )?;

    // One level's block list; `skip` goes to its first ResBlock.
    let run_level = |mb: &mut ModelBuilder,
                     prefix: &str,
                     x: TensorId,
                     level: usize,
                     count: usize,
                     mut skip: Option<TensorId>|
     -> Result<TensorId> {
        let letters: Vec<char> = levels[level].chars().collect();
        let c = widths[level];
        let mut x = x;
        for j in 0..count {
            for (l, letter) in letters.iter().enumerate() {
                let p = format!("{prefix}.{}.", j * letters.len() + l);
                x = match letter {
                    'C' => res_block(mb, &p, x, skip.take(), c, k)?,
                    'T' => timestep_block(mb, &p, x, r_embed, c, c_r, &t_conds)?,
                    'A' => attn_block(mb, &p, x, clip, c_cond, heads[level])?,
                    other => return Err(case.error(format!("unknown level_config letter {other}"))),
                };
            }
        }
        Ok(x)
    };
    let mut skips = Vec::new();
    for level in 0..depth {
        if level > 0 {
            let key = format!("down_downscalers.{level}.1.blocks.0");
            x = ln_conv(&mut mb, &key, x, widths[level - 1], widths[level])?;
        }
        x = run_level(
            &mut mb,
            &format!("down_blocks.{level}"),
            x,
            level,
            blocks[0][level],
            None,
        )?;
        skips.push(x);
    }
    for (u, level) in (0..depth).rev().enumerate() {
        let skip = (u > 0).then(|| skips[level]);
        x = run_level(
            &mut mb,
            &format!("up_blocks.{u}"),
            x,
            level,
            blocks[1][u],
            skip,
        )?;
        if level > 0 {
            let key = format!("up_upscalers.{u}.1.blocks.1");
            x = ln_conv(&mut mb, &key, x, widths[level], widths[level - 1])?;
        }
    }
    let out = ln_conv(&mut mb, "clf.1", x, widths[0], c_out)?;
    Ok(Built::graph(
        mb,
        inputs,
        vec![(
            "out".into(),
            out,
            Layout::Image([b, c_out, shape[2], shape[3]]),
        )],
    ))
}
