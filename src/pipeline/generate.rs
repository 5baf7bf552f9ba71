//! Text to image: [`Pipeline::load`] opens and checks a model directory on a backend,
//! [`Pipeline::generate`] turns a [`Request`] into images (docs/ARCHITECTURE.md §2): text encoding,
//! Stage C's dual pass with UltraPixel guidance, Stage B, Stage A, 8-bit RGB.
//!
//! Before anything is placed on the device, every stage is planned at the requested size
//! (weights + activation arena) and compared with the device's free memory: weights stay
//! resident across stages and images when everything fits, are dropped after each stage
//! when only that fits (or with `low_vram`), and the request is refused otherwise.

use super::model_dir::ModelDir;
use super::models::{open_previewer, Configs, Models, Stage};
use super::png_out::{ImageMetadata, Rgb8Image};
use super::preview::{preview_due, preview_recording, Preview, PreviewDecoder};
use super::request::{Request, Size};
use super::stages::{
    encode_text, Observer, Phase, Progress, RunContext, StageADecode, StageBRun, StageCConditions,
    StageCNoise, StageCRun, StageCShapes, TextEmbedding, STAGE_A_TILE,
};
use crate::models::config::PreviewerConfig;
use crate::ops::noise::{gaussian_noise_ref, noise_key};
use crate::runtime::device::{node_scratch, Device, WeightCache};
use crate::runtime::graph::{Graph, Role};
use crate::runtime::planner::{self, ALIGN};
use crate::runtime::session::SessionOptions;
use crate::runtime::{Backend, BackendKind};
use crate::sampling::{Guidance, NoiseSource, StepNoise};
use crate::tensor::HostTensor;
use crate::text::{Tokenizer, Tokens};
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;
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
    pub backend: BackendKind,
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
}

impl PipelineOptions {
    pub fn new(backend: BackendKind) -> Self {
        PipelineOptions {
            backend,
            conversion_cache: super::models::default_conversion_cache(),
            memory_limit: None,
            low_vram: false,
            check_every_step: false,
            preview_every: None,
        }
    }
}

/// The latent sizes of an output size (docs/MODEL.md §1.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatentSizes {
    /// Stage C's high-resolution latent: ceil(side / 42.67).
    pub stage_c: (usize, usize),
    /// The low-resolution guide pass: the ≈1024²-pixel size of the same aspect ratio.
    pub stage_c_lr: (usize, usize),
    /// Stage B's latent: ceil(side / 4).
    pub stage_b: (usize, usize),
}

/// Stage C's compression factor, as the reference writes it.
const STAGE_C_FACTOR: f64 = 42.67;
const STAGE_A_FACTOR: f64 = 4.0;

impl LatentSizes {
    pub fn of(size: Size) -> LatentSizes {
        let (h, w) = (size.height as f64, size.width as f64);
        let c = |v: f64| (v / STAGE_C_FACTOR).ceil() as usize;
        // get_target_lr_size(H / W, std_size 32): sides of 32·int(32·√r) and 32·int(32/√r).
        let ratio = (h / w).sqrt();
        let (lr_h, lr_w) = (32.0 * (32.0 * ratio).trunc(), 32.0 * (32.0 / ratio).trunc());
        LatentSizes {
            stage_c: (c(h), c(w)),
            stage_c_lr: (c(lr_h), c(lr_w)),
            stage_b: (
                (h / STAGE_A_FACTOR).ceil() as usize,
                (w / STAGE_A_FACTOR).ceil() as usize,
            ),
        }
    }
}

/// One stage's device memory.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StagePlan {
    pub stage: &'static str,
    pub weight_bytes: u64,
    /// The largest activation arena of its graphs.
    pub arena_bytes: u64,
}

/// Device memory of a request, before anything is allocated.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MemoryPlan {
    pub stages: Vec<StagePlan>,
}

impl MemoryPlan {
    /// Peak with each stage's weights dropped after it ran.
    pub fn sequential_peak(&self) -> u64 {
        self.stages
            .iter()
            .map(|s| s.weight_bytes + s.arena_bytes)
            .max()
            .unwrap_or(0)
    }

    /// Peak with the sampling stages' weights resident together (the text encoder runs
    /// once, first, and is always dropped).
    pub fn resident_peak(&self) -> u64 {
        let (text, rest) = self.stages.split_first().expect("a plan has stages");
        let weights: u64 = rest.iter().map(|s| s.weight_bytes).sum();
        let arena = rest.iter().map(|s| s.arena_bytes).max().unwrap_or(0);
        (weights + arena).max(text.weight_bytes + text.arena_bytes)
    }
}

