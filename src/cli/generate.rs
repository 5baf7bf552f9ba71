//! `ultrapixel generate`: a prompt to PNG files, with progress, Ctrl-C between steps, and a
//! JSON summary on request.

use super::backend_arg::BackendArg;
use crate::hub::{Hub, HubOptions};
use crate::pipeline::control::{Control, ControlKind};
use crate::pipeline::generate::{Event, Image, Pipeline, PipelineOptions};
use crate::pipeline::lora::LoraSpec;
use crate::pipeline::png_out::write_png;
use crate::pipeline::request::{rename_setting, OutputPattern, Request, Size, StageSettings};
use crate::pipeline::stages::{Phase, Progress};
use crate::pipeline::{model_dir, ModelDir};
use crate::runtime::BackendKind;
use crate::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// What the image shows.
    pub prompt: String,
    /// What it should not show (the reference's default is empty).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Output size in pixels, WIDTHxHEIGHT: multiples of 8 from 512 to 6144, any aspect.
    #[arg(long, default_value_t = Request::DEFAULT_SIZE)]
    pub size: Size,
    /// Stage C steps (each of its low-res and high-res passes).
    #[arg(long, default_value_t = Request::DEFAULT_STAGE_C.steps)]
    pub steps_c: u32,
    /// Stage B steps.
    #[arg(long, default_value_t = Request::DEFAULT_STAGE_B.steps)]
    pub steps_b: u32,
    /// Stage C classifier-free guidance scale [default: 4, or 1 with --control as in the
    /// official ControlNet script].
    #[arg(long)]
    pub cfg_c: Option<f32>,
    /// Stage B classifier-free guidance scale.
    #[arg(long, default_value_t = Request::DEFAULT_STAGE_B.cfg)]
    pub cfg_b: f32,
    /// Seed of the first image (default: random, printed); image k uses seed + k.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Images to make, one after the other.
    #[arg(long, default_value_t = 1)]
    pub batch: u32,
    #[arg(long, default_value = OutputPattern::DEFAULT,
          help = literal_braces("Output file pattern: {seed} and {n} (index in the batch) are replaced"))]
    pub out: String,
    /// A directory with the model files (default: the Hugging Face cache, downloading what
    /// is missing).
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Where to run: cuda (NVIDIA GPU), or on the CPU: hostsim (our kernels under the
    /// emulator, about a minute for the tiny test model at 512x512) or cpu (reference code,
    /// seconds for the tiny model); both are far too slow for the real model.
    #[arg(long, value_enum, default_value_t = BackendArg::Cuda)]
    pub backend: BackendArg,
    /// Write PNGs without the generation settings.
    #[arg(long)]
    pub no_metadata: bool,
    /// Free each stage's weights after it ran (less GPU memory, slower batches).
    #[arg(long)]
    pub low_vram: bool,
    /// Check every step's latent for NaN/Inf (each stage's result is always checked).
    #[arg(long)]
    pub check_every_step: bool,
    /// Plan as if the GPU had this many MiB free (to stay below a budget).
    #[arg(long, value_name = "MIB")]
    pub memory_limit: Option<u64>,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
    /// Print a JSON summary (images, seeds, timings per stage, memory plan) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Write previews of Stage C into this directory (created if needed) while it samples:
    /// its estimate of the final latent through the previewer network, at 8x the latent
    /// (needs previewer.safetensors, which `ultrapixel download` fetches).
    #[arg(long, value_name = "DIR")]
    pub preview: Option<PathBuf>,
    /// With --preview: preview every this many steps (and at the end of each pass).
    #[arg(long, value_name = "N", default_value_t = 5, requires = "preview",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub preview_every: u32,
    /// Apply a LoRA to Stage C (and its learned tokens to the text encoder) at strength
    /// SCALE (default 1; 0 leaves it out); repeat for several. A `.json` beside the file may
    /// name its new trigger tokens: `{"train_tokens": [["[word]", "^init</w>"]]}`.
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    pub loras: Vec<LoraSpec>,
    /// Condition the image on a control input through a ControlNet (canny: the edges of
    /// --control-image, or a ready --control-map; sr: a larger version of --control-image,
    /// see `ultrapixel upscale`; inpaint: --control-image with the white region of
    /// --control-mask repainted), with the official script's settings: Stage C CFG 1 (unless
    /// --cfg-c), shift 2, " high quality" appended to the prompt. The ControlNet file is
    /// fetched on demand (`ultrapixel download --control canny`).
    #[arg(long, value_name = "KIND", requires = "control_input")]
    pub control: Option<ControlKind>,
    /// With --control canny: the image whose edges guide the composition (PNG, JPEG or
    /// WebP; resized to a short side of 768 like the official script). With --control sr:
    /// the image to enlarge (resized to half the output size, then encoded).
    #[arg(
        long,
        value_name = "FILE",
        requires = "control",
        group = "control_input"
    )]
    pub control_image: Option<PathBuf>,
    /// With --control: a ready control map instead (greyscale, white edges on black).
    #[arg(
        long,
        value_name = "FILE",
        requires = "control",
        group = "control_input"
    )]
    pub control_map: Option<PathBuf>,
    /// With --control inpaint: the mask (greyscale, white where to paint; resized to the
    /// control image).
    #[arg(long, value_name = "FILE", requires = "control_image")]
    pub control_mask: Option<PathBuf>,
    /// With --control: how strongly the control map steers, 0 to 2 [default: 0.7 for canny,
    /// 1 for sr].
    #[arg(
        long,
        value_name = "S",
        requires = "control",
        allow_negative_numbers = true
    )]
    pub control_strength: Option<f32>,
}

