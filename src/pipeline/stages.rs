//! The cascade's stages as runs on a backend (docs/MODEL.md §1.2): CLIP text encoding, Stage C's
//! dual low-res → high-res sampling with UltraPixel guidance, Stage B sampling, Stage A decoding.
//! Each builds its graphs from the models, binds them to a checkpoint and runs them; the golden
//! sampling cases and `generate` share these functions.
//!
//! Latents are channels-last f32 (`[B, H, W, C]`); the CFG batch is `[cond rows, uncond rows]`.

use super::control::net::ControlMaps;
use crate::models::clip_text::{clip_text, ClipTextInputs};
use crate::models::config::{ClipTextConfig, StageAConfig, StageBConfig, StageCConfig};
use crate::models::stage_a::{padded_latent, stage_a_decode};
use crate::models::stage_b::{stage_b, StageBInputs};
use crate::models::stage_c::{
    guide_scale, stage_c_controlled, ClipInputs, Guidance, GuideSource, StageCInputs,
    GUIDE_MODULES, GUIDE_SITES,
};
use crate::models::{inr, Checkpoint, ModelBuilder};
use crate::ops::layout::Cast;
use crate::runtime::device::WeightCache;
use crate::runtime::graph::{Graph, TensorId};
use crate::runtime::session::{Session, SessionOptions};
use crate::runtime::session_cache::SessionCache;
use crate::runtime::Backend;
use crate::sampling_loop::{
    self, record_step, NoiseSource, Sampled, StepGraph, StepNoise, StepRecord, Steps,
};
use crate::tensor::{DType, HostTensor};
use crate::text::Tokens;
use crate::{Error, Result};
use std::sync::Arc;

/// The parts of a generation, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Text,
    StageCLowRes,
    StageCHighRes,
    StageB,
    StageA,
}

impl Phase {
    /// The stage this phase belongs to: both Stage C passes are Stage C.
    pub fn stage(self) -> StageId {
        match self {
            Phase::Text => StageId::TextEncoder,
            Phase::StageCLowRes | Phase::StageCHighRes => StageId::StageC,
            Phase::StageB => StageId::StageB,
            Phase::StageA => StageId::StageA,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Phase::Text => "text encoder",
            Phase::StageCLowRes => "stage C low-res",
            Phase::StageCHighRes => "stage C",
            Phase::StageB => "stage B",
            Phase::StageA => "stage A",
        }
    }
}

/// The stages of a generation, in order, as memory plans, launch graphs and timings name
/// them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StageId {
    TextEncoder,
    /// Runs once per request with control, before Stage C.
    ControlNet,
    StageC,
    StageB,
    StageA,
}

impl StageId {
    pub fn label(self) -> &'static str {
        match self {
            StageId::TextEncoder => "text encoder",
            StageId::ControlNet => "controlnet",
            StageId::StageC => "stage C",
            StageId::StageB => "stage B",
            StageId::StageA => "stage A",
        }
    }
}

impl std::fmt::Display for StageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.label())
    }
}

impl serde::Serialize for StageId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.label())
    }
}

/// One finished sampler step.
pub struct StepEvent<'a> {
    pub phase: Phase,
    /// 0-based.
    pub step: usize,
    pub steps: usize,
    /// The step's outputs, when the run records them.
    pub record: Option<&'a StepRecord>,
}

/// What a running stage reports.
pub enum Progress<'a> {
    /// A phase begins: `steps` sampler steps (0 for a single pass).
    Started {
        phase: Phase,
        steps: usize,
    },
    Step(StepEvent<'a>),
}

/// Called as a run progresses; an error (e.g. [`Error::Interrupted`]) stops it.
pub type Observer<'a> = dyn FnMut(&Progress) -> Result<()> + 'a;

