//! Stage C (docs/MODEL.md §2.2) with UltraPixel's guidance (§3): the conditioning tokens, the
//! embedding, the down and up levels of ResBlock / TimestepBlock / AttnBlock, the scalers and
//! `clf`. The same graph serves the low-resolution pass (optionally capturing the four
//! guidance maps) and the guided high-resolution pass, and takes a ControlNet's maps
//! ([`ControlInjection`]).

use super::blocks::{
    attn_block, linear, ln_conv, norm, normalized_tokens, res_block, sin_embedding, timestep_block,
    token_mapper,
};
use super::config::StageCConfig;
use super::inr;
use super::ModelBuilder;
use crate::ops::elementwise::Add;
use crate::ops::gemm::Gemm;
use crate::ops::layout::Cast;
use crate::ops::resample::ResizeBilinear;
use crate::runtime::graph::TensorId;
use crate::tensor::DType;
use crate::{Error, Result};

/// The four guidance sites, in the order of [`Guidance::Guided`] and
/// [`StageCOutputs::features`]: after the first AttnBlock of down level 0, down level 1, up
/// block 0 (the deepest level) and up block 1.
pub const GUIDE_SITES: [&str; 4] = ["lr_enc.0", "lr_enc.1", "lr_dec.0", "lr_dec.1"];

/// The INR module of each site (checkpoint prefixes).
pub const GUIDE_MODULES: [&str; 4] = ["agg_net.0.", "agg_net.1.", "agg_net_up.0.", "agg_net_up.1."];

/// Where a guided site's high-resolution reconstruction comes from.
#[derive(Clone, Copy, Debug)]
pub enum GuideSource {
    /// The low-resolution feature map (bf16 `[B, h, w, C]`): the INR module runs whole.
    Features(TensorId),
    /// Its step-invariant part, precomputed by [`inr::reconstruct`] (f32 `[B, H, W, C]`).
    Reconstructed(TensorId),
}

/// What the pass does at the four guidance sites.
#[derive(Clone, Copy, Debug)]
pub enum Guidance {
    None,
    /// Low-resolution pass: expose the four maps in [`StageCOutputs::features`].
    Capture,
    /// High-resolution pass: each site adds its INR guide; the up sites scale it by κ.
    Guided {
        sources: [GuideSource; 4],
        kappa: f32,
    },
}

/// UltraPixel's up-path guide weight κ for a latent of `area` = H·W tokens (docs/MODEL.md §3.4):
/// thresholds on the area, ≥ 96² → 0.7, ≥ 72² → 0.5, else 0.3.
pub fn guide_scale(area: usize) -> f32 {
    if area >= 96 * 96 {
        0.7
    } else if area >= 72 * 72 {
        0.5
    } else {
        0.3
    }
}

/// A ControlNet's maps added to Stage C's residual stream, as the official `_down_encode` /
/// `_up_decode` do with a `ControlNetDeliverer`: one counter runs over the ResBlock visits,
/// down levels then up levels in forward order; before visit n, when map n exists,
/// `x += weight·bilinear(map n → x's size, align_corners=True)` (the official script scales
/// the maps by the control weight, then the model resizes them). Only a pass without LR
/// guidance injects: UltraPixel's HR pass skips it (`cnet is not None and lr_guide is None`).
#[derive(Clone, Debug)]
pub struct ControlInjection {
    /// f32 `[B, h, w, c_hidden]` per visit, None where the ControlNet delivers nothing.
    pub maps: Vec<Option<TensorId>>,
    /// The control strength (the official script's `control_weight`, 0.7 by default).
    pub weight: f32,
}

/// The official script's default control strength (`test_controlnet.py --control_weight`).
pub const DEFAULT_CONTROL_WEIGHT: f32 = 0.7;

