use super::*;

/// CLIP's end-of-text token: the pooled embedding is taken at its first occurrence.
pub(super) const CLIP_EOS: f32 = 49407.0;

/// The CLIP text transformer (`CLIPTextModelWithProjection`, spec §5), with and without the
/// padding mask: the last layer's output (`clip_text`), after the final LayerNorm, and the
/// projected embedding at the first EOS.
pub(super) fn clip_text(case: &Case) -> Result<Built> {
    use crate::ops::elementwise::Add;
    use crate::ops::layout::{Broadcast, Embedding, GatherRows};
    let cfg = |k: &str| case.config_usize(k);
    let (c, heads, layers, inter) = (
        cfg("hidden_size")?,
        cfg("num_attention_heads")?,
        cfg("num_hidden_layers")?,
        cfg("intermediate_size")?,
    );
    let (vocab, ctx, proj) = (
        cfg("vocab_size")?,
        cfg("max_position_embeddings")?,
        cfg("projection_dim")?,
    );
    let (ids_in, mask_in) = (case.input("input_ids")?, case.input("attention_mask")?);
    let [b, t] = ids_in.shape[..] else {
        return Err(case.error(format!("input_ids must be [B, T], got {:?}", ids_in.shape)));
    };
    if t > ctx {
        return Err(case.error(format!("{t} tokens exceed the {ctx} positions")));
    }
    let eos: Vec<f32> = ids_in
        .data
        .chunks_exact(t)
        .map(|row| row.iter().position(|&v| v == CLIP_EOS).unwrap_or(t - 1) as f32)
        .collect();
    let (f32t, bf) = (DType::F32, DType::BF16);
    let mut mb = ModelBuilder::new();
    let ids = mb.g.input("input_ids", &[b, t], f32t)?;
    let mask = mb.g.input("attention_mask", &[b, t], f32t)?;
    let eos_at = mb.g.input("eos_position", &[b], f32t)?;
    let m = "text_model";
    let table = mb.weight(
        &format!("{m}.embeddings.token_embedding.weight"),
        &[vocab, c],
        f32t,
    )?;
    let pos_key = format!("{m}.embeddings.position_embedding.weight");
    let pos = mb.derived(
        &format!("{pos_key}[..T]"),
        &[t, c],
        f32t,
        &[(&pos_key, &[ctx, c])],
        move |x| Ok(HostTensor::new(vec![t, c], x[0].data[..t * c].to_vec())),
    )?;
    let tok = mb.g.op1(Embedding { out: f32t }, &[ids, table])?;
    let pos = mb.g.op1(
        Broadcast {
            batch: b,
            out: f32t,
        },
        &[pos],
    )?;
    let h0 = mb.g.op1(Add::plain(f32t), &[tok, pos])?;
    let w_proj = mb.weight("text_projection.weight", &[proj, c], bf)?;
    let mut outputs = Vec::new();
    for (suffix, masked) in [("", true), ("_nomask", false)] {
        let mut h = h0;
        for l in 0..layers {
            let p = format!("{m}.encoder.layers.{l}");
            let z = layer_norm(&mut mb, &format!("{p}.layer_norm1"), h, c)?;
            let keys: Vec<String> = ["q", "k", "v"]
                .iter()
                .map(|x| format!("{p}.self_attn.{x}_proj"))
                .collect();
            let (ws, bs): (Vec<String>, Vec<String>) = keys
                .iter()
                .map(|k| (format!("{k}.weight"), format!("{k}.bias")))
                .unzip();
            let (wshape, bshape) = ([c, c], [c]);
            let wsrc: Vec<(&str, &[usize])> =
                ws.iter().map(|k| (k.as_str(), &wshape[..])).collect();
            let bsrc: Vec<(&str, &[usize])> =
                bs.iter().map(|k| (k.as_str(), &bshape[..])).collect();
            let stack = |x: &[HostTensor]| {
                let data: Vec<f32> = x.iter().flat_map(|t| t.data.iter().copied()).collect();
                let mut shape = x[0].shape.clone();
                shape[0] *= x.len();
                Ok(HostTensor::new(shape, data))
            };
            let wqkv = mb.derived(
                &format!("{p}.self_attn.qkv.weight"),
                &[3 * c, c],
                bf,
                &wsrc,
                stack,
            )?;
            let bqkv = mb.derived(
                &format!("{p}.self_attn.qkv.bias"),
                &[3 * c],
                f32t,
                &bsrc,
                stack,
            )?;
            let qkv = mb.g.op1(Gemm::linear(bf), &[z, wqkv, bqkv])?;
            let attn = Attention {
                heads,
                causal: true,
                extra_kv: false,
                key_mask: masked,
                out: bf,
            };
            let a = if masked {
                mb.g.op1(attn, &[qkv, mask])?
            } else {
                mb.g.op1(attn, &[qkv])?
            };
            let ow = mb.weight(&format!("{p}.self_attn.out_proj.weight"), &[c, c], bf)?;
            let ob = mb.weight(&format!("{p}.self_attn.out_proj.bias"), &[c], f32t)?;
            let res = Gemm {
                bias: true,
                gelu: false,
                residual: true,
                out: f32t,
            };
            h = mb.g.op1(res.clone(), &[a, ow, ob, h])?;
            let z = layer_norm(&mut mb, &format!("{p}.layer_norm2"), h, c)?;
            let w1 = mb.weight(&format!("{p}.mlp.fc1.weight"), &[inter, c], bf)?;
            let b1 = mb.weight(&format!("{p}.mlp.fc1.bias"), &[inter], f32t)?;
            let u = mb.g.op1(
                Gemm {
                    bias: true,
                    gelu: true,
                    residual: false,
                    out: bf,
                },
                &[z, w1, b1],
            )?;
            let w2 = mb.weight(&format!("{p}.mlp.fc2.weight"), &[c, inter], bf)?;
            let b2 = mb.weight(&format!("{p}.mlp.fc2.bias"), &[c], f32t)?;
            h = mb.g.op1(res, &[u, w2, b2, h])?;
        }
        let fg = mb.weight(&format!("{m}.final_layer_norm.weight"), &[c], f32t)?;
        let fb = mb.weight(&format!("{m}.final_layer_norm.bias"), &[c], f32t)?;
        let last = mb.g.op1(
            LayerNorm {
                eps: 1e-5,
                affine: true,
                out: f32t,
            },
            &[h, fg, fb],
        )?;
        let pooled = mb.g.op1(GatherRows { out: bf }, &[last, eos_at])?;
        let no_bias = Gemm {
            bias: false,
            gelu: false,
            residual: false,
            out: f32t,
        };
        let embeds = mb.g.op1(no_bias, &[pooled, w_proj])?;
        outputs.push((format!("clip_text{suffix}"), h, Layout::Same));
        outputs.push((format!("last_hidden_state{suffix}"), last, Layout::Same));
        outputs.push((format!("text_embeds{suffix}"), embeds, Layout::Same));
    }
    let inputs = vec![
        (ids, ids_in.data.clone()),
        (mask, mask_in.data.clone()),
        (eos_at, eos),
    ];
    Ok(Built::graph(mb, inputs, outputs))
}