/// What every stage run needs.
#[derive(Clone, Copy)]
pub struct RunContext<'a> {
    pub backend: &'a Backend,
    pub options: SessionOptions,
    /// Read every step's outputs into [`StepEvent::record`] (costs device reads).
    pub record: bool,
    /// Device weights shared by the sessions of the run (None: each session its own).
    pub weights: Option<&'a WeightCache>,
    /// Where sessions are kept for the next run of the same graph (None: placed anew and
    /// dropped after use). Only for sessions whose weights stay the same between runs.
    pub sessions: Option<&'a Arc<SessionCache>>,
}

impl RunContext<'_> {
    pub(crate) fn session(
        &self,
        mb: ModelBuilder,
        weights: &dyn Checkpoint,
    ) -> Result<Box<dyn Session>> {
        let (graph, plan) = mb.finish();
        let bound = plan.bind(weights);
        let place = |graph| {
            self.backend
                .session_sharing(graph, &bound, self.options, self.weights)
        };
        match self.sessions {
            Some(cache) => Ok(Box::new(cache.lease(graph, place)?)),
            None => Ok(place(graph)?),
        }
    }

    /// Uploads the weights `mb`'s graph reads into the context's weight cache ahead of its
    /// session (nothing to do on the cpu backend or without a cache).
    fn upload_weights(&self, mb: ModelBuilder, weights: &dyn Checkpoint) -> Result<()> {
        let (Some(device), Some(cache)) = (self.backend.device(), self.weights) else {
            return Ok(());
        };
        let (graph, plan) = mb.finish();
        cache.upload(device.as_ref(), &graph, &plan.bind(weights))
    }
}

/// A recorded step graph on its session, with the feature maps it captures (if any).
struct StepLoop {
    session: Box<dyn Session>,
    graph: StepGraph,
    features: Option<[TensorId; 4]>,
}

impl StepLoop {
    /// Runs the sampling loop over `steps` from `init`, reporting every step to `observe`
    /// as `phase` (the phase starts with the schedule's first step).
    fn run(
        &mut self,
        ctx: &RunContext,
        init: Vec<f32>,
        steps: &Steps,
        noise: &StepNoise,
        phase: Phase,
        observe: &mut Observer,
    ) -> Result<Sampled> {
        let total = steps.total;
        if steps.run.start == 0 {
            observe(&Progress::Started {
                phase,
                steps: total,
            })?;
        }
        let graph = &self.graph;
        sampling_loop::sample(
            &mut *self.session,
            graph,
            init,
            steps,
            noise,
            ctx.record,
            |step, record| {
                observe(&Progress::Step(StepEvent {
                    phase,
                    step,
                    steps: total,
                    record,
                }))
            },
        )
    }
}

/// Graph inputs and the values to write to them.
type InputValues<'a> = Vec<(TensorId, &'a [f32])>;

/// Stage C's conditions for the CFG batch `[cond rows, uncond rows]`: clip_text
/// `[2B, 77, c]`, clip_text_pooled `[2B, 1, c]`, clip_img `[2B, 1, c]`.
#[derive(Clone, Debug)]
pub struct StageCConditions {
    pub clip_text: HostTensor,
    pub clip_text_pooled: HostTensor,
    pub clip_img: HostTensor,
}

impl StageCConditions {
    /// Zero conditions of `rows` rows (for planning: only the shapes matter).
    pub fn zeros(cfg: &StageCConfig, rows: usize) -> Self {
        StageCConditions {
            clip_text: HostTensor::zeros(&[rows, crate::text::CONTEXT, cfg.c_clip_text]),
            clip_text_pooled: HostTensor::zeros(&[rows, 1, cfg.c_clip_text_pooled]),
            clip_img: HostTensor::zeros(&[rows, 1, cfg.c_clip_img]),
        }
    }

