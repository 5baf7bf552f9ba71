//! Text to image: [`Pipeline::load`] opens and checks a model directory on a backend,
//! [`Pipeline::generate`] turns a [`Request`] into images (docs/ARCHITECTURE.md §2): text encoding,
//! Stage C's dual pass with UltraPixel guidance, Stage B, Stage A, 8-bit RGB.
//!
//! Before anything is placed on the device, every stage is planned at the requested size
//! ([`super::plan`]: weights + activation arena) and compared with the device's free memory:
//! weights stay
//! resident across stages and images when everything fits, are dropped after each stage
//! when only that fits (or with `low_vram`), and the request is refused otherwise.

use super::control::net::{self as control_net, ControlMaps};
use super::control::{ControlKind, CONTROL_SHIFT};
use super::lora::{LoadedLora, LoraSet, LoraSpec, ModelShapes};
use super::model_dir::ModelDir;
use super::observer::{check_finite, ImageObserver, PhaseTimer, Previews};
use super::open_models::{open_controlnet, open_previewer, ControlStage, Models, Stage};
use super::plan::{
    memory_plan, stage_b_shape, stage_c_shapes, stage_plan, LatentSizes, MemoryPlan,
};
use super::png_out::{ImageMetadata, Rgb8Image};
use super::preview::{preview_recording, Preview};
use super::request::{Request, Size};
use super::stages::{
    encode_text, Observer, Phase, Progress, RunContext, StageADecode, StageBRun, StageCConditions,
    StageCNoise, StageCRun, StageId, TextEmbedding, STAGE_A_TILE,
};
use crate::models::config::PreviewerConfig;
use crate::ops::noise::{gaussian_noise_ref, noise_key};
use crate::runtime::device::WeightCache;
use crate::runtime::session::SessionOptions;
use crate::runtime::session_cache::SessionCache;
use crate::runtime::Backend;
use crate::sampling_loop::{Guidance, StepNoise};
use crate::tensor::HostTensor;
use crate::text::{Tokenizer, Tokens};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// CFG rescale ρ of both stages (the reference's `GDF.sample` default, docs/MODEL.md §4.5).
pub const CFG_RHO: f32 = 0.7;

/// Noise streams of one image's seed: each sampled latent draws its own.
const STREAM_STAGE_C_HR: u32 = 0;
const STREAM_STAGE_C_LR: u32 = 1;
const STREAM_STAGE_B: u32 = 2;
/// The "step" of a stream's initial latent (the sampler's steps are 0, 1, …).
const INIT_STEP: u32 = u32::MAX;

/// How a pipeline runs.
#[derive(Clone, Debug)]
pub struct PipelineOptions {
    /// Where PyTorch checkpoints are converted to safetensors (once).
    pub conversion_cache: PathBuf,
    /// Treat the device as having this many bytes free (None: ask the device; the CPU
    /// backends have no limit).
    pub memory_limit: Option<u64>,
    /// Drop each stage's weights after it ran, even when everything would fit.
    pub low_vram: bool,
    /// Check every step's latent for NaN/Inf (each stage's output is always checked).
    pub check_every_step: bool,
    /// Preview Stage C every this many steps (and at the last step of each pass) as
    /// [`Event::Preview`]; needs the previewer weights. None: no previews.
    pub preview_every: Option<usize>,
    /// LoRAs applied to Stage C (and their learned tokens to the text encoder), in order;
    /// [`Pipeline::set_loras`] changes them later.
    pub loras: Vec<LoraSpec>,
    /// The ControlNet to load, for requests with [`Request::set_control`] (its file comes
    /// from the model directory: `download --control`).
    pub control: Option<ControlKind>,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            conversion_cache: super::open_models::default_conversion_cache(),
            memory_limit: None,
            low_vram: false,
            check_every_step: false,
            preview_every: None,
            loras: Vec::new(),
            control: None,
        }
    }
}

/// Where the weights live between stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Residency {
    Resident,
    PerStage,
}

