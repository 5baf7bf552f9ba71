//! The single-block kinds: Stage B/C blocks, the r-embedding, Stage C's conditioning tokens,
//! the scale-aware norm.

use super::*;
use crate::models::blocks::{
    attn_block, grn_mlp, norm, r_embed_full, res_block, scale_norm, sin_embedding, timestep_block,
};
use crate::models::config::{parse, StageCConfig};
use crate::models::stage_c::{clip_tokens, ClipInputs};

pub(super) fn resblock(case: &Case) -> Result<Built> {
    let (c, c_skip, k) = (
        case.config_usize("c")?,
        case.config_usize("c_skip")?,
        case.config_usize("kernel_size")?,
    );
    let mut mb = ModelBuilder::new();
    let (x, shape, xd) = image_input(&mut mb, case, "x", DType::F32)?;
    let mut inputs = vec![(x, xd)];
    let skip = if c_skip > 0 {
        let (skip, _, sd) = image_input(&mut mb, case, "x_skip", DType::BF16)?;
        inputs.push((skip, sd));
        Some(skip)
    } else {
        None
    };
    let out = res_block(&mut mb, "", x, skip, c, k)?;
    Ok(Built::graph(
        mb,
        inputs,
        vec![("out".into(), out, Layout::Image(shape))],
    ))
}

pub(super) fn feedforward(case: &Case) -> Result<Built> {
    let c = case.config_usize("c")?;
    let mut mb = ModelBuilder::new();
    let (x, shape, xd) = image_input(&mut mb, case, "x", DType::F32)?;
    let h = mb.g.op1(norm(DType::BF16), &[x])?;
    let out = grn_mlp(&mut mb, "", h, x, c, c)?;
    Ok(Built::graph(
        mb,
        vec![(x, xd)],
        vec![("out".into(), out, Layout::Image(shape))],
    ))
}

/// The `conds` list of a config.
pub(super) fn string_list(case: &Case, key: &str) -> Vec<String> {
    case.config
        .get(key)
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

pub(super) fn timestep(case: &Case) -> Result<Built> {
    let (c, ct) = (case.config_usize("c")?, case.config_usize("c_timestep")?);
    let conds = string_list(case, "conds");
    let mut mb = ModelBuilder::new();
    let (x, shape, xd) = image_input(&mut mb, case, "x", DType::F32)?;
    let t_in = case.input("t")?;
    let t =
        mb.g.input("t", &[shape[0], ct * (1 + conds.len())], DType::BF16)?;
    let out = timestep_block(&mut mb, "", x, t, c, ct, &conds)?;
    Ok(Built::graph(
        mb,
        vec![(x, xd), (t, t_in.data.clone())],
        vec![("out".into(), out, Layout::Image(shape))],
    ))
}

pub(super) fn attnblock(case: &Case) -> Result<Built> {
    let (c_cond, heads) = (case.config_usize("c_cond")?, case.config_usize("nhead")?);
    let mut mb = ModelBuilder::new();
    let (x, shape, xd) = image_input(&mut mb, case, "x", DType::F32)?;
    let kv_in = case.input("kv")?;
    let kv = mb.g.input("kv", &kv_in.shape, DType::BF16)?;
    let out = attn_block(&mut mb, "", x, kv, c_cond, heads)?;
    Ok(Built::graph(
        mb,
        vec![(x, xd), (kv, kv_in.data.clone())],
        vec![("out".into(), out, Layout::Image(shape))],
    ))
}

/// emb(r) and the Stage C conditioning row [emb(r), emb(0), emb(0)].
pub(super) fn r_embedding(case: &Case) -> Result<Built> {
    let c = case.config_usize("c_r")?;
    let conds = string_list(case, "t_conds").len();
    let r_in = case.input("r")?;
    let n = r_in.data.len();
    let mut mb = ModelBuilder::new();
    let r = mb.g.input("r", &[n], DType::F32)?;
    let zero = mb.g.input("zero", &[n], DType::F32)?;
    let emb = sin_embedding(&mut mb, r, c)?;
    let full = r_embed_full(&mut mb, emb, zero, c, conds)?;
    Ok(Built::graph(
        mb,
        vec![(r, r_in.data.clone()), (zero, vec![0.0; n])],
        vec![
            ("emb".into(), emb, Layout::Same),
            ("r_embed_full".into(), full, Layout::Same),
        ],
    ))
}

/// Stage C's three CLIP inputs of the case as bf16 graph inputs, with their values.
pub(super) fn clip_inputs(mb: &mut ModelBuilder, case: &Case) -> Result<(ClipInputs, Inputs)> {
    let mut inputs = Vec::new();
    let mut ids = Vec::new();
    for name in ["clip_text", "clip_text_pooled", "clip_img"] {
        let t = case.input(name)?;
        let id = mb.g.input(name, &t.shape, DType::BF16)?;
        inputs.push((id, t.data.clone()));
        ids.push(id);
    }
    Ok((
        ClipInputs {
            clip_text: ids[0],
            clip_text_pooled: ids[1],
            clip_img: ids[2],
        },
        inputs,
    ))
}

pub(super) fn clip_embed(case: &Case) -> Result<Built> {
    let cfg: StageCConfig = parse(&case.config, "Stage C")?;
    let mut mb = ModelBuilder::new();
    let (ci, inputs) = clip_inputs(&mut mb, case)?;
    let clip = clip_tokens(&mut mb, &cfg, &ci, DType::F32)?;
    Ok(Built::graph(
        mb,
        inputs,
        vec![("clip".into(), clip, Layout::Same)],
    ))
}

/// UltraPixel's scale-aware norm on every `x_*` input: [a | b] = mapper(emb₆₄(s(H·W))), then
/// out = x + (x·(1 + a) + b) = x·(2 + a) + b.
pub(super) fn scale_aware_norm(case: &Case) -> Result<Built> {
    use crate::ops::embed::scale_signal;
    let c = case.config_usize("c")?;
    let sc = case.config_usize("scale_c")?;
    let mut mb = ModelBuilder::new();
    let w = mb.weight("mapping.mapper.weight", &[2 * c, sc], DType::BF16)?;
    let bias = mb.weight("mapping.mapper.bias", &[2 * c], DType::F32)?;
    let (mut inputs, mut outputs) = (Vec::new(), Vec::new());
    let names: Vec<String> = case
        .inputs
        .keys()
        .filter(|k| k.starts_with("x_"))
        .cloned()
        .collect();
    for name in names {
        let (x, shape @ [b, _, h, wd], xd) = image_input(&mut mb, case, &name, DType::F32)?;
        let s = mb.g.input(&format!("s_{name}"), &[b], DType::F32)?;
        inputs.push((x, xd));
        inputs.push((s, vec![scale_signal(h, wd); b]));
        let out = scale_norm(&mut mb, x, s, w, bias, sc)?;
        outputs.push((format!("out{}", &name[1..]), out, Layout::Image(shape)));
    }
    Ok(Built::graph(mb, inputs, outputs))
}
