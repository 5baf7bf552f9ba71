//! Where the tuner runs its candidates: a list of [`Entry`]s (our kernel launches and cuBLASLt
//! calls, the entries of a session's launch list), run eagerly to check them and captured into a CUDA graph to time them. The CUDA
//! engine launches our kernels from modules it loads itself onto the device's stream, so a
//! cuBLASLt call and our epilogue pass share one stream and one graph; the emulator engine
//! runs kernel steps on the host emulator (no vendor library there: the tuner pairs the
//! epilogue pass with a stand-in, our plain GEMM, so the whole flow is tested without a GPU).

use super::table::{kernels_hash, TableKey};
use crate::runtime::cuda::cublaslt::{library_version, Lt};
use crate::runtime::cuda::CudaDevice;
use crate::runtime::device::Device;
use crate::runtime::kernels::{KernelId, MODULES};
use crate::runtime::launch::Entry;
use crate::{Error, Result};
use cudarc::driver::{result as drv, sys as dsys, CudaModule};
use std::sync::{Arc, Mutex};

/// Runs and times step lists on one device.
pub trait Engine {
    fn device(&self) -> Arc<dyn Device>;
    /// What a table measured here is valid for.
    fn key(&self) -> TableKey;
    fn describe(&self) -> String;
    /// cuBLASLt, or why it is unavailable.
    fn vendor(&self) -> std::result::Result<&Arc<Lt>, String>;
    /// Pair the epilogue pass with our plain GEMM where there is no vendor GEMM (the
    /// emulator: exercises the pairing without a GPU).
    fn stand_in(&self) -> bool;
    /// Whether iteration counts adapt to a time target (else one run per timing).
    fn adaptive(&self) -> bool;
    /// Enqueues the steps and waits for them.
    fn run(&self, steps: &mut [Entry]) -> Result<()>;
    /// Seconds per execution of the steps, over `iters` executions.
    fn time(&self, steps: &mut [Entry], iters: usize) -> Result<f64>;
    /// Copies `bytes` bytes between device buffers, after all earlier work.
    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()>;
}

/// The key of tables measured on a CUDA device like `info`'s.
pub fn cuda_key(info: &crate::runtime::cuda::DeviceInfo) -> TableKey {
    TableKey {
        device_name: info.name.clone(),
        compute_capability: format!(
            "{}.{}",
            info.compute_capability.0, info.compute_capability.1
        ),
        driver_version: info.driver_version,
        cublaslt_version: library_version(),
        kernels_hash: kernels_hash(),
    }
}

/// A CUfunction handle with the dynamic shared memory it is opted in to.
#[derive(Clone, Copy)]
struct Function(dsys::CUfunction, u32);
// SAFETY: CUfunction handles are valid on any thread once the context is current.
unsafe impl Send for Function {}

/// The CUDA engine: our kernels from modules loaded here, cuBLASLt on the same stream.
pub struct CudaEngine {
    dev: Arc<CudaDevice>,
    lt: std::result::Result<Arc<Lt>, String>,
    modules: Mutex<Vec<Option<Arc<CudaModule>>>>,
    functions: Mutex<Vec<Option<Function>>>,
}

fn driver_error(context: &str, e: drv::DriverError) -> Error {
    Error::cuda(context, format!("{e:?}"))
}

/// Kernels may use this much dynamic shared memory without opting in.
const DEFAULT_SMEM_LIMIT: u32 = 48 * 1024;

impl CudaEngine {
    pub fn new(dev: Arc<CudaDevice>) -> Self {
        let lt = Lt::open(&dev).map(Arc::new);
        CudaEngine {
            dev,
            lt,
            modules: Mutex::new(vec![None; MODULES.len()]),
            functions: Mutex::new(vec![None; KernelId::ALL.len()]),
        }
    }

    fn bind(&self) -> Result<()> {
        self.dev
            .stream()
            .context()
            .bind_to_thread()
            .map_err(|e| driver_error("binding the context", e))
    }

