//! Kernel benchmarks on the GPU: every op check at GPU size, timed with CUDA events over
//! replayed CUDA graphs, reported as achieved TFLOP/s or GB/s and as a ratio to the ceilings
//! measured in the same run (device copy bandwidth; a large bf16 matmul through cuBLASLt).
//! Shared by `ultrapixel bench` and the criterion benches; `stages` and `shapes` time whole
//! parts of a generation and the model's own GEMM and attention shapes.

pub mod serve;
pub mod shapes;
pub mod stages;
pub mod vendor;

use crate::ops::all_checks;
use crate::runtime::cuda::CudaDevice;
use crate::runtime::device::{Device, KernelSession};
use crate::runtime::session::{Session, SessionOptions};
use crate::verify::{OpCheck, Scale};
use crate::Result;
use rayon::prelude::*;
use std::sync::Arc;
use vendor::VendorGemm;

/// Bytes copied to measure the memory-bound ceiling.
const COPY_BYTES: usize = 1 << 30;

pub struct OpTiming {
    pub name: String,
    /// The kernels timed (`KernelSession::kernel_names`).
    pub kernels: Vec<String>,
    pub seconds: f64,
    pub flops: f64,
    pub bytes: f64,
}

/// The ceilings of one run: device copy bandwidth (bytes/s) and, where cuBLASLt is
/// usable, a large bf16 matmul's rate (FLOP/s), else why it was skipped.
#[derive(Clone, Debug)]
pub struct Ceilings {
    pub copy: f64,
    pub matmul: std::result::Result<f64, String>,
}

impl Ceilings {
    /// Measures both on `dev`; the matmul ceiling only with `vendor` (else its skip reason).
    pub fn measure(
        dev: &Arc<CudaDevice>,
        vendor: std::result::Result<&VendorGemm, &String>,
    ) -> Result<Self> {
        Ok(Ceilings {
            copy: dev.copy_bandwidth(COPY_BYTES, 20)?,
            matmul: match vendor {
                Ok(v) => Ok(v.ceiling(10)?),
                Err(why) => Err(why.clone()),
            },
        })
    }

    pub fn describe(&self) -> String {
        let matmul = match &self.matmul {
            Ok(m) => vendor::describe_ceiling(*m),
            Err(why) => format!("skipped: {why}"),
        };
        format!(
            "copy bandwidth: {:.0} GB/s (device-to-device, read + write); matmul ceiling: {matmul}",
            self.copy / 1e9
        )
    }
}

impl OpTiming {
    /// One report line, with the rate as a share of its ceiling and the kernels timed.
    pub fn line(&self, ceilings: &Ceilings) -> String {
        format!("{}  [{}]", self.measure(ceilings), self.kernels.join(" + "))
    }

    fn measure(&self, ceilings: &Ceilings) -> String {
        let us = self.seconds * 1e6;
        if self.flops > 0.0 {
            let rate = self.flops / self.seconds;
            let share = ceilings.matmul.as_ref().map_or(String::new(), |m| {
                format!(" ({:.0} % of matmul)", 100.0 * rate / m)
            });
            format!(
                "{:<80} {us:>10.1} us {:>8.1} TFLOP/s{share}",
                self.name,
                rate / 1e12
            )
        } else {
            let bw = self.bytes / self.seconds;
            format!(
                "{:<80} {us:>10.1} us {:>8.0} GB/s ({:.0} % of copy)",
                self.name,
                bw / 1e9,
                100.0 * bw / ceilings.copy
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

/// Times every op check; returns the ceilings measured in the same run and the timings.
pub fn run(
    dev: &Arc<CudaDevice>,
    iters: usize,
    filter: Option<&str>,
) -> Result<(Ceilings, Vec<OpTiming>)> {
    let vendor = VendorGemm::open(dev);
    let ceilings = Ceilings::measure(dev, vendor.as_ref())?;
    let mut out = Vec::new();
    for check in all_checks(7, Scale::Gpu)? {
        if filter.is_some_and(|f| !check.name.contains(f)) {
            continue;
        }
        let mut s = session(dev, &check)?;
        let cost = s.cost();
        out.push(OpTiming {
            name: check.name.clone(),
            kernels: s.kernel_names(),
            seconds: s.time(iters)?,
            flops: cost.flops,
            bytes: cost.bytes,
        });
    }
    Ok((ceilings, out))
}

/// `ultrapixel bench`: prints the table; exit code 0.
pub fn print(dev: &Arc<CudaDevice>, iters: usize, filter: Option<&str>) -> Result<()> {
    println!("device: {}", dev.describe());
    let (ceilings, timings) = run(dev, iters, filter)?;
    println!("{}", ceilings.describe());
    for t in &timings {
        println!("{}", t.line(&ceilings));
    }
    Ok(())
}

/// `n` values uniform in [−scale, scale), from SplitMix64 streams (parallel, reproducible).
pub(crate) fn uniform(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut v = vec![0f32; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let mut s = seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for x in out {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            *x = ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale;
        }
    });
    v
}

pub(crate) fn hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}
