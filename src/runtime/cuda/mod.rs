//! The cuda executor: the embedded fatbins loaded through cudarc (dynamic loading: nothing
//! CUDA is linked, so the binary runs on machines without a driver and says so), one
//! non-blocking stream that every copy, fill and launch goes to ([`executor`], through the
//! [`driver`] seam), raw device pointers, launches with the `cuLaunchKernel` argument array.
//! Debug mode synchronizes after every launch and names the failing op; otherwise the second
//! and later runs of a session replay one captured CUDA graph.

pub mod cublaslt;
pub mod driver;
pub mod executor;

use super::device::{Device, DeviceBuffer, LaunchList};
use super::graph::{Node, TensorDesc};
use super::kernels::{KernelId, ModuleBlob, KERNELS_COMPILED, MODULES};
use super::launch::Entry;
use crate::runtime::graph::LaunchIo;
use crate::runtime::kernel_choice::KernelChoice;
use crate::{Error, Result};
use cudarc::driver::{result, sys, CudaContext, CudaModule, CudaStream};
use driver::{Function, RealDriver, Stream};
use executor::{driver_error, Executor};
use std::sync::{Arc, OnceLock};

#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub name: String,
    pub compute_capability: (i32, i32),
    pub free_bytes: usize,
    pub total_bytes: usize,
    /// The driver's CUDA version, e.g. 13000 for 13.0.
    pub driver_version: i32,
}

pub struct CudaDevice {
    /// First, so it is dropped (waiting for its uploads) while the stream still exists.
    exec: Executor,
    ctx: Arc<CudaContext>,
    /// The executor's stream as cudarc's type (events, vendor libraries).
    stream: Arc<CudaStream>,
    /// The executor's upload stream, kept alive with it.
    _upload_stream: Arc<CudaStream>,
    _modules: Vec<Arc<CudaModule>>,
    info: DeviceInfo,
    /// The nodes this device runs its own way, installed by the layer that opens it.
    substitution: OnceLock<Box<dyn Substitution>>,
}

/// Nodes a device runs its own way instead of with our kernel (a vendor library), decided by
/// a layer above the runtime (the tuning table's GEMM dispatch, `tune::dispatch`) and
/// installed when the backend is opened, so the executor never depends on that layer.
pub trait Substitution: Send + Sync {
    /// Scratch bytes the node needs when it runs the substitute's way in a graph built for
    /// `choice` (0: our kernel).
    fn scratch_bytes(&self, node: &Node, inputs: &[&TensorDesc], choice: KernelChoice) -> usize;
    /// The node's entries, or None for our kernel.
    fn entries(
        &self,
        dev: &CudaDevice,
        node: &Node,
        io: &LaunchIo,
        scratch: u64,
    ) -> Result<Option<Vec<Entry>>>;
    /// The concrete substitution, for its owner to read back.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// Whether a CUDA driver library can be loaded at all (never panics).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library.
    unsafe { sys::is_culib_present() }
}

/// Opens the driver and device `ordinal` and reads its properties, without loading any
/// kernels: a clear error when there is no driver, no device or too old a device.
pub fn probe(ordinal: usize) -> Result<(Arc<CudaContext>, DeviceInfo)> {
    if !driver_present() {
        return Err(Error::NoDriver);
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| match e.0 {
        sys::CUresult::CUDA_ERROR_NO_DEVICE => {
            Error::NoDevice("the driver reports no CUDA-capable device".into())
        }
        sys::CUresult::CUDA_ERROR_INVALID_DEVICE => {
            Error::NoDevice(format!("there is no CUDA device number {ordinal}"))
        }
        _ => driver_error("opening the device", e),
    })?;
    // Our arena orders all work on one stream; cudarc's per-buffer events would only add host
    // cost and break graph capture.
    // SAFETY: called before anything is allocated in this context.
    unsafe { ctx.disable_event_tracking() };
    let cc = ctx
        .compute_capability()
        .map_err(|e| driver_error("compute capability", e))?;
    if cc.0 < 8 {
        return Err(Error::UnsupportedDevice {
            major: cc.0,
            minor: cc.1,
        });
    }
    let name = ctx.name().map_err(|e| driver_error("device name", e))?;
    let (free, total) = ctx
        .mem_get_info()
        .map_err(|e| driver_error("memory info", e))?;
    let mut driver_version = 0;
    // SAFETY: writes one integer.
    unsafe { sys::cuDriverGetVersion(&mut driver_version) }
        .result()
        .map_err(|e| driver_error("driver version", e))?;
    let info = DeviceInfo {
        name,
        compute_capability: cc,
        free_bytes: free,
        total_bytes: total,
        driver_version,
    };
    Ok((ctx, info))
}

/// Whether a module is loaded on a device of compute capability `cc`: a Hopper-only module
/// (sm_90a SASS, no PTX) on 9.0 alone; its kernels stay unloaded elsewhere and the executor
/// refuses to launch them.
fn loads_on(blob: &ModuleBlob, cc: (i32, i32)) -> bool {
    !blob.sm90a || cc == (9, 0)
}

