//! The sampling kinds: `sample_ultrapixel` (Stage C's dual LR → HR loop with guidance) and
//! `sample_stage_b`, run through the same stage code as `generate`, with the case's noise.

use super::*;
use crate::models::config::{parse, StageBConfig, StageCConfig};
use crate::pipeline::stages::{
    Progress, RunContext, StageBRun, StageCConditions, StageCNoise, StageCRun, StageCShapes,
};
use crate::sampling_loop::{Guidance, StepNoise};

/// The sampler settings of a case; only the schedule the cascade uses is supported.
fn sampler_settings(case: &Case) -> Result<(usize, Guidance)> {
    let num = |k: &str| case.config.get(k).and_then(|v| v.as_f64());
    for (key, want) in [("t_start", 1.0), ("t_end", 0.0), ("shift", 1.0)] {
        if num(key) != Some(want) {
            return Err(case.error(format!("only {key} = {want} is supported")));
        }
    }
    let (Some(cfg), Some(rho)) = (num("cfg"), num("cfg_rho")) else {
        return Err(case.error("config needs cfg and cfg_rho".into()));
    };
    let guidance = Guidance {
        cfg: cfg as f32,
        rho: rho as f32,
    };
    Ok((case.config_usize("timesteps")?, guidance))
}

/// A `[B, C, H, W]` config shape as the channels-last `[B, H, W, C]`.
fn nhwc_shape(case: &Case, key: &str) -> Result<[usize; 4]> {
    let s = case.config_usize_list(key)?;
    match s[..] {
        [b, c, h, w] => Ok([b, h, w, c]),
        _ => Err(case.error(format!("config `{key}` must be [B, C, H, W]"))),
    }
}

/// An NCHW case input in channels-last order.
fn nhwc(case: &Case, name: &str) -> Result<Vec<f32>> {
    Ok(Layout::of_image(case.input(name)?)?.1)
}

/// The `cond.<name>` rows then the `uncond.<name>` rows (`image`: NCHW → NHWC).
fn cfg_batch(case: &Case, name: &str, image: bool) -> Result<HostTensor> {
    let mut data = Vec::new();
    let mut shape = Vec::new();
    for half in ["cond", "uncond"] {
        let key = format!("{half}.{name}");
        let t = case.input(&key)?;
        shape = if image {
            let [b, c, h, w] = t.shape[..] else {
                return Err(case.error(format!("{key} must be NCHW")));
            };
            vec![b, h, w, c]
        } else {
            t.shape.clone()
        };
        data.extend(if image {
            nhwc(case, &key)?
        } else {
            t.data.clone()
        });
    }
    shape[0] *= 2;
    Ok(HostTensor::new(shape, data))
}

/// The given noise of every step, `<prefix>.0 … <prefix>.{steps − 1}`, channels-last: an
/// error now, naming the input, rather than mid-run.
fn given_noise(case: &Case, prefix: &str, steps: usize) -> Result<impl Fn(usize) -> Vec<f32>> {
    let all = (0..steps)
        .map(|k| nhwc(case, &format!("{prefix}.{k}")))
        .collect::<Result<Vec<_>>>()?;
    Ok(move |k: usize| all[k].clone())
}

/// Collects every recorded step as `<prefix>{k}.{x0,x,pred}` in NCHW.
fn collect_steps<'a>(
    out: &'a mut Vec<(String, Vec<f32>)>,
    prefix: &'a str,
    shape: [usize; 4],
    phase: crate::pipeline::stages::Phase,
) -> impl FnMut(&Progress) -> Result<()> + 'a {
    let [b, h, w, c] = shape;
    let layout = Layout::Image([b, c, h, w]);
    move |p: &Progress| {
        let Progress::Step(e) = p else {
            return Ok(());
        };
        if let (true, Some(r)) = (e.phase == phase, e.record) {
            let k = e.step;
            out.push((format!("{prefix}{k}.x0"), layout.back(r.x0.clone())));
            out.push((format!("{prefix}{k}.x"), layout.back(r.x_next.clone())));
            out.push((format!("{prefix}{k}.pred"), layout.back(r.pred.clone())));
        }
        Ok(())
    }
}

fn context(backend: &Backend) -> RunContext<'_> {
    RunContext {
        backend,
        options: SessionOptions { poison: true },
        record: true,
        weights: None,
        sessions: None,
    }
}

pub(super) fn sample_ultrapixel(case: &Case, backend: &Backend) -> Result<Vec<(String, Vec<f32>)>> {
    use crate::pipeline::stages::Phase;
    let model = case.config.get("model").cloned().unwrap_or_default();
    let cfg: StageCConfig = parse(&model, "Stage C")?;
    let (steps, guidance) = sampler_settings(case)?;
    let shapes = StageCShapes {
        lr: nhwc_shape(case, "lr_shape")?,
        hr: nhwc_shape(case, "hr_shape")?,
    };
    let conditions = StageCConditions {
        clip_text: cfg_batch(case, "clip_text", false)?,
        clip_text_pooled: cfg_batch(case, "clip_text_pooled", false)?,
        clip_img: cfg_batch(case, "clip_img", false)?,
    };
    let (lr_noise, hr_noise) = (
        given_noise(case, "step_noise_lr", steps)?,
        given_noise(case, "step_noise_hr", steps)?,
    );
    let noise = StageCNoise {
        init_lr: nhwc(case, "init_lr")?,
        init_hr: nhwc(case, "init_hr")?,
        lr: StepNoise::Given(&lr_noise),
        hr: StepNoise::Given(&hr_noise),
    };
    let run = StageCRun {
        weights: &case.weights,
        cfg: &cfg,
        conditions: &conditions,
        steps,
        guidance,
        shift: 1.0,
        control: None,
    };
    let mut outputs = Vec::new();
    let result = {
        let mut observe = collect_steps(&mut outputs, "hr_step", shapes.hr, Phase::StageCHighRes);
        run.sample(&context(backend), shapes, &noise, &mut observe)?
    };
    let image = |[b, h, w, c]: [usize; 4]| Layout::Image([b, c, h, w]);
    outputs.push(("sampled_hr".into(), image(shapes.hr).back(result.hr.x)));
    outputs.push(("sampled_lr".into(), image(shapes.lr).back(result.lr.x)));
    Ok(outputs)
}

pub(super) fn sample_stage_b(case: &Case, backend: &Backend) -> Result<Vec<(String, Vec<f32>)>> {
    use crate::pipeline::stages::Phase;
    let model = case.config.get("model").cloned().unwrap_or_default();
    let cfg: StageBConfig = parse(&model, "Stage B")?;
    let (steps, guidance) = sampler_settings(case)?;
    let shape = nhwc_shape(case, "shape")?;
    let effnet = cfg_batch(case, "effnet", true)?;
    let clip = cfg_batch(case, "clip", false)?;
    let step_noise = given_noise(case, "step_noise", steps)?;
    let run = StageBRun {
        weights: &case.weights,
        cfg: &cfg,
        effnet: &effnet,
        clip: &clip,
        steps,
        guidance,
    };
    let mut outputs = Vec::new();
    let sampled = {
        let mut observe = collect_steps(&mut outputs, "step", shape, Phase::StageB);
        run.sample(
            &context(backend),
            shape,
            nhwc(case, "init")?,
            &StepNoise::Given(&step_noise),
            &mut observe,
        )?
    };
    let [b, h, w, c] = shape;
    outputs.push((
        "sampled".into(),
        Layout::Image([b, c, h, w]).back(sampled.x),
    ));
    Ok(outputs)
}
