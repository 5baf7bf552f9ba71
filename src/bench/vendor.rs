//! The vendor peer: bf16 GEMMs through cuBLASLt (loaded at run time, like the driver), timed
//! on our stream in the same way as our kernels. It gives the matmul ceiling of a benchmark
//! run and the per-shape peer of our GEMM. cuBLASLt is opened through the tuner's layer
//! ([`crate::runtime::cuda::cublaslt`]): its handle and workspace are ours, so a failed allocation is
//! an error that skips the peer, where cudarc's `CudaBlasLT::new` would panic.

use super::uniform;
use crate::runtime::cuda::cublaslt::{Lt, LtMatmul, LtSpec};
use crate::runtime::cuda::CudaDevice;
use crate::runtime::device::Device;
use crate::tensor::{encode, DType};
use crate::{Error, Result};
use std::sync::Arc;

pub use crate::runtime::cuda::cublaslt::MISSING;

/// The square bf16 matmul whose rate is the tensor-core ceiling of a run.
pub const CEILING_DIM: usize = 8192;

/// The ceiling's report: its rate and what was measured.
pub fn describe_ceiling(flops_per_second: f64) -> String {
    format!(
        "{:.0} TFLOP/s (cuBLASLt bf16 {d}x{d}x{d})",
        flops_per_second / 1e12,
        d = CEILING_DIM
    )
}

pub struct VendorGemm {
    dev: Arc<CudaDevice>,
    lt: Lt,
}

impl VendorGemm {
    /// cuBLASLt on the device's stream; `Err` says why the peer is skipped (the library is
    /// not installed, its workspace cannot be allocated, no handle).
    pub fn open(dev: &Arc<CudaDevice>) -> std::result::Result<Self, String> {
        Ok(VendorGemm {
            dev: dev.clone(),
            lt: Lt::open(dev)?,
        })
    }

    /// Device seconds of `C[M, N] = A[M, K] · W[N, K]ᵀ` (all row-major bf16, f32
    /// accumulation: our GEMM's contract without an epilogue), over `iters` replays, with
    /// the heuristic's first algorithm.
    pub fn time(&self, m: usize, n: usize, k: usize, iters: usize) -> Result<f64> {
        let upload = |len: usize, seed: u64| -> Result<_> {
            let buf = self.dev.alloc(len * 2)?;
            self.dev
                .write(buf.ptr, &encode(&uniform(seed, len, 1.0), DType::BF16))?;
            Ok(buf)
        };
        let a = upload(m * k, 1)?;
        let w = upload(n * k, 2)?;
        let c = self.dev.alloc(m * n * 2)?;
        let what = format!("cuBLASLt GEMM {m}x{n}x{k}");
        let spec = LtSpec {
            m,
            n,
            k,
            product: DType::BF16,
            bias: false,
            residual_as_c: false,
        };
        let mm = LtMatmul::new(spec, 0).map_err(|e| Error::cuda(&what, e))?;
        let algo = mm
            .heuristics(&self.lt, 1)
            .map_err(|e| Error::cuda(&what, e))?
            .first()
            .ok_or_else(|| Error::cuda(&what, "the heuristic found no algorithm"))?
            .algo;
        let stream = self.dev.stream().cu_stream() as usize;
        self.dev.time_work(iters, &mut || {
            // SAFETY: the operands hold M·K, N·K and M·N elements, as the spec describes, on
            // the device's stream.
            unsafe { mm.enqueue(&self.lt, &algo, a.ptr, w.ptr, 0, c.ptr, stream) }
                .map_err(|e| Error::cuda(&what, e))
        })
    }

    /// The ceiling: FLOP/s of the large square matmul.
    pub fn ceiling(&self, iters: usize) -> Result<f64> {
        let d = CEILING_DIM;
        let seconds = self.time(d, d, d, iters)?;
        Ok(2.0 * (d * d * d) as f64 / seconds)
    }
}
