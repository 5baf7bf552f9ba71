//! The cascade's stages as runs on a backend (spec §1.2): CLIP text encoding, Stage C's dual
//! low-res → high-res sampling with UltraPixel guidance, Stage B sampling, Stage A decoding.
//! Each builds its graphs from the models, binds them to a checkpoint and runs them; the
//! golden sampling cases and `generate` share these functions.
//!
//! Latents are channels-last f32 (`[B, H, W, C]`); the CFG batch is `[cond rows, uncond rows]`.

use crate::models::clip_text::{clip_text, ClipTextInputs};
use crate::models::config::{ClipTextConfig, StageAConfig, StageBConfig, StageCConfig};
use crate::models::stage_a::{padded_latent, stage_a_decode};
use crate::models::stage_b::{stage_b, StageBInputs};
use crate::models::stage_c::{
    guide_scale, stage_c, ClipInputs, Guidance, GuideSource, StageCInputs, GUIDE_MODULES,
    GUIDE_SITES,
};
use crate::models::{inr, Checkpoint, ModelBuilder};
use crate::ops::layout::Cast;
use crate::runtime::graph::TensorId;
use crate::runtime::session::{Session, SessionOptions};
use crate::runtime::Backend;
use crate::sampling::{self, record_step, Sampled, StepGraph, StepNoise, StepRecord};
use crate::tensor::{DType, HostTensor};
use crate::text::Tokens;
use crate::{Error, Result};

/// Which sampling loop a step belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    StageCLowRes,
    StageCHighRes,
    StageB,
}

impl Phase {
    pub fn label(self) -> &'static str {
        match self {
            Phase::StageCLowRes => "stage C (low-res guide)",
            Phase::StageCHighRes => "stage C",
            Phase::StageB => "stage B",
        }
    }
}

/// One finished sampler step, as observers see it.
pub struct StepEvent<'a> {
    pub phase: Phase,
    /// 0-based.
    pub step: usize,
    pub steps: usize,
    /// The step's outputs, when the run records them.
    pub record: Option<&'a StepRecord>,
}

/// Called after every step; an error (e.g. [`Error::Interrupted`]) stops the run.
pub type Observer<'a> = dyn FnMut(&StepEvent) -> Result<()> + 'a;

/// What every stage run needs.
#[derive(Clone, Copy)]
pub struct RunContext<'a> {
    pub backend: &'a Backend,
    pub options: SessionOptions,
    /// Read every step's outputs into [`StepEvent::record`] (costs device reads).
    pub record: bool,
}

impl RunContext<'_> {
    fn session(&self, mb: ModelBuilder, weights: &dyn Checkpoint) -> Result<Box<dyn Session>> {
        let (graph, plan) = mb.finish();
        self.backend
            .session(graph, &plan.bind(weights), self.options)
    }
}

/// A recorded step graph on its session, with the feature maps it captures (if any).
struct StepLoop {
    session: Box<dyn Session>,
    graph: StepGraph,
    features: Option<[TensorId; 4]>,
}

