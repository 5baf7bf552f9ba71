//! Learned tokens (the official `ReToken`): the token embedding table of the text encoder
//! grows by the LoRAs' new tokens, each starting from the mean of its aggregation rows (as
//! the official trainer initialized it), and every learned row gets its offset.

use super::file::LearnedTokens;
use crate::models::Checkpoint;
use crate::tensor::HostTensor;
use crate::{Error, Result};

/// The text encoder's token embedding table.
pub const TOKEN_TABLE: &str = "text_model.embeddings.token_embedding.weight";

/// One LoRA's learned tokens as placed in the grown table.
pub(super) struct PlacedTokens<'a> {
    pub tokens: &'a LearnedTokens,
    pub scale: f32,
    /// The table row of this LoRA's first new token.
    pub first_new: usize,
}

/// The text encoder's weights with the learned tokens applied.
pub struct TokenTable<'a> {
    pub(super) base: &'a dyn Checkpoint,
    pub(super) vocab: usize,
    /// Every new token's aggregation rows (empty: it starts at zero), in table order.
    pub(super) inits: Vec<Vec<usize>>,
    pub(super) placed: Vec<PlacedTokens<'a>>,
}

impl Checkpoint for TokenTable<'_> {
    fn tensor(&self, key: &str) -> Result<HostTensor> {
        let base = self.base.tensor(key)?;
        if key != TOKEN_TABLE {
            return Ok(base);
        }
        let [rows, width] = base.shape[..] else {
            return Err(Error::Weights(format!("{key}: expected a 2-D table")));
        };
        if rows != self.vocab {
            return Err(Error::Weights(format!(
                "{key}: {rows} rows, the configuration says {}",
                self.vocab
            )));
        }
        let mut table = base.data;
        for init in &self.inits {
            let mut row = vec![0f32; width];
            for &r in init {
                for (a, &b) in row.iter_mut().zip(&table[r * width..(r + 1) * width]) {
                    *a += b;
                }
            }
            if !init.is_empty() {
                row.iter_mut().for_each(|a| *a /= init.len() as f32);
            }
            table.extend_from_slice(&row);
        }
        for p in &self.placed {
            let t = p.tokens;
            for (j, &r) in t.rows.iter().enumerate() {
                let row = if r < self.vocab {
                    r
                } else {
                    p.first_new + r - self.vocab
                };
                let offset = &t.offsets.data[j * width..(j + 1) * width];
                for (a, &b) in table[row * width..(row + 1) * width].iter_mut().zip(offset) {
                    *a += p.scale * b;
                }
            }
        }
        Ok(HostTensor::new(vec![table.len() / width, width], table))
    }
}
