//! Helpers shared by the integration tests.

use std::collections::HashMap;
use std::path::Path;

/// A stored tensor: name, dtype, shape, little-endian bytes.
pub type Stored = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// Copies the safetensors file `src` to `dst` (which may be the same path) after `edit`
/// changed its tensors or metadata.
pub fn rewrite_safetensors(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut Vec<Stored>, &mut HashMap<String, String>),
) {
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = meta.metadata().clone().unwrap_or_default();
    let mut tensors: Vec<Stored> = st
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                v.dtype(),
                v.shape().to_vec(),
                v.data().to_vec(),
            )
        })
        .collect();
    edit(&mut tensors, &mut meta);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, t, s, d)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(*t, s.clone(), d).unwrap(),
            )
        })
        .collect();
    let meta = (!meta.is_empty()).then_some(meta);
    safetensors::serialize_to_file(views, meta, dst).unwrap();
}
