//! The bounded job queue and one worker thread per loaded pipeline: a worker takes the next
//! job, runs it to the end (one job per device at a time) and sends what happens back to the
//! request that queued it. A job whose request is gone (the client disconnected) stops at its
//! next step; so does every job once the shutdown deadline has passed.

use super::metrics::Metrics;
use crate::pipeline::png_out::png_bytes;
use crate::pipeline::stages::{Phase, Progress, StageId};
use crate::pipeline::{Event, Pipeline, Request};
use crate::Error;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// One generation asked for over HTTP.
pub struct Job {
    pub request: Request,
    /// The API that asked (a metrics label).
    pub api: &'static str,
    events: UnboundedSender<JobEvent>,
}

impl Job {
    /// A job and the receiver of its events; dropping the receiver cancels the job.
    pub fn new(request: Request, api: &'static str) -> (Job, UnboundedReceiver<JobEvent>) {
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        (
            Job {
                request,
                api,
                events,
            },
            rx,
        )
    }
}

/// What a running job reports, in order: progress and images, then exactly one `Done`.
pub enum JobEvent {
    Progress {
        image: usize,
        phase: Phase,
        step: usize,
        steps: usize,
    },
    Image(Finished),
    Done(Result<(), Failure>),
}

/// A finished image, encoded.
pub struct Finished {
    pub seed: u64,
    pub png: Vec<u8>,
    /// The A1111 settings line (as the PNG's `parameters` chunk).
    pub infotext: String,
    /// Seconds per stage, as [`crate::pipeline::Image::timings`].
    pub timings: Vec<(StageId, f64)>,
}

/// Why a job did not complete.
pub enum Failure {
    /// Stopped by the shutdown deadline.
    Cancelled,
    /// An error while running `phase` (None: before the first phase began).
    Failed {
        phase: Option<Phase>,
        message: String,
    },
}

impl Failure {
    /// The message a client sees: the stage that failed, then the error.
    pub fn message(&self) -> String {
        match self {
            Failure::Cancelled => {
                "the server is shutting down: the job was cancelled; retry on another replica"
                    .into()
            }
            Failure::Failed {
                phase: Some(p),
                message,
            } => format!("{} failed: {message}", p.label()),
            Failure::Failed {
                phase: None,
                message,
            } => format!("generation failed: {message}"),
        }
    }
}

/// The queue was full.
pub struct Full;

#[derive(Default)]
struct Waiting {
    jobs: VecDeque<Job>,
    closed: bool,
}

/// Jobs waiting for a device: at most `capacity` of them.
pub struct Queue {
    waiting: Mutex<Waiting>,
    wake: Condvar,
    capacity: usize,
    running: AtomicUsize,
    /// Set at the shutdown deadline: every job stops at its next step.
    pub cancel: AtomicBool,
    /// A moving average of job seconds (f64 bits), for `Retry-After`.
    job_seconds: AtomicU64,
}

impl Queue {
    pub fn new(capacity: usize) -> Queue {
        Queue {
            waiting: Mutex::default(),
            wake: Condvar::new(),
            capacity,
            running: AtomicUsize::new(0),
            cancel: AtomicBool::new(false),
            job_seconds: AtomicU64::new(0),
        }
    }

    /// Queues `job`, or refuses it when `capacity` jobs already wait.
    pub fn push(&self, job: Job) -> Result<(), Full> {
        let mut w = self.lock();
        if w.jobs.len() >= self.capacity || w.closed {
            return Err(Full);
        }
        w.jobs.push_back(job);
        self.wake.notify_one();
        Ok(())
    }

