//! cuBLASLt through cudarc's `result`/`sys` layers, with our own handle and workspace:
//! cudarc's `CudaBlasLT` panics when its workspace cannot be allocated (and when its handle
//! cannot be destroyed), asks the heuristic for one algorithm per call and cannot replay a
//! chosen one. Here every failure is an error, the heuristic returns several algorithms, and
//! an algorithm is plain data (its 64 bytes) that the tuner records and a GEMM node replays.
//!
//! Our row-major problem `D[M, N] = A[M, K]·W[N, K]ᵀ (+ bias[N]) (+ C[M, N])` is cuBLASLt's
//! column-major `Dᵀ[N, M] = op(W)·Aᵀ` with W transposed: cuBLASLt's "A" is our W (`K × N`,
//! leading dimension K, transposed), its "B" our A (`K × M`, leading dimension K), C and D
//! `N × M` with leading dimension N; the bias runs along cuBLASLt's rows, i.e. our N.

use super::CudaDevice;
use crate::runtime::device::{Device, DeviceBuffer};
use crate::runtime::launch::VendorCall;
use crate::tensor::DType;
use cudarc::cublaslt::result;
use cudarc::cublaslt::sys;
use serde::{Deserialize, Serialize};
use std::ffi::c_void;
use std::sync::Arc;

/// A `cublasLtMatmulAlgo_t` and its readable configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AlgoRecord {
    /// The 64 bytes of the structure, hex.
    pub bytes: String,
    pub id: i64,
    pub tile_id: i64,
    pub stages_id: i64,
    pub splitk: i64,
    pub reduction_scheme: i64,
    pub cta_swizzling: i64,
    pub custom_option: i64,
    pub inner_shape_id: i64,
    pub cluster_shape_id: i64,
    /// Workspace the heuristic said it needs.
    pub workspace_bytes: u64,
    pub waves: f32,
}

/// Why cuBLASLt is missing when the library cannot be loaded.
pub const MISSING: &str = "libcublasLt not found (put a CUDA 12 or 13 lib64 directory, or pip's \
                           nvidia/cublas/lib, on LD_LIBRARY_PATH)";

/// The version of the installed cuBLASLt (e.g. 130002), None when it cannot be loaded.
pub fn library_version() -> Option<u64> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { sys::is_culib_present() } {
        return None;
    }
    // A library without the symbol panics inside cudarc's loader: treat it as missing.
    // SAFETY: a plain query without arguments.
    std::panic::catch_unwind(|| unsafe { sys::cublasLtGetVersion() } as u64).ok()
}

/// A cuBLASLt handle with its workspace (which keeps the device's context alive).
pub struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: DeviceBuffer,
    version: u64,
}

