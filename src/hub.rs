//! Hugging Face hub downloads into the standard hub cache
//! (`models--owner--name/{blobs,snapshots/<commit>,refs}`, shared with Python's
//! `huggingface_hub`), with resume of partial downloads, checksum verification, `HF_TOKEN`,
//! `HF_ENDPOINT` and offline mode (`HF_HUB_OFFLINE=1`), read as `huggingface_hub` reads them
//! (`~` and `$VAR` expanded, `TRANSFORMERS_OFFLINE`), and its per-blob lock.
//!
//! A small client on `ureq` rather than the `hf-hub` crate: that crate does not verify
//! checksums (a corrupted download lands in the cache, the failure users of the ComfyUI port
//! hit), has no offline mode, and reports a gated repository as a bare HTTP error.
//!
//! Protocol (as `huggingface_hub` 2.4 does it): `HEAD {endpoint}/{repo}/resolve/{revision}/{path}`
//! follows redirects that stay on the hub (a renamed repository; relative or absolute) and stops
//! at one to another host (the storage host of LFS files); that last answer gives the commit
//! (`X-Repo-Commit`), the checksum (`X-Linked-Etag` for LFS files: their sha256; `ETag`
//! otherwise: the git blob sha1) and the size (`X-Linked-Size`, or the `Content-Length` of a
//! file served directly; never a redirect's own length). The `GET` goes to the storage host's
//! URL, without the token. Under the blob's lock (`.locks/models--owner--name/<etag>.lock`, an
//! flock as Python's `filelock` takes it) bytes go to `blobs/<etag>.incomplete`, resumed with
//! `Range`, and only a verified file is renamed to `blobs/<etag>` and linked from
//! `snapshots/<commit>/<path>`; `refs/<revision>` is replaced (temporary file and rename) only
//! when it changes.

use crate::atomic_file::write_atomic;
use crate::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Attempts per request before a transfer error is reported (a cut connection, 5xx, 429).
const MAX_ATTEMPTS: u32 = 3;
/// Redirects on the hub followed while resolving (renamed repositories), as many as
/// `huggingface_hub` follows.
const MAX_REDIRECTS: usize = 20;
/// Hosts of the hub besides `HF_ENDPOINT`'s: the token may go to them (`huggingface_hub`'s
/// list). Any other host, such as the storage host of LFS files, never gets it.
const HUB_ORIGINS: &[&str] = &[DEFAULT_ENDPOINT, "https://hf.co"];

