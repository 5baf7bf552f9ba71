use super::*;

/// Every (cfg, rho) pair of the config on [cond; uncond].
pub(super) fn cfg_combine(case: &Case) -> Result<Built> {
    let pairs = case
        .config
        .get("pairs")
        .and_then(|v| v.as_array())
        .ok_or_else(|| case.error("config has no `pairs`".into()))?;
    let (cond, uncond) = (case.input("pred_cond")?, case.input("pred_uncond")?);
    let mut mb = ModelBuilder::new();
    let c = mb.g.input("pred_cond", &cond.shape, DType::F32)?;
    let u = mb.g.input("pred_uncond", &uncond.shape, DType::F32)?;
    let both = mb.g.op1(
        Concat {
            axis: 0,
            out: DType::F32,
        },
        &[c, u],
    )?;
    let mut outputs = Vec::new();
    for p in pairs {
        let (cfg, rho) = match p.as_array().map(|a| (a[0].as_f64(), a[1].as_f64())) {
            Some((Some(cfg), Some(rho))) => (cfg, rho),
            _ => return Err(case.error(format!("bad pair {p}"))),
        };
        let op = CfgCombine {
            cfg: cfg as f32,
            rho: rho as f32,
            per_sample: false,
        };
        let y = mb.g.op1(op, &[both])?;
        outputs.push((format!("pred_cfg{cfg:?}_rho{rho:?}"), y, Layout::Same));
    }
    Ok(Built::graph(
        mb,
        vec![(c, cond.data.clone()), (u, uncond.data.clone())],
        outputs,
    ))
}

/// The GDF scalars on the host (they are what the sampler computes per step) and the DDPM /
/// DDIM update as the graph op.
pub(super) fn sampler_step(case: &Case) -> Result<Built> {
    use crate::ops::sampler::{logsnr, noise_cond, scalers, DdpmStep, StepCoefficients};
    let (x, pred, noise) = (case.input("x")?, case.input("pred")?, case.input("noise")?);
    let (r, r_prev, range) = (
        case.input("r")?,
        case.input("r_prev")?,
        case.input("r_range_20")?,
    );
    let b = r.data.len();
    let mut mb = ModelBuilder::new();
    let ids: Vec<TensorId> = ["x", "pred", "noise"]
        .iter()
        .map(|n| mb.g.input(n, &x.shape, DType::F32))
        .collect::<Result<_>>()?;
    let coef_ddpm = mb.g.input("coef_ddpm", &[b, 5], DType::F32)?;
    let coef_ddim = mb.g.input("coef_ddim", &[b, 5], DType::F32)?;
    let ddpm = mb.g.op(DdpmStep, &[ids[0], ids[1], ids[2], coef_ddpm])?;
    let ddim = mb.g.op(DdpmStep, &[ids[0], ids[1], ids[2], coef_ddim])?;
    let (mut rows_ddpm, mut rows_ddim) = (Vec::new(), Vec::new());
    for (&t, &tp) in r.data.iter().zip(&r_prev.data) {
        rows_ddpm.extend(StepCoefficients::ddpm(t, tp)?.row());
        rows_ddim.extend(StepCoefficients::ddim(t, tp).row());
    }
    let ls: Vec<f32> = r.data.iter().map(|&t| logsnr(t)).collect();
    let host_outputs = vec![
        ("logSNR".into(), ls.clone()),
        (
            "logSNR_prev".into(),
            r_prev.data.iter().map(|&t| logsnr(t)).collect(),
        ),
        (
            "noise_cond".into(),
            ls.iter().map(|&l| noise_cond(l)).collect(),
        ),
        ("a".into(), ls.iter().map(|&l| scalers(l).0).collect()),
        ("b".into(), ls.iter().map(|&l| scalers(l).1).collect()),
        ("epsilon".into(), pred.data.clone()),
        (
            "logSNR_range_20".into(),
            range.data.iter().map(|&t| logsnr(t)).collect(),
        ),
        (
            "noise_cond_range_20".into(),
            range.data.iter().map(|&t| noise_cond(logsnr(t))).collect(),
        ),
    ];
    Ok(Built {
        mb,
        inputs: vec![
            (ids[0], x.data.clone()),
            (ids[1], pred.data.clone()),
            (ids[2], noise.data.clone()),
            (coef_ddpm, rows_ddpm),
            (coef_ddim, rows_ddim),
        ],
        outputs: vec![
            ("x0".into(), ddpm[0], Layout::Same),
            ("x_next".into(), ddpm[1], Layout::Same),
            ("x_next_ddim".into(), ddim[1], Layout::Same),
        ],
        host_outputs,
        weights: None,
    })
}
