//! The GDF sampling loop both stages run (docs/MODEL.md §4): one recorded step graph — the model on
//! the CFG-doubled batch `[cond, uncond]`, guidance with the std rescale, the DDPM update —
//! replayed once per step with new per-step inputs (the noise condition r, the step
//! coefficients, the noise).
//!
//! Noise comes from the device generator ([`GaussianNoise`], keyed by seed, stream and step)
//! in generation, or from given tensors when a golden case prescribes it.

use crate::models::ModelBuilder;
use crate::ops::layout::Concat;
use crate::ops::noise::{noise_key, GaussianNoise};
use crate::ops::sampler::{
    noise_cond, shifted_logsnr, timesteps, CfgCombine, GuidedStep, StepCoefficients,
};
use crate::runtime::graph::TensorId;
use crate::runtime::session::Session;
use crate::tensor::DType;
use crate::Result;

/// Classifier-free guidance of a stage: `cfg` weight and the rescale `rho` (0.7 in both
/// stages of the reference).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Guidance {
    pub cfg: f32,
    pub rho: f32,
}

/// Where a step's noise comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoiseSource {
    /// Drawn on the device from the seed (generation).
    Device,
    /// Written by the caller each step (golden cases with prescribed noise).
    Given,
}

/// The noise input of a recorded step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NoiseInput {
    Key(TensorId),
    Tensor(TensorId),
}

/// The tensors of a recorded step graph.
#[derive(Clone, Debug)]
pub struct StepGraph {
    /// f32 latent `[B, …]` before the step.
    pub x: TensorId,
    /// f32 `[2B]`: the noise condition of every row of the doubled batch.
    pub r: TensorId,
    /// f32 `[B, 5]`: [`StepCoefficients::row`] per sample.
    pub coef: TensorId,
    noise: NoiseInput,
    /// Outputs: the clean estimate, the latent after the step, the guided prediction.
    pub x0: TensorId,
    pub x_next: TensorId,
    pub pred: TensorId,
    batch: usize,
}

/// Records one step around `model`, which receives the doubled latent `[2B, …]` (cond rows
/// first) and `r [2B]` and returns the prediction ε̂ `[2B, …]`.
pub fn record_step(
    mb: &mut ModelBuilder,
    x_shape: &[usize],
    guidance: Guidance,
    noise: NoiseSource,
    model: impl FnOnce(&mut ModelBuilder, TensorId, TensorId) -> Result<TensorId>,
) -> Result<StepGraph> {
    let batch = x_shape[0];
    let g = &mut mb.g;
    let x = g.input("x", x_shape, DType::F32)?;
    let r = g.input("r", &[2 * batch], DType::F32)?;
    let coef = g.input("coef", &[batch, 5], DType::F32)?;
    let (noise_in, noise_t) = match noise {
        NoiseSource::Device => {
            let key = g.input("noise_key", &[4], DType::F32)?;
            let t = g.op1(
                GaussianNoise {
                    shape: x_shape.to_vec(),
                },
                &[key],
            )?;
            (NoiseInput::Key(key), t)
        }
        NoiseSource::Given => {
            let t = g.input("noise", x_shape, DType::F32)?;
            (NoiseInput::Tensor(t), t)
        }
    };
    let doubled = g.op1(
        Concat {
            axis: 0,
            out: DType::F32,
        },
        &[x, x],
    )?;
    let eps = model(mb, doubled, r)?;
    let g = &mut mb.g;
    let step = GuidedStep {
        guidance: CfgCombine {
            cfg: guidance.cfg,
            rho: guidance.rho,
            per_sample: false,
        },
    };
    let outs = g.op(step, &[eps, x, noise_t, coef])?;
    let (x0, x_next, pred) = (outs[0], outs[1], outs[2]);
    g.output(x0, "x0")?;
    g.output(x_next, "x_next")?;
    g.output(pred, "pred")?;
    Ok(StepGraph {
        x,
        r,
        coef,
        noise: noise_in,
        x0,
        x_next,
        pred,
        batch,
    })
}

/// What one step produced (read back only when asked for).
#[derive(Clone, Debug, Default)]
pub struct StepRecord {
    pub x0: Vec<f32>,
    pub x_next: Vec<f32>,
    pub pred: Vec<f32>,
}

