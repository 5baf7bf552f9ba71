//! LoRA updates merged into Stage C's weights as they are served to a session (so the
//! device holds plain weights and generation runs at its usual speed); the base files are
//! never changed, so dropping the LoRA gives back the base weights bit for bit.

use super::file::{LayerUpdate, ALPHA};
use crate::models::Checkpoint;
use crate::tensor::HostTensor;
use crate::{Error, Result};
use std::collections::BTreeMap;

/// A checkpoint whose weights get `factor · up · down` added (factor = scale · α / rank).
pub struct MergedWeights<'a> {
    pub(super) base: &'a dyn Checkpoint,
    pub(super) updates: BTreeMap<&'a str, Vec<(&'a LayerUpdate, f32)>>,
}

impl Checkpoint for MergedWeights<'_> {
    fn tensor(&self, key: &str) -> Result<HostTensor> {
        let mut w = self.base.tensor(key)?;
        for &(update, scale) in self.updates.get(key).into_iter().flatten() {
            add_update(&mut w, update, scale * ALPHA / update.rank() as f32)
                .map_err(|m| Error::Weights(format!("{key}: {m}")))?;
        }
        Ok(w)
    }
}

/// `w += factor · up · down`, the `[out, in]` product broadcast over any trailing kernel
/// axes (the official LoRA views it as `[out, in, 1, 1]` for a convolution).
pub fn add_update(
    w: &mut HostTensor,
    u: &LayerUpdate,
    factor: f32,
) -> std::result::Result<(), String> {
    let (rank, cols) = (u.down.shape[0], u.down.shape[1]);
    let rows = u.up.shape[0];
    if w.shape.len() < 2 || w.shape[0] != rows || w.shape[1] != cols {
        return Err(format!(
            "a [{rows}, {cols}] update does not fit the weight's {:?}",
            w.shape
        ));
    }
    let inner = w.data.len() / (rows * cols);
    for o in 0..rows {
        let up = &u.up.data[o * rank..(o + 1) * rank];
        for i in 0..cols {
            let d: f32 = up
                .iter()
                .enumerate()
                .map(|(k, &a)| a * u.down.data[k * cols + i])
                .sum();
            let at = (o * cols + i) * inner;
            for v in &mut w.data[at..at + inner] {
                *v += factor * d;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_data::random;

    #[test]
    fn the_update_is_the_scaled_product_broadcast_over_kernel_axes() {
        let (out, inp, rank, k) = (5, 3, 2, 4);
        let base = random(1, &[out, inp, 2, 2], 1.0);
        let u = LayerUpdate {
            down: random(2, &[rank, inp], 1.0),
            up: random(3, &[out, rank], 1.0),
        };
        let mut w = base.clone();
        add_update(&mut w, &u, 0.25).unwrap();
        for o in 0..out {
            for i in 0..inp {
                let d: f64 = (0..rank)
                    .map(|r| u.up.data[o * rank + r] as f64 * u.down.data[r * inp + i] as f64)
                    .sum();
                for j in 0..k {
                    let at = (o * inp + i) * k + j;
                    let want = base.data[at] as f64 + 0.25 * d;
                    assert!((w.data[at] as f64 - want).abs() < 1e-5, "{o} {i} {j}");
                }
            }
        }
        let mut wrong = random(4, &[inp, out], 1.0);
        assert!(add_update(&mut wrong, &u, 1.0).is_err());
    }
}
