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
    /// Where the text encoder pools these ids: [`pooled_position`] for its config's
    /// `eos_token_id`.
    pub fn pooled_position(&self, eos_token_id: u32) -> usize {
        pooled_position(&self.ids, eos_token_id)
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

/// The `eos_token_id` of CLIP configs made before `transformers` 4.31, which keeps the legacy
/// pooling at the highest id.
pub const LEGACY_EOS_TOKEN_ID: u32 = 2;

/// Where CLIP pools a row of token ids, exactly as `transformers`' `CLIPTextTransformer`
/// does for a config's `eos_token_id`: with the legacy value 2, `argmax(input_ids)`, the
/// first position of the highest id; otherwise the first position of `eos_token_id` (0 when
/// the row has none, as torch's argmax of an all-zero row).
///
/// With the plain vocabulary both are the first EOS. They differ only when a prompt holds a
/// LoRA's added tokens (ids past EOS): the legacy rule then pools at the first occurrence of
/// the newest added token in the prompt. The released Stable Cascade text encoder config,
/// and the laion ViT-bigG/14 config as `transformers` ≥ 4.31 loads it, have
/// `eos_token_id` 49407, so UltraPixel's personalization pools at the first EOS.
pub fn pooled_position<T: Copy + Into<f64>>(row: &[T], eos_token_id: u32) -> usize {
    if eos_token_id == LEGACY_EOS_TOKEN_ID {
        let mut best = 0;
        for (i, &v) in row.iter().enumerate().skip(1) {
            if v.into() > row[best].into() {
                best = i;
            }
        }
        best
    } else {
        row.iter()
            .position(|&v| v.into() == eos_token_id as f64)
            .unwrap_or(0)
    }
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
        assert_eq!(e.pooled_position(EOS), 1);
        assert!(e.dropped.is_none() && e.warning().is_none());
        let e = t.encode("a photo of a dog").unwrap();
        let n = e.mask.iter().filter(|&&m| m == 1).count();
        assert_eq!(n, 2 + 5, "{:?}", &e.ids[..10]);
        assert_eq!(e.pooled_position(EOS), n - 1);
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
        // The first EOS, or with the legacy config the newer added token.
        assert_eq!(e.pooled_position(EOS), 10);
        assert_eq!(e.pooled_position(LEGACY_EOS_TOKEN_ID), 7);
        let first = t.encode("<sks> then [roubaobao] and <sks> again").unwrap();
        assert_eq!(first.ids[1], 49409);
        assert_eq!(first.pooled_position(LEGACY_EOS_TOKEN_ID), 1);
        // Without them the words are several BPE pieces, none of them new.
        let split = plain.encode("[roubaobao]").unwrap();
        assert!(split.pooled_position(EOS) > 2 && split.ids.iter().all(|&i| i < 49408));
        let err = Tokenizer::with_added(&words, 49000)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("vocabulary size"), "{err}");
        let twice = ["[a]".to_string(), "[a]".to_string()];
        assert!(Tokenizer::with_added(&twice, 49408).is_err());
    }

    #[test]
    fn pooling_follows_the_config_eos_token_id() {
        let (eos, legacy) = (EOS as f32, LEGACY_EOS_TOKEN_ID);
        let plain = [49406.0, 320.0, eos, eos, eos];
        assert_eq!(pooled_position(&plain, EOS), 2);
        assert_eq!(pooled_position(&plain, legacy), 2);
        let added = [49406.0, 49408.0, 7.0, 49409.0, eos, 49409.0];
        assert_eq!(pooled_position(&added, legacy), 3);
        assert_eq!(pooled_position(&added, EOS), 4);
        assert_eq!(pooled_position(&[BOS, 320, 49408, EOS, EOS], legacy), 2);
        assert_eq!(pooled_position(&[BOS, 320, 49408, EOS, EOS], EOS), 3);
        // Without an EOS (never framed so): the highest id, or 0 as torch's argmax.
        assert_eq!(pooled_position(&[5u32, 9, 3, 9], legacy), 1);
        assert_eq!(pooled_position(&[5u32, 9, 3, 9], EOS), 0);
        assert_eq!(pooled_position::<u32>(&[], legacy), 0);
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