    /// The next job (waiting for one); None once closed and empty.
    fn pop(&self) -> Option<Job> {
        let mut w = self.lock();
        loop {
            if let Some(job) = w.jobs.pop_front() {
                return Some(job);
            }
            if w.closed {
                return None;
            }
            w = self.wake.wait(w).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// No more jobs: workers finish what is queued and return.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    /// Jobs waiting (not running).
    pub fn depth(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Jobs running.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Seconds until a full queue likely has room again: the queue drained over `devices`
    /// at the recent job time (at least 1).
    pub fn retry_after(&self, devices: usize) -> u64 {
        let job = f64::from_bits(self.job_seconds.load(Ordering::Relaxed));
        let waiting = (self.depth() + 1) as f64 / devices.max(1) as f64;
        (job * waiting).ceil().max(1.0) as u64
    }

    fn record_job_seconds(&self, seconds: f64) {
        let old = f64::from_bits(self.job_seconds.load(Ordering::Relaxed));
        let new = if old == 0.0 {
            seconds
        } else {
            0.8 * old + 0.2 * seconds
        };
        self.job_seconds.store(new.to_bits(), Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One worker thread per pipeline, taking jobs from `queue` until it is closed.
pub fn spawn_workers(
    queue: &Arc<Queue>,
    pipelines: Vec<Pipeline>,
    metrics: &Arc<Metrics>,
) -> Vec<JoinHandle<()>> {
    pipelines
        .into_iter()
        .enumerate()
        .map(|(device, pipeline)| {
            let (queue, metrics) = (queue.clone(), metrics.clone());
            std::thread::Builder::new()
                .name(format!("upx-device-{device}"))
                .spawn(move || {
                    while let Some(job) = queue.pop() {
                        if job.events.is_closed() {
                            metrics.outcome(job.api, "cancelled");
                            continue;
                        }
                        queue.running.fetch_add(1, Ordering::Relaxed);
                        let started = Instant::now();
                        let outcome = run(&pipeline, &job, &queue.cancel, &metrics);
                        queue.record_job_seconds(started.elapsed().as_secs_f64());
                        queue.running.fetch_sub(1, Ordering::Relaxed);
                        metrics.outcome(job.api, outcome);
                    }
                })
                .expect("a thread starts")
        })
        .collect()
}

/// Runs one job; its outcome for the metrics.
fn run(pipeline: &Pipeline, job: &Job, cancel: &AtomicBool, metrics: &Metrics) -> &'static str {
    let events = &job.events;
    let mut phase = None;
    let mut on_event = |event: Event| {
        // The client is gone or the deadline passed: stop within this step.
        if events.is_closed() || cancel.load(Ordering::SeqCst) {
            return Err(Error::Interrupted);
        }
        let sent = match event {
            Event::Progress { image, progress } => {
                let (p, step, steps) = match progress {
                    Progress::Started { phase, steps } => (*phase, 0, *steps),
                    Progress::Step(e) => (e.phase, e.step + 1, e.steps),
                };
                phase = Some(p);
                events.send(JobEvent::Progress {
                    image,
                    phase: p,
                    step,
                    steps,
                })
            }
            Event::Preview { .. } => Ok(()),
            Event::ImageDone(img) => {
                metrics.stage_timings(&img.timings);
                let png = png_bytes(&img.rgb, Some(&img.metadata))?;
                events.send(JobEvent::Image(Finished {
                    seed: img.seed,
                    png,
                    infotext: img.metadata.a1111_parameters(),
                    timings: img.timings.clone(),
                }))
            }
        };
        sent.map_err(|_| Error::Interrupted)
    };
    // A panic is a failure of this job, not of the server.
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        pipeline.generate_with(&job.request, &mut on_event)
    }));
    let (done, outcome) = match result {
        Ok(Ok(_)) => (Ok(()), "ok"),
        Ok(Err(Error::Interrupted)) if cancel.load(Ordering::SeqCst) => {
            (Err(Failure::Cancelled), "cancelled")
        }
        Ok(Err(Error::Interrupted)) => return "cancelled",
        Ok(Err(e)) => (
            Err(Failure::Failed {
                phase,
                message: e.to_string(),
            }),
            "failed",
        ),
        Err(panic) => (
            Err(Failure::Failed {
                phase,
                message: panic_message(&*panic),
            }),
            "failed",
        ),
    };
    // The client may have gone in the meantime: nothing to tell then.
    let _ = events.send(JobEvent::Done(done));
    outcome
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown".into());
    format!("internal error (panic: {text}); the server keeps serving")
}
