//! The ControlNet of a request: run once on the control map, its maps then fed to every
//! Stage C step graph that injects them ([`ControlMaps::record`]), and its memory. The
//! super-resolution ControlNet's map is the image's EfficientNet latent, doubled
//! ([`encode`]).

use crate::control::super_resolution::{double_nearest, encoder_image, encoder_size};
use crate::models::controlnet::{controlnet, ControlNetConfig};
use crate::models::effnet_encoder::{encoder, normalized_input, EffNetEncoderConfig};
use crate::models::stage_c::ControlInjection;
use crate::models::{Checkpoint, ModelBuilder};
use crate::pipeline::plan::{stage_plan, MemoryPlan};
use crate::pipeline::request::Size;
use crate::pipeline::stages::{RunContext, StageId};
use crate::runtime::device::Device;
use crate::runtime::graph::{Graph, TensorId};
use crate::tensor::{DType, HostTensor};
use crate::{Error, Result};

/// Constant inputs of a graph and their values.
pub type ConstantValues = Vec<(TensorId, Vec<f32>)>;

/// The ControlNet's output for one control map, and the strength it is added with.
#[derive(Clone, Debug)]
pub struct ControlMaps {
    /// f32 `[1, h, w, c_proj]` per ResBlock visit (None where nothing is delivered).
    pub maps: Vec<Option<HostTensor>>,
    pub strength: f32,
}

impl ControlMaps {
    /// Records the maps as constant inputs of a step graph whose batch has `rows` rows (the
    /// CFG batch: the official script gives the unconditional rows the same maps); returns
    /// the injection and the values to set.
    pub fn record(
        &self,
        mb: &mut ModelBuilder,
        rows: usize,
    ) -> Result<(ControlInjection, ConstantValues)> {
        let mut maps = Vec::with_capacity(self.maps.len());
        let mut values = Vec::new();
        for (visit, map) in self.maps.iter().enumerate() {
            let Some(map) = map else {
                maps.push(None);
                continue;
            };
            let mut shape = map.shape.clone();
            shape[0] = rows;
            let id =
                mb.g.constant_input(&format!("cnet.{visit}"), &shape, DType::F32)?;
            values.push((id, map.data.repeat(rows)));
            maps.push(Some(id));
        }
        let injection = ControlInjection {
            maps,
            weight: self.strength,
        };
        Ok((injection, values))
    }
}

/// The ControlNet's graph on a `[c, h, w]` control map: the input and the maps.
fn recording(
    cfg: &ControlNetConfig,
    (h, w): (usize, usize),
) -> Result<(ModelBuilder, TensorId, Vec<Option<TensorId>>)> {
    let mut mb = ModelBuilder::new();
    let x = mb.g.input("control", &[1, h, w, cfg.c_in], DType::F32)?;
    let maps = controlnet(&mut mb, cfg, x)?;
    for (i, m) in maps.iter().enumerate() {
        if let Some(id) = m {
            mb.g.output(*id, &format!("cnet.{i}"))?;
        }
    }
    Ok((mb, x, maps))
}

/// The encoder's graph on an RGB image of `(h, w)`: the input and the latent.
fn encoder_recording(
    cfg: &EffNetEncoderConfig,
    (h, w): (usize, usize),
) -> Result<(ModelBuilder, TensorId, TensorId)> {
    let mut mb = ModelBuilder::new();
    let x = mb.g.input("image", &[1, h, w, 3], DType::F32)?;
    let z = encoder(&mut mb, cfg, x)?;
    mb.g.output(z, "latent")?;
    Ok((mb, x, z))
}

/// The super-resolution ControlNet's map for an output of `size`: `image` (`[3, h, w]` in
/// [0, 1]) at half that size, through the EfficientNet encoder, the latent doubled:
/// `[c_latent, h', w']`.
pub fn encode(
    ctx: &RunContext,
    weights: &dyn Checkpoint,
    cfg: &EffNetEncoderConfig,
    image: &HostTensor,
    size: Size,
) -> Result<HostTensor> {
    let small = encoder_image(image, (size.height as usize, size.width as usize));
    let (h, w) = (small.shape[1], small.shape[2]);
    let (mb, x, z) = encoder_recording(cfg, (h, w))?;
    let shape = mb.g.shape(z).to_vec();
    let mut session = ctx.session(mb, weights)?;
    session.set_input(x, &normalized_input(&small))?;
    session.run()?;
    let hwc = session.read(z)?;
    let (lh, lw, c) = (shape[1], shape[2], shape[3]);
    // Channels first.
    let chw = (0..c)
        .flat_map(|k| (0..lh * lw).map(move |i| (k, i)))
        .map(|(k, i)| hwc[i * c + k])
        .collect();
    Ok(double_nearest(&HostTensor::new(vec![c, lh, lw], chw)))
}