/// A generated image.
#[derive(Clone, Debug)]
pub struct Image {
    pub seed: u64,
    pub rgb: Rgb8Image,
    pub metadata: ImageMetadata,
    /// Seconds per stage: text encoder (shared by the batch; on image 0 only), stage C
    /// (both passes), stage B, stage A.
    pub timings: Vec<(StageId, f64)>,
}

/// What a generation reports while it runs.
pub enum Event<'a> {
    /// Progress of image `image` (0-based) of the batch.
    Progress {
        image: usize,
        progress: &'a Progress<'a>,
    },
    /// A Stage C preview of image `image` (with [`PipelineOptions::preview_every`]).
    Preview {
        image: usize,
        preview: &'a Preview,
    },
    ImageDone(&'a Image),
}

/// A loaded model on a backend. `generate` may be called from several threads; one
/// generation runs at a time (the others wait).
pub struct Pipeline {
    models: Models,
    /// Loaded when previews are asked for.
    previewer: Option<Stage<PreviewerConfig>>,
    /// Loaded with [`PipelineOptions::control`].
    controlnet: Option<ControlStage>,
    backend: Backend,
    options: PipelineOptions,
    hashes: BTreeMap<String, String>,
    tokenizer: Tokenizer,
    loras: LoraSet,
    /// The device weights of the three sampling stages (C, B, A); the lock is held while a
    /// generation runs, so one runs at a time.
    caches: Mutex<[WeightCache; 3]>,
    /// Their step sessions, kept for the next request of the same size where memory allows
    /// (the arenas, launch lists and captured CUDA graphs are then placed once).
    sessions: Arc<SessionCache>,
}

impl Pipeline {
    /// Opens the model files of `dir` (checking every tensor) for `backend`.
    ///
    /// ```no_run
    /// use ultrapixel::hub::HubOptions;
    /// use ultrapixel::pipeline::{ModelDir, Pipeline, PipelineOptions, Request, Size};
    /// use ultrapixel::runtime::{Backend, BackendKind};
    ///
    /// let dir = ModelDir::resolve(None, &HubOptions::from_env())?;
    /// let backend = Backend::open(BackendKind::Cuda)?;
    /// let pipeline = Pipeline::load(&dir, backend, PipelineOptions::default())?;
    /// let mut request = Request::new("a lighthouse at dusk, photo");
    /// request.size = Size::new(4096, 2304)?;
    /// request.seed = Some(7);
    /// for image in pipeline.generate(&request)? {
    ///     println!("seed {}: {}x{}", image.seed, image.rgb.width, image.rgb.height);
    /// }
    /// # Ok::<(), ultrapixel::Error>(())
    /// ```
    pub fn load(dir: &ModelDir, backend: Backend, options: PipelineOptions) -> Result<Pipeline> {
        let models = Models::open(dir, &options.conversion_cache)?;
        let previewer = match options.preview_every {
            Some(_) => Some(open_previewer(dir)?),
            None => None,
        };
        let controlnet = match options.control {
            Some(kind) => Some(open_controlnet(dir, kind)?),
            None => None,
        };
        let mut pipeline = Pipeline {
            models,
            previewer,
            controlnet,
            backend,
            hashes: dir.hashes(),
            tokenizer: Tokenizer::clip()?,
            loras: LoraSet::default(),
            caches: Mutex::new(Default::default()),
            sessions: SessionCache::new(),
            options: options.clone(),
        };
        pipeline.set_loras(&options.loras)?;
        Ok(pipeline)
    }

