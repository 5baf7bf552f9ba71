//! The stream work of the cuda executor: uploads (large ones through a double-buffered pinned
//! staging ring), reads, fills, kernel launches, graph capture and replay, all enqueued on one
//! stream through the [`StreamDriver`] seam. Debug mode synchronizes after every launch so a
//! fault names its op; a graph whose capture fails runs eagerly from then on, and says so.

use super::driver::{
    DriverResult, Event, Function, Graph, GraphExec, LaunchShape, Stream, StreamDriver,
};
use crate::runtime::device::LaunchList;
use crate::runtime::launch::{Entry, Launch};
use crate::{Error, Result};
use cudarc::driver::DriverError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Kernels may use this much dynamic shared memory without opting in.
const DEFAULT_SMEM_LIMIT: u32 = 48 * 1024;
/// Uploads from this size on go through pinned staging (smaller ones are staged by the
/// driver itself, which is as fast for them).
const PINNED_MIN_BYTES: usize = 1 << 20;
/// Each of the two staging buffers.
const STAGING_CHUNK: usize = 16 << 20;

/// The error's name, and the driver's description where a driver is loaded (asking cudarc
/// for it without one would panic).
pub fn driver_error(context: &str, e: DriverError) -> Error {
    let name = format!("{:?}", e.0);
    let described = super::driver_present()
        .then(|| e.error_string().ok())
        .flatten()
        .map(|s| format!("{name}: {}", s.to_string_lossy()));
    Error::cuda(context, described.unwrap_or(name))
}

/// How a launch list runs after its first run.
enum Replay {
    Graph(Captured),
    /// Capture failed: every run is eager.
    Eager,
}

/// An instantiated CUDA graph; destroyed with its driver.
pub struct Captured {
    driver: Arc<dyn StreamDriver>,
    graph: Graph,
    exec: GraphExec,
}

impl Drop for Captured {
    fn drop(&mut self) {
        self.driver.destroy_graph(self.graph, Some(self.exec));
    }
}

/// Two pinned buffers, each with the event of the last copy out of it.
struct Staging {
    buffers: [(*mut u8, Event); 2],
    next: usize,
}

// SAFETY: the pinned buffers are only touched under the executor's staging lock.
unsafe impl Send for Staging {}

pub struct Executor {
    driver: Arc<dyn StreamDriver>,
    stream: Stream,
    /// Uploads that run beside the kernels (weights placed ahead of their sessions). Never
    /// the kernels' stream: a copy enqueued there by another thread during a capture would
    /// become part of the captured graph.
    upload_stream: Stream,
    functions: Vec<Option<Function>>,
    /// Dynamic shared memory each kernel has been opted in to.
    smem_limits: Mutex<Vec<u32>>,
    staging: Mutex<Option<Staging>>,
    /// Synchronize after every launch and never capture graphs.
    debug: AtomicBool,
    /// Why captures failed (each graph concerned runs eagerly).
    capture_failures: Mutex<Vec<String>>,
}

impl Executor {
    /// `functions[k]` is kernel `k`'s handle, `None` where it is not loaded on this device.
    pub fn new(
        driver: Arc<dyn StreamDriver>,
        stream: Stream,
        upload_stream: Stream,
        functions: Vec<Option<Function>>,
        debug: bool,
    ) -> Self {
        let n = functions.len();
        Executor {
            driver,
            stream,
            upload_stream,
            functions,
            smem_limits: Mutex::new(vec![DEFAULT_SMEM_LIMIT; n]),
            staging: Mutex::new(None),
            debug: AtomicBool::new(debug),
            capture_failures: Mutex::new(Vec::new()),
        }
    }

    pub fn stream(&self) -> Stream {
        self.stream
    }

    pub fn set_debug(&self, on: bool) {
        self.debug.store(on, Ordering::Relaxed);
    }

    pub fn debug(&self) -> bool {
        self.debug.load(Ordering::Relaxed)
    }

    /// The reasons of every failed capture so far (those graphs run eagerly).
    pub fn capture_failures(&self) -> Vec<String> {
        self.capture_failures.lock().expect("capture log").clone()
    }

    pub fn synchronize(&self, context: &str) -> Result<()> {
        self.driver
            .synchronize(self.stream)
            .map_err(|e| driver_error(context, e))
    }

    /// Enqueues an upload of `data` to `dst` in order with the kernels; `data` may be dropped
    /// on return.
    pub fn write(&self, dst: u64, data: &[u8]) -> Result<()> {
        self.write_on(dst, data, self.stream)
    }

