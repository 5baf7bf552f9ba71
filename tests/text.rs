//! The embedded CLIP tokenizer against the ids the official code made for the `clip_text`
//! case's prompts (whitespace-only, accents, CJK, emoji, tabs, a truncated prompt …).

use std::path::Path;
use ultrapixel::golden::Case;
use ultrapixel::text::{Tokenizer, CONTEXT, EOS};

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
        assert_eq!(t.ids[t.eos_position()], EOS);
        truncated += t.dropped.is_some() as usize;
    }
    assert_eq!(truncated, 1, "the case has one over-long prompt");
}
