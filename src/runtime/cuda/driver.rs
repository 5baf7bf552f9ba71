//! The driver calls the cuda executor makes, behind one narrow trait: the real driver (through
//! cudarc's raw layer) in production, a recorder in tests. Every call that enqueues work names
//! its stream explicitly, so a test can prove that nothing reaches the legacy default stream,
//! which a non-blocking stream does not wait for.

use cudarc::driver::{result, sys, CudaContext, DriverError};
use std::ffi::c_void;
use std::sync::Arc;

pub type DriverResult<T> = std::result::Result<T, DriverError>;

/// Opaque driver handles as plain integers (they are pointers the driver owns), so the seam
/// and its fakes are `Send` and comparable.
macro_rules! handle {
    ($($name:ident: $raw:ty),* $(,)?) => {$(
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub struct $name(pub usize);
        impl $name {
            pub fn raw(self) -> $raw {
                self.0 as $raw
            }
        }
    )*};
}
handle!(
    Stream: sys::CUstream,
    Function: sys::CUfunction,
    Graph: sys::CUgraph,
    GraphExec: sys::CUgraphExec,
    Event: sys::CUevent,
);

impl Stream {
    /// The handles that mean "a default stream" to the driver: the legacy NULL stream, and the
    /// `CU_STREAM_LEGACY` and `CU_STREAM_PER_THREAD` aliases.
    pub fn is_default(self) -> bool {
        self.0 <= 2
    }
}

/// A kernel launch's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchShape {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub smem: u32,
}

/// What the executor asks of the driver. Every call that enqueues work takes the stream.
pub trait StreamDriver: Send + Sync {
    /// Enqueues a copy of `len` host bytes at `src` to device address `dst`.
    ///
    /// # Safety
    /// `dst` addresses a live device allocation with room for `len` bytes; `src` is readable
    /// for `len` bytes until the copy has consumed it (pageable memory: on return; pinned
    /// memory: until the stream passes the copy).
    unsafe fn copy_htod(&self, dst: u64, src: *const u8, len: usize, s: Stream)
        -> DriverResult<()>;
    /// Enqueues a copy of `len` device bytes at `src` to host memory at `dst`.
    ///
    /// # Safety
    /// `src` addresses a live allocation of `len` bytes; `dst` stays writable for `len` bytes
    /// until the stream passes the copy.
    unsafe fn copy_dtoh(&self, dst: *mut u8, src: u64, len: usize, s: Stream) -> DriverResult<()>;
    /// Enqueues setting `len` device bytes at `dst` to `byte`.
    ///
    /// # Safety
    /// `dst` addresses a live allocation of at least `len` bytes.
    unsafe fn memset(&self, dst: u64, byte: u8, len: usize, s: Stream) -> DriverResult<()>;
    /// Enqueues a kernel launch with a `cuLaunchKernel` argument array.
    ///
    /// # Safety
    /// `params` holds exactly the kernel's parameters, pointing at live values, and every
    /// pointer argument addresses live device memory.
    unsafe fn launch(
        &self,
        f: Function,
        shape: LaunchShape,
        s: Stream,
        params: &mut [*mut c_void],
    ) -> DriverResult<()>;
    /// Opts `f` in to `bytes` of dynamic shared memory.
    fn set_max_dynamic_smem(&self, f: Function, bytes: u32) -> DriverResult<()>;
    /// Waits until everything enqueued on `s` has finished.
    fn synchronize(&self, s: Stream) -> DriverResult<()>;
    fn begin_capture(&self, s: Stream) -> DriverResult<()>;
    fn end_capture(&self, s: Stream) -> DriverResult<Graph>;
    fn instantiate(&self, g: Graph) -> DriverResult<GraphExec>;
    fn launch_graph(&self, e: GraphExec, s: Stream) -> DriverResult<()>;
    /// Frees a graph and, when given, its instance (errors are ignored: called from `Drop`).
    fn destroy_graph(&self, g: Graph, e: Option<GraphExec>);
    /// Page-locked host memory, the source of fast asynchronous uploads.
    fn pinned_alloc(&self, bytes: usize) -> DriverResult<*mut u8>;
    /// # Safety
    /// `p` came from [`StreamDriver::pinned_alloc`] and no enqueued copy reads it any more.
    unsafe fn pinned_free(&self, p: *mut u8);
    fn event_create(&self) -> DriverResult<Event>;
    fn event_record(&self, e: Event, s: Stream) -> DriverResult<()>;
    /// Waits for the work before the event's last record (at once if never recorded).
    fn event_synchronize(&self, e: Event) -> DriverResult<()>;
    fn event_destroy(&self, e: Event);
}