/// A help text with its `{n}` kept as written: clap turns `{n}` anywhere in a help text into
/// a line break and has no escape for it, so an empty style (a reset: invisible on a terminal,
/// stripped from plain output) goes between the brace and the `n`.
fn literal_braces(text: &str) -> clap::builder::StyledStr {
    let reset = clap::builder::styling::Reset.render().to_string();
    text.replace("{n}", &format!("{{{reset}n}}")).into()
}

impl GenerateArgs {
    fn request(&self) -> Result<Request> {
        let mut request = Request {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            size: self.size,
            stage_c: StageSettings {
                steps: self.steps_c,
                cfg: Request::DEFAULT_STAGE_C.cfg,
            },
            stage_b: StageSettings {
                steps: self.steps_b,
                cfg: self.cfg_b,
            },
            seed: self.seed,
            batch: self.batch,
            output: OutputPattern::parse(&self.out)?,
            control: None,
        };
        if let Some(control) = self.control_input()? {
            request.set_control(control);
        }
        if let Some(cfg) = self.cfg_c {
            request.stage_c.cfg = cfg;
        }
        Ok(request)
    }

    /// The control of `--control`, its input file read (an unreadable one is an error that
    /// names it).
    fn control_input(&self) -> Result<Option<Control>> {
        let Some(kind) = self.control else {
            return Ok(None);
        };
        let control = match (kind, &self.control_image, &self.control_map) {
            (ControlKind::Canny, Some(image), _) => Control::canny_image_file(image)?,
            (ControlKind::Canny, None, Some(map)) => Control::canny_map_file(map)?,
            (ControlKind::SuperResolution, Some(image), _) => {
                Control::super_resolution_image_file(image)?
            }
            (ControlKind::Inpainting, Some(image), _) => {
                let Some(mask) = &self.control_mask else {
                    return Err(Error::InvalidArgument(
                        "--control inpaint needs --control-mask FILE (white where to paint)".into(),
                    ));
                };
                Control::inpainting_image_file(image, mask)?
            }
            (ControlKind::SuperResolution | ControlKind::Inpainting, None, Some(_)) => {
                return Err(Error::InvalidArgument(
                    "--control sr and inpaint take an image (--control-image FILE), not a map"
                        .into(),
                ))
            }
            (_, None, None) => {
                return Err(Error::InvalidArgument(
                    "--control needs --control-image FILE or --control-map FILE".into(),
                ))
            }
        };
        Ok(Some(match self.control_strength {
            Some(s) => control.with_strength(s),
            None => control,
        }))
    }
}

