//! Safetensors files: memory-mapped, the whole header validated before any tensor is read,
//! so a malformed file gives an error naming the file and the key, never a panic. Writing
//! goes through the `safetensors` crate into a temporary file renamed into place.

use super::dtype::WeightDtype;
use super::torch_zip::ZIP_MAGIC;
use super::{Lookup, TensorIndex};
use crate::models::Checkpoint;
use crate::tensor::{numel, HostTensor};
use crate::{Error, Result};
use memmap2::Mmap;
use safetensors::tensor::TensorInfo;
use safetensors::{Dtype, View};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A file's bytes: mapped, or in memory.
enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// The length prefix of the JSON header.
const LEN_BYTES: usize = 8;
/// The same bound the `safetensors` crate puts on headers.
const MAX_HEADER_BYTES: u64 = 100 << 20;
const METADATA_KEY: &str = "__metadata__";

/// A validated, memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    /// Kept open to notice the file shrinking under the mapping (reading a mapped page past
    /// the end of a truncated file would kill the process with SIGBUS); None for bytes in
    /// memory.
    file: Option<File>,
    map: Storage,
    entries: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    bytes: Range<usize>,
}

/// A stored tensor as it is in the file.
#[derive(Clone, Copy, Debug)]
pub struct TensorBytes<'a> {
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl SafetensorsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < LEN_BYTES as u64 {
            // Mapping an empty file fails on some systems; say what is wrong instead.
            return Err(Error::format(
                path,
                format!("{len} bytes long, too short for a safetensors file (an 8-byte header length comes first)"),
            ));
        }
        // SAFETY: the mapping is only read. Like every safetensors loader we rely on the file
        // not being truncated while it is open; all offsets were checked against its length.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path, Some(file), Storage::Mapped(map))
    }

    /// A safetensors file held in memory (`name` stands for its path in messages).
    pub fn from_bytes(name: impl AsRef<Path>, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(name.as_ref(), None, Storage::Owned(bytes))
    }

    fn parse(path: &Path, file: Option<File>, map: Storage) -> Result<Self> {
        if map.starts_with(ZIP_MAGIC) {
            return Err(pickle_checkpoint_error(path));
        }
        let (entries, metadata) = parse_header(&map).map_err(|m| Error::format(path, m))?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            file,
            map,
            entries,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `__metadata__` strings of the header.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Every tensor key, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// A tensor's dtype, shape and bytes, straight from the mapping.
    pub fn bytes(&self, key: &str) -> Result<TensorBytes<'_>> {
        let e = self.entries.get(key).ok_or_else(|| {
            Error::Weights(format!("missing tensor {key} in {}", self.path.display()))
        })?;
        let now = match &self.file {
            Some(f) => f
                .metadata()
                .map_err(|err| Error::io(&self.path, err))?
                .len(),
            None => self.map.len() as u64,
        };
        if now < e.bytes.end as u64 {
            return Err(Error::format(
                &self.path,
                format!(
                    "the file shrank from {} to {now} bytes while in use (replaced or being \
                     re-downloaded?); nothing past its new end was read: run again once it is \
                     complete",
                    self.map.len()
                ),
            ));
        }
        Ok(TensorBytes {
            dtype: e.dtype,
            shape: &e.shape,
            data: &self.map[e.bytes.clone()],
        })
    }
}

impl Checkpoint for SafetensorsFile {
    fn tensor(&self, key: &str) -> Result<HostTensor> {
        let t = self.bytes(key)?;
        let dtype = WeightDtype::from_safetensors(t.dtype).ok_or_else(|| {
            Error::format(
                &self.path,
                format!(
                    "tensor {key} has dtype {:?}; weights must be F32, F16 or BF16",
                    t.dtype
                ),
            )
        })?;
        Ok(HostTensor::new(t.shape.to_vec(), dtype.decode(t.data)))
    }
}

impl TensorIndex for SafetensorsFile {
    fn origin(&self) -> String {
        self.path.display().to_string()
    }