/// The real driver, for one context (bound before freeing, which may run on any thread).
pub struct RealDriver {
    pub ctx: Arc<CudaContext>,
}

impl StreamDriver for RealDriver {
    unsafe fn copy_htod(
        &self,
        dst: u64,
        src: *const u8,
        len: usize,
        s: Stream,
    ) -> DriverResult<()> {
        sys::cuMemcpyHtoDAsync_v2(dst, src as *const c_void, len, s.raw()).result()
    }

    unsafe fn copy_dtoh(&self, dst: *mut u8, src: u64, len: usize, s: Stream) -> DriverResult<()> {
        sys::cuMemcpyDtoHAsync_v2(dst as *mut c_void, src, len, s.raw()).result()
    }

    unsafe fn memset(&self, dst: u64, byte: u8, len: usize, s: Stream) -> DriverResult<()> {
        result::memset_d8_async(dst, byte, len, s.raw())
    }

    unsafe fn launch(
        &self,
        f: Function,
        shape: LaunchShape,
        s: Stream,
        params: &mut [*mut c_void],
    ) -> DriverResult<()> {
        let [gx, gy, gz] = shape.grid;
        let [bx, by, bz] = shape.block;
        result::launch_kernel(
            f.raw(),
            (gx, gy, gz),
            (bx, by, bz),
            shape.smem,
            s.raw(),
            params,
        )
    }

    fn set_max_dynamic_smem(&self, f: Function, bytes: u32) -> DriverResult<()> {
        // SAFETY: a function handle of a loaded module and a valid attribute.
        unsafe {
            result::function::set_function_attribute(
                f.raw(),
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        }
    }

    fn synchronize(&self, s: Stream) -> DriverResult<()> {
        // SAFETY: a stream of this context.
        unsafe { result::stream::synchronize(s.raw()) }
    }

    fn begin_capture(&self, s: Stream) -> DriverResult<()> {
        // SAFETY: capturing a stream of this context.
        unsafe {
            result::stream::begin_capture(
                s.raw(),
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
    }

    fn end_capture(&self, s: Stream) -> DriverResult<Graph> {
        // SAFETY: ends a capture begun on this stream.
        unsafe { result::stream::end_capture(s.raw()) }.map(|g| Graph(g as usize))
    }

    fn instantiate(&self, g: Graph) -> DriverResult<GraphExec> {
        // SAFETY: a graph returned by `end_capture`.
        unsafe { result::graph::instantiate(g.raw(), sys::CUgraphInstantiate_flags(0)) }
            .map(|e| GraphExec(e as usize))
    }

    fn launch_graph(&self, e: GraphExec, s: Stream) -> DriverResult<()> {
        // SAFETY: an instantiated graph of this context on one of its streams.
        unsafe { result::graph::launch(e.raw(), s.raw()) }
    }

    fn destroy_graph(&self, g: Graph, e: Option<GraphExec>) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: handles owned by the caller, destroyed once.
        unsafe {
            if let Some(e) = e {
                let _ = result::graph::exec_destroy(e.raw());
            }
            if g.0 != 0 {
                let _ = result::graph::destroy(g.raw());
            }
        }
    }

    fn pinned_alloc(&self, bytes: usize) -> DriverResult<*mut u8> {
        // SAFETY: plain page-locked allocation in the bound context.
        unsafe { result::malloc_host(bytes, 0) }.map(|p| p as *mut u8)
    }

    unsafe fn pinned_free(&self, p: *mut u8) {
        let _ = self.ctx.bind_to_thread();
        let _ = result::free_host(p as *mut c_void);
    }

    fn event_create(&self) -> DriverResult<Event> {
        result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map(|e| Event(e as usize))
    }

    fn event_record(&self, e: Event, s: Stream) -> DriverResult<()> {
        // SAFETY: an event and a stream of this context.
        unsafe { result::event::record(e.raw(), s.raw()) }
    }

    fn event_synchronize(&self, e: Event) -> DriverResult<()> {
        // SAFETY: an event of this context.
        unsafe { result::event::synchronize(e.raw()) }
    }

    fn event_destroy(&self, e: Event) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: an event owned by the caller, destroyed once.
        let _ = unsafe { result::event::destroy(e.raw()) };
    }
}
