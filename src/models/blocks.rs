//! The building blocks Stages B and C share (docs/MODEL.md §2.1) and the small helpers every
//! network uses: ResBlock (depthwise conv + LayerNorm2d, the GRN MLP), TimestepBlock, AttnBlock,
//! the r-embedding, Stage C's conditioning tokens and UltraPixel's scale-aware norm.
//!
//! Activations are channels-last; the residual stream is f32, GEMM operands bf16.

use super::ModelBuilder;
use crate::ops::attention::Attention;
use crate::ops::conv::DwConvLn;
use crate::ops::elementwise::{Act, Activation, Film};
use crate::ops::embed::{sin_embedding_ref, SinEmbedding};
use crate::ops::gemm::{Gemm, GemmGrnStats, GemmScaledA};
use crate::ops::grn::GrnFromSumsq;
use crate::ops::layout::{Broadcast, Cast, Concat, Reshape, Slice};
use crate::ops::norm::LayerNorm;
use crate::runtime::graph::TensorId;
use crate::tensor::{DType, HostTensor};
use crate::Result;

/// LayerNorm2d's eps in Stages A, B and C (no affine parameters).
pub const LN_EPS: f32 = 1e-6;

/// The plain (non-affine) LayerNorm over channels of Stages A, B and C.
pub fn norm(out: DType) -> LayerNorm {
    LayerNorm {
        eps: LN_EPS,
        affine: false,
        out,
    }
}

/// `[out, in, 1, 1]` conv weights as a GEMM's `[out, in]`.
pub fn conv1x1(mb: &mut ModelBuilder, key: &str, out: usize, inp: usize) -> Result<TensorId> {
    mb.weight_as(key, &[out, inp, 1, 1], &[out, inp], DType::BF16)
}

/// A Linear layer with bias: weights `{key}.weight [out, in]` (`conv` true: a 1×1 conv's
/// `[out, in, 1, 1]`) and `{key}.bias`, applied by `gemm`. An input width that is not a
/// multiple of 8 (the GEMM reads 16-byte rows) is zero-padded, with the weight's columns.
pub fn linear(
    mb: &mut ModelBuilder,
    key: &str,
    x: TensorId,
    (out, inp): (usize, usize),
    conv: bool,
    gemm: Gemm,
    residual: Option<TensorId>,
) -> Result<TensorId> {
    let wkey = format!("{key}.weight");
    let stored: Vec<usize> = if conv {
        vec![out, inp, 1, 1]
    } else {
        vec![out, inp]
    };
    let padded = inp.next_multiple_of(GEMM_K_STEP);
    let (x, w) = if padded == inp {
        (x, mb.weight_as(&wkey, &stored, &[out, inp], DType::BF16)?)
    } else {
        let w = mb.derived(
            &format!("{wkey} (columns padded to {padded})"),
            &[out, padded],
            DType::BF16,
            &[(&wkey, &stored)],
            move |t| {
                let data = t[0]
                    .data
                    .chunks_exact(inp)
                    .flat_map(|row| {
                        row.iter()
                            .copied()
                            .chain(std::iter::repeat_n(0.0, padded - inp))
                    })
                    .collect();
                Ok(HostTensor::new(vec![out, padded], data))
            },
        )?;
        let mut zshape = mb.g.shape(x).to_vec();
        *zshape.last_mut().expect("channels-last") = padded - inp;
        let shape = zshape.clone();
        let zeros = mb.derived(
            &format!("zeros {zshape:?}"),
            &zshape,
            DType::BF16,
            &[],
            move |_| Ok(HostTensor::zeros(&shape)),
        )?;
        let axis = zshape.len() - 1;
        let xp = mb.g.op1(
            Concat {
                axis,
                out: DType::BF16,
            },
            &[x, zeros],
        )?;
        (xp, w)
    };
    let b = mb.weight(&format!("{key}.bias"), &[out], DType::F32)?;
    match residual {
        Some(r) => mb.g.op1(gemm, &[x, w, b, r]),
        None => mb.g.op1(gemm, &[x, w, b]),
    }
}