/// Where and how to reach the hub; [`HubOptions::from_env`] reads the variables
/// `huggingface_hub` reads, as it reads them.
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// `HF_ENDPOINT`, without a trailing slash.
    pub endpoint: String,
    /// `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `HF_HOME/hub`, else
    /// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
    pub cache_dir: PathBuf,
    /// `HF_TOKEN`, else the token file `hf auth login` wrote (`HF_TOKEN_PATH`, else
    /// `HF_HOME/token`).
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE` (or, when that is unset, `TRANSFORMERS_OFFLINE`): only the cache is
    /// used, no request is made.
    pub offline: bool,
    /// Progress bars on stderr (drawn only on a terminal).
    pub progress: bool,
}

impl HubOptions {
    pub fn from_env() -> HubOptions {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// As [`HubOptions::from_env`], with `var` standing for the environment (`None`: unset).
    ///
    /// As `huggingface_hub.constants`: the paths get `~`, `~user`, `$VAR` and `${VAR}`
    /// expanded ([`expand_path`]), the cache's default after `HF_HOME`'s (so twice, as there);
    /// offline mode is `HF_HUB_OFFLINE`, or `TRANSFORMERS_OFFLINE` when that one is unset, being
    /// `1`, `ON`, `YES` or `TRUE` in any case. One deliberate difference: a variable set to the
    /// empty string counts as unset (Python would take `HF_HOME=""` as the current directory).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> HubOptions {
        let set = |k: &str| var(k).filter(|v| !v.is_empty());
        let expand = |p: String| expand_path(&p, &var);
        let default_cache_home = join(&expand_user("~", &var), ".cache");
        let hf_home = expand(set("HF_HOME").unwrap_or_else(|| {
            join(
                &set("XDG_CACHE_HOME").unwrap_or(default_cache_home),
                "huggingface",
            )
        }));
        let cache_dir = expand(
            set("HF_HUB_CACHE")
                .or_else(|| set("HUGGINGFACE_HUB_CACHE"))
                .unwrap_or_else(|| join(&hf_home, "hub")),
        );
        let token_file = expand(set("HF_TOKEN_PATH").unwrap_or_else(|| join(&hf_home, "token")));
        let token = set("HF_TOKEN")
            .or_else(|| set("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| std::fs::read_to_string(token_file).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let offline = set("HF_HUB_OFFLINE")
            .or_else(|| set("TRANSFORMERS_OFFLINE"))
            .is_some_and(|v| ["1", "ON", "YES", "TRUE"].contains(&v.to_uppercase().as_str()));
        HubOptions {
            endpoint: set("HF_ENDPOINT")
                .map(|e| e.trim_end_matches('/').to_string())
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            cache_dir: PathBuf::from(cache_dir),
            token,
            offline,
            progress: true,
        }
    }
}

/// `os.path.join(a, b)` for a relative `b`.
fn join(a: &str, b: &str) -> String {
    match a {
        "" => b.to_string(),
        _ if a.ends_with('/') => format!("{a}{b}"),
        _ => format!("{a}/{b}"),
    }
}

/// `path` with `~` or `~user` at its start and every `$VAR` or `${VAR}` replaced, as Python's
/// `os.path.expandvars(os.path.expanduser(path))` does (which is how `huggingface_hub` reads
/// `HF_HOME`, `HF_HUB_CACHE` and `HF_TOKEN_PATH`): `~` is `$HOME` (else the password
/// database's home), `~user` that user's home; a variable name is ASCII letters, digits and
/// `_`; an unknown user or variable is left as written, a variable set to "" is replaced by
/// it, and a replacement is not expanded again. `var` stands for the environment.
pub fn expand_path(path: &str, var: impl Fn(&str) -> Option<String>) -> String {
    expand_vars(&expand_user(path, &var), &var)
}

fn expand_user(path: &str, var: &impl Fn(&str) -> Option<String>) -> String {
    let Some(rest) = path.strip_prefix('~') else {
        return path.to_string();
    };
    let (name, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let home = match name {
        "" => var("HOME").or_else(|| {
            let user = nix::unistd::User::from_uid(nix::unistd::Uid::current());
            user.ok()
                .flatten()
                .map(|u| u.dir.to_string_lossy().into_owned())
        }),
        name => nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(|u| u.dir.to_string_lossy().into_owned()),
    };
    let Some(home) = home else {
        return path.to_string();
    };
    match format!("{}{tail}", home.trim_end_matches('/')) {
        expanded if expanded.is_empty() => "/".to_string(),
        expanded => expanded,
    }
}

fn expand_vars(path: &str, var: &impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        let word = after
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .count();
        // (name, length of the reference after `$`); length 0: no reference.
        let (name, len) = match (word, after.strip_prefix('{')) {
            (0, Some(braced)) => match braced.find('}') {
                Some(end) => (&braced[..end], end + 2),
                None => ("", 0),
            },
            _ => (&after[..word], word),
        };
        let valid = !name.is_empty() && !name.contains(['=', '\0']);
        match (valid && len > 0).then(|| var(name)).flatten() {
            Some(value) => out.push_str(&value),
            None => out.push_str(&rest[dollar..dollar + 1 + len]),
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    out
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

/// The error after the last attempt failed (exit code 1: a rerun may succeed).
fn gave_up(file: &RepoFile, why: String) -> Error {
    download_error(
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
        self.opts.cache_dir.join(repo_folder(repo))
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
        if snapshot.exists() {
            // Best effort, as huggingface_hub: a read-only cache still serves its files.
            let _ = write_ref(&dir, file.revision, &remote.commit);
        } else {
            let lock = self.lock_blob(file, &remote.etag)?;
            // Another process may have finished the blob while this one waited.
            let blob = dir.join("blobs").join(&remote.etag);
            if !blob.exists() {
                self.download(&remote, file, &blob)?;
                downloaded = true;
            }
            if !snapshot.exists() {
                link_snapshot(&snapshot, file.path, &remote.etag)?;
            }
            drop(lock);
            write_ref(&dir, file.revision, &remote.commit)?;
        }
        Ok(CachedFile {
            path: snapshot,
            commit: remote.commit,
            etag: Some(remote.etag),
            downloaded,
        })
    }

    /// Holds `.locks/models--owner--name/<etag>.lock` until the returned file is dropped:
    /// the lock `huggingface_hub` takes around writing a blob and its snapshot link (an
    /// flock on that file, as its `filelock` package takes it; the file stays, as there).
    fn lock_blob(&self, file: &RepoFile, etag: &str) -> Result<Option<File>> {
        let path = self
            .opts
            .cache_dir
            .join(".locks")
            .join(repo_folder(file.repo))
            .join(format!("{etag}.lock"));
        lock_file(&path, &file.to_string(), self.opts.progress)
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
            return Err(download_error(
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
        for _ in 0..=MAX_REDIRECTS {
            let response = self
                .authorized(self.agent.head(&url), &url)
                .config()
                .max_redirects(0)
                .build()
                .call()
                .map_err(transport)?;
            let status = response.status().as_u16();
            let header = |name: &str| header_text(response.headers(), name);
            let location = header("location").filter(|_| (300..400).contains(&status));
            let target = location.map(|l| join_url(&url, &l));
            match &target {
                // Still on the hub (a renamed repository): follow, token and all.
                Some(target) if self.on_hub(target) => {
                    url = target.clone();
                    continue;
                }
                // To another host (the storage host of an LFS file): the file's metadata is
                // on this answer, and the download goes there.
                Some(_) => {}
                None if status != 200 => return Err(self.status_failure(file, status)),
                None => {}
            }
            let commit = header("x-repo-commit")
                .filter(|c| is_commit(c))
                .ok_or_else(|| not_hub(file, "no commit hash (X-Repo-Commit)"))?;
            let etag = header("x-linked-etag")
                .or_else(|| header("etag"))
                .map(|e| normalize_etag(&e))
                .filter(|e| !e.is_empty() && e.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| not_hub(file, "no usable ETag"))?;
            // A redirect's own Content-Length is the length of its page, not the file's.
            let size = header("x-linked-size")
                .or_else(|| header("content-length").filter(|_| target.is_none()))
                .and_then(|s| s.trim().parse().ok());
            return Ok(RemoteFile {
                url: target.unwrap_or(url),
                commit,
                etag,
                size,
            });
        }
        Err(Fail::Fatal(hub_error(file, "too many redirects".into())))
    }

    /// Whether `url` is on the hub (`HF_ENDPOINT`'s host, or huggingface.co), where the
    /// token may go.
    fn on_hub(&self, url: &str) -> bool {
        let Some(origin) = origin_of(url) else {
            return false;
        };
        std::iter::once(self.opts.endpoint.as_str())
            .chain(HUB_ORIGINS.iter().copied())
            .any(|hub| origin_of(hub).is_some_and(|o| o == origin))
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
        let mut request = self.authorized(self.agent.get(&remote.url), &remote.url);
        if have > 0 {
            request = request.header("Range", format!("bytes={have}-"));
        }
        let response = request.call().map_err(transport)?;
        let status = response.status().as_u16();
        let header = |name: &str| header_text(response.headers(), name);
        // `bytes first-last/total` or `bytes */total`.
        let range = header("content-range").unwrap_or_default();
        let range_total = range
            .rsplit_once('/')
            .and_then(|(_, t)| t.trim().parse::<u64>().ok());
        let (resumed, total) = match status {
            206 if have > 0 && range.starts_with(&format!("bytes {have}-")) => (true, range_total),
            206 => {
                let _ = std::fs::remove_file(partial);
                return Err(Fail::Retry(format!(
                    "the server sent another range than asked ({range})"
                )));
            }
            200 => (
                false,
                header("content-length").and_then(|l| l.trim().parse().ok()),
            ),
            // Nothing left to send: the partial file is whole when its length is the file's
            // (size unknown until now), else it does not fit the server's file.
            416 if have > 0 && range_total == Some(have) => return Ok(()),
            416 => {
                let _ = std::fs::remove_file(partial);
                return Err(Fail::Retry("the server refused to resume".into()));
            }
            _ => return Err(self.status_failure(file, status)),
        };
        if !resumed {
            have = 0;
        }
        // The hub's size when it states one, else the length the storage host announces; the
        // checksum decides in the end.
        let expected = remote.size.or(total);
        if let Some(len) = expected {
            bar.set_length(len);
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
        match expected {
            Some(size) if have != size => Err(Fail::Retry(format!(
                "download ended at {have} of {size} bytes"
            ))),
            _ => Ok(()),
        }
    }

    /// `request` with the token when it goes to the hub; never to another host.
    fn authorized<B>(
        &self,
        request: ureq::RequestBuilder<B>,
        url: &str,
    ) -> ureq::RequestBuilder<B> {
        match &self.opts.token {
            Some(token) if self.on_hub(url) => {
                request.header("Authorization", format!("Bearer {token}"))
            }
            _ => request,
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

/// `"abc"`, `W/"abc"` → `abc` (case kept: the blob's name is the hub's ETag, as
/// `huggingface_hub` names it).
fn normalize_etag(etag: &str) -> String {
    etag.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `scheme://host[:port]` of a URL, as written.
