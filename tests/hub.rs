//! The Hugging Face hub client against a mock hub on 127.0.0.1 (started by each test): the
//! cache layout, checksums, resume, gated repositories, tokens, offline mode, the environment
//! variables as `huggingface_hub` reads them, the blob lock it takes, redirects and exit codes.
//! `tools/hf-interop.sh` checks the same against the real Python client.

use sha1::Sha1;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use ultrapixel::hub::{Hub, HubOptions, RepoFile};
use ultrapixel::pipeline::model_dir::{
    download, download_control, ModelDir, CONTROL_FILES, MODEL_FILES, OPTIONAL_FILES,
};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
/// Renamed repositories: the hub answers their requests with a redirect to
/// `stabilityai/stable-cascade`, absolute (same host) or relative.
const RENAMED_ABSOLUTE: &str = "stabilityai/old-cascade";
const RENAMED_RELATIVE: &str = "stabilityai/older-cascade";

/// How the mock misbehaves.
#[derive(Clone, Copy, Default)]
struct Faults {
    /// Serve other bytes than the checksum says.
    corrupt: bool,
    /// Cut the first download of each file halfway.
    cut_once: bool,
    /// Answer 401 unless the request carries this token (the storage host never asks).
    token: Option<&'static str>,
    /// Answer 404 (`EntryNotFound`) for this file.
    absent: Option<&'static str>,
    /// LFS redirects without `X-Linked-Size` (their own `Content-Length` is the redirect
    /// page's).
    no_linked_size: bool,
    /// The storage host sends each file in small pieces, slowly (about 0.4 s per file).
    slow: bool,
}

/// What the mock saw.
#[derive(Default)]
struct Log {
    /// Every request, to either host: `METHOD target`.
    requests: Vec<String>,
    /// Downloads (GETs of content), by file path.
    gets: Vec<String>,
    ranges: Vec<String>,
    /// `Authorization` headers the hub received.
    auth: Vec<String>,
    /// `Authorization` headers the storage host received (it must never get one).
    cdn_auth: Vec<String>,
    cut: Vec<String>,
}

struct MockHub {
    endpoint: String,
    log: Arc<Mutex<Log>>,
}

/// A file's content and whether it is an LFS file (sha256 ETag) or a git one (blob sha1).
fn content(path: &str) -> (Vec<u8>, bool) {
    let lfs = path.ends_with(".safetensors");
    let n = if lfs { 200_000 } else { 300 };
    let seed = path
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
    let data = (0..n)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect();
    (data, lfs)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn etag(data: &[u8], lfs: bool) -> String {
    if lfs {
        hex(&Sha256::digest(data))
    } else {
        let mut h = Sha1::new();
        h.update(format!("blob {}\0", data.len()).as_bytes());
        h.update(data);
        hex(&h.finalize())
    }
}

/// The hub's checksum of a file of the mock.
fn etag_of(path: &str) -> String {
    let (data, lfs) = content(path);
    etag(&data, lfs)
}

impl MockHub {
    /// The hub and its storage host (another port: another origin, as the real CDN is).
    fn start(faults: Faults) -> MockHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let cdn = format!("http://{}", cdn_listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Log::default()));
        for (listener, storage) in [(listener, None), (cdn_listener, Some(()))] {
            let shared = log.clone();
            let cdn = cdn.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let log = shared.clone();
                    let cdn = cdn.clone();
                    std::thread::spawn(move || {
                        serve(stream, faults, &log, &cdn, storage.is_some())
                    });
                }
            });
        }
        MockHub { endpoint, log }
    }

    fn options(&self, cache: &Path) -> HubOptions {
        HubOptions {
            endpoint: self.endpoint.clone(),
            cache_dir: cache.to_path_buf(),
            token: None,
            offline: false,
            progress: false,
        }
    }

    fn gets_of(&self, path: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .gets
            .iter()
            .filter(|g| *g == path)
            .count()
    }
}

