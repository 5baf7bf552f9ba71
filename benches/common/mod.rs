//! What the GPU benchmarks share: opening the GPU (or printing why they skip) and timing a
//! ready session under criterion.

use criterion::measurement::WallTime;
use criterion::BenchmarkGroup;
use std::sync::Arc;
use std::time::Duration;
use ultrapixel::runtime::cuda::CudaDevice;
use ultrapixel::runtime::device::KernelSession;
use ultrapixel::runtime::{Backend, BackendKind};

/// The CUDA device, or None after printing "skipped: no GPU (why)".
pub fn gpu() -> Option<Arc<CudaDevice>> {
    match Backend::open(BackendKind::Cuda) {
        Ok(Backend::Cuda(d)) => Some(d),
        Ok(_) => unreachable!("opened the cuda backend"),
        Err(e) => {
            println!("skipped: no GPU ({e})");
            None
        }
    }
}

/// Adds `name` to `group`, each sample timed by the session itself (CUDA events over replayed
/// CUDA graphs) rather than by the wall clock around the launches.
pub fn bench_session(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, s: &mut KernelSession) {
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            Duration::from_secs_f64(s.time(iters as usize).expect("timing") * iters as f64)
        })
    });
}
