//! `ultrapixel convert`: a PyTorch zip checkpoint (such as the released
//! `ultrapixel_t2i.safetensors`, a pickle despite its name) to a real safetensors file,
//! through the restricted unpickler. Dtypes are kept; keys get UltraPixel's names.

use super::dtype::WeightDtype;
use super::safetensors_file::{write_safetensors, RawTensor};
use super::torch_zip::read_torch_zip;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// What a conversion wrote.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConvertReport {
    pub tensors: usize,
    pub bytes: u64,
    pub dtypes: BTreeMap<WeightDtype, usize>,
    /// Keys that `original_name` changed.
    pub renamed: usize,
    /// State-dict entries that were not tensors, left out.
    pub skipped: Vec<String>,
}

impl fmt::Display for ConvertReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dtypes: Vec<String> = self
            .dtypes
            .iter()
            .map(|(d, n)| format!("{n} {d}"))
            .collect();
        write!(
            f,
            "{} tensors ({}), {:.1} MB, {} keys renamed",
            self.tensors,
            dtypes.join(", "),
            self.bytes as f64 / 1e6,
            self.renamed
        )?;
        if !self.skipped.is_empty() {
            write!(
                f,
                "; skipped non-tensor entries {}",
                self.skipped.join(", ")
            )?;
        }
        Ok(())
    }
}

/// The name UltraPixel loads a checkpoint key under (docs/MODEL.md §6.5): the DDP wrapper's
/// `module.` prefix goes, and the INR modules at `train_norm` indices 64 and 65 (after 64
/// parameter-less placeholders) become `agg_net` and `agg_net_up`.
pub fn original_name(key: &str) -> String {
    let key = key.strip_prefix("module.").unwrap_or(key);
    if let Some(rest) = key.strip_prefix("64.") {
        format!("agg_net.{rest}")
    } else if let Some(rest) = key.strip_prefix("65.") {
        format!("agg_net_up.{rest}")
    } else {
        key.to_string()
    }
}

/// How a conversion names the keys it writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyNames {
    /// UltraPixel's names ([`original_name`]).
    UltraPixel,
    /// As stored: a LoRA's module list numbers its layers 0, 1, ..., so its `module.64.`
    /// is a layer, not UltraPixel's INR module.
    AsStored,
}

/// Converts the PyTorch zip checkpoint `input` into the safetensors file `output` with
/// UltraPixel's names. Nothing is written unless the whole input is valid, and `output`
/// appears complete or not at all.
pub fn convert(input: &Path, output: &Path) -> Result<ConvertReport> {
    convert_named(input, output, KeyNames::UltraPixel)
}

/// [`convert`] with the key naming `names`.
pub fn convert_named(input: &Path, output: &Path, names: KeyNames) -> Result<ConvertReport> {
    let ckpt = read_torch_zip(input)?;
    let mut report = ConvertReport {
        skipped: ckpt.skipped,
        ..ConvertReport::default()
    };
    let mut sources: BTreeMap<String, String> = BTreeMap::new();
    let mut tensors: BTreeMap<String, RawTensor> = BTreeMap::new();
    for (key, tensor) in ckpt.tensors {
        let name = match names {
            KeyNames::UltraPixel => original_name(&key),
            KeyNames::AsStored => key.clone(),
        };
        if let Some(first) = sources.get(&name) {
            return Err(Error::format(
                input,
                format!("keys {first} and {key} both become {name}"),
            ));
        }
        report.renamed += usize::from(name != key);
        report.tensors += 1;
        report.bytes += tensor.data.len() as u64;
        *report.dtypes.entry(tensor.dtype).or_default() += 1;
        sources.insert(name.clone(), key);
        tensors.insert(name, tensor);
    }
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(output, &tensors, &metadata)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ultrapixel_keys_get_their_module_names() {
        assert_eq!(original_name("module.64.0.wtokens"), "agg_net.0.wtokens");
        assert_eq!(
            original_name("module.65.1.toout.2.bias"),
            "agg_net_up.1.toout.2.bias"
        );
        assert_eq!(original_name("64.1.x"), "agg_net.1.x");
        assert_eq!(original_name("module.3.weight"), "3.weight");
        assert_eq!(original_name("clf.1.weight"), "clf.1.weight");
        assert_eq!(original_name("agg_net.640.x"), "agg_net.640.x");
    }
}