/// One graph a generation places on the device, and how often it runs per image.
pub struct StageGraph {
    pub stage: &'static str,
    pub part: &'static str,
    pub graph: Graph,
    pub runs: usize,
}

/// Every graph of a generation at `size` with these networks, at its real shapes (no
/// weights read), with its runs per image for `steps` = (Stage C, Stage B) steps.
pub fn stage_graphs(cfg: &Configs, size: Size, steps: (usize, usize)) -> Result<Vec<StageGraph>> {
    let sizes = LatentSizes::of(size);
    let none: HashMap<String, HostTensor> = HashMap::new();
    let shapes = stage_c_shapes(cfg, &sizes);
    let conditions = StageCConditions::zeros(&cfg.stage_c, 2);
    let unguided = Guidance { cfg: 1.0, rho: 0.0 };
    let stage_c = StageCRun {
        weights: &none,
        cfg: &cfg.stage_c,
        conditions: &conditions,
        steps: steps.0,
        guidance: unguided,
    };
    let (hc, wc) = sizes.stage_c;
    let effnet = HostTensor::zeros(&[2, hc, wc, cfg.stage_c.c_out]);
    let clip = HostTensor::zeros(&[2, 1, cfg.stage_b.c_clip]);
    let stage_b = StageBRun {
        weights: &none,
        cfg: &cfg.stage_b,
        effnet: &effnet,
        clip: &clip,
        steps: steps.1,
        guidance: unguided,
    };
    let decode = StageADecode {
        weights: &none,
        cfg: &cfg.stage_a,
        tile: STAGE_A_TILE,
    };
    let (hb, wb) = sizes.stage_b;
    let source = NoiseSource::Device;
    let [lr, reconstruct, hr]: [Graph; 3] = stage_c
        .graphs(shapes, source)?
        .try_into()
        .map_err(|_| Error::InvalidArgument("Stage C records three graphs".into()))?;
    let graph = |stage, part, graph, runs| StageGraph {
        stage,
        part,
        graph,
        runs,
    };
    Ok(vec![
        graph(
            "text encoder",
            "prompt + negative",
            super::stages::text_graph(&cfg.text, 2)?,
            1,
        ),
        graph("stage C", "low-res step", lr, steps.0),
        graph("stage C", "INR reconstruction", reconstruct, 1),
        graph("stage C", "high-res step", hr, steps.0),
        graph(
            "stage B",
            "step",
            stage_b.graph(stage_b_shape(cfg, &sizes), source)?,
            steps.1,
        ),
        graph(
            "stage A",
            "tile",
            decode.graph([1, hb, wb])?,
            decode.tiles(hb, wb),
        ),
    ])
}

