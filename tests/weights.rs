//! The weight-file layer: safetensors validation and round trips, the diffusers name map,
//! manifest checks, and the PyTorch zip converter on fixtures made by real `torch.save`
//! (tests/fixtures/weights/make_fixtures.py). Bad input must give errors, never panics.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use ultrapixel::models::Checkpoint;
use ultrapixel::tensor::HostTensor;
use ultrapixel::weights::{
    check_manifest, check_manifest_allowing, convert, open_checkpoint, write_safetensors,
    CheckpointSet, OriginalNames, RawTensor, SafetensorsFile, TensorIndex, WeightDtype,
};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipArchive, ZipWriter};

/// A scratch directory removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("upx-weights-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    /// Every file in the directory, sorted.
    fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/weights")
        .join(name)
}

fn ramp(n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (i as f32 - (n / 2) as f32) * scale)
        .collect()
}

fn host(shape: &[usize], scale: f32) -> HostTensor {
    HostTensor::new(shape.to_vec(), ramp(shape.iter().product(), scale))
}

/// Writes `tensors` (all f32) as a safetensors file.
fn write_f32(path: &Path, tensors: &[(&str, HostTensor)]) {
    let raw: BTreeMap<String, RawTensor> = tensors
        .iter()
        .map(|(k, t)| (k.to_string(), RawTensor::from_host(t, WeightDtype::F32)))
        .collect();
    write_safetensors(path, &raw, &BTreeMap::new()).unwrap();
}

/// A safetensors file from a raw header and data section.
fn raw_file(path: &Path, header: &str, data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    fs::write(path, bytes).unwrap();
}

fn open_err(path: &Path) -> String {
    match SafetensorsFile::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn malformed_safetensors_files_are_refused_naming_file_and_key() {
    let dir = Scratch::new("bad-st");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "0 bytes long, too short"),
        ("short", vec![1, 2, 3, 4, 5], "5 bytes long, too short"),
        (
            "huge-header",
            [&u64::MAX.to_le_bytes()[..], b"{}"].concat(),
            "runs past the end of the file",
        ),
        (
            "latin1",
            [&3u64.to_le_bytes()[..], b"{\xe9}"].concat(),
            "header is not valid UTF-8",
        ),
        (
            "not-json",
            [&5u64.to_le_bytes()[..], b"{\"a\":"].concat(),
            "header is not valid JSON",
        ),
    ];
    for (name, bytes, want) in cases {
        let path = dir.path(name);
        fs::write(&path, bytes).unwrap();
        let err = open_err(&path);
        assert!(err.contains(want) && err.contains(name), "{name}: {err}");
    }
    let entry_cases = [
        (
            "dtype",
            r#"{"w":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}}"#,
            "tensor w: unknown dtype \"F33\"",
        ),
        (
            "outside",
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            "tensor w: data_offsets [0, 16] lie outside the data section (8 bytes)",
        ),
        (
            "overlap",
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[2],"data_offsets":[4,8]}}"#,
            "tensors a and b overlap",
        ),
        (
            "size",
            r#"{"w":{"dtype":"BF16","shape":[3],"data_offsets":[0,8]}}"#,
            "tensor w: shape [3] of BF16 needs 6 bytes but data_offsets [0, 8] span 8",
        ),
        (
            "shape",
            r#"{"w":{"dtype":"F32","shape":"2","data_offsets":[0,8]}}"#,
            "tensor w: entry must have a shape",
        ),
    ];
    for (name, header, want) in entry_cases {
        let path = dir.path(name);
        raw_file(&path, header, &[0; 8]);
        let err = open_err(&path);
        assert!(err.contains(want) && err.contains(name), "{name}: {err}");
    }
    let missing = dir.path("nope.safetensors");
    assert!(open_err(&missing).contains("nope.safetensors"));
}

#[test]
fn a_torch_zip_opened_as_safetensors_says_how_to_convert_it() {
    let path = fixture("tiny_t2i.safetensors");
    let err = open_err(&path);
    let p = path.display();
    assert!(
        err.contains(&format!(
            "{p} is a PyTorch pickle checkpoint, not safetensors: convert it with `ultrapixel convert {p} <out>.safetensors`"
        )),
        "{err}"
    );
}

