//! Latency of `ultrapixel serve` as a client sees it (`ultrapixel bench --serve`): this binary
//! started as a server on loopback, then over HTTP (the A1111 API, progress streamed):
//! cold start split into its parts, a warm pipeline's time to first step and time per image
//! per size, and throughput with one and with two concurrent clients.

use crate::pipeline::Size;
use crate::{Error, Result};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What to start and what to ask.
pub struct ServeBench<'a> {
    pub model_dir: Option<&'a Path>,
    pub backend: &'a str,
    pub devices: &'a str,
    pub sizes: &'a [Size],
    /// Warm requests per size (and per client for throughput).
    pub iters: usize,
    pub steps: (u32, u32),
}

/// The server under test; killed if the bench fails half-way.
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn failed(what: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("bench --serve: {what}"))
}

/// Runs the whole measurement and prints it.
pub fn print(b: &ServeBench) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| failed(format!("own executable: {e}")))?;
    // Process start: the binary's own start and exit, best of three.
    let process = (0..3)
        .map(|_| {
            let t = Instant::now();
            Command::new(&exe)
                .arg("--version")
                .output()
                .map_err(failed)?;
            Ok(t.elapsed().as_secs_f64())
        })
        .collect::<Result<Vec<f64>>>()?
        .into_iter()
        .fold(f64::INFINITY, f64::min);

    let started = Instant::now();
    let mut cmd = Command::new(&exe);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--backend", b.backend])
        .args(["--devices", b.devices, "--max-queue", "64"])
        .stderr(Stdio::piped());
    if let Some(dir) = b.model_dir {
        cmd.arg("--model-dir").arg(dir);
    }
    let mut child = cmd.spawn().map_err(failed)?;
    let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
    let mut server = Server {
        child,
        base: String::new(),
    };
    let mut listening = 0.0;
    for line in lines.by_ref() {
        let line = line.map_err(failed)?;
        if let Some(base) = line.strip_prefix("listening on ") {
            server.base = base.to_string();
            listening = started.elapsed().as_secs_f64();
        } else if line.starts_with("ready") {
            break;
        } else if line.starts_with("error") {
            return Err(failed(format!("the server did not start: {line}")));
        }
    }
    let ready = started.elapsed().as_secs_f64();
    // Keep draining its stderr so that it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let metrics = get(&server, "/metrics")?;
    let load = |part: &str| {
        let prefix = format!("upx_load_seconds{{device=\"0\",part=\"{part}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let first_size = *b.sizes.first().ok_or_else(|| failed("no --size"))?;
    let first = generate(&server, first_size, b.steps, 0)?;
    let cuda = b.backend == "cuda";
    println!(
        "ultrapixel serve, backend {}, devices {}",
        b.backend, b.devices
    );
    println!("cold start:");
    println!("  process start (exec to exit of --version)   {process:>9.3} s");
    println!("  exec to listening                             {listening:>9.3} s");
    println!(
        "  backend open{}                  {:>9.3} s",
        if cuda {
            " (CUDA init)     "
        } else {
            " (no CUDA: CPU)  "
        },
        load("backend_open")
    );
    println!(
        "  model load (files, checks)                    {:>9.3} s",
        load("model_load")
    );
    println!("  exec to ready                                 {ready:>9.3} s");
    println!(
        "  first image {first_size}{} {:>9.3} s (first step after {:.3} s)",
        if cuda {
            " (weight upload incl.)"
        } else {
            " (no upload on CPU)   "
        },
        first.total,
        first.first_step
    );
    println!("warm pipeline (median of {}):", b.iters);
    for &size in b.sizes {
        let runs = (0..b.iters)
            .map(|i| generate(&server, size, b.steps, 1 + i as i64))
            .collect::<Result<Vec<_>>>()?;
        let first_step = median(runs.iter().map(|r| r.first_step).collect());
        let total = median(runs.iter().map(|r| r.total).collect());
        println!(
            "  {size:<11} time to first step {first_step:>8.3} s   time per image {total:>8.3} s"
        );
    }
    let one = throughput(&server, first_size, b.steps, 1, b.iters)?;
    let two = throughput(&server, first_size, b.steps, 2, b.iters)?;
    println!(
        "throughput at {first_size}: 1 client {one:.3} images/s, 2 concurrent clients {two:.3} \
         images/s ({:.2}x)",
        two / one
    );
    let term = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .map_err(failed)?;
    let code = server.child.wait().map_err(failed)?;
    if !term.success() || code.code() != Some(0) {
        return Err(failed(format!(
            "the server did not exit 0 on SIGTERM: {code}"
        )));
    }
    Ok(())
}

/// One request's times, seconds from sending it.
struct Timed {
    first_step: f64,
    total: f64,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(3600)))
        .build()
        .new_agent()
}

fn get(server: &Server, path: &str) -> Result<String> {
    agent()
        .get(format!("{}{path}", server.base))
        .call()
        .and_then(|mut r| r.body_mut().read_to_string())
        .map_err(|e| failed(format!("GET {path}: {e}")))
}

/// One streamed A1111 request: when its first sampler step came, when its result did.
fn generate(
    server: &Server,
    size: Size,
    (steps_c, steps_b): (u32, u32),
    seed: i64,
) -> Result<Timed> {
    let body = serde_json::json!({
        "prompt": "a lighthouse at dusk, photo", "width": size.width, "height": size.height,
        "steps": steps_c, "steps_b": steps_b, "seed": seed, "stream": true,
    });
    let sent = Instant::now();
    let response = agent()
        .post(format!("{}/sdapi/v1/txt2img", server.base))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .map_err(|e| failed(format!("POST: {e}")))?;
    let mut first_step = None;
    let mut event = String::new();
    for line in BufReader::new(response.into_body().into_reader()).lines() {
        let line = line.map_err(failed)?;
        if let Some(name) = line.strip_prefix("event: ") {
            event = name.to_string();
        } else if let Some(data) = line.strip_prefix("data: ") {
            match event.as_str() {
                "progress" if first_step.is_none() && data.contains("\"step\":1,") => {
                    first_step = Some(sent.elapsed().as_secs_f64())
                }
                "result" => {
                    return Ok(Timed {
                        first_step: first_step.unwrap_or(f64::NAN),
                        total: sent.elapsed().as_secs_f64(),
                    })
                }
                "error" => return Err(failed(format!("the server answered: {data}"))),
                _ => {}
            }
        }
    }
    Err(failed("the stream ended without a result"))
}

/// Images per second with `clients` clients sending `iters` requests each.
fn throughput(
    server: &Server,
    size: Size,
    steps: (u32, u32),
    clients: usize,
    iters: usize,
) -> Result<f64> {
    let started = Instant::now();
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..clients)
            .map(|c| {
                s.spawn(move || -> Result<()> {
                    for i in 0..iters {
                        generate(server, size, steps, (100 * c + i) as i64)?;
                    }
                    Ok(())
                })
            })
            .collect();
        runs.into_iter()
            .try_for_each(|r| r.join().expect("a client thread panicked"))
    })?;
    Ok((clients * iters) as f64 / started.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