    /// Replaces the LoRAs in use by `specs` (empty: none), reading and checking every file
    /// first: on an error the pipeline keeps the LoRAs it had. The base weights are never
    /// changed, so unloading gives them back bit for bit.
    pub fn set_loras(&mut self, specs: &[LoraSpec]) -> Result<()> {
        let stage_c = crate::models::stage_c::manifest(&self.models.stage_c.config, true)?;
        let text = &self.models.text.config;
        let shapes = ModelShapes {
            stage_c: &stage_c,
            text_width: text.hidden_size,
            vocab: text.vocab_size,
        };
        let loras = LoraSet::load(specs, &shapes, &self.options.conversion_cache)?;
        self.tokenizer = match loras.tokenizer() {
            Some(t) => t.clone(),
            None => Tokenizer::clip()?,
        };
        self.loras = loras;
        self.options.loras = specs.to_vec();
        // Stage C's device weights were merged with the old LoRAs.
        let caches = self.caches.get_mut().unwrap_or_else(|p| p.into_inner());
        caches[0].clear();
        self.sessions.clear();
        Ok(())
    }

    /// The LoRAs in use, in order.
    pub fn loras(&self) -> &[LoadedLora] {
        self.loras.loaded()
    }

    /// (sessions reused, sessions placed) through the sessions kept between requests (none
    /// on the cpu backend, or where memory does not allow keeping them).
    pub fn kept_session_counts(&self) -> (usize, usize) {
        self.sessions.counts()
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// What loading found worth telling (e.g. a tokenizer that pads differently).
    pub fn warnings(&self) -> &[String] {
        &self.models.warnings
    }

    /// Warnings about the prompts of `request` (the end of a prompt past CLIP's 75 tokens is
    /// ignored; the warning names it).
    pub fn prompt_warnings(&self, request: &Request) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for (what, p) in [
            ("prompt", &request.prompt),
            ("negative prompt", &request.negative_prompt),
        ] {
            if let Some(w) = self.tokenizer.encode(p)?.warning() {
                out.push(format!("{what}: {w}"));
            }
        }
        Ok(out)
    }

    /// The device memory a generation at `size` needs, stage by stage (nothing is
    /// allocated); with a ControlNet loaded, as a request with control needs it.
    pub fn plan(&self, size: Size) -> Result<MemoryPlan> {
        let cfg = self.models.configs();
        let device = self.backend.device();
        let mut plan = memory_plan(&cfg, size, device.as_deref())?;
        if let Some(p) = &self.previewer {
            // Its session lives beside Stage C's, at the high-res latent at most.
            let shapes = stage_c_shapes(&cfg, &LatentSizes::of(size));
            let graph = preview_recording(&p.config, shapes.hr)?.0.finish().0;
            let extra = stage_plan(StageId::StageC, std::iter::once(&graph), device.as_deref());
            let c = plan
                .stages
                .iter_mut()
                .find(|s| s.stage == StageId::StageC)
                .expect("a plan has Stage C");
            c.weight_bytes += extra.weight_bytes;
            c.arena_bytes += extra.arena_bytes;
        }
        if let Some(c) = &self.controlnet {
            let encoder = c.encoder.as_ref().map(|e| &e.config);
            control_net::add_to_plan(&mut plan, &c.net.config, encoder, size, device.as_deref())?;
        }
        Ok(plan)
    }

    /// Generates every image of `request` (see [`Pipeline::generate_with`]).
    pub fn generate(&self, request: &Request) -> Result<Vec<Image>> {
        self.generate_with(request, &mut |_| Ok(()))
    }