impl CudaDevice {
    /// Opens device `ordinal`, loads every embedded module and resolves every kernel.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        if !KERNELS_COMPILED {
            return Err(Error::KernelsNotCompiled);
        }
        let (ctx, info) = probe(ordinal)?;
        let cc = info.compute_capability;
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_error("creating a stream", e))?;
        let upload_stream = ctx
            .new_stream()
            .map_err(|e| driver_error("creating the upload stream", e))?;

        let mut modules = Vec::new();
        let mut loaded: Vec<Option<Arc<CudaModule>>> = Vec::new();
        for blob in MODULES {
            if !loads_on(blob, cc) {
                loaded.push(None);
                continue;
            }
            let m = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(blob.fatbin.to_vec()))
                .map_err(|e| match e.0 {
                    sys::CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU => Error::cuda(
                        format!("loading kernels/{}.cu", blob.name),
                        format!(
                            "no code for compute capability {}.{} in the embedded fatbin; rebuild with UPX_CUDA_ARCHS including sm_{}{}",
                            cc.0, cc.1, cc.0, cc.1
                        ),
                    ),
                    _ => driver_error(&format!("loading kernels/{}.cu", blob.name), e),
                })?;
            modules.push(m.clone());
            loaded.push(Some(m));
        }
        let mut functions = Vec::with_capacity(KernelId::ALL.len());
        let mut missing = Vec::new();
        for &k in KernelId::ALL {
            match &loaded[k.module()] {
                None => functions.push(None),
                Some(m) => match m.load_function(k.name()) {
                    Ok(f) => functions.push(Some(Function(f.cu_function() as usize))),
                    Err(_) => {
                        missing.push(k.name().to_string());
                        functions.push(None);
                    }
                },
            }
        }
        if !missing.is_empty() {
            return Err(Error::KernelsMissing(missing));
        }
        let debug =
            cfg!(debug_assertions) || std::env::var("UPX_CUDA_DEBUG").is_ok_and(|v| v == "1");
        let exec = Executor::new(
            Arc::new(RealDriver { ctx: ctx.clone() }),
            Stream(stream.cu_stream() as usize),
            Stream(upload_stream.cu_stream() as usize),
            functions,
            debug,
        );
        Ok(Arc::new(CudaDevice {
            ctx,
            stream,
            _upload_stream: upload_stream,
            _modules: modules,
            exec,
            info,
            substitution: OnceLock::new(),
        }))
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The substitution of this device's sessions, installed by `make` unless one is.
    pub fn substitution_or_init(
        &self,
        make: impl FnOnce() -> Box<dyn Substitution>,
    ) -> &dyn Substitution {
        self.substitution.get_or_init(make).as_ref()
    }

    /// (free, total) bytes now.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| driver_error("memory info", e))
    }

    /// Device-to-device copy bandwidth in bytes/s (a copy of `bytes` bytes, read + write
    /// counted), the memory-bound ceiling benchmarks compare against.
    pub fn copy_bandwidth(&self, bytes: usize, iters: usize) -> Result<f64> {
        let src = self.alloc(bytes)?;
        let dst = self.alloc(bytes)?;
        let mut copy = || {
            // SAFETY: both buffers are live allocations of `bytes` bytes.
            unsafe { result::memcpy_dtod_async(dst.ptr, src.ptr, bytes, self.stream.cu_stream()) }
                .map_err(|e| driver_error("device copy", e))
        };
        copy()?;
        let seconds = self.event_seconds(iters, &mut copy)?;
        Ok(2.0 * bytes as f64 / seconds)
    }

    /// The stream every copy and launch of this device goes to (for vendor libraries).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Synchronize after every launch (faults name their op) and never capture, or not.
    pub fn set_debug(&self, on: bool) {
        self.exec.set_debug(on);
    }

    /// Why graph captures failed so far (those graphs run eagerly).
    pub fn capture_failures(&self) -> Vec<String> {
        self.exec.capture_failures()
    }

    /// Whether the context still works: after a sticky fault (an illegal address, say) every
    /// call fails and the device must be reopened with [`CudaDevice::reset`].
    pub fn healthy(&self) -> bool {
        self.bind().is_ok()
            && self.exec.synchronize("health check").is_ok()
            && self.ctx.synchronize().is_ok()
    }

    /// Destroys device `ordinal`'s primary context, clearing a sticky fault, so the next
    /// [`CudaDevice::new`] starts fresh. Every handle of the old context must be dropped
    /// first (devices, sessions, buffers).
    pub fn reset(ordinal: usize) -> Result<()> {
        let dev = result::device::get(ordinal as i32).map_err(|e| driver_error("device", e))?;
        // SAFETY: a device handle returned by the driver.
        unsafe { sys::cuDevicePrimaryCtxReset_v2(dev) }
            .result()
            .map_err(|e| driver_error("resetting the device's context", e))
    }

    /// Device seconds of one call of `work` (which enqueues on [`Self::stream`]): run once
    /// eagerly (module loading, validation), then captured into a CUDA graph whose replays
    /// are timed, so host overhead between calls is not counted.
    pub fn time_work(&self, iters: usize, work: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        self.bind()?;
        work()?;
        self.exec.synchronize("warm-up of timed work")?;
        let graph = self.exec.capture_with(work)?;
        let mut replay = || self.exec.launch_captured(&graph);
        replay()?;
        self.event_seconds(iters, &mut replay)
    }

    /// Seconds per call of `f`, averaged over `iters` calls between two events.
    fn event_seconds(&self, iters: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        let event = || {
            self.ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| driver_error("creating a timing event", e))
        };
        let (start, end) = (event()?, event()?);
        start
            .record(&self.stream)
            .map_err(|e| driver_error("recording an event", e))?;
        for _ in 0..iters {
            f()?;
        }
        end.record(&self.stream)
            .map_err(|e| driver_error("recording an event", e))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(|e| driver_error("timing", e))?;
        Ok(ms as f64 / 1e3 / iters.max(1) as f64)
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_error("binding the context", e))
    }
}