    fn stored_keys(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    fn lookup(&self, key: &str) -> Result<Option<Lookup>> {
        Ok(self.entries.get(key).map(|e| Lookup {
            shape: e.shape.clone(),
            stored: vec![key.to_string()],
        }))
    }
}

/// What opening a torch zip as safetensors says.
fn pickle_checkpoint_error(path: &Path) -> Error {
    let p = path.display();
    Error::Weights(format!(
        "{p} is a PyTorch pickle checkpoint, not safetensors: convert it with `ultrapixel convert {p} <out>.safetensors`"
    ))
}

type Header = (BTreeMap<String, Entry>, BTreeMap<String, String>);

/// Validates the whole header of a safetensors file held in `file`.
fn parse_header(file: &[u8]) -> std::result::Result<Header, String> {
    let len_bytes: [u8; LEN_BYTES] = file
        .get(..LEN_BYTES)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            format!(
                "{} bytes long, too short for a safetensors file",
                file.len()
            )
        })?;
    let header_len = u64::from_le_bytes(len_bytes);
    let room = (file.len() - LEN_BYTES) as u64;
    if header_len > room {
        return Err(format!(
            "header length {header_len} runs past the end of the file ({} bytes)",
            file.len()
        ));
    }
    if header_len > MAX_HEADER_BYTES {
        return Err(format!(
            "header of {header_len} bytes is over the {MAX_HEADER_BYTES}-byte limit"
        ));
    }
    let data_start = LEN_BYTES + header_len as usize;
    let text = std::str::from_utf8(&file[LEN_BYTES..data_start])
        .map_err(|e| format!("header is not valid UTF-8 ({e})"))?;
    let json: Value =
        serde_json::from_str(text).map_err(|e| format!("header is not valid JSON: {e}"))?;
    let Value::Object(fields) = json else {
        return Err("header is not a JSON object".into());
    };
    let data_len = file.len() - data_start;
    let mut entries = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (key, value) in fields {
        if key == METADATA_KEY {
            metadata = parse_metadata(value)?;
            continue;
        }
        let (dtype, shape, span) = parse_entry(&key, value, data_len)?;
        let bytes = data_start + span.start..data_start + span.end;
        entries.insert(
            key,
            Entry {
                dtype,
                shape,
                bytes,
            },
        );
    }
    check_no_overlap(&entries, data_start)?;
    Ok((entries, metadata))
}

fn parse_metadata(value: Value) -> std::result::Result<BTreeMap<String, String>, String> {
    let bad = || format!("{METADATA_KEY} must map strings to strings");
    let Value::Object(fields) = value else {
        return Err(bad());
    };
    fields
        .into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            _ => Err(bad()),
        })
        .collect()
}

/// One tensor entry: its dtype, shape and byte range in the data section.
fn parse_entry(
    key: &str,
    value: Value,
    data_len: usize,
) -> std::result::Result<(Dtype, Vec<usize>, Range<usize>), String> {
    let dtype_name = value
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("tensor {key}: no \"dtype\" string"))?;
    serde_json::from_value::<Dtype>(Value::String(dtype_name.to_string()))
        .map_err(|_| format!("tensor {key}: unknown dtype \"{dtype_name}\""))?;
    let info: TensorInfo = serde_json::from_value(value).map_err(|e| {
        format!("tensor {key}: entry must have a shape of non-negative integers and two data_offsets ({e})")
    })?;
    let (begin, end) = info.data_offsets;
    if begin > end {
        return Err(format!(
            "tensor {key}: data_offsets [{begin}, {end}] end before they begin"
        ));
    }
    if end > data_len {
        return Err(format!(
            "tensor {key}: data_offsets [{begin}, {end}] lie outside the data section ({data_len} bytes)"
        ));
    }
    let bits = info
        .shape
        .iter()
        .try_fold(info.dtype.bitsize(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("tensor {key}: shape {:?} is too large", info.shape))?;
    if bits % 8 != 0 || bits / 8 != end - begin {
        return Err(format!(
            "tensor {key}: shape {:?} of {:?} needs {} bytes but data_offsets [{begin}, {end}] span {}",
            info.shape,
            info.dtype,
            bits.div_ceil(8),
            end - begin
        ));
    }
    Ok((info.dtype, info.shape, begin..end))
}

fn check_no_overlap(
    entries: &BTreeMap<String, Entry>,
    data_start: usize,
) -> std::result::Result<(), String> {
    let mut spans: Vec<(&str, &Range<usize>)> = entries
        .iter()
        .filter(|(_, e)| !e.bytes.is_empty())
        .map(|(k, e)| (k.as_str(), &e.bytes))
        .collect();
    spans.sort_by_key(|(_, r)| (r.start, r.end));
    // The span reaching furthest so far: a long tensor can overlap one that is not adjacent.
    let mut furthest: Option<(&str, &Range<usize>)> = None;
    for (key, span) in spans {
        if let Some((prev, prev_span)) = furthest {
            if span.start < prev_span.end {
                let rel =
                    |r: &Range<usize>| format!("{}..{}", r.start - data_start, r.end - data_start);
                return Err(format!(
                    "tensors {prev} and {key} overlap (bytes {} and {} of the data section)",
                    rel(prev_span),
                    rel(span)
                ));
            }
        }
        if furthest.is_none_or(|(_, r)| span.end > r.end) {
            furthest = Some((key, span));
        }
    }
    Ok(())
}

/// A tensor to write: dtype, shape and little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct RawTensor {
    pub dtype: WeightDtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    /// `t`'s values stored as `dtype` (rounded to nearest even).
    pub fn from_host(t: &HostTensor, dtype: WeightDtype) -> Self {
        RawTensor {
            dtype,
            shape: t.shape.clone(),
            data: dtype.encode(&t.data),
        }
    }

    pub fn to_host(&self) -> HostTensor {
        HostTensor::new(self.shape.clone(), self.dtype.decode(&self.data))
    }
}