    /// Records them as constant bf16 inputs; returns the ids and the values to set.
    fn record(&self, mb: &mut ModelBuilder) -> Result<(ClipInputs, InputValues<'_>)> {
        let mut ids = Vec::new();
        let mut values = Vec::new();
        for (name, t) in [
            ("clip_text", &self.clip_text),
            ("clip_text_pooled", &self.clip_text_pooled),
            ("clip_img", &self.clip_img),
        ] {
            let id = mb.g.constant_input(name, &t.shape, DType::BF16)?;
            ids.push(id);
            values.push((id, t.data.as_slice()));
        }
        Ok((
            ClipInputs {
                clip_text: ids[0],
                clip_text_pooled: ids[1],
                clip_img: ids[2],
            },
            values,
        ))
    }
}

/// Initial latents and per-step noise of Stage C's two loops.
pub struct StageCNoise<'a> {
    pub init_lr: Vec<f32>,
    pub init_hr: Vec<f32>,
    pub lr: StepNoise<'a>,
    pub hr: StepNoise<'a>,
}

/// High-resolution steps that get UltraPixel's guidance (the reference's `if i <= 19`).
pub const GUIDED_STEPS: usize = 20;

/// Stage C's dual sampling (docs/MODEL.md §4.7).
pub struct StageCRun<'a> {
    pub weights: &'a dyn Checkpoint,
    pub cfg: &'a StageCConfig,
    pub conditions: &'a StageCConditions,
    pub steps: usize,
    pub guidance: sampling_loop::Guidance,
    /// The schedule's shift (1; 2 with control).
    pub shift: f32,
    /// The ControlNet's maps, injected where no LR guidance is (every LR step, the HR steps
    /// past [`GUIDED_STEPS`]).
    pub control: Option<&'a ControlMaps>,
}

/// Both loops' results: the LR sample (unused downstream) and the HR one, whose x0 is
/// Stage C's output.
pub struct StageCResult {
    pub lr: Sampled,
    pub hr: Sampled,
}

/// The two latent shapes of a Stage C run (channels-last, batch B).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageCShapes {
    pub lr: [usize; 4],
    pub hr: [usize; 4],
}

/// A recorded step graph and the values of its constant inputs.
struct StepRecording {
    mb: ModelBuilder,
    graph: StepGraph,
    /// The captured guidance maps (low-resolution pass).
    features: Option<[TensorId; 4]>,
    /// The reconstructed-guidance inputs, set by the caller (high-resolution pass).
    guide_inputs: Option<[TensorId; 4]>,
    constants: Vec<(TensorId, Vec<f32>)>,
}

impl StepRecording {
    /// Places it on a session with its constants set.
    fn into_loop(self, ctx: &RunContext, weights: &dyn Checkpoint) -> Result<StepLoop> {
        let mut session = ctx.session(self.mb, weights)?;
        for (id, v) in &self.constants {
            session.set_input(*id, v)?;
        }
        Ok(StepLoop {
            session,
            graph: self.graph,
            features: self.features,
        })
    }
}

