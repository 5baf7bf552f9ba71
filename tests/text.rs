//! The embedded CLIP tokenizer against the ids the official code made for the `clip_text`
//! case's prompts (whitespace-only, accents, CJK, emoji, tabs, a truncated prompt …), and with
//! a LoRA's added tokens for the `clip_text_retoken` case's.

use std::path::Path;
use ultrapixel::golden::Case;
use ultrapixel::text::{pooled_position, Tokenizer, CONTEXT, EOS, LEGACY_EOS_TOKEN_ID};

#[test]
fn ids_and_masks_match_the_reference_for_every_case_prompt() {
    let case = Case::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases/clip_text.safetensors"),
    )
    .unwrap();
    let prompts: Vec<String> = serde_json::from_str(&case.metadata["prompts"]).unwrap();
    let (ids, mask) = (&case.inputs["input_ids"], &case.inputs["attention_mask"]);
    assert_eq!(ids.shape, [prompts.len(), CONTEXT]);
    let tok = Tokenizer::clip().unwrap();
    let mut truncated = 0;
    for (i, p) in prompts.iter().enumerate() {
        let t = tok.encode(p).unwrap();
        let want_ids: Vec<u32> = ids.data[i * CONTEXT..][..CONTEXT]
            .iter()
            .map(|&v| v as u32)
            .collect();
        let want_mask: Vec<u32> = mask.data[i * CONTEXT..][..CONTEXT]
            .iter()
            .map(|&v| v as u32)
            .collect();
        assert_eq!(t.ids, want_ids, "prompt {i}: {p:?}");
        assert_eq!(t.mask, want_mask, "prompt {i}: {p:?}");
        assert_eq!(t.ids[t.pooled_position(EOS)], EOS);
        assert_eq!(
            t.pooled_position(LEGACY_EOS_TOKEN_ID),
            t.pooled_position(EOS)
        );
        truncated += t.dropped.is_some() as usize;
    }
    assert_eq!(truncated, 1, "the case has one over-long prompt");
}

#[test]
fn added_tokens_give_the_reference_ids_and_the_legacy_pooling_takes_the_newest() {
    let case = Case::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases/clip_text_retoken.safetensors"),
    )
    .unwrap();
    let prompts: Vec<String> = serde_json::from_str(&case.metadata["prompts"]).unwrap();
    let train: Vec<(String, Option<String>)> =
        serde_json::from_str(&case.metadata["train_tokens"]).unwrap();
    let words: Vec<String> = train
        .into_iter()
        .map(|(t, _)| t)
        .filter(|t| t.starts_with('[') || t.starts_with('<'))
        .collect();
    let tok = Tokenizer::with_added(&words, 49408).unwrap();
    let ids = &case.inputs["input_ids"];
    // The case's config has the legacy eos_token_id.
    assert_eq!(case.config["eos_token_id"], LEGACY_EOS_TOKEN_ID);
    let mut pooled_on_added = 0;
    for (i, p) in prompts.iter().enumerate() {
        let t = tok.encode(p).unwrap();
        let want: Vec<u32> = ids.data[i * CONTEXT..][..CONTEXT]
            .iter()
            .map(|&v| v as u32)
            .collect();
        assert_eq!(t.ids, want, "prompt {i}: {p:?}");
        let at = t.pooled_position(LEGACY_EOS_TOKEN_ID);
        let row = &ids.data[i * CONTEXT..][..CONTEXT];
        assert_eq!(at, pooled_position(row, LEGACY_EOS_TOKEN_ID));
        let first_eos = t.ids.iter().position(|&v| v == EOS);
        assert_eq!(Some(t.pooled_position(EOS)), first_eos);
        let max = *t.ids.iter().max().unwrap();
        assert_eq!(t.ids[at], max);
        assert!(
            t.ids[..at].iter().all(|&v| v < max),
            "prompt {i}: first occurrence"
        );
        if max > EOS {
            pooled_on_added += 1;
        } else {
            assert_eq!(Some(at), t.ids.iter().position(|&v| v == EOS));
        }
    }
    assert!(pooled_on_added >= 3, "the case pools on added tokens");
}
