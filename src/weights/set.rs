//! Several weight files seen as one checkpoint: diffusers shards (`*.index.json`), or a
//! base model plus its add-on (Stage C and UltraPixel's INR modules).

use super::safetensors_file::SafetensorsFile;
use super::{Lookup, TensorIndex};
use crate::models::Checkpoint;
use crate::tensor::HostTensor;
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// A checkpoint member that can move between threads.
pub type Member = Box<dyn TensorIndex + Send + Sync>;

/// The union of checkpoints whose keys do not collide.
pub struct CheckpointSet {
    members: Vec<Member>,
    owner: HashMap<String, usize>,
}

impl CheckpointSet {
    pub fn new(members: Vec<Member>) -> Result<Self> {
        let mut owner: HashMap<String, usize> = HashMap::new();
        for (i, m) in members.iter().enumerate() {
            for key in m.stored_keys() {
                if let Some(&j) = owner.get(&key) {
                    return Err(Error::Weights(format!(
                        "tensor {key} is in both {} and {}",
                        members[j].origin(),
                        m.origin()
                    )));
                }
                owner.insert(key, i);
            }
        }
        Ok(CheckpointSet { members, owner })
    }

    /// Opens safetensors files; a `.json` path is a shard index (`{"weight_map": {key:
    /// file}}`) whose files are opened from its directory.
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        let mut members: Vec<Member> = Vec::new();
        for path in paths {
            let path = path.as_ref();
            if path.extension().is_some_and(|e| e == "json") {
                for shard in open_shards(path)? {
                    members.push(Box::new(shard));
                }
            } else {
                members.push(Box::new(SafetensorsFile::open(path)?));
            }
        }
        CheckpointSet::new(members)
    }

    fn member(&self, key: &str) -> Option<&Member> {
        self.owner.get(key).map(|&i| &self.members[i])
    }
}

/// The shards an index names, each checked to hold the keys the index puts in it.
fn open_shards(index: &Path) -> Result<Vec<SafetensorsFile>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(index, format!("not JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::format(index, "no \"weight_map\" object"))?;
    let mut by_file: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (key, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| Error::format(index, format!("weight_map[{key}] is not a file name")))?;
        by_file.entry(file).or_default().push(key);
    }
    let dir = index.parent().map(Path::to_path_buf).unwrap_or_default();
    by_file
        .into_iter()
        .map(|(file, keys)| {
            let shard = SafetensorsFile::open(dir.join(file))?;
            if let Some(k) = keys.iter().find(|k| shard.bytes(k).is_err()) {
                return Err(Error::format(
                    index,
                    format!("weight_map puts {k} in {file}, which does not hold it"),
                ));
            }
            Ok(shard)
        })
        .collect()
}

impl Checkpoint for CheckpointSet {
    fn tensor(&self, key: &str) -> Result<HostTensor> {
        match self.member(key) {
            Some(m) => m.tensor(key),
            None => Err(Error::Weights(format!(
                "missing tensor {key} in {}",
                self.origin()
            ))),
        }
    }
}

impl TensorIndex for CheckpointSet {
    fn origin(&self) -> String {
        let origins: Vec<String> = self.members.iter().map(|m| m.origin()).collect();
        origins.join(" + ")
    }

    fn stored_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.owner.keys().cloned().collect();
        keys.sort();
        keys
    }

    fn lookup(&self, key: &str) -> Result<Option<Lookup>> {
        match self.member(key) {
            Some(m) => m.lookup(key),
            None => Ok(None),
        }
    }
}