    /// Enqueues an upload of `data` to `dst` on the upload stream, beside the kernels: for
    /// memory no enqueued kernel touches. It is done once [`Executor::finish_uploads`]
    /// returns; `data` may be dropped on return.
    pub fn upload(&self, dst: u64, data: &[u8]) -> Result<()> {
        self.write_on(dst, data, self.upload_stream)
    }

    /// Waits for every upload enqueued by [`Executor::upload`].
    pub fn finish_uploads(&self) -> Result<()> {
        self.driver
            .synchronize(self.upload_stream)
            .map_err(|e| driver_error("finishing uploads", e))
    }

    fn write_on(&self, dst: u64, data: &[u8], stream: Stream) -> Result<()> {
        if data.len() < PINNED_MIN_BYTES {
            // SAFETY: the caller's `dst` has room for `data`; pageable sources are staged by
            // the driver before the call returns.
            return unsafe {
                self.driver
                    .copy_htod(dst, data.as_ptr(), data.len(), stream)
            }
            .map_err(|e| driver_error("copy to device", e));
        }
        let mut guard = self.staging.lock().expect("staging lock");
        if guard.is_none() {
            *guard = Some(self.new_staging()?);
        }
        let staging = guard.as_mut().expect("staging just created");
        for (i, chunk) in data.chunks(STAGING_CHUNK).enumerate() {
            let (buf, event) = staging.buffers[staging.next];
            staging.next ^= 1;
            // The copy that last read this buffer must be done before it is refilled.
            self.driver
                .event_synchronize(event)
                .map_err(|e| driver_error("waiting for a staging buffer", e))?;
            // SAFETY: `buf` holds STAGING_CHUNK bytes and no pending copy reads it.
            unsafe { std::ptr::copy_nonoverlapping(chunk.as_ptr(), buf, chunk.len()) };
            let at = dst + (i * STAGING_CHUNK) as u64;
            // SAFETY: `buf` stays allocated and unmodified until `event` passes.
            unsafe { self.driver.copy_htod(at, buf, chunk.len(), stream) }
                .map_err(|e| driver_error("copy to device", e))?;
            self.driver
                .event_record(event, stream)
                .map_err(|e| driver_error("recording a staging event", e))?;
        }
        Ok(())
    }

    fn new_staging(&self) -> Result<Staging> {
        let mut buffers = [(std::ptr::null_mut(), Event(0)); 2];
        for slot in &mut buffers {
            let buf = self
                .driver
                .pinned_alloc(STAGING_CHUNK)
                .map_err(|e| driver_error("allocating pinned staging memory", e))?;
            let event = self.driver.event_create().map_err(|e| {
                // SAFETY: just allocated, never used.
                unsafe { self.driver.pinned_free(buf) };
                driver_error("creating a staging event", e)
            })?;
            *slot = (buf, event);
        }
        Ok(Staging { buffers, next: 0 })
    }

    /// Reads `out.len()` bytes at `src` once the work enqueued before has finished.
    pub fn read(&self, src: u64, out: &mut [u8]) -> Result<()> {
        // SAFETY: `src` addresses a live allocation of `out.len()` bytes; `out` is not touched
        // before the synchronization below.
        unsafe {
            self.driver
                .copy_dtoh(out.as_mut_ptr(), src, out.len(), self.stream)
        }
        .map_err(|e| driver_error("copy to host", e))?;
        self.synchronize("copy to host")
    }

    /// Enqueues setting `len` bytes at `dst` to `byte`.
    pub fn fill(&self, dst: u64, byte: u8, len: usize) -> Result<()> {
        // SAFETY: `dst` addresses a live allocation of at least `len` bytes.
        unsafe { self.driver.memset(dst, byte, len, self.stream) }
            .map_err(|e| driver_error("memset", e))
    }

    fn launch(&self, l: &mut Launch) -> Result<()> {
        let f = self.functions[l.kernel as usize].ok_or_else(|| {
            Error::cuda(
                l.kernel.name(),
                "a Hopper-only kernel (kernels/*_sm90a.cu, built for sm_90a alone): it runs on compute capability 9.0 devices only, and this one is not",
            )
        })?;
        if l.smem > DEFAULT_SMEM_LIMIT {
            let mut limits = self.smem_limits.lock().expect("shared memory limits");
            if limits[l.kernel as usize] < l.smem {
                self.driver.set_max_dynamic_smem(f, l.smem).map_err(|e| {
                    driver_error(&format!("{} shared memory opt-in", l.kernel.name()), e)
                })?;
                limits[l.kernel as usize] = l.smem;
            }
        }
        let shape = LaunchShape {
            grid: l.grid,
            block: l.block,
            smem: l.smem,
        };
        let mut params = l.params()?;
        // SAFETY: the op's launch plan packs exactly the kernel's parameters (checked in
        // debug builds), with pointers into live device buffers of the session.
        unsafe { self.driver.launch(f, shape, self.stream, &mut params) }
            .map_err(|e| driver_error(&format!("launching {}", l.kernel.name()), e))
    }

