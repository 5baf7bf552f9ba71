use super::*;

/// The ResBlock / FeedForwardBlock MLP with GRN across its two GEMMs, plus the residual:
/// weights `channelwise.{0,2,4}`; `h` is bf16 `[B, H, W, Cin]`, `x` the f32 residual.
pub(super) fn grn_mlp(
    mb: &mut ModelBuilder,
    p: &str,
    h: TensorId,
    x: TensorId,
    c: usize,
    cin: usize,
) -> Result<TensorId> {
    let hidden = 4 * c;
    let key = |k: &str| format!("{p}channelwise.{k}");
    let w1 = mb.weight(&key("0.weight"), &[hidden, cin], DType::BF16)?;
    let b1 = mb.weight(&key("0.bias"), &[hidden], DType::F32)?;
    let gamma = mb.weight_as(&key("2.gamma"), &[1, 1, 1, hidden], &[hidden], DType::F32)?;
    let beta = mb.weight_as(&key("2.beta"), &[1, 1, 1, hidden], &[hidden], DType::F32)?;
    let w2 = mb.weight(&key("4.weight"), &[c, hidden], DType::BF16)?;
    // GRN's β passes through the second Linear: fold W2·β into its bias.
    let (b2k, w2k, betak) = (key("4.bias"), key("4.weight"), key("2.beta"));
    let b2 = mb.derived(
        &key("4.bias+W·beta"),
        &[c],
        DType::F32,
        &[
            (&b2k, &[c]),
            (&w2k, &[c, hidden]),
            (&betak, &[1, 1, 1, hidden]),
        ],
        move |t| {
            let (bias, w, beta) = (&t[0].data, &t[1].data, &t[2].data);
            let folded = (0..bias.len())
                .map(|o| {
                    bias[o]
                        + w[o * hidden..][..hidden]
                            .iter()
                            .zip(beta)
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                })
                .collect();
            Ok(HostTensor::new(vec![bias.len()], folded))
        },
    )?;
    let first = Gemm {
        bias: true,
        gelu: true,
        residual: false,
        out: DType::BF16,
    };
    let hs = mb.g.op(GemmGrnStats { gemm: first }, &[h, w1, b1])?;
    let ab =
        mb.g.op1(GrnFromSumsq { eps: LN_EPS }, &[hs[1], gamma, beta])?;
    let second = Gemm {
        bias: true,
        gelu: false,
        residual: true,
        out: DType::F32,
    };
    mb.g.op1(
        GemmScaledA {
            gemm: second,
            k: 1.0,
        },
        &[hs[0], w2, b2, x, ab],
    )
}

/// Stage B/C ResBlock (`{p}depthwise`, `{p}channelwise`): depthwise conv + LayerNorm2d, the
/// skip concatenated after them, the GRN MLP, the residual. `x` f32 NHWC.
pub(super) fn res_block(
    mb: &mut ModelBuilder,
    p: &str,
    x: TensorId,
    skip: Option<TensorId>,
    c: usize,
    k: usize,
) -> Result<TensorId> {
    let dw_w = mb.weight_as(
        &format!("{p}depthwise.weight"),
        &[c, 1, k, k],
        &[c, k * k],
        DType::F32,
    )?;
    let dw_b = mb.weight(&format!("{p}depthwise.bias"), &[c], DType::F32)?;
    let ln = DwConvLn {
        k,
        eps: LN_EPS,
        out: DType::BF16,
    };
    let mut h = mb.g.op1(ln, &[x, dw_w, dw_b])?;
    let mut cin = c;
    if let Some(skip) = skip {
        cin += mb.g.shape(skip)[3];
        h = mb.g.op1(
            Concat {
                axis: 3,
                out: DType::BF16,
            },
            &[h, skip],
        )?;
    }
    grn_mlp(mb, p, h, x, c, cin)
}

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
    let ln = LayerNorm {
        eps: LN_EPS,
        affine: false,
        out: DType::BF16,
    };
    let h = mb.g.op1(ln, &[x])?;
    let out = grn_mlp(&mut mb, "", h, x, c, c)?;
    Ok(Built::graph(
        mb,
        vec![(x, xd)],
        vec![("out".into(), out, Layout::Image(shape))],
    ))
}

