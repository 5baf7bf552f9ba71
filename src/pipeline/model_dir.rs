//! The model files (docs/ARCHITECTURE.md §9), where they come from on the hub, and
//! where this machine keeps them: the Hugging Face hub cache by default, or a plain directory
//! given with `--model-dir`.

use crate::atomic_file::write_atomic;
use crate::hub::{lock_file, verify_file, Hub, HubOptions, RemoteFile, RepoFile};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Stable Cascade stages, text encoder and tokenizer (docs/MODEL.md §1.1: same files as
/// StableWurst).
pub const STABLE_CASCADE_REPO: &str = "stabilityai/stable-cascade";
/// UltraPixel's additions, as the official README links them (`2kpr/UltraPixel` is a mirror).
pub const ULTRAPIXEL_REPO: &str = "roubaofeipi/UltraPixel";
pub const REVISION: &str = "main";

/// One file of a model directory and its source on the hub.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelFile {
    /// Path inside the model directory; also the path inside its repository.
    pub name: &'static str,
    pub repo: &'static str,
}

impl ModelFile {
    pub fn repo_file(&self) -> RepoFile<'static> {
        RepoFile {
            repo: self.repo,
            revision: REVISION,
            path: self.name,
        }
    }
}

const fn sc(name: &'static str) -> ModelFile {
    ModelFile {
        name,
        repo: STABLE_CASCADE_REPO,
    }
}

/// Every file text-to-image needs.
pub const MODEL_FILES: &[ModelFile] = &[
    sc("stage_c_bf16.safetensors"),
    ModelFile {
        name: "ultrapixel_t2i.safetensors",
        repo: ULTRAPIXEL_REPO,
    },
    sc("stage_b_lite_bf16.safetensors"),
    sc("stage_a.safetensors"),
    sc("text_encoder/config.json"),
    sc("text_encoder/model.safetensors"),
    sc("tokenizer/vocab.json"),
    sc("tokenizer/merges.txt"),
    sc("tokenizer/special_tokens_map.json"),
    sc("tokenizer/tokenizer_config.json"),
];

/// Files used only on request (`generate --preview`): resolved when present, downloaded with
/// the others where the hub has them, never required.
pub const OPTIONAL_FILES: &[ModelFile] = &[sc("previewer.safetensors")];

/// The ControlNets (`generate --control`): resolved when present, downloaded only on request
/// (`download --control`, or `generate --control` from the hub cache); the
/// super-resolution ControlNet also needs the EfficientNet encoder.
pub const CONTROL_FILES: &[ModelFile] = &[
    sc("controlnet/canny.safetensors"),
    sc("controlnet/super_resolution.safetensors"),
    sc("controlnet/inpainting.safetensors"),
    sc("effnet_encoder.safetensors"),
];

/// A file the model directory may lack.
fn is_optional(f: &ModelFile) -> bool {
    OPTIONAL_FILES.contains(f) || CONTROL_FILES.contains(f)
}

/// What `download --model-dir` records next to the files: their hub checksums, so a later
/// download skips files already current and images can name the weights that made them.
pub const RECORD_FILE: &str = "hub-files.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    repo: String,
    commit: String,
    etag: String,
    size: Option<u64>,
}

type Records = BTreeMap<String, Record>;

/// The lock a download into a model directory holds there.
const DIR_LOCK: &str = ".download.lock";

/// The model files found on this machine.
#[derive(Clone, Debug)]
pub struct ModelDir {
    /// Where the files are, in words (for messages).
    pub location: String,
    files: BTreeMap<&'static str, (PathBuf, Option<String>)>,
}

impl ModelDir {
    /// `dir` when given, else the hub cache; an error lists every missing file and the
    /// command that fetches them.
    pub fn resolve(dir: Option<&Path>, hub: &HubOptions) -> Result<ModelDir> {
        match dir {
            Some(dir) => Self::from_dir(dir),
            None => Self::from_cache(&Hub::new(hub.clone())),
        }
    }

