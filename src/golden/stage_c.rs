//! Stage C kinds: the plain forward (`stage_c`), the UltraPixel low-resolution pass with
//! feature capture (`stage_c_ultrapixel_lr`) and the guided high-resolution pass
//! (`stage_c_ultrapixel_hr`), each also with a ControlNet's maps (`*_control`: injected in
//! the LR pass, passed but not injected in the HR pass, as the official code does).

use super::blocks::clip_inputs;
use super::*;
use crate::models::config::{parse, StageCConfig};
use crate::models::stage_c::{
    guide_scale, stage_c_controlled as record, ControlInjection, Guidance, GuideSource,
    StageCInputs, GUIDE_SITES,
};

/// Which pass a Stage C case runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Pass {
    Plain,
    LowRes,
    HighRes,
}

/// The control maps `input.cnet.<n>` (n < max(proj_blocks) + 1) and `control_weight` of a
/// `*_control` case.
fn control(mb: &mut ModelBuilder, case: &Case, inputs: &mut Inputs) -> Result<ControlInjection> {
    let blocks = case.config_usize_list("proj_blocks")?;
    let weight = case
        .config
        .get("control_weight")
        .and_then(|v| v.as_f64())
        .ok_or_else(|| case.error("config has no number `control_weight`".into()))?;
    let n = blocks.iter().max().map_or(0, |m| m + 1);
    let mut maps = vec![None; n];
    for i in blocks {
        let (id, _, data) = image_input(mb, case, &format!("cnet.{i}"), DType::F32)?;
        inputs.push((id, data));
        maps[i] = Some(id);
    }
    Ok(ControlInjection {
        maps,
        weight: weight as f32,
    })
}

pub(super) fn stage_c(case: &Case, pass: Pass, controlled: bool) -> Result<Built> {
    let cfg: StageCConfig = parse(&case.config, "Stage C")?;
    let mut mb = ModelBuilder::new();
    let (x, [b, _, h, w], xd) = image_input(&mut mb, case, "x", DType::BF16)?;
    let r_in = case.input("r")?;
    let r = mb.g.input("r", &[b], DType::F32)?;
    let (clip, mut inputs) = clip_inputs(&mut mb, case)?;
    inputs.push((x, xd));
    inputs.push((r, r_in.data.clone()));
    let guidance = match pass {
        Pass::Plain => Guidance::None,
        Pass::LowRes => Guidance::Capture,
        Pass::HighRes => {
            let kappa = guide_scale(h * w);
            if let Some(given) = case.metadata.get("guide_scale_up") {
                if given.parse::<f32>().ok() != Some(kappa) {
                    return Err(case.error(format!(
                        "guide_scale_up is {given}, but the rule of docs/MODEL.md §3.4 \
                         gives {kappa} for a {h}×{w} latent"
                    )));
                }
            }
            let mut sources = Vec::new();
            for site in GUIDE_SITES {
                let (id, _, data) = image_input(&mut mb, case, site, DType::BF16)?;
                inputs.push((id, data));
                sources.push(GuideSource::Features(id));
            }
            Guidance::Guided {
                sources: sources.try_into().expect("four sites"),
                kappa,
            }
        }
    };
    let ctl = if controlled {
        Some(control(&mut mb, case, &mut inputs)?)
    } else {
        None
    };
    let si = StageCInputs { x, r, clip };
    let out = record(&mut mb, &cfg, &si, guidance, ctl.as_ref())?;
    let mut outputs = vec![(
        "out".to_string(),
        out.out,
        Layout::Image([b, cfg.c_out, h, w]),
    )];
    for (site, (id, level)) in GUIDE_SITES
        .iter()
        .zip(out.features.into_iter().flatten().zip([0, 1, 1, 0]))
    {
        let c = cfg.c_hidden[level];
        outputs.push((site.to_string(), id, Layout::Image([b, c, h, w])));
    }
    Ok(Built::graph(mb, inputs, outputs))
}