impl StageCRun<'_> {
    pub fn sample(
        &self,
        ctx: &RunContext,
        shapes: StageCShapes,
        noise: &StageCNoise,
        observe: &mut Observer,
    ) -> Result<StageCResult> {
        let mut lr_loop = self
            .lr_recording(shapes, noise.lr.source())?
            .into_loop(ctx, self.weights)?;
        let features = lr_loop.features.ok_or_else(|| {
            Error::InvalidArgument("the low-resolution pass captured no features".into())
        })?;
        let lr = lr_loop.run(
            ctx,
            noise.init_lr.clone(),
            &self.schedule(0..self.steps),
            &noise.lr,
            Phase::StageCLowRes,
            observe,
        )?;
        // The last LR step's maps, conditional half only (docs/MODEL.md §3.1).
        let mut maps = Vec::new();
        for id in features {
            let v = lr_loop.session.read(id)?;
            maps.push(v[..v.len() / 2].to_vec());
        }
        drop(lr_loop);

        let (mb, inputs, outputs) = self.reconstruct_recording(shapes)?;
        let mut session = ctx.session(mb, self.weights)?;
        for (id, v) in inputs.iter().zip(&maps) {
            session.set_input(*id, v)?;
        }
        session.run()?;
        let mut recs = Vec::new();
        for id in outputs {
            // The cond half's reconstruction serves both halves of the CFG batch.
            recs.push(session.read(id)?.repeat(2));
        }
        drop(session);

        // The reference guides the first GUIDED_STEPS steps only (`if i <= 19`): a longer
        // schedule finishes on the plain network.
        let guided = self.schedule(0..self.steps.min(GUIDED_STEPS));
        let mut hr = self.hr_recording(shapes, noise.hr.source())?;
        let ids = hr.guide_inputs.expect("the HR recording has guide inputs");
        hr.constants.extend(ids.into_iter().zip(recs));
        let mut sampled = hr.into_loop(ctx, self.weights)?.run(
            ctx,
            noise.init_hr.clone(),
            &guided,
            &noise.hr,
            Phase::StageCHighRes,
            observe,
        )?;
        if guided.run.end < self.steps {
            let rest = self.schedule(guided.run.end..self.steps);
            sampled = self
                .step_recording(shapes.hr, noise.hr.source(), |_| Ok(Guidance::None))?
                .into_loop(ctx, self.weights)?
                .run(
                    ctx,
                    sampled.x,
                    &rest,
                    &noise.hr,
                    Phase::StageCHighRes,
                    observe,
                )?;
        }
        Ok(StageCResult { lr, hr: sampled })
    }

    /// The steps `run` of the run's schedule.
    fn schedule(&self, run: std::ops::Range<usize>) -> Steps {
        Steps {
            total: self.steps,
            run,
            shift: self.shift,
        }
    }

    /// Every graph the run places on the device, in order (for memory planning).
    pub fn graphs(&self, shapes: StageCShapes, source: NoiseSource) -> Result<Vec<Graph>> {
        Ok(vec![
            self.lr_recording(shapes, source)?.mb.finish().0,
            self.reconstruct_recording(shapes)?.0.finish().0,
            self.hr_recording(shapes, source)?.mb.finish().0,
        ])
    }

    /// The low-resolution step, capturing the four guidance maps.
    fn lr_recording(&self, shapes: StageCShapes, source: NoiseSource) -> Result<StepRecording> {
        self.step_recording(shapes.lr, source, |_| Ok(Guidance::Capture))
    }

    /// The guided high-resolution step; its `guide_inputs` are the four constant inputs of
    /// the reconstructed guidance (bf16 `[2B, H, W, C]`), to be set by the caller.
    fn hr_recording(&self, shapes: StageCShapes, source: NoiseSource) -> Result<StepRecording> {
        let [b, hh, ww, _] = shapes.hr;
        let kappa = guide_scale(hh * ww);
        let mut ids = Vec::new();
        let mut rec = self.step_recording(shapes.hr, source, |mb| {
            for (site, level) in GUIDE_SITES.iter().zip([0, 1, 1, 0]) {
                let shape = [2 * b, hh, ww, self.cfg.c_hidden[level]];
                ids.push(mb.g.constant_input(&format!("hr_rec {site}"), &shape, DType::BF16)?);
            }
            let sources: Vec<GuideSource> = ids
                .iter()
                .map(|&id| GuideSource::Reconstructed(id))
                .collect();
            Ok(Guidance::Guided {
                sources: sources.try_into().expect("four sites"),
                kappa,
            })
        })?;
        rec.guide_inputs = Some(ids.try_into().expect("four sites"));
        Ok(rec)
    }

    /// A step graph at `shape` with the guidance `guide` records, the conditions as
    /// constant inputs.
    fn step_recording(
        &self,
        shape: [usize; 4],
        source: NoiseSource,
        guide: impl FnOnce(&mut ModelBuilder) -> Result<Guidance>,
    ) -> Result<StepRecording> {
        let mut mb = ModelBuilder::new();
        let (clip, values) = self.conditions.record(&mut mb)?;
        let mut constants: Vec<(TensorId, Vec<f32>)> =
            values.into_iter().map(|(id, v)| (id, v.to_vec())).collect();
        let guidance = guide(&mut mb)?;
        // The official model injects control only where it has no LR guide.
        let control = match (self.control, guidance) {
            (Some(maps), Guidance::None | Guidance::Capture) => {
                let (injection, values) = maps.record(&mut mb, 2 * shape[0])?;
                constants.extend(values);
                Some(injection)
            }
            _ => None,
        };
        let mut features = None;
        let graph = record_step(&mut mb, &shape, self.guidance, source, |mb, x2, r| {
            let x = mb.g.op1(Cast { out: DType::BF16 }, &[x2])?;
            let inputs = StageCInputs { x, r, clip };
            let out = stage_c_controlled(mb, self.cfg, &inputs, guidance, control.as_ref())?;
            features = out.features;
            Ok(out.out)
        })?;
        if let Some(f) = features {
            for (site, id) in GUIDE_SITES.iter().zip(f) {
                mb.g.output(id, site)?;
            }
        }
        Ok(StepRecording {
            mb,
            graph,
            features,
            guide_inputs: None,
            constants,
        })
    }

    /// The INR modules' step-invariant part (docs/MODEL.md §3.2 A–E.2) of the four LR maps (cond
    /// half, bf16 `[B, h, w, C]` inputs) at the HR size: run once per generation. Returns the
    /// recording, its inputs and its outputs (f32 `[B, H, W, C]`), in site order.
    fn reconstruct_recording(
        &self,
        shapes: StageCShapes,
    ) -> Result<(ModelBuilder, Vec<TensorId>, Vec<TensorId>)> {
        let inr_cfg = self.cfg.inr.as_ref().ok_or_else(|| {
            Error::InvalidArgument("this Stage C has no INR guidance modules".into())
        })?;
        let [b, h, w, _] = shapes.lr;
        let (hh, ww) = (shapes.hr[1], shapes.hr[2]);
        let mut mb = ModelBuilder::new();
        let (mut inputs, mut outputs) = (Vec::new(), Vec::new());
        for ((site, prefix), level) in GUIDE_SITES.iter().zip(GUIDE_MODULES).zip([0, 1, 1, 0]) {
            let id =
                mb.g.input(site, &[b, h, w, self.cfg.c_hidden[level]], DType::BF16)?;
            let rec = inr::reconstruct(&mut mb, prefix, inr_cfg, id, (hh, ww))?;
            mb.g.output(rec, &format!("hr_rec {site}"))?;
            inputs.push(id);
            outputs.push(rec);
        }
        Ok((mb, inputs, outputs))
    }
}

