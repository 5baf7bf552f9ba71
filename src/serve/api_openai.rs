//! OpenAI's images API, `POST /v1/images/generations` (platform.openai.com/docs/api-reference/
//! images/create): `prompt`, `n`, `size` ("WIDTHxHEIGHT" or "auto"), `response_format`
//! (`b64_json` only: this server keeps no files to link to); `model`, `quality`, `style` and
//! `user` are accepted and ignored. Extra fields: `negative_prompt`, `seed`, each stage's
//! steps and CFG scale (`steps_c`, `cfg_c`, `steps_b`, `cfg_b`) and `stream`.

use super::api::{base64, from_json, ApiError, Parsed, StageFields};
use super::jobs::Finished;
use crate::pipeline::{Request, Size};
use axum::http::StatusCode;
use serde::Deserialize;

#[derive(Deserialize)]
struct Body {
    prompt: String,
    #[serde(default)]
    negative_prompt: String,
    n: Option<u32>,
    size: Option<String>,
    response_format: Option<String>,
    seed: Option<u64>,
    #[serde(default)]
    stream: bool,
    #[serde(flatten)]
    stages: StageFields,
}

pub fn parse(body: &[u8]) -> Result<Parsed, ApiError> {
    let b: Body = from_json(body)?;
    if let Some(f) = b.response_format.as_deref().filter(|f| *f != "b64_json") {
        return Err(ApiError::bad_request(format!(
            "response_format `{f}` is not supported: use b64_json (the server keeps no image \
             files to link to)"
        )));
    }
    let mut request = Request::new(b.prompt);
    request.negative_prompt = b.negative_prompt;
    request.size = match b.size.as_deref() {
        None | Some("auto") => Request::DEFAULT_SIZE,
        Some(text) => Size::parse(text).map_err(|e| ApiError::bad_request(e.to_string()))?,
    };
    request.batch = b.n.unwrap_or(1);
    request.seed = b.seed;
    b.stages.apply(&mut request);
    Ok(Parsed {
        request,
        stream: b.stream,
    })
}

/// The request's fields as this API names them.
pub fn field_name(field: &'static str) -> &'static str {
    match field {
        "stage_c.steps" => "steps_c",
        "stage_c.cfg" => "cfg_c",
        "stage_b.steps" => "steps_b",
        "stage_b.cfg" => "cfg_b",
        "batch" => "n",
        other => other,
    }
}

pub fn success(request: &Request, images: &[Finished]) -> serde_json::Value {
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let data: Vec<_> = images
        .iter()
        .map(|i| serde_json::json!({ "b64_json": base64(&i.png), "seed": i.seed }))
        .collect();
    serde_json::json!({
        "created": created,
        "data": data,
        "output_format": "png",
        "size": request.size.to_string(),
    })
}

pub fn error_body(e: &ApiError) -> serde_json::Value {
    let kind = match e.status {
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        s if s.is_client_error() => "invalid_request_error",
        _ => "server_error",
    };
    serde_json::json!({
        "error": { "message": e.message, "type": kind, "param": null, "code": null }
    })
}
