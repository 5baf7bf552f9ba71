//! What both generation APIs share: the request fields they both add (each stage's steps and
//! CFG scale), JSON parsing with errors a client can act on, and the error type their
//! handlers answer with.

use super::jobs::Finished;
use super::{api_a1111, api_openai};
use crate::pipeline::request::rename_setting;
use crate::pipeline::{Request, StageSettings};
use crate::Error;
use axum::http::StatusCode;
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// The two APIs, named as the metrics label them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    OpenAi,
    A1111,
}

/// A parsed generation request: the library's request, and whether to stream progress.
pub struct Parsed {
    pub request: Request,
    pub stream: bool,
}

/// An answer other than success: its status and a message that says what to do.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Seconds for a `Retry-After` header (429 and 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn retry_after(self, seconds: u64) -> ApiError {
        ApiError {
            retry_after: Some(seconds),
            ..self
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// The metrics outcome of answering with this error.
    pub fn outcome(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST => "bad_request",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::TOO_MANY_REQUESTS => "queue_full",
            StatusCode::SERVICE_UNAVAILABLE => "not_ready",
            _ => "failed",
        }
    }
}

impl Api {
    /// The API a path belongs to (for the answers made before its handler runs).
    pub fn of_path(path: &str) -> Option<Api> {
        if path.starts_with("/v1/") {
            Some(Api::OpenAi)
        } else if path.starts_with("/sdapi/") {
            Some(Api::A1111)
        } else {
            None
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Api::OpenAi => "openai",
            Api::A1111 => "a1111",
        }
    }

    /// The body as a validated request (the same checks and messages as the CLI's, under
    /// this API's field names), or a 400 that says what is wrong.
    pub fn parse(self, body: &[u8]) -> Result<Parsed, ApiError> {
        let (parsed, name): (Parsed, fn(&'static str) -> &'static str) = match self {
            Api::OpenAi => (api_openai::parse(body)?, api_openai::field_name),
            Api::A1111 => (api_a1111::parse(body)?, api_a1111::field_name),
        };
        parsed
            .request
            .validate()
            .map_err(|e| ApiError::bad_request(rename_setting(e, name).to_string()))?;
        Ok(parsed)
    }

    /// The success body for `images` made by `request`.
    pub fn success(self, request: &Request, images: &[Finished]) -> serde_json::Value {
        match self {
            Api::OpenAi => api_openai::success(request, images),
            Api::A1111 => api_a1111::success(request, images),
        }
    }

    /// The error body in this API's shape.
    pub fn error_body(self, e: &ApiError) -> serde_json::Value {
        match self {
            Api::OpenAi => api_openai::error_body(e),
            Api::A1111 => api_a1111::error_body(e),
        }
    }
}

/// Each stage's settings, as extra fields of both APIs (the names of the CLI's options);
/// absent fields keep the library's defaults.
#[derive(Debug, Default, Deserialize)]
pub struct StageFields {
    pub steps_c: Option<u32>,
    pub cfg_c: Option<f32>,
    pub steps_b: Option<u32>,
    pub cfg_b: Option<f32>,
}

impl StageFields {
    pub fn apply(&self, request: &mut Request) {
        let set = |s: &mut StageSettings, steps: Option<u32>, cfg: Option<f32>| {
            s.steps = steps.unwrap_or(s.steps);
            s.cfg = cfg.unwrap_or(s.cfg);
        };
        set(&mut request.stage_c, self.steps_c, self.cfg_c);
        set(&mut request.stage_b, self.steps_b, self.cfg_b);
    }
}

/// Parses a JSON body; a syntax or type error is a 400 naming where it is.
pub fn from_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid: {e}")))
}

/// A size given as two numbers, checked as the CLI's `--size` is.
pub fn size(width: u32, height: u32) -> Result<crate::pipeline::Size, ApiError> {
    crate::pipeline::Size::new(width, height)
        .map_err(|e: Error| ApiError::bad_request(e.to_string()))
}

pub fn base64(png: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(png)
}
