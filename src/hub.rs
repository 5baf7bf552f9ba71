//! Hugging Face hub downloads into the standard hub cache
//! (`models--owner--name/{blobs,snapshots/<commit>,refs}`, shared with Python's
//! `huggingface_hub`), with resume of partial downloads, checksum verification, `HF_TOKEN`,
//! `HF_ENDPOINT` and offline mode (`HF_HUB_OFFLINE=1`).
//!
//! A small client on `ureq` rather than the `hf-hub` crate: that crate does not verify
//! checksums (a corrupted download lands in the cache, the failure users of the ComfyUI port
//! hit), has no offline mode, and reports a gated repository as a bare HTTP error.
//!
//! Protocol (as `huggingface_hub` does it): `HEAD {endpoint}/{repo}/resolve/{revision}/{path}`
//! without following redirects gives the commit (`X-Repo-Commit`), the checksum
//! (`X-Linked-Etag` for LFS files: their sha256; `ETag` otherwise: the git blob sha1) and the
//! size; the `GET` then follows the redirect to the storage host. Bytes go to
//! `blobs/<etag>.incomplete`, resumed with `Range`, and only a verified file is renamed to
//! `blobs/<etag>` and linked from `snapshots/<commit>/<path>`.

use crate::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Attempts per request before a transfer error is reported (a cut connection, 5xx, 429).
const MAX_ATTEMPTS: u32 = 3;
/// Relative redirects followed while resolving (renamed repositories).
const MAX_RELATIVE_REDIRECTS: usize = 5;

