//! Prompts to CLIP token ids: the embedded ViT-bigG/14 tokenizer (`data/`, docs/MODEL.md §5) with
//! the reference's framing — BOS, at most 75 text tokens, EOS, padding with EOS to 77 — and the
//! attention mask (1 for BOS, the text and the first EOS), and where the text encoder pools.

use crate::{Error, Result};

/// `<|startoftext|>`.
pub const BOS: u32 = 49406;
/// `<|endoftext|>`: ends the text and pads the rest (the Stable Cascade export's pad token).
pub const EOS: u32 = 49407;
/// CLIP's context length.
pub const CONTEXT: usize = 77;
/// Text tokens that fit between BOS and EOS.
pub const MAX_TEXT_TOKENS: usize = CONTEXT - 2;

pub(crate) const TOKENIZER_JSON: &[u8] = include_bytes!("../data/clip-vit-bigg-14-tokenizer.json");

/// A prompt as the text encoder reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    /// `CONTEXT` ids.
    pub ids: Vec<u32>,
    /// `CONTEXT` values: 1 up to and including the first EOS, then 0.
    pub mask: Vec<u32>,
    /// The end of the prompt that did not fit, when it was truncated.
    pub dropped: Option<String>,
}

impl Tokens {
    /// Where the pooled embedding is taken: [`pooled_position`] of the ids (the first EOS,
    /// unless the prompt holds a LoRA's added token).
    pub fn pooled_position(&self) -> usize {
        pooled_position(&self.ids)
    }

    /// The warning to show for a truncated prompt.
    pub fn warning(&self) -> Option<String> {
        self.dropped.as_ref().map(|d| {
            format!(
                "longer than CLIP's {MAX_TEXT_TOKENS} tokens; this end of it is \
                 ignored: \"{d}\""
            )
        })
    }
}

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// The embedded CLIP tokenizer.
    pub fn clip() -> Result<Tokenizer> {
        let mut inner = tokenizers::Tokenizer::from_bytes(TOKENIZER_JSON)
            .map_err(|e| Error::InvalidArgument(format!("embedded CLIP tokenizer: {e}")))?;
        // Framing is done here, so the dropped text can be named.
        inner
            .with_truncation(None)
            .map_err(|e| Error::InvalidArgument(format!("CLIP tokenizer: {e}")))?;
        inner.with_padding(None);
        Ok(Tokenizer { inner })
    }

    /// The embedded tokenizer with `words` added as whole tokens (a LoRA's trigger words),
    /// numbered in order from `first`, the first row past the text encoder's vocabulary.
    /// They match like the official `tokenizer.add_tokens`: on the normalized (lowercased)
    /// text, before BPE.
    pub fn with_added(words: &[String], first: u32) -> Result<Tokenizer> {
        let mut t = Tokenizer::clip()?;
        for (k, w) in words.iter().enumerate() {
            if t.inner.token_to_id(w).is_some() {
                return Err(Error::InvalidArgument(format!(
                    "token {w:?} is already in the vocabulary (added twice, or by two LoRAs)"
                )));
            }
            t.inner
                .add_tokens(&[tokenizers::AddedToken::from(w.as_str(), false)]);
            let id = t.inner.token_to_id(w);
            if id != Some(first + k as u32) {
                return Err(Error::InvalidArgument(format!(
                    "token {w:?} got id {id:?}, not {}: the text encoder's vocabulary size                      differs from the tokenizer's",
                    first + k as u32
                )));
            }
        }
        Ok(t)
    }

    /// The ids of the vocabulary entries (BPE pieces, `</w>` ending a word) that `pattern`
    /// selects: a literal, optionally anchored with `^` and `$` (the official aggregation
    /// patterns, such as `^cat</w>`); other regular expressions are refused.
    pub fn vocab_matching(&self, pattern: &str) -> Result<Vec<u32>> {
        let start = pattern.starts_with('^');
        let body = pattern.strip_prefix('^').unwrap_or(pattern);
        let end = body.ends_with('$');
        let body = body.strip_suffix('$').unwrap_or(body);
        if body.chars().any(|c| "\\.*+?()[]{}|^$".contains(c)) {
            return Err(Error::InvalidArgument(format!(
                "token pattern {pattern:?}: only a literal with optional ^ and $ anchors is                  supported"
            )));
        }
        let mut ids: Vec<u32> = self
            .inner
            .get_vocab(false)
            .into_iter()
            .filter(|(k, _)| match (start, end) {
                (true, true) => k == body,
                (true, false) => k.starts_with(body),
                (false, true) => k.ends_with(body),
                (false, false) => k.contains(body),
            })
            .map(|(_, id)| id)
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Tokenizes and frames `prompt` (any text, the empty string included).
    pub fn encode(&self, prompt: &str) -> Result<Tokens> {
        let enc = self
            .inner
            .encode(prompt, false)
            .map_err(|e| Error::InvalidArgument(format!("tokenizing the prompt: {e}")))?;
        let text = enc.get_ids();
        let kept = text.len().min(MAX_TEXT_TOKENS);
        let dropped = (text.len() > kept).then(|| {
            let start = enc.get_offsets()[kept].0;
            prompt.get(start..).unwrap_or_default().trim().to_string()
        });
        let mut ids = Vec::with_capacity(CONTEXT);
        ids.push(BOS);
        ids.extend_from_slice(&text[..kept]);
        ids.push(EOS);
        let mut mask = vec![1; ids.len()];
        mask.resize(CONTEXT, 0);
        ids.resize(CONTEXT, EOS);
        Ok(Tokens { ids, mask, dropped })
    }
}

