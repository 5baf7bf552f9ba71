use super::blocks::scale_norm;
use super::*;

/// UltraPixel's INR guidance module (`TransInr_withnorm`, spec §3.2): LR tokens and weight
/// tokens through one transformer layer, the modulated hyper-MLP over the HR pixel grid, the
/// fusion with the HR features, the time FiLM, LayerNorm2d and the scale-aware norm.
pub(super) fn inr_upsampler(case: &Case) -> Result<Built> {
    use crate::ops::elementwise::Add;
    use crate::ops::embed::scale_signal;
    use crate::ops::inr::{CoordPosEnc, HyperMlp, ModulatedWeights, POSENC_WIDTH};
    use crate::ops::layout::{Broadcast, Reshape, Slice};
    use crate::ops::resample::ResizeNearest;
    let (ind, ch, f) = (
        case.config_usize("ind")?,
        case.config_usize("ch")?,
        case.config_usize("f_dim")?,
    );
    let (heads, groups, tdim) = (
        case.config_usize("n_head")?,
        case.config_usize("n_groups")?,
        case.config_usize("time_dim")?,
    );
    let mut mb = ModelBuilder::new();
    let (target, tshape @ [b, _, hh, ww], td) = image_input(&mut mb, case, "target", DType::F32)?;
    let (dtok, [_, _, h, w], dd) = image_input(&mut mb, case, "dtokens", DType::BF16)?;
    let temb_in = case.input("t_emb")?;
    let temb = mb.g.input("t_emb", &[b, tdim], DType::BF16)?;
    let n = h * w;
    let n_w = case
        .weights
        .get("wtokens")
        .map(|t| t.shape[0])
        .ok_or_else(|| case.error("missing weights.wtokens".into()))?;
    let bf = DType::BF16;
    let f32 = DType::F32;

    // A. LR tokens + positional rows.
    let w_in = conv1x1(&mut mb, "input_layer.weight", f, ind)?;
    let b_in = mb.weight("input_layer.bias", &[f], f32)?;
    let u = mb.g.op1(Gemm::linear(bf), &[dtok, w_in, b_in])?;
    let u = mb.g.op1(
        Reshape {
            shape: vec![b, n, f],
        },
        &[u],
    )?;
    let pos = mb.derived(
        "tokenizer.posemb[..n]",
        &[n, f],
        f32,
        &[("tokenizer.posemb", &[1024, f])],
        move |t| Ok(HostTensor::new(vec![n, f], t[0].data[..n * f].to_vec())),
    )?;
    let pos = mb.g.op1(Broadcast { batch: b, out: f32 }, &[pos])?;
    let w_pre = mb.weight("tokenizer.prefc.weight", &[f, f], bf)?;
    let b_pre = mb.weight("tokenizer.prefc.bias", &[f], f32)?;
    let res = Gemm {
        bias: true,
        gelu: false,
        residual: true,
        out: f32,
    };
    let tok = mb.g.op1(res.clone(), &[u, w_pre, b_pre, pos])?;
    let wt = mb.weight("wtokens", &[n_w, f], f32)?;
    let wt = mb.g.op1(Broadcast { batch: b, out: f32 }, &[wt])?;
    let s0 = mb.g.op1(Concat { axis: 1, out: f32 }, &[tok, wt])?;

    // B. One pre-norm transformer layer (no output projection in the attention).
    let layer = "transformer_encoder.layers.0";
    let z = layer_norm(&mut mb, &format!("{layer}.0.norm"), s0, f)?;
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
    let concat_rows = |t: &[HostTensor]| {
        let mut d = t[0].data.clone();
        d.extend_from_slice(&t[1].data);
        let mut shape = t[0].shape.clone();
        shape[0] += t[1].shape[0];
        Ok(HostTensor::new(shape, d))
    };
    let wqkv = mb.derived(
        "to_qkv.weight",
        &[3 * f, f],
        bf,
        &[(&q_w, &[f, f]), (&kv_w, &[2 * f, f])],
        concat_rows,
    )?;
    let bqkv = mb.derived(
        "to_qkv.bias",
        &[3 * f],
        f32,
        &[(&q_b, &[f]), (&kv_b, &[2 * f])],
        concat_rows,
    )?;
    let qkv = mb.g.op1(Gemm::linear(bf), &[z, wqkv, bqkv])?;
    let a = mb.g.op1(Attention::new(heads, f32), &[qkv])?;
    let s1 = mb.g.op1(Add::plain(f32), &[s0, a])?;
    let z = layer_norm(&mut mb, &format!("{layer}.1.norm"), s1, f)?;
    let w0 = mb.weight(&format!("{layer}.1.fn.net.0.weight"), &[f, f], bf)?;
    let b0 = mb.weight(&format!("{layer}.1.fn.net.0.bias"), &[f], f32)?;
    let hmid = mb.g.op1(
        Gemm {
            bias: true,
            gelu: true,
            residual: false,
            out: bf,
        },
        &[z, w0, b0],
    )?;
    let w3 = mb.weight(&format!("{layer}.1.fn.net.3.weight"), &[f, f], bf)?;
    let b3 = mb.weight(&format!("{layer}.1.fn.net.3.bias"), &[f], f32)?;
    let s2 = mb.g.op1(res.clone(), &[hmid, w3, b3, s1])?;
    let wtok = mb.g.op1(
        Slice {
            axis: 1,
            start: n,
            len: n_w,
            out: f32,
        },
        &[s2],
    )?;

    // C. Modulated hyper-network weights, one layer after the other.
    let dims = [(POSENC_WIDTH, f), (f, ch)];
    let mut start = 0;
    let mut layers = Vec::new();
    for (l, &(din, dout)) in dims.iter().enumerate() {
        let g = groups.min(dout);
        let toks = mb.g.op1(
            Slice {
                axis: 1,
                start,
                len: g,
                out: f32,
            },
            &[wtok],
        )?;
        start += g;
        let z = layer_norm(&mut mb, &format!("wtoken_postfc.wb{l}.0"), toks, f)?;
        let pw = mb.weight(&format!("wtoken_postfc.wb{l}.1.weight"), &[din, f], bf)?;
        let pb = mb.weight(&format!("wtoken_postfc.wb{l}.1.bias"), &[din], f32)?;
        let m = mb.g.op1(Gemm::linear(f32), &[z, pw, pb])?;
        let base = mb.weight(&format!("base_params.wb{l}"), &[din + 1, dout], f32)?;
        layers.push(mb.g.op1(
            ModulatedWeights {
                groups: g,
                out: f32,
            },
            &[base, m],
        )?);
    }

    // D–E. Encoding of the HR grid, hyper-MLP, output layer + nearest-upsampled LR features.
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
            out: f32,
        },
        &[dtok],
    )?;
    let w_out = conv1x1(&mut mb, "output_layer.weight", ind, ch)?;
    let b_out = mb.weight("output_layer.bias", &[ind], f32)?;
    let hr = mb.g.op1(res, &[r, w_out, b_out, up])?;
    let cat = mb.g.op1(Concat { axis: 3, out: bf }, &[hr, target])?;
    let t0w = mb.weight("toout.0.weight", &[ind / 4, 2 * ind], bf)?;
    let t0b = mb.weight("toout.0.bias", &[ind / 4], f32)?;
    let o = mb.g.op1(
        Gemm {
            bias: true,
            gelu: true,
            residual: false,
            out: bf,
        },
        &[cat, t0w, t0b],
    )?;
    let t2w = mb.weight("toout.2.weight", &[ind, ind / 4], bf)?;
    let t2b = mb.weight("toout.2.bias", &[ind], f32)?;
    let o = mb.g.op1(Gemm::linear(f32), &[o, t2w, t2b])?;
    let mw = mb.weight("mapp_t.mapper.weight", &[2 * ind, tdim], bf)?;
    let mbias = mb.weight("mapp_t.mapper.bias", &[2 * ind], f32)?;
    let ab = mb.g.op1(Gemm::linear(f32), &[temb, mw, mbias])?;
    let o = mb.g.op1(Film { k: 1.0, out: f32 }, &[o, ab])?;
    let ln = LayerNorm {
        eps: LN_EPS,
        affine: false,
        out: f32,
    };
    let o = mb.g.op1(ln, &[o])?;
    let s = mb.g.input("scale_signal", &[b], f32)?;
    let sw = mb.weight("hr_norm.mapping.mapper.weight", &[2 * ind, tdim], bf)?;
    let sb = mb.weight("hr_norm.mapping.mapper.bias", &[2 * ind], f32)?;
    let out = scale_norm(&mut mb, o, s, sw, sb, tdim)?;
    let inputs = vec![
        (target, td),
        (dtok, dd),
        (temb, temb_in.data.clone()),
        (s, vec![scale_signal(hh, ww); b]),
    ];
    Ok(Built::graph(
        mb,
        inputs,
        vec![("out".into(), out, Layout::Image(tshape))],
    ))
}