/// The per-step noise: how to fill a [`NoiseSource::Given`] graph, or the key stream of a
/// [`NoiseSource::Device`] one.
pub enum StepNoise<'a> {
    Seeded { seed: u64, stream: u32 },
    Given(&'a dyn Fn(usize) -> Vec<f32>),
}

impl StepNoise<'_> {
    /// The graph input this noise needs.
    pub fn source(&self) -> NoiseSource {
        match self {
            StepNoise::Seeded { .. } => NoiseSource::Device,
            StepNoise::Given(_) => NoiseSource::Given,
        }
    }
}

/// The steps of a `total`-step schedule that one loop runs (a schedule may be split between
/// two step graphs), and the schedule's `shift` ([`shifted_logsnr`]; 1 but with control).
#[derive(Clone, Debug, PartialEq)]
pub struct Steps {
    pub total: usize,
    pub run: std::ops::Range<usize>,
    pub shift: f32,
}

impl Steps {
    /// Every step of a `total`-step schedule without shift.
    pub fn all(total: usize) -> Steps {
        Steps {
            total,
            run: 0..total,
            shift: 1.0,
        }
    }
}

/// What a sampling run ends with.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    /// The latent after the last step.
    pub x: Vec<f32>,
    /// x0̂ of the last step: the value the next stage consumes (docs/MODEL.md §4.4).
    pub x0: Vec<f32>,
}

