//! `ultrapixel bench`: every kernel against the device's copy bandwidth; with --stages every
//! part of a generation, with --shapes every GEMM and attention shape.

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
    /// With --stages or --shapes: where to run (hostsim checks the harness without a GPU).
    #[arg(long, value_enum, default_value_t = BackendArg::Cuda)]
    pub backend: BackendArg,
}

pub fn bench(a: BenchArgs) -> Result<i32> {
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