#[test]
fn safetensors_round_trip_every_dtype() {
    let dir = Scratch::new("round-trip");
    let path = dir.path("w.safetensors");
    let t = host(&[3, 5], 0.3);
    let mut raw = BTreeMap::new();
    for dtype in WeightDtype::ALL {
        raw.insert(format!("w.{dtype}"), RawTensor::from_host(&t, dtype));
    }
    raw.insert(
        "scalar".into(),
        RawTensor::from_host(&HostTensor::new(vec![], vec![7.5]), WeightDtype::BF16),
    );
    raw.insert(
        "empty".into(),
        RawTensor::from_host(&HostTensor::zeros(&[0, 4]), WeightDtype::F16),
    );
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&path, &raw, &meta).unwrap();

    let f = SafetensorsFile::open(&path).unwrap();
    assert_eq!(f.metadata(), &meta);
    assert_eq!(f.keys().count(), raw.len());
    for (key, want) in &raw {
        let got = f.tensor(key).unwrap();
        assert_eq!(got, want.to_host(), "{key}");
        let bytes = f.bytes(key).unwrap();
        assert_eq!(bytes.data, &want.data[..], "{key}");
        assert_eq!(bytes.dtype, want.dtype.to_safetensors(), "{key}");
    }
    // bf16 and f16 values are the f32 ones rounded, f32 is exact.
    assert_eq!(f.tensor("w.F32").unwrap(), t);
    let bf = f.tensor("w.BF16").unwrap();
    assert!(bf
        .data
        .iter()
        .zip(&t.data)
        .all(|(a, b)| (a - b).abs() <= b.abs() / 128.0));
    // The `safetensors` crate reads what we wrote.
    let bytes = fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("w.F16").unwrap().data(), &raw["w.F16"].data[..]);
    assert!(f
        .tensor("missing")
        .unwrap_err()
        .to_string()
        .contains("missing tensor missing"));
}

