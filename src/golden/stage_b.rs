//! The `stage_b` kind: one Stage B forward.

use super::*;
use crate::models::config::{parse, StageBConfig};
use crate::models::stage_b::{stage_b as record, StageBInputs};

pub(super) fn stage_b(case: &Case) -> Result<Built> {
    let cfg: StageBConfig = parse(&case.config, "Stage B")?;
    let mut mb = ModelBuilder::new();
    let (x, shape, xd) = image_input(&mut mb, case, "x", DType::BF16)?;
    let (effnet, _, ed) = image_input(&mut mb, case, "effnet", DType::F32)?;
    let (r_in, clip_in) = (case.input("r")?, case.input("clip")?);
    let clip = mb.g.input("clip", &clip_in.shape, DType::BF16)?;
    let r = mb.g.input("r", &[shape[0]], DType::F32)?;
    let inputs = vec![
        (x, xd),
        (effnet, ed),
        (clip, clip_in.data.clone()),
        (r, r_in.data.clone()),
    ];
    let si = StageBInputs { x, r, effnet, clip };
    let out = record(&mut mb, &cfg, &si)?;
    Ok(Built::graph(
        mb,
        inputs,
        vec![("out".into(), out, Layout::Image(shape))],
    ))
}
