//! `ultrapixel serve`: the options of the HTTP server (crate::serve), and loading one pipeline
//! per device the way `generate` loads its one.

use super::backend_arg::{self, BackendArg};
use super::generate::resolve_models;
use crate::hub::HubOptions;
use crate::pipeline::{Pipeline, PipelineOptions};
use crate::serve::{ServeConfig, Token};
use crate::{Error, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// A directory with the model files (default: the Hugging Face cache, downloading what
    /// is missing).
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Where to run: cuda (NVIDIA GPUs), or on the CPU hostsim or cpu (the tiny test model
    /// only; see `generate --help`).
    #[arg(long, value_enum, default_value_t = BackendArg::Cuda)]
    pub backend: BackendArg,
    /// Address and port to listen on; the default takes connections from this machine only
    /// (use 0.0.0.0:7860 in a container, with --token-file beyond a private network).
    #[arg(long, default_value = "127.0.0.1:7860")]
    pub listen: SocketAddr,
    /// GPUs to load the model on (one job at a time on each), e.g. 0,1; on the CPU backends
    /// each entry is one more worker with its own copy of the model.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub devices: Vec<usize>,
    /// Requests that may wait for a device; one more answers 429 with Retry-After.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_queue: u32,
    /// A file holding a bearer token: every request but /health and /ready must then send
    /// `Authorization: Bearer <token>` (401 without it). The token is never logged.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// After SIGTERM, seconds that running and queued jobs have to finish before they are
    /// cancelled (the process then exits 0).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Free each stage's weights after it ran (less GPU memory, slower requests).
    #[arg(long)]
    pub low_vram: bool,
    /// Plan as if each GPU had this many MiB free.
    #[arg(long, value_name = "MIB")]
    pub memory_limit: Option<u64>,
}

/// Runs `serve` until SIGTERM; the exit code.
pub fn serve(args: ServeArgs) -> Result<i32> {
    let mut seen = std::collections::BTreeSet::new();
    if let Some(d) = args.devices.iter().find(|d| !seen.insert(**d)) {
        return Err(Error::InvalidArgument(format!(
            "--devices lists device {d} twice: list each once"
        )));
    }
    let token = args.token_file.as_deref().map(Token::read).transpose()?;
    let config = ServeConfig {
        listen: args.listen,
        max_queue: args.max_queue as usize,
        token,
        shutdown_deadline: Duration::from_secs(args.shutdown_timeout),
    };
    crate::serve::run(config, move |record| {
        let hub = HubOptions {
            progress: false,
            ..HubOptions::from_env()
        };
        let dir = resolve_models(args.model_dir.as_deref(), &hub, false)?;
        let options = PipelineOptions {
            low_vram: args.low_vram,
            memory_limit: args.memory_limit.map(|m| m << 20),
            ..PipelineOptions::default()
        };
        let mut loaded = Vec::new();
        for (device, &ordinal) in args.devices.iter().enumerate() {
            let started = Instant::now();
            let backend = backend_arg::open_device(args.backend, ordinal)?;
            let open_seconds = started.elapsed().as_secs_f64();
            let started = Instant::now();
            let pipeline = Pipeline::load(&dir, backend, options.clone())?;
            let load_seconds = started.elapsed().as_secs_f64();
            for w in pipeline.warnings() {
                eprintln!("warning: {w}");
            }
            record(device, "backend_open", open_seconds);
            record(device, "model_load", load_seconds);
            loaded.push(pipeline);
        }
        Ok(loaded)
    })?;
    Ok(0)
}