#[test]
fn non_float_tensors_open_but_are_not_weights() {
    let dir = Scratch::new("int");
    let path = dir.path("counts.safetensors");
    raw_file(
        &path,
        r#"{"bn.num_batches_tracked":{"dtype":"I64","shape":[],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    let f = SafetensorsFile::open(&path).unwrap();
    let err = f.tensor("bn.num_batches_tracked").unwrap_err().to_string();
    assert!(
        err.contains("bn.num_batches_tracked has dtype I64"),
        "{err}"
    );
}

#[test]
fn writing_is_atomic() {
    let dir = Scratch::new("atomic");
    let path = dir.path("out.safetensors");
    write_f32(&path, &[("old", host(&[2], 1.0))]);
    let bad = BTreeMap::from([(
        "w".to_string(),
        RawTensor {
            dtype: WeightDtype::F32,
            shape: vec![3],
            data: vec![0; 8],
        },
    )]);
    let err = write_safetensors(&path, &bad, &BTreeMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tensor w: shape [3] of F32 needs 12 bytes, got 8"),
        "{err}"
    );
    // The old file is intact and nothing else was left behind.
    assert_eq!(dir.files(), ["out.safetensors"]);
    assert!(SafetensorsFile::open(&path).unwrap().tensor("old").is_ok());
    let nowhere = dir.path("no-such-dir/out.safetensors");
    assert!(write_safetensors(&nowhere, &BTreeMap::new(), &BTreeMap::new()).is_err());
    assert_eq!(dir.files(), ["out.safetensors"]);
}

#[test]
fn mutated_headers_never_panic() {
    let dir = Scratch::new("mutate-st");
    let good = dir.path("good.safetensors");
    write_f32(&good, &[("a", host(&[2, 3], 1.0)), ("b", host(&[4], 0.5))]);
    let bytes = fs::read(&good).unwrap();
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let path = dir.path("mutant.safetensors");
    for i in 0..header_end {
        for v in [0u8, b'9', b'"', 0xff] {
            let mut m = bytes.clone();
            m[i] = v;
            fs::write(&path, &m).unwrap();
            if let Ok(f) = SafetensorsFile::open(&path) {
                for k in f.stored_keys() {
                    let _ = f.tensor(&k);
                }
            }
        }
    }
}

/// Stage-B-like tensors under original names.
fn original_checkpoint() -> Vec<(&'static str, HostTensor)> {
    vec![
        (
            "down_blocks.2.2.attention.attn.in_proj_weight",
            host(&[6, 2], 1.0),
        ),
        (
            "down_blocks.2.2.attention.attn.in_proj_bias",
            host(&[6], 0.5),
        ),
        (
            "down_blocks.2.2.attention.attn.out_proj.weight",
            host(&[2, 2], 0.25),
        ),
        (
            "down_blocks.2.2.attention.attn.out_proj.bias",
            host(&[2], 2.0),
        ),
        ("down_blocks.2.2.kv_mapper.1.weight", host(&[2, 3], 3.0)),
        ("clip_mapper.weight", host(&[4, 3], 0.75)),
    ]
}

fn rows(t: &HostTensor, from: usize, to: usize) -> HostTensor {
    let width: usize = t.shape[1..].iter().product();
    let mut shape = t.shape.clone();
    shape[0] = to - from;
    HostTensor::new(shape, t.data[from * width..to * width].to_vec())
}

/// The same tensors under diffusers' names.
fn diffusers_checkpoint() -> Vec<(String, HostTensor)> {
    let orig: HashMap<&str, HostTensor> = original_checkpoint().into_iter().collect();
    let block = "down_blocks.2.2.attention";
    let mut out = Vec::new();
    for (i, p) in ["to_q", "to_k", "to_v"].iter().enumerate() {
        let w = &orig["down_blocks.2.2.attention.attn.in_proj_weight"];
        let b = &orig["down_blocks.2.2.attention.attn.in_proj_bias"];
        out.push((format!("{block}.{p}.weight"), rows(w, 2 * i, 2 * i + 2)));
        out.push((format!("{block}.{p}.bias"), rows(b, 2 * i, 2 * i + 2)));
    }
    for p in ["weight", "bias"] {
        let t = orig[format!("{block}.attn.out_proj.{p}").as_str()].clone();
        out.push((format!("{block}.to_out.0.{p}"), t));
    }
    out.push((
        "down_blocks.2.2.kv_mapper.1.weight".into(),
        orig["down_blocks.2.2.kv_mapper.1.weight"].clone(),
    ));
    out.push((
        "clip_txt_pooled_mapper.weight".into(),
        orig["clip_mapper.weight"].clone(),
    ));
    out
}

fn manifest() -> Vec<(String, Vec<usize>)> {
    original_checkpoint()
        .into_iter()
        .map(|(k, t)| (k.to_string(), t.shape))
        .collect()
}

#[test]
fn diffusers_names_serve_the_original_keys() {
    let dir = Scratch::new("diffusers");
    let orig_path = dir.path("original.safetensors");
    let diff_path = dir.path("diffusers.safetensors");
    write_f32(&orig_path, &original_checkpoint());
    let diffusers = diffusers_checkpoint();
    let diff_refs: Vec<(&str, HostTensor)> = diffusers
        .iter()
        .map(|(k, t)| (k.as_str(), t.clone()))
        .collect();
    write_f32(&diff_path, &diff_refs);

    let original = OriginalNames::new(SafetensorsFile::open(&orig_path).unwrap());
    let from_diffusers = open_checkpoint(&[&diff_path]).unwrap();
    for (key, want) in original_checkpoint() {
        assert_eq!(original.tensor(key).unwrap(), want, "{key} (original)");
        assert_eq!(
            from_diffusers.tensor(key).unwrap(),
            want,
            "{key} (diffusers)"
        );
    }
    let fused = from_diffusers
        .lookup("down_blocks.2.2.attention.attn.in_proj_weight")
        .unwrap()
        .unwrap();
    assert_eq!(fused.shape, [6, 2]);
    assert_eq!(fused.stored.len(), 3);
    check_manifest(&original, &manifest()).unwrap();
    check_manifest(&from_diffusers, &manifest()).unwrap();
    // Stage C asks for clip_txt_pooled_mapper itself, which is stored under that name.
    let stage_c = vec![("clip_txt_pooled_mapper.weight".to_string(), vec![4, 3])];
    check_manifest_allowing(&from_diffusers, &stage_c, &["down_blocks."]).unwrap();
}

#[test]
fn diffusers_parts_that_do_not_fit_are_reported() {
    let mut ckpt: HashMap<String, HostTensor> = diffusers_checkpoint().into_iter().collect();
    ckpt.insert(
        "down_blocks.2.2.attention.to_k.weight".into(),
        host(&[2, 3], 1.0),
    );
    let names = OriginalNames::new(ckpt);
    let key = "down_blocks.2.2.attention.attn.in_proj_weight";
    let err = names.tensor(key).unwrap_err().to_string();
    assert!(err.contains("cannot concatenate down_blocks.2.2.attention.to_q.weight [2, 2] and down_blocks.2.2.attention.to_k.weight [2, 3]"), "{err}");
    let err = check_manifest(&names, &manifest()).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "wrong shape: {key}: weights: {key}: cannot concatenate"
        )),
        "{err}"
    );
}

