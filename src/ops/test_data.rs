//! Test data for the op modules: golden case files (read with the `safetensors` crate
//! directly) and random tensors.

use crate::tensor::{DType, HostTensor};
use crate::verify::CheckBuilder;
use std::collections::HashMap;

/// Uniform values in [−scale, scale) from `seed`.
pub fn random(seed: u64, shape: &[usize], scale: f32) -> HostTensor {
    let n = shape.iter().product();
    HostTensor::new(
        shape.to_vec(),
        CheckBuilder::new(seed).values(n, scale, DType::F32),
    )
}

/// The golden case files committed with the tests.
fn dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases")
}

/// The f32 tensors (`input.*`, `output.*`) and the metadata of `<name>.safetensors`; a
/// missing file fails the test.
pub fn load(name: &str) -> (HashMap<String, HostTensor>, HashMap<String, String>) {
    let path = dir().join(format!("{name}.safetensors"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st
        .iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::F32)
        .map(|(k, v)| {
            let data = crate::tensor::decode(v.data(), DType::F32);
            (k.to_string(), HostTensor::new(v.shape().to_vec(), data))
        })
        .collect();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    (tensors, meta.metadata().clone().unwrap_or_default())
}

/// max|out − ref| and the limit atol + rtol·max|ref| of `tests/cases/README.md`.
pub fn error(out: &[f32], reference: &[f32], atol: f32, rtol: f32) -> (f32, f32) {
    assert_eq!(out.len(), reference.len());
    let r = crate::verify::compare(
        "",
        "",
        out,
        reference,
        crate::verify::Tolerance { atol, rtol },
    );
    assert_eq!(r.non_finite, 0);
    (r.max_err, r.limit)
}