/// Runs the ControlNet on `map` (`[c_in, h, w]`: an image-like map in [0, 1], or the
/// super-resolution ControlNet's latent).
pub fn run(
    ctx: &RunContext,
    weights: &dyn Checkpoint,
    cfg: &ControlNetConfig,
    map: &HostTensor,
    strength: f32,
) -> Result<ControlMaps> {
    let [c, h, w] = map.shape[..] else {
        return Err(Error::shape(
            "ControlNet",
            "the control map must be [c, h, w]",
        ));
    };
    if c != cfg.c_in {
        return Err(Error::shape(
            "ControlNet",
            format!(
                "the control map has {c} channels, the ControlNet reads {}",
                cfg.c_in
            ),
        ));
    }
    let (mb, x, ids) = recording(cfg, (h, w))?;
    let shapes: Vec<Option<Vec<usize>>> = ids
        .iter()
        .map(|id| id.map(|id| mb.g.shape(id).to_vec()))
        .collect();
    let mut session = ctx.session(mb, weights)?;
    // Channels last.
    let hwc: Vec<f32> = (0..h * w)
        .flat_map(|i| (0..c).map(move |k| map.data[k * h * w + i]))
        .collect();
    session.set_input(x, &hwc)?;
    session.run()?;
    let mut maps = Vec::with_capacity(ids.len());
    for (id, shape) in ids.iter().zip(shapes) {
        maps.push(match (id, shape) {
            (Some(id), Some(shape)) => Some(HostTensor::new(shape, session.read(*id)?)),
            _ => None,
        });
    }
    Ok(ControlMaps { maps, strength })
}

/// Adds the ControlNet of a generation at `size` to `plan`: its weights and arena (with the
/// encoder's, which runs before it, when it has one) as a stage of its own (it runs once,
/// before Stage C), and its maps, held by Stage C's step graphs for the CFG batch, to Stage
/// C's arena. A Canny or inpainting map is taken at the output's aspect ratio (short side
/// 768); a super-resolution one is the doubled latent of half the output.
pub fn add_to_plan(
    plan: &mut MemoryPlan,
    cfg: &ControlNetConfig,
    encoder_cfg: Option<&EffNetEncoderConfig>,
    size: Size,
    device: Option<&dyn Device>,
) -> Result<()> {
    let (oh, ow) = (size.height as usize, size.width as usize);
    let mut graphs = Vec::new();
    let (h, w) = match encoder_cfg {
        Some(e) => {
            let (mb, _, z) = encoder_recording(e, encoder_size(oh, ow))?;
            let s = mb.g.shape(z).to_vec();
            graphs.push(mb.finish().0);
            (2 * s[1], 2 * s[2])
        }
        None => {
            crate::control::resize::control_size(oh, ow, crate::control::resize::CONTROL_SHORT_SIDE)
        }
    };
    let (mb, _, ids) = recording(cfg, (h, w))?;
    let map_bytes: u64 = ids
        .iter()
        .flatten()
        .map(|&id| 2 * 4 * mb.g.shape(id).iter().product::<usize>() as u64)
        .sum();
    let graph: Graph = mb.finish().0;
    graphs.push(graph);
    let own = stage_plan(StageId::ControlNet, graphs.iter(), device);
    let c = plan
        .stages
        .iter_mut()
        .find(|s| s.stage == StageId::StageC)
        .ok_or_else(|| Error::InvalidArgument("a plan has Stage C".into()))?;
    c.arena_bytes += map_bytes;
    // Kept sessions: the LR step graph holds them, and an HR one past the guided steps.
    c.arenas_sum_bytes += 2 * map_bytes;
    let at = plan
        .stages
        .iter()
        .position(|s| s.stage == StageId::StageC)
        .unwrap_or(plan.stages.len());
    plan.stages.insert(at, own);
    Ok(())
}