// SAFETY: the handle is used from one thread at a time (the tuner's or the executor's).
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Lt {
    /// Opens cuBLASLt on `dev` with a workspace of our own (32 MiB on compute
    /// capability 9.x and later, 4 MiB before: NVIDIA's recommendation). `Err` says why
    /// cuBLASLt is unavailable (library missing, no memory for the workspace, no handle):
    /// callers report the vendor path as skipped.
    pub fn open(dev: &CudaDevice) -> Result<Lt, String> {
        let version = library_version().ok_or_else(|| MISSING.to_string())?;
        let bytes = if dev.info().compute_capability.0 >= 9 {
            32 << 20
        } else {
            4 << 20
        };
        let workspace = dev.alloc(bytes).map_err(|e| {
            format!(
                "cannot allocate cuBLASLt's {} MiB workspace: {e}",
                bytes >> 20
            )
        })?;
        let handle = std::panic::catch_unwind(result::create_handle)
            .map_err(|_| "cuBLASLt lacks cublasLtCreate".to_string())?
            .map_err(|e| format!("creating a cuBLASLt handle: {e:?}"))?;
        Ok(Lt {
            handle,
            workspace,
            version,
        })
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn workspace_bytes(&self) -> usize {
        self.workspace.bytes
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: destroying the handle we created, once; errors cannot be reported here.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

fn lt_error(what: &str, e: result::CublasError) -> String {
    format!("{what}: {e:?}")
}

/// One GEMM in cuBLASLt's terms (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LtSpec {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// D's (and C's) dtype; A and W are bf16, accumulation f32.
    pub product: DType,
    /// cuBLASLt's BIAS epilogue with an f32 bias vector of N.
    pub bias: bool,
    /// β = 1 with C = the residual (D separate); else β = 0 and C = D.
    pub residual_as_c: bool,
}

/// How a call's description begins (launch lists, `info`'s census).
pub const CALL_PREFIX: &str = "cuBLASLt ";

impl LtSpec {
    /// The call in reports: `cuBLASLt 4096x1280x1280 ->f32 +bias`.
    pub fn describe(&self) -> String {
        format!(
            "{CALL_PREFIX}{}x{}x{} ->{}{}{}",
            self.m,
            self.n,
            self.k,
            self.product.suffix(),
            if self.bias { " +bias" } else { "" },
            if self.residual_as_c { " +C" } else { "" }
        )
    }
}

fn data_type(d: DType) -> sys::cudaDataType {
    match d {
        DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
    }
}

struct Layout(sys::cublasLtMatrixLayout_t);

impl Layout {
    fn new(dtype: sys::cudaDataType, rows: usize, cols: usize, ld: usize) -> Result<Self, String> {
        result::create_matrix_layout(dtype, rows as u64, cols as u64, ld as i64)
            .map(Layout)
            .map_err(|e| lt_error("creating a cuBLASLt matrix layout", e))
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: destroying the layout we created, once.
        let _ = unsafe { result::destroy_matrix_layout(self.0) };
    }
}

struct Desc(sys::cublasLtMatmulDesc_t);

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: destroying the descriptor we created, once.
        let _ = unsafe { result::destroy_matmul_desc(self.0) };
    }
}

