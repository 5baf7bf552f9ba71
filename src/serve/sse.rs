//! Progress as server-sent events: with `"stream": true` in the body of either generation
//! endpoint the answer is `text/event-stream`, one `progress` event per phase start and
//! sampler step (`{"image", "phase", "step", "steps"}`), then one `result` event whose data is
//! the body the request would have had without `stream`, or one `error` event with the API's
//! error body and `status`. Closing the stream cancels the job at its next step.

use super::api::{Api, ApiError};
use super::jobs::{Finished, JobEvent};
use crate::pipeline::Request;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use std::convert::Infallible;
use tokio::sync::mpsc::UnboundedReceiver;

struct Streaming {
    api: Api,
    request: Request,
    events: Option<UnboundedReceiver<JobEvent>>,
    images: Vec<Finished>,
}

/// The job's events as an SSE answer.
pub fn respond(api: Api, request: Request, events: UnboundedReceiver<JobEvent>) -> Response {
    let state = Streaming {
        api,
        request,
        events: Some(events),
        images: Vec::new(),
    };
    let events = stream::unfold(state, |mut s| async move {
        let rx = s.events.as_mut()?;
        loop {
            let event = match rx.recv().await {
                Some(JobEvent::Progress {
                    image,
                    phase,
                    step,
                    steps,
                }) => Event::default().event("progress").data(
                    serde_json::json!({
                        "image": image, "phase": phase, "step": step, "steps": steps
                    })
                    .to_string(),
                ),
                Some(JobEvent::Image(finished)) => {
                    s.images.push(finished);
                    continue;
                }
                Some(JobEvent::Done(Ok(()))) => {
                    s.events = None;
                    let body = s.api.success(&s.request, &s.images);
                    Event::default().event("result").data(body.to_string())
                }
                Some(JobEvent::Done(Err(failure))) => {
                    s.events = None;
                    error_event(s.api, &super::http::failure_error(&failure))
                }
                None => {
                    s.events = None;
                    error_event(s.api, &super::http::vanished())
                }
            };
            return Some((Ok::<_, Infallible>(event), s));
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn error_event(api: Api, e: &ApiError) -> Event {
    let mut body = api.error_body(e);
    body["status"] = e.status.as_u16().into();
    Event::default().event("error").data(body.to_string())
}
