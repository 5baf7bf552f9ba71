//! EfficientNetV2 and ControlNet kinds: a conv-BN-SiLU layer (`effnet_conv_bn_silu`: the
//! stems and the head), one FusedMBConv or MBConv block, and the whole tiny ControlNet
//! (`controlnet`: its maps by ResBlock visit).

use super::*;
use crate::models::config::parse;
use crate::models::controlnet::{controlnet as record, ControlNetConfig};
use crate::models::effnet::{conv_bn_silu, fused_mbconv, mbconv, BlockShape, ConvShape};

fn bn_eps(case: &Case) -> Result<f64> {
    case.config
        .get("bn_eps")
        .and_then(|v| v.as_f64())
        .ok_or_else(|| case.error("config has no number `bn_eps`".into()))
}

pub(super) fn conv_bn_silu_case(case: &Case) -> Result<Built> {
    let s = ConvShape {
        cin: case.config_usize("c_in")?,
        cout: case.config_usize("c_out")?,
        k: case.config_usize("kernel")?,
        stride: case.config_usize("stride")?,
        pad: case.config_usize("padding")?,
    };
    let mut mb = ModelBuilder::new();
    let (x, [b, _, _, _], xd) = image_input(&mut mb, case, "x", DType::F32)?;
    let out = conv_bn_silu(&mut mb, "", x, s, bn_eps(case)?)?;
    let out = image_output(&mb, "out", b, out);
    Ok(Built::graph(mb, vec![(x, xd)], vec![out]))
}

/// Output `name`: the graph's NHWC `id`, compared as the case's NCHW.
fn image_output(
    mb: &ModelBuilder,
    name: &str,
    b: usize,
    id: TensorId,
) -> (String, TensorId, Layout) {
    let [_, h, w, c] = mb.g.shape(id)[..] else {
        unreachable!("convs keep the rank")
    };
    (name.into(), id, Layout::Image([b, c, h, w]))
}

/// `effnet_fused_mbconv` (`fused`) or `effnet_mbconv`.
pub(super) fn block_case(case: &Case, fused: bool) -> Result<Built> {
    let s = BlockShape {
        expand_ratio: case.config_usize("expand_ratio")?,
        kernel: case.config_usize("kernel")?,
        stride: case.config_usize("stride")?,
        c_in: case.config_usize("c_in")?,
        c_out: case.config_usize("c_out")?,
    };
    let mut mb = ModelBuilder::new();
    // bf16 like the stream between blocks (and the residual the last conv adds).
    let (x, [b, _, _, _], xd) = image_input(&mut mb, case, "x", DType::BF16)?;
    let eps = bn_eps(case)?;
    let out = if fused {
        fused_mbconv(&mut mb, "", x, s, eps)?
    } else {
        mbconv(&mut mb, "", x, s, eps)?
    };
    let out = image_output(&mb, "out", b, out);
    Ok(Built::graph(mb, vec![(x, xd)], vec![out]))
}

pub(super) fn controlnet_case(case: &Case) -> Result<Built> {
    let cfg: ControlNetConfig = parse(&case.config, "ControlNet")?;
    let mut mb = ModelBuilder::new();
    let (x, [b, _, _, _], xd) = image_input(&mut mb, case, "x", DType::F32)?;
    let maps = record(&mut mb, &cfg, x)?;
    let mut outputs = Vec::new();
    for (i, map) in maps.into_iter().enumerate() {
        if let Some(id) = map {
            outputs.push(image_output(&mb, &format!("cnet.{i}"), b, id));
        }
    }
    Ok(Built::graph(mb, vec![(x, xd)], outputs))
}
