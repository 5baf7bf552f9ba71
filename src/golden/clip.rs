//! The CLIP text kinds: `clip_text`, the text tower with and without the padding mask, and
//! `clip_text_retoken`, the tower with a LoRA's learned tokens (the official `ReToken`)
//! loaded through the library's LoRA path: the grown tokenizer must give the file's ids, and
//! the grown embedding table the file's outputs.

use super::*;
use crate::models::clip_text::{clip_text as record, pool, ClipTextInputs};
use crate::models::config::{parse, ClipTextConfig};
use crate::models::Checkpoint;
use crate::pipeline::lora::tokens::TOKEN_TABLE;
use crate::pipeline::lora::ModelShapes;
use crate::text::{pooled_position, EOS};

pub(super) fn clip_text(case: &Case) -> Result<Built> {
    let cfg: ClipTextConfig = parse(&case.config, "CLIP text")?;
    let ids = case.input("input_ids")?;
    let mask = case.input("attention_mask")?;
    tower(case, &cfg, &ids.data, &mask.data, &["", "_nomask"])
}

/// The text tower on `[B, T]` ids and mask, once per output suffix: `""` with the padding
/// mask, `"_nomask"` without it; each row pooled at [`pooled_position`] of its ids for the
/// config's `eos_token_id`.
fn tower(
    case: &Case,
    cfg: &ClipTextConfig,
    ids_in: &[f32],
    mask_in: &[f32],
    suffixes: &[&str],
) -> Result<Built> {
    let shape = &case.input("input_ids")?.shape;
    let [b, t] = shape[..] else {
        return Err(case.error(format!("input_ids must be [B, T], got {shape:?}")));
    };
    let pooled_at: Vec<f32> = ids_in
        .chunks_exact(t)
        .map(|row| pooled_position(row, cfg.eos_token_id) as f32)
        .collect();
    let mut mb = ModelBuilder::new();
    let ids = mb.g.input("input_ids", &[b, t], DType::F32)?;
    let mask = mb.g.input("attention_mask", &[b, t], DType::F32)?;
    let pooled_in = mb.g.input("pooled_position", &[b], DType::F32)?;
    let mut outputs = Vec::new();
    for &suffix in suffixes {
        let inputs = ClipTextInputs {
            ids,
            mask: (suffix != "_nomask").then_some(mask),
            pooled_at: pooled_in,
        };
        let o = record(&mut mb, cfg, &inputs)?;
        outputs.push((format!("clip_text{suffix}"), o.hidden, Layout::Same));
        outputs.push((format!("last_hidden_state{suffix}"), o.last, Layout::Same));
        outputs.push((format!("text_embeds{suffix}"), o.pooled, Layout::Same));
    }
    let inputs = vec![
        (ids, ids_in.to_vec()),
        (mask, mask_in.to_vec()),
        (pooled_in, pooled_at),
    ];
    Ok(Built::graph(mb, inputs, outputs))
}

/// The stored rows of the base token table (`weights.<table>.rows`, at the ids
/// `input.token_embedding_ids`).
const TABLE_ROWS: &str = "text_model.embeddings.token_embedding.rows";

pub(super) fn clip_text_retoken(case: &Case) -> Result<Built> {
    let cfg: ClipTextConfig = parse(&case.config, "CLIP text")?;
    let width = cfg.hidden_size;
    // The base table: the stored rows, every other row NaN so that reading one fails.
    let rows = case
        .weights
        .get(TABLE_ROWS)
        .ok_or_else(|| case.error(format!("missing weights.{TABLE_ROWS}")))?;
    let at = case.input("token_embedding_ids")?;
    if rows.shape != [at.data.len(), width] {
        return Err(case.error(format!(
            "weights.{TABLE_ROWS} is {:?}; {} ids of width {width} expected",
            rows.shape,
            at.data.len()
        )));
    }
    let mut table = vec![f32::NAN; cfg.vocab_size * width];
    for (&r, row) in at.data.iter().zip(rows.data.chunks_exact(width)) {
        let r = r as usize;
        if r >= cfg.vocab_size {
            return Err(case.error(format!("token row {r} is past the vocabulary")));
        }
        table[r * width..][..width].copy_from_slice(row);
    }
    let mut base: HashMap<String, HostTensor> = case
        .weights
        .iter()
        .filter(|(k, _)| k.as_str() != TABLE_ROWS)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    base.insert(
        TOKEN_TABLE.to_string(),
        HostTensor::new(vec![cfg.vocab_size, width], table),
    );

    let no_stage_c = Vec::new();
    let shapes = ModelShapes {
        stage_c: &no_stage_c,
        text_width: width,
        vocab: cfg.vocab_size,
    };
    let set = super::lora_cases::load_case_lora(case, &shapes)?;
    let tokenizer = set
        .tokenizer()
        .ok_or_else(|| case.error("the LoRA adds no token (train_tokens metadata)".into()))?;

    // The grown tokenizer on the prompts must give the official ids and mask.
    let prompts: Vec<String> = case
        .metadata
        .get("prompts")
        .and_then(|p| serde_json::from_str(p).ok())
        .ok_or_else(|| case.error("no `prompts` metadata (a JSON list)".into()))?;
    let (want_ids, want_mask) = (case.input("input_ids")?, case.input("attention_mask")?);
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for p in &prompts {
        let t = tokenizer.encode(p)?;
        ids.extend(t.ids.iter().map(|&v| v as f32));
        mask.extend(t.mask.iter().map(|&v| v as f32));
    }
    if ids != want_ids.data || mask != want_mask.data {
        return Err(case.error(format!(
            "the tokenizer with the LoRA's tokens gives other ids or masks than the \
             official code for the prompts {prompts:?}"
        )));
    }

    let (grown, table) = set.text(&cfg, &base);
    let weights = base
        .keys()
        .map(|k| Ok((k.clone(), table.tensor(k)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    let mut built = tower(case, &grown, &ids, &mask, &[""])?;
    // The other pooling rule on the same states: the first EOS, as a config with
    // `eos_token_id` 49407 (the released one) pools.
    let other = ClipTextConfig {
        eos_token_id: EOS,
        ..grown
    };
    let last = built
        .outputs
        .iter()
        .find(|o| o.0 == "last_hidden_state")
        .map(|o| o.1)
        .expect("recorded");
    let b = prompts.len();
    let at = built.mb.g.input("pooled_position_eos", &[b], DType::F32)?;
    let pooled = pool(&mut built.mb, &other, last, at)?;
    let positions = ids
        .chunks_exact(crate::text::CONTEXT)
        .map(|row| pooled_position(row, EOS) as f32)
        .collect();
    built.inputs.push((at, positions));
    built
        .outputs
        .push((format!("text_embeds_eos_{EOS}"), pooled, Layout::Same));
    built.weights = Some(weights);
    Ok(built)
}
