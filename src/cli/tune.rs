//! `ultrapixel tune`: measures every candidate kernel of every distinct GEMM and attention
//! shape of a generation on this GPU and writes the winners to `<out-dir>/<device>.json`.

use super::backend_arg::BackendArg;
use super::tally::Tally;
use crate::pipeline::Size;
use crate::runtime::Backend;
use crate::tune::engine::{CudaEngine, Engine};
use crate::tune::tuner::{self, Options};
use crate::{Error, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct TuneArgs {
    /// Output sizes whose shapes are tuned (repeatable).
    #[arg(long = "size", default_values_t = [
        Size { width: 1024, height: 1024 },
        Size { width: 2048, height: 2048 },
        Size { width: 4096, height: 4096 },
    ])]
    pub sizes: Vec<Size>,
    /// Timed replays per candidate (default: as many as take --target-ms).
    #[arg(long)]
    pub iters: Option<usize>,
    /// Milliseconds of CUDA-graph replays per candidate.
    #[arg(long, default_value_t = 20.0)]
    pub target_ms: f64,
    /// cuBLASLt algorithms asked of its heuristic per variant.
    #[arg(long, default_value_t = 8)]
    pub algos: usize,
    /// Where the table goes (as `<device>.json`, e.g. nvidia-h200.json).
    #[arg(long, default_value = "tuning")]
    pub out_dir: PathBuf,
    /// The tiny test configuration instead of the released one.
    #[arg(long)]
    pub tiny: bool,
    /// Print the shapes that would be tuned (JSON) and time nothing.
    #[arg(long)]
    pub list: bool,
    /// Check the tuning table in use instead of tuning: every cuBLASLt and sm_90a GEMM winner,
    /// built as a GEMM node builds it under UPX_KERNELS=auto, against our portable kernel and
    /// for bit-identical reruns (exit 1 on a failure or without a table).
    #[arg(long, conflicts_with = "list")]
    pub check: bool,
    /// Where to run: hostsim checks the tuner without a GPU (our plain GEMM stands in for
    /// cuBLASLt there).
    #[arg(long, value_enum, default_value_t = BackendArg::Cuda)]
    pub backend: BackendArg,
}

pub fn tune(a: TuneArgs) -> Result<i32> {
    if a.algos == 0 || a.target_ms.is_nan() || a.target_ms <= 0.0 || a.iters == Some(0) {
        return Err(Error::InvalidArgument(
            "--algos, --target-ms and --iters must be positive".into(),
        ));
    }
    let cfg = if a.tiny {
        crate::pipeline::tiny::tiny_configs()
    } else {
        crate::pipeline::open_models::Configs::default()
    };
    if a.list {
        let (gemms, attention) = crate::tune::problems::problems(&cfg, &a.sizes)?;
        let list = crate::tune::problems::list_json(&gemms, &attention);
        println!(
            "{}",
            serde_json::to_string_pretty(&list).expect("JSON of plain values")
        );
        return Ok(0);
    }
    if a.check {
        let dev = match super::backend_arg::open(a.backend)? {
            Backend::Cuda(d) => d,
            _ => {
                return Err(Error::InvalidArgument(
                    "tune --check checks the table of a GPU: use --backend cuda".into(),
                ))
            }
        };
        let engine = CudaEngine::new(dev.clone());
        println!("device: {}", engine.describe());
        let (passed, failed) =
            tuner::check_table(&engine, &dev, &cfg, &mut std::io::stdout().lock())?;
        return Ok(Tally { passed, failed }.finish());
    }
    let engine: Box<dyn Engine> = match super::backend_arg::open(a.backend)? {
        Backend::Cuda(d) => Box::new(CudaEngine::new(d)),
        #[cfg(feature = "hostsim")]
        Backend::Hostsim(d) => Box::new(crate::tune::engine::HostsimEngine::new(d)),
        Backend::Cpu => {
            return Err(Error::InvalidArgument(
                "tune times the kernels: use --backend cuda or hostsim".into(),
            ))
        }
    };
    let opts = Options {
        target_seconds: a.target_ms / 1e3,
        algos: a.algos,
        iters: a.iters,
    };
    let started = std::time::Instant::now();
    let table = tuner::tune(
        engine.as_ref(),
        &cfg,
        &a.sizes,
        &opts,
        &mut std::io::stdout().lock(),
    )?;
    println!();
    for line in tuner::summary(&table) {
        println!("{line}");
    }
    std::fs::create_dir_all(&a.out_dir).map_err(|e| Error::io(&a.out_dir, e))?;
    let path = a.out_dir.join(table.key.file_name());
    let json = table.to_json();
    crate::atomic_file::write_atomic(&path, |w| {
        w.write_all(json.as_bytes())
            .map_err(|e| Error::io(&path, e))
    })?;
    println!(
        "wrote {} in {:.0} s (key: {} / cc {} / driver {} / cuBLASLt {} / kernels {})",
        path.display(),
        started.elapsed().as_secs_f64(),
        table.key.device_name,
        table.key.compute_capability,
        table.key.driver_version,
        table
            .key
            .cublaslt_version
            .map_or("none".into(), |v| v.to_string()),
        table.key.kernels_hash
    );
    Ok(0)
}
