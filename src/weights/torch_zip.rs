//! PyTorch zip checkpoints, `torch.save`'s format: `<root>/data.pkl` (the pickled object,
//! read by the restricted unpickler) and one `<root>/data/<key>` entry per storage, stored
//! uncompressed. Tensors are strided views of storages; they come out contiguous.

use super::dtype::WeightDtype;
use super::pickle::{unpickle, TensorRef};
use super::safetensors_file::RawTensor;
use crate::{Error, Result};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use zip::result::ZipError;
use zip::ZipArchive;

pub(crate) const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
/// Real state-dict pickles take a few hundred bytes per tensor, so this allows some 50,000
/// tensors while bounding what a hostile pickle can make the unpickler allocate.
const MAX_PICKLE_BYTES: u64 = 16 << 20;
/// Bound on the tensors produced, relative to the file: allows tied weights, refuses
/// views that would replicate storages without limit.
const MAX_OUTPUT_PER_FILE_BYTE: u64 = 4;

/// The tensors of a checkpoint's state dict, and the keys whose values were not tensors.
pub(crate) struct TorchCheckpoint {
    pub tensors: Vec<(String, RawTensor)>,
    pub skipped: Vec<String>,
}

pub(crate) fn read_torch_zip(path: &Path) -> Result<TorchCheckpoint> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    read_torch_zip_from(path, BufReader::new(file), file_len)
}

/// A checkpoint of `len` bytes read from `source`; `path` names it in messages.
pub(crate) fn read_torch_zip_from<R: Read + Seek>(
    path: &Path,
    mut source: R,
    file_len: u64,
) -> Result<TorchCheckpoint> {
    let bad = |m: String| Error::format(path, m);
    let mut magic = [0u8; 4];
    let starts_like_zip = source.read_exact(&mut magic).is_ok() && magic == ZIP_MAGIC;
    if !starts_like_zip {
        return Err(bad(
            "not a PyTorch zip checkpoint (no zip signature); legacy pre-1.6 torch.save files are not supported".into(),
        ));
    }
    source
        .seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(path, e))?;
    let mut zip =
        ZipArchive::new(source).map_err(|e| bad(format!("not a readable zip archive: {e}")))?;
    let root = archive_root(&zip).map_err(bad)?;
    if let Some(order) = read_optional(&mut zip, &format!("{root}/byteorder"), 16).map_err(bad)? {
        if order != b"little" {
            return Err(bad(format!(
                "storages are {}-endian; only little-endian checkpoints are supported",
                String::from_utf8_lossy(&order)
            )));
        }
    }
    let pkl_name = format!("{root}/data.pkl");
    let code = read_entry(&mut zip, &pkl_name, MAX_PICKLE_BYTES).map_err(bad)?;
    let pickled = unpickle(&code).map_err(|e| bad(format!("{pkl_name}: {e}")))?;
    let state = pickled
        .state_dict()
        .map_err(|e| bad(format!("{pkl_name}: {e}")))?;

    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut budget = file_len.saturating_mul(MAX_OUTPUT_PER_FILE_BYTE);
    let mut tensors = Vec::with_capacity(state.tensors.len());
    for (key, index) in state.tensors {
        let view = &pickled.tensors[index];
        let storage = &pickled.storages[view.storage];
        let in_key = |m: String| bad(format!("tensor {key}: {m}"));
        let want = storage
            .numel
            .checked_mul(storage.dtype.size())
            .ok_or_else(|| in_key("storage size overflows".into()))?;
        if !storages.contains_key(&storage.key) {
            let name = format!("{root}/data/{}", storage.key);
            let bytes = read_entry(&mut zip, &name, want as u64).map_err(in_key)?;
            storages.insert(storage.key.clone(), bytes);
        }
        let bytes = &storages[&storage.key];
        if bytes.len() != want {
            return Err(in_key(format!(
                "storage {} holds {} bytes, but its {} {} elements need {want}",
                storage.key,
                bytes.len(),
                storage.numel,
                storage.dtype
            )));
        }
        let data = gather(bytes, storage.dtype, view).map_err(in_key)?;
        budget = budget.checked_sub(data.len() as u64).ok_or_else(|| {
            bad("the tensors add up to more than 4 times the file size; refusing to replicate storages".into())
        })?;
        tensors.push((
            key,
            RawTensor {
                dtype: storage.dtype,
                shape: view.shape.clone(),
                data,
            },
        ));
    }
    Ok(TorchCheckpoint {
        tensors,
        skipped: state.skipped,
    })
}

/// The top-level directory holding `data.pkl` (torch names it after the file).
fn archive_root<R: Read + Seek>(zip: &ZipArchive<R>) -> std::result::Result<String, String> {
    let roots: Vec<&str> = zip
        .file_names()
        .filter_map(|n| n.strip_suffix("/data.pkl"))
        .filter(|root| !root.contains('/'))
        .collect();
    match roots.as_slice() {
        [root] => Ok(root.to_string()),
        [] => Err("no <dir>/data.pkl entry: not a PyTorch checkpoint".into()),
        _ => Err(format!("several data.pkl entries ({})", roots.join(", "))),
    }
}