/// The GEMM's K must be a multiple of this (16-byte rows of bf16).
const GEMM_K_STEP: usize = 8;

/// A Linear with bias and GELU.
pub fn linear_gelu(out: DType) -> Gemm {
    Gemm {
        bias: true,
        gelu: true,
        residual: false,
        out,
    }
}

/// A Linear with bias whose output is added to a residual.
pub fn linear_residual(out: DType) -> Gemm {
    Gemm {
        bias: true,
        gelu: false,
        residual: true,
        out,
    }
}

/// The eps of `nn.LayerNorm`'s default, used by the INR transformer and CLIP.
pub const TORCH_LN_EPS: f32 = 1e-5;

/// An affine LayerNorm with weights under `prefix`.
pub fn affine_norm(
    mb: &mut ModelBuilder,
    prefix: &str,
    x: TensorId,
    c: usize,
    eps: f32,
    out: DType,
) -> Result<TensorId> {
    let g = mb.weight(&format!("{prefix}.weight"), &[c], DType::F32)?;
    let b = mb.weight(&format!("{prefix}.bias"), &[c], DType::F32)?;
    let ln = LayerNorm {
        eps,
        affine: true,
        out,
    };
    mb.g.op1(ln, &[x, g, b])
}

/// LayerNorm2d, then a 1×1 conv (Stage C's scalers, every `clf`): weights at `key`.
pub fn ln_conv(
    mb: &mut ModelBuilder,
    key: &str,
    x: TensorId,
    cin: usize,
    cout: usize,
) -> Result<TensorId> {
    let h = mb.g.op1(norm(DType::BF16), &[x])?;
    linear(
        mb,
        key,
        h,
        (cout, cin),
        true,
        Gemm::linear(DType::F32),
        None,
    )
}

/// The first `n` rows of a learned `[rows, width]` table at `key` (a positional
/// embedding), the same for each of `batch` samples: f32 `[batch, n, width]`.
pub fn table_rows(
    mb: &mut ModelBuilder,
    key: &str,
    (rows, width): (usize, usize),
    n: usize,
    batch: usize,
) -> Result<TensorId> {
    let first = mb.derived(
        &format!("{key}[..{n}]"),
        &[n, width],
        DType::F32,
        &[(key, &[rows, width])],
        move |t| {
            Ok(HostTensor::new(
                vec![n, width],
                t[0].data[..n * width].to_vec(),
            ))
        },
    )?;
    mb.g.op1(
        Broadcast {
            batch,
            out: DType::F32,
        },
        &[first],
    )
}

/// The sinusoidal embedding emb_c of f32 `[B]` values, f32 `[B, c]`.
pub fn sin_embedding(mb: &mut ModelBuilder, r: TensorId, c: usize) -> Result<TensorId> {
    mb.g.op1(SinEmbedding { c }, &[r])
}

/// `[emb(r), emb(0) per condition]`: what the TimestepBlocks read (the `sca`/`crp`
/// conditions are never given, so they are zero). `emb` is emb(r), `zero` an f32 `[B]` input
/// of zeros; f32 `[B, c·(1 + conds)]`.
pub fn r_embed_full(
    mb: &mut ModelBuilder,
    emb: TensorId,
    zero: TensorId,
    c: usize,
    conds: usize,
) -> Result<TensorId> {
    let emb0 = sin_embedding(mb, zero, c)?;
    let mut parts = vec![emb];
    parts.extend(std::iter::repeat_n(emb0, conds));
    mb.g.op1(
        Concat {
            axis: 1,
            out: DType::F32,
        },
        &parts,
    )
}

/// The ResBlock / FeedForwardBlock MLP with GRN across its two GEMMs, plus the residual:
/// weights `{p}channelwise.{0,2,4}`; `h` is bf16 `[B, H, W, Cin]`, `x` the f32 residual.
pub fn grn_mlp(
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
    let first = linear_gelu(DType::BF16);
    let hs = mb.g.op(GemmGrnStats { gemm: first }, &[h, w1, b1])?;
    let ab =
        mb.g.op1(GrnFromSumsq { eps: LN_EPS }, &[hs[1], gamma, beta])?;
    let second = GemmScaledA {
        gemm: linear_residual(DType::F32),
        k: 1.0,
    };
    mb.g.op1(second, &[hs[0], w2, b2, x, ab])
}