    /// Enqueues one entry: our kernel, or a vendor call on our stream.
    fn enqueue_entry(&self, e: &mut Entry) -> Result<()> {
        match e {
            Entry::Kernel(l) => self.launch(l),
            // SAFETY: the session that built the call keeps its buffers alive; our stream
            // belongs to their context.
            Entry::Vendor(v) => unsafe { v.enqueue(self.stream.0) },
        }
    }

    fn run_eager(&self, list: &mut LaunchList) -> Result<()> {
        let debug = self.debug();
        for (e, label) in list.launches.iter_mut().zip(&list.labels) {
            self.enqueue_entry(e)
                .map_err(|err| Error::cuda(label.clone(), err))?;
            if debug {
                self.synchronize(&format!("{label} ({})", e.name()))?;
            }
        }
        self.synchronize("running the launch list")
    }

    /// Runs every launch of the list: the first run eagerly (it validates each launch and
    /// sets the shared-memory opt-ins), later runs as one captured graph, or eagerly where
    /// capture failed.
    pub fn execute(&self, list: &mut LaunchList) -> Result<()> {
        if self.debug() || list.launches.is_empty() {
            return self.run_eager(list);
        }
        match replay_of(list) {
            Some(Replay::Graph(c)) => {
                self.replay(c)?;
                return self.synchronize("CUDA graph replay");
            }
            Some(Replay::Eager) => return self.run_eager(list),
            None => {}
        }
        self.run_eager(list)?;
        let replay = match self.capture(list) {
            Ok(c) => Replay::Graph(c),
            Err(e) => {
                self.note_capture_failure(list, &e);
                Replay::Eager
            }
        };
        list.replay = Some(Box::new(replay));
        Ok(())
    }

    fn note_capture_failure(&self, list: &LaunchList, e: &Error) {
        let first = list.labels.first().map_or("", String::as_str);
        let reason = format!(
            "graph of {} launches from `{first}`: {e}",
            list.launches.len()
        );
        eprintln!("warning: CUDA graph capture failed ({reason}); this graph runs eagerly");
        self.capture_failures
            .lock()
            .expect("capture log")
            .push(reason);
    }

    /// Enqueues one run of the list without waiting: its graph where captured.
    pub fn enqueue(&self, list: &mut LaunchList) -> Result<()> {
        match replay_of(list) {
            Some(Replay::Graph(c)) => self.replay(c),
            _ => list
                .launches
                .iter_mut()
                .try_for_each(|e| self.enqueue_entry(e)),
        }
    }

    fn replay(&self, c: &Captured) -> Result<()> {
        self.driver
            .launch_graph(c.exec, self.stream)
            .map_err(|e| driver_error("launching the CUDA graph", e))
    }

    /// Enqueues one replay of a captured graph.
    pub fn launch_captured(&self, c: &Captured) -> Result<()> {
        self.replay(c)
    }

    fn capture(&self, list: &mut LaunchList) -> Result<Captured> {
        self.capture_with(&mut || {
            list.launches
                .iter_mut()
                .try_for_each(|e| self.enqueue_entry(e))
        })
    }