/// Runs `generate`; the exit code.
pub fn generate(args: GenerateArgs) -> Result<i32> {
    let mut request = args.request().map_err(with_flag)?;
    for w in request.validate().map_err(with_flag)? {
        eprintln!("warning: {w}");
    }
    // Fix the seeds now: they name the files and are printed before the long work.
    let seeds = request.seeds();
    request.seed = Some(seeds[0]);
    let paths: Vec<PathBuf> = seeds
        .iter()
        .enumerate()
        .map(|(n, &s)| request.output.path(s, n as u32))
        .collect();
    for p in &paths {
        check_output_dir(p)?;
    }
    if let Some(dir) = &args.preview {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::InvalidArgument(format!(
                "preview directory {} cannot be created ({e}): choose another --preview",
                dir.display()
            ))
        })?;
        check_output_dir(&dir.join("preview.png"))?;
    }
    if !args.quiet {
        eprintln!(
            "seed {} ({} image{}, {})",
            seeds[0],
            seeds.len(),
            if seeds.len() == 1 { "" } else { "s" },
            request.size
        );
    }
    // The device first: no download for a machine that cannot run it.
    let backend = super::backend_arg::open(args.backend)?;
    let hub = HubOptions {
        progress: !args.quiet,
        ..HubOptions::from_env()
    };
    let mut dir = resolve_models(args.model_dir.as_deref(), &hub, args.quiet)?;
    for file in args.control.into_iter().flat_map(ControlKind::files) {
        if dir.optional(file).is_none() && args.model_dir.is_none() && !hub.offline {
            if !args.quiet {
                eprintln!("{file} missing from the Hugging Face cache: downloading it");
            }
            model_dir::download_control(&Hub::new(hub.clone()), None, file)?;
            dir = ModelDir::resolve(None, &hub)?;
        }
    }
    let options = PipelineOptions {
        low_vram: args.low_vram,
        check_every_step: args.check_every_step,
        memory_limit: args.memory_limit.map(|m| m << 20),
        preview_every: args.preview.as_ref().map(|_| args.preview_every as usize),
        loras: args.loras.clone(),
        control: args.control,
        ..PipelineOptions::default()
    };
    let pipeline = Pipeline::load(&dir, backend, options)?;
    for w in pipeline
        .warnings()
        .iter()
        .cloned()
        .chain(pipeline.prompt_warnings(&request)?)
    {
        eprintln!("warning: {w}");
    }
    let plan = pipeline.plan(request.size)?;

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // A second handler (a library user's) may already exist: then Ctrl-C just exits.
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }
    let mut progress = ProgressReport::new(args.quiet);
    let mut written = Vec::new();
    let mut previews = Vec::new();
    let result = pipeline.generate_with(&request, &mut |event| {
        if interrupted.load(Ordering::SeqCst) {
            return Err(Error::Interrupted);
        }
        match event {
            Event::Progress { image, progress: p } => progress.update(image, p),
            Event::Preview { image, preview } => {
                let dir = args
                    .preview
                    .as_deref()
                    .expect("previews only with --preview");
                let pass = match preview.phase {
                    Phase::StageCLowRes => "lowres",
                    _ => "highres",
                };
                let name = format!("{}-c-{pass}-{:02}.png", seeds[image], preview.step + 1);
                let path = dir.join(name);
                write_png(&path, &preview.rgb, None)?;
                previews.push(serde_json::json!({
                    "path": path.display().to_string(),
                    "image": image,
                    "pass": pass,
                    "step": preview.step + 1,
                }));
            }
            Event::ImageDone(img) => {
                progress.finish_phase();
                let path = &paths[written.len()];
                let meta = (!args.no_metadata).then_some(&img.metadata);
                write_png(path, &img.rgb, meta)?;
                if !args.quiet {
                    eprintln!("wrote {} (seed {})", path.display(), img.seed);
                }
                written.push(summary(path, img));
            }
        }
        Ok(())
    });
    progress.finish_phase();
    if args.json {
        let json = serde_json::json!({
            "backend": BackendKind::from(args.backend),
            "size": request.size.to_string(),
            "control": request.control.as_ref().map(|c| c.usage()),
            "images": written,
            "previews": previews,
            "memory_plan": {
                "stages": plan.stages,
                "sequential_peak_bytes": plan.sequential_peak(),
                "resident_peak_bytes": plan.resident_peak(),
            },
            "completed": result.is_ok(),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&json).expect("JSON serializes")
        );
    }
    match result {
        Ok(_) => Ok(0),
        Err(Error::Interrupted) => {
            eprintln!(
                "interrupted: {} of {} images written, nothing partial left behind",
                written.len(),
                paths.len()
            );
            Ok(130)
        }
        Err(e) => Err(e),
    }
}

