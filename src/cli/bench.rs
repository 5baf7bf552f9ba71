//! `ultrapixel bench`: every kernel against the device's copy bandwidth; with --stages every
//! part of a generation, with --shapes every GEMM and attention shape, with --serve the
//! latency of `ultrapixel serve` as its clients see it.

use super::backend_arg::BackendArg;
use crate::runtime::device::Device;
use crate::runtime::Backend;
use crate::Result;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Timed runs per kernel (per part with --stages).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Only benchmarks whose name contains this text.
    #[arg(long)]
    pub filter: Option<String>,
    /// Time every part of a generation (text encoder, both Stage C passes, the INR
    /// reconstruction, Stage B, Stage A tiles) with random full-size weights, per --size.
    #[arg(long)]
    pub stages: bool,
    /// Time every distinct GEMM shape of a generation (ours and cuBLASLt's) and every
    /// attention shape, per --size.
    #[arg(long, conflicts_with = "stages")]
    pub shapes: bool,
    /// With --shapes: print the shapes as JSON (the PyTorch peer's input) and time nothing.
    #[arg(long, requires = "shapes")]
    pub list: bool,
    /// Output sizes for --stages and --shapes (repeatable).
    #[arg(long = "size", default_values_t = [
        crate::pipeline::Size { width: 1024, height: 1024 },
        crate::pipeline::Size { width: 2048, height: 2048 },
        crate::pipeline::Size { width: 4096, height: 4096 },
    ])]
    pub sizes: Vec<crate::pipeline::Size>,
    /// With --stages or --shapes: the tiny test configuration instead of the released one.
    #[arg(long)]
    pub tiny: bool,
    /// With --stages, --shapes or --serve: where to run (hostsim and cpu check the harness
    /// without a GPU).
    #[arg(long, value_enum, default_value_t = BackendArg::Cuda)]
    pub backend: BackendArg,
    /// Start `ultrapixel serve` on loopback and time it over HTTP: cold start by part, a
    /// warm pipeline's time to first step and time per image per --size (--iters requests
    /// each), throughput with one and two concurrent clients.
    #[arg(long, conflicts_with_all = ["stages", "shapes"])]
    pub serve: bool,
    /// With --serve: the model directory (default: the Hugging Face cache).
    #[arg(long, requires = "serve")]
    pub model_dir: Option<std::path::PathBuf>,
    /// With --serve: the server's --devices.
    #[arg(long, requires = "serve", default_value = "0")]
    pub devices: String,
    /// With --serve: Stage C steps of every request.
    #[arg(long, requires = "serve", default_value_t = crate::pipeline::Request::DEFAULT_STAGE_C.steps)]
    pub steps_c: u32,
    /// With --serve: Stage B steps of every request.
    #[arg(long, requires = "serve", default_value_t = crate::pipeline::Request::DEFAULT_STAGE_B.steps)]
    pub steps_b: u32,
}

pub fn bench(a: BenchArgs) -> Result<i32> {
    if a.serve {
        crate::bench::serve::print(&crate::bench::serve::ServeBench {
            model_dir: a.model_dir.as_deref(),
            backend: a.backend.name(),
            devices: &a.devices,
            sizes: &a.sizes,
            iters: a.iters.max(1),
            steps: (a.steps_c, a.steps_b),
        })?;
        return Ok(0);
    }
    if a.stages || a.shapes {
        return bench_model(a);
    }
    let dev = crate::backend::open_gpu(0)?;
    crate::bench::print(&dev, a.iters, a.filter.as_deref())?;
    Ok(0)
}

/// `bench --stages` and `bench --shapes`: the released (or tiny) networks at real shapes.
fn bench_model(a: BenchArgs) -> Result<i32> {
    let cfg = if a.tiny {
        crate::pipeline::tiny::tiny_configs()
    } else {
        crate::pipeline::open_models::Configs::default()
    };
    if a.list {
        let list = crate::bench::shapes::list_json(&cfg, &a.sizes)?;
        println!(
            "{}",
            serde_json::to_string_pretty(&list).expect("JSON of plain values")
        );
        return Ok(0);
    }
    let (device, cuda): (Arc<dyn Device>, _) = match super::backend_arg::open(a.backend)? {
        Backend::Cuda(d) => (d.clone(), Some(d)),
        #[cfg(feature = "hostsim")]
        Backend::Hostsim(d) => (d, None),
        Backend::Cpu => {
            return Err(crate::Error::InvalidArgument(
                "bench --stages and --shapes time the kernels: use --backend cuda or hostsim"
                    .into(),
            ))
        }
    };
    if a.stages {
        crate::bench::stages::print(&device, &cfg, &a.sizes, a.iters)?;
        return Ok(0);
    }
    let vendor = match &cuda {
        Some(d) => crate::bench::vendor::VendorGemm::open(d),
        None => Err("the emulator has no vendor library".to_string()),
    };
    let missing = vendor.as_ref().err().cloned().unwrap_or_default();
    crate::bench::shapes::print(
        &device,
        vendor.as_ref().ok(),
        &missing,
        &cfg,
        &a.sizes,
        a.iters,
    )?;
    Ok(0)
}
