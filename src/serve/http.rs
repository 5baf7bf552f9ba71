//! The routes and their handlers: the two generation APIs (parse and validate, queue,
//! answer at once or as a stream), health, readiness, metrics, and the bearer token check.

use super::api::{Api, ApiError};
use super::config::Token;
use super::jobs::{Failure, Job, JobEvent, Queue};
use super::metrics::Metrics;
use crate::pipeline::Request;
use crate::runtime::Backend;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::sync::mpsc::UnboundedReceiver;

/// What every handler shares.
pub struct App {
    pub queue: Arc<Queue>,
    pub metrics: Arc<Metrics>,
    /// The loaded devices' backends (for GPU memory); set once every pipeline is loaded.
    pub backends: OnceLock<Vec<Backend>>,
    /// Set at shutdown: new requests answer 503.
    pub stopping: AtomicBool,
    pub token: Option<Token>,
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/images/generations", post(openai))
        .route("/sdapi/v1/txt2img", post(a1111))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(app.clone(), authorize))
        // Probes need no token: they tell nothing but up or not.
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .with_state(app)
}

async fn openai(State(app): State<Arc<App>>, body: Bytes) -> Response {
    generate(Api::OpenAi, &app, &body).await
}

async fn a1111(State(app): State<Arc<App>>, body: Bytes) -> Response {
    generate(Api::A1111, &app, &body).await
}

/// One generation request of `api`: 400 for a bad one (before anything is queued), 503
/// while loading or stopping, 429 on a full queue; else the images or a stream of progress.
async fn generate(api: Api, app: &App, body: &[u8]) -> Response {
    let queued = api.parse(body).and_then(|parsed| {
        let devices = match app.backends.get() {
            Some(b) if !app.stopping.load(Ordering::SeqCst) => b.len(),
            Some(_) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the server is shutting down: send the request to another replica",
                ))
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the model is still loading (GET /ready answers 200 when it is loaded)",
                )
                .retry_after(5))
            }
        };
        let (job, events) = Job::new(parsed.request.clone(), api.label());
        app.queue.push(job).map_err(|_| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "the queue is full: retry after the time in Retry-After",
            )
            .retry_after(app.queue.retry_after(devices))
        })?;
        Ok((parsed, events))
    });
    match queued {
        Err(e) => {
            app.metrics.outcome(api.label(), e.outcome());
            error_response(Some(api), &e)
        }
        Ok((parsed, events)) if parsed.stream => super::sse::respond(api, parsed.request, events),
        Ok((parsed, events)) => collect(api, &parsed.request, events).await,
    }
}

/// Waits for every image of the job; its answer.
async fn collect(api: Api, request: &Request, mut events: UnboundedReceiver<JobEvent>) -> Response {
    let mut images = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            JobEvent::Progress { .. } => {}
            JobEvent::Image(finished) => images.push(finished),
            JobEvent::Done(Ok(())) => return json(StatusCode::OK, &api.success(request, &images)),
            JobEvent::Done(Err(failure)) => {
                return error_response(Some(api), &failure_error(&failure))
            }
        }
    }
    error_response(Some(api), &vanished())
}

/// The answer to a job that did not complete: 503 when cancelled at shutdown, 500 with the
/// stage that failed otherwise.
pub fn failure_error(failure: &Failure) -> ApiError {
    let status = match failure {
        Failure::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
        Failure::Failed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, failure.message())
}

/// A job whose worker ended without a word (it cannot, short of a bug).
pub fn vanished() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the job ended without a result (a bug: please report it)",
    )
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `e` in `api`'s error shape (plain text outside the APIs), with its headers.
fn error_response(api: Option<Api>, e: &ApiError) -> Response {
    let mut response = match api {
        Some(api) => json(e.status, &api.error_body(e)),
        None => (e.status, format!("{}\n", e.message)).into_response(),
    };
    let headers = response.headers_mut();
    if let Some(seconds) = e.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    if e.status == StatusCode::UNAUTHORIZED {
        headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

async fn ready(State(app): State<Arc<App>>) -> Response {
    match app.backends.get() {
        Some(b) if !app.stopping.load(Ordering::SeqCst) => json(
            StatusCode::OK,
            &serde_json::json!({ "ready": true, "devices": b.len() }),
        ),
        _ => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({ "ready": false }),
        ),
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let backends = app.backends.get().map_or(&[][..], |b| &b[..]);
    let text = app
        .metrics
        .render(app.queue.depth(), app.queue.running(), backends);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// With a token: every route but the probes needs `Authorization: Bearer <token>`.
async fn authorize(
    State(app): State<Arc<App>>,
    request: axum::http::Request<Body>,
    next: Next,
) -> Response {
    if let Some(token) = &app.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| token.matches(g.trim())) {
            let api = Api::of_path(request.uri().path());
            if let Some(api) = api {
                app.metrics.outcome(api.label(), "unauthorized");
            }
            let e = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token: send `Authorization: Bearer <token>` with the \
                 token of the server's --token-file",
            );
            return error_response(api, &e);
        }
    }
    next.run(request).await
}
