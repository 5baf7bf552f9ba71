//! Automatic1111's web UI API, `POST /sdapi/v1/txt2img` (its `/docs` OpenAPI schema):
//! `prompt`, `negative_prompt`, `width`, `height`, `steps` and `cfg_scale` (Stage C's),
//! `seed` (-1: random), `batch_size` × `n_iter` images; the answer is `{images, parameters,
//! info}` with base64 PNGs and `info` a JSON string with the seeds and infotexts. Extra
//! fields: Stage B's `steps_b` and `cfg_b` (`steps_c`, `cfg_c` as the other names of `steps`,
//! `cfg_scale`), and `stream`. A1111's other fields (sampler, hires fix, ...) are ignored.

use super::api::{base64, from_json, size, ApiError, Parsed, StageFields};
use super::jobs::Finished;
use crate::pipeline::Request;
use serde::Deserialize;

#[derive(Deserialize)]
struct Body {
    prompt: String,
    #[serde(default)]
    negative_prompt: String,
    width: Option<u32>,
    height: Option<u32>,
    steps: Option<u32>,
    cfg_scale: Option<f32>,
    seed: Option<i64>,
    batch_size: Option<u32>,
    n_iter: Option<u32>,
    #[serde(default)]
    stream: bool,
    #[serde(flatten)]
    stages: StageFields,
}

pub fn parse(body: &[u8]) -> Result<Parsed, ApiError> {
    let mut b: Body = from_json(body)?;
    for (a1111, ours, given) in [
        (
            "steps",
            "steps_c",
            b.steps.is_some() && b.stages.steps_c.is_some(),
        ),
        (
            "cfg_scale",
            "cfg_c",
            b.cfg_scale.is_some() && b.stages.cfg_c.is_some(),
        ),
    ] {
        if given {
            return Err(ApiError::bad_request(format!(
                "{a1111} and {ours} are the same setting (Stage C's): give one of them"
            )));
        }
    }
    b.stages.steps_c = b.stages.steps_c.or(b.steps);
    b.stages.cfg_c = b.stages.cfg_c.or(b.cfg_scale);
    let mut request = Request::new(b.prompt);
    request.negative_prompt = b.negative_prompt;
    let default = Request::DEFAULT_SIZE;
    request.size = size(
        b.width.unwrap_or(default.width),
        b.height.unwrap_or(default.height),
    )?;
    request.seed = match b.seed {
        None | Some(-1) => None,
        Some(s) => Some(u64::try_from(s).map_err(|_| {
            ApiError::bad_request(format!("seed {s}: must be -1 (random) or 0 and above"))
        })?),
    };
    // Out-of-range products are caught by validation (as `batch_size`).
    request.batch = b
        .batch_size
        .unwrap_or(1)
        .saturating_mul(b.n_iter.unwrap_or(1));
    b.stages.apply(&mut request);
    Ok(Parsed {
        request,
        stream: b.stream,
    })
}

/// The request's fields as this API names them.
pub fn field_name(field: &'static str) -> &'static str {
    match field {
        "stage_c.steps" => "steps",
        "stage_c.cfg" => "cfg_scale",
        "stage_b.steps" => "steps_b",
        "stage_b.cfg" => "cfg_b",
        "batch" => "batch_size",
        other => other,
    }
}

pub fn success(request: &Request, images: &[Finished]) -> serde_json::Value {
    let seeds: Vec<u64> = images.iter().map(|i| i.seed).collect();
    let parameters = serde_json::json!({
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "width": request.size.width,
        "height": request.size.height,
        "steps": request.stage_c.steps,
        "cfg_scale": request.stage_c.cfg,
        "steps_b": request.stage_b.steps,
        "cfg_b": request.stage_b.cfg,
        "seed": seeds.first(),
        "batch_size": request.batch,
    });
    let timings: Vec<serde_json::Map<String, serde_json::Value>> = images
        .iter()
        .map(|i| {
            i.timings
                .iter()
                .map(|(stage, s)| (stage.to_string(), serde_json::json!(s)))
                .collect()
        })
        .collect();
    let info = serde_json::json!({
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seed": seeds.first(),
        "all_seeds": seeds,
        "width": request.size.width,
        "height": request.size.height,
        "steps": request.stage_c.steps,
        "cfg_scale": request.stage_c.cfg,
        "sampler_name": "DDPM",
        "infotexts": images.iter().map(|i| &i.infotext).collect::<Vec<_>>(),
        "timings": timings,
    });
    serde_json::json!({
        "images": images.iter().map(|i| base64(&i.png)).collect::<Vec<_>>(),
        "parameters": parameters,
        "info": info.to_string(),
    })
}

pub fn error_body(e: &ApiError) -> serde_json::Value {
    serde_json::json!({
        "error": e.status.canonical_reason().unwrap_or("Error"),
        "detail": e.message,
    })
}