/// The bytes of entry `name`, refusing entries larger than `limit`.
fn read_entry<R: Read + Seek>(
    zip: &mut ZipArchive<R>,
    name: &str,
    limit: u64,
) -> std::result::Result<Vec<u8>, String> {
    read_optional(zip, name, limit)?.ok_or_else(|| format!("the archive has no entry {name}"))
}

fn read_optional<R: Read + Seek>(
    zip: &mut ZipArchive<R>,
    name: &str,
    limit: u64,
) -> std::result::Result<Option<Vec<u8>>, String> {
    let entry = match zip.by_name(name) {
        Ok(e) => e,
        Err(ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(format!("{name}: {e}")),
    };
    if entry.size() > limit {
        return Err(format!(
            "{name} is {} bytes, more than the {limit} expected",
            entry.size()
        ));
    }
    let mut bytes = Vec::with_capacity(entry.size() as usize);
    entry
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{name}: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!("{name} is longer than the {limit} bytes expected"));
    }
    Ok(Some(bytes))
}

/// The elements of `view` in row-major order, copied out of `storage`.
fn gather(
    storage: &[u8],
    dtype: WeightDtype,
    view: &TensorRef,
) -> std::result::Result<Vec<u8>, String> {
    let size = dtype.size();
    let elements = storage.len() / size;
    let n = view
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("shape {:?} is too large", view.shape))?;
    if n == 0 {
        return Ok(Vec::new());
    }
    if n > elements {
        return Err(format!(
            "view of {n} elements over a storage of {elements}: broadcast views are not supported"
        ));
    }
    // A size-1 dimension never moves, whatever its stride says.
    let stride: Vec<usize> = view
        .shape
        .iter()
        .zip(&view.stride)
        .map(|(&d, &s)| if d == 1 { 0 } else { s })
        .collect();
    let last = view
        .shape
        .iter()
        .zip(&stride)
        .try_fold(view.offset, |acc, (&d, &s)| {
            (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x))
        });
    match last {
        Some(last) if last < elements => {}
        _ => {
            return Err(format!(
                "view (offset {}, shape {:?}, stride {:?}) reaches past the {elements} elements of its storage",
                view.offset, view.shape, view.stride
            ))
        }
    }
    let start = view.offset * size;
    if stride == contiguous_strides(&view.shape) {
        return Ok(storage[start..start + n * size].to_vec());
    }
    let mut out = Vec::with_capacity(n * size);
    let mut index = vec![0usize; view.shape.len()];
    let mut at = view.offset;
    for _ in 0..n {
        out.extend_from_slice(&storage[at * size..(at + 1) * size]);
        // Odometer step: the last dimension moves fastest.
        for d in (0..index.len()).rev() {
            index[d] += 1;
            at += stride[d];
            if index[d] < view.shape[d] {
                break;
            }
            at -= stride[d] * view.shape[d];
            index[d] = 0;
        }
    }
    Ok(out)
}

/// Row-major strides with size-1 dimensions at 0, as `gather` normalizes them.
fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut step = 1;
    for d in (0..shape.len()).rev() {
        if shape[d] != 1 {
            strides[d] = step;
        }
        step *= shape[d];
    }
    strides
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(offset: usize, shape: &[usize], stride: &[usize]) -> TensorRef {
        TensorRef {
            storage: 0,
            offset,
            shape: shape.to_vec(),
            stride: stride.to_vec(),
        }
    }

    fn gather_u8(storage: &[u8], v: &TensorRef) -> std::result::Result<Vec<u8>, String> {
        // F16 elements are two bytes: encode element i as [i, 0] and read back the firsts.
        let wide: Vec<u8> = storage.iter().flat_map(|&b| [b, 0]).collect();
        gather(&wide, WeightDtype::F16, v).map(|o| o.iter().step_by(2).copied().collect())
    }

    #[test]
    fn strided_views_come_out_row_major() {
        let s: Vec<u8> = (0..12).collect();
        // A transposed 3x4 matrix: shape [4, 3], strides [1, 4].
        assert_eq!(
            gather_u8(&s, &view(0, &[4, 3], &[1, 4])).unwrap(),
            [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
        );
        // Offset and a column slice.
        assert_eq!(
            gather_u8(&s, &view(1, &[3, 2], &[4, 1])).unwrap(),
            [1, 2, 5, 6, 9, 10]
        );
        // Contiguous with a size-1 dimension of any stride.
        assert_eq!(
            gather_u8(&s, &view(2, &[1, 3], &[99, 1])).unwrap(),
            [2, 3, 4]
        );
        assert_eq!(gather_u8(&s, &view(5, &[], &[])).unwrap(), [5]);
        assert!(gather_u8(&s, &view(0, &[0, 3], &[3, 1]))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn views_outside_their_storage_are_refused() {
        let s: Vec<u8> = (0..12).collect();
        for v in [
            view(1, &[3, 4], &[4, 1]),
            view(0, &[2, 2], &[usize::MAX / 2, 1]),
            view(0, &[24], &[0]),
        ] {
            assert!(gather_u8(&s, &v).is_err(), "{v:?}");
        }
    }
}
