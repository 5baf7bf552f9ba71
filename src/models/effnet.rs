//! torchvision's EfficientNetV2 feature stack (`efficientnet_v2_s().features`), the backbone
//! of Stable Cascade's ControlNets: a conv-BN-SiLU stem, stages of FusedMBConv and MBConv
//! (with squeeze-and-excitation) blocks, and a 1×1 conv-BN-SiLU head. Inference only:
//! every BatchNorm (running statistics) is folded into the conv before it when the weights
//! are bound ([`fold_batchnorm`]); stochastic depth is the identity.
//!
//! Checkpoint keys are torchvision's, under a prefix (`backbone.` in the ControlNet):
//! `{i}.0.weight` + `{i}.1.*` for the stem (i = 0) and the head (i = stages + 1),
//! `{i}.{j}.block.{l}.0.weight` + `{i}.{j}.block.{l}.1.*` for layer l of block j of stage i,
//! and `{i}.{j}.block.{l}.fc1|fc2.{weight,bias}` for an SE layer.

use super::ModelBuilder;
use crate::ops::conv::{DwConv, Pad};
use crate::ops::conv2d::{fold_batchnorm, Act, Conv2d};
use crate::ops::squeeze_excite::SeGate;
use crate::runtime::graph::TensorId;
use crate::tensor::{DType, HostTensor};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// The two block types of EfficientNetV2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// FusedMBConv: a k×k conv expands (or, at expand ratio 1, is the whole block).
    Fused,
    /// MBConv: 1×1 expand, depthwise k×k, SE, 1×1 project.
    Mb,
}

/// One stage: `layers` blocks, the first with `stride` and `c_in`, the others stride 1 and
/// `c_out` wide (torchvision's `FusedMBConvConfig` / `MBConvConfig`). As a JSON array:
/// `[type, expand_ratio, kernel, stride, c_in, c_out, layers]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stage(
    pub BlockKind,
    pub usize,
    pub usize,
    pub usize,
    pub usize,
    pub usize,
    pub usize,
);

/// The feature stack's shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EffNetConfig {
    /// Channels of the input image (3 for torchvision's stem, 1 for the Canny ControlNet).
    pub c_in: usize,
    pub stem_out: usize,
    /// 1 in torchvision; 0 where the ControlNet replaced the stem (`c_in ≠ 3`).
    pub stem_padding: usize,
    pub stages: Vec<Stage>,
    pub last_channel: usize,
    pub bn_eps: f64,
}

impl Default for EffNetConfig {
    /// `efficientnet_v2_s` (torchvision `_efficientnet_conf("efficientnet_v2_s")`).
    fn default() -> Self {
        use BlockKind::{Fused, Mb};
        EffNetConfig {
            c_in: 3,
            stem_out: 24,
            stem_padding: 1,
            stages: vec![
                Stage(Fused, 1, 3, 1, 24, 24, 2),
                Stage(Fused, 4, 3, 2, 24, 48, 4),
                Stage(Fused, 4, 3, 2, 48, 64, 4),
                Stage(Mb, 4, 3, 2, 64, 128, 6),
                Stage(Mb, 6, 3, 1, 128, 160, 9),
                Stage(Mb, 6, 3, 2, 160, 256, 15),
            ],
            last_channel: 1280,
            bn_eps: 1e-3,
        }
    }
}

impl EffNetConfig {
    /// Stages whose widths chain, odd kernels, strides ≥ 1.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("EfficientNet config: {m}")));
        let mut c = self.stem_out;
        for (i, s) in self.stages.iter().enumerate() {
            let Stage(_, e, k, stride, ci, co, layers) = *s;
            if ci != c {
                return bad(format!(
                    "stage {i} takes {ci} channels, the one before gives {c}"
                ));
            }
            if e == 0 || k % 2 == 0 || stride == 0 || co == 0 || layers == 0 {
                return bad(format!(
                    "stage {i}: expand ratio, stride, width and layers must be ≥ 1 and the kernel odd, got {s:?}"
                ));
            }
            c = co;
        }
        if self.c_in == 0 || self.stem_out == 0 || self.last_channel == 0 {
            return bad("zero channels".into());
        }
        Ok(())
    }

    /// Channels entering the head.
    fn head_in(&self) -> usize {
        self.stages.last().map_or(self.stem_out, |s| s.5)
    }
}

/// torchvision's `_make_divisible(v, 8)`: the nearest multiple of 8, at least 8, and not
/// more than 10 % below v.
pub fn make_divisible(v: usize) -> usize {
    let rounded = ((v + 4) / 8 * 8).max(8);
    if (rounded as f64) < 0.9 * v as f64 {
        rounded + 8
    } else {
        rounded
    }
}