fn respond(out: &mut TcpStream, status: &str, hdrs: &[(String, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in hdrs {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = out.write_all(head.as_bytes());
    let _ = out.write_all(body);
}

fn serve(stream: TcpStream, faults: Faults, log: &Mutex<Log>, cdn: &str, storage: bool) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut out = stream;
    {
        let mut l = log.lock().unwrap();
        l.requests.push(format!("{method} {target}"));
        if let Some(a) = headers.get("authorization") {
            if storage {
                l.cdn_auth.push(a.clone());
            } else {
                l.auth.push(a.clone());
            }
        }
    }
    if storage {
        // The storage host: /cdn/{repo}/{path}, no token needed (the real one signs its URLs).
        return match target.strip_prefix("/cdn/") {
            Some(p) => {
                let path = p.splitn(3, '/').nth(2).unwrap_or("").to_string();
                send_content(&mut out, &path, faults, log, &headers)
            }
            None => respond(&mut out, "404 Not Found", &[], b""),
        };
    }
    if let Some(token) = faults.token {
        if headers.get("authorization") != Some(&format!("Bearer {token}")) {
            return respond(&mut out, "401 Unauthorized", &[], b"");
        }
    }
    // /{owner}/{name}/resolve/main/{path}
    let Some((repo, path)) = target
        .strip_prefix('/')
        .and_then(|t| t.split_once("/resolve/main/"))
    else {
        return respond(&mut out, "404 Not Found", &[], b"");
    };
    for (old, absolute) in [(RENAMED_ABSOLUTE, true), (RENAMED_RELATIVE, false)] {
        if repo == old {
            let moved = format!("/stabilityai/stable-cascade/resolve/main/{path}");
            let location = match absolute {
                true => format!("http://{}{moved}", headers["host"]),
                false => moved,
            };
            let hdrs = [("Location".to_string(), location)];
            return respond(&mut out, "307 Temporary Redirect", &hdrs, b"");
        }
    }
    if faults.absent.is_some_and(|a| path == a) {
        let hdrs = [
            ("X-Error-Code".to_string(), "EntryNotFound".to_string()),
            ("X-Repo-Commit".to_string(), COMMIT.to_string()),
        ];
        return respond(&mut out, "404 Not Found", &hdrs, b"");
    }
    // HEAD gives the metadata; LFS files as the real hub does: a redirect to the storage
    // host carrying the headers. GET of an LFS file redirects, GET of a small file serves it.
    let (data, lfs) = content(path);
    let tag = format!("\"{}\"", etag(&data, lfs));
    let mut hdrs = vec![("X-Repo-Commit".to_string(), COMMIT.to_string())];
    if lfs {
        let page = b"Found. Redirecting to the storage host";
        hdrs.push(("X-Linked-Etag".into(), tag));
        if !faults.no_linked_size {
            hdrs.push(("X-Linked-Size".into(), data.len().to_string()));
        }
        hdrs.push(("Location".into(), format!("{cdn}/cdn/{repo}/{path}")));
        hdrs.push(("Content-Length".into(), page.len().to_string()));
        let body: &[u8] = if method == "HEAD" { b"" } else { page };
        return respond(&mut out, "302 Found", &hdrs, body);
    }
    if method == "HEAD" {
        hdrs.push(("ETag".into(), tag));
        hdrs.push(("Content-Length".into(), data.len().to_string()));
        return respond(&mut out, "200 OK", &hdrs, b"");
    }
    send_content(&mut out, path, faults, log, &headers)
}

/// A GET of a file's bytes, honouring `Range`.
fn send_content(
    out: &mut TcpStream,
    path: &str,
    faults: Faults,
    log: &Mutex<Log>,
    headers: &HashMap<String, String>,
) {
    let (mut data, _) = content(path);
    if faults.corrupt {
        data[17] ^= 0xff;
    }
    log.lock().unwrap().gets.push(path.to_string());
    let len = data.len();
    let start = match headers.get("range") {
        Some(r) => {
            log.lock().unwrap().ranges.push(format!("{path} {r}"));
            r.trim_start_matches("bytes=")
                .trim_end_matches('-')
                .parse::<usize>()
                .unwrap_or(0)
        }
        None => 0,
    };
    if start >= len {
        let hdrs = [("Content-Range".to_string(), format!("bytes */{len}"))];
        return respond(out, "416 Range Not Satisfiable", &hdrs, b"");
    }
    let cut = faults.cut_once && start == 0 && {
        let mut l = log.lock().unwrap();
        let first = !l.cut.contains(&path.to_string());
        if first {
            l.cut.push(path.to_string());
        }
        first
    };
    let (status, mut hdrs) = if start > 0 {
        (
            "206 Partial Content",
            vec![(
                "Content-Range".to_string(),
                format!("bytes {start}-{}/{len}", len - 1),
            )],
        )
    } else {
        ("200 OK", vec![])
    };
    hdrs.push(("Content-Length".into(), (len - start).to_string()));
    // A cut transfer announces the whole length but ends halfway.
    let body = if cut {
        &data[start..len / 2]
    } else {
        &data[start..]
    };
    if !faults.slow {
        return respond(out, status, &hdrs, body);
    }
    respond(out, status, &hdrs, b"");
    for piece in body.chunks(10_000) {
        std::thread::sleep(Duration::from_millis(20));
        if out.write_all(piece).is_err() {
            return;
        }
    }
}

/// A file of the Stable Cascade repository at `main`.
fn cascade_file(path: &str) -> RepoFile<'_> {
    RepoFile {
        repo: "stabilityai/stable-cascade",
        revision: "main",
        path,
    }
}

fn read(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(path)
        .unwrap()
        .read_to_end(&mut v)
        .unwrap();
    v
}

#[test]
fn download_fills_the_hub_cache_verified_and_a_second_run_fetches_nothing() {
    let hub = MockHub::start(Faults::default());
    let cache = tempfile::tempdir().unwrap();
    let client = Hub::new(hub.options(cache.path()));
    let mut fetched = 0;
    let dir = download(&client, None, |d| fetched += d.fetched as usize).unwrap();
    assert_eq!(fetched, MODEL_FILES.len() + OPTIONAL_FILES.len());
    for f in OPTIONAL_FILES {
        assert!(dir.optional(f.name).unwrap().starts_with(cache.path()));
    }
    for f in MODEL_FILES {
        let p = dir.path(f.name).unwrap();
        assert!(p.starts_with(cache.path()), "{}", p.display());
        assert!(p
            .to_string_lossy()
            .contains(&format!("snapshots/{COMMIT}/")));
        assert_eq!(read(p), content(f.name).0, "{}", f.name);
    }
    let repo = cache.path().join("models--stabilityai--stable-cascade");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        COMMIT
    );
    assert!(!std::fs::read_dir(repo.join("blobs")).unwrap().any(|e| e
        .unwrap()
        .path()
        .extension()
        .is_some_and(|x| x == "incomplete")));
    let gets = hub.log.lock().unwrap().gets.len();
    let mut again = 0;
    download(&client, None, |d| again += d.fetched as usize).unwrap();
    assert_eq!(again, 0);
    assert_eq!(
        hub.log.lock().unwrap().gets.len(),
        gets,
        "nothing downloaded twice"
    );
    // The sha256 of LFS files reaches the image metadata.
    let hashes = dir.hashes();
    let (data, _) = content("stage_c_bf16.safetensors");
    assert_eq!(
        hashes["stage_c_bf16.safetensors"],
        hex(&Sha256::digest(&data))
    );
}