    /// Generates every image of `request`, one after the other (image k with seed + k, so
    /// any image can be made again alone), reporting progress to `on_event`; an error it
    /// returns (e.g. [`Error::Interrupted`]) stops the generation within one step.
    pub fn generate_with(
        &self,
        request: &Request,
        on_event: &mut dyn FnMut(Event) -> Result<()>,
    ) -> Result<Vec<Image>> {
        request.validate()?;
        let plan = self.plan(request.size)?;
        // One generation at a time: the device caches belong to it.
        let caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        // What the pipeline already holds on the device is there for this request too.
        let held =
            caches.iter().map(WeightCache::bytes).sum::<usize>() + self.sessions.arena_bytes();
        let available = self.available_memory(held as u64)?;
        let resident = self.residency(&plan, available)? == Residency::Resident;
        if !resident {
            caches.iter().for_each(WeightCache::clear);
        }
        let place = Placement {
            caches: &caches,
            resident,
            sessions: self
                .keep_sessions(request, &plan, available, resident)
                .then_some(&self.sessions),
        };
        let seeds = request.seeds();
        let (text, text_seconds) = self.encode_prompts(request, on_event)?;
        let control = self.control_maps(request)?;
        let shapes = stage_c_shapes(&self.models.configs(), &LatentSizes::of(request.size));
        let mut previews = match (&self.previewer, self.options.preview_every) {
            (Some(stage), Some(every)) => Some(Previews::new(stage, every, shapes)),
            _ => None,
        };
        let mut images = Vec::with_capacity(seeds.len());
        for (k, &seed) in seeds.iter().enumerate() {
            let mut observer = ImageObserver {
                pipeline: self,
                image: k,
                timer: PhaseTimer::new((k == 0).then_some((StageId::TextEncoder, text_seconds))),
                check_every_step: self.options.check_every_step,
                previews: previews.as_mut(),
                on_event: &mut *on_event,
            };
            let inputs = ImageInputs {
                seed,
                text: &text,
                control: control.as_ref(),
            };
            let rgb = self.generate_one(request, &inputs, &place, &mut |p| observer.observe(p))?;
            let timings = observer.timer.finish();
            let image = Image {
                seed,
                rgb,
                metadata: ImageMetadata {
                    loras: self.loras.uses(),
                    control: request.control.as_ref().map(|c| c.usage()),
                    ..ImageMetadata::new(request, seed, self.hashes.clone())
                },
                timings,
            };
            on_event(Event::ImageDone(&image))?;
            images.push(image);
        }
        Ok(images)
    }

    /// Device memory a request may use (None: unknown, the host backends): the limit the
    /// options set, or the device's free memory plus `held`, what the pipeline holds there
    /// (weights and kept sessions, which the request reuses or frees).
    fn available_memory(&self, held: u64) -> Result<Option<u64>> {
        Ok(match self.options.memory_limit {
            Some(limit) => Some(limit),
            None => self.backend.free_memory()?.map(|free| free + held),
        })
    }

    /// Whether the sessions of `request` are kept for the next request: on the kernel
    /// backends, with resident weights, when the kept sessions were placed for the same size,
    /// steps, guidance and control, or when there is room for them all
    /// ([`MemoryPlan::reuse_peak`]).
    /// Otherwise the kept sessions are dropped.
    fn keep_sessions(
        &self,
        request: &Request,
        plan: &MemoryPlan,
        available: Option<u64>,
        resident: bool,
    ) -> bool {
        // Everything of the request that its graphs are recorded with (guidance scales and
        // control strength are op parameters): sessions of another tag are dropped first, so
        // the cache never holds two requests' sets.
        let tag = format!(
            "{} {:?} c{:?} b{:?}",
            request.size,
            request.control.as_ref().map(|c| (c.kind, c.strength)),
            (request.stage_c.steps, request.stage_c.cfg),
            (request.stage_b.steps, request.stage_b.cfg),
        );
        let kernels = self.backend.device().is_some();
        let keep = kernels
            && resident
            && (self.sessions.retag(&tag) || available.is_none_or(|a| plan.reuse_peak() <= a));
        if !keep {
            self.sessions.clear();
        }
        keep
    }