/// Where and how to reach the hub; [`HubOptions::from_env`] reads the variables
/// `huggingface_hub` reads.
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// `HF_ENDPOINT`, without a trailing slash.
    pub endpoint: String,
    /// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    pub cache_dir: PathBuf,
    /// `HF_TOKEN`, else the token file `huggingface-cli login` wrote.
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE`: only the cache is used.
    pub offline: bool,
    /// Progress bars on stderr (drawn only on a terminal).
    pub progress: bool,
}

impl HubOptions {
    pub fn from_env() -> HubOptions {
        Self::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// As [`HubOptions::from_env`], with `var` standing for the environment.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> HubOptions {
        let cache_home = var("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache")))
            .unwrap_or_else(|| PathBuf::from(".cache"));
        let hf_home = var("HF_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| cache_home.join("huggingface"));
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token_file = var("HF_TOKEN_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("token"));
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| std::fs::read_to_string(token_file).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            ["1", "on", "yes", "true"].contains(&v.trim().to_ascii_lowercase().as_str())
        });
        HubOptions {
            endpoint: var("HF_ENDPOINT")
                .map(|e| e.trim_end_matches('/').to_string())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            cache_dir,
            token,
            offline,
            progress: true,
        }
    }
}

/// One file of a model repository at a revision (branch, tag or commit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RepoFile<'a> {
    pub repo: &'a str,
    pub revision: &'a str,
    pub path: &'a str,
}

impl fmt::Display for RepoFile<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.repo, self.path)?;
        if self.revision != "main" {
            write!(f, " (revision {})", self.revision)?;
        }
        Ok(())
    }
}

/// What the hub says about a file before it is downloaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteFile {
    pub url: String,
    /// The commit the revision resolved to (40 hex digits).
    pub commit: String,
    /// sha256 (LFS files) or git blob sha1 (others), lower-case hex.
    pub etag: String,
    /// Size in bytes, when the hub says.
    pub size: Option<u64>,
}

/// A file in the hub cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedFile {
    /// `snapshots/<commit>/<path>`: a link to the blob.
    pub path: PathBuf,
    pub commit: String,
    /// The blob's name: the hub's checksum of the file (when the snapshot entry is a link).
    pub etag: Option<String>,
    /// True when this call downloaded it.
    pub downloaded: bool,
}

impl CachedFile {
    /// The file's sha256 when known (LFS files: their blob name).
    pub fn sha256(&self) -> Option<&str> {
        self.etag.as_deref().filter(|e| e.len() == 64)
    }
}

/// The checksum a hub ETag stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checksum {
    /// LFS files: sha256 of the content.
    Sha256,
    /// Files kept in git: sha1 of `blob <len>\0<content>`.
    GitBlobSha1,
}

impl Checksum {
    pub fn of_etag(etag: &str) -> Option<Checksum> {
        match etag.len() {
            64 => Some(Checksum::Sha256),
            40 => Some(Checksum::GitBlobSha1),
            _ => None,
        }
    }
}

/// A failure, and whether trying again may help.
enum Fail {
    Retry(String),
    Fatal(Error),
}

impl Fail {
    fn into_error(self, file: &RepoFile) -> Error {
        match self {
            Fail::Retry(why) => gave_up(file, why),
            Fail::Fatal(e) => e,
        }
    }
}

/// The error after the last attempt failed.
fn gave_up(file: &RepoFile, why: String) -> Error {
    hub_error(
        file,
        format!(
            "{why} (after {MAX_ATTEMPTS} attempts): run the command again to resume, or set \
             HF_HUB_OFFLINE=1 to use only cached files"
        ),
    )
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Fatal(e)
    }
}

type Attempt<T> = std::result::Result<T, Fail>;

pub struct Hub {
    opts: HubOptions,
    agent: ureq::Agent,
}

impl Hub {
    pub fn new(opts: HubOptions) -> Hub {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .user_agent(format!("ultrapixel/{}", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .build()
            .new_agent();
        Hub { opts, agent }
    }

    pub fn options(&self) -> &HubOptions {
        &self.opts
    }

    /// `models--owner--name` in the cache.
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.opts
            .cache_dir
            .join(format!("models--{}", repo.replace('/', "--")))
    }

    /// The file, if the cache has it for `file.revision` (no network).
    pub fn cached(&self, file: &RepoFile) -> Option<CachedFile> {
        let dir = self.repo_dir(file.repo);
        let commit = if is_commit(file.revision) {
            file.revision.to_string()
        } else {
            let text = std::fs::read_to_string(dir.join("refs").join(file.revision)).ok()?;
            text.trim().to_string()
        };
        if !is_commit(&commit) {
            return None;
        }
        let path = dir.join("snapshots").join(&commit).join(file.path);
        // exists() follows the link: a blob removed from under it counts as missing.
        path.exists().then(|| CachedFile {
            etag: std::fs::read_link(&path)
                .ok()
                .and_then(|t| Some(t.file_name()?.to_string_lossy().into_owned())),
            path,
            commit,
            downloaded: false,
        })
    }

    /// The file from the cache, downloading it first when the cache lacks the revision's
    /// current version. Offline, or when the hub cannot be reached, a cached copy is used.
    pub fn fetch(&self, file: &RepoFile) -> Result<CachedFile> {
        if self.opts.offline {
            return self.cached(file).ok_or_else(|| self.offline_missing(file));
        }
        let remote = match self.retrying(|| self.head(file)) {
            Ok(r) => r,
            // Unreachable hub: the cached copy, as huggingface_hub does.
            Err(Fail::Retry(why)) => return self.cached(file).ok_or_else(|| gave_up(file, why)),
            Err(Fail::Fatal(e)) => return Err(e),
        };
        let dir = self.repo_dir(file.repo);
        let snapshot = dir.join("snapshots").join(&remote.commit).join(file.path);
        let mut downloaded = false;
        if !snapshot.exists() {
            let blob = dir.join("blobs").join(&remote.etag);
            if !blob.exists() {
                self.download(&remote, file, &blob)?;
                downloaded = true;
            }
            link_snapshot(&snapshot, file.path, &remote.etag)?;
        }
        if file.revision != remote.commit {
            let reference = dir.join("refs").join(file.revision);
            create_parent(&reference)?;
            std::fs::write(&reference, &remote.commit).map_err(|e| Error::io(&reference, e))?;
        }
        Ok(CachedFile {
            path: snapshot,
            commit: remote.commit,
            etag: Some(remote.etag),
            downloaded,
        })
    }

    /// Asks the hub for the file's commit, checksum and size.
    pub fn remote(&self, file: &RepoFile) -> Result<RemoteFile> {
        self.retrying(|| self.head(file))
            .map_err(|f| f.into_error(file))
    }

    /// Downloads `remote` to `dest` through `dest.incomplete` (resumed if present), verifies
    /// its checksum, then renames it into place. A file that fails verification is deleted.
    pub fn download(&self, remote: &RemoteFile, file: &RepoFile, dest: &Path) -> Result<()> {
        create_parent(dest)?;
        let partial = PathBuf::from(format!("{}.incomplete", dest.display()));
        let bar = self.progress_bar(file, remote.size);
        self.retrying(|| self.transfer(remote, file, &partial, &bar))
            .map_err(|f| f.into_error(file))?;
        bar.set_message(format!("{} (verifying)", file.path));
        let verified = verify_file(&partial, &remote.etag, remote.size);
        bar.finish_and_clear();
        if let Err(message) = verified {
            let _ = std::fs::remove_file(&partial);
            return Err(hub_error(
                file,
                format!("{message}; the download was discarded, run the command again"),
            ));
        }
        File::open(&partial)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&partial, e))?;
        std::fs::rename(&partial, dest).map_err(|e| Error::io(dest, e))
    }

    /// Runs `attempt` until it succeeds, fails for good, or has failed [`MAX_ATTEMPTS`] times.
    fn retrying<T>(&self, mut attempt: impl FnMut() -> Attempt<T>) -> Attempt<T> {
        let mut tries = 1;
        loop {
            match attempt() {
                Err(Fail::Retry(_)) if tries < MAX_ATTEMPTS => {
                    std::thread::sleep(Duration::from_millis(500 << (tries - 1)));
                    tries += 1;
                }
                done => return done,
            }
        }
    }

    fn head(&self, file: &RepoFile) -> Attempt<RemoteFile> {
        let mut url = format!(
            "{}/{}/resolve/{}/{}",
            self.opts.endpoint, file.repo, file.revision, file.path
        );
        for _ in 0..=MAX_RELATIVE_REDIRECTS {
            let response = self
                .authorized(self.agent.head(&url))
                .config()
                .max_redirects(0)
                .build()
                .call()
                .map_err(transport)?;
            let status = response.status().as_u16();
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            if (300..400).contains(&status) {
                if let Some(location) = header("location").filter(|l| l.starts_with('/')) {
                    url = format!("{}{location}", origin(&url));
                    continue;
                }
            } else if status != 200 {
                return Err(self.status_failure(file, status));
            }
            let commit = header("x-repo-commit")
                .filter(|c| is_commit(c))
                .ok_or_else(|| not_hub(file, "no commit hash (X-Repo-Commit)"))?;
            let etag = header("x-linked-etag")
                .or_else(|| header("etag"))
                .map(|e| normalize_etag(&e))
                .filter(|e| !e.is_empty() && e.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| not_hub(file, "no usable ETag"))?;
            let size = header("x-linked-size")
                .or_else(|| header("content-length"))
                .and_then(|s| s.parse().ok());
            return Ok(RemoteFile {
                url: url.clone(),
                commit,
                etag,
                size,
            });
        }
        Err(Fail::Fatal(hub_error(file, "too many redirects".into())))
    }

    /// One GET of the missing bytes into `partial`.
    fn transfer(
        &self,
        remote: &RemoteFile,
        file: &RepoFile,
        partial: &Path,
        bar: &ProgressBar,
    ) -> Attempt<()> {
        let mut have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
        if remote.size.is_some_and(|size| have > size) {
            have = 0;
        }
        if have > 0 && Some(have) == remote.size {
            return Ok(());
        }
        let mut request = self.authorized(self.agent.get(&remote.url));
        if have > 0 {
            request = request.header("Range", format!("bytes={have}-"));
        }
        let response = request.call().map_err(transport)?;
        let status = response.status().as_u16();
        let resumed = match status {
            206 => {
                let range = response
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                range.starts_with(&format!("bytes {have}-"))
            }
            200 => false,
            416 => {
                // The partial file does not fit the server's file: start over.
                let _ = std::fs::remove_file(partial);
                return Err(Fail::Retry("the server refused to resume".into()));
            }
            _ => return Err(self.status_failure(file, status)),
        };
        if !resumed {
            have = 0;
        }
        let mut out = OpenOptions::new()
            .create(true)
            .write(true)
            .append(resumed)
            .truncate(!resumed)
            .open(partial)
            .map_err(|e| Error::io(partial, e))?;
        bar.set_position(have);
        let mut body = response.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Fail::Retry(format!("download interrupted: {e}"))),
            };
            out.write_all(&buf[..n])
                .map_err(|e| Error::io(partial, e))?;
            have += n as u64;
            bar.set_position(have);
        }
        match remote.size {
            Some(size) if have != size => Err(Fail::Retry(format!(
                "download ended at {have} of {size} bytes"
            ))),
            _ => Ok(()),
        }
    }

    fn authorized<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.opts.token {
            Some(token) => request.header("Authorization", format!("Bearer {token}")),
            None => request,
        }
    }

    fn status_failure(&self, file: &RepoFile, status: u16) -> Fail {
        let page = format!("{}/{}", self.opts.endpoint, file.repo);
        let message = match status {
            401 | 403 if self.opts.token.is_some() => format!(
                "access denied (HTTP {status}) with the token in HF_TOKEN: check that it is \
                 valid and that its account accepted the licence on {page}"
            ),
            401 | 403 => format!(
                "access denied (HTTP {status}): the repository is gated, private or does not \
                 exist. Accept its licence on {page}, create a read token at \
                 {}/settings/tokens and set HF_TOKEN to it",
                self.opts.endpoint
            ),
            404 => format!(
                "not found on the hub (HTTP 404) at revision {}",
                file.revision
            ),
            429 | 500..=599 => return Fail::Retry(format!("the hub answered HTTP {status}")),
            _ => format!("unexpected answer from the hub: HTTP {status}"),
        };
        Fail::Fatal(hub_error(file, message))
    }

    fn offline_missing(&self, file: &RepoFile) -> Error {
        hub_error(
            file,
            format!(
                "not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set: fetch the model \
                 files once with `ultrapixel download` on a machine with network access",
                self.opts.cache_dir.display()
            ),
        )
    }

    fn progress_bar(&self, file: &RepoFile, size: Option<u64>) -> ProgressBar {
        if !self.opts.progress {
            return ProgressBar::hidden();
        }
        let style = ProgressStyle::with_template(
            "{msg:32} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> ");
        ProgressBar::new(size.unwrap_or(0))
            .with_style(style)
            .with_message(file.path.to_string())
    }
}

/// Checks `path` against a hub ETag (and size, when known). `Ok(false)`: the ETag is not a
/// checksum this client knows, nothing was checked.
pub fn verify_file(
    path: &Path,
    etag: &str,
    size: Option<u64>,
) -> std::result::Result<bool, String> {
    let len = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if let Some(size) = size.filter(|&s| s != len) {
        return Err(format!("size mismatch: expected {size} bytes, got {len}"));
    }
    let Some(kind) = Checksum::of_etag(etag) else {
        return Ok(false);
    };
    let actual = hash_file(path, kind, len).map_err(|e| format!("{}: {e}", path.display()))?;
    if actual != etag.to_ascii_lowercase() {
        let name = match kind {
            Checksum::Sha256 => "sha256",
            Checksum::GitBlobSha1 => "git blob sha1",
        };
        return Err(format!(
            "checksum mismatch: expected {name} {etag}, got {actual}"
        ));
    }
    Ok(true)
}

fn hash_file(path: &Path, kind: Checksum, len: u64) -> std::io::Result<String> {
    fn run<D: Digest>(mut digest: D, mut file: File) -> std::io::Result<String> {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match file.read(&mut buf)? {
                0 => break,
                n => digest.update(&buf[..n]),
            }
        }
        Ok(hex(&digest.finalize()))
    }
    let file = File::open(path)?;
    match kind {
        Checksum::Sha256 => run(Sha256::new(), file),
        Checksum::GitBlobSha1 => {
            let mut digest = Sha1::new();
            digest.update(format!("blob {len}\0").as_bytes());
            run(digest, file)
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `"abc"`, `W/"abc"` → `abc`, lower case.
fn normalize_etag(etag: &str) -> String {
    etag.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_ascii_lowercase()
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> &str {
    let host_start = url.find("://").map_or(0, |i| i + 3);
    match url[host_start..].find('/') {
        Some(i) => &url[..host_start + i],
        None => url,
    }
}

/// Points `snapshots/<commit>/<path>` at `blobs/<etag>` with a relative link (the layout
/// `huggingface_hub` makes), replacing whatever was there in one rename.
fn link_snapshot(snapshot: &Path, repo_path: &str, etag: &str) -> Result<()> {
    create_parent(snapshot)?;
    let depth = 2 + repo_path.matches('/').count();
    let target = format!("{}blobs/{etag}", "../".repeat(depth));
    let temp = PathBuf::from(format!(
        "{}.link-{}",
        snapshot.display(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&temp);
    std::os::unix::fs::symlink(&target, &temp).map_err(|e| Error::io(&temp, e))?;
    std::fs::rename(&temp, snapshot).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        Error::io(snapshot, e)
    })
}

fn create_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(dir) => std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e)),
        None => Ok(()),
    }
}

fn transport(e: ureq::Error) -> Fail {
    Fail::Retry(format!("network error: {e}"))
}

fn not_hub(file: &RepoFile, what: &str) -> Fail {
    Fail::Fatal(hub_error(
        file,
        format!("the server's answer is not a Hugging Face hub answer: {what}"),
    ))
}

fn hub_error(file: &RepoFile, message: String) -> Error {
    Error::format(format!("hub {file}"), message)
}