#[test]
fn a_corrupt_download_is_discarded_with_a_checksum_error() {
    let hub = MockHub::start(Faults {
        corrupt: true,
        ..Faults::default()
    });
    let cache = tempfile::tempdir().unwrap();
    let client = Hub::new(hub.options(cache.path()));
    let file = cascade_file("stage_a.safetensors");
    let err = client.fetch(&file).unwrap_err().to_string();
    assert!(
        err.contains("checksum mismatch") && err.contains("sha256"),
        "{err}"
    );
    assert!(err.contains("stage_a.safetensors"), "{err}");
    assert!(client.cached(&file).is_none());
    let blobs = cache
        .path()
        .join("models--stabilityai--stable-cascade/blobs");
    let left: Vec<_> = std::fs::read_dir(&blobs).map_or(Vec::new(), |d| d.collect());
    assert!(left.is_empty(), "nothing left of the bad download");
}

#[test]
fn a_cut_transfer_resumes_with_a_range_request() {
    let hub = MockHub::start(Faults {
        cut_once: true,
        ..Faults::default()
    });
    let cache = tempfile::tempdir().unwrap();
    let client = Hub::new(hub.options(cache.path()));
    let file = cascade_file("stage_b_lite_bf16.safetensors");
    let got = client.fetch(&file).unwrap();
    assert_eq!(read(&got.path), content(file.path).0);
    let ranges = &hub.log.lock().unwrap().ranges;
    assert_eq!(ranges.len(), 1, "{ranges:?}");
    assert!(ranges[0].ends_with("bytes=100000-"), "{ranges:?}");
}

#[test]
fn a_gated_repository_asks_for_a_token_and_the_token_is_sent() {
    let hub = MockHub::start(Faults {
        token: Some("hf_secret"),
        ..Faults::default()
    });
    let cache = tempfile::tempdir().unwrap();
    let file = cascade_file("text_encoder/config.json");
    let err = Hub::new(hub.options(cache.path()))
        .fetch(&file)
        .unwrap_err()
        .to_string();
    assert!(err.contains("HF_TOKEN") && err.contains("licence"), "{err}");
    let mut opts = hub.options(cache.path());
    opts.token = Some("hf_secret".into());
    let got = Hub::new(opts).fetch(&file).unwrap();
    assert_eq!(read(&got.path), content(file.path).0);
    let log = hub.log.lock().unwrap();
    assert!(log.auth.iter().all(|a| a == "Bearer hf_secret"));
    assert!(log.cdn_auth.is_empty(), "{:?}", log.cdn_auth);
}