    /// Decides where weights live for `plan` with `available` bytes, or refuses with both
    /// numbers and what to do.
    fn residency(&self, plan: &MemoryPlan, available: Option<u64>) -> Result<Residency> {
        let Some(free) = available else {
            return Ok(if self.options.low_vram {
                Residency::PerStage
            } else {
                Residency::Resident
            });
        };
        if !self.options.low_vram && plan.resident_peak() <= free {
            return Ok(Residency::Resident);
        }
        if plan.sequential_peak() <= free {
            return Ok(Residency::PerStage);
        }
        let worst = plan
            .stages
            .iter()
            .max_by_key(|s| s.weight_bytes + s.arena_bytes)
            .expect("a plan has stages");
        Err(Error::OutOfMemory {
            need_mib: plan.sequential_peak().div_ceil(1 << 20),
            free_mib: free >> 20,
            advice: format!(
                "{} needs the most ({} MiB of weights, {} MiB of activations); choose a \
                 smaller size, close other programs using the GPU, or use a larger GPU \
                 (images of a batch run one at a time, so the batch size does not matter)",
                worst.stage,
                worst.weight_bytes >> 20,
                worst.arena_bytes >> 20
            ),
        })
    }

    /// The prompt and the negative prompt through the text encoder (once per request).
    fn encode_prompts(
        &self,
        request: &Request,
        on_event: &mut dyn FnMut(Event) -> Result<()>,
    ) -> Result<(TextEmbedding, f64)> {
        let started = Instant::now();
        let progress = Progress::Started {
            phase: Phase::Text,
            steps: 0,
        };
        on_event(Event::Progress {
            image: 0,
            progress: &progress,
        })?;
        let tokens: Vec<Tokens> = [&request.encoded_prompt(), &request.negative_prompt]
            .iter()
            .map(|p| self.tokenizer.encode(p))
            .collect::<Result<_>>()?;
        let cache = WeightCache::new();
        let m = &self.models.text;
        let (cfg, weights) = self.loras.text(&m.config, &m.weights);
        let text = encode_text(&self.context(Some(&cache)), &weights, &cfg, &tokens)?;
        check_finite(Phase::Text, None, &text.hidden.data)?;
        check_finite(Phase::Text, None, &text.pooled.data)?;
        Ok((text, started.elapsed().as_secs_f64()))
    }