/// # Safety
/// `desc` must be live; `T` must be the attribute's type.
unsafe fn set_desc<T>(
    desc: &Desc,
    attr: sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<(), String> {
    result::set_matmul_desc_attribute(
        desc.0,
        attr,
        value as *const T as *const c_void,
        std::mem::size_of::<T>(),
    )
    .map_err(|e| lt_error(&format!("setting {attr:?}"), e))
}

/// The descriptors of one [`LtSpec`], with its bias pointer bound (cuBLASLt keeps the bias
/// address in the operation descriptor).
pub struct LtMatmul {
    pub spec: LtSpec,
    desc: Desc,
    a: Layout,
    b: Layout,
    c: Layout,
    d: Layout,
}

// SAFETY: descriptors are host-side data, used by one thread at a time.
unsafe impl Send for LtMatmul {}
unsafe impl Sync for LtMatmul {}

/// One algorithm: the heuristic's structure, as cuBLASLt wants it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Algo(pub sys::cublasLtMatmulAlgo_t);

/// An algorithm the heuristic proposed, with what it said about it.
#[derive(Clone, Copy, Debug)]
pub struct Heuristic {
    pub algo: Algo,
    pub workspace_bytes: usize,
    pub waves: f32,
}

impl LtMatmul {
    pub fn new(spec: LtSpec, bias_ptr: u64) -> Result<LtMatmul, String> {
        let (m, n, k) = (spec.m, spec.n, spec.k);
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map(Desc)
        .map_err(|e| lt_error("creating a cuBLASLt matmul descriptor", e))?;
        use sys::cublasLtMatmulDescAttributes_t as A;
        // SAFETY: live descriptor; each value has its attribute's type (cublasOperation_t
        // and cudaDataType are 32-bit, the bias pointer a 64-bit device address).
        unsafe {
            set_desc(&desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &1i32)?;
            set_desc(&desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &0i32)?;
            let epilogue = if spec.bias {
                sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
            } else {
                sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
            };
            set_desc(&desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
            if spec.bias {
                set_desc(&desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr)?;
                let f32_type = sys::cudaDataType_t::CUDA_R_32F as i32;
                set_desc(&desc, A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &f32_type)?;
            }
        }
        let bf16 = data_type(DType::BF16);
        let out = data_type(spec.product);
        Ok(LtMatmul {
            spec,
            desc,
            a: Layout::new(bf16, k, n, k)?,
            b: Layout::new(bf16, k, m, k)?,
            c: Layout::new(out, n, m, n)?,
            d: Layout::new(out, n, m, n)?,
        })
    }

    /// Up to `count` algorithms, best first by the heuristic, within `lt`'s workspace. Empty
    /// when cuBLASLt supports no algorithm for this combination.
    pub fn heuristics(&self, lt: &Lt, count: usize) -> Result<Vec<Heuristic>, String> {
        let pref = result::create_matmul_pref()
            .map_err(|e| lt_error("creating a cuBLASLt preference", e))?;
        struct Pref(sys::cublasLtMatmulPreference_t);
        impl Drop for Pref {
            fn drop(&mut self) {
                // SAFETY: destroying the preference we created, once.
                let _ = unsafe { result::destroy_matmul_pref(self.0) };
            }
        }
        let pref = Pref(pref);
        let limit = lt.workspace_bytes() as u64;
        // SAFETY: live preference; the attribute is a uint64 byte count.
        unsafe {
            result::set_matmul_pref_attribute(
                pref.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &limit as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            )
        }
        .map_err(|e| lt_error("setting the workspace limit", e))?;
        // SAFETY: the result structure is plain data; all zeros is a valid value.
        let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> =
            vec![unsafe { std::mem::zeroed() }; count.max(1)];
        let mut found = 0i32;
        // SAFETY: live handle, descriptors and preference; room for `count` results.
        let status = unsafe {
            sys::cublasLtMatmulAlgoGetHeuristic(
                lt.handle,
                self.desc.0,
                self.a.0,
                self.b.0,
                self.c.0,
                self.d.0,
                pref.0,
                results.len() as i32,
                results.as_mut_ptr(),
                &mut found,
            )
        };
        match status {
            sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS => {}
            sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED => return Ok(Vec::new()),
            s => return Err(format!("cublasLtMatmulAlgoGetHeuristic: {s:?}")),
        }
        results.truncate(found.max(0) as usize);
        Ok(results
            .into_iter()
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| Heuristic {
                algo: Algo(r.algo),
                workspace_bytes: r.workspaceSize,
                waves: r.wavesCount,
            })
            .collect())
    }

    /// Whether `algo` (e.g. read back from a table) runs this problem here, and the
    /// workspace it needs.
    pub fn check(&self, lt: &Lt, algo: &Algo) -> Result<usize, String> {
        // SAFETY: plain data; all zeros is a valid value.
        let mut r: sys::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
        // SAFETY: live handle and descriptors.
        unsafe {
            sys::cublasLtMatmulAlgoCheck(
                lt.handle,
                self.desc.0,
                self.a.0,
                self.b.0,
                self.c.0,
                self.d.0,
                &algo.0,
                &mut r,
            )
        }
        .result()
        .map_err(|e| lt_error("cublasLtMatmulAlgoCheck", e))?;
        if r.workspaceSize > lt.workspace_bytes() {
            return Err(format!(
                "the algorithm needs {} bytes of workspace, more than the {} available",
                r.workspaceSize,
                lt.workspace_bytes()
            ));
        }
        Ok(r.workspaceSize)
    }

    /// Enqueues `D = A·Wᵀ (+ bias) (+ C)` on `stream` (a `CUstream` of `lt`'s device, as an
    /// integer; capturable into a CUDA graph).
    ///
    /// # Safety
    /// `a` (M·K bf16), `w` (N·K bf16), `c` and `d` (M·N of the product dtype) must be live
    /// device buffers of those sizes, and the bias given at construction N f32 values.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn enqueue(
        &self,
        lt: &Lt,
        algo: &Algo,
        a: u64,
        w: u64,
        c: u64,
        d: u64,
        stream: usize,
    ) -> Result<(), String> {
        let alpha = 1.0f32;
        let beta = if self.spec.residual_as_c { 1.0f32 } else { 0.0 };
        let c = if self.spec.residual_as_c { c } else { d };
        result::matmul(
            lt.handle,
            self.desc.0,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            w as *const c_void,
            self.a.0,
            a as *const c_void,
            self.b.0,
            c as *const c_void,
            self.c.0,
            d as *mut c_void,
            self.d.0,
            &algo.0,
            lt.workspace.ptr as *mut c_void,
            lt.workspace_bytes(),
            stream as sys::cudaStream_t,
        )
        .map_err(|e| lt_error("cublasLtMatmul", e))
    }
}

