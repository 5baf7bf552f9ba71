//! The vendor peer: bf16 GEMMs through cuBLASLt (loaded at run time, like the driver), timed
//! on our stream in the same way as our kernels. It gives the matmul ceiling of a benchmark
//! run and the per-shape peer of our GEMM.

use super::uniform;
use crate::runtime::cuda::CudaDevice;
use crate::{Error, Result};
use cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
use half::bf16;
use std::sync::Arc;

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

/// Why the vendor peer is missing, for the report, when `libcublasLt` cannot be loaded.
pub const MISSING: &str = "libcublasLt not found (put a CUDA 12 or 13 lib64 directory, or pip's \
                           nvidia/cublas/lib, on LD_LIBRARY_PATH)";

pub struct VendorGemm {
    dev: Arc<CudaDevice>,
    blas: CudaBlasLT,
}

impl VendorGemm {
    /// cuBLASLt on the device's stream; `None` when the library is not installed.
    pub fn open(dev: &Arc<CudaDevice>) -> Result<Option<Self>> {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            return Ok(None);
        }
        let blas = CudaBlasLT::new(dev.stream().clone())
            .map_err(|e| Error::cuda("creating a cuBLASLt handle", format!("{e:?}")))?;
        Ok(Some(VendorGemm {
            dev: dev.clone(),
            blas,
        }))
    }

    /// Device seconds of `C[M, N] = A[M, K] · W[N, K]ᵀ` (all row-major bf16, f32
    /// accumulation: our GEMM's contract without an epilogue), over `iters` replays.
    pub fn time(&self, m: usize, n: usize, k: usize, iters: usize) -> Result<f64> {
        let stream = self.dev.stream();
        let upload = |len: usize, seed: u64| {
            let host: Vec<bf16> = uniform(seed, len, 1.0)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            stream
                .clone_htod(&host)
                .map_err(|e| Error::cuda("uploading GEMM operands", format!("{e:?}")))
        };
        let a = upload(m * k, 1)?;
        let w = upload(n * k, 2)?;
        let mut c = stream
            .alloc_zeros::<bf16>(m * n)
            .map_err(|e| Error::cuda("allocating the GEMM output", format!("{e:?}")))?;
        // Column-major view of the row-major problem: Cᵀ[N, M] = W[N, K] · Aᵀ[K, M], so W is
        // the transposed first operand and A the second as stored.
        let cfg = MatmulConfig {
            transa: true,
            transb: false,
            transc: false,
            m: n as u64,
            n: m as u64,
            k: k as u64,
            alpha: 1.0,
            lda: k as i64,
            ldb: k as i64,
            beta: 0.0,
            ldc: n as i64,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        self.dev.time_work(iters, &mut || {
            // SAFETY: the operands hold M·K, N·K and M·N elements, as the config describes.
            unsafe { self.blas.matmul(cfg, &w, &a, &mut c, None, None) }
                .map_err(|e| Error::cuda(format!("cuBLASLt GEMM {m}x{n}x{k}"), format!("{e:?}")))
        })
    }

    /// The ceiling: FLOP/s of the large square matmul.
    pub fn ceiling(&self, iters: usize) -> Result<f64> {
        let d = CEILING_DIM;
        let seconds = self.time(d, d, d, iters)?;
        Ok(2.0 * (d * d * d) as f64 / seconds)
    }
}