    /// The ControlNet's maps of the request's control (once per request), or None without.
    fn control_maps(&self, request: &Request) -> Result<Option<ControlMaps>> {
        let Some(control) = &request.control else {
            return Ok(None);
        };
        let loaded = match &self.controlnet {
            Some(c) if c.kind == control.kind => c,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "the request has {} control, but the pipeline was loaded without that \
                     ControlNet: load it with PipelineOptions::control = Some({:?})",
                    control.kind, control.kind
                )))
            }
        };
        // Its weights leave the device with its session. A non-finite map shows in Stage
        // C's checked output.
        let ctx = self.context(None);
        let encoded;
        let map = match &loaded.encoder {
            Some(e) => {
                encoded =
                    control_net::encode(&ctx, &e.weights, &e.config, &control.map, request.size)?;
                &encoded
            }
            None => &control.map,
        };
        let net = &loaded.net;
        control_net::run(&ctx, &net.weights, &net.config, map, control.strength).map(Some)
    }

    pub(super) fn context<'a>(&'a self, weights: Option<&'a WeightCache>) -> RunContext<'a> {
        RunContext {
            backend: &self.backend,
            options: SessionOptions::default(),
            // Previews read each step's x0̂.
            record: self.options.check_every_step || self.previewer.is_some(),
            weights,
            sessions: None,
        }
    }

    fn decoder(&self) -> StageADecode<'_> {
        StageADecode {
            weights: &self.models.stage_a.weights,
            cfg: &self.models.stage_a.config,
            tile: STAGE_A_TILE,
        }
    }

    /// Stage B's run for `request` on Stage C's latent (`effnet`) and the pooled text (`clip`).
    fn stage_b_run<'a>(
        &'a self,
        request: &Request,
        effnet: &'a HostTensor,
        clip: &'a HostTensor,
    ) -> StageBRun<'a> {
        StageBRun {
            weights: &self.models.stage_b.weights,
            cfg: &self.models.stage_b.config,
            effnet,
            clip,
            steps: request.stage_b.steps as usize,
            guidance: Guidance {
                cfg: request.stage_b.cfg,
                rho: CFG_RHO,
            },
        }
    }

    /// Uploads Stage B's and Stage A's weights for `request` into their caches.
    fn upload_later_stages(&self, request: &Request, place: &Placement) -> Result<()> {
        let m = &self.models;
        let cfg = m.configs();
        let sizes = LatentSizes::of(request.size);
        // Shapes only: the values are the next stages' business.
        let (hc, wc) = sizes.stage_c;
        let effnet = HostTensor::zeros(&[2, hc, wc, m.stage_c.config.c_out]);
        let clip = HostTensor::zeros(&[2, 1, m.stage_b.config.c_clip]);
        let shape = stage_b_shape(&cfg, &sizes);
        self.stage_b_run(request, &effnet, &clip)
            .upload_weights(&self.stage_context(place, 1), shape)?;
        let [_, h, w, _] = shape;
        self.decoder()
            .upload_weights(&self.stage_context(place, 2), [1, h, w])
    }

    /// A sampling stage's run context: its weight cache, and the kept sessions if any.
    fn stage_context<'a>(&'a self, place: &Placement<'a>, stage: usize) -> RunContext<'a> {
        RunContext {
            sessions: place.sessions,
            ..self.context(Some(&place.caches[stage]))
        }
    }

    /// One image: Stage C, Stage B, Stage A on the text embeddings, noise from `seed`; each
    /// stage's weights in its cache, freed after it unless resident.
    fn generate_one(
        &self,
        request: &Request,
        &ImageInputs {
            seed,
            text,
            control,
        }: &ImageInputs,
        place: &Placement,
        observe: &mut Observer,
    ) -> Result<Rgb8Image> {
        let caches = place.caches;
        let release = |cache: &WeightCache| {
            if !place.resident {
                cache.clear();
            }
        };
        let m = &self.models;
        let sizes = LatentSizes::of(request.size);

        // Stage C.
        let cfg = m.configs();
        let shapes = stage_c_shapes(&cfg, &sizes);
        let conditions = StageCConditions {
            clip_text: text.hidden.clone(),
            clip_text_pooled: text.pooled.clone(),
            clip_img: HostTensor::zeros(&[2, 1, m.stage_c.config.c_clip_img]),
        };
        let stage_c_weights = self.loras.stage_c(&m.stage_c.weights);
        let run = StageCRun {
            weights: &stage_c_weights,
            cfg: &m.stage_c.config,
            conditions: &conditions,
            steps: request.stage_c.steps as usize,
            guidance: Guidance {
                cfg: request.stage_c.cfg,
                rho: CFG_RHO,
            },
            shift: if control.is_some() {
                CONTROL_SHIFT
            } else {
                1.0
            },
            control,
        };
        let noise = StageCNoise {
            init_lr: host_noise(seed, STREAM_STAGE_C_LR, &shapes.lr),
            init_hr: host_noise(seed, STREAM_STAGE_C_HR, &shapes.hr),
            lr: StepNoise::Seeded {
                seed,
                stream: STREAM_STAGE_C_LR,
            },
            hr: StepNoise::Seeded {
                seed,
                stream: STREAM_STAGE_C_HR,
            },
        };
        let x0 = std::thread::scope(|s| {
            // With resident weights, Stage B's and A's upload while Stage C runs, so reading
            // and converting them on the host overlaps the device's work; once their caches
            // hold them (each is filled by its stage's one graph), there is nothing to do.
            // Where the upload fails, their sessions upload again and report the failure.
            let pending = caches[1..].iter().any(|c| c.bytes() == 0);
            let upload = (place.resident && pending)
                .then(|| s.spawn(|| self.upload_later_stages(request, place)));
            let sampled = run.sample(&self.stage_context(place, 0), shapes, &noise, observe);
            if let Some(upload) = upload {
                let _ = upload.join().expect("the upload thread does not panic");
            }
            sampled
        })?
        .hr
        .x0;
        check_finite(Phase::StageCHighRes, None, &x0)?;
        release(&caches[0]);

        // Stage B: effnet = Stage C's x0 for the cond rows, zeros for the uncond rows.
        let (hc, wc) = sizes.stage_c;
        let mut effnet = x0;
        effnet.resize(2 * effnet.len(), 0.0);
        let effnet = HostTensor::new(vec![2, hc, wc, m.stage_c.config.c_out], effnet);
        let run = self.stage_b_run(request, &effnet, &text.pooled);
        let shape = stage_b_shape(&cfg, &sizes);
        let noise = StepNoise::Seeded {
            seed,
            stream: STREAM_STAGE_B,
        };
        let init = host_noise(seed, STREAM_STAGE_B, &shape);
        let latent = run
            .sample(&self.stage_context(place, 1), shape, init, &noise, observe)?
            .x0;
        check_finite(Phase::StageB, None, &latent)?;
        release(&caches[1]);

        // Stage A.
        observe(&Progress::Started {
            phase: Phase::StageA,
            steps: 0,
        })?;
        let latent = HostTensor::new(shape.to_vec(), latent);
        let rgb = self
            .decoder()
            .decode(&self.stage_context(place, 2), &latent)?;
        check_finite(Phase::StageA, None, &rgb.data)?;
        release(&caches[2]);
        Rgb8Image::from_hwc(&rgb.data, rgb.shape[1], rgb.shape[2])
    }
}