#[test]
fn offline_mode_serves_the_cache_and_names_what_is_missing() {
    let hub = MockHub::start(Faults::default());
    let cache = tempfile::tempdir().unwrap();
    let mut opts = hub.options(cache.path());
    opts.offline = true;
    let err = ModelDir::resolve(None, &opts).unwrap_err().to_string();
    assert!(
        err.contains("stage_c_bf16.safetensors") && err.contains("ultrapixel download"),
        "{err}"
    );
    download(&Hub::new(hub.options(cache.path())), None, |_| {}).unwrap();
    let gets = hub.log.lock().unwrap().gets.len();
    let dir = ModelDir::resolve(None, &opts).unwrap();
    assert!(dir.path("stage_a.safetensors").unwrap().is_file());
    let client = Hub::new(opts);
    client.fetch(&cascade_file("stage_a.safetensors")).unwrap();
    assert_eq!(
        hub.log.lock().unwrap().gets.len(),
        gets,
        "offline: no request"
    );
}

#[test]
fn download_into_a_model_dir_writes_plain_files_and_skips_current_ones() {
    let hub = MockHub::start(Faults::default());
    let cache = tempfile::tempdir().unwrap();
    let target = tempfile::tempdir().unwrap();
    let client = Hub::new(hub.options(cache.path()));
    let dir = download(&client, Some(target.path()), |_| {}).unwrap();
    for f in MODEL_FILES {
        let p = target.path().join(f.name);
        assert_eq!(dir.path(f.name).unwrap(), p);
        assert_eq!(read(&p), content(f.name).0);
    }
    let mut again = 0;
    download(&client, Some(target.path()), |d| {
        again += d.fetched as usize
    })
    .unwrap();
    assert_eq!(again, 0);
    // A damaged file is noticed and fetched again.
    std::fs::write(target.path().join("stage_a.safetensors"), b"damaged").unwrap();
    let mut fixed = Vec::new();
    download(&client, Some(target.path()), |d| {
        if d.fetched {
            fixed.push(d.name)
        }
    })
    .unwrap();
    assert_eq!(fixed, ["stage_a.safetensors"]);
}

#[test]
fn the_download_command_uses_hf_endpoint_and_reports_each_file() {
    let hub = MockHub::start(Faults::default());
    let cache = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ultrapixel"))
        .args(["download", "-q"])
        .env("HF_ENDPOINT", &hub.endpoint)
        .env("HF_HUB_CACHE", cache.path())
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        out.matches("downloaded").count(),
        MODEL_FILES.len() + OPTIONAL_FILES.len(),
        "{out}"
    );
    assert!(out.contains("model files complete"), "{out}");
}

/// An optional file the hub lacks is left out of a download; the required ones complete it.
#[test]
fn a_missing_optional_file_does_not_fail_the_download() {
    let hub = MockHub::start(Faults {
        absent: Some("previewer.safetensors"),
        ..Faults::default()
    });
    let cache = tempfile::tempdir().unwrap();
    let client = Hub::new(hub.options(cache.path()));
    let mut names = Vec::new();
    let dir = download(&client, None, |d| names.push(d.name)).unwrap();
    assert_eq!(names.len(), MODEL_FILES.len());
    assert!(!names.contains(&"previewer.safetensors"));
    assert!(dir.optional("previewer.safetensors").is_none());
    for f in MODEL_FILES {
        assert!(dir.path(f.name).is_ok(), "{}", f.name);
    }
}