fn origin(url: &str) -> &str {
    let host_start = url.find("://").map_or(0, |i| i + 3);
    match url[host_start..].find(['/', '?', '#']) {
        Some(i) => &url[..host_start + i],
        None => url,
    }
}

/// (scheme, host, port) of a URL, lower case, with the scheme's default port: two URLs with
/// the same are on the same host.
fn origin_of(url: &str) -> Option<(String, String, u16)> {
    let uri: ureq::http::Uri = url.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let port = uri.port_u16().or(match scheme.as_str() {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    })?;
    Some((scheme, uri.host()?.to_ascii_lowercase(), port))
}

/// A redirect's `Location` resolved against the URL it answered (`urljoin`).
fn join_url(base: &str, location: &str) -> String {
    let has_scheme = location.find(':').is_some_and(|i| {
        location.as_bytes()[0].is_ascii_alphabetic()
            && location[..i]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    });
    if has_scheme {
        return location.to_string();
    }
    if location.starts_with("//") {
        let scheme = base.split_once(':').map_or("https", |(s, _)| s);
        return format!("{scheme}:{location}");
    }
    if location.starts_with('/') {
        return format!("{}{location}", origin(base));
    }
    let without_query = &base[..base.find(['?', '#']).unwrap_or(base.len())];
    if location.starts_with('?') {
        return format!("{without_query}{location}");
    }
    // A relative path: beside the last segment of the base's path.
    match without_query
        .rfind('/')
        .filter(|&i| i >= origin(base).len())
    {
        Some(i) => format!("{}{location}", &without_query[..=i]),
        None => format!("{without_query}/{location}"),
    }
}

