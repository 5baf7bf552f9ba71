//! The `inr_upsampler` kind: one UltraPixel INR guidance module, whole.

use super::*;
use crate::models::config::{parse, InrConfig};
use crate::models::inr::{fuse, reconstruct};

pub(super) fn inr_upsampler(case: &Case) -> Result<Built> {
    let cfg: InrConfig = parse(&case.config, "INR")?;
    let mut mb = ModelBuilder::new();
    let (target, shape @ [b, _, hh, ww], td) = image_input(&mut mb, case, "target", DType::F32)?;
    let (dtok, _, dd) = image_input(&mut mb, case, "dtokens", DType::BF16)?;
    let temb_in = case.input("t_emb")?;
    let temb = mb.g.input("t_emb", &[b, cfg.time_dim], DType::BF16)?;
    let hr = reconstruct(&mut mb, "", &cfg, dtok, (hh, ww))?;
    let out = fuse(&mut mb, "", &cfg, hr, target, temb)?;
    Ok(Built::graph(
        mb,
        vec![(target, td), (dtok, dd), (temb, temb_in.data.clone())],
        vec![("out".into(), out, Layout::Image(shape))],
    ))
}