/// Where a request's stages place their weights and sessions.
struct Placement<'a> {
    caches: &'a [WeightCache; 3],
    /// Weights stay on the device after their stage.
    resident: bool,
    /// Sessions are kept here for the next request (None: dropped after use).
    sessions: Option<&'a Arc<SessionCache>>,
}

/// What one image of a request is made from besides the request.
struct ImageInputs<'a> {
    seed: u64,
    text: &'a TextEmbedding,
    control: Option<&'a ControlMaps>,
}

/// A seed's initial latent of `shape` for `stream`: the device generator's stream, drawn on
/// the host (bit-identical, so the latent is the same on every backend).
fn host_noise(seed: u64, stream: u32, shape: &[usize]) -> Vec<f32> {
    let mut out = vec![0f32; shape.iter().product()];
    gaussian_noise_ref(
        noise_key(seed, stream, INIT_STEP).map(f32::to_bits),
        &mut out,
    );
    out
}

#[cfg(all(test, feature = "hostsim"))]
mod tests {
    use super::*;
    use crate::hub::HubOptions;
    use crate::runtime::BackendKind;

    /// The upload that runs beside Stage C puts exactly Stage B's and Stage A's weights, as
    /// the memory plan counts them, into their caches, so their sessions upload nothing.
    #[test]
    fn the_later_stages_weights_upload_during_stage_c() {
        let dir = tempfile::tempdir().unwrap();
        super::super::tiny::make_tiny_model(dir.path(), 3).unwrap();
        let model = ModelDir::resolve(Some(dir.path()), &HubOptions::from_env()).unwrap();
        let backend = Backend::open(BackendKind::Hostsim).unwrap();
        let p = Pipeline::load(&model, backend, PipelineOptions::default()).unwrap();
        let mut request = Request::new("a test");
        request.size = Size::new(512, 576).unwrap();
        let caches: [WeightCache; 3] = Default::default();
        let place = Placement {
            caches: &caches,
            resident: true,
            sessions: None,
        };
        p.upload_later_stages(&request, &place).unwrap();
        let plan = p.plan(request.size).unwrap();
        let planned = |stage| {
            plan.stages
                .iter()
                .find(|s| s.stage == stage)
                .unwrap()
                .weight_bytes as usize
        };
        assert_eq!(caches[0].bytes(), 0);
        assert_eq!(caches[1].bytes(), planned(StageId::StageB));
        assert_eq!(caches[2].bytes(), planned(StageId::StageA));
    }
}