/// Runs `steps` DDPM steps from `x_init` on a session of a [`record_step`] graph. `inspect` is
/// called after every step, with its outputs when `record` is true (it costs reads). The session keeps the
/// last step's outputs: other graph outputs can be read from it afterwards.
pub fn sample(
    session: &mut dyn Session,
    sg: &StepGraph,
    x_init: Vec<f32>,
    steps: &Steps,
    noise: &StepNoise,
    record: bool,
    mut inspect: impl FnMut(usize, Option<&StepRecord>) -> Result<()>,
) -> Result<Sampled> {
    let ts = timesteps(steps.total);
    let mut x = x_init;
    let mut x0 = Vec::new();
    for k in steps.run.clone() {
        let coef = StepCoefficients::ddpm_shifted(ts[k], ts[k + 1], steps.shift)?.row();
        let r = noise_cond(shifted_logsnr(ts[k], steps.shift));
        session.set_input(sg.x, &x)?;
        session.set_input(sg.r, &vec![r; 2 * sg.batch])?;
        session.set_input(sg.coef, &coef.repeat(sg.batch))?;
        match (sg.noise, noise) {
            (NoiseInput::Key(key), StepNoise::Seeded { seed, stream }) => {
                session.set_input(key, &noise_key(*seed, *stream, k as u32))?
            }
            (NoiseInput::Tensor(t), StepNoise::Given(f)) => session.set_input(t, &f(k))?,
            _ => {
                return Err(crate::Error::InvalidArgument(
                    "the step graph's noise source does not match the noise given".into(),
                ))
            }
        }
        session.run()?;
        x = session.read(sg.x_next)?;
        if record || k + 1 == steps.run.end {
            x0 = session.read(sg.x0)?;
        }
        if record {
            let rec = StepRecord {
                x0: x0.clone(),
                x_next: x.clone(),
                pred: session.read(sg.pred)?,
            };
            inspect(k, Some(&rec))?;
        } else {
            inspect(k, None)?;
        }
    }
    Ok(Sampled { x, x0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::elementwise::{Act, Activation};
    use crate::ops::test_data::random;
    use crate::runtime::session::SessionOptions;
    use crate::runtime::Backend;
    use std::collections::HashMap;

    /// A stand-in model: ε̂ = SiLU of the doubled latent. Its halves are equal, so guidance
    /// leaves ε̂ unchanged (std ratio 1): enough to test the loop's wiring.
    fn silu_model(mb: &mut ModelBuilder, x2: TensorId, _r: TensorId) -> Result<TensorId> {
        mb.g.op1(
            Activation {
                act: Act::Silu,
                out: DType::F32,
            },
            &[x2],
        )
    }

    #[test]
    fn the_loop_feeds_each_step_its_coefficients_noise_and_previous_latent() {
        let shape = [2, 3, 5, 4];
        let n: usize = shape.iter().product();
        let guidance = Guidance { cfg: 4.0, rho: 0.7 };
        let mut mb = ModelBuilder::new();
        let sg = record_step(&mut mb, &shape, guidance, NoiseSource::Given, silu_model).unwrap();
        let g = mb.g;
        let weights: HashMap<String, crate::tensor::HostTensor> = HashMap::new();
        let mut s = Backend::Cpu
            .session(g, &weights, SessionOptions::default())
            .unwrap();
        let init = random(5, &shape, 1.0).data;
        let noise_of = |k: usize| random(100 + k as u64, &shape, 1.0).data;
        let steps = 3;
        let mut seen = Vec::new();
        let done = sample(
            &mut *s,
            &sg,
            init.clone(),
            &Steps::all(steps),
            &StepNoise::Given(&noise_of),
            true,
            |k, rec| {
                seen.push((k, rec.expect("recorded").x_next.clone()));
                Ok(())
            },
        )
        .unwrap();

        // The same loop by hand on the host.
        let ts = timesteps(steps);
        let mut x = init;
        let mut last_x0 = Vec::new();
        for (k, (_, got)) in seen.iter().enumerate() {
            let c = StepCoefficients::ddpm(ts[k], ts[k + 1]).unwrap();
            let noise = noise_of(k);
            let mut want_x0 = vec![0f32; n];
            let mut want_next = vec![0f32; n];
            for i in 0..n {
                let eps = x[i] / (1.0 + (-x[i]).exp());
                want_x0[i] = (x[i] - c.b * eps) / c.a;
                want_next[i] = c.a_prev * want_x0[i]
                    + (c.b_prev * c.b_prev - c.sigma * c.sigma).sqrt() * eps
                    + c.sigma * noise[i];
            }
            for (a, b) in got.iter().zip(&want_next) {
                assert!(
                    (a - b).abs() <= 1e-3 * (1.0 + b.abs()),
                    "step {k}: {a} vs {b}"
                );
            }
            x = want_next;
            last_x0 = want_x0;
        }
        assert_eq!(&done.x, &seen[steps - 1].1);
        for (a, b) in done.x0.iter().zip(&last_x0) {
            assert!(
                (a - b).abs() <= 1e-3 * (1.0 + b.abs()),
                "final x0: {a} vs {b}"
            );
        }
    }

    /// The loop on a backend: the latents after every step, with device noise from `seed`.
    fn trajectory(backend: &Backend, shape: &[usize], seed: u64) -> Vec<Vec<f32>> {
        let mut mb = ModelBuilder::new();
        let guidance = Guidance { cfg: 4.0, rho: 0.7 };
        let sg = record_step(&mut mb, shape, guidance, NoiseSource::Device, silu_model).unwrap();
        let g = mb.g;
        let weights: HashMap<String, crate::tensor::HostTensor> = HashMap::new();
        let options = SessionOptions { poison: true };
        let mut s = backend.session(g, &weights, options).unwrap();
        let mut out = Vec::new();
        let noise = StepNoise::Seeded { seed, stream: 1 };
        let init = random(seed, shape, 1.0).data;
        sample(
            &mut *s,
            &sg,
            init,
            &Steps::all(4),
            &noise,
            true,
            |_, rec| {
                out.push(rec.expect("recorded").x_next.clone());
                Ok(())
            },
        )
        .unwrap();
        out
    }

    #[cfg(feature = "hostsim")]
    #[test]
    fn the_kernel_path_follows_the_reference_path_step_by_step() {
        let shape = [2, 5, 3, 16];
        let seed = rand::random();
        let cpu = trajectory(&Backend::Cpu, &shape, seed);
        let emu = trajectory(
            &Backend::open(crate::runtime::BackendKind::Hostsim).unwrap(),
            &shape,
            seed,
        );
        for (k, (a, b)) in cpu.iter().zip(&emu).enumerate() {
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                err <= 1e-4 * scale,
                "seed {seed}, step {k}: max error {err} (scale {scale})"
            );
        }
    }

    #[test]
    fn seeds_and_streams_give_different_noise() {
        let shape = [1, 2, 2, 8];
        assert_ne!(
            trajectory(&Backend::Cpu, &shape, 1),
            trajectory(&Backend::Cpu, &shape, 2)
        );
        assert_eq!(
            trajectory(&Backend::Cpu, &shape, 3),
            trajectory(&Backend::Cpu, &shape, 3)
        );
    }
}