#[test]
fn manifest_errors_list_every_problem_with_keys_and_shapes() {
    let mut ckpt: HashMap<String, HostTensor> = original_checkpoint()
        .into_iter()
        .map(|(k, t)| (k.to_string(), t))
        .collect();
    ckpt.remove("clip_mapper.weight");
    ckpt.insert(
        "down_blocks.2.2.kv_mapper.1.weight".into(),
        host(&[3, 2], 1.0),
    );
    ckpt.insert("stray.weight".into(), host(&[7], 1.0));
    let err = check_manifest(&ckpt, &manifest()).unwrap_err().to_string();
    for want in [
        "in-memory checkpoint does not match the model: 1 missing, 1 with the wrong shape, 1 unexpected",
        "missing: clip_mapper.weight [4, 3]",
        "wrong shape: down_blocks.2.2.kv_mapper.1.weight: expected [2, 3], found [3, 2]",
        "unexpected: stray.weight [7]",
    ] {
        assert!(err.contains(want), "{want}\n{err}");
    }
    check_manifest_allowing(&ckpt, &manifest(), &["stray."]).unwrap_err();
    ckpt.insert("clip_mapper.weight".into(), host(&[4, 3], 1.0));
    ckpt.insert(
        "down_blocks.2.2.kv_mapper.1.weight".into(),
        host(&[2, 3], 1.0),
    );
    check_manifest_allowing(&ckpt, &manifest(), &["stray."]).unwrap();

    // Long lists are capped.
    let many: Vec<(String, Vec<usize>)> = (0..45).map(|i| (format!("k{i:02}"), vec![i])).collect();
    let err = check_manifest(&HashMap::new(), &many)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("45 missing") && err.contains("missing: k19 [19]"),
        "{err}"
    );
    assert!(
        !err.contains("k20") && err.contains("... and 25 more missing"),
        "{err}"
    );
}

