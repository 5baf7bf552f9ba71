//! The `clip_text` kind: the CLIP text tower with and without the padding mask.

use super::*;
use crate::models::clip_text::{clip_text as record, ClipTextInputs};
use crate::models::config::{parse, ClipTextConfig};
use crate::text::first_eos;

pub(super) fn clip_text(case: &Case) -> Result<Built> {
    let cfg: ClipTextConfig = parse(&case.config, "CLIP text")?;
    let (ids_in, mask_in) = (case.input("input_ids")?, case.input("attention_mask")?);
    let [b, t] = ids_in.shape[..] else {
        return Err(case.error(format!("input_ids must be [B, T], got {:?}", ids_in.shape)));
    };
    let eos: Vec<f32> = ids_in
        .data
        .chunks_exact(t)
        .map(|row| first_eos(row) as f32)
        .collect();
    let mut mb = ModelBuilder::new();
    let ids = mb.g.input("input_ids", &[b, t], DType::F32)?;
    let mask = mb.g.input("attention_mask", &[b, t], DType::F32)?;
    let eos_at = mb.g.input("eos_position", &[b], DType::F32)?;
    let mut outputs = Vec::new();
    for (suffix, mask) in [("", Some(mask)), ("_nomask", None)] {
        let inputs = ClipTextInputs {
            ids,
            mask,
            eos: eos_at,
        };
        let o = record(&mut mb, &cfg, &inputs)?;
        outputs.push((format!("clip_text{suffix}"), o.hidden, Layout::Same));
        outputs.push((format!("last_hidden_state{suffix}"), o.last, Layout::Same));
        outputs.push((format!("text_embeds{suffix}"), o.pooled, Layout::Same));
    }
    let inputs = vec![
        (ids, ids_in.data.clone()),
        (mask, mask_in.data.clone()),
        (eos_at, eos),
    ];
    Ok(Built::graph(mb, inputs, outputs))
}