/// A conv with its BatchNorm, recorded as one [`Conv2d`] on folded weights.
struct ConvBn<'a> {
    /// Prefix of the `Conv2dNormActivation`: the conv at `{p}0.weight`, the norm at `{p}1.*`.
    p: &'a str,
    shape: ConvShape,
    act: Act,
    /// A per-channel scale applied to the input (squeeze-and-excitation).
    gate: Option<TensorId>,
    /// Added to the output.
    residual: Option<TensorId>,
}

impl<'a> ConvBn<'a> {
    fn new(p: &'a str, shape: ConvShape, act: Act) -> Self {
        ConvBn {
            p,
            shape,
            act,
            gate: None,
            residual: None,
        }
    }

    /// A block's 1×1 projection: no activation.
    fn projection(p: &'a str, cin: usize, cout: usize) -> Self {
        Self::new(p, ConvShape::pointwise(cin, cout), Act::None)
    }

    fn plus(self, residual: Option<TensorId>) -> Self {
        ConvBn { residual, ..self }
    }
}

/// The keys and shapes of a BatchNorm's four tensors under `p`.
fn bn_sources(p: &str, c: usize) -> [(String, Vec<usize>); 4] {
    ["weight", "bias", "running_mean", "running_var"].map(|n| (format!("{p}1.{n}"), vec![c]))
}

/// The folded bias of the BatchNorm at `{p}1.*` (no conv bias: torchvision's convs have none).
fn folded_bias(mb: &mut ModelBuilder, p: &str, c: usize, eps: f64) -> Result<TensorId> {
    let bn = bn_sources(p, c);
    let sources: Vec<(&str, &[usize])> =
        bn.iter().map(|(k, s)| (k.as_str(), s.as_slice())).collect();
    mb.derived(
        &format!("{p}bn_folded.bias"),
        &[c],
        DType::F32,
        &sources,
        move |t| {
            let unit = HostTensor::new(vec![c, 1], vec![0.0; c]);
            Ok(fold_batchnorm(
                &unit,
                None,
                [&t[0].data, &t[1].data, &t[2].data, &t[3].data],
                eps,
            )
            .1)
        },
    )
}

/// The conv weight at `{p}0.weight` (`shape`, `[Cout, …]`) scaled by its BatchNorm, seen by
/// the graph as `graph_shape` in `dtype`.
fn folded_weight(
    mb: &mut ModelBuilder,
    p: &str,
    shape: &[usize],
    graph_shape: &[usize],
    dtype: DType,
    eps: f64,
) -> Result<TensorId> {
    let conv = format!("{p}0.weight");
    let bn = bn_sources(p, shape[0]);
    let mut sources: Vec<(&str, &[usize])> = vec![(conv.as_str(), shape)];
    sources.extend(bn.iter().map(|(k, s)| (k.as_str(), s.as_slice())));
    let gs = graph_shape.to_vec();
    mb.derived(
        &format!("{p}bn_folded.weight"),
        graph_shape,
        dtype,
        &sources,
        move |t| {
            let (w, _) = fold_batchnorm(
                &t[0],
                None,
                [&t[1].data, &t[2].data, &t[3].data, &t[4].data],
                eps,
            );
            Ok(w.reshaped(&gs))
        },
    )
}

fn conv_bn(mb: &mut ModelBuilder, x: TensorId, c: ConvBn, eps: f64) -> Result<TensorId> {
    let ConvShape {
        cin,
        cout,
        k,
        stride,
        pad,
    } = c.shape;
    let shape = [cout, cin, k, k];
    let w = folded_weight(mb, c.p, &shape, &shape, DType::BF16, eps)?;
    let b = folded_bias(mb, c.p, cout, eps)?;
    let mut inputs = vec![x, w, b];
    inputs.extend(c.gate);
    inputs.extend(c.residual);
    let op = Conv2d {
        k,
        stride,
        pad,
        bias: true,
        gate: c.gate.is_some(),
        residual: c.residual.is_some(),
        act: c.act,
        out: DType::BF16,
    };
    mb.g.op1(op, &inputs)
}