/// Stage B/C ResBlock (`{p}depthwise`, `{p}channelwise`): depthwise conv + LayerNorm2d, the
/// skip concatenated after them, the GRN MLP, the residual. `x` f32 NHWC.
pub fn res_block(
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

/// TimestepBlock (`{p}mapper`, `{p}mapper_<cond>`): `[a | b]` = mapper(t₀) + Σ mapper_c(t_c),
/// then FiLM on `x`. `t` is bf16: either every chunk `[B, ct·(1 + conds)]` (one GEMM over
/// the concatenated mappers), or only t₀ = emb(r) `[B, ct]`, the conditions being zero as in
/// text-to-image: their mappers then fold into the bias (mapper_c(emb(0)) is a constant).
pub fn timestep_block(
    mb: &mut ModelBuilder,
    p: &str,
    x: TensorId,
    t: TensorId,
    c: usize,
    ct: usize,
    conds: &[String],
) -> Result<TensorId> {
    let width = mb.g.shape(t)[1];
    let folded = width == ct;
    if !folded && width != ct * (1 + conds.len()) {
        return Err(crate::Error::shape(
            "timestep_block",
            format!(
                "t must be [B, {ct}] or [B, {}], got width {width}",
                ct * (1 + conds.len())
            ),
        ));
    }
    let names: Vec<String> = std::iter::once(format!("{p}mapper"))
        .chain(conds.iter().map(|c| format!("{p}mapper_{c}")))
        .collect();
    let w_keys: Vec<String> = names.iter().map(|n| format!("{n}.weight")).collect();
    let b_keys: Vec<String> = names.iter().map(|n| format!("{n}.bias")).collect();
    let (w_shape, b_shape) = ([2 * c, ct], [2 * c]);
    let w_sources: Vec<(&str, &[usize])> =
        w_keys.iter().map(|k| (k.as_str(), &w_shape[..])).collect();
    let b_sources: Vec<(&str, &[usize])> =
        b_keys.iter().map(|k| (k.as_str(), &b_shape[..])).collect();
    let (w, bias) = if folded {
        let w = mb.weight(&w_keys[0], &w_shape, DType::BF16)?;
        let mut emb0 = vec![0f32; ct];
        sin_embedding_ref(&[0.0], ct, &mut emb0);
        let sources: Vec<(&str, &[usize])> = b_sources
            .iter()
            .copied()
            .chain(w_sources[1..].iter().copied())
            .collect();
        let n = names.len();
        let bias = mb.derived(
            &format!("{p}mappers.bias (zero conditions folded)"),
            &[2 * c],
            DType::F32,
            &sources,
            move |ts| {
                let (biases, weights) = ts.split_at(n);
                let sum = (0..2 * c)
                    .map(|i| {
                        let b: f32 = biases.iter().map(|t| t.data[i]).sum();
                        let w: f32 = weights
                            .iter()
                            .map(|t| dot(&t.data[i * ct..][..ct], &emb0))
                            .sum();
                        b + w
                    })
                    .collect();
                Ok(HostTensor::new(vec![2 * c], sum))
            },
        )?;
        (w, bias)
    } else {
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
        (w, bias)
    };
    let ab = mb.g.op1(Gemm::linear(DType::F32), &[t, w, bias])?;
    mb.g.op1(
        Film {
            k: 1.0,
            out: DType::F32,
        },
        &[x, ab],
    )
}

/// f32 dot product with f64 accumulation (host-side weight folding).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| x as f64 * y as f64)
        .sum::<f64>() as f32
}

