//! `ultrapixel serve`: the pipeline kept loaded, once per device, behind the two HTTP APIs
//! that existing tools speak: OpenAI's images API (`POST /v1/images/generations`) and
//! Automatic1111's (`POST /sdapi/v1/txt2img`). A bounded queue feeds one worker per device
//! (one job per device at a time); progress streams as server-sent events; `GET /health`,
//! `GET /ready` and `GET /metrics` (Prometheus) serve probes and monitoring. Every server is
//! stateless: replicas scale out behind any load balancer (docs/DEPLOY.md).

mod api;
mod api_a1111;
mod api_openai;
mod config;
mod http;
mod jobs;
mod metrics;
mod shutdown;
mod sse;

pub use config::{ServeConfig, Token};

use crate::pipeline::Pipeline;
use crate::{Error, Result};
use http::App;
use jobs::Queue;
use metrics::Metrics;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// Records a start-up time in the metrics: device, part (`backend_open`, `model_load`),
/// seconds.
pub type RecordLoad<'a> = &'a dyn Fn(usize, &'static str, f64);

/// Serves until SIGTERM or SIGINT, then shuts down gracefully (see [`shutdown`]) and returns
/// Ok. The listener is bound first, so `/health` answers while `load` (called on another
/// thread) loads one pipeline per device; `/ready` answers 200 once it has. An error of
/// `load` stops the server and is returned.
pub fn run(
    config: ServeConfig,
    load: impl FnOnce(RecordLoad) -> Result<Vec<Pipeline>> + Send + 'static,
) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| Error::InvalidArgument(format!("cannot start the async runtime: {e}")))?;
    let listen = config.listen;
    let cannot_listen = move |e: std::io::Error| {
        Error::InvalidArgument(format!(
            "cannot listen on {listen}: {e}; choose another --listen address"
        ))
    };
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(listen))
        .map_err(cannot_listen)?;
    let addr = listener.local_addr().map_err(cannot_listen)?;
    // Signal handlers belong to the runtime.
    let _runtime = runtime.enter();
    let (stop, stop_inside) = shutdown::Stop::install()?;
    let metrics = Arc::new(Metrics::new());
    let app = Arc::new(App {
        queue: Arc::new(Queue::new(config.max_queue)),
        metrics: metrics.clone(),
        backends: OnceLock::new(),
        stopping: Default::default(),
        token: config.token,
    });
    eprintln!("listening on http://{addr}");

    // Loading runs beside the listener; its error, if any, ends the server.
    let load_error = Arc::new(Mutex::new(None));
    let workers = Arc::new(Mutex::new(Vec::new()));
    {
        let (app, load_error, workers) = (app.clone(), load_error.clone(), workers.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            let record = |device, part, seconds| metrics.load_seconds(device, part, seconds);
            match load(&record) {
                Ok(pipelines) => {
                    let backends = pipelines.iter().map(|p| p.backend().clone());
                    let _ = app.backends.set(backends.collect());
                    *workers.lock().unwrap_or_else(|p| p.into_inner()) =
                        jobs::spawn_workers(&app.queue, pipelines, &app.metrics);
                    eprintln!(
                        "ready: {} device(s) loaded in {:.1} s",
                        app.backends.get().map_or(0, Vec::len),
                        started.elapsed().as_secs_f64()
                    );
                }
                Err(e) => {
                    *load_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    let _ = stop_inside.send(true);
                }
            }
        });
    }

    let router = http::router(app.clone());
    let stopped = stop.wait(app.clone(), config.shutdown_deadline);
    runtime
        .block_on(async {
            axum::serve(listener, router)
                .with_graceful_shutdown(stopped)
                .await
        })
        .map_err(|e| Error::InvalidArgument(format!("the server failed: {e}")))?;

    // Nothing is running any more unless a worker is mid-step: stop it there.
    app.queue.cancel.store(true, Ordering::SeqCst);
    app.queue.close();
    for worker in std::mem::take(&mut *workers.lock().unwrap_or_else(|p| p.into_inner())) {
        let _ = worker.join();
    }
    if let Some(e) = load_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    eprintln!("stopped");
    Ok(())
}