/// The ControlNet comes only on request: `download` leaves it out, `download_control` and
/// `download --control canny` fetch it (verified, once) into a model directory or the cache.
#[test]
fn the_controlnet_is_downloaded_only_on_request() {
    let hub = MockHub::start(Faults::default());
    let cache = tempfile::tempdir().unwrap();
    let target = tempfile::tempdir().unwrap();
    let client = Hub::new(hub.options(cache.path()));
    let name = CONTROL_FILES[0].name;
    assert_eq!(name, "controlnet/canny.safetensors");
    let dir = download(&client, Some(target.path()), |_| {}).unwrap();
    assert!(dir.optional(name).is_none());
    assert!(
        download_control(&client, Some(target.path()), name)
            .unwrap()
            .fetched
    );
    assert_eq!(read(&target.path().join(name)), content(name).0);
    assert!(
        !download_control(&client, Some(target.path()), name)
            .unwrap()
            .fetched
    );
    let dir = ModelDir::resolve(Some(target.path()), &HubOptions::from_vars(|_| None)).unwrap();
    assert_eq!(dir.optional(name), Some(target.path().join(name).as_path()));
    assert!(download_control(&client, None, "stage_a.safetensors").is_err());

    let cache = tempfile::tempdir().unwrap();
    let (code, out) = output(
        ultrapixel(&["download", "-q", "--control", "canny"])
            .env("HF_ENDPOINT", &hub.endpoint)
            .env("HF_HUB_CACHE", cache.path()),
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("downloaded  {name}")), "{out}");
    let cached = Hub::new(hub.options(cache.path())).cached(&CONTROL_FILES[0].repo_file());
    assert_eq!(read(&cached.unwrap().path), content(name).0);

    // The super-resolution ControlNet comes with the EfficientNet encoder.
    let target = tempfile::tempdir().unwrap();
    let (code, out) = output(
        ultrapixel(&["download", "-q", "--control", "sr", "--model-dir"])
            .arg(target.path())
            .env("HF_ENDPOINT", &hub.endpoint)
            .env("HF_HUB_CACHE", cache.path()),
    );
    assert_eq!(code, Some(0), "{out}");
    for name in [
        "controlnet/super_resolution.safetensors",
        "effnet_encoder.safetensors",
    ] {
        assert!(out.contains(&format!("downloaded  {name}")), "{out}");
        assert_eq!(read(&target.path().join(name)), content(name).0);
    }
    assert!(!target.path().join("controlnet/canny.safetensors").exists());
}

/// `ultrapixel ARGS` with none of the hub variables of the calling environment.
fn ultrapixel(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ultrapixel"));
    c.args(args);
    for v in [
        "HF_HOME",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_ENDPOINT",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "XDG_CACHE_HOME",
    ] {
        c.env_remove(v);
    }
    c
}

fn output(c: &mut Command) -> (Option<i32>, String) {
    let o = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code(), text)
}

/// An environment of these variables only.
fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| map.get(k).cloned()
}

fn cache_of(pairs: &[(&str, &str)]) -> PathBuf {
    HubOptions::from_vars(env_of(pairs)).cache_dir
}

/// Item 1 of issue 18: `~`, `~user`, `$VAR` and `${VAR}` in `HF_HOME`, `HF_HUB_CACHE`,
/// `HUGGINGFACE_HUB_CACHE`, `XDG_CACHE_HOME` and `HF_TOKEN_PATH`, as Python's
/// `expandvars(expanduser(...))` does in `huggingface_hub.constants`.
#[test]
fn cache_paths_expand_tilde_and_variables_as_huggingface_hub_does() {
    let home = ("HOME", "/home/u");
    assert_eq!(
        cache_of(&[home, ("HF_HUB_CACHE", "~/hfc")]),
        Path::new("/home/u/hfc")
    );
    assert_eq!(
        cache_of(&[home, ("HF_HUB_CACHE", "~")]),
        Path::new("/home/u")
    );
    assert_eq!(
        cache_of(&[home, ("HF_HOME", "~/h")]),
        Path::new("/home/u/h/hub")
    );
    assert_eq!(
        cache_of(&[home]),
        Path::new("/home/u/.cache/huggingface/hub")
    );
    let data = ("DATA", "/data");
    assert_eq!(
        cache_of(&[home, data, ("HF_HOME", "$DATA/hf")]),
        Path::new("/data/hf/hub")
    );
    assert_eq!(
        cache_of(&[home, data, ("HF_HUB_CACHE", "${DATA}/c-$DATA")]),
        Path::new("/data/c-/data")
    );
    assert_eq!(
        cache_of(&[home, data, ("HUGGINGFACE_HUB_CACHE", "$DATA/legacy")]),
        Path::new("/data/legacy")
    );
    assert_eq!(
        cache_of(&[home, ("XDG_CACHE_HOME", "~/xdg")]),
        Path::new("/home/u/xdg/huggingface/hub")
    );
    // Unknown variables and users stay as written; a variable set to "" is replaced.
    assert_eq!(
        cache_of(&[home, ("HF_HUB_CACHE", "/c/$NOPE/${NOPE}/~x/$")]),
        Path::new("/c/$NOPE/${NOPE}/~x/$")
    );
    assert_eq!(
        cache_of(&[home, ("HF_HUB_CACHE", "~no-such-user-x9/c")]),
        Path::new("~no-such-user-x9/c")
    );
    assert_eq!(
        cache_of(&[home, ("E", ""), ("HF_HUB_CACHE", "/x$E/y")]),
        Path::new("/x/y")
    );
    // Expansion happens once: a value holding `$` is not expanded again.
    assert_eq!(
        cache_of(&[home, ("A", "$DATA"), data, ("HF_HUB_CACHE", "$A/c")]),
        Path::new("$DATA/c")
    );
    // ~user: the user's home from the password database.
    if let Some(root_home) = std::fs::read_to_string("/etc/passwd").ok().and_then(|p| {
        p.lines()
            .find(|l| l.starts_with("root:"))
            .and_then(|l| l.split(':').nth(5).map(str::to_string))
    }) {
        assert_eq!(
            cache_of(&[home, ("HF_HUB_CACHE", "~root/c")]),
            Path::new(&root_home).join("c")
        );
    }
    // The token file too.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tok"), "hf_from_file\n").unwrap();
    let h = dir.path().to_str().unwrap();
    let o = HubOptions::from_vars(env_of(&[("HOME", h), ("HF_TOKEN_PATH", "~/tok")]));
    assert_eq!(o.token.as_deref(), Some("hf_from_file"));
}