/// Stage B sampling (docs/MODEL.md §1.2 step 4): effnet = Stage C's x0 for the cond rows and zeros
/// for the uncond rows, clip = the pooled text embeddings.
pub struct StageBRun<'a> {
    pub weights: &'a dyn Checkpoint,
    pub cfg: &'a StageBConfig,
    /// f32 `[2B, he, we, c_effnet]`.
    pub effnet: &'a HostTensor,
    /// `[2B, 1, c_clip]`.
    pub clip: &'a HostTensor,
    pub steps: usize,
    pub guidance: sampling_loop::Guidance,
}

impl StageBRun<'_> {
    /// Samples a latent of `shape` (`[B, H, W, c_in]`) from `init`.
    pub fn sample(
        &self,
        ctx: &RunContext,
        shape: [usize; 4],
        init: Vec<f32>,
        noise: &StepNoise,
        observe: &mut Observer,
    ) -> Result<Sampled> {
        self.recording(shape, noise.source())?
            .into_loop(ctx, self.weights)?
            .run(
                ctx,
                init,
                &Steps::all(self.steps),
                noise,
                Phase::StageB,
                observe,
            )
    }

    /// The step graph (for memory planning).
    pub fn graph(&self, shape: [usize; 4], source: NoiseSource) -> Result<Graph> {
        Ok(self.recording(shape, source)?.mb.finish().0)
    }

    /// Uploads the weights the step at `shape` reads into `ctx`'s cache, ahead of
    /// [`StageBRun::sample`] (its inputs' values do not matter here, only their shapes).
    pub fn upload_weights(&self, ctx: &RunContext, shape: [usize; 4]) -> Result<()> {
        let recording = self.recording(shape, NoiseSource::Device)?;
        ctx.upload_weights(recording.mb, self.weights)
    }

    fn recording(&self, shape: [usize; 4], source: NoiseSource) -> Result<StepRecording> {
        let mut mb = ModelBuilder::new();
        let effnet =
            mb.g.constant_input("effnet", &self.effnet.shape, DType::F32)?;
        let clip = mb.g.constant_input("clip", &self.clip.shape, DType::BF16)?;
        let graph = record_step(&mut mb, &shape, self.guidance, source, |mb, x2, r| {
            let x = mb.g.op1(Cast { out: DType::BF16 }, &[x2])?;
            stage_b(mb, self.cfg, &StageBInputs { x, r, effnet, clip })
        })?;
        Ok(StepRecording {
            mb,
            graph,
            features: None,
            guide_inputs: None,
            constants: vec![
                (effnet, self.effnet.data.clone()),
                (clip, self.clip.data.clone()),
            ],
        })
    }
}