impl StepLoop {
    /// Runs the sampling loop from `init`, reporting every step to `observe` as `phase`.
    fn run(
        &mut self,
        ctx: &RunContext,
        init: Vec<f32>,
        steps: usize,
        noise: &StepNoise,
        phase: Phase,
        observe: &mut Observer,
    ) -> Result<Sampled> {
        let graph = &self.graph;
        sampling::sample(
            &mut *self.session,
            graph,
            init,
            steps,
            noise,
            ctx.record,
            |step, record| {
                observe(&StepEvent {
                    phase,
                    step,
                    steps,
                    record,
                })
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

/// Stage C's dual sampling (spec §4.7).
pub struct StageCRun<'a> {
    pub weights: &'a dyn Checkpoint,
    pub cfg: &'a StageCConfig,
    pub conditions: &'a StageCConditions,
    pub steps: usize,
    pub guidance: sampling::Guidance,
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

impl StageCRun<'_> {
    pub fn sample(
        &self,
        ctx: &RunContext,
        shapes: StageCShapes,
        noise: &StageCNoise,
        observe: &mut Observer,
    ) -> Result<StageCResult> {
        let b = shapes.hr[0];
        let mut lr_loop = self.step_loop(ctx, shapes.lr, &noise.lr, |_| Ok(Guidance::Capture))?;
        let features = lr_loop.features.ok_or_else(|| {
            Error::InvalidArgument("the low-resolution pass captured no features".into())
        })?;
        let lr = lr_loop.run(
            ctx,
            noise.init_lr.clone(),
            self.steps,
            &noise.lr,
            Phase::StageCLowRes,
            observe,
        )?;
        // The last LR step's maps, conditional half only (spec §3.1).
        let mut maps = Vec::new();
        for id in features {
            let v = lr_loop.session.read(id)?;
            maps.push(v[..v.len() / 2].to_vec());
        }
        drop(lr_loop);
        let reconstructed = self.reconstruct(ctx, shapes, &maps)?;

        let kappa = guide_scale(shapes.hr[1] * shapes.hr[2]);
        let mut recs = Vec::new();
        let mut hr_loop = self.step_loop(ctx, shapes.hr, &noise.hr, |mb| {
            let mut sources = Vec::new();
            for (site, rec) in GUIDE_SITES.iter().zip(&reconstructed) {
                let mut shape = rec.shape.clone();
                shape[0] = 2 * b;
                let id =
                    mb.g.constant_input(&format!("hr_rec {site}"), &shape, DType::BF16)?;
                recs.push((id, rec.data.repeat(2)));
                sources.push(GuideSource::Reconstructed(id));
            }
            Ok(Guidance::Guided {
                sources: sources.try_into().expect("four sites"),
                kappa,
            })
        })?;
        for (id, values) in &recs {
            hr_loop.session.set_input(*id, values)?;
        }
        let hr = hr_loop.run(
            ctx,
            noise.init_hr.clone(),
            self.steps,
            &noise.hr,
            Phase::StageCHighRes,
            observe,
        )?;
        Ok(StageCResult { lr, hr })
    }

    /// A step graph at `shape` with the guidance `guide` records, on a session with the
    /// conditions set.
    fn step_loop(
        &self,
        ctx: &RunContext,
        shape: [usize; 4],
        noise: &StepNoise,
        guide: impl FnOnce(&mut ModelBuilder) -> Result<Guidance>,
    ) -> Result<StepLoop> {
        let mut mb = ModelBuilder::new();
        let (clip, values) = self.conditions.record(&mut mb)?;
        let guidance = guide(&mut mb)?;
        let mut features = None;
        let sg = record_step(
            &mut mb,
            &shape,
            self.guidance,
            noise.source(),
            |mb, x2, r| {
                let x = mb.g.op1(Cast { out: DType::BF16 }, &[x2])?;
                let out = stage_c(mb, self.cfg, &StageCInputs { x, r, clip }, guidance)?;
                features = out.features;
                Ok(out.out)
            },
        )?;
        if let Some(f) = features {
            for (site, id) in GUIDE_SITES.iter().zip(f) {
                mb.g.output(id, site)?;
            }
        }
        let mut session = ctx.session(mb, self.weights)?;
        for (id, v) in values {
            session.set_input(id, v)?;
        }
        Ok(StepLoop {
            session,
            graph: sg,
            features,
        })
    }

    /// The INR modules' step-invariant part (spec §3.2 A–E.2) for the four LR maps (cond
    /// half, f32 `[B, h, w, C]` each), at the HR size: run once per generation.
    fn reconstruct(
        &self,
        ctx: &RunContext,
        shapes: StageCShapes,
        maps: &[Vec<f32>],
    ) -> Result<Vec<HostTensor>> {
        let inr_cfg = self.cfg.inr.as_ref().ok_or_else(|| {
            Error::InvalidArgument("this Stage C has no INR guidance modules".into())
        })?;
        let [b, h, w, _] = shapes.lr;
        let (hh, ww) = (shapes.hr[1], shapes.hr[2]);
        let mut mb = ModelBuilder::new();
        let mut inputs = Vec::new();
        let mut outs = Vec::new();
        for (site, (prefix, map)) in GUIDE_SITES.iter().zip(GUIDE_MODULES.iter().zip(maps)) {
            let c = map.len() / (b * h * w);
            let id = mb.g.input(site, &[b, h, w, c], DType::BF16)?;
            inputs.push((id, map));
            let rec = inr::reconstruct(&mut mb, prefix, inr_cfg, id, (hh, ww))?;
            mb.g.output(rec, &format!("hr_rec {site}"))?;
            outs.push((rec, [b, hh, ww, c]));
        }
        let mut session = ctx.session(mb, self.weights)?;
        for (id, v) in inputs {
            session.set_input(id, v)?;
        }
        session.run()?;
        outs.into_iter()
            .map(|(id, shape)| Ok(HostTensor::new(shape.to_vec(), session.read(id)?)))
            .collect()
    }
}

/// Stage B sampling (spec §1.2 step 4): effnet = Stage C's x0 for the cond rows and zeros
/// for the uncond rows, clip = the pooled text embeddings.
pub struct StageBRun<'a> {
    pub weights: &'a dyn Checkpoint,
    pub cfg: &'a StageBConfig,
    /// f32 `[2B, he, we, c_effnet]`.
    pub effnet: &'a HostTensor,
    /// `[2B, 1, c_clip]`.
    pub clip: &'a HostTensor,
    pub steps: usize,
    pub guidance: sampling::Guidance,
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
        let mut mb = ModelBuilder::new();
        let effnet =
            mb.g.constant_input("effnet", &self.effnet.shape, DType::F32)?;
        let clip = mb.g.constant_input("clip", &self.clip.shape, DType::BF16)?;
        let sg = record_step(
            &mut mb,
            &shape,
            self.guidance,
            noise.source(),
            |mb, x2, r| {
                let x = mb.g.op1(Cast { out: DType::BF16 }, &[x2])?;
                stage_b(mb, self.cfg, &StageBInputs { x, r, effnet, clip })
            },
        )?;
        let mut session = ctx.session(mb, self.weights)?;
        session.set_input(effnet, &self.effnet.data)?;
        session.set_input(clip, &self.clip.data)?;
        let mut step_loop = StepLoop {
            session,
            graph: sg,
            features: None,
        };
        step_loop.run(ctx, init, self.steps, noise, Phase::StageB, observe)
    }
}

/// Stage A: a Stage B latent (f32 `[B, h, w, c_latent]`) to RGB, f32 `[B, 4h, 4w, 3]`,
/// not clamped.
pub fn decode(
    ctx: &RunContext,
    weights: &dyn Checkpoint,
    cfg: &StageAConfig,
    latent: &HostTensor,
) -> Result<HostTensor> {
    let [b, h, w, c] = latent.shape[..] else {
        return Err(Error::shape("stage A", "the latent must be [B, H, W, C]"));
    };
    if c != cfg.c_latent {
        return Err(Error::shape(
            "stage A",
            format!(
                "the latent has {c} channels, the decoder reads {}",
                cfg.c_latent
            ),
        ));
    }
    let kp = padded_latent(cfg);
    let mut mb = ModelBuilder::new();
    let x = mb.g.input("latent", &[b, h, w, kp], DType::BF16)?;
    let out = stage_a_decode(&mut mb, cfg, x)?;
    mb.g.output(out, "rgb")?;
    let mut session = ctx.session(mb, weights)?;
    session.set_input(x, &pad_channels(&latent.data, c, kp))?;
    session.run()?;
    Ok(HostTensor::new(
        vec![b, 4 * h, 4 * w, 3],
        session.read(out)?,
    ))
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
    /// `[n, 1, projection_dim]`: the projected first-EOS state (clip_text_pooled).
    pub pooled: HostTensor,
}

/// Encodes framed prompts (with the padding mask, as the reference passes it).
pub fn encode_text(
    ctx: &RunContext,
    weights: &dyn Checkpoint,
    cfg: &ClipTextConfig,
    prompts: &[Tokens],
) -> Result<TextEmbedding> {
    let n = prompts.len();
    let t = crate::text::CONTEXT;
    let mut mb = ModelBuilder::new();
    let ids = mb.g.input("input_ids", &[n, t], DType::F32)?;
    let mask = mb.g.input("attention_mask", &[n, t], DType::F32)?;
    let eos = mb.g.input("eos_position", &[n], DType::F32)?;
    let inputs = ClipTextInputs {
        ids,
        mask: Some(mask),
        eos,
    };
    let out = clip_text(&mut mb, cfg, &inputs)?;
    mb.g.output(out.hidden, "clip_text")?;
    mb.g.output(out.pooled, "clip_text_pooled")?;
    let mut session = ctx.session(mb, weights)?;
    let flat = |f: &dyn Fn(&Tokens) -> Vec<f32>| prompts.iter().flat_map(f).collect::<Vec<_>>();
    session.set_input(ids, &flat(&|p| p.ids.iter().map(|&v| v as f32).collect()))?;
    session.set_input(mask, &flat(&|p| p.mask.iter().map(|&v| v as f32).collect()))?;
    session.set_input(eos, &flat(&|p| vec![p.eos_position() as f32]))?;
    session.run()?;
    Ok(TextEmbedding {
        hidden: HostTensor::new(vec![n, t, cfg.hidden_size], session.read(out.hidden)?),
        pooled: HostTensor::new(vec![n, 1, cfg.projection_dim], session.read(out.pooled)?),
    })
}