/// `models--owner--name`: a repository's folder in the cache (and under `.locks`).
fn repo_folder(repo: &str) -> String {
    format!("models--{}", repo.replace('/', "--"))
}

/// Holds an exclusive flock on `path` (created if missing, group-writable as
/// `huggingface_hub` makes its lock files, left in place afterwards) until the returned file is
/// dropped; says so on stderr (`report`) when it has to wait for `what`. On a file system
/// without flock (some network mounts) it goes on unlocked, with a warning, as Python falls
/// back there too: the checksum still catches a blob written twice at once.
pub(crate) fn lock_file(path: &Path, what: &str, report: bool) -> Result<Option<File>> {
    use fs4::{FileExt, TryLockError};
    create_parent(path)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o664)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let unsupported = |e: std::io::Error| {
        use nix::errno::Errno;
        let errno = e.raw_os_error().map(Errno::from_raw);
        if matches!(
            errno,
            Some(Errno::ENOSYS | Errno::ENOLCK | Errno::EOPNOTSUPP)
        ) {
            eprintln!(
                "warning: {}: file locks are not supported here ({e}); going on without the lock",
                path.display()
            );
            Ok(None)
        } else {
            Err(Error::io(path, e))
        }
    };
    match FileExt::try_lock(&file) {
        Ok(()) => return Ok(Some(file)),
        Err(TryLockError::WouldBlock) => {}
        Err(TryLockError::Error(e)) => return unsupported(e),
    }
    if report {
        eprintln!(
            "waiting for another download of {what} to finish (lock {})",
            path.display()
        );
    }
    match FileExt::lock(&file) {
        Ok(()) => Ok(Some(file)),
        Err(e) => unsupported(e),
    }
}