    fn from_dir(dir: &Path) -> Result<ModelDir> {
        let records = read_records(dir);
        let location = dir.display().to_string();
        let fetch = format!("ultrapixel download --model-dir {location}");
        Self::collect(location, &fetch, |f| {
            let path = dir.join(f.name);
            if !path.is_file() {
                return None;
            }
            let sha = records.get(f.name).map(|r| r.etag.clone());
            Some((path, sha.filter(|e| e.len() == 64)))
        })
    }

    fn from_cache(hub: &Hub) -> Result<ModelDir> {
        let location = format!(
            "the Hugging Face cache ({})",
            hub.options().cache_dir.display()
        );
        Self::collect(location, "ultrapixel download", |f| {
            let c = hub.cached(&f.repo_file())?;
            let sha = c.sha256().map(str::to_string);
            Some((c.path, sha))
        })
    }

    /// Every model, optional and control file that `find` locates in `location` (its path
    /// and sha256 when known); an error, naming `fetch`, lists the required ones it did not.
    fn collect(
        location: String,
        fetch: &str,
        find: impl Fn(&ModelFile) -> Option<(PathBuf, Option<String>)>,
    ) -> Result<ModelDir> {
        let mut files = BTreeMap::new();
        let mut missing = Vec::new();
        for f in MODEL_FILES
            .iter()
            .chain(OPTIONAL_FILES)
            .chain(CONTROL_FILES)
        {
            match find(f) {
                Some(found) => {
                    files.insert(f.name, found);
                }
                None if is_optional(f) => {}
                None => missing.push(f.name),
            }
        }
        if missing.is_empty() {
            return Ok(ModelDir { location, files });
        }
        Err(Error::InvalidArgument(format!(
            "model files missing in {location}: {}; fetch them with `{fetch}` (or pass \
             --model-dir DIR with the files in it)",
            missing.join(", ")
        )))
    }

    /// The path of an [`OPTIONAL_FILES`] or [`CONTROL_FILES`] file, if this directory has it.
    pub fn optional(&self, name: &str) -> Option<&Path> {
        self.files.get(name).map(|(p, _)| p.as_path())
    }

    /// The path of a file of [`MODEL_FILES`], e.g. `"stage_c_bf16.safetensors"` or
    /// `"text_encoder/config.json"`.
    pub fn path(&self, name: &str) -> Result<&Path> {
        self.files
            .get(name)
            .map(|(p, _)| p.as_path())
            .ok_or_else(|| Error::InvalidArgument(format!("`{name}` is not a model file")))
    }

    /// File name → sha256 of the files whose checksum is known, optional ones left out (for
    /// image metadata: the weights that make an image).
    pub fn hashes(&self) -> BTreeMap<String, String> {
        self.files
            .iter()
            .filter(|(name, _)| !OPTIONAL_FILES.iter().any(|f| f.name == **name))
            .filter(|(name, _)| !CONTROL_FILES.iter().any(|f| f.name == **name))
            .filter_map(|(name, (_, sha))| Some((name.to_string(), sha.clone()?)))
            .collect()
    }
}

/// What `download` did with one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Downloaded {
    pub name: &'static str,
    pub path: PathBuf,
    /// False when the current version was already there.
    pub fetched: bool,
}

/// Fetches every model file into the hub cache, or into `dir` as plain files, calling
/// `report` after each, then the optional files the hub has (one that cannot be fetched is
/// left out: only `--preview` needs it, and it says how to get it); then checks the result
/// resolves. In the cache each blob is written under its lock (`Hub::fetch`); into `dir`, one
/// download at a time holds `dir/.download.lock` (a second one waits, then finds the files
/// current).
pub fn download(
    hub: &Hub,
    dir: Option<&Path>,
    mut report: impl FnMut(&Downloaded),
) -> Result<ModelDir> {
    let _lock = dir_lock(hub, dir, "the model files")?;
    let fetch = |f: &ModelFile| fetch_file(hub, dir, f);
    for f in MODEL_FILES {
        report(&fetch(f)?);
    }
    for f in OPTIONAL_FILES {
        if let Ok(done) = fetch(f) {
            report(&done);
        }
    }
    ModelDir::resolve(dir, hub.options())
}