/// Item 1, through the command: `HF_HUB_CACHE='~/hfc'` is the home's `hfc`, not `./~/hfc`.
#[test]
fn the_download_command_expands_tilde_in_hf_hub_cache() {
    let hub = MockHub::start(Faults::default());
    let home = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let (code, text) = output(
        ultrapixel(&["download", "-q"])
            .current_dir(cwd.path())
            .env("HOME", home.path())
            .env("HF_HUB_CACHE", "~/hfc")
            .env("HF_ENDPOINT", &hub.endpoint),
    );
    assert_eq!(code, Some(0), "{text}");
    assert!(
        home.path()
            .join("hfc/models--stabilityai--stable-cascade/snapshots")
            .is_dir(),
        "{text}"
    );
    assert!(!cwd.path().join("~").exists(), "a literal ./~ was created");
}

/// Item 2: `TRANSFORMERS_OFFLINE` counts as `HF_HUB_OFFLINE` when that one is unset or
/// empty (Python: `_is_true(HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)`).
#[test]
fn transformers_offline_is_offline_mode_as_in_huggingface_hub() {
    let offline = |pairs: &[(&str, &str)]| HubOptions::from_vars(env_of(pairs)).offline;
    assert!(offline(&[("TRANSFORMERS_OFFLINE", "1")]));
    assert!(offline(&[("TRANSFORMERS_OFFLINE", "yes")]));
    assert!(offline(&[
        ("HF_HUB_OFFLINE", ""),
        ("TRANSFORMERS_OFFLINE", "TRUE")
    ]));
    assert!(offline(&[("HF_HUB_OFFLINE", "on")]));
    assert!(!offline(&[
        ("HF_HUB_OFFLINE", "0"),
        ("TRANSFORMERS_OFFLINE", "1")
    ]));
    assert!(!offline(&[("TRANSFORMERS_OFFLINE", "0")]));
    assert!(!offline(&[("TRANSFORMERS_OFFLINE", " 1")]));
    assert!(!offline(&[]));

    let hub = MockHub::start(Faults::default());
    let cache = tempfile::tempdir().unwrap();
    let run = |offline: bool| {
        let mut c = ultrapixel(&["download", "-q"]);
        c.env("HF_HUB_CACHE", cache.path())
            .env("HF_ENDPOINT", &hub.endpoint);
        if offline {
            c.env("TRANSFORMERS_OFFLINE", "1");
        }
        output(&mut c)
    };
    let (code, text) = run(true);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("stage_c_bf16.safetensors"), "{text}");
    assert!(
        hub.log.lock().unwrap().requests.is_empty(),
        "offline: no request"
    );
    let (code, text) = run(false);
    assert_eq!(code, Some(0), "{text}");
    let before = hub.log.lock().unwrap().requests.len();
    let (code, text) = run(true);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("up to date"), "{text}");
    assert_eq!(
        hub.log.lock().unwrap().requests.len(),
        before,
        "offline: no request"
    );
}