fn summary(path: &Path, img: &Image) -> serde_json::Value {
    let timings: serde_json::Map<String, serde_json::Value> = img
        .timings
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
        .collect();
    serde_json::json!({
        "path": path.display().to_string(),
        "seed": img.seed,
        "width": img.rgb.width,
        "height": img.rgb.height,
        "seconds": timings,
    })
}

/// Fails before any work when an output's directory is missing or not writable.
fn check_output_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let meta = std::fs::metadata(dir).map_err(|e| {
        Error::InvalidArgument(format!(
            "output directory {} cannot be used ({e}): create it or choose another --out",
            dir.display()
        ))
    })?;
    if !meta.is_dir() || meta.permissions().readonly() {
        return Err(Error::InvalidArgument(format!(
            "output directory {} is not a writable directory: choose another --out",
            dir.display()
        )));
    }
    Ok(())
}

/// The model files: `dir` as given, or the hub cache, fetching what is missing.
pub fn resolve_models(dir: Option<&Path>, hub: &HubOptions, quiet: bool) -> Result<ModelDir> {
    match ModelDir::resolve(dir, hub) {
        Ok(d) => Ok(d),
        Err(e) if dir.is_some() || hub.offline => Err(e),
        Err(_) => {
            if !quiet {
                eprintln!("model files missing from the Hugging Face cache: downloading them");
            }
            model_dir::download(&Hub::new(hub.clone()), None, |d| {
                if !quiet && d.fetched {
                    eprintln!("downloaded {}", d.name);
                }
            })
        }
    }
}

/// A request setting named by its option (`stage_c.steps` → `--steps-c`).
fn with_flag(e: Error) -> Error {
    rename_setting(e, |field| match field {
        "stage_c.steps" => "--steps-c",
        "stage_b.steps" => "--steps-b",
        "stage_c.cfg" => "--cfg-c",
        "control.strength" => "--control-strength",
        "stage_b.cfg" => "--cfg-b",
        "batch" => "--batch",
        "seed" => "--seed",
        "output" => "--out",
        other => other,
    })
}

/// Progress on stderr: a bar per sampling loop on a terminal, one line per finished phase.
struct ProgressReport {
    quiet: bool,
    current: Option<(usize, Phase, Instant, ProgressBar)>,
}

impl ProgressReport {
    fn new(quiet: bool) -> Self {
        ProgressReport {
            quiet,
            current: None,
        }
    }

    fn update(&mut self, image: usize, p: &Progress) {
        if self.quiet {
            return;
        }
        match p {
            Progress::Started { phase, steps } => {
                self.finish_phase();
                let bar = if *steps > 0 {
                    let style = ProgressStyle::with_template(
                        "{msg:26} [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> ");
                    ProgressBar::new(*steps as u64)
                        .with_style(style)
                        .with_message(format!("image {} {}", image + 1, phase.label()))
                } else {
                    ProgressBar::hidden()
                };
                self.current = Some((image, *phase, Instant::now(), bar));
            }
            Progress::Step(e) => {
                if let Some((_, _, _, bar)) = &self.current {
                    bar.set_position(e.step as u64 + 1);
                }
            }
        }
    }

    fn finish_phase(&mut self) {
        if let Some((image, phase, started, bar)) = self.current.take() {
            bar.finish_and_clear();
            let steps = bar.length().unwrap_or(0);
            let secs = started.elapsed().as_secs_f64();
            let rate = if steps > 0 {
                format!(", {:.2} it/s", steps as f64 / secs.max(1e-9))
            } else {
                String::new()
            };
            eprintln!("image {} {}: {secs:.1} s{rate}", image + 1, phase.label());
        }
    }
}