/// TimestepBlock (`{p}mapper`, `{p}mapper_<cond>`): the mappers of t₀, t₁, … as one GEMM
/// over the concatenated chunks of `t` (bf16 `[B, ct·(1 + conds)]`), then FiLM on `x`.
pub(super) fn timestep_block(
    mb: &mut ModelBuilder,
    p: &str,
    x: TensorId,
    t: TensorId,
    c: usize,
    ct: usize,
    conds: &[String],
) -> Result<TensorId> {
    let names: Vec<String> = std::iter::once(format!("{p}mapper"))
        .chain(conds.iter().map(|c| format!("{p}mapper_{c}")))
        .collect();
    let width = ct * names.len();
    let w_keys: Vec<String> = names.iter().map(|n| format!("{n}.weight")).collect();
    let b_keys: Vec<String> = names.iter().map(|n| format!("{n}.bias")).collect();
    let (w_shape, b_shape) = ([2 * c, ct], [2 * c]);
    let w_sources: Vec<(&str, &[usize])> =
        w_keys.iter().map(|k| (k.as_str(), &w_shape[..])).collect();
    let w = mb.derived(
        &format!("{p}mappers.weight (concatenated)"),
        &[2 * c, width],
        DType::BF16,
        &w_sources,
        move |ts| {
            let mut out = Vec::with_capacity(2 * c * width);
            for row in 0..2 * c {
                for t in ts {
                    out.extend_from_slice(&t.data[row * ct..][..ct]);
                }
            }
            Ok(HostTensor::new(vec![2 * c, width], out))
        },
    )?;
    let b_sources: Vec<(&str, &[usize])> =
        b_keys.iter().map(|k| (k.as_str(), &b_shape[..])).collect();
    let bias = mb.derived(
        &format!("{p}mappers.bias (summed)"),
        &[2 * c],
        DType::F32,
        &b_sources,
        move |ts| {
            let sum = (0..2 * c)
                .map(|i| ts.iter().map(|t| t.data[i]).sum())
                .collect();
            Ok(HostTensor::new(vec![2 * c], sum))
        },
    )?;
    let ab = mb.g.op1(Gemm::linear(DType::F32), &[t, w, bias])?;
    mb.g.op1(
        Film {
            k: 1.0,
            out: DType::F32,
        },
        &[x, ab],
    )
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

/// Stage B/C AttnBlock (`{p}kv_mapper`, `{p}attention.attn`): K/V are the normalized image
/// tokens followed by the mapped condition tokens `kv` (bf16 `[B, S, c_cond]`). `x` is f32,
/// NHWC `[B, H, W, C]` or tokens `[B, N, C]` (LayerNorm2d is per pixel either way).
pub(super) fn attn_block(
    mb: &mut ModelBuilder,
    p: &str,
    x: TensorId,
    kv: TensorId,
    c_cond: usize,
    heads: usize,
) -> Result<TensorId> {
    let shape = mb.g.shape(x).to_vec();
    let c = shape[shape.len() - 1];
    let (b, n) = (
        shape[0],
        shape[1..shape.len() - 1].iter().product::<usize>(),
    );
    let key = |k: &str| format!("{p}{k}");
    let silu = mb.g.op1(
        Activation {
            act: Act::Silu,
            out: DType::BF16,
        },
        &[kv],
    )?;
    let kv_w = mb.weight(&key("kv_mapper.1.weight"), &[c, c_cond], DType::BF16)?;
    let kv_b = mb.weight(&key("kv_mapper.1.bias"), &[c], DType::F32)?;
    let mapped = mb.g.op1(Gemm::linear(DType::BF16), &[silu, kv_w, kv_b])?;
    let (wk, bk) = (
        key("attention.attn.in_proj_weight"),
        key("attention.attn.in_proj_bias"),
    );
    let in_w = mb.weight(&wk, &[3 * c, c], DType::BF16)?;
    let in_b = mb.weight(&bk, &[3 * c], DType::F32)?;
    // K and V of the condition tokens: rows C..3C of the packed projection.
    let kv_rows = mb.derived(
        &format!("{wk}[k,v]"),
        &[2 * c, c],
        DType::BF16,
        &[(&wk, &[3 * c, c])],
        move |t| Ok(HostTensor::new(vec![2 * c, c], t[0].data[c * c..].to_vec())),
    )?;
    let kv_bias = mb.derived(
        &format!("{bk}[k,v]"),
        &[2 * c],
        DType::F32,
        &[(&bk, &[3 * c])],
        move |t| Ok(HostTensor::new(vec![2 * c], t[0].data[c..].to_vec())),
    )?;
    let extra =
        mb.g.op1(Gemm::linear(DType::BF16), &[mapped, kv_rows, kv_bias])?;
    let ln = LayerNorm {
        eps: LN_EPS,
        affine: false,
        out: DType::BF16,
    };
    let t = mb.g.op1(ln, &[x])?;
    let qkv = mb.g.op1(Gemm::linear(DType::BF16), &[t, in_w, in_b])?;
    let qkv = mb.g.op1(
        crate::ops::layout::Reshape {
            shape: vec![b, n, 3 * c],
        },
        &[qkv],
    )?;
    let attn = Attention {
        heads,
        causal: false,
        extra_kv: true,
        key_mask: false,
        out: DType::BF16,
    };
    let a = mb.g.op1(attn, &[qkv, extra])?;
    let a = mb.g.op1(
        crate::ops::layout::Reshape {
            shape: shape.clone(),
        },
        &[a],
    )?;
    let out_w = mb.weight(&key("attention.attn.out_proj.weight"), &[c, c], DType::BF16)?;
    let out_b = mb.weight(&key("attention.attn.out_proj.bias"), &[c], DType::F32)?;
    let proj = Gemm {
        bias: true,
        gelu: false,
        residual: true,
        out: DType::F32,
    };
    mb.g.op1(proj, &[a, out_w, out_b, x])
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
    let conds = case
        .config
        .get("t_conds")
        .and_then(|v| v.as_array())
        .map_or(0, |a| a.len());
    let r_in = case.input("r")?;
    let n = r_in.data.len();
    let mut mb = ModelBuilder::new();
    let r = mb.g.input("r", &[n], DType::F32)?;
    let zero = mb.g.input("zero", &[n], DType::F32)?;
    let emb = mb.g.op1(SinEmbedding { c }, &[r])?;
    let emb0 = mb.g.op1(SinEmbedding { c }, &[zero])?;
    let mut parts = vec![emb];
    parts.extend(std::iter::repeat_n(emb0, conds));
    let full = mb.g.op1(
        Concat {
            axis: 1,
            out: DType::F32,
        },
        &parts,
    )?;
    Ok(Built::graph(
        mb,
        vec![(r, r_in.data.clone()), (zero, vec![0.0; n])],
        vec![
            ("emb".into(), emb, Layout::Same),
            ("r_embed_full".into(), full, Layout::Same),
        ],
    ))
}

/// Stage C's conditioning tokens from the case inputs `clip_text`, `clip_text_pooled`,
/// `clip_img`: the text mapper per token, the pooled and image mappers as `c_clip_seq` row
/// blocks each (their outputs are consecutive tokens), then LayerNorm. Returns the tokens
/// `[B, 77 + 2·seq, c_cond]` in `out` and the inputs to set.
pub(super) fn clip_tokens(
    mb: &mut ModelBuilder,
    case: &Case,
    out: DType,
) -> Result<(TensorId, Inputs)> {
    let (cc, seq) = (
        case.config_usize("c_cond")?,
        case.config_usize("c_clip_seq")?,
    );
    let mut inputs = Vec::new();
    let mut tokens = Vec::new();
    for (input, mapper, width_key, blocks) in [
        ("clip_text", "clip_txt_mapper", "c_clip_text", 1),
        (
            "clip_text_pooled",
            "clip_txt_pooled_mapper",
            "c_clip_text_pooled",
            seq,
        ),
        ("clip_img", "clip_img_mapper", "c_clip_img", seq),
    ] {
        let t = case.input(input)?;
        let width = case.config_usize(width_key)?;
        let id = mb.g.input(input, &t.shape, DType::BF16)?;
        inputs.push((id, t.data.clone()));
        let (wkey, bkey) = (format!("{mapper}.weight"), format!("{mapper}.bias"));
        for j in 0..blocks {
            let w = mb.derived(
                &format!("{wkey}[{j}]"),
                &[cc, width],
                DType::BF16,
                &[(&wkey, &[blocks * cc, width])],
                move |t| {
                    Ok(HostTensor::new(
                        vec![cc, width],
                        t[0].data[j * cc * width..][..cc * width].to_vec(),
                    ))
                },
            )?;
            let b = mb.derived(
                &format!("{bkey}[{j}]"),
                &[cc],
                DType::F32,
                &[(&bkey, &[blocks * cc])],
                move |t| {
                    Ok(HostTensor::new(
                        vec![cc],
                        t[0].data[j * cc..][..cc].to_vec(),
                    ))
                },
            )?;
            tokens.push(mb.g.op1(Gemm::linear(DType::F32), &[id, w, b])?);
        }
    }
    let all = mb.g.op1(
        Concat {
            axis: 1,
            out: DType::F32,
        },
        &tokens,
    )?;
    let ln = LayerNorm {
        eps: LN_EPS,
        affine: false,
        out,
    };
    Ok((mb.g.op1(ln, &[all])?, inputs))
}

pub(super) fn clip_embed(case: &Case) -> Result<Built> {
    let mut mb = ModelBuilder::new();
    let (clip, inputs) = clip_tokens(&mut mb, case, DType::F32)?;
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

/// out = x·(2 + a) + b with [a | b] = mapper(emb(s)): the scale-aware norm, `s` the f32 scale
/// signal per sample.
pub(super) fn scale_norm(
    mb: &mut ModelBuilder,
    x: TensorId,
    s: TensorId,
    w: TensorId,
    bias: TensorId,
    c_r: usize,
) -> Result<TensorId> {
    use crate::ops::layout::Cast;
    let e = mb.g.op1(SinEmbedding { c: c_r }, &[s])?;
    let e = mb.g.op1(Cast { out: DType::BF16 }, &[e])?;
    let ab = mb.g.op1(Gemm::linear(DType::F32), &[e, w, bias])?;
    mb.g.op1(
        Film {
            k: 2.0,
            out: DType::F32,
        },
        &[x, ab],
    )
}
