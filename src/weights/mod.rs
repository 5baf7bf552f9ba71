//! Weight files: safetensors through mmap, the torch-zip converter, name maps.
//!
//! - [`SafetensorsFile`]: a memory-mapped safetensors file, validated on open (every
//!   malformed header is an error naming the file and key); f32, f16 and bf16 tensors are
//!   served as f32 [`HostTensor`]s on demand.
//! - [`OriginalNames`]: serves the original Stable Cascade names from files stored with
//!   either those or the diffusers names (split q/k/v, `to_out.0`, ...).
//! - [`CheckpointSet`]: several files (shards, or a base model plus an add-on) as one.
//! - [`check_manifest`]: every missing, mis-shaped or unexpected tensor in one error.
//! - [`convert`]: a PyTorch zip checkpoint to safetensors through a restricted unpickler
//!   that never executes code (`ultrapixel convert`).

mod convert;
mod dtype;
mod manifest;
mod names;
mod pickle;
mod safetensors_file;
mod set;
mod torch_zip;

pub use convert::{convert, convert_named, original_name, ConvertReport, KeyNames};
pub use dtype::WeightDtype;
pub use manifest::{check_manifest, check_manifest_allowing};
pub use names::{diffusers_parts, OriginalNames};
pub(crate) use pickle::unpickle;
pub use safetensors_file::{write_safetensors, RawTensor, SafetensorsFile, TensorBytes};
pub use set::{CheckpointSet, Member};
pub(crate) use torch_zip::read_torch_zip_from;

use crate::models::Checkpoint;
use crate::tensor::HostTensor;
use crate::Result;
use std::collections::HashMap;
use std::path::Path;

/// How a checkpoint serves a key: the tensor's shape and the stored keys it is made from.
#[derive(Clone, Debug, PartialEq)]
pub struct Lookup {
    pub shape: Vec<usize>,
    pub stored: Vec<String>,
}

/// A checkpoint whose tensors can be listed and measured without reading their data.
pub trait TensorIndex: Checkpoint {
    /// Where the tensors come from, for messages.
    fn origin(&self) -> String;

    /// Every stored key, sorted.
    fn stored_keys(&self) -> Vec<String>;

    /// How `key` would be served; `Ok(None)` when it cannot be, an error when the stored
    /// tensors it would be made from do not fit together.
    fn lookup(&self, key: &str) -> Result<Option<Lookup>>;
}

impl TensorIndex for HashMap<String, HostTensor> {
    fn origin(&self) -> String {
        "in-memory checkpoint".into()
    }

    fn stored_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.keys().cloned().collect();
        keys.sort();
        keys
    }

    fn lookup(&self, key: &str) -> Result<Option<Lookup>> {
        Ok(self.get(key).map(|t| Lookup {
            shape: t.shape.clone(),
            stored: vec![key.to_string()],
        }))
    }
}

/// Opens weight files (safetensors, or diffusers shard indexes) as one checkpoint served
/// under the original Stable Cascade names.
pub fn open_checkpoint<P: AsRef<Path>>(paths: &[P]) -> Result<OriginalNames<CheckpointSet>> {
    Ok(OriginalNames::new(CheckpointSet::open(paths)?))
}
