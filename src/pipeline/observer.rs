//! What a generation does between steps, as separate parts: the phase timer, the NaN/Inf
//! guard, Stage C previews, and the caller's events, joined by [`ImageObserver`].

use super::generate::{Event, Pipeline};
use super::open_models::Stage;
use super::preview::{preview_due, Preview, PreviewDecoder};
use super::stages::{Phase, Progress, StageCShapes, StageId, StepEvent};
use crate::models::config::PreviewerConfig;
use crate::runtime::device::WeightCache;
use crate::{Error, Result};
use std::time::Instant;

/// Seconds per stage of one image, from the phases' start events.
pub(super) struct PhaseTimer {
    timings: Vec<(StageId, f64)>,
    current: Option<(Phase, Instant)>,
}

impl PhaseTimer {
    /// Starts with `before` (the text encoder's time, counted on the first image only).
    pub fn new(before: Option<(StageId, f64)>) -> Self {
        PhaseTimer {
            timings: before.into_iter().collect(),
            current: None,
        }
    }

    /// Both Stage C passes time as one stage: the high-res pass continues the low-res one.
    fn started(&mut self, phase: Phase) {
        if phase != Phase::StageCHighRes {
            self.close();
            self.current = Some((phase, Instant::now()));
        }
    }

    fn close(&mut self) {
        if let Some((done, t)) = self.current.take() {
            self.timings.push((done.stage(), t.elapsed().as_secs_f64()));
        }
    }

    pub fn finish(mut self) -> Vec<(StageId, f64)> {
        self.close();
        self.timings
    }
}

/// Stage C previews of a generation: the previewer's sessions and weights live while Stage C
/// samples and are freed when Stage B starts (the memory plan counts them in Stage C only).
pub(super) struct Previews<'p> {
    decoder: PreviewDecoder<'p>,
    cache: WeightCache,
    every: usize,
    shapes: StageCShapes,
}

impl<'p> Previews<'p> {
    pub fn new(stage: &'p Stage<PreviewerConfig>, every: usize, shapes: StageCShapes) -> Self {
        Previews {
            decoder: PreviewDecoder::new(stage),
            cache: WeightCache::new(),
            every,
            shapes,
        }
    }

    fn started(&mut self, phase: Phase) {
        if phase == Phase::StageB {
            self.decoder.release();
            self.cache.clear();
        }
    }

    /// The preview of a Stage C step when one is due.
    fn step(&mut self, pipeline: &Pipeline, e: &StepEvent) -> Result<Option<Preview>> {
        let shape = match e.phase {
            Phase::StageCLowRes => self.shapes.lr,
            Phase::StageCHighRes => self.shapes.hr,
            _ => return Ok(None),
        };
        let Some(r) = e.record else {
            return Ok(None);
        };
        if !preview_due(e.step, e.steps, self.every) {
            return Ok(None);
        }
        let ctx = pipeline.context(Some(&self.cache));
        Ok(Some(Preview {
            phase: e.phase,
            step: e.step,
            steps: e.steps,
            rgb: self.decoder.decode(&ctx, &r.x0, shape)?,
        }))
    }
}

/// The observer of one image of a batch: each progress report goes through the timer, the
/// NaN guard (with `check_every_step`) and the previews, then to the caller as an event.
pub(super) struct ImageObserver<'o, 'p> {
    pub pipeline: &'o Pipeline,
    pub image: usize,
    pub timer: PhaseTimer,
    pub check_every_step: bool,
    pub previews: Option<&'o mut Previews<'p>>,
    pub on_event: &'o mut dyn FnMut(Event) -> Result<()>,
}

impl ImageObserver<'_, '_> {
    pub fn observe(&mut self, p: &Progress) -> Result<()> {
        match p {
            Progress::Started { phase, .. } => {
                if let Some(v) = self.previews.as_deref_mut() {
                    v.started(*phase);
                }
                self.timer.started(*phase);
            }
            Progress::Step(e) => {
                if let (true, Some(r)) = (self.check_every_step, e.record) {
                    check_finite(e.phase, Some(e.step), &r.x_next)?;
                }
                if let Some(v) = self.previews.as_deref_mut() {
                    if let Some(preview) = v.step(self.pipeline, e)? {
                        (self.on_event)(Event::Preview {
                            image: self.image,
                            preview: &preview,
                        })?;
                    }
                }
            }
        }
        (self.on_event)(Event::Progress {
            image: self.image,
            progress: p,
        })
    }
}

/// Fails with the stage (and step) when `values` holds NaN or Inf.
pub(super) fn check_finite(phase: Phase, step: Option<usize>, values: &[f32]) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