/// Stage A decoding, in overlapping tiles so that the full-size maps of a 4K+ image (and
/// their 4×-wide hidden layers) never exist at once. The decoder has no global operation:
/// each output pixel depends on the latent within its receptive field, so a tile whose
/// margin covers that field decodes its core exactly as the whole image would.
pub struct StageADecode<'a> {
    pub weights: &'a dyn Checkpoint,
    pub cfg: &'a StageAConfig,
    /// Latent pixels of a tile's core, per side.
    pub tile: usize,
}

/// Default tile core: 256 latent pixels (1024 output pixels) per side.
pub const STAGE_A_TILE: usize = 256;

impl StageADecode<'_> {
    /// Latent pixels of margin a tile needs: the receptive field of the bottleneck's 3×3
    /// depthwise convs (one latent pixel each), the transposed conv and the last block.
    pub fn margin(&self) -> usize {
        self.cfg.bottleneck_blocks + 4
    }

    /// The window (start, length) along a side of `n` for the core starting at `start`.
    fn window(&self, n: usize, start: usize) -> (usize, usize) {
        let len = n.min(self.tile + 2 * self.margin());
        (start.saturating_sub(self.margin()).min(n - len), len)
    }

    /// The decoder graph for a window of `shape` = `[B, h, w]` latent pixels.
    fn recording(&self, [b, h, w]: [usize; 3]) -> Result<(ModelBuilder, TensorId, TensorId)> {
        let mut mb = ModelBuilder::new();
        let x =
            mb.g.input("latent", &[b, h, w, padded_latent(self.cfg)], DType::BF16)?;
        let out = stage_a_decode(&mut mb, self.cfg, x)?;
        mb.g.output(out, "rgb")?;
        Ok((mb, x, out))
    }

    /// Tiles of an `h`×`w` latent.
    pub fn tiles(&self, h: usize, w: usize) -> usize {
        h.div_ceil(self.tile) * w.div_ceil(self.tile)
    }

    /// The graph that decodes a `[B, h, w]` latent (one tile's, for memory planning).
    pub fn graph(&self, [b, h, w]: [usize; 3]) -> Result<Graph> {
        let (hw, ww) = (self.window(h, 0).1, self.window(w, 0).1);
        Ok(self.recording([b, hw, ww])?.0.finish().0)
    }

    /// Uploads the weights the decoder of a `[b, h, w]` latent reads into `ctx`'s cache,
    /// ahead of [`StageADecode::decode`].
    pub fn upload_weights(&self, ctx: &RunContext, [b, h, w]: [usize; 3]) -> Result<()> {
        let (hw, ww) = (self.window(h, 0).1, self.window(w, 0).1);
        let (mb, _, _) = self.recording([b, hw, ww])?;
        ctx.upload_weights(mb, self.weights)
    }

    /// A latent (f32 `[B, h, w, c_latent]`) to RGB, f32 `[B, 4h, 4w, 3]`, not clamped.
    pub fn decode(&self, ctx: &RunContext, latent: &HostTensor) -> Result<HostTensor> {
        let [b, h, w, c] = latent.shape[..] else {
            return Err(Error::shape("stage A", "the latent must be [B, H, W, C]"));
        };
        if c != self.cfg.c_latent || self.tile == 0 {
            return Err(Error::shape(
                "stage A",
                format!(
                    "the latent has {c} channels, the decoder reads {} (tile {})",
                    self.cfg.c_latent, self.tile
                ),
            ));
        }
        let kp = padded_latent(self.cfg);
        let padded = pad_channels(&latent.data, c, kp);
        let (wh, ww) = (self.window(h, 0).1, self.window(w, 0).1);
        let (mb, x, out) = self.recording([b, wh, ww])?;
        let mut session = ctx.session(mb, self.weights)?;
        let mut rgb = vec![0f32; b * 16 * h * w * 3];
        for y0 in (0..h).step_by(self.tile) {
            for x0 in (0..w).step_by(self.tile) {
                let (sy, _) = self.window(h, y0);
                let (sx, _) = self.window(w, x0);
                let mut tile = Vec::with_capacity(b * wh * ww * kp);
                for bi in 0..b {
                    for y in sy..sy + wh {
                        let row = ((bi * h + y) * w + sx) * kp;
                        tile.extend_from_slice(&padded[row..row + ww * kp]);
                    }
                }
                session.set_input(x, &tile)?;
                session.run()?;
                let got = session.read(out)?;
                // Keep the core: output rows 4·y0 … 4·min(y0 + tile, h), likewise columns.
                let (ye, xe) = ((y0 + self.tile).min(h), (x0 + self.tile).min(w));
                let row_len = 4 * (xe - x0) * 3;
                for bi in 0..b {
                    for oy in 4 * y0..4 * ye {
                        let src = ((bi * 4 * wh + oy - 4 * sy) * 4 * ww + 4 * (x0 - sx)) * 3;
                        let dst = ((bi * 4 * h + oy) * 4 * w + 4 * x0) * 3;
                        rgb[dst..dst + row_len].copy_from_slice(&got[src..src + row_len]);
                    }
                }
            }
        }
        Ok(HostTensor::new(vec![b, 4 * h, 4 * w, 3], rgb))
    }
}