/// A conv's geometry: `Conv2d(cin, cout, k, stride, pad)`.
#[derive(Clone, Copy, Debug)]
pub struct ConvShape {
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvShape {
    /// A 1×1 conv, stride 1.
    pub fn pointwise(cin: usize, cout: usize) -> Self {
        ConvShape {
            cin,
            cout,
            k: 1,
            stride: 1,
            pad: 0,
        }
    }
}

/// torchvision's `Conv2dNormActivation` with SiLU at `{p}` (conv `{p}0.weight`, no bias; norm
/// `{p}1.*`): the stem and the head of the stack.
pub fn conv_bn_silu(
    mb: &mut ModelBuilder,
    p: &str,
    x: TensorId,
    s: ConvShape,
    eps: f64,
) -> Result<TensorId> {
    conv_bn(mb, x, ConvBn::new(p, s, Act::Silu), eps)
}

/// One block's shape: (expand ratio, kernel, stride, c_in, c_out).
#[derive(Clone, Copy, Debug)]
pub struct BlockShape {
    pub expand_ratio: usize,
    pub kernel: usize,
    pub stride: usize,
    pub c_in: usize,
    pub c_out: usize,
}

impl BlockShape {
    fn residual(&self) -> bool {
        self.stride == 1 && self.c_in == self.c_out
    }
}

/// torchvision's FusedMBConv at `{p}block.`: expand ratio 1 is one k×k conv-BN-SiLU
/// (`c_in → c_out`); otherwise a k×k conv-BN-SiLU to the expanded width, then a 1×1 conv-BN.
/// Plus the input when stride is 1 and the widths agree.
pub fn fused_mbconv(
    mb: &mut ModelBuilder,
    p: &str,
    x: TensorId,
    s: BlockShape,
    eps: f64,
) -> Result<TensorId> {
    let expanded = make_divisible(s.c_in * s.expand_ratio);
    let residual = s.residual().then_some(x);
    // The k×k conv: to c_out at ratio 1, else to the expanded width.
    let first = |cout| ConvShape {
        cin: s.c_in,
        cout,
        k: s.kernel,
        stride: s.stride,
        pad: (s.kernel - 1) / 2,
    };
    let p0 = format!("{p}block.0.");
    if expanded == s.c_in {
        let c = ConvBn::new(&p0, first(s.c_out), Act::Silu).plus(residual);
        return conv_bn(mb, x, c, eps);
    }
    let h = conv_bn(mb, x, ConvBn::new(&p0, first(expanded), Act::Silu), eps)?;
    let p1 = format!("{p}block.1.");
    let project = ConvBn::projection(&p1, expanded, s.c_out).plus(residual);
    conv_bn(mb, h, project, eps)
}

/// torchvision's MBConv at `{p}block.`: a 1×1 conv-BN-SiLU expansion (absent at ratio 1), a
/// depthwise k×k conv-BN-SiLU with the stride, squeeze-and-excitation (`max(1, c_in / 4)`
/// hidden units) and a 1×1 conv-BN projection that applies the SE scale to its input. Plus the
/// input when stride is 1 and the widths agree.
pub fn mbconv(
    mb: &mut ModelBuilder,
    p: &str,
    x: TensorId,
    s: BlockShape,
    eps: f64,
) -> Result<TensorId> {
    let expanded = make_divisible(s.c_in * s.expand_ratio);
    let squeeze = (s.c_in / 4).max(1);
    let mut layer = 0;
    let mut next = || {
        layer += 1;
        format!("{p}block.{}.", layer - 1)
    };
    let mut h = x;
    if expanded != s.c_in {
        let pe = next();
        let c = ConvBn::new(&pe, ConvShape::pointwise(s.c_in, expanded), Act::Silu);
        h = conv_bn(mb, h, c, eps)?;
    }
    let pd = next();
    let k = s.kernel;
    let dw_shape = [expanded, 1, k, k];
    let w = folded_weight(mb, &pd, &dw_shape, &[expanded, k * k], DType::F32, eps)?;
    let b = folded_bias(mb, &pd, expanded, eps)?;
    let dw = DwConv {
        k,
        stride: s.stride,
        pad: Pad::Zero,
        silu: true,
        out: DType::BF16,
    };
    h = mb.g.op1(dw, &[h, w, b])?;
    let ps = next();
    let fc1 = mb.weight_as(
        &format!("{ps}fc1.weight"),
        &[squeeze, expanded, 1, 1],
        &[squeeze, expanded],
        DType::F32,
    )?;
    let b1 = mb.weight(&format!("{ps}fc1.bias"), &[squeeze], DType::F32)?;
    let fc2 = mb.weight_as(
        &format!("{ps}fc2.weight"),
        &[expanded, squeeze, 1, 1],
        &[expanded, squeeze],
        DType::F32,
    )?;
    let b2 = mb.weight(&format!("{ps}fc2.bias"), &[expanded], DType::F32)?;
    let gate = mb.g.op1(SeGate, &[h, fc1, b1, fc2, b2])?;
    let pp = next();
    let project = ConvBn {
        gate: Some(gate),
        ..ConvBn::projection(&pp, expanded, s.c_out).plus(s.residual().then_some(x))
    };
    conv_bn(mb, h, project, eps)
}

/// The whole feature stack on `x` (`[B, H, W, c_in]`) under `prefix`: bf16 `[B, h, w,
/// last_channel]`.
pub fn features(
    mb: &mut ModelBuilder,
    prefix: &str,
    x: TensorId,
    cfg: &EffNetConfig,
) -> Result<TensorId> {
    cfg.validate()?;
    let stem = ConvShape {
        cin: cfg.c_in,
        cout: cfg.stem_out,
        k: 3,
        stride: 2,
        pad: cfg.stem_padding,
    };
    let mut h = conv_bn_silu(mb, &format!("{prefix}0."), x, stem, cfg.bn_eps)?;
    for (i, st) in cfg.stages.iter().enumerate() {
        let Stage(kind, e, k, stride, ci, co, layers) = *st;
        for j in 0..layers {
            let shape = BlockShape {
                expand_ratio: e,
                kernel: k,
                stride: if j == 0 { stride } else { 1 },
                c_in: if j == 0 { ci } else { co },
                c_out: co,
            };
            let p = format!("{prefix}{}.{j}.", i + 1);
            h = match kind {
                BlockKind::Fused => fused_mbconv(mb, &p, h, shape, cfg.bn_eps)?,
                BlockKind::Mb => mbconv(mb, &p, h, shape, cfg.bn_eps)?,
            };
        }
    }
    let p = format!("{prefix}{}.", cfg.stages.len() + 1);
    let head = ConvShape {
        cin: cfg.head_in(),
        cout: cfg.last_channel,
        k: 1,
        stride: 1,
        pad: 0,
    };
    conv_bn_silu(mb, &p, h, head, cfg.bn_eps)
}

/// The BatchNorm counters of a torch state dict (`{norm}.num_batches_tracked`, int64
/// scalars) beside each norm of `manifest`: stored by torch, never read.
pub fn batchnorm_counters(manifest: &super::Manifest) -> super::Manifest {
    manifest
        .iter()
        .filter_map(|(k, _)| k.strip_suffix(".running_mean"))
        .map(|norm| (format!("{norm}.num_batches_tracked"), vec![]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::manifest_of;

    #[test]
    fn make_divisible_matches_torchvision() {
        // torchvision: max(8, int(v + 4) // 8 * 8), plus 8 when that is under 0.9·v.
        for (v, want) in [
            (1, 8),
            (4, 8),
            (12, 16),
            (20, 24),
            (24, 24),
            (96, 96),
            (100, 104),
            (144, 144),
            (3, 8),
        ] {
            assert_eq!(make_divisible(v), want, "{v}");
        }
    }

    #[test]
    fn the_v2_s_manifest_has_torchvision_names_and_widths() {
        let cfg = EffNetConfig::default();
        let m = manifest_of(|mb| {
            let x = mb.g.input("x", &[1, 64, 64, 3], DType::F32)?;
            features(mb, "", x, &cfg).map(|_| ())
        })
        .unwrap();
        let get = |k: &str| m.iter().find(|(n, _)| n == k).map(|(_, s)| s.clone());
        assert_eq!(get("0.0.weight"), Some(vec![24, 3, 3, 3]));
        assert_eq!(get("1.0.block.0.0.weight"), Some(vec![24, 24, 3, 3]));
        assert_eq!(get("2.0.block.0.0.weight"), Some(vec![96, 24, 3, 3]));
        assert_eq!(get("2.0.block.1.0.weight"), Some(vec![48, 96, 1, 1]));
        assert_eq!(get("4.0.block.1.0.weight"), Some(vec![256, 1, 3, 3]));
        assert_eq!(get("4.0.block.2.fc1.weight"), Some(vec![16, 256, 1, 1]));
        assert_eq!(get("6.14.block.3.1.running_var"), Some(vec![256]));
        assert_eq!(get("7.0.weight"), Some(vec![1280, 256, 1, 1]));
        assert!(get("6.15.block.0.0.weight").is_none());
        // torchvision's efficientnet_v2_s().features: 20,177,488 parameters (BN buffers apart).
        let params: usize = m
            .iter()
            .filter(|(k, _)| !k.ends_with("running_mean") && !k.ends_with("running_var"))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(params, 20_177_488);
    }

    #[test]
    fn chained_widths_are_checked() {
        let mut cfg = EffNetConfig::default();
        cfg.stages[2].4 = 40;
        assert!(cfg.validate().unwrap_err().to_string().contains("stage 2"));
    }
}
