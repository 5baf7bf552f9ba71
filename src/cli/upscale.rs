//! `ultrapixel upscale IN --size WxH`: an existing image made larger through the cascade,
//! as `generate --control sr --control-image IN` with the super-resolution ControlNet's
//! settings (Stable Cascade's example script: Stage C CFG 1, shift 2, strength 1). That
//! script describes the image in its prompt; without one a generic prompt is used
//! ([`DEFAULT_PROMPT`]; the control suffix " high quality" is still appended).

use super::backend_arg::BackendArg;
use super::generate::{generate, GenerateArgs};
use crate::pipeline::control::ControlKind;
use crate::pipeline::request::{Request, Size};
use crate::Result;
use std::path::PathBuf;

/// The prompt without `--prompt` (an empty one is refused, and the cascade needs some text).
pub const DEFAULT_PROMPT: &str = "a sharp, detailed photo";

#[derive(clap::Args, Debug)]
pub struct UpscaleArgs {
    /// The image to enlarge (PNG, JPEG or WebP).
    pub input: PathBuf,
    /// Output size in pixels, WIDTHxHEIGHT (multiples of 8 from 512 to 6144); best at twice
    /// the input's, the ratio the ControlNet was trained for.
    #[arg(long)]
    pub size: Size,
    /// What the image shows (a description helps the details).
    #[arg(long, default_value = DEFAULT_PROMPT)]
    pub prompt: String,
    /// Seed (default: random, printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output file; {seed} is replaced.
    #[arg(long, short, default_value = "upscaled-{seed}.png")]
    pub out: String,
    /// How strongly the input steers, 0 to 2 [default: 1].
    #[arg(long, value_name = "S", allow_negative_numbers = true)]
    pub control_strength: Option<f32>,
    /// Stage C steps (each of its low-res and high-res passes).
    #[arg(long, default_value_t = Request::DEFAULT_STAGE_C.steps)]
    pub steps_c: u32,
    /// Stage B steps.
    #[arg(long, default_value_t = Request::DEFAULT_STAGE_B.steps)]
    pub steps_b: u32,
    /// A directory with the model files (default: the Hugging Face cache, downloading what
    /// is missing).
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Where to run (as for generate).
    #[arg(long, value_enum, default_value_t = BackendArg::Cuda)]
    pub backend: BackendArg,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs `upscale`; the exit code.
pub fn upscale(a: UpscaleArgs) -> Result<i32> {
    generate(GenerateArgs {
        prompt: a.prompt,
        negative_prompt: String::new(),
        size: a.size,
        steps_c: a.steps_c,
        steps_b: a.steps_b,
        cfg_c: None,
        cfg_b: Request::DEFAULT_STAGE_B.cfg,
        seed: a.seed,
        batch: 1,
        out: a.out,
        model_dir: a.model_dir,
        backend: a.backend,
        no_metadata: false,
        low_vram: false,
        check_every_step: false,
        memory_limit: None,
        quiet: a.quiet,
        json: a.json,
        preview: None,
        preview_every: 5,
        loras: Vec::new(),
        control: Some(ControlKind::SuperResolution),
        control_image: Some(a.input),
        control_map: None,
        control_mask: None,
        control_strength: a.control_strength,
    })
}