/// Stage C's text and image conditions: bf16 `[B, 77, c_clip_text]`,
/// `[B, 1, c_clip_text_pooled]`, `[B, 1, c_clip_img]`.
#[derive(Clone, Copy, Debug)]
pub struct ClipInputs {
    pub clip_text: TensorId,
    pub clip_text_pooled: TensorId,
    pub clip_img: TensorId,
}

/// Stage C's inputs, all recorded by the caller.
#[derive(Clone, Copy, Debug)]
pub struct StageCInputs {
    /// bf16 `[B, H, W, c_in]`.
    pub x: TensorId,
    /// f32 `[B]`: the noise condition.
    pub r: TensorId,
    pub clip: ClipInputs,
}

pub struct StageCOutputs {
    /// f32 `[B, H, W, c_out]`: the ε prediction.
    pub out: TensorId,
    /// The four guidance maps (f32 `[B, H, W, width]`), when captured.
    pub features: Option<[TensorId; 4]>,
}

/// Stage C's conditioning tokens (docs/MODEL.md §2.2 step 2): the text mapper per token, the pooled
/// and image mappers as `c_clip_seq` consecutive tokens each, then LayerNorm:
/// `[B, 77 + 2·seq, c_cond]`.
pub fn clip_tokens(
    mb: &mut ModelBuilder,
    cfg: &StageCConfig,
    inputs: &ClipInputs,
    out: DType,
) -> Result<TensorId> {
    let cc = cfg.c_cond;
    let mut tokens = token_mapper(
        mb,
        "clip_txt_mapper",
        inputs.clip_text,
        (cc, cfg.c_clip_text),
        1,
    )?;
    tokens.extend(token_mapper(
        mb,
        "clip_txt_pooled_mapper",
        inputs.clip_text_pooled,
        (cc, cfg.c_clip_text_pooled),
        cfg.c_clip_seq,
    )?);
    tokens.extend(token_mapper(
        mb,
        "clip_img_mapper",
        inputs.clip_img,
        (cc, cfg.c_clip_img),
        cfg.c_clip_seq,
    )?);
    normalized_tokens(mb, &tokens, out)
}

/// Records Stage C's forward pass.
pub fn stage_c(
    mb: &mut ModelBuilder,
    cfg: &StageCConfig,
    inputs: &StageCInputs,
    guidance: Guidance,
) -> Result<StageCOutputs> {
    stage_c_controlled(mb, cfg, inputs, guidance, None)
}