    /// Captures what `work` enqueues on our stream into one instantiated CUDA graph.
    pub fn capture_with(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<Captured> {
        self.driver
            .begin_capture(self.stream)
            .map_err(|e| driver_error("begin graph capture", e))?;
        let launched = work();
        // Ended whatever happened in between, so the stream leaves capture mode.
        let ended = self.driver.end_capture(self.stream);
        let graph = match (launched, ended) {
            (Ok(()), Ok(g)) => g,
            (Err(e), ended) => {
                if let Ok(g) = ended {
                    self.driver.destroy_graph(g, None);
                }
                return Err(e);
            }
            (Ok(()), Err(e)) => return Err(driver_error("end graph capture", e)),
        };
        let exec: DriverResult<GraphExec> = self.driver.instantiate(graph);
        match exec {
            Ok(exec) => Ok(Captured {
                driver: self.driver.clone(),
                graph,
                exec,
            }),
            Err(e) => {
                self.driver.destroy_graph(graph, None);
                Err(driver_error("instantiating the CUDA graph", e))
            }
        }
    }
}

fn replay_of(list: &LaunchList) -> Option<&Replay> {
    list.replay
        .as_ref()
        .and_then(|r| r.downcast_ref::<Replay>())
}

impl Drop for Executor {
    fn drop(&mut self) {
        if let Some(s) = self.staging.get_mut().expect("staging lock").take() {
            // Pending uploads may still read the staging buffers.
            let _ = self.driver.synchronize(self.stream);
            let _ = self.driver.synchronize(self.upload_stream);
            for (buf, event) in s.buffers {
                self.driver.event_destroy(event);
                // SAFETY: allocated by `new_staging`; the stream is idle.
                unsafe { self.driver.pinned_free(buf) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::abi::ArgKind;
    use crate::runtime::kernels::KernelId;
    use crate::runtime::launch::Args;
    use cudarc::driver::sys::CUresult;
    use std::ffi::c_void;

    /// Records every driver call with the stream it named; can fail captures on demand.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<(&'static str, Option<Stream>)>>,
        fail_capture: bool,
    }

    impl Recorder {
        fn log(&self, call: &'static str, s: Option<Stream>) {
            self.calls.lock().unwrap().push((call, s));
        }

        fn calls(&self) -> Vec<(&'static str, Option<Stream>)> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl StreamDriver for Recorder {
        unsafe fn copy_htod(&self, _: u64, _: *const u8, _: usize, s: Stream) -> DriverResult<()> {
            self.log("copy_htod", Some(s));
            Ok(())
        }
        unsafe fn copy_dtoh(&self, _: *mut u8, _: u64, _: usize, s: Stream) -> DriverResult<()> {
            self.log("copy_dtoh", Some(s));
            Ok(())
        }
        unsafe fn memset(&self, _: u64, _: u8, _: usize, s: Stream) -> DriverResult<()> {
            self.log("memset", Some(s));
            Ok(())
        }
        unsafe fn launch(
            &self,
            _: Function,
            _: LaunchShape,
            s: Stream,
            _: &mut [*mut c_void],
        ) -> DriverResult<()> {
            self.log("launch", Some(s));
            Ok(())
        }
        fn set_max_dynamic_smem(&self, _: Function, _: u32) -> DriverResult<()> {
            self.log("set_max_dynamic_smem", None);
            Ok(())
        }
        fn synchronize(&self, s: Stream) -> DriverResult<()> {
            self.log("synchronize", Some(s));
            Ok(())
        }
        fn begin_capture(&self, s: Stream) -> DriverResult<()> {
            self.log("begin_capture", Some(s));
            Ok(())
        }
        fn end_capture(&self, s: Stream) -> DriverResult<Graph> {
            self.log("end_capture", Some(s));
            Ok(Graph(0x6000))
        }
        fn instantiate(&self, _: Graph) -> DriverResult<GraphExec> {
            self.log("instantiate", None);
            if self.fail_capture {
                Err(DriverError(CUresult::CUDA_ERROR_NOT_SUPPORTED))
            } else {
                Ok(GraphExec(0x7000))
            }
        }
        fn launch_graph(&self, _: GraphExec, s: Stream) -> DriverResult<()> {
            self.log("launch_graph", Some(s));
            Ok(())
        }
        fn destroy_graph(&self, _: Graph, _: Option<GraphExec>) {
            self.log("destroy_graph", None);
        }
        fn pinned_alloc(&self, bytes: usize) -> DriverResult<*mut u8> {
            self.log("pinned_alloc", None);
            Ok(Box::leak(vec![0u8; bytes].into_boxed_slice()).as_mut_ptr())
        }
        unsafe fn pinned_free(&self, p: *mut u8) {
            self.log("pinned_free", None);
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                p,
                STAGING_CHUNK,
            )));
        }
        fn event_create(&self) -> DriverResult<Event> {
            self.log("event_create", None);
            Ok(Event(0x8000))
        }
        fn event_record(&self, _: Event, s: Stream) -> DriverResult<()> {
            self.log("event_record", Some(s));
            Ok(())
        }
        fn event_synchronize(&self, _: Event) -> DriverResult<()> {
            self.log("event_synchronize", None);
            Ok(())
        }
        fn event_destroy(&self, _: Event) {
            self.log("event_destroy", None);
        }
    }

    const OUR_STREAM: Stream = Stream(0x5000);
    const UPLOAD_STREAM: Stream = Stream(0x6000);

    fn executor(rec: &Arc<Recorder>, debug: bool) -> Executor {
        let functions = (0..KernelId::ALL.len())
            .map(|i| Some(Function(0x1000 + i)))
            .collect();
        Executor::new(rec.clone(), OUR_STREAM, UPLOAD_STREAM, functions, debug)
    }

    fn list(n: usize) -> LaunchList {
        // A kernel of one pointer parameter, so the launches pass the debug builds' ABI check
        // (the mock driver runs nothing).
        let one_pointer = [ArgKind::Ptr];
        let k = *KernelId::ALL
            .iter()
            .find(|k| k.params().iter().map(|p| p.kind).eq(one_pointer))
            .expect("a kernel of one pointer parameter");
        LaunchList {
            launches: (0..n)
                .map(|i| {
                    let mut l = Launch::linear(k, 1, 32, Args::new().ptr(0x9000 + i as u64));
                    l.smem = 64 * 1024;
                    Entry::Kernel(l)
                })
                .collect(),
            labels: (0..n).map(|i| format!("node{i}")).collect(),
            replay: None,
        }
    }

    /// Every call that enqueues work named our stream; none went to a default stream.
    fn assert_only_our_stream(calls: &[(&'static str, Option<Stream>)]) {
        for (call, s) in calls {
            if let Some(s) = s {
                assert!(!s.is_default(), "{call} went to a default stream");
                if (*call, *s) == ("synchronize", UPLOAD_STREAM) {
                    continue; // dropping the executor waits for any upload
                }
                assert_eq!(*s, OUR_STREAM, "{call} went to another stream");
            }
        }
    }

    fn count(calls: &[(&'static str, Option<Stream>)], name: &str) -> usize {
        calls.iter().filter(|(c, _)| *c == name).count()
    }

    /// A kernel its device did not load (a Hopper-only one elsewhere) is refused by name.
    #[test]
    fn unloaded_hopper_kernels_are_refused() {
        let rec = Arc::new(Recorder::default());
        let k = KernelId::lookup("selftest_bad_mbarrier_parity").unwrap();
        let functions = KernelId::ALL
            .iter()
            .map(|&i| (!i.sm90a()).then_some(Function(0x1000 + i as usize)))
            .collect();
        let ex = Executor::new(rec.clone(), OUR_STREAM, UPLOAD_STREAM, functions, false);
        let mut l = LaunchList {
            launches: vec![Entry::Kernel(Launch::linear(
                k,
                1,
                128,
                Args::new().ptr(0x9000),
            ))],
            labels: vec!["node".into()],
            replay: None,
        };
        let e = ex.execute(&mut l).unwrap_err().to_string();
        assert!(
            e.contains("selftest_bad_mbarrier_parity") && e.contains("sm_90a"),
            "{e}"
        );
        assert_eq!(count(&rec.calls(), "launch"), 0);
    }

    #[test]
    fn every_copy_fill_and_launch_goes_to_our_stream() {
        let rec = Arc::new(Recorder::default());
        let ex = executor(&rec, false);
        let small = vec![1u8; 1000];
        let large = vec![2u8; 2 * STAGING_CHUNK + 12345];
        ex.fill(0x9000, 0xff, 4096).unwrap();
        ex.write(0x9000, &small).unwrap();
        ex.write(0xa000, &large).unwrap();
        let mut l = list(3);
        ex.execute(&mut l).unwrap(); // eager, then captured
        ex.execute(&mut l).unwrap(); // replayed
        let mut out = vec![0u8; 64];
        ex.read(0x9000, &mut out).unwrap();
        drop(ex);
        let calls = rec.calls();
        assert_only_our_stream(&calls);
        // One small copy plus three staged chunks, each recorded for reuse of its buffer.
        assert_eq!(count(&calls, "copy_htod"), 4);
        assert_eq!(count(&calls, "event_record"), 3);
        assert_eq!(count(&calls, "pinned_alloc"), 2);
        assert_eq!(count(&calls, "pinned_free"), 2);
        // Eager run + capture each launch all three; the replay is one graph launch.
        assert_eq!(count(&calls, "launch"), 6);
        assert_eq!(count(&calls, "launch_graph"), 1);
        // The shared-memory opt-in happens once per kernel.
        assert_eq!(count(&calls, "set_max_dynamic_smem"), 1);
        // The read waits for its copy before the host sees the bytes.
        let read_at = calls.iter().rposition(|(c, _)| *c == "copy_dtoh").unwrap();
        assert_eq!(calls[read_at + 1].0, "synchronize");
    }

    /// Uploads placed ahead (weights of a later stage) go to the upload stream only, from any
    /// thread, so a capture of the kernels' stream running meanwhile records launches only.
    #[test]
    fn uploads_beside_the_kernels_stay_out_of_their_stream_and_its_captures() {
        let rec = Arc::new(Recorder::default());
        let ex = executor(&rec, false);
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..20u64 {
                    ex.upload(i << 32, &vec![3u8; STAGING_CHUNK + 7]).unwrap();
                    ex.upload((i << 32) + 0x10_0000_0000, &[4u8; 100]).unwrap();
                }
                ex.finish_uploads().unwrap();
            });
            let mut l = list(4);
            for _ in 0..3 {
                ex.execute(&mut l).unwrap();
            }
        });
        let calls = rec.calls();
        let on = |call: &str, stream| {
            calls
                .iter()
                .filter(|(c, s)| *c == call && *s == Some(stream))
                .count()
        };
        assert_eq!(
            on("copy_htod", UPLOAD_STREAM),
            60,
            "2 staged chunks + 1 small, 20 times"
        );
        assert_eq!(on("copy_htod", OUR_STREAM), 0);
        assert_eq!(on("event_record", UPLOAD_STREAM), 40);
        assert_eq!(on("synchronize", UPLOAD_STREAM), 1);
        // The capture on our stream holds the four launches and nothing else of ours.
        let begin = calls
            .iter()
            .position(|(c, _)| *c == "begin_capture")
            .unwrap();
        let end = calls.iter().position(|(c, _)| *c == "end_capture").unwrap();
        let captured: Vec<_> = calls[begin + 1..end]
            .iter()
            .filter(|(_, s)| *s == Some(OUR_STREAM))
            .map(|(c, _)| *c)
            .collect();
        assert_eq!(captured, ["launch"; 4]);
    }

    #[test]
    fn staged_uploads_wait_before_reusing_a_buffer() {
        let rec = Arc::new(Recorder::default());
        let ex = executor(&rec, false);
        ex.write(0, &vec![0u8; 3 * STAGING_CHUNK]).unwrap();
        let calls = rec.calls();
        // Every refill of a staging buffer is preceded by a wait on its event.
        let mut waits = 0;
        for (i, (c, _)) in calls.iter().enumerate() {
            if *c == "copy_htod" {
                assert!(
                    calls[..i]
                        .iter()
                        .rev()
                        .find(|(c, _)| *c != "pinned_alloc" && *c != "event_create")
                        .is_some_and(|(c, _)| *c == "event_synchronize"),
                    "a staged copy without a wait on its buffer"
                );
                waits += 1;
            }
        }
        assert_eq!(waits, 3);
    }

    #[test]
    fn a_failed_capture_falls_back_to_eager_and_is_reported() {
        let rec = Arc::new(Recorder {
            fail_capture: true,
            ..Recorder::default()
        });
        let ex = executor(&rec, false);
        let mut l = list(2);
        ex.execute(&mut l).unwrap();
        ex.execute(&mut l).unwrap();
        let calls = rec.calls();
        assert_only_our_stream(&calls);
        // Two eager runs and one capture attempt; no graph launch; the failed graph freed.
        assert_eq!(count(&calls, "launch"), 2 + 2 + 2);
        assert_eq!(count(&calls, "begin_capture"), 1);
        assert_eq!(count(&calls, "launch_graph"), 0);
        assert_eq!(count(&calls, "destroy_graph"), 1);
        let failures = ex.capture_failures();
        assert_eq!(failures.len(), 1);
        assert!(failures[0].contains("node0"), "{failures:?}");
    }

    #[test]
    fn debug_mode_synchronizes_after_every_launch_and_never_captures() {
        let rec = Arc::new(Recorder::default());
        let ex = executor(&rec, true);
        let mut l = list(3);
        ex.execute(&mut l).unwrap();
        ex.execute(&mut l).unwrap();
        let calls = rec.calls();
        assert_only_our_stream(&calls);
        assert_eq!(count(&calls, "begin_capture"), 0);
        for (i, (c, _)) in calls.iter().enumerate() {
            if *c == "launch" {
                assert_eq!(calls[i + 1].0, "synchronize");
            }
        }
    }
}
