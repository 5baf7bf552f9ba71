//! The cuda executor: the embedded fatbins loaded through cudarc (dynamic loading: nothing
//! CUDA is linked, so the binary runs on machines without a driver and says so), one stream,
//! raw device pointers, launches with the `cuLaunchKernel` argument array. Debug mode
//! synchronizes after every launch and names the failing op; otherwise the second and later
//! runs of a session replay one captured CUDA graph.

use super::device::{Device, DeviceBuffer, LaunchList};
use super::kernels::{KernelId, KERNELS_COMPILED, MODULES};
use super::launch::Launch;
use crate::{Error, Result};
use cudarc::driver::{result, sys, CudaContext, CudaModule, CudaStream, DriverError};
use std::sync::{Arc, Mutex};

/// Kernels may use this much dynamic shared memory without opting in.
const DEFAULT_SMEM_LIMIT: u32 = 48 * 1024;

#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub name: String,
    pub compute_capability: (i32, i32),
    pub free_bytes: usize,
    pub total_bytes: usize,
}

/// A CUfunction handle (owned by its module, which the device keeps alive).
#[derive(Clone, Copy)]
struct Function(sys::CUfunction);
// SAFETY: CUfunction handles are valid on any thread once the context is current.
unsafe impl Send for Function {}
unsafe impl Sync for Function {}

pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    _modules: Vec<Arc<CudaModule>>,
    functions: Vec<Option<Function>>,
    /// Dynamic shared memory each kernel has been opted in to.
    smem_limits: Mutex<Vec<u32>>,
    info: DeviceInfo,
    /// Synchronize after every launch and never capture graphs.
    debug: bool,
}