    fn function(&self, k: KernelId, smem: u32) -> Result<dsys::CUfunction> {
        let mut functions = self.functions.lock().expect("function table");
        let f = match functions[k as usize] {
            Some(f) => f,
            None => {
                let mut modules = self.modules.lock().expect("module table");
                let blob = &MODULES[k.module()];
                let m = match &modules[k.module()] {
                    Some(m) => m.clone(),
                    None => {
                        let m = self
                            .dev
                            .stream()
                            .context()
                            .load_module(cudarc::nvrtc::Ptx::from_binary(blob.fatbin.to_vec()))
                            .map_err(|e| {
                                driver_error(&format!("loading kernels/{}.cu", blob.name), e)
                            })?;
                        modules[k.module()] = Some(m.clone());
                        m
                    }
                };
                let f = m
                    .load_function(k.name())
                    .map_err(|e| driver_error(&format!("resolving {}", k.name()), e))?;
                Function(f.cu_function(), DEFAULT_SMEM_LIMIT)
            }
        };
        let f = if smem > f.1 {
            // SAFETY: valid function handle and attribute.
            unsafe {
                drv::function::set_function_attribute(
                    f.0,
                    dsys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
            }
            .map_err(|e| driver_error(&format!("{} shared memory opt-in", k.name()), e))?;
            Function(f.0, smem)
        } else {
            f
        };
        functions[k as usize] = Some(f);
        Ok(f.0)
    }

    fn enqueue(&self, steps: &mut [Entry]) -> Result<()> {
        let stream = self.dev.stream().cu_stream();
        for step in steps {
            match step {
                Entry::Kernel(l) => {
                    let f = self.function(l.kernel, l.smem)?;
                    let mut params = l.params()?;
                    // SAFETY: the op's launch plan packs exactly the kernel's parameters
                    // (checked in debug builds), pointing into live buffers of the tuner.
                    unsafe {
                        drv::launch_kernel(
                            f,
                            (l.grid[0], l.grid[1], l.grid[2]),
                            (l.block[0], l.block[1], l.block[2]),
                            l.smem,
                            stream,
                            &mut params,
                        )
                    }
                    .map_err(|e| driver_error(&format!("launching {}", l.kernel.name()), e))?;
                }
                // SAFETY: the tuner sized every buffer for the call; our stream is the
                // device's.
                Entry::Vendor(v) => unsafe { v.enqueue(stream as usize) }?,
            }
        }
        Ok(())
    }

    fn synchronize(&self, what: &str) -> Result<()> {
        self.dev
            .stream()
            .synchronize()
            .map_err(|e| driver_error(what, e))
    }
}

impl Engine for CudaEngine {
    fn device(&self) -> Arc<dyn Device> {
        self.dev.clone()
    }

    fn key(&self) -> TableKey {
        cuda_key(self.dev.info())
    }

    fn describe(&self) -> String {
        let lt = match &self.lt {
            Ok(lt) => format!(
                "cuBLASLt {} ({} MiB workspace)",
                lt.version(),
                lt.workspace_bytes() >> 20
            ),
            Err(e) => format!("cuBLASLt skipped: {e}"),
        };
        format!("{}; {lt}", self.dev.describe())
    }

    fn vendor(&self) -> std::result::Result<&Arc<Lt>, String> {
        self.lt.as_ref().map_err(|e| e.clone())
    }

    fn stand_in(&self) -> bool {
        false
    }

    fn adaptive(&self) -> bool {
        true
    }

    fn run(&self, steps: &mut [Entry]) -> Result<()> {
        self.bind()?;
        self.enqueue(steps)?;
        self.synchronize("running tuner steps")
    }

    fn time(&self, steps: &mut [Entry], iters: usize) -> Result<f64> {
        self.dev.time_work(iters, &mut || self.enqueue(steps))
    }

    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: both addresses are live device buffers of at least `bytes` bytes.
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.dev.stream().cu_stream()) }
            .map_err(|e| driver_error("device copy", e))?;
        self.synchronize("device copy")
    }
}

/// The emulator engine: kernel steps on the host emulator, wall-clock timing.
#[cfg(feature = "hostsim")]
pub struct HostsimEngine {
    dev: Arc<crate::runtime::hostsim::HostsimDevice>,
}

#[cfg(feature = "hostsim")]
impl HostsimEngine {
    pub fn new(dev: Arc<crate::runtime::hostsim::HostsimDevice>) -> Self {
        HostsimEngine { dev }
    }
}

#[cfg(feature = "hostsim")]
impl Engine for HostsimEngine {
    fn device(&self) -> Arc<dyn Device> {
        self.dev.clone()
    }

    fn key(&self) -> TableKey {
        TableKey {
            device_name: "hostsim".into(),
            compute_capability: "emulated".into(),
            driver_version: 0,
            cublaslt_version: None,
            kernels_hash: kernels_hash(),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{}; vendor GEMM: our plain GEMM as a stand-in",
            self.dev.describe()
        )
    }

    fn vendor(&self) -> std::result::Result<&Arc<Lt>, String> {
        Err("the emulator has no vendor library".into())
    }

    fn stand_in(&self) -> bool {
        true
    }

    fn adaptive(&self) -> bool {
        false
    }

    fn run(&self, steps: &mut [Entry]) -> Result<()> {
        for step in steps {
            match step {
                Entry::Kernel(l) => crate::runtime::hostsim::launch(l)?,
                Entry::Vendor(_) => {
                    return Err(Error::InvalidArgument(
                        "the emulator cannot run cuBLASLt".into(),
                    ))
                }
            }
        }
        Ok(())
    }

    fn time(&self, steps: &mut [Entry], iters: usize) -> Result<f64> {
        let start = std::time::Instant::now();
        for _ in 0..iters.max(1) {
            self.run(steps)?;
        }
        Ok(start.elapsed().as_secs_f64() / iters.max(1) as f64)
    }

    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        // SAFETY: emulator device pointers are host addresses of live, distinct buffers of at
        // least `bytes` bytes.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }
}