/// Channels-last rows of `c` values zero-padded to `to`.
pub fn pad_channels(data: &[f32], c: usize, to: usize) -> Vec<f32> {
    data.chunks_exact(c)
        .flat_map(|px| px.iter().copied().chain(std::iter::repeat_n(0.0, to - c)))
        .collect()
}

/// What the text encoder gives each prompt.
#[derive(Clone, Debug)]
pub struct TextEmbedding {
    /// `[n, 77, width]`: the last layer before the final LayerNorm (Stage C's clip_text).
    pub hidden: HostTensor,
    /// `[n, 1, projection_dim]`: the projected state at the pooled position (clip_text_pooled).
    pub pooled: HostTensor,
}

/// The text encoder for `n` prompts: its graph with the ids, mask and pooled-position inputs
/// and the two outputs.
fn text_recording(
    cfg: &ClipTextConfig,
    n: usize,
) -> Result<(ModelBuilder, ClipTextInputs, [TensorId; 2])> {
    let t = crate::text::CONTEXT;
    let mut mb = ModelBuilder::new();
    let inputs = ClipTextInputs {
        ids: mb.g.input("input_ids", &[n, t], DType::F32)?,
        mask: Some(mb.g.input("attention_mask", &[n, t], DType::F32)?),
        pooled_at: mb.g.input("pooled_position", &[n], DType::F32)?,
    };
    let out = clip_text(&mut mb, cfg, &inputs)?;
    mb.g.output(out.hidden, "clip_text")?;
    mb.g.output(out.pooled, "clip_text_pooled")?;
    Ok((mb, inputs, [out.hidden, out.pooled]))
}

