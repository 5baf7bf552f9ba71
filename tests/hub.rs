//! The Hugging Face hub client against a mock hub on 127.0.0.1 (started by each test): the
//! cache layout, checksums, resume, gated repositories, tokens, offline mode.

use sha1::Sha1;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use ultrapixel::hub::{Hub, HubOptions, RepoFile};
use ultrapixel::pipeline::model_dir::{download, ModelDir, MODEL_FILES, OPTIONAL_FILES};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// How the mock misbehaves.
#[derive(Clone, Copy, Default)]
struct Faults {
    /// Serve other bytes than the checksum says.
    corrupt: bool,
    /// Cut the first download of each file halfway.
    cut_once: bool,
    /// Answer 401 unless the request carries this token.
    token: Option<&'static str>,
    /// Answer 404 for this file.
    absent: Option<&'static str>,
}

/// What the mock saw.
#[derive(Default)]
struct Log {
    gets: Vec<String>,
    ranges: Vec<String>,
    auth: Vec<String>,
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

impl MockHub {
    fn start(faults: Faults) -> MockHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Log::default()));
        let shared = log.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let log = shared.clone();
                std::thread::spawn(move || serve(stream, faults, &log));
            }
        });
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
}

fn serve(stream: TcpStream, faults: Faults, log: &Mutex<Log>) {
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
    let respond = |out: &mut TcpStream, status: &str, hdrs: &[(String, String)], body: &[u8]| {
        let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for (k, v) in hdrs {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let _ = out.write_all(head.as_bytes());
        let _ = out.write_all(body);
    };
    if let Some(a) = headers.get("authorization") {
        log.lock().unwrap().auth.push(a.clone());
    }
    if let Some(token) = faults.token {
        if headers.get("authorization") != Some(&format!("Bearer {token}")) {
            return respond(&mut out, "401 Unauthorized", &[], b"");
        }
    }
    if faults.absent.is_some_and(|a| target.ends_with(a)) {
        return respond(&mut out, "404 Not Found", &[], b"");
    }
    // /{owner}/{name}/resolve/main/{path}: HEAD gives the metadata (LFS files as the real
    // hub does: a redirect to the storage host carrying the headers); GET of an LFS file
    // redirects to /cdn/{path}, GET of a small file serves it.
    let (path, resolve) = match target.split_once("/resolve/main/") {
        Some((_, p)) => (p.to_string(), true),
        None => match target.strip_prefix("/cdn/") {
            Some(p) => (p.to_string(), false),
            None => return respond(&mut out, "404 Not Found", &[], b""),
        },
    };
    let (mut data, lfs) = content(&path);
    if resolve && (method == "HEAD" || lfs) {
        let tag = format!("\"{}\"", etag(&data, lfs));
        let mut hdrs = vec![("X-Repo-Commit".to_string(), COMMIT.to_string())];
        if lfs {
            hdrs.push(("X-Linked-Etag".into(), tag));
            hdrs.push(("X-Linked-Size".into(), data.len().to_string()));
            hdrs.push((
                "Location".into(),
                format!(
                    "{endpoint}/cdn/{path}",
                    endpoint = headers
                        .get("host")
                        .map(|h| format!("http://{h}"))
                        .unwrap_or_default()
                ),
            ));
            hdrs.push(("Content-Length".into(), "0".into()));
            return respond(&mut out, "302 Found", &hdrs, b"");
        }
        hdrs.push(("ETag".into(), tag));
        hdrs.push(("Content-Length".into(), data.len().to_string()));
        return respond(&mut out, "200 OK", &hdrs, b"");
    }
    if faults.corrupt {
        data[17] ^= 0xff;
    }
    log.lock().unwrap().gets.push(path.clone());
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
    let len = data.len();
    let cut = faults.cut_once && start == 0 && {
        let mut l = log.lock().unwrap();
        let first = !l.cut.contains(&path);
        if first {
            l.cut.push(path.clone());
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
    respond(&mut out, status, &hdrs, body)
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
    assert!(hub
        .log
        .lock()
        .unwrap()
        .auth
        .iter()
        .all(|a| a == "Bearer hf_secret"));
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
