//! Checking a checkpoint against a model's manifest before anything is uploaded.

use super::TensorIndex;
use crate::{Error, Result};
use std::collections::HashSet;

/// How many keys of each kind an error lists before summarizing the rest.
const MAX_LISTED: usize = 20;

/// Checks that `ckpt` serves every manifest key with its shape and stores nothing else.
/// One error lists every missing, mis-shaped and unexpected tensor.
pub fn check_manifest(ckpt: &dyn TensorIndex, manifest: &[(String, Vec<usize>)]) -> Result<()> {
    check_manifest_allowing(ckpt, manifest, &[])
}

/// Like [`check_manifest`], but stored keys starting with one of `unused_prefixes` may be
/// present without being read (e.g. Stage A's encoder, UltraPixel's unused `hr_norm`
/// convolutions).
pub fn check_manifest_allowing(
    ckpt: &dyn TensorIndex,
    manifest: &[(String, Vec<usize>)],
    unused_prefixes: &[&str],
) -> Result<()> {
    let mut read: HashSet<String> = HashSet::new();
    let mut missing = Vec::new();
    let mut misshaped = Vec::new();
    for (key, want) in manifest {
        match ckpt.lookup(key) {
            Ok(Some(found)) => {
                if &found.shape != want {
                    misshaped.push(format!("{key}: expected {want:?}, found {:?}", found.shape));
                }
                read.extend(found.stored);
            }
            Ok(None) => missing.push(format!("{key} {want:?}")),
            Err(e) => misshaped.push(format!("{key}: {e}")),
        }
    }
    let unexpected: Vec<String> = ckpt
        .stored_keys()
        .into_iter()
        .filter(|k| !read.contains(k) && !unused_prefixes.iter().any(|p| k.starts_with(p)))
        .map(|k| match ckpt.lookup(&k) {
            Ok(Some(found)) => format!("{k} {:?}", found.shape),
            _ => k,
        })
        .collect();
    if missing.is_empty() && misshaped.is_empty() && unexpected.is_empty() {
        return Ok(());
    }
    let mut msg = format!(
        "{} does not match the model: {} missing, {} with the wrong shape, {} unexpected",
        ckpt.origin(),
        missing.len(),
        misshaped.len(),
        unexpected.len()
    );
    for (title, lines) in [
        ("missing", &missing),
        ("wrong shape", &misshaped),
        ("unexpected", &unexpected),
    ] {
        for line in lines.iter().take(MAX_LISTED) {
            msg.push_str(&format!("\n  {title}: {line}"));
        }
        if lines.len() > MAX_LISTED {
            msg.push_str(&format!(
                "\n  ... and {} more {title}",
                lines.len() - MAX_LISTED
            ));
        }
    }
    Err(Error::Weights(msg))
}