/// The text encoder's graph for `n` prompts (for memory planning).
pub fn text_graph(cfg: &ClipTextConfig, n: usize) -> Result<Graph> {
    Ok(text_recording(cfg, n)?.0.finish().0)
}

/// Encodes framed prompts (with the padding mask, as the reference passes it).
pub fn encode_text(
    ctx: &RunContext,
    weights: &dyn Checkpoint,
    cfg: &ClipTextConfig,
    prompts: &[Tokens],
) -> Result<TextEmbedding> {
    let (n, t) = (prompts.len(), crate::text::CONTEXT);
    let (mb, inputs, [hidden, pooled]) = text_recording(cfg, n)?;
    let mut session = ctx.session(mb, weights)?;
    let flat = |f: &dyn Fn(&Tokens) -> Vec<f32>| prompts.iter().flat_map(f).collect::<Vec<_>>();
    let mask = inputs.mask.expect("recorded with the mask");
    session.set_input(
        inputs.ids,
        &flat(&|p| p.ids.iter().map(|&v| v as f32).collect()),
    )?;
    session.set_input(mask, &flat(&|p| p.mask.iter().map(|&v| v as f32).collect()))?;
    session.set_input(
        inputs.pooled_at,
        &flat(&|p| vec![p.pooled_position(cfg.eos_token_id) as f32]),
    )?;
    session.run()?;
    Ok(TextEmbedding {
        hidden: HostTensor::new(vec![n, t, cfg.hidden_size], session.read(hidden)?),
        pooled: HostTensor::new(vec![n, 1, cfg.projection_dim], session.read(pooled)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::tiny::tiny_configs;
    use std::collections::HashMap;

    fn has_control(rec: &StepRecording) -> bool {
        rec.mb.g.inputs().any(|(_, d)| d.name.starts_with("cnet."))
    }

    #[test]
    fn control_goes_to_the_steps_without_lr_guide_on_the_shifted_schedule() {
        let cfg = tiny_configs().stage_c;
        let map = |hw| Some(HostTensor::zeros(&[1, hw, hw, cfg.c_hidden[0]]));
        let maps = ControlMaps {
            maps: vec![map(3), None, map(2), map(3)],
            strength: 0.7,
        };
        let conditions = StageCConditions::zeros(&cfg, 2);
        let none: HashMap<String, HostTensor> = HashMap::new();
        let run = StageCRun {
            weights: &none,
            cfg: &cfg,
            conditions: &conditions,
            steps: 25,
            guidance: sampling_loop::Guidance { cfg: 1.0, rho: 0.7 },
            shift: 2.0,
            control: Some(&maps),
        };
        let shapes = StageCShapes {
            lr: [1, 8, 8, cfg.c_in],
            hr: [1, 12, 12, cfg.c_in],
        };
        let source = NoiseSource::Device;
        assert!(has_control(&run.lr_recording(shapes, source).unwrap()));
        assert!(!has_control(&run.hr_recording(shapes, source).unwrap()));
        let unguided = run
            .step_recording(shapes.hr, source, |_| Ok(Guidance::None))
            .unwrap();
        assert!(has_control(&unguided));
        let rest = run.schedule(GUIDED_STEPS..25);
        assert_eq!((rest.total, rest.shift), (25, 2.0));
        let plain = StageCRun {
            control: None,
            ..run
        };
        assert!(!has_control(&plain.lr_recording(shapes, source).unwrap()));
    }
}
