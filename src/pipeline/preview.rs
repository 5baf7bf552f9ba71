//! Previews while Stage C samples (`generate --preview`): a step's x0̂ (the sampler's current
//! estimate of the clean latent) through Stable Cascade's Previewer, as an RGB image at 8× the
//! latent. It changes nothing in the image being made: the previewer reads the step's
//! outputs on its own session.

use super::open_models::{Stage, Weights};
use super::png_out::Rgb8Image;
use super::stages::{Phase, RunContext};
use crate::models::config::PreviewerConfig;
use crate::models::previewer::previewer;
use crate::models::ModelBuilder;
use crate::runtime::graph::TensorId;
use crate::runtime::session::Session;
use crate::tensor::DType;
use crate::Result;

/// One preview of image `image`'s Stage C pass `phase` after step `step` (0-based) of `steps`.
pub struct Preview {
    pub phase: Phase,
    pub step: usize,
    pub steps: usize,
    pub rgb: Rgb8Image,
}

/// Whether step `step` (0-based) of `steps` gets a preview when previewing every `every`
/// steps: every `every`-th step and the last one.
pub fn preview_due(step: usize, steps: usize, every: usize) -> bool {
    (step + 1) % every.max(1) == 0 || step + 1 == steps
}

/// The previewer recorded for latents of `shape` (`[B, h, w, c]`, f32): the builder, its
/// input and its output.
pub fn preview_recording(
    cfg: &PreviewerConfig,
    shape: [usize; 4],
) -> Result<(ModelBuilder, TensorId, TensorId)> {
    let mut mb = ModelBuilder::new();
    let x = mb.g.input("latent", &shape, DType::F32)?;
    let y = previewer(&mut mb, cfg, x)?;
    mb.g.output(y, "rgb")?;
    Ok((mb, x, y))
}

/// The previewer placed for one latent shape: the session, its input and output.
struct PreviewSession {
    shape: [usize; 4],
    session: Box<dyn Session>,
    latent: TensorId,
    rgb: TensorId,
}

/// The previewer on a backend: one session per latent shape (the two Stage C passes), made
/// on first use and kept until [`PreviewDecoder::release`].
pub struct PreviewDecoder<'a> {
    stage: &'a Stage<PreviewerConfig>,
    sessions: Vec<PreviewSession>,
}

impl<'a> PreviewDecoder<'a> {
    pub fn new(stage: &'a Stage<PreviewerConfig>) -> Self {
        PreviewDecoder {
            stage,
            sessions: Vec::new(),
        }
    }

    /// Frees the sessions (their device memory); the next preview makes them again.
    pub fn release(&mut self) {
        self.sessions.clear();
    }

    /// A one-image latent of `shape` (`[1, h, w, c]`, channels-last) as an image.
    pub fn decode(
        &mut self,
        ctx: &RunContext,
        latent: &[f32],
        shape: [usize; 4],
    ) -> Result<Rgb8Image> {
        let i = match self.sessions.iter().position(|s| s.shape == shape) {
            Some(i) => i,
            None => {
                let (mb, latent, rgb) = preview_recording(&self.stage.config, shape)?;
                let weights: &Weights = &self.stage.weights;
                self.sessions.push(PreviewSession {
                    shape,
                    session: ctx.session(mb, weights)?,
                    latent,
                    rgb,
                });
                self.sessions.len() - 1
            }
        };
        let s = &mut self.sessions[i];
        s.session.set_input(s.latent, latent)?;
        s.session.run()?;
        let rgb = s.session.read(s.rgb)?;
        Rgb8Image::from_hwc(&rgb, 8 * shape[1], 8 * shape[2])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_fall_on_every_nth_step_and_the_last() {
        let due: Vec<usize> = (0..20).filter(|&s| preview_due(s, 20, 5)).collect();
        assert_eq!(due, [4, 9, 14, 19]);
        let due: Vec<usize> = (0..7).filter(|&s| preview_due(s, 7, 3)).collect();
        assert_eq!(due, [2, 5, 6]);
        assert!((0..4).all(|s| preview_due(s, 4, 1)));
        assert!((0..4).all(|s| preview_due(s, 4, 0)));
    }
}