/// One cuBLASLt GEMM with fixed buffers, as a launch-list entry.
pub struct LtCall {
    pub lt: Arc<Lt>,
    pub mm: Arc<LtMatmul>,
    pub algo: Algo,
    pub a: u64,
    pub w: u64,
    pub c: u64,
    pub d: u64,
}

impl VendorCall for LtCall {
    unsafe fn enqueue(&self, stream: usize) -> crate::Result<()> {
        self.mm
            .enqueue(&self.lt, &self.algo, self.a, self.w, self.c, self.d, stream)
            .map_err(|e| crate::Error::cuda(self.describe(), e))
    }

    fn describe(&self) -> String {
        self.mm.spec.describe()
    }
}

impl Algo {
    /// The 64 bytes, hex.
    pub fn to_hex(&self) -> String {
        self.0
            .data
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    pub fn from_hex(s: &str) -> Option<Algo> {
        if s.len() != 128 || !s.is_ascii() {
            return None;
        }
        let mut data = [0u64; 8];
        for (i, w) in data.iter_mut().enumerate() {
            let mut bytes = [0u8; 8];
            for (j, b) in bytes.iter_mut().enumerate() {
                let at = (i * 8 + j) * 2;
                *b = u8::from_str_radix(&s[at..at + 2], 16).ok()?;
            }
            *w = u64::from_le_bytes(bytes);
        }
        Some(Algo(sys::cublasLtMatmulAlgo_t { data }))
    }

    /// One configuration attribute (0 when cuBLASLt does not report it).
    fn attribute(&self, attr: sys::cublasLtMatmulAlgoConfigAttributes_t) -> i64 {
        let mut size = 0usize;
        // SAFETY: a size query: no buffer, the size written back.
        let st = unsafe {
            sys::cublasLtMatmulAlgoConfigGetAttribute(
                &self.0,
                attr,
                std::ptr::null_mut(),
                0,
                &mut size,
            )
        };
        if st != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS || size == 0 || size > 8 {
            return 0;
        }
        let mut buf = [0u8; 8];
        let mut written = 0usize;
        // SAFETY: `buf` holds `size` ≤ 8 bytes.
        let st = unsafe {
            sys::cublasLtMatmulAlgoConfigGetAttribute(
                &self.0,
                attr,
                buf.as_mut_ptr() as *mut c_void,
                size,
                &mut written,
            )
        };
        if st != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return 0;
        }
        u64::from_le_bytes(buf) as i64
    }

    /// The record a table keeps.
    pub fn record(&self, h: &Heuristic) -> AlgoRecord {
        use sys::cublasLtMatmulAlgoConfigAttributes_t as C;
        AlgoRecord {
            bytes: self.to_hex(),
            id: self.attribute(C::CUBLASLT_ALGO_CONFIG_ID),
            tile_id: self.attribute(C::CUBLASLT_ALGO_CONFIG_TILE_ID),
            stages_id: self.attribute(C::CUBLASLT_ALGO_CONFIG_STAGES_ID),
            splitk: self.attribute(C::CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
            reduction_scheme: self.attribute(C::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME),
            cta_swizzling: self.attribute(C::CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING),
            custom_option: self.attribute(C::CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION),
            inner_shape_id: self.attribute(C::CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID),
            cluster_shape_id: self.attribute(C::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID),
            workspace_bytes: h.workspace_bytes as u64,
            waves: h.waves,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithms_round_trip_through_hex() {
        let a = Algo(sys::cublasLtMatmulAlgo_t {
            data: [1, 2, u64::MAX, 0, 0x0123_4567_89ab_cdef, 7, 8, 9],
        });
        let hex = a.to_hex();
        assert_eq!(hex.len(), 128);
        assert_eq!(Algo::from_hex(&hex), Some(a));
        assert_eq!(Algo::from_hex(&hex[2..]), None);
        assert_eq!(Algo::from_hex(&hex.replace('1', "g")), None);
    }
}