/// Records Stage C's forward pass with a ControlNet's maps (ignored by a guided pass, as in
/// the official code).
pub fn stage_c_controlled(
    mb: &mut ModelBuilder,
    cfg: &StageCConfig,
    inputs: &StageCInputs,
    guidance: Guidance,
    control: Option<&ControlInjection>,
) -> Result<StageCOutputs> {
    cfg.validate()?;
    let control = control.filter(|_| !matches!(guidance, Guidance::Guided { .. }));
    let mut visit = 0;
    let (widths, k) = (&cfg.c_hidden, cfg.kernel_size);
    let depth = widths.len();
    if !matches!(guidance, Guidance::None) && depth != 2 {
        return Err(Error::InvalidArgument(format!(
            "UltraPixel guidance needs the two-level Stage C, this one has {depth} levels"
        )));
    }
    let inr_cfg = match (guidance, &cfg.inr) {
        (Guidance::Guided { .. }, None) => {
            return Err(Error::InvalidArgument(
                "guided Stage C needs the INR module sizes (_init_extra_parameter.TransInr)".into(),
            ))
        }
        (_, c) => c.clone(),
    };
    let xs = mb.g.shape(inputs.x).to_vec();
    let (hh, ww) = (xs[1], xs[2]);
    let clip = clip_tokens(mb, cfg, &inputs.clip, DType::BF16)?;

    // emb(r): the TimestepBlocks' input (their zero conditions fold into the biases) and the
    // INR modules' time embedding.
    let emb = sin_embedding(mb, inputs.r, cfg.c_r)?;
    let emb = mb.g.op1(Cast { out: DType::BF16 }, &[emb])?;

    let e = linear(
        mb,
        "embedding.1",
        inputs.x,
        (widths[0], cfg.c_in),
        true,
        Gemm::linear(DType::F32),
        None,
    )?;
    let mut x = mb.g.op1(norm(DType::F32), &[e])?;

    let mut features: [Option<TensorId>; 4] = [None; 4];
    // One level's block list; `skip` goes to its first ResBlock, `site` is the guidance site
    // right after its first AttnBlock.
    let mut run_level = |mb: &mut ModelBuilder,
                         prefix: &str,
                         x: TensorId,
                         level: usize,
                         count: usize,
                         mut skip: Option<TensorId>,
                         site: usize|
     -> Result<TensorId> {
        let letters: Vec<char> = cfg.level_config[level].chars().collect();
        let c = widths[level];
        let mut x = x;
        let mut site_done = false;
        for j in 0..count {
            for (l, letter) in letters.iter().enumerate() {
                let p = format!("{prefix}.{}.", j * letters.len() + l);
                if *letter == 'C' {
                    if let Some(ctl) = control {
                        x = inject(mb, x, ctl, visit)?;
                    }
                    visit += 1;
                }
                x = match letter {
                    'C' => res_block(mb, &p, x, skip.take(), c, k)?,
                    'T' => timestep_block(mb, &p, x, emb, c, cfg.c_r, &cfg.t_conds)?,
                    _ => attn_block(mb, &p, x, clip, cfg.c_cond, cfg.nhead[level])?,
                };
                if *letter == 'A' && !site_done {
                    site_done = true;
                    x = guide_site(mb, guidance, inr_cfg.as_ref(), site, x, emb, (hh, ww))?;
                    if matches!(guidance, Guidance::Capture) {
                        features[site] = Some(x);
                    }
                }
            }
        }
        Ok(x)
    };
    let mut skips = Vec::new();
    for level in 0..depth {
        if level > 0 {
            let key = format!("down_downscalers.{level}.1.blocks.0");
            x = ln_conv(mb, &key, x, widths[level - 1], widths[level])?;
        }
        let count = cfg.blocks[0][level];
        x = run_level(
            mb,
            &format!("down_blocks.{level}"),
            x,
            level,
            count,
            None,
            level,
        )?;
        skips.push(x);
    }
    for (u, level) in (0..depth).rev().enumerate() {
        let skip = (u > 0).then(|| skips[level]);
        let count = cfg.blocks[1][u];
        x = run_level(mb, &format!("up_blocks.{u}"), x, level, count, skip, 2 + u)?;
        if level > 0 {
            let key = format!("up_upscalers.{u}.1.blocks.1");
            x = ln_conv(mb, &key, x, widths[level], widths[level - 1])?;
        }
    }
    let out = ln_conv(mb, "clf.1", x, widths[0], cfg.c_out)?;
    let features = match (guidance, features) {
        (Guidance::Capture, [Some(a), Some(b), Some(c), Some(d)]) => Some([a, b, c, d]),
        (Guidance::Capture, _) => {
            return Err(Error::InvalidArgument(
                "feature capture needs an AttnBlock in every level".into(),
            ))
        }
        _ => None,
    };
    Ok(StageCOutputs { out, features })
}