/// Item 3: the download of a blob holds `.locks/models--owner--name/<etag>.lock` (an flock,
/// the lock `huggingface_hub` takes): while another process holds it, nothing is fetched.
#[test]
fn a_download_waits_for_the_blob_lock_huggingface_hub_takes() {
    use fs4::FileExt;
    let hub = MockHub::start(Faults::default());
    let cache = tempfile::tempdir().unwrap();
    let name = "stage_a.safetensors";
    let locks = cache
        .path()
        .join(".locks/models--stabilityai--stable-cascade");
    std::fs::create_dir_all(&locks).unwrap();
    let lock = std::fs::File::create(locks.join(format!("{}.lock", etag_of(name)))).unwrap();
    FileExt::lock(&lock).unwrap();
    let client = Hub::new(hub.options(cache.path()));
    let worker = std::thread::spawn(move || client.fetch(&cascade_file(name)).map(|c| c.path));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !worker.is_finished(),
        "the download did not wait for the lock"
    );
    assert_eq!(hub.gets_of(name), 0, "nothing fetched under another's lock");
    FileExt::unlock(&lock).unwrap();
    let path = worker.join().unwrap().unwrap();
    assert_eq!(read(&path), content(name).0);
    assert_eq!(hub.gets_of(name), 1);
}

/// Item 3: two downloads of one file at once both succeed, and the file is fetched once.
#[test]
fn two_concurrent_downloads_of_one_file_both_succeed_and_fetch_it_once() {
    let hub = MockHub::start(Faults {
        slow: true,
        ..Faults::default()
    });
    let cache = tempfile::tempdir().unwrap();
    let name = "stage_b_lite_bf16.safetensors";
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let client = Hub::new(hub.options(cache.path()));
            std::thread::spawn(move || client.fetch(&cascade_file(name)).map(|c| c.path))
        })
        .collect();
    for w in workers {
        let path = w.join().unwrap().unwrap();
        assert_eq!(read(&path), content(name).0);
    }
    assert_eq!(hub.gets_of(name), 1, "fetched once");
    let blobs = cache
        .path()
        .join("models--stabilityai--stable-cascade/blobs");
    let names: Vec<_> = std::fs::read_dir(blobs)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [etag_of(name).as_str()], "nothing but the blob");
}

/// Item 4: an LFS redirect without `X-Linked-Size`: its `Content-Length` is the redirect
/// page's, not the file's; the download is checked by its checksum (and, resumed, by the
/// length the storage host states).
#[test]
fn an_lfs_redirect_without_x_linked_size_downloads_verified_by_checksum() {
    for cut_once in [false, true] {
        let hub = MockHub::start(Faults {
            no_linked_size: true,
            cut_once,
            ..Faults::default()
        });
        let cache = tempfile::tempdir().unwrap();
        let client = Hub::new(hub.options(cache.path()));
        let name = "stage_a.safetensors";
        let remote = client.remote(&cascade_file(name)).unwrap();
        assert_eq!(
            remote.size, None,
            "the redirect's own length is not the file's"
        );
        let got = client.fetch(&cascade_file(name)).unwrap();
        assert_eq!(read(&got.path), content(name).0);
        if cut_once {
            let ranges = &hub.log.lock().unwrap().ranges;
            assert_eq!(ranges.len(), 1, "{ranges:?}");
        }
    }
    // A corrupt file is still refused.
    let hub = MockHub::start(Faults {
        no_linked_size: true,
        corrupt: true,
        ..Faults::default()
    });
    let cache = tempfile::tempdir().unwrap();
    let err = Hub::new(hub.options(cache.path()))
        .fetch(&cascade_file("stage_a.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
}

/// Item 5: a renamed repository answers with a redirect to its new name, relative or absolute
/// on the same host: both are followed with the token; the storage host never gets it.
#[test]
fn a_renamed_repository_is_followed_and_the_token_stays_on_the_hub() {
    let hub = MockHub::start(Faults {
        token: Some("hf_secret"),
        ..Faults::default()
    });
    let cache = tempfile::tempdir().unwrap();
    let mut opts = hub.options(cache.path());
    opts.token = Some("hf_secret".into());
    let client = Hub::new(opts);
    for repo in [RENAMED_ABSOLUTE, RENAMED_RELATIVE] {
        for path in ["stage_a.safetensors", "text_encoder/config.json"] {
            let file = RepoFile {
                repo,
                revision: "main",
                path,
            };
            let got = client
                .fetch(&file)
                .unwrap_or_else(|e| panic!("{repo}/{path}: {e}"));
            assert_eq!(read(&got.path), content(path).0, "{repo}/{path}");
            assert_eq!(got.commit, COMMIT);
        }
    }
    let log = hub.log.lock().unwrap();
    assert!(!log.auth.is_empty());
    assert!(log.auth.iter().all(|a| a == "Bearer hf_secret"));
    assert!(log.cdn_auth.is_empty(), "token sent to the storage host");
}

fn modified(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().ino()
}

/// Item 6: `refs/main` is left alone when it already names the commit, and replaced through
/// a temporary file and a rename when it changes.
#[test]
fn refs_are_written_only_when_they_change_and_then_atomically() {
    let hub = MockHub::start(Faults::default());
    let cache = tempfile::tempdir().unwrap();
    let client = Hub::new(hub.options(cache.path()));
    client.fetch(&cascade_file("stage_a.safetensors")).unwrap();
    let refs = cache
        .path()
        .join("models--stabilityai--stable-cascade/refs");
    let main = refs.join("main");
    let old = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000);
    std::fs::File::options()
        .write(true)
        .open(&main)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let before = inode(&main);
    client.fetch(&cascade_file("stage_a.safetensors")).unwrap();
    client.fetch(&cascade_file("tokenizer/vocab.json")).unwrap();
    assert_eq!(modified(&main), old, "an unchanged ref was rewritten");
    assert_eq!(inode(&main), before);

    std::fs::write(&main, "f".repeat(40)).unwrap();
    let before = inode(&main);
    client.fetch(&cascade_file("stage_a.safetensors")).unwrap();
    assert_eq!(std::fs::read_to_string(&main).unwrap(), COMMIT);
    assert_ne!(
        inode(&main),
        before,
        "a changed ref is replaced by a rename"
    );
    let names: Vec<_> = std::fs::read_dir(&refs)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["main"], "no temporary file left");
}