/// Stage B/C AttnBlock (`{p}kv_mapper`, `{p}attention.attn`): K/V are the normalized image
/// tokens followed by the mapped condition tokens `kv` (bf16 `[B, S, c_cond]`). `x` is f32,
/// NHWC `[B, H, W, C]` or tokens `[B, N, C]` (LayerNorm2d is per pixel either way).
pub fn attn_block(
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
    let mapped = linear(
        mb,
        &key("kv_mapper.1"),
        silu,
        (c, c_cond),
        false,
        Gemm::linear(DType::BF16),
        None,
    )?;
    let (wk, bk) = (
        key("attention.attn.in_proj_weight"),
        key("attention.attn.in_proj_bias"),
    );
    let in_w = mb.weight(&wk, &[3 * c, c], DType::BF16)?;
    let in_b = mb.weight(&bk, &[3 * c], DType::F32)?;
    // K and V of the condition tokens: the packed projection of the few mapped tokens
    // (their q is computed and dropped: cheaper than a second copy of its K/V rows).
    let cond_qkv = mb.g.op1(Gemm::linear(DType::BF16), &[mapped, in_w, in_b])?;
    let extra = mb.g.op1(
        Slice {
            axis: 2,
            start: c,
            len: 2 * c,
            out: DType::BF16,
        },
        &[cond_qkv],
    )?;
    let t = mb.g.op1(norm(DType::BF16), &[x])?;
    let qkv = mb.g.op1(Gemm::linear(DType::BF16), &[t, in_w, in_b])?;
    let qkv = mb.g.op1(
        Reshape {
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
    let a = mb.g.op1(Reshape { shape }, &[a])?;
    linear(
        mb,
        &key("attention.attn.out_proj"),
        a,
        (c, c),
        false,
        linear_residual(DType::F32),
        Some(x),
    )
}

/// A `[blocks·out, in]` mapper applied as `blocks` Linears whose outputs are consecutive
/// tokens (`view(B, blocks, out)` in the reference): f32 `[B, S·blocks, out]` for `x`
/// `[B, S, in]`.
pub fn token_mapper(
    mb: &mut ModelBuilder,
    key: &str,
    x: TensorId,
    (out, inp): (usize, usize),
    blocks: usize,
) -> Result<Vec<TensorId>> {
    let (wkey, bkey) = (format!("{key}.weight"), format!("{key}.bias"));
    let mut tokens = Vec::with_capacity(blocks);
    for j in 0..blocks {
        let w = mb.derived(
            &format!("{wkey}[{j}]"),
            &[out, inp],
            DType::BF16,
            &[(&wkey, &[blocks * out, inp])],
            move |t| {
                Ok(HostTensor::new(
                    vec![out, inp],
                    t[0].data[j * out * inp..][..out * inp].to_vec(),
                ))
            },
        )?;
        let b = mb.derived(
            &format!("{bkey}[{j}]"),
            &[out],
            DType::F32,
            &[(&bkey, &[blocks * out])],
            move |t| {
                Ok(HostTensor::new(
                    vec![out],
                    t[0].data[j * out..][..out].to_vec(),
                ))
            },
        )?;
        tokens.push(mb.g.op1(Gemm::linear(DType::F32), &[x, w, b])?);
    }
    Ok(tokens)
}

/// Concatenates token groups along the sequence, then the plain LayerNorm (eps 1e-6).
pub fn normalized_tokens(
    mb: &mut ModelBuilder,
    tokens: &[TensorId],
    out: DType,
) -> Result<TensorId> {
    let all = mb.g.op1(
        Concat {
            axis: 1,
            out: DType::F32,
        },
        tokens,
    )?;
    mb.g.op1(norm(out), &[all])
}

/// out = x·(2 + a) + b with [a | b] = mapper(emb(s)): UltraPixel's scale-aware norm (the
/// FiLM plus its identity residual), `s` the f32 scale signal per sample, `w`/`bias` the
/// `mapping.mapper` weights.
pub fn scale_norm(
    mb: &mut ModelBuilder,
    x: TensorId,
    s: TensorId,
    w: TensorId,
    bias: TensorId,
    c_r: usize,
) -> Result<TensorId> {
    let e = sin_embedding(mb, s, c_r)?;
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