#[test]
fn checkpoint_sets_join_files_and_shards() {
    let dir = Scratch::new("sets");
    let a = dir.path("a.safetensors");
    let b = dir.path("b.safetensors");
    write_f32(&a, &[("x.weight", host(&[2], 1.0))]);
    write_f32(&b, &[("y.weight", host(&[3], 1.0))]);
    let set = CheckpointSet::open(&[&a, &b]).unwrap();
    assert_eq!(set.stored_keys(), ["x.weight", "y.weight"]);
    assert_eq!(set.tensor("y.weight").unwrap(), host(&[3], 1.0));
    assert!(set.origin().contains("a.safetensors + ") && set.origin().contains("b.safetensors"));

    let err = CheckpointSet::open(&[&a, &a]).err().unwrap().to_string();
    assert!(err.contains("tensor x.weight is in both"), "{err}");

    let index = dir.path("model.safetensors.index.json");
    let weight_map =
        r#"{"metadata":{},"weight_map":{"x.weight":"a.safetensors","y.weight":"b.safetensors"}}"#;
    fs::write(&index, weight_map).unwrap();
    let sharded = open_checkpoint(&[&index]).unwrap();
    assert_eq!(sharded.tensor("x.weight").unwrap(), host(&[2], 1.0));
    fs::write(&index, r#"{"weight_map":{"y.weight":"a.safetensors"}}"#).unwrap();
    let err = CheckpointSet::open(&[&index]).err().unwrap().to_string();
    assert!(
        err.contains("weight_map puts y.weight in a.safetensors"),
        "{err}"
    );
    fs::write(&index, r#"{"weights":{}}"#).unwrap();
    assert!(CheckpointSet::open(&[&index]).is_err());
}

/// The tensors `make_fixtures.py` recorded for `checkpoint`: key -> (dtype, shape, values).
fn expected(checkpoint: &str) -> BTreeMap<String, (String, Vec<usize>, Vec<f32>)> {
    let text = fs::read_to_string(fixture("expected.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json[checkpoint]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let shape = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let values = v["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            (
                k.clone(),
                (v["dtype"].as_str().unwrap().to_string(), shape, values),
            )
        })
        .collect()
}

fn assert_converted_matches(out: &Path, checkpoint: &str) {
    let f = SafetensorsFile::open(out).unwrap();
    let want = expected(checkpoint);
    assert_eq!(f.stored_keys(), want.keys().cloned().collect::<Vec<_>>());
    for (key, (dtype, shape, values)) in &want {
        let raw = f.bytes(key).unwrap();
        assert_eq!(format!("{:?}", raw.dtype), *dtype, "{key}");
        let t = f.tensor(key).unwrap();
        assert_eq!(&t.shape, shape, "{key}");
        assert_eq!(&t.data, values, "{key}");
    }
}

#[test]
fn converter_reproduces_the_torch_fixture() {
    let dir = Scratch::new("convert");
    let out = dir.path("ultrapixel_t2i.converted.safetensors");
    let report = convert(&fixture("tiny_t2i.safetensors"), &out).unwrap();
    assert_converted_matches(&out, "tiny_t2i.safetensors");
    assert_eq!(report.tensors, 23);
    assert_eq!(report.renamed, 23);
    assert_eq!(report.dtypes[&WeightDtype::BF16], 5);
    assert_eq!(report.dtypes[&WeightDtype::F16], 8);
    assert_eq!(report.dtypes[&WeightDtype::F32], 10);
    assert!(report.skipped.is_empty());
    assert!(
        report
            .to_string()
            .starts_with("23 tensors (10 F32, 8 F16, 5 BF16)"),
        "{report}"
    );
    let f = SafetensorsFile::open(&out).unwrap();
    assert_eq!(f.metadata()["format"], "pt");
    assert_eq!(dir.files(), ["ultrapixel_t2i.converted.safetensors"]);
}

#[test]
fn converter_finds_nested_state_dicts_and_parameters() {
    let dir = Scratch::new("nested");
    let out = dir.path("nested.safetensors");
    let report = convert(&fixture("nested.pt"), &out).unwrap();
    assert_eq!((report.tensors, report.renamed), (2, 0));
    assert_converted_matches(&out, "nested.pt");
}

#[test]
fn malicious_pickle_is_refused_and_nothing_is_written() {
    let dir = Scratch::new("malicious");
    let out = dir.path("out.safetensors");
    let err = convert(&fixture("malicious.pt"), &out)
        .unwrap_err()
        .to_string();
    assert!(err.contains("refusing pickle global os.system"), "{err}");
    assert!(err.contains("malicious.pt"), "{err}");
    assert!(dir.files().is_empty(), "{:?}", dir.files());
}

/// Zip entries: name and contents.
type Entries = Vec<(String, Vec<u8>)>;

/// A change to one zip entry: its new contents, or None to drop it.
type Edit = dyn Fn(&str, &[u8]) -> Option<Vec<u8>>;

/// The entries of a zip fixture.
fn zip_entries(path: &Path) -> Entries {
    let mut z = ZipArchive::new(fs::File::open(path).unwrap()).unwrap();
    (0..z.len())
        .map(|i| {
            let mut e = z.by_index(i).unwrap();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            (e.name().to_string(), data)
        })
        .collect()
}

fn write_zip(path: &Path, entries: &[(String, Vec<u8>)]) {
    let mut z = ZipWriter::new(fs::File::create(path).unwrap());
    let opts = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
    for (name, data) in entries {
        z.start_file(name.as_str(), opts).unwrap();
        z.write_all(data).unwrap();
    }
    z.finish().unwrap();
}

fn convert_err(input: &Path, dir: &Scratch) -> String {
    let out = dir.path("out.safetensors");
    let err = convert(input, &out).unwrap_err().to_string();
    assert!(!out.exists());
    err
}

#[test]
fn broken_archives_are_errors() {
    let dir = Scratch::new("broken-zip");
    let entries = zip_entries(&fixture("nested.pt"));
    let edited = |f: &Edit| -> Entries {
        entries
            .iter()
            .filter_map(|(n, d)| f(n, d).map(|d| (n.clone(), d)))
            .collect()
    };
    let cases: Vec<(&str, Entries, &str)> = vec![
        (
            "no-pickle",
            edited(&|n, d| (!n.ends_with("data.pkl")).then(|| d.to_vec())),
            "no <dir>/data.pkl entry",
        ),
        (
            "no-storage",
            edited(&|n, d| (!n.contains("/data/")).then(|| d.to_vec())),
            "tensor layer.weight: the archive has no entry nested/data/0",
        ),
        (
            "short-storage",
            edited(&|n, d| {
                Some(if n.contains("/data/") {
                    d[..8].to_vec()
                } else {
                    d.to_vec()
                })
            }),
            "storage 0 holds 8 bytes, but its 6 F32 elements need 24",
        ),
        (
            "long-storage",
            edited(&|n, d| {
                Some(if n.contains("/data/") {
                    [d, &[0; 4][..]].concat()
                } else {
                    d.to_vec()
                })
            }),
            "more than the 24 expected",
        ),
        (
            "big-endian",
            edited(&|n, d| {
                Some(if n.ends_with("byteorder") {
                    b"big".to_vec()
                } else {
                    d.to_vec()
                })
            }),
            "big-endian",
        ),
    ];
    for (name, entries, want) in cases {
        let path = dir.path(&format!("{name}.pt"));
        write_zip(&path, &entries);
        let err = convert_err(&path, &dir);
        assert!(err.contains(want) && err.contains(name), "{name}: {err}");
    }
    let not_zip = dir.path("plain.safetensors");
    write_f32(&not_zip, &[("a", host(&[1], 1.0))]);
    assert!(convert_err(&not_zip, &dir).contains("not a PyTorch zip checkpoint"));
    let truncated = dir.path("truncated.pt");
    let bytes = fs::read(fixture("tiny_t2i.safetensors")).unwrap();
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert!(convert_err(&truncated, &dir).contains("truncated.pt"));
}

#[test]
fn mutated_pickles_never_panic() {
    let dir = Scratch::new("mutate-pkl");
    let entries = zip_entries(&fixture("nested.pt"));
    let pkl = entries
        .iter()
        .position(|(n, _)| n.ends_with("data.pkl"))
        .unwrap();
    let path = dir.path("mutant.pt");
    let out = dir.path("mutant.safetensors");
    let len = entries[pkl].1.len();
    for i in 0..len {
        for v in [0u8, 0x28, 0x4b, 0x71, 0xff] {
            let mut m = entries.clone();
            m[pkl].1[i] = v;
            write_zip(&path, &m);
            let _ = convert(&path, &out);
        }
        // Truncated pickles too.
        let mut m = entries.clone();
        m[pkl].1.truncate(i);
        write_zip(&path, &m);
        assert!(convert(&path, &out).is_err());
    }
}

#[test]
fn the_convert_command_converts_and_refuses_without_leaving_files() {
    let dir = Scratch::new("convert-cli");
    let bin = env!("CARGO_BIN_EXE_ultrapixel");
    let out = dir.path("up.safetensors");
    let ok = std::process::Command::new(bin)
        .arg("convert")
        .arg(fixture("tiny_t2i.safetensors"))
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(SafetensorsFile::open(&out).unwrap().keys().count() > 0);

    let refused = dir.path("bad.safetensors");
    let bad = std::process::Command::new(bin)
        .arg("convert")
        .arg(fixture("malicious.pt"))
        .arg(&refused)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("os.system"));
    assert!(!refused.exists());
    assert_eq!(
        dir.files(),
        ["up.safetensors"],
        "only the good output is left"
    );
}