fn driver_error(context: &str, e: DriverError) -> Error {
    Error::cuda(context, format!("{e:?}"))
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
    let info = DeviceInfo {
        name,
        compute_capability: cc,
        free_bytes: free,
        total_bytes: total,
    };
    Ok((ctx, info))
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

        let mut modules = Vec::new();
        let mut loaded: Vec<Option<Arc<CudaModule>>> = Vec::new();
        for blob in MODULES {
            if blob.sm90a && cc != (9, 0) {
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
                    Ok(f) => functions.push(Some(Function(f.cu_function()))),
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
        Ok(Arc::new(CudaDevice {
            ctx,
            stream,
            _modules: modules,
            functions,
            smem_limits: Mutex::new(vec![DEFAULT_SMEM_LIMIT; KernelId::ALL.len()]),
            info,
            debug: cfg!(debug_assertions)
                || std::env::var("UPX_CUDA_DEBUG").is_ok_and(|v| v == "1"),
        }))
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
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

    /// The stream every launch of this device goes to (for vendor libraries in benchmarks).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Device seconds of one call of `work` (which enqueues on [`Self::stream`]): run once
    /// eagerly (module loading, validation), then captured into a CUDA graph whose replays
    /// are timed, so host overhead between calls is not counted.
    pub fn time_work(&self, iters: usize, work: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        self.bind()?;
        work()?;
        self.synchronize("warm-up of timed work")?;
        let graph = self.capture_with(work)?;
        let mut replay = || self.replay(&graph);
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

    fn replay(&self, c: &Captured) -> Result<()> {
        // SAFETY: launching an instantiated graph on our stream.
        unsafe { result::graph::launch(c.exec, self.stream.cu_stream()) }
            .map_err(|e| driver_error("launching the CUDA graph", e))
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_error("binding the context", e))
    }

    fn synchronize(&self, context: &str) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_error(context, e))
    }

    fn launch(&self, l: &mut Launch) -> Result<()> {
        let f = self.functions[l.kernel as usize].ok_or_else(|| {
            Error::cuda(
                l.kernel.name(),
                "kernel not loaded on this device (Hopper-only)",
            )
        })?;
        if l.smem > DEFAULT_SMEM_LIMIT {
            let mut limits = self.smem_limits.lock().unwrap();
            if limits[l.kernel as usize] < l.smem {
                // SAFETY: valid function handle and attribute.
                unsafe {
                    result::function::set_function_attribute(
                        f.0,
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        l.smem as i32,
                    )
                }
                .map_err(|e| {
                    driver_error(&format!("{} shared memory opt-in", l.kernel.name()), e)
                })?;
                limits[l.kernel as usize] = l.smem;
            }
        }
        let mut params = l.args.pointers();
        // SAFETY: the op's launch plan packs exactly the kernel's parameters, with pointers
        // into live device buffers of the session.
        unsafe {
            result::launch_kernel(
                f.0,
                (l.grid[0], l.grid[1], l.grid[2]),
                (l.block[0], l.block[1], l.block[2]),
                l.smem,
                self.stream.cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| driver_error(&format!("launching {}", l.kernel.name()), e))
    }

    fn run_eager(&self, list: &mut LaunchList) -> Result<()> {
        for (l, label) in list.launches.iter_mut().zip(&list.labels) {
            self.launch(l).map_err(|e| Error::cuda(label.clone(), e))?;
            if self.debug {
                self.synchronize(&format!("{label} ({})", l.kernel.name()))?;
            }
        }
        self.synchronize("running the launch list")
    }

    fn capture(&self, list: &mut LaunchList) -> Result<Captured> {
        self.capture_with(&mut || list.launches.iter_mut().try_for_each(|l| self.launch(l)))
    }

    /// Captures what `work` enqueues on our stream into one instantiated CUDA graph.
    fn capture_with(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<Captured> {
        let s = self.stream.cu_stream();
        // SAFETY: capturing our own stream; no allocation or synchronous copy happens inside.
        unsafe {
            result::stream::begin_capture(
                s,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(|e| driver_error("begin graph capture", e))?;
        let launched = work();
        // SAFETY: ends the capture begun above, whatever happened in between.
        let graph = unsafe { result::stream::end_capture(s) }
            .map_err(|e| driver_error("end graph capture", e))?;
        launched?;
        // SAFETY: `graph` was just captured.
        let exec = unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) }
            .map_err(|e| {
            // SAFETY: destroying the graph we own.
            let _ = unsafe { result::graph::destroy(graph) };
            driver_error("instantiating the CUDA graph", e)
        })?;
        Ok(Captured {
            graph,
            exec,
            ctx: self.ctx.clone(),
        })
    }
}

/// An instantiated CUDA graph of one session's launch list.
struct Captured {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    ctx: Arc<CudaContext>,
}

// SAFETY: graph handles are plain driver handles; a session uses them from one thread at a time.
unsafe impl Send for Captured {}

impl Drop for Captured {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: destroying handles we own, once.
        unsafe {
            let _ = result::graph::exec_destroy(self.exec);
            let _ = result::graph::destroy(self.graph);
        }
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
        // Ordered after earlier work of our stream.
        self.synchronize("before a host-to-device copy")?;
        // SAFETY: `dst` addresses a live allocation with room for `data`.
        unsafe { result::memcpy_htod_sync(dst, data) }
            .map_err(|e| driver_error("copy to device", e))
    }

    fn read(&self, src: u64, out: &mut [u8]) -> Result<()> {
        self.bind()?;
        self.synchronize("before a device-to-host copy")?;
        // SAFETY: `src` addresses a live allocation of at least `out.len()` bytes.
        unsafe { result::memcpy_dtoh_sync(out, src) }.map_err(|e| driver_error("copy to host", e))
    }

    fn fill(&self, dst: u64, byte: u8, len: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: `dst` addresses a live allocation of at least `len` bytes.
        unsafe { result::memset_d8_sync(dst, byte, len) }.map_err(|e| driver_error("memset", e))
    }

    fn execute(&self, list: &mut LaunchList) -> Result<()> {
        self.bind()?;
        if self.debug || list.launches.is_empty() {
            return self.run_eager(list);
        }
        if let Some(c) = list
            .replay
            .as_ref()
            .and_then(|r| r.downcast_ref::<Captured>())
        {
            self.replay(c)?;
            return self.synchronize("CUDA graph replay");
        }
        // The first run is eager (it validates every launch and sets shared-memory opt-ins);
        // later runs replay one captured graph.
        self.run_eager(list)?;
        list.replay = Some(Box::new(self.capture(list)?));
        Ok(())
    }

    fn time(&self, list: &mut LaunchList, iters: usize) -> Result<f64> {
        // Warm up (and capture the graph outside the timed region).
        self.execute(list)?;
        let mut run = || match list
            .replay
            .as_ref()
            .and_then(|r| r.downcast_ref::<Captured>())
        {
            Some(c) => self.replay(c),
            None => list.launches.iter_mut().try_for_each(|l| self.launch(l)),
        };
        self.event_seconds(iters, &mut run)
    }
}