/// `x + weight·resize(map visit)` when the ControlNet delivers a map for this ResBlock visit.
fn inject(
    mb: &mut ModelBuilder,
    x: TensorId,
    ctl: &ControlInjection,
    visit: usize,
) -> Result<TensorId> {
    let Some(Some(map)) = ctl.maps.get(visit).copied() else {
        return Ok(x);
    };
    let xs = mb.g.shape(x).to_vec();
    let ms = mb.g.shape(map).to_vec();
    if ms[0] != xs[0] || ms[3] != xs[3] {
        return Err(Error::shape(
            "control injection",
            format!(
                "control map {visit} is {ms:?}; Stage C's stream there is {xs:?} (batch and channels must agree)"
            ),
        ));
    }
    let map = if ms[1..3] == xs[1..3] {
        map
    } else {
        let resize = ResizeBilinear {
            h: xs[1],
            w: xs[2],
            out: DType::F32,
        };
        mb.g.op1(resize, &[map])?
    };
    mb.g.op1(
        Add {
            alpha: ctl.weight,
            out: DType::F32,
        },
        &[x, map],
    )
}

/// The guidance at `site`: x, or x + (κ ·) guide.
fn guide_site(
    mb: &mut ModelBuilder,
    guidance: Guidance,
    cfg: Option<&super::config::InrConfig>,
    site: usize,
    x: TensorId,
    temb: TensorId,
    hr_size: (usize, usize),
) -> Result<TensorId> {
    let (Guidance::Guided { sources, kappa }, Some(cfg)) = (guidance, cfg) else {
        return Ok(x);
    };
    let prefix = GUIDE_MODULES[site];
    let hr = match sources[site] {
        GuideSource::Features(lr) => inr::reconstruct(mb, prefix, cfg, lr, hr_size)?,
        GuideSource::Reconstructed(hr) => hr,
    };
    let guide = inr::fuse(mb, prefix, cfg, hr, x, temb)?;
    let alpha = if site < 2 { 1.0 } else { kappa };
    mb.g.op1(
        Add {
            alpha,
            out: DType::F32,
        },
        &[x, guide],
    )
}

/// The checkpoint keys Stage C reads: the base network, or with `guided` also the four INR
/// modules (recorded on a 2×2 latent; no key depends on the size).
pub fn manifest(cfg: &StageCConfig, guided: bool) -> Result<super::Manifest> {
    super::manifest_of(|mb| {
        let (bf, f32t) = (DType::BF16, DType::F32);
        let x = mb.g.input("x", &[1, 2, 2, cfg.c_in], bf)?;
        let r = mb.g.input("r", &[1], f32t)?;
        let clip = ClipInputs {
            clip_text: mb.g.input("clip_text", &[1, 77, cfg.c_clip_text], bf)?,
            clip_text_pooled: mb.g.input(
                "clip_text_pooled",
                &[1, 1, cfg.c_clip_text_pooled],
                bf,
            )?,
            clip_img: mb.g.input("clip_img", &[1, 1, cfg.c_clip_img], bf)?,
        };
        let guidance = if guided {
            let mut sources = Vec::new();
            for (site, level) in GUIDE_SITES.iter().zip([0, 1, 1, 0]) {
                let f = mb.g.input(site, &[1, 2, 2, cfg.c_hidden[level]], bf)?;
                sources.push(GuideSource::Features(f));
            }
            Guidance::Guided {
                sources: sources.try_into().expect("four sites"),
                kappa: 1.0,
            }
        } else {
            Guidance::None
        };
        stage_c(mb, cfg, &StageCInputs { x, r, clip }, guidance).map(|_| ())
    })
}

/// Keys of the released UltraPixel file that the forward pass never reads (docs/MODEL.md §3.3: the
/// scale-aware norm's `alpha` and `gamma` convolutions), with their shapes.
pub fn unused_guidance_keys(cfg: &StageCConfig) -> super::Manifest {
    let Some(inr) = &cfg.inr else {
        return Vec::new();
    };
    let ind = inr.ind;
    GUIDE_MODULES
        .iter()
        .flat_map(|m| {
            ["alpha", "gamma"].into_iter().flat_map(move |conv| {
                [
                    (format!("{m}hr_norm.{conv}.weight"), vec![ind, ind, 1, 1]),
                    (format!("{m}hr_norm.{conv}.bias"), vec![ind]),
                ]
            })
        })
        .collect()
}
