//! `ultrapixel serve` through a real HTTP client (ureq) on loopback, on the tiny model and the
//! cpu backend: both APIs answer with PNGs bit-identical to `generate`'s, concurrent clients
//! each get their own seed, a full queue answers 429, a client that disconnects cancels its
//! job, bad requests answer 400 with the CLI's messages, a failing stage answers 500 and the
//! server serves on, SIGTERM exits 0, the metrics are exposed, and a token is required when
//! set. Every server listens on 127.0.0.1 port 0 and is killed when its test ends.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Every image of these tests: 512² with one step per stage (seconds on the cpu backend).
const SETTINGS: [&str; 6] = ["--size", "512x512", "--steps-c", "2", "--steps-b", "1"];

fn tiny_model() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_ultrapixel"))
            .args(["make-tiny-model", dir.path().to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        dir
    })
    .path()
}

/// A server process and everything it printed on stderr.
struct Server {
    child: Child,
    base: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// `serve` on the tiny model (or `model`) with `extra` options, once it is ready.
    fn start(model: Option<&Path>, extra: &[&str]) -> Server {
        let model = model.unwrap_or(tiny_model());
        let mut child = Command::new(env!("CARGO_BIN_EXE_ultrapixel"))
            .args(["serve", "--backend", "cpu", "--listen", "127.0.0.1:0"])
            .args(["--model-dir", model.to_str().unwrap()])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.to_string());
                }
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no `listening on`: {}", log.lock().unwrap()));
        let server = Server { child, base, log };
        server.wait_for(|s| s.get("/ready").0 == 200, "ready");
        server
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn get(&self, path: &str) -> (u16, String) {
        answer(agent().get(self.url(path)).call())
    }

    fn post(&self, path: &str, body: &str) -> (u16, String) {
        self.post_with(path, body, &[]).0
    }

    /// POST with extra headers: (status, body) and the Retry-After header.
    fn post_with(
        &self,
        path: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> ((u16, String), Option<String>) {
        let mut req = agent()
            .post(self.url(path))
            .header("Content-Type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send(body).unwrap();
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        (answer(Ok(r)), retry)
    }

    /// The value of the metric line starting with `name` (labels included), if any.
    fn metric(&self, name: &str) -> Option<f64> {
        let (status, text) = self.get("/metrics");
        assert_eq!(status, 200, "{text}");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    fn wait_for(&self, done: impl Fn(&Server) -> bool, what: &str) {
        let start = Instant::now();
        while !done(self) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "not {what} within 60 s: {}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Connects and sends `body` to `path` raw (to hang up at a chosen moment).
    fn raw_post(&self, path: &str, body: &str) -> TcpStream {
        let mut s = TcpStream::connect(self.base.trim_start_matches("http://")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        s
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .new_agent()
}

fn answer(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, String) {
    let mut r = r.unwrap();
    let status = r.status().as_u16();
    let body = r
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .unwrap();
    (status, body)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Width, height and RGB bytes of a PNG.
fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let (image, _) = ultrapixel::pipeline::decode_png(bytes).unwrap();
    (image.width, image.height, image.pixels)
}

fn b64_png(text: &serde_json::Value) -> (u32, u32, Vec<u8>) {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.as_str().unwrap())
        .unwrap();
    decode_png(&bytes)
}

/// The image `generate` makes for `prompt` and `seed` with [`SETTINGS`].
fn cli_image(prompt: &str, seed: u64) -> (u32, u32, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let out: PathBuf = dir.path().join("x.png");
    let o = Command::new(env!("CARGO_BIN_EXE_ultrapixel"))
        .args([
            "generate",
            "--backend",
            "cpu",
            "-q",
            "--seed",
            &seed.to_string(),
        ])
        .args(["--model-dir", tiny_model().to_str().unwrap()])
        .args(SETTINGS)
        .args(["--out", out.to_str().unwrap(), prompt])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    decode_png(&std::fs::read(out).unwrap())
}

fn openai_body(prompt: &str, seed: u64) -> String {
    serde_json::json!({
        "model": "ultrapixel", "prompt": prompt, "size": "512x512", "n": 1,
        "response_format": "b64_json", "seed": seed, "steps_c": 2, "steps_b": 1,
    })
    .to_string()
}

fn a1111_body(prompt: &str, seed: i64, steps: u32, stream: bool) -> String {
    serde_json::json!({
        "prompt": prompt, "negative_prompt": "", "width": 512, "height": 512, "steps": steps,
        "cfg_scale": 4.0, "seed": seed, "batch_size": 1, "steps_b": 1,
        "sampler_name": "Euler a", "stream": stream,
    })
    .to_string()
}

/// Reads the raw answer until `text` appears in it.
fn read_until(s: &mut TcpStream, text: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(text) {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "closed before {text:?}: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[test]
fn two_concurrent_clients_of_both_apis_get_their_own_seed_exact_images_and_metrics_count_them() {
    let server = Server::start(None, &["--devices", "0,1"]);
    assert_eq!(server.get("/health").0, 200);
    let (openai, a1111) = std::thread::scope(|s| {
        let a = s.spawn(|| server.post("/v1/images/generations", &openai_body("a red fox", 11)));
        let b = s.spawn(|| {
            server.post(
                "/sdapi/v1/txt2img",
                &a1111_body("a blue bird", 12, 2, false),
            )
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(openai.0, 200, "{}", openai.1);
    let openai = json(&openai.1);
    assert!(openai["created"].as_u64().unwrap() > 0);
    let data = openai["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(b64_png(&data[0]["b64_json"]), cli_image("a red fox", 11));

    assert_eq!(a1111.0, 200, "{}", a1111.1);
    let a1111 = json(&a1111.1);
    let images = a1111["images"].as_array().unwrap();
    assert_eq!(images.len(), 1);
    let image = b64_png(&images[0]);
    assert_eq!((image.0, image.1), (512, 512));
    assert_eq!(image, cli_image("a blue bird", 12));
    assert_eq!(a1111["parameters"]["seed"], 12);
    let info = json(a1111["info"].as_str().unwrap());
    assert_eq!(info["all_seeds"], serde_json::json!([12]));
    assert!(info["infotexts"][0].as_str().unwrap().contains("Seed: 12"));

    for (name, want) in [
        (
            r#"upx_requests_total{api="openai",outcome="ok"}"#,
            Some(1.0),
        ),
        (r#"upx_requests_total{api="a1111",outcome="ok"}"#, Some(1.0)),
        ("upx_queue_depth", Some(0.0)),
        ("upx_jobs_running", Some(0.0)),
        (r#"upx_stage_seconds_count{stage="stage_c"}"#, Some(2.0)),
        (r#"upx_stage_seconds_count{stage="stage_a"}"#, Some(2.0)),
        // The cpu backend has no GPU memory to report.
        (r#"upx_gpu_memory_free_bytes{device="0"}"#, None),
    ] {
        assert_eq!(server.metric(name), want, "{name}");
    }
    assert!(
        server
            .metric(r#"upx_load_seconds{device="1",part="model_load"}"#)
            .unwrap()
            > 0.0
    );
}

#[test]
fn bad_json_and_bad_sizes_answer_400_with_the_cli_messages() {
    let server = Server::start(None, &[]);
    let size_error = ultrapixel::Size::new(1001, 512).unwrap_err().to_string();
    let cases: Vec<(&str, String, String)> = vec![
        (
            "/v1/images/generations",
            "{not json".into(),
            "not valid".into(),
        ),
        ("/sdapi/v1/txt2img", "[1, 2]".into(), "not valid".into()),
        (
            "/v1/images/generations",
            r#"{"size": "512x512"}"#.into(),
            "missing field `prompt`".into(),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt": "x", "size": "1001x512"}"#.into(),
            size_error.clone(),
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"prompt": "x", "width": 1001, "height": 512}"#.into(),
            size_error,
        ),
        (
            "/v1/images/generations",
            r#"{"prompt": "x", "size": "big"}"#.into(),
            "expected WIDTHxHEIGHT".into(),
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"prompt": "  "}"#.into(),
            "the prompt is empty".into(),
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"prompt": "x", "steps": 0}"#.into(),
            "steps 0: must be from 1 to 1000".into(),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt": "x", "n": 0}"#.into(),
            "n 0: must be from 1 to 1000".into(),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt": "x", "response_format": "url"}"#.into(),
            "use b64_json".into(),
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"prompt": "x", "seed": -5}"#.into(),
            "seed -5".into(),
        ),
    ];
    for (path, body, want) in &cases {
        let (status, text) = server.post(path, body);
        assert_eq!(status, 400, "{path} {body}: {text}");
        let v = json(&text);
        let message = if path.starts_with("/v1/") {
            assert_eq!(v["error"]["type"], "invalid_request_error", "{text}");
            v["error"]["message"].as_str().unwrap().to_string()
        } else {
            v["detail"].as_str().unwrap().to_string()
        };
        assert!(message.contains(want.as_str()), "{path} {body}: {message}");
    }
    // The CLI prints the same words for the same mistake.
    let o = Command::new(env!("CARGO_BIN_EXE_ultrapixel"))
        .args(["generate", "x", "--backend", "cpu", "--steps-c", "0"])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("--steps-c 0: must be from 1 to 1000"));
    // Nothing was queued or run.
    assert_eq!(
        server.metric(r#"upx_requests_total{api="openai",outcome="bad_request"}"#),
        Some(6.0)
    );
    assert_eq!(
        server.metric(r#"upx_requests_total{api="a1111",outcome="bad_request"}"#),
        Some(5.0)
    );
    assert_eq!(
        server.metric(r#"upx_stage_seconds_count{stage="text_encoder"}"#),
        None
    );
}

#[test]
fn a_full_queue_answers_429_and_clients_that_disconnect_cancel_their_jobs() {
    let server = Server::start(None, &["--max-queue", "1"]);
    let long = a1111_body("a long job", 1, 1000, true);
    // The first runs (its progress shows), the second waits in the queue, the third is refused.
    let mut running = server.raw_post("/sdapi/v1/txt2img", &long);
    read_until(&mut running, "event: progress");
    let waiting = server.raw_post("/sdapi/v1/txt2img", &long);
    server.wait_for(|s| s.metric("upx_queue_depth") == Some(1.0), "queued");
    let ((status, text), retry) =
        server.post_with("/v1/images/generations", &openai_body("x", 3), &[]);
    assert_eq!(status, 429, "{text}");
    assert_eq!(json(&text)["error"]["type"], "rate_limit_error");
    assert!(retry.unwrap().parse::<u64>().unwrap() >= 1);

    // Hanging up cancels both: the running one at its next step, the queued one unstarted.
    drop(running);
    drop(waiting);
    let cancelled = r#"upx_requests_total{api="a1111",outcome="cancelled"}"#;
    server.wait_for(|s| s.metric(cancelled) == Some(2.0), "both cancelled");
    server.wait_for(|s| s.metric("upx_jobs_running") == Some(0.0), "idle");

    // A client that does not stream and hangs up mid-job cancels it too.
    let plain = server.raw_post("/sdapi/v1/txt2img", &a1111_body("x", 2, 1000, false));
    server.wait_for(|s| s.metric("upx_jobs_running") == Some(1.0), "running");
    drop(plain);
    server.wait_for(
        |s| s.metric(cancelled) == Some(3.0),
        "the plain one cancelled",
    );

    // The device is free again.
    let (status, text) = server.post("/v1/images/generations", &openai_body("x", 4));
    assert_eq!(status, 200, "{text}");
}

#[test]
fn a_failing_stage_answers_500_naming_it_and_the_server_serves_on() {
    let broken = common::broken_copy(tiny_model());
    let server = Server::start(Some(broken.path()), &[]);
    for _ in 0..2 {
        let (status, text) = server.post("/sdapi/v1/txt2img", &a1111_body("x", 5, 1, false));
        assert_eq!(status, 500, "{text}");
        let detail = json(&text)["detail"].as_str().unwrap().to_string();
        assert!(
            detail.starts_with("stage A failed: stage A produced"),
            "{detail}"
        );
    }
    // Streamed, the failure is the last event.
    let mut s = server.raw_post("/sdapi/v1/txt2img", &a1111_body("x", 5, 1, true));
    let events = read_until(&mut s, "event: error");
    assert!(events.contains("event: progress"), "{events}");
    assert_eq!(server.get("/health").0, 200);
    // Counted once the worker is done with the job, just after its last event.
    let failed = r#"upx_requests_total{api="a1111",outcome="failed"}"#;
    server.wait_for(|s| s.metric(failed) == Some(3.0), "three failures counted");
}

#[test]
fn sigterm_cancels_at_the_deadline_and_exits_0() {
    let mut server = Server::start(None, &["--shutdown-timeout", "1"]);
    let mut job = server.raw_post("/sdapi/v1/txt2img", &a1111_body("x", 6, 1000, true));
    read_until(&mut job, "event: progress");
    let sent = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    // The running job is cancelled at the deadline and told so.
    let events = read_until(&mut job, "event: error");
    assert!(events.contains(r#""status":503"#), "{events}");
    assert!(events.contains("shutting down"), "{events}");
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(sent.elapsed() < Duration::from_secs(20), "still running");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "{}", server.log.lock().unwrap());
    assert!(TcpStream::connect(server.base.trim_start_matches("http://")).is_err());
}

#[test]
fn with_a_token_file_requests_without_the_token_answer_401_and_it_is_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "s3cret-token-for-the-test";
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    let server = Server::start(None, &["--token-file", file.to_str().unwrap()]);
    let body = openai_body("x", 7);
    let ((status, text), _) = server.post_with("/v1/images/generations", &body, &[]);
    assert_eq!(status, 401, "{text}");
    assert_eq!(json(&text)["error"]["type"], "authentication_error");
    let wrong = [("Authorization", "Bearer wrong")];
    assert_eq!(
        server.post_with("/sdapi/v1/txt2img", &body, &wrong).0 .0,
        401
    );
    assert_eq!(server.get("/metrics").0, 401);
    // The probes need none.
    assert_eq!(server.get("/health").0, 200);
    let auth = format!("Bearer {secret}");
    let ((status, text), _) =
        server.post_with("/v1/images/generations", &body, &[("Authorization", &auth)]);
    assert_eq!(status, 200, "{text}");
    assert!(!server.log.lock().unwrap().contains(secret));
}