/// Where CLIP pools a row of token ids: the first position of its highest id, as the
/// official text encoder does. The released ViT-bigG/14 config has the legacy
/// `eos_token_id` 2, so `transformers`' `CLIPTextTransformer` takes
/// `input_ids.argmax(-1)`, and torch's argmax gives the first maximal element. With the
/// plain vocabulary that is the first EOS (49407, the highest id); a LoRA's added tokens
/// are numbered past EOS, so in a prompt that holds one it is the first occurrence of the
/// newest added token the prompt holds, as in the official `test_personalized.py`.
/// 0 for an empty row.
pub fn pooled_position<T: Copy + PartialOrd>(row: &[T]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate().skip(1) {
        if v > row[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_pads_with_eos_and_masks_the_padding() {
        let t = Tokenizer::clip().unwrap();
        let e = t.encode("").unwrap();
        assert_eq!(&e.ids[..3], &[BOS, EOS, EOS]);
        assert_eq!(e.ids.len(), CONTEXT);
        assert_eq!(&e.mask[..3], &[1, 1, 0]);
        assert_eq!(e.pooled_position(), 1);
        assert!(e.dropped.is_none() && e.warning().is_none());
        let e = t.encode("a photo of a dog").unwrap();
        let n = e.mask.iter().filter(|&&m| m == 1).count();
        assert_eq!(n, 2 + 5, "{:?}", &e.ids[..10]);
        assert_eq!(e.pooled_position(), n - 1);
    }

    #[test]
    fn added_tokens_are_whole_words_numbered_past_the_vocabulary() {
        let plain = Tokenizer::clip().unwrap();
        let words = ["[roubaobao]".to_string(), "<sks>".to_string()];
        let t = Tokenizer::with_added(&words, 49408).unwrap();
        let e = t
            .encode("A photo of cat [Roubaobao] and <sks>, photo")
            .unwrap();
        let p = plain.encode("A photo of cat and , photo").unwrap();
        // BOS, "a photo of cat", the new token, "and", the other, ", photo", EOS.
        assert_eq!(&e.ids[1..5], &p.ids[1..5]);
        assert_eq!(e.ids[5], 49408);
        assert_eq!(e.ids[6], p.ids[5]);
        assert_eq!(e.ids[7], 49409);
        assert_eq!(&e.ids[8..11], &p.ids[6..9]);
        // The official pooling takes the highest id: the newer added token, not the EOS.
        assert_eq!(e.pooled_position(), 7);
        let first = t.encode("<sks> then [roubaobao] and <sks> again").unwrap();
        assert_eq!(first.ids[1], 49409);
        assert_eq!(first.pooled_position(), 1);
        // Without them the words are several BPE pieces, none of them new.
        let split = plain.encode("[roubaobao]").unwrap();
        assert!(split.pooled_position() > 2 && split.ids.iter().all(|&i| i < 49408));
        let err = Tokenizer::with_added(&words, 49000)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("vocabulary size"), "{err}");
        let twice = ["[a]".to_string(), "[a]".to_string()];
        assert!(Tokenizer::with_added(&twice, 49408).is_err());
    }

    #[test]
    fn pooling_takes_the_first_highest_id() {
        let eos = EOS as f32;
        assert_eq!(pooled_position(&[49406.0, 320.0, eos, eos, eos]), 2);
        assert_eq!(
            pooled_position(&[49406.0, 49408.0, 7.0, 49409.0, eos, 49409.0]),
            3
        );
        assert_eq!(pooled_position(&[BOS, 320, 49408, EOS, EOS]), 2);
        // Without an EOS (never framed so), still the highest id.
        assert_eq!(pooled_position(&[5u32, 9, 3, 9]), 1);
        assert_eq!(pooled_position::<u32>(&[]), 0);
    }

    #[test]
    fn vocabulary_patterns_are_anchored_literals() {
        let t = Tokenizer::clip().unwrap();
        let cat = t.vocab_matching("^cat</w>$").unwrap();
        assert_eq!(cat.len(), 1);
        assert_eq!(t.vocab_matching("^cat</w>").unwrap(), cat);
        let cats = t.vocab_matching("^cat").unwrap();
        assert!(cats.len() > 5 && cats.contains(&cat[0]), "{cats:?}");
        let ends = t.vocab_matching("cat</w>$").unwrap();
        assert!(ends.len() > 1 && ends.contains(&cat[0]));
        assert!(t.vocab_matching("^c.t").is_err());
        assert!(t.vocab_matching("(cat|dog)").is_err());
    }

    #[test]
    fn a_long_prompt_is_truncated_and_the_dropped_words_are_named() {
        let t = Tokenizer::clip().unwrap();
        let words: Vec<String> = (0..300).map(|i| format!("w{i}")).collect();
        let e = t.encode(&words.join(" ")).unwrap();
        assert_eq!(e.ids.len(), CONTEXT);
        assert_eq!(e.ids[CONTEXT - 1], EOS);
        assert!(e.mask.iter().all(|&m| m == 1));
        let dropped = e.dropped.clone().unwrap();
        assert!(dropped.ends_with("w299"), "{dropped}");
        assert!(!dropped.contains("w0 "), "{dropped}");
        assert!(e.warning().unwrap().contains("w299"));
    }
}