/// The row of the README's exit-code table for `code`.
fn readme_exit_row(code: i32) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table = readme
        .split("\n## Exit codes")
        .nth(1)
        .expect("README has an exit-code section");
    table
        .lines()
        .find(|l| l.starts_with(&format!("| {code} |")))
        .unwrap_or_else(|| panic!("README's exit-code table has no row for {code}"))
        .to_string()
}

/// Item 7: `download` exits as the README's table says: 1 for a failure a rerun may fix (the
/// network, the hub's servers, a corrupt transfer), 2 for what must change first (access,
/// offline with files missing).
#[test]
fn download_exit_codes_follow_the_readme_table() {
    let cache = tempfile::tempdir().unwrap();
    let download = |endpoint: &str, extra: &[(&str, &str)]| {
        let mut c = ultrapixel(&["download", "-q"]);
        c.env("HF_HUB_CACHE", cache.path())
            .env("HF_ENDPOINT", endpoint);
        for (k, v) in extra {
            c.env(k, v);
        }
        output(&mut c)
    };
    // Nothing listens there.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let (code, text) = download(&closed, &[]);
    assert_eq!(code, Some(1), "network failure: {text}");
    assert!(text.contains("run the command again"), "{text}");
    assert!(
        readme_exit_row(1).contains("network"),
        "{}",
        readme_exit_row(1)
    );

    let corrupt = MockHub::start(Faults {
        corrupt: true,
        ..Faults::default()
    });
    let (code, text) = download(&corrupt.endpoint, &[]);
    assert_eq!(code, Some(1), "corrupt transfer: {text}");
    assert!(text.contains("checksum mismatch"), "{text}");
    assert!(readme_exit_row(1).contains("corrupt"));

    let gated = MockHub::start(Faults {
        token: Some("hf_secret"),
        ..Faults::default()
    });
    let (code, text) = download(&gated.endpoint, &[]);
    assert_eq!(code, Some(2), "access denied: {text}");
    assert!(readme_exit_row(2).contains("access denied"));

    let (code, text) = download(&gated.endpoint, &[("HF_HUB_OFFLINE", "1")]);
    assert_eq!(code, Some(2), "offline with files missing: {text}");
    assert!(readme_exit_row(2).contains("offline"));
    assert!(readme_exit_row(0).contains("success"));
    assert!(readme_exit_row(130).contains("Ctrl-C"));
}

/// Item 3, into a model directory: one download at a time holds `DIR/.download.lock`.
#[test]
fn a_download_into_a_model_dir_waits_for_another_one() {
    use fs4::FileExt;
    let hub = MockHub::start(Faults::default());
    let cache = tempfile::tempdir().unwrap();
    let target = tempfile::tempdir().unwrap();
    let lock = std::fs::File::create(target.path().join(".download.lock")).unwrap();
    FileExt::lock(&lock).unwrap();
    let client = Hub::new(hub.options(cache.path()));
    let dir = target.path().to_path_buf();
    let worker = std::thread::spawn(move || download(&client, Some(&dir), |_| {}).map(|_| ()));
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        !worker.is_finished(),
        "the download did not wait for the lock"
    );
    assert!(hub.log.lock().unwrap().requests.is_empty());
    FileExt::unlock(&lock).unwrap();
    worker.join().unwrap().unwrap();
    assert!(target.path().join("stage_a.safetensors").is_file());
}
