//! Kernel benchmarks on the GPU: every op check at GPU size, timed with CUDA events over
//! replayed CUDA graphs, reported as achieved TFLOP/s or GB/s and as a ratio to the device
//! copy bandwidth measured in the same run. Shared by `ultrapixel bench` and the criterion
//! benches.

pub mod stages;

use crate::runtime::cuda::CudaDevice;
use crate::runtime::device::{Device, KernelSession};
use crate::runtime::session::{Session, SessionOptions};
use crate::verify::{all_checks, OpCheck, Scale};
use crate::Result;
use std::sync::Arc;

/// Bytes copied to measure the memory-bound ceiling.
const COPY_BYTES: usize = 1 << 30;

pub struct OpTiming {
    pub name: String,
    pub seconds: f64,
    pub flops: f64,
    pub bytes: f64,
}

impl OpTiming {
    /// One report line; `copy` is the measured copy bandwidth in bytes/s.
    pub fn line(&self, copy: f64) -> String {
        let us = self.seconds * 1e6;
        if self.flops > 0.0 {
            format!(
                "{:<80} {us:>10.1} us {:>8.1} TFLOP/s",
                self.name,
                self.flops / self.seconds / 1e12
            )
        } else {
            let bw = self.bytes / self.seconds;
            format!(
                "{:<80} {us:>10.1} us {:>8.0} GB/s ({:.0} % of copy)",
                self.name,
                bw / 1e9,
                100.0 * bw / copy
            )
        }
    }
}

/// A ready session of one check, for timing.
pub fn session(dev: &Arc<CudaDevice>, check: &OpCheck) -> Result<KernelSession> {
    let mut s = KernelSession::new(
        dev.clone(),
        check.graph.clone(),
        &check.weights,
        SessionOptions::default(),
        None,
    )?;
    for (id, v) in &check.inputs {
        s.set_input(*id, v)?;
    }
    Ok(s)
}

/// Times every op check; returns the copy bandwidth (bytes/s) and the timings.
pub fn run(
    dev: &Arc<CudaDevice>,
    iters: usize,
    filter: Option<&str>,
) -> Result<(f64, Vec<OpTiming>)> {
    let copy = dev.copy_bandwidth(COPY_BYTES, 20)?;
    let mut out = Vec::new();
    for check in all_checks(7, Scale::Gpu)? {
        if filter.is_some_and(|f| !check.name.contains(f)) {
            continue;
        }
        let mut s = session(dev, &check)?;
        let cost = s.cost();
        out.push(OpTiming {
            name: check.name.clone(),
            seconds: s.time(iters)?,
            flops: cost.flops,
            bytes: cost.bytes,
        });
    }
    Ok((copy, out))
}

/// `ultrapixel bench`: prints the table; exit code 0.
pub fn print(dev: &Arc<CudaDevice>, iters: usize, filter: Option<&str>) -> Result<()> {
    println!("device: {}", dev.describe());
    let (copy, timings) = run(dev, iters, filter)?;
    println!(
        "copy bandwidth: {:.0} GB/s (device-to-device, read + write)",
        copy / 1e9
    );
    for t in &timings {
        println!("{}", t.line(copy));
    }
    Ok(())
}
