//! Stage A, the Paella VQGAN decoder (docs/MODEL.md §2.4): latent scale, 1×1 conv, bottleneck
//! MixResBlocks, the 4/2/1 transposed conv, one block at half width, the output conv and
//! PixelShuffle(2). Only the decoder: text-to-image never encodes.

use super::blocks::{conv1x1, linear_gelu, linear_residual, norm};
use super::config::StageAConfig;
use super::ModelBuilder;
use crate::ops::gemm::Gemm;
use crate::runtime::graph::TensorId;
use crate::tensor::{DType, HostTensor};
use crate::Result;

/// Stage A's ResBlock on an f32 NHWC stream, its six gammas folded into the weights (docs/MODEL.md
/// §2.4): the affine after each LayerNorm moves into the next linear map (replication padding
/// makes every depthwise tap valid, so the shift becomes a bias), the output scales g₂, g₅
/// into the last weights.
pub fn stage_a_block(
    mb: &mut ModelBuilder,
    prefix: &str,
    x: TensorId,
    c: usize,
    hidden: usize,
) -> Result<TensorId> {
    use crate::ops::conv::{DwConv, Pad};
    use crate::ops::elementwise::Add;
    let key = |k: &str| format!("{prefix}{k}");
    let gammas = key("gammas");
    let (dw_w, dw_b) = (key("depthwise.1.weight"), key("depthwise.1.bias"));
    let w = mb.derived(
        &format!("{dw_w}*gammas"),
        &[c, 9],
        DType::F32,
        &[(&dw_w, &[c, 1, 3, 3]), (&gammas, &[6])],
        |t| {
            let g = &t[1].data;
            let data = t[0].data.iter().map(|&v| v * (1.0 + g[0]) * g[2]).collect();
            Ok(HostTensor::new(vec![t[0].shape[0], 9], data))
        },
    )?;
    let b = mb.derived(
        &format!("{dw_b}*gammas"),
        &[c],
        DType::F32,
        &[(&dw_b, &[c]), (&dw_w, &[c, 1, 3, 3]), (&gammas, &[6])],
        |t| {
            let g = &t[2].data;
            let data = t[0]
                .data
                .iter()
                .zip(t[1].data.chunks_exact(9))
                .map(|(&bias, taps)| (bias + g[1] * taps.iter().sum::<f32>()) * g[2])
                .collect();
            Ok(HostTensor::new(t[0].shape.clone(), data))
        },
    )?;
    let t = mb.g.op1(norm(DType::F32), &[x])?;
    let d =
        mb.g.op1(DwConv::same(3, Pad::Replicate, DType::F32), &[t, w, b])?;
    let x = mb.g.op1(Add::plain(DType::F32), &[x, d])?;
    let (w1, b1) = (key("channelwise.0.weight"), key("channelwise.0.bias"));
    let (w2, b2) = (key("channelwise.2.weight"), key("channelwise.2.bias"));
    let w1f = mb.derived(
        &format!("{w1}*gammas"),
        &[hidden, c],
        DType::BF16,
        &[(&w1, &[hidden, c]), (&gammas, &[6])],
        |t| {
            let g = &t[1].data;
            Ok(HostTensor::new(
                t[0].shape.clone(),
                t[0].data.iter().map(|&v| v * (1.0 + g[3])).collect(),
            ))
        },
    )?;
    let b1f = mb.derived(
        &format!("{b1}*gammas"),
        &[hidden],
        DType::F32,
        &[(&b1, &[hidden]), (&w1, &[hidden, c]), (&gammas, &[6])],
        move |t| {
            let g = &t[2].data;
            let data = t[0]
                .data
                .iter()
                .zip(t[1].data.chunks_exact(c))
                .map(|(&bias, row)| bias + g[4] * row.iter().sum::<f32>())
                .collect();
            Ok(HostTensor::new(t[0].shape.clone(), data))
        },
    )?;
    let scaled = |t: &[HostTensor]| {
        let g5 = t[1].data[5];
        Ok(HostTensor::new(
            t[0].shape.clone(),
            t[0].data.iter().map(|&v| v * g5).collect(),
        ))
    };
    let w2f = mb.derived(
        &format!("{w2}*gammas"),
        &[c, hidden],
        DType::BF16,
        &[(&w2, &[c, hidden]), (&gammas, &[6])],
        scaled,
    )?;
    let b2f = mb.derived(
        &format!("{b2}*gammas"),
        &[c],
        DType::F32,
        &[(&b2, &[c]), (&gammas, &[6])],
        scaled,
    )?;
    let v = mb.g.op1(norm(DType::BF16), &[x])?;
    let h = mb.g.op1(linear_gelu(DType::BF16), &[v, w1f, b1f])?;
    mb.g.op1(linear_residual(DType::F32), &[h, w2f, b2f, x])
}