/// Makes `refs/<revision>` name `commit`: left alone when it already does (no write, so a
/// read-only cache stays usable), else replaced whole through a temporary file and a rename
/// (a reader never sees half a commit hash). A commit hash as revision has no ref.
fn write_ref(repo_dir: &Path, revision: &str, commit: &str) -> Result<()> {
    if revision == commit {
        return Ok(());
    }
    let path = repo_dir.join("refs").join(revision);
    if std::fs::read_to_string(&path).is_ok_and(|text| text == commit) {
        return Ok(());
    }
    create_parent(&path)?;
    write_atomic(&path, |out| {
        out.write_all(commit.as_bytes())
            .map_err(|e| Error::io(&path, e))
    })
}

/// Points `snapshots/<commit>/<path>` at `blobs/<etag>` with a relative link (the layout
/// `huggingface_hub` makes), replacing whatever was there in one rename.
fn link_snapshot(snapshot: &Path, repo_path: &str, etag: &str) -> Result<()> {
    create_parent(snapshot)?;
    let depth = 2 + repo_path.matches('/').count();
    let target = format!("{}blobs/{etag}", "../".repeat(depth));
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let temp = PathBuf::from(format!(
        "{}.link-{}-{}",
        snapshot.display(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
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

/// A header's value, where the answer has it as text.
fn header_text(headers: &ureq::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
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

/// A definite answer of the hub (access denied, no such file, not a hub): exit code 2.
fn hub_error(file: &RepoFile, message: String) -> Error {
    Error::format(format!("hub {file}"), message)
}

/// A download that failed on the way (exit code 1: running the command again resumes it).
fn download_error(file: &RepoFile, message: String) -> Error {
    Error::Download {
        what: format!("hub {file}"),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_locations_resolve_as_urljoin_does() {
        let base = "http://127.0.0.1:8000/a/b/resolve/main/x/y.json?q=1";
        assert_eq!(
            join_url(base, "https://cdn.example/z"),
            "https://cdn.example/z"
        );
        assert_eq!(join_url(base, "//cdn.example/z"), "http://cdn.example/z");
        assert_eq!(join_url(base, "/c/d"), "http://127.0.0.1:8000/c/d");
        assert_eq!(
            join_url(base, "z.json"),
            "http://127.0.0.1:8000/a/b/resolve/main/x/z.json"
        );
        assert_eq!(
            join_url(base, "?r=2"),
            "http://127.0.0.1:8000/a/b/resolve/main/x/y.json?r=2"
        );
        assert_eq!(join_url("http://h:1", "z"), "http://h:1/z");
    }

    #[test]
    fn hosts_compare_by_scheme_host_and_port() {
        assert_eq!(
            origin_of("https://HF.co/x"),
            origin_of("https://hf.co:443/y")
        );
        assert_ne!(origin_of("http://h:1/x"), origin_of("http://h:2/x"));
        assert_ne!(origin_of("http://h/x"), origin_of("https://h/x"));
        assert_eq!(origin_of("not a url"), None);
    }
}