/// The device memory of a generation at `size` with these networks, stage by stage: every
/// graph recorded at its real shapes and planned, no weights read; with `device`, the scratch
/// it needs for the nodes it runs its own way (vendor GEMMs) counted in the arenas.
pub fn memory_plan(cfg: &Configs, size: Size, device: Option<&dyn Device>) -> Result<MemoryPlan> {
    let graphs = stage_graphs(cfg, size, (1, 1))?;
    let mut names: Vec<&'static str> = graphs.iter().map(|g| g.stage).collect();
    names.dedup();
    // A stage's graphs share their weights (one cache) and run one at a time.
    let stages = names
        .into_iter()
        .map(|stage| {
            let of_stage = graphs.iter().filter(|g| g.stage == stage).map(|g| &g.graph);
            stage_plan(stage, of_stage, device)
        })
        .collect();
    Ok(MemoryPlan { stages })
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
    pub timings: Vec<(&'static str, f64)>,
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
    backend: Backend,
    options: PipelineOptions,
    hashes: BTreeMap<String, String>,
    tokenizer: Tokenizer,
    /// The device weights of the three sampling stages (C, B, A); the lock is held while a
    /// generation runs, so one runs at a time.
    caches: Mutex<[WeightCache; 3]>,
}

impl Pipeline {
    /// Opens the model files of `dir` (checking every tensor) and the backend.
    ///
    /// ```no_run
    /// use ultrapixel::hub::HubOptions;
    /// use ultrapixel::pipeline::{ModelDir, Pipeline, PipelineOptions, Request, Size};
    /// use ultrapixel::runtime::BackendKind;
    ///
    /// let dir = ModelDir::resolve(None, &HubOptions::from_env())?;
    /// let pipeline = Pipeline::load(&dir, PipelineOptions::new(BackendKind::Cuda))?;
    /// let mut request = Request::new("a lighthouse at dusk, photo");
    /// request.size = Size::new(4096, 2304)?;
    /// request.seed = Some(7);
    /// for image in pipeline.generate(&request)? {
    ///     println!("seed {}: {}x{}", image.seed, image.rgb.width, image.rgb.height);
    /// }
    /// # Ok::<(), ultrapixel::Error>(())
    /// ```
    pub fn load(dir: &ModelDir, options: PipelineOptions) -> Result<Pipeline> {
        let backend = Backend::open(options.backend)?;
        let models = Models::open(dir, &options.conversion_cache)?;
        let previewer = match options.preview_every {
            Some(_) => Some(open_previewer(dir)?),
            None => None,
        };
        Ok(Pipeline {
            models,
            previewer,
            backend,
            hashes: dir.hashes(),
            options,
            tokenizer: Tokenizer::clip()?,
            caches: Mutex::new(Default::default()),
        })
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
    /// allocated).
    pub fn plan(&self, size: Size) -> Result<MemoryPlan> {
        let cfg = self.models.configs();
        let device = self.backend.device();
        let mut plan = memory_plan(&cfg, size, device.as_deref())?;
        if let Some(p) = &self.previewer {
            // Its session lives beside Stage C's, at the high-res latent at most.
            let shapes = stage_c_shapes(&cfg, &LatentSizes::of(size));
            let graph = preview_recording(&p.config, shapes.hr)?.0.finish().0;
            let extra = stage_plan("previewer", std::iter::once(&graph), device.as_deref());
            let c = plan
                .stages
                .iter_mut()
                .find(|s| s.stage == "stage C")
                .expect("a plan has Stage C");
            c.weight_bytes += extra.weight_bytes;
            c.arena_bytes += extra.arena_bytes;
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
        let residency = self.residency(&plan)?;
        // One generation at a time: the device caches belong to it.
        let caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        let resident = residency == Residency::Resident;
        if !resident {
            caches.iter().for_each(WeightCache::clear);
        }
        let seeds = request.seeds();
        let (text, text_seconds) = self.encode_prompts(request, on_event)?;
        let shapes = stage_c_shapes(&self.models.configs(), &LatentSizes::of(request.size));
        let preview_cache = WeightCache::new();
        let mut previews = self.previewer.as_ref().map(PreviewDecoder::new);
        let mut images = Vec::with_capacity(seeds.len());
        for (k, &seed) in seeds.iter().enumerate() {
            let mut timings = Vec::new();
            if k == 0 {
                timings.push((Phase::Text.label(), text_seconds));
            }
            let mut phase_start: Option<(Phase, Instant)> = None;
            let rgb = {
                let mut observe = |p: &Progress| -> Result<()> {
                    match p {
                        Progress::Started { phase, .. } => {
                            if *phase == Phase::StageB {
                                // The plan counts the previewer in Stage C only.
                                if let Some(dec) = previews.as_mut() {
                                    dec.release();
                                }
                                preview_cache.clear();
                            }
                            if !matches!(phase, Phase::StageCHighRes) {
                                if let Some((done, t)) = phase_start.take() {
                                    timings.push((stage_name(done), t.elapsed().as_secs_f64()));
                                }
                                phase_start = Some((*phase, Instant::now()));
                            }
                        }
                        Progress::Step(e) => {
                            if let (true, Some(r)) = (self.options.check_every_step, e.record) {
                                check_finite(e.phase, Some(e.step), &r.x_next)?;
                            }
                            let shape = match e.phase {
                                Phase::StageCLowRes => Some(shapes.lr),
                                Phase::StageCHighRes => Some(shapes.hr),
                                _ => None,
                            };
                            if let (Some(dec), Some(r), Some(shape), Some(every)) = (
                                previews.as_mut(),
                                e.record,
                                shape,
                                self.options.preview_every,
                            ) {
                                if preview_due(e.step, e.steps, every) {
                                    let ctx = self.context(Some(&preview_cache));
                                    let preview = Preview {
                                        phase: e.phase,
                                        step: e.step,
                                        steps: e.steps,
                                        rgb: dec.decode(&ctx, &r.x0, shape)?,
                                    };
                                    on_event(Event::Preview {
                                        image: k,
                                        preview: &preview,
                                    })?;
                                }
                            }
                        }
                    }
                    on_event(Event::Progress {
                        image: k,
                        progress: p,
                    })
                };
                self.generate_one(request, seed, &text, (&caches, resident), &mut observe)?
            };
            if let Some((done, t)) = phase_start.take() {
                timings.push((stage_name(done), t.elapsed().as_secs_f64()));
            }
            let image = Image {
                seed,
                rgb,
                metadata: ImageMetadata::new(request, seed, self.hashes.clone()),
                timings,
            };
            on_event(Event::ImageDone(&image))?;
            images.push(image);
        }
        Ok(images)
    }

    /// Decides where weights live for `plan`, or refuses with both numbers and what to do.
    fn residency(&self, plan: &MemoryPlan) -> Result<Residency> {
        let free = match self.options.memory_limit {
            Some(limit) => Some(limit),
            None => match &self.backend {
                Backend::Cuda(d) => Some(d.memory()?.0 as u64),
                _ => None,
            },
        };
        let Some(free) = free else {
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
                 smaller --size, close other programs using the GPU, or use a larger GPU \
                 (images of a batch run one at a time, so --batch does not matter)",
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
        let tokens: Vec<Tokens> = [&request.prompt, &request.negative_prompt]
            .iter()
            .map(|p| self.tokenizer.encode(p))
            .collect::<Result<_>>()?;
        let cache = WeightCache::new();
        let m = &self.models.text;
        let text = encode_text(&self.context(Some(&cache)), &m.weights, &m.config, &tokens)?;
        check_finite(Phase::Text, None, &text.hidden.data)?;
        check_finite(Phase::Text, None, &text.pooled.data)?;
        Ok((text, started.elapsed().as_secs_f64()))
    }

    fn context<'a>(&'a self, weights: Option<&'a WeightCache>) -> RunContext<'a> {
        RunContext {
            backend: &self.backend,
            options: SessionOptions::default(),
            // Previews read each step's x0̂.
            record: self.options.check_every_step || self.previewer.is_some(),
            weights,
        }
    }

    fn decoder(&self) -> StageADecode<'_> {
        StageADecode {
            weights: &self.models.stage_a.weights,
            cfg: &self.models.stage_a.config,
            tile: STAGE_A_TILE,
        }
    }

    /// One image: Stage C, Stage B, Stage A on the text embeddings, noise from `seed`; each
    /// stage's weights in its cache, freed after it unless `resident`.
    fn generate_one(
        &self,
        request: &Request,
        seed: u64,
        text: &TextEmbedding,
        (caches, resident): (&[WeightCache; 3], bool),
        observe: &mut Observer,
    ) -> Result<Rgb8Image> {
        let release = |cache: &WeightCache| {
            if !resident {
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
        let run = StageCRun {
            weights: &m.stage_c.weights,
            cfg: &m.stage_c.config,
            conditions: &conditions,
            steps: request.stage_c.steps as usize,
            guidance: Guidance {
                cfg: request.stage_c.cfg,
                rho: CFG_RHO,
            },
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
        let x0 = run
            .sample(&self.context(Some(&caches[0])), shapes, &noise, observe)?
            .hr
            .x0;
        check_finite(Phase::StageCHighRes, None, &x0)?;
        release(&caches[0]);

        // Stage B: effnet = Stage C's x0 for the cond rows, zeros for the uncond rows.
        let (hc, wc) = sizes.stage_c;
        let mut effnet = x0;
        effnet.resize(2 * effnet.len(), 0.0);
        let effnet = HostTensor::new(vec![2, hc, wc, m.stage_c.config.c_out], effnet);
        let run = StageBRun {
            weights: &m.stage_b.weights,
            cfg: &m.stage_b.config,
            effnet: &effnet,
            clip: &text.pooled,
            steps: request.stage_b.steps as usize,
            guidance: Guidance {
                cfg: request.stage_b.cfg,
                rho: CFG_RHO,
            },
        };
        let shape = stage_b_shape(&cfg, &sizes);
        let noise = StepNoise::Seeded {
            seed,
            stream: STREAM_STAGE_B,
        };
        let init = host_noise(seed, STREAM_STAGE_B, &shape);
        let latent = run
            .sample(
                &self.context(Some(&caches[1])),
                shape,
                init,
                &noise,
                observe,
            )?
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
            .decode(&self.context(Some(&caches[2])), &latent)?;
        check_finite(Phase::StageA, None, &rgb.data)?;
        release(&caches[2]);
        Rgb8Image::from_hwc(&rgb.data, rgb.shape[1], rgb.shape[2])
    }
}

/// Stage C's latent shapes (channels-last, batch 1).
fn stage_c_shapes(cfg: &Configs, sizes: &LatentSizes) -> StageCShapes {
    let c = cfg.stage_c.c_in;
    let (h, w) = sizes.stage_c;
    let (lh, lw) = sizes.stage_c_lr;
    StageCShapes {
        lr: [1, lh, lw, c],
        hr: [1, h, w, c],
    }
}

/// Stage B's latent shape (channels-last, batch 1).
fn stage_b_shape(cfg: &Configs, sizes: &LatentSizes) -> [usize; 4] {
    let (h, w) = sizes.stage_b;
    [1, h, w, cfg.stage_b.c_in]
}

/// The memory of one stage: its distinct weights (as uploaded) and its largest arena.
fn stage_plan<'a>(
    stage: &'static str,
    graphs: impl Iterator<Item = &'a Graph>,
    device: Option<&dyn Device>,
) -> StagePlan {
    let mut seen = HashSet::new();
    let mut weight_bytes = 0u64;
    let mut arena_bytes = 0u64;
    for g in graphs {
        for d in g.tensors.iter().filter(|d| d.role == Role::Weight) {
            if seen.insert((d.name.clone(), d.shape.clone(), d.dtype)) {
                weight_bytes += d.bytes().div_ceil(ALIGN) as u64 * ALIGN as u64;
            }
        }
        let plan = match device {
            Some(d) => {
                let scratch = node_scratch(d, g);
                planner::plan_with_scratch(g, &|i| scratch[i])
            }
            None => planner::plan(g),
        };
        arena_bytes = arena_bytes.max(plan.peak as u64);
    }
    StagePlan {
        stage,
        weight_bytes,
        arena_bytes,
    }
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

/// Fails with the stage (and step) when `values` holds NaN or Inf.
fn check_finite(phase: Phase, step: Option<usize>, values: &[f32]) -> Result<()> {
    let bad = values.iter().filter(|v| !v.is_finite()).count();
    if bad == 0 {
        return Ok(());
    }
    let at = step.map_or(String::new(), |s| format!(" at step {}", s + 1));
    Err(Error::NonFinite {
        stage: format!("{}{at}", phase.label()),
        count: bad,
        total: values.len(),
    })
}

/// The timing name of a phase: both Stage C passes count as "stage C".
fn stage_name(phase: Phase) -> &'static str {
    match phase {
        Phase::StageCLowRes | Phase::StageCHighRes => Phase::StageCHighRes.label(),
        p => p.label(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latent_sizes_follow_the_reference_table() {
        // (H, W) → Stage C HR latent, LR latent, Stage B latent (docs/MODEL.md §1.3).
        for (h, w, c, lr, b) in [
            (1024, 1024, (24, 24), (24, 24), (256, 256)),
            (2048, 2048, (48, 48), (24, 24), (512, 512)),
            (2560, 5120, (60, 120), (17, 34), (640, 1280)),
            (2304, 4096, (54, 96), (18, 32), (576, 1024)),
            (2160, 3840, (51, 90), (18, 32), (540, 960)),
            (4096, 4096, (96, 96), (24, 24), (1024, 1024)),
        ] {
            let s = LatentSizes::of(Size::new(w, h).unwrap());
            assert_eq!((s.stage_c, s.stage_c_lr, s.stage_b), (c, lr, b), "{w}x{h}");
        }
    }

    #[test]
    fn plans_add_weights_and_the_largest_arena() {
        let plan = MemoryPlan {
            stages: vec![
                StagePlan {
                    stage: "text encoder",
                    weight_bytes: 50,
                    arena_bytes: 5,
                },
                StagePlan {
                    stage: "stage C",
                    weight_bytes: 100,
                    arena_bytes: 30,
                },
                StagePlan {
                    stage: "stage B",
                    weight_bytes: 20,
                    arena_bytes: 60,
                },
            ],
        };
        assert_eq!(plan.sequential_peak(), 130);
        assert_eq!(plan.resident_peak(), 120 + 60);
    }

    #[test]
    fn non_finite_values_name_the_stage_and_step() {
        assert!(check_finite(Phase::StageB, None, &[1.0, 2.0]).is_ok());
        let err = check_finite(
            Phase::StageCHighRes,
            Some(4),
            &[1.0, f32::NAN, f32::INFINITY],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("stage C at step 5 produced 2 NaN/Inf values of 3"),
            "{err}"
        );
    }
}