/// The decoder's input width: the latent channels zero-padded to 8, because the GEMM reads
/// 16-byte rows. The caller pads the latent the same way.
pub fn padded_latent(cfg: &StageAConfig) -> usize {
    cfg.c_latent.next_multiple_of(8)
}

/// Records the decoder on `x` bf16 `[B, h, w, padded_latent]` (the latent, unscaled: the
/// 0.43 folds into the first conv); returns f32 `[B, 4h, 4w, 3]`, not clamped.
pub fn stage_a_decode(mb: &mut ModelBuilder, cfg: &StageAConfig, x: TensorId) -> Result<TensorId> {
    use crate::ops::conv_transpose::ConvTranspose2d;
    use crate::ops::layout::{Cast, PixelShuffle};
    cfg.validate()?;
    let (blocks, c, latent, scale) = (
        cfg.bottleneck_blocks,
        cfg.c_hidden,
        cfg.c_latent,
        cfg.scale_factor,
    );
    let half = c / 2;
    let kp = padded_latent(cfg);
    let w0 = mb.derived(
        "up_blocks.0.0.weight*scale (padded)",
        &[c, kp],
        DType::BF16,
        &[("up_blocks.0.0.weight", &[c, latent, 1, 1])],
        move |t| {
            let data = t[0]
                .data
                .chunks_exact(latent)
                .flat_map(|row| {
                    row.iter()
                        .map(|&v| v * scale)
                        .chain(std::iter::repeat_n(0.0, kp - latent))
                })
                .collect();
            Ok(HostTensor::new(vec![c, kp], data))
        },
    )?;
    let b0 = mb.weight("up_blocks.0.0.bias", &[c], DType::F32)?;
    let mut y = mb.g.op1(Gemm::linear(DType::F32), &[x, w0, b0])?;
    for i in 1..=blocks {
        y = stage_a_block(mb, &format!("up_blocks.{i}."), y, c, 4 * c)?;
    }
    let up = format!("up_blocks.{}", blocks + 1);
    let wt = mb.weight(&format!("{up}.weight"), &[c, half, 4, 4], DType::BF16)?;
    let bt = mb.weight(&format!("{up}.bias"), &[half], DType::F32)?;
    y = mb.g.op1(
        ConvTranspose2d {
            k: 4,
            stride: 2,
            pad: 1,
            out: DType::F32,
        },
        &[y, wt, bt],
    )?;
    y = stage_a_block(mb, &format!("up_blocks.{}.", blocks + 2), y, half, 4 * half)?;
    let yb = mb.g.op1(Cast { out: DType::BF16 }, &[y])?;
    let wo = conv1x1(mb, "out_block.0.weight", 12, half)?;
    let bo = mb.weight("out_block.0.bias", &[12], DType::F32)?;
    let o = mb.g.op1(Gemm::linear(DType::F32), &[yb, wo, bo])?;
    mb.g.op1(
        PixelShuffle {
            r: 2,
            out: DType::F32,
        },
        &[o],
    )
}

/// The checkpoint keys the decoder reads.
pub fn manifest(cfg: &StageAConfig) -> Result<super::Manifest> {
    super::manifest_of(|mb| {
        let x =
            mb.g.input("x", &[1, 1, 1, padded_latent(cfg)], DType::BF16)?;
        stage_a_decode(mb, cfg, x).map(|_| ())
    })
}

/// Prefixes of the stored keys decoding never reads: the encoder and the quantizer.
pub const UNUSED_PREFIXES: &[&str] = &["in_block.", "down_blocks.", "vquantizer."];
