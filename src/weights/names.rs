//! Original Stable Cascade names served from checkpoints stored under either naming.
//!
//! Diffusers' `StableCascadeUNet` renames a few parameters of the original modules (docs/MODEL.md
//! §6.6): the fused attention input projection is split into `to_q`/`to_k`/`to_v` (rows
//! `[0:C]`, `[C:2C]`, `[2C:3C]` of `in_proj_*`), `attn.out_proj` becomes `to_out.0`, Stage
//! B's `clip_mapper` becomes `clip_txt_pooled_mapper`, and the VQGAN codebook is
//! `vquantizer.embedding`. Everything else keeps its name. Asked for an original key, the
//! adapter returns it as stored, or rebuilds it from its diffusers parts.

use super::{Lookup, TensorIndex};
use crate::models::Checkpoint;
use crate::tensor::{numel, HostTensor};
use crate::{Error, Result};

/// Serves original (Stable Cascade / UltraPixel) names from `inner`, whichever naming it
/// stores.
pub struct OriginalNames<C> {
    inner: C,
}

impl<C: TensorIndex> OriginalNames<C> {
    pub fn new(inner: C) -> Self {
        OriginalNames { inner }
    }

    pub fn inner(&self) -> &C {
        &self.inner
    }
}

/// The diffusers keys whose dim-0 concatenation is the original `key`, if it was renamed.
pub fn diffusers_parts(key: &str) -> Option<Vec<String>> {
    if let Some(block) = key.strip_suffix(".attn.in_proj_weight") {
        return Some(qkv(block, "weight"));
    }
    if let Some(block) = key.strip_suffix(".attn.in_proj_bias") {
        return Some(qkv(block, "bias"));
    }
    if let Some((block, param)) = key.rsplit_once(".attn.out_proj.") {
        return Some(vec![format!("{block}.to_out.0.{param}")]);
    }
    let renamed = match key {
        "clip_mapper.weight" => "clip_txt_pooled_mapper.weight",
        "clip_mapper.bias" => "clip_txt_pooled_mapper.bias",
        "vquantizer.codebook.weight" => "vquantizer.embedding.weight",
        _ => return None,
    };
    Some(vec![renamed.to_string()])
}

fn qkv(block: &str, param: &str) -> Vec<String> {
    ["to_q", "to_k", "to_v"]
        .iter()
        .map(|p| format!("{block}.{p}.{param}"))
        .collect()
}

/// Stored keys with their shapes.
type Parts = Vec<(String, Vec<usize>)>;

/// The shape of the dim-0 concatenation of `parts` (key, shape), or why there is none.
fn concat_shape(key: &str, parts: &[(String, Vec<usize>)]) -> Result<Vec<usize>> {
    let (first_key, first) = &parts[0];
    let mut shape = first.clone();
    if shape.is_empty() {
        return Err(Error::Weights(format!(
            "{key}: cannot build it from the scalar {first_key}"
        )));
    }
    for (k, s) in &parts[1..] {
        if s.len() != first.len() || s[1..] != first[1..] {
            return Err(Error::Weights(format!(
                "{key}: cannot concatenate {first_key} {first:?} and {k} {s:?}"
            )));
        }
        shape[0] += s[0];
    }
    Ok(shape)
}

impl<C: TensorIndex> OriginalNames<C> {
    /// The stored diffusers parts of `key` with their shapes, when all of them are stored.
    fn stored_parts(&self, key: &str) -> Result<Option<Parts>> {
        let Some(names) = diffusers_parts(key) else {
            return Ok(None);
        };
        let mut parts = Vec::with_capacity(names.len());
        for name in names {
            match self.inner.lookup(&name)? {
                Some(l) => parts.push((name, l.shape)),
                None => return Ok(None),
            }
        }
        Ok(Some(parts))
    }
}

impl<C: TensorIndex> Checkpoint for OriginalNames<C> {
    fn tensor(&self, key: &str) -> Result<HostTensor> {
        if self.inner.lookup(key)?.is_some() {
            return self.inner.tensor(key);
        }
        let Some(parts) = self.stored_parts(key)? else {
            return Err(Error::Weights(format!(
                "missing tensor {key} in {}",
                self.inner.origin()
            )));
        };
        let shape = concat_shape(key, &parts)?;
        let mut data = Vec::new();
        for (name, _) in &parts {
            data.extend(self.inner.tensor(name)?.data);
        }
        if data.len() != numel(&shape) {
            return Err(Error::Weights(format!(
                "{key}: its parts changed size while being read"
            )));
        }
        Ok(HostTensor::new(shape, data))
    }
}

impl<C: TensorIndex> TensorIndex for OriginalNames<C> {
    fn origin(&self) -> String {
        self.inner.origin()
    }

    fn stored_keys(&self) -> Vec<String> {
        self.inner.stored_keys()
    }

    fn lookup(&self, key: &str) -> Result<Option<Lookup>> {
        if let Some(found) = self.inner.lookup(key)? {
            return Ok(Some(found));
        }
        let Some(parts) = self.stored_parts(key)? else {
            return Ok(None);
        };
        Ok(Some(Lookup {
            shape: concat_shape(key, &parts)?,
            stored: parts.into_iter().map(|(k, _)| k).collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renamed_keys_map_to_their_diffusers_parts() {
        assert_eq!(
            diffusers_parts("down_blocks.0.2.attention.attn.in_proj_weight").unwrap(),
            [
                "down_blocks.0.2.attention.to_q.weight",
                "down_blocks.0.2.attention.to_k.weight",
                "down_blocks.0.2.attention.to_v.weight"
            ]
        );
        assert_eq!(
            diffusers_parts("up_blocks.1.5.attention.attn.out_proj.bias").unwrap(),
            ["up_blocks.1.5.attention.to_out.0.bias"]
        );
        assert_eq!(
            diffusers_parts("clip_mapper.weight").unwrap(),
            ["clip_txt_pooled_mapper.weight"]
        );
        assert_eq!(diffusers_parts("clip_txt_pooled_mapper.weight"), None);
        assert_eq!(diffusers_parts("down_blocks.0.0.depthwise.weight"), None);
    }

    #[test]
    fn concatenation_needs_matching_trailing_dims() {
        let p = |k: &str, s: &[usize]| (k.to_string(), s.to_vec());
        assert_eq!(
            concat_shape("w", &[p("q", &[2, 4]), p("k", &[2, 4]), p("v", &[3, 4])]).unwrap(),
            [7, 4]
        );
        let err = concat_shape("w", &[p("q", &[2, 4]), p("k", &[2, 5])])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot concatenate q [2, 4] and k [2, 5]"),
            "{err}"
        );
        assert!(concat_shape("w", &[p("q", &[])]).is_err());
    }
}