/// Fetches the ControlNet `name` (a [`CONTROL_FILES`] entry) like [`download`] fetches the
/// model files, into the hub cache or `dir`.
pub fn download_control(hub: &Hub, dir: Option<&Path>, name: &str) -> Result<Downloaded> {
    let f = CONTROL_FILES
        .iter()
        .find(|f| f.name == name)
        .ok_or_else(|| Error::InvalidArgument(format!("`{name}` is not a ControlNet file")))?;
    let _lock = dir_lock(hub, dir, f.name)?;
    fetch_file(hub, dir, f)
}

/// The lock of a download of `what` into a plain directory (none into the hub cache, whose
/// blobs have their own, or offline).
fn dir_lock(hub: &Hub, dir: Option<&Path>, what: &str) -> Result<Option<std::fs::File>> {
    match dir {
        Some(dir) if !hub.options().offline => {
            let what = format!("{what} into {}", dir.display());
            lock_file(&dir.join(DIR_LOCK), &what, hub.options().progress)
        }
        _ => Ok(None),
    }
}

/// One file into the hub cache, or into `dir` as a plain file.
fn fetch_file(hub: &Hub, dir: Option<&Path>, f: &ModelFile) -> Result<Downloaded> {
    match dir {
        Some(dir) => download_into(hub, dir, f),
        None => hub.fetch(&f.repo_file()).map(|c| Downloaded {
            name: f.name,
            path: c.path,
            fetched: c.downloaded,
        }),
    }
}

/// One file into a plain directory; a file already there is kept when its recorded or
/// computed checksum matches the hub's.
fn download_into(hub: &Hub, dir: &Path, f: &ModelFile) -> Result<Downloaded> {
    let path = dir.join(f.name);
    let done = |fetched| Downloaded {
        name: f.name,
        path: path.clone(),
        fetched,
    };
    if hub.options().offline {
        return if path.is_file() {
            Ok(done(false))
        } else {
            Err(Error::InvalidArgument(format!(
                "{} is missing and HF_HUB_OFFLINE is set: run `ultrapixel download --model-dir \
                 {}` with network access",
                path.display(),
                dir.display()
            )))
        };
    }
    let repo_file = f.repo_file();
    let remote = hub.remote(&repo_file)?;
    let mut records = read_records(dir);
    // A file recorded at the hub's version is trusted when its size still matches (hashing
    // gigabytes on every run would be slow); any other file is verified.
    let size_ok = remote
        .size
        .is_none_or(|s| std::fs::metadata(&path).is_ok_and(|m| m.len() == s));
    let recorded = records.get(f.name).is_some_and(|r| r.etag == remote.etag) && size_ok;
    let current =
        path.is_file() && (recorded || verify_file(&path, &remote.etag, remote.size) == Ok(true));
    if !current {
        hub.download(&remote, &repo_file, &path)?;
    }
    records.insert(f.name.to_string(), record(f, &remote));
    write_records(dir, &records)?;
    Ok(done(!current))
}

fn record(f: &ModelFile, remote: &RemoteFile) -> Record {
    Record {
        repo: f.repo.to_string(),
        commit: remote.commit.clone(),
        etag: remote.etag.clone(),
        size: remote.size,
    }
}

/// The records of `dir`; none when absent or unreadable (every file then gets verified).
fn read_records(dir: &Path) -> Records {
    std::fs::read_to_string(dir.join(RECORD_FILE))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

fn write_records(dir: &Path, records: &Records) -> Result<()> {
    let json = serde_json::to_string_pretty(records).expect("records serialize");
    let path = dir.join(RECORD_FILE);
    write_atomic(&path, |out| {
        out.write_all(json.as_bytes())
            .map_err(|e| Error::io(&path, e))
    })
}
