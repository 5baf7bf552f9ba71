//! Stable Cascade's Previewer (docs/MODEL.md §2.5): a Stage C latent (16 channels) to a rough RGB
//! image at 8× its size, cheap enough to show while Stage C samples. The checkpoint is one
//! `nn.Sequential` (`blocks.N`): 1×1 conv, then 3×3 convs and 2×2 stride-2 transposed convs
//! at halving widths, each followed by exact GELU and an eval-mode BatchNorm, and a last 1×1
//! conv to RGB.
//!
//! Graph: the 1×1 convs are GEMMs (GELU in the epilogue); a 3×3 zero-padded conv is a
//! stride-1 transposed conv with padding 1 and the kernel transposed and flipped
//! (`w_t[ci, co, ky, kx] = w[co, ci, 2 − ky, 2 − kx]`); BatchNorm is a FiLM with k = 0 whose
//! scale γ/√(var + ε) and shift β − mean·scale are folded on the host.

use super::blocks::linear;
use super::config::PreviewerConfig;
use super::{Manifest, ModelBuilder};
use crate::ops::conv_transpose::ConvTranspose2d;
use crate::ops::elementwise::{Act, Activation, Film};
use crate::ops::gemm::Gemm;
use crate::ops::layout::Cast;
use crate::runtime::graph::TensorId;
use crate::tensor::{DType, HostTensor};
use crate::Result;

/// `nn.BatchNorm2d`'s default ε.
const BN_EPS: f32 = 1e-5;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Layer {
    Conv1x1,
    Conv3x3,
    /// ConvTranspose2d(k 2, stride 2).
    Up2,
}

/// (index in `blocks`, layer, in, out channels). Every layer but the last is followed by
/// GELU (index + 1) and BatchNorm (index + 2).
fn layers(cfg: &PreviewerConfig) -> [(usize, Layer, usize, usize); 9] {
    let (h, h2, h4) = (cfg.c_hidden, cfg.c_hidden / 2, cfg.c_hidden / 4);
    use Layer::*;
    [
        (0, Conv1x1, cfg.c_in, h),
        (3, Conv3x3, h, h),
        (6, Up2, h, h2),
        (9, Conv3x3, h2, h2),
        (12, Up2, h2, h4),
        (15, Conv3x3, h4, h4),
        (18, Up2, h4, h4),
        (21, Conv3x3, h4, h4),
        (24, Conv1x1, h4, cfg.c_out),
    ]
}

/// Checkpoint keys present in the released file but not read: BatchNorm's batch counters.
pub fn unused_keys(cfg: &PreviewerConfig) -> Manifest {
    layers(cfg)[..8]
        .iter()
        .map(|&(i, ..)| (format!("blocks.{}.num_batches_tracked", i + 2), vec![]))
        .collect()
}

/// Every key (and shape) the previewer reads.
pub fn manifest(cfg: &PreviewerConfig) -> Result<Manifest> {
    super::manifest_of(|mb| {
        let x = mb.g.input("latent", &[1, 2, 2, cfg.c_in], DType::F32)?;
        previewer(mb, cfg, x).map(|_| ())
    })
}

/// Records the previewer on `x` f32 `[B, h, w, c_in]` (a Stage C latent, channels-last);
/// returns f32 `[B, 8h, 8w, 3]`, not clamped.
pub fn previewer(mb: &mut ModelBuilder, cfg: &PreviewerConfig, x: TensorId) -> Result<TensorId> {
    cfg.validate()?;
    let batch = mb.g.shape(x)[0];
    let gelu = Activation {
        act: Act::Gelu,
        out: DType::BF16,
    };
    let mut t = mb.g.op1(Cast { out: DType::BF16 }, &[x])?;
    for (i, layer, cin, cout) in layers(cfg) {
        let key = format!("blocks.{i}");
        let last = i == 24;
        let bias = || format!("{key}.bias");
        t = match layer {
            Layer::Conv1x1 => {
                let gemm = Gemm {
                    bias: true,
                    gelu: !last,
                    residual: false,
                    out: if last { DType::F32 } else { DType::BF16 },
                };
                linear(mb, &key, t, (cout, cin), true, gemm, None)?
            }
            Layer::Conv3x3 | Layer::Up2 => {
                let (w, k, stride, pad) = if layer == Layer::Conv3x3 {
                    let w = mb.derived(
                        &format!("{key}.weight (as a transposed conv)"),
                        &[cin, cout, 3, 3],
                        DType::BF16,
                        &[(&format!("{key}.weight"), &[cout, cin, 3, 3])],
                        move |s| Ok(conv_as_transposed(&s[0], cout, cin)),
                    )?;
                    (w, 3, 1, 1)
                } else {
                    let w = mb.weight(&format!("{key}.weight"), &[cin, cout, 2, 2], DType::BF16)?;
                    (w, 2, 2, 0)
                };
                let b = mb.weight(&bias(), &[cout], DType::F32)?;
                let conv = ConvTranspose2d {
                    k,
                    stride,
                    pad,
                    out: DType::BF16,
                };
                let y = mb.g.op1(conv, &[t, w, b])?;
                mb.g.op1(gelu.clone(), &[y])?
            }
        };
        if !last {
            let ab = batch_norm_film(mb, &format!("blocks.{}", i + 2), cout, batch)?;
            t = mb.g.op1(
                Film {
                    k: 0.0,
                    out: DType::BF16,
                },
                &[t, ab],
            )?;
        }
    }
    Ok(t)
}