impl View for &RawTensor {
    fn dtype(&self) -> Dtype {
        self.dtype.to_safetensors()
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }

    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes `tensors` as a safetensors file at `path`, atomically: into a temporary file in
/// the same directory that is renamed over `path` once complete, and removed on any error.
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, RawTensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    for (key, t) in tensors {
        let want = numel(&t.shape) * t.dtype.size();
        if t.data.len() != want {
            return Err(Error::InvalidArgument(format!(
                "tensor {key}: shape {:?} of {} needs {want} bytes, got {}",
                t.shape,
                t.dtype,
                t.data.len()
            )));
        }
    }
    let info: HashMap<String, String> = metadata.clone().into_iter().collect();
    let bytes = safetensors::serialize(tensors, (!info.is_empty()).then_some(info))
        .map_err(|e| Error::format(path, format!("writing safetensors: {e}")))?;
    crate::atomic_file::write_atomic(path, |out| {
        out.write_all(&bytes).map_err(|e| Error::io(path, e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with_header(header: &str, data_len: usize) -> Vec<u8> {
        let mut f = (header.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(header.as_bytes());
        f.resize(f.len() + data_len, 0);
        f
    }

    fn header_error(header: &str, data_len: usize) -> String {
        parse_header(&file_with_header(header, data_len)).unwrap_err()
    }

    #[test]
    fn valid_header_with_metadata_parses() {
        let h = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[2],"data_offsets":[8,12]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let (entries, meta) = parse_header(&file_with_header(h, 12)).unwrap();
        assert_eq!(meta["format"], "pt");
        assert_eq!(entries.keys().collect::<Vec<_>>(), ["a", "b"]);
        let start = 8 + h.len();
        assert_eq!(entries["b"].bytes, start + 8..start + 12);
    }

    #[test]
    fn a_file_that_shrinks_while_mapped_is_an_error_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let t = HostTensor::new(vec![4096], (0..4096).map(|i| i as f32).collect());
        let tensors = BTreeMap::from([
            ("a".to_string(), RawTensor::from_host(&t, WeightDtype::F32)),
            ("b".to_string(), RawTensor::from_host(&t, WeightDtype::F32)),
        ]);
        write_safetensors(&path, &tensors, &BTreeMap::new()).unwrap();
        let f = SafetensorsFile::open(&path).unwrap();
        assert_eq!(f.tensor("b").unwrap(), t);
        // Truncated to the header plus half of `a`: both tensors now lie (partly) past the end.
        let keep = std::fs::metadata(&path).unwrap().len() - 3 * 4096 * 2;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(keep)
            .unwrap();
        for key in ["a", "b"] {
            let err = f.tensor(key).unwrap_err().to_string();
            assert!(
                err.contains("shrank") && err.contains("w.safetensors"),
                "{err}"
            );
        }
    }

    #[test]
    fn entry_errors_name_the_key() {
        let cases = [
            (
                r#"{"w":{"dtype":"Q7","shape":[1],"data_offsets":[0,4]}}"#,
                "tensor w: unknown dtype \"Q7\"",
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
                "tensor w: entry must have",
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
                "tensor w: data_offsets [4, 0] end before",
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,40]}}"#,
                "tensor w: data_offsets [0, 40] lie outside",
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                "tensor w: shape [3] of F32 needs 12 bytes",
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,8]}}"#,
                "too large",
            ),
            (
                r#"{"__metadata__":{"a":1}}"#,
                "__metadata__ must map strings to strings",
            ),
            (r#"[1,2]"#, "not a JSON object"),
            (r#"{"w":"#, "not valid JSON"),
        ];
        for (header, want) in cases {
            let err = header_error(header, 16);
            assert!(err.contains(want), "{header}: {err}");
        }
    }

    #[test]
    fn overlaps_are_found_between_non_adjacent_tensors() {
        let h = r#"{"long":{"dtype":"U8","shape":[10],"data_offsets":[0,10]},"mid":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},"tail":{"dtype":"U8","shape":[2],"data_offsets":[9,11]}}"#;
        let err = header_error(h, 12);
        assert!(
            err.contains("tensors long and mid overlap (bytes 0..10 and 2..4"),
            "{err}"
        );
        let empty_ok = r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[1,1]},"b":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#;
        assert!(parse_header(&file_with_header(empty_ok, 2)).is_ok());
    }

    #[test]
    fn lengths_and_encodings_are_checked() {
        let mut f = 1000u64.to_le_bytes().to_vec();
        f.extend_from_slice(b"{}");
        assert!(parse_header(&f)
            .unwrap_err()
            .contains("header length 1000 runs past"));
        let mut f = 2u64.to_le_bytes().to_vec();
        f.extend_from_slice(&[0xff, 0xfe]);
        assert!(parse_header(&f).unwrap_err().contains("not valid UTF-8"));
        assert!(parse_header(b"abc").unwrap_err().contains("too short"));
    }
}
