//! Stage A kinds: one MixResBlock, and the whole decoder.

use super::*;
use crate::models::config::{parse, StageAConfig};
use crate::models::stage_a::{padded_latent, stage_a_block, stage_a_decode as record};
use crate::pipeline::stages::pad_channels;

pub(super) fn stage_a_resblock(case: &Case) -> Result<Built> {
    let (c, hidden) = (case.config_usize("c")?, case.config_usize("c_hidden")?);
    let mut mb = ModelBuilder::new();
    let (x, shape, xd) = image_input(&mut mb, case, "x", DType::F32)?;
    let out = stage_a_block(&mut mb, "", x, c, hidden)?;
    Ok(Built::graph(
        mb,
        vec![(x, xd)],
        vec![("out".into(), out, Layout::Image(shape))],
    ))
}

pub(super) fn stage_a_decode(case: &Case) -> Result<Built> {
    let cfg: StageAConfig = parse(&case.config, "Stage A")?;
    let mut mb = ModelBuilder::new();
    let ([b, c, h, w], xd) = Layout::of_image(case.input("x")?)?;
    if c != cfg.c_latent {
        return Err(case.error(format!("x has {c} channels, the config {}", cfg.c_latent)));
    }
    let kp = padded_latent(&cfg);
    let x = mb.g.input("x", &[b, h, w, kp], DType::BF16)?;
    let out = record(&mut mb, &cfg, x)?;
    Ok(Built::graph(
        mb,
        vec![(x, pad_channels(&xd, c, kp))],
        vec![("out".into(), out, Layout::Image([b, 3, 4 * h, 4 * w]))],
    ))
}