/// `w [co, ci, 3, 3]` as the kernel of the equivalent stride-1 transposed conv:
/// `[ci, co, 3, 3]`, spatially flipped.
fn conv_as_transposed(w: &HostTensor, cout: usize, cin: usize) -> HostTensor {
    let mut data = vec![0f32; w.data.len()];
    for co in 0..cout {
        for ci in 0..cin {
            for tap in 0..9 {
                data[(ci * cout + co) * 9 + (8 - tap)] = w.data[(co * cin + ci) * 9 + tap];
            }
        }
    }
    HostTensor::new(vec![cin, cout, 3, 3], data)
}

/// Eval-mode BatchNorm `prefix` over `c` channels as FiLM rows `[a | b]` (scale and shift),
/// one per sample.
fn batch_norm_film(
    mb: &mut ModelBuilder,
    prefix: &str,
    c: usize,
    batch: usize,
) -> Result<TensorId> {
    let keys = ["weight", "bias", "running_mean", "running_var"].map(|k| format!("{prefix}.{k}"));
    let shape = [c];
    let sources: Vec<(&str, &[usize])> = keys.iter().map(|k| (k.as_str(), &shape[..])).collect();
    mb.derived(
        &format!("{prefix} (folded, batch {batch})"),
        &[batch, 2 * c],
        DType::F32,
        &sources,
        move |t| {
            let (gamma, beta, mean, var) = (&t[0].data, &t[1].data, &t[2].data, &t[3].data);
            let scale: Vec<f32> = (0..c)
                .map(|i| gamma[i] / (var[i] + BN_EPS).sqrt())
                .collect();
            let shift = (0..c).map(|i| beta[i] - mean[i] * scale[i]);
            let row: Vec<f32> = scale.iter().copied().chain(shift).collect();
            Ok(HostTensor::new(vec![batch, 2 * c], row.repeat(batch)))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::math::gelu_ref;
    use crate::runtime::session::SessionOptions;
    use crate::runtime::Backend;
    use crate::tensor::{bf16_bits_to_f32, f32_to_bf16_bits};
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};
    use std::collections::HashMap;

    /// NHWC `[h, w, c]` maps of one sample.
    struct Map {
        h: usize,
        w: usize,
        c: usize,
        v: Vec<f32>,
    }

    /// PyTorch's Conv2d(k, padding k/2) with `w [co, ci, k, k]`, written out directly.
    fn conv2d(x: &Map, w: &[f32], b: &[f32], co: usize, k: usize) -> Map {
        let p = (k / 2) as isize;
        let mut v = vec![0f32; x.h * x.w * co];
        for oy in 0..x.h {
            for ox in 0..x.w {
                for o in 0..co {
                    let mut acc = b[o] as f64;
                    for ky in 0..k {
                        for kx in 0..k {
                            let (iy, ix) =
                                (oy as isize + ky as isize - p, ox as isize + kx as isize - p);
                            if iy < 0 || ix < 0 || iy >= x.h as isize || ix >= x.w as isize {
                                continue;
                            }
                            let px = (iy as usize * x.w + ix as usize) * x.c;
                            for i in 0..x.c {
                                acc += (x.v[px + i] * w[((o * x.c + i) * k + ky) * k + kx]) as f64;
                            }
                        }
                    }
                    v[(oy * x.w + ox) * co + o] = acc as f32;
                }
            }
        }
        Map {
            h: x.h,
            w: x.w,
            c: co,
            v,
        }
    }

    /// PyTorch's ConvTranspose2d(k 2, stride 2) with `w [ci, co, 2, 2]`.
    fn up2(x: &Map, w: &[f32], b: &[f32], co: usize) -> Map {
        let (h, wd) = (2 * x.h, 2 * x.w);
        let mut v = vec![0f32; h * wd * co];
        for oy in 0..h {
            for ox in 0..wd {
                let (iy, ix, ky, kx) = (oy / 2, ox / 2, oy % 2, ox % 2);
                for o in 0..co {
                    let mut acc = b[o] as f64;
                    for i in 0..x.c {
                        acc += (x.v[(iy * x.w + ix) * x.c + i]
                            * w[((i * co + o) * 2 + ky) * 2 + kx])
                            as f64;
                    }
                    v[(oy * wd + ox) * co + o] = acc as f32;
                }
            }
        }
        Map { h, w: wd, c: co, v }
    }

    /// The module as PyTorch runs it (eval mode), on one sample.
    fn reference(cfg: &PreviewerConfig, ckpt: &HashMap<String, HostTensor>, x: Map) -> Map {
        let get = |k: String| ckpt[&k].data.clone();
        let mut t = x;
        for (i, layer, _, cout) in layers(cfg) {
            let (w, b) = (
                get(format!("blocks.{i}.weight")),
                get(format!("blocks.{i}.bias")),
            );
            t = match layer {
                Layer::Conv1x1 => conv2d(&t, &w, &b, cout, 1),
                Layer::Conv3x3 => conv2d(&t, &w, &b, cout, 3),
                Layer::Up2 => up2(&t, &w, &b, cout),
            };
            if i == 24 {
                break;
            }
            let bn = |k: &str| get(format!("blocks.{}.{k}", i + 2));
            let (g, be, m, var) = (
                bn("weight"),
                bn("bias"),
                bn("running_mean"),
                bn("running_var"),
            );
            for (j, v) in t.v.iter_mut().enumerate() {
                let c = j % cout;
                *v = (gelu_ref(*v) - m[c]) / (var[c] + BN_EPS).sqrt() * g[c] + be[c];
            }
        }
        t
    }

    /// The recorded graph (cpu executor) matches the module written out directly, on random
    /// weights and an odd latent size: the kernel flip, the transposition and the BatchNorm
    /// fold are right.
    #[test]
    fn the_previewer_graph_matches_the_module() {
        let cfg = PreviewerConfig {
            c_in: 16,
            c_hidden: 32,
            c_out: 3,
        };
        let mut rng = StdRng::seed_from_u64(41);
        let mut ckpt = HashMap::new();
        for (key, shape) in manifest(&cfg).unwrap() {
            let n: usize = shape.iter().product();
            let fan_in = if shape.len() == 4 {
                shape[1] * shape[2] * shape[3]
            } else {
                1
            };
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    let u = rng.random::<f32>();
                    let v = if key.ends_with("running_var") {
                        0.5 + u
                    } else {
                        (2.0 * u - 1.0) * (3.0 / fan_in as f32).sqrt()
                    };
                    bf16_bits_to_f32(f32_to_bf16_bits(v))
                })
                .collect();
            ckpt.insert(key, HostTensor::new(shape, v));
        }
        let (b, h, w) = (2, 3, 5);
        let latent: Vec<f32> = (0..b * h * w * 16)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect();
        let mut mb = ModelBuilder::new();
        let x = mb.g.input("latent", &[b, h, w, 16], DType::F32).unwrap();
        let y = previewer(&mut mb, &cfg, x).unwrap();
        mb.g.output(y, "rgb").unwrap();
        let (graph, plan) = mb.finish();
        let mut s = Backend::Cpu
            .session(graph, &plan.bind(&ckpt), SessionOptions::default())
            .unwrap();
        s.set_input(x, &latent).unwrap();
        s.run().unwrap();
        let got = s.read(y).unwrap();
        assert_eq!(got.len(), b * 64 * h * w * 3);
        let per = 64 * h * w * 3;
        for k in 0..b {
            let one = Map {
                h,
                w,
                c: 16,
                v: latent[k * h * w * 16..(k + 1) * h * w * 16].to_vec(),
            };
            let want = reference(&cfg, &ckpt, one);
            assert_eq!((want.h, want.w, want.c), (8 * h, 8 * w, 3));
            let scale = want.v.iter().fold(0f32, |m, v| m.max(v.abs()));
            // bf16 activations between the layers: a few roundings of 2⁻⁸ relative each.
            for (i, (g, r)) in got[k * per..(k + 1) * per].iter().zip(&want.v).enumerate() {
                assert!(
                    (g - r).abs() <= 0.03 * scale,
                    "sample {k} element {i}: {g} vs {r}"
                );
            }
        }
    }
}