/// Owns one cuMemAlloc block.
struct CudaAlloc {
    ptr: sys::CUdeviceptr,
    ctx: Arc<CudaContext>,
}

impl Drop for CudaAlloc {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: freeing the block we allocated, once.
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}

impl Device for CudaDevice {
    fn describe(&self) -> String {
        let (ma, mi) = self.info.compute_capability;
        format!("{} (compute capability {ma}.{mi})", self.info.name)
    }

    fn kernel_target(&self) -> crate::runtime::kernel_choice::KernelTarget {
        let sms = self
            .ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_or(0, |n| n.max(0) as u32);
        crate::runtime::kernel_choice::KernelTarget {
            backend: Some(crate::runtime::BackendKind::Cuda),
            compute_capability: Some(self.info.compute_capability),
            sms,
            choice: None,
            gemm_tile_n: None,
        }
    }

    fn alloc(&self, bytes: usize) -> Result<DeviceBuffer> {
        self.bind()?;
        // SAFETY: plain allocation in the bound context.
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }.map_err(|e| {
            if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                let free = self.memory().map(|m| m.0).unwrap_or(0);
                Error::OutOfMemory {
                    need_mib: (bytes >> 20) as u64,
                    free_mib: (free >> 20) as u64,
                    advice: "use a smaller size, batch 1, or free the GPU".into(),
                }
            } else {
                driver_error("cuMemAlloc", e)
            }
        })?;
        Ok(DeviceBuffer::new(
            ptr,
            bytes,
            Box::new(CudaAlloc {
                ptr,
                ctx: self.ctx.clone(),
            }),
        ))
    }

    fn write(&self, dst: u64, data: &[u8]) -> Result<()> {
        self.bind()?;
        self.exec.write(dst, data)
    }

    fn upload(&self, dst: u64, data: &[u8]) -> Result<()> {
        self.bind()?;
        self.exec.upload(dst, data)
    }

    fn finish_uploads(&self) -> Result<()> {
        self.bind()?;
        self.exec.finish_uploads()
    }

    fn read(&self, src: u64, out: &mut [u8]) -> Result<()> {
        self.bind()?;
        self.exec.read(src, out)
    }

    fn fill(&self, dst: u64, byte: u8, len: usize) -> Result<()> {
        self.bind()?;
        self.exec.fill(dst, byte, len)
    }

    fn execute(&self, list: &mut LaunchList) -> Result<()> {
        self.bind()?;
        self.exec.execute(list)
    }

    fn substitute_scratch(
        &self,
        node: &Node,
        inputs: &[&TensorDesc],
        choice: KernelChoice,
    ) -> usize {
        self.substitution
            .get()
            .map_or(0, |s| s.scratch_bytes(node, inputs, choice))
    }

    fn substitute(&self, node: &Node, io: &LaunchIo, scratch: u64) -> Result<Option<Vec<Entry>>> {
        match self.substitution.get() {
            Some(s) => s.entries(self, node, io, scratch),
            None => Ok(None),
        }
    }

    fn time(&self, list: &mut LaunchList, iters: usize) -> Result<f64> {
        // Warm up (and capture the graph outside the timed region).
        self.execute(list)?;
        self.event_seconds(iters, &mut || self.exec.enqueue(list))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hopper_only_modules_load_on_compute_capability_9_0_alone() {
        let module = |sm90a| ModuleBlob {
            name: "m",
            sm90a,
            fatbin: &[],
        };
        for cc in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)] {
            assert!(loads_on(&module(false), cc), "{cc:?}");
            assert_eq!(loads_on(&module(true), cc), cc == (9, 0), "{cc:?}");
        }
        // The selftests of kernels/selftest_sm90a.cu are such kernels.
        let k = KernelId::lookup("selftest_wgmma_n64").unwrap();
        assert!(k.sm90a() && MODULES[k.module()].name == "selftest_sm90a");
    }
}
