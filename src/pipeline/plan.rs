//! Planning a generation before anything runs: the latent sizes of an output size, every
//! graph a generation places on the device at its real shapes, and the device memory of each
//! stage (weights + activation arena). `info` and `bench` use it without a model; the
//! pipeline uses it to decide where weights live.

use super::open_models::Configs;
use super::request::Size;
use super::stages::{
    StageADecode, StageBRun, StageCConditions, StageCRun, StageCShapes, StageId, STAGE_A_TILE,
};
use crate::runtime::device::{node_scratch, Device};
use crate::runtime::graph::{Cost, Graph, Role};
use crate::runtime::planner::{self, ALIGN};
use crate::sampling_loop::{Guidance, NoiseSource};
use crate::tensor::HostTensor;
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap, HashSet};

/// The latent sizes of an output size (docs/MODEL.md §1.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatentSizes {
    /// Stage C's high-resolution latent: ceil(side / 42.67).
    pub stage_c: (usize, usize),
    /// The low-resolution guide pass: the ≈1024²-pixel size of the same aspect ratio.
    pub stage_c_lr: (usize, usize),
    /// Stage B's latent: ceil(side / 4).
    pub stage_b: (usize, usize),
}

/// Stage C's compression factor, as the reference writes it.
const STAGE_C_FACTOR: f64 = 42.67;
const STAGE_A_FACTOR: f64 = 4.0;

impl LatentSizes {
    pub fn of(size: Size) -> LatentSizes {
        let (h, w) = (size.height as f64, size.width as f64);
        let c = |v: f64| (v / STAGE_C_FACTOR).ceil() as usize;
        // get_target_lr_size(H / W, std_size 32): sides of 32·int(32·√r) and 32·int(32/√r).
        let ratio = (h / w).sqrt();
        let (lr_h, lr_w) = (32.0 * (32.0 * ratio).trunc(), 32.0 * (32.0 / ratio).trunc());
        LatentSizes {
            stage_c: (c(h), c(w)),
            stage_c_lr: (c(lr_h), c(lr_w)),
            stage_b: (
                (h / STAGE_A_FACTOR).ceil() as usize,
                (w / STAGE_A_FACTOR).ceil() as usize,
            ),
        }
    }
}

/// One stage's device memory.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StagePlan {
    pub stage: StageId,
    pub weight_bytes: u64,
    /// The largest activation arena of its graphs.
    pub arena_bytes: u64,
    /// Its graphs' arenas added up: what its sessions hold when kept for the next request.
    pub arenas_sum_bytes: u64,
}

/// Device memory of a request, before anything is allocated.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MemoryPlan {
    pub stages: Vec<StagePlan>,
}

impl MemoryPlan {
    /// Peak with each stage's weights dropped after it ran.
    pub fn sequential_peak(&self) -> u64 {
        self.stages
            .iter()
            .map(|s| s.weight_bytes + s.arena_bytes)
            .max()
            .unwrap_or(0)
    }

    /// Peak with the sampling stages' weights resident together (the text encoder runs
    /// once, first, and is always dropped).
    pub fn resident_peak(&self) -> u64 {
        let (text, rest) = self.stages.split_first().expect("a plan has stages");
        let weights: u64 = rest.iter().map(|s| s.weight_bytes).sum();
        let arena = rest.iter().map(|s| s.arena_bytes).max().unwrap_or(0);
        (weights + arena).max(text.weight_bytes + text.arena_bytes)
    }

    /// Peak with the sampling stages' weights resident and their sessions kept between
    /// requests (Stage C, B and A; the text encoder and a ControlNet are placed anew each
    /// time): the kept arenas, plus one more arena for whatever runs beside them.
    pub fn reuse_peak(&self) -> u64 {
        let kept =
            |s: &&StagePlan| matches!(s.stage, StageId::StageC | StageId::StageB | StageId::StageA);
        let (mut weights, mut arenas, mut largest) = (0, 0, 0);
        for s in &self.stages[1..] {
            weights += s.weight_bytes;
            largest = largest.max(s.arena_bytes);
        }
        for s in self.stages.iter().filter(kept) {
            arenas += s.arenas_sum_bytes;
        }
        (weights + arenas + largest).max(self.resident_peak())
    }
}

/// One graph a generation places on the device, and how often it runs per image.
pub struct StageGraph {
    pub stage: StageId,
    pub part: &'static str,
    pub graph: Graph,
    pub runs: usize,
}

/// Every graph of a generation at `size` with these networks, at its real shapes (no
/// weights read), with its runs per image for `steps` = (Stage C, Stage B) steps.
pub fn stage_graphs(cfg: &Configs, size: Size, steps: (usize, usize)) -> Result<Vec<StageGraph>> {
    let sizes = LatentSizes::of(size);
    let none: HashMap<String, HostTensor> = HashMap::new();
    let shapes = stage_c_shapes(cfg, &sizes);
    let conditions = StageCConditions::zeros(&cfg.stage_c, 2);
    let unguided = Guidance { cfg: 1.0, rho: 0.0 };
    let stage_c = StageCRun {
        weights: &none,
        cfg: &cfg.stage_c,
        conditions: &conditions,
        steps: steps.0,
        guidance: unguided,
        shift: 1.0,
        control: None,
    };
    let (hc, wc) = sizes.stage_c;
    let effnet = HostTensor::zeros(&[2, hc, wc, cfg.stage_c.c_out]);
    let clip = HostTensor::zeros(&[2, 1, cfg.stage_b.c_clip]);
    let stage_b = StageBRun {
        weights: &none,
        cfg: &cfg.stage_b,
        effnet: &effnet,
        clip: &clip,
        steps: steps.1,
        guidance: unguided,
    };
    let decode = StageADecode {
        weights: &none,
        cfg: &cfg.stage_a,
        tile: STAGE_A_TILE,
    };
    let (hb, wb) = sizes.stage_b;
    let source = NoiseSource::Device;
    let [lr, reconstruct, hr]: [Graph; 3] = stage_c
        .graphs(shapes, source)?
        .try_into()
        .map_err(|_| Error::InvalidArgument("Stage C records three graphs".into()))?;
    let graph = |stage, part, graph, runs| StageGraph {
        stage,
        part,
        graph,
        runs,
    };
    Ok(vec![
        graph(
            StageId::TextEncoder,
            "prompt + negative",
            super::stages::text_graph(&cfg.text, 2)?,
            1,
        ),
        graph(StageId::StageC, "low-res step", lr, steps.0),
        graph(StageId::StageC, "INR reconstruction", reconstruct, 1),
        graph(StageId::StageC, "high-res step", hr, steps.0),
        graph(
            StageId::StageB,
            "step",
            stage_b.graph(stage_b_shape(cfg, &sizes), source)?,
            steps.1,
        ),
        graph(
            StageId::StageA,
            "tile",
            decode.graph([1, hb, wb])?,
            decode.tiles(hb, wb),
        ),
    ])
}

/// The work of one op kind in one stage over a whole generation.
#[derive(Clone, Debug, PartialEq)]
pub struct OpWork {
    pub stage: StageId,
    pub op: &'static str,
    /// Executions per image.
    pub runs: usize,
    /// Tensor-core FLOPs and the bytes the op must move at least, per image.
    pub cost: Cost,
}

/// Per stage and op kind, the work of a generation at `size` ([`stage_graphs`] with `steps`:
/// every node's [`Cost`] times its graph's runs per image), most bytes first. A view (a
/// reshape of an activation, which the planner places on its input) moves nothing.
pub fn work_by_op(cfg: &Configs, size: Size, steps: (usize, usize)) -> Result<Vec<OpWork>> {
    let mut work: BTreeMap<(StageId, &'static str), OpWork> = BTreeMap::new();
    for sg in stage_graphs(cfg, size, steps)? {
        let holder = planner::holders(&sg.graph);
        for node in &sg.graph.nodes {
            let view = node.outputs.iter().any(|o| holder[o.index()] != o.index());
            let cost = if view {
                Cost::default()
            } else {
                sg.graph.node_cost(node)
            };
            let (stage, op) = (sg.stage, node.op.name());
            let w = work.entry((stage, op)).or_insert(OpWork {
                stage,
                op,
                runs: 0,
                cost: Cost::default(),
            });
            w.runs += sg.runs;
            w.cost = w.cost
                + Cost {
                    flops: cost.flops * sg.runs as f64,
                    bytes: cost.bytes * sg.runs as f64,
                };
        }
    }
    let mut work: Vec<OpWork> = work.into_values().collect();
    work.sort_by(|a, b| b.cost.bytes.total_cmp(&a.cost.bytes));
    Ok(work)
}

/// The device memory of a generation at `size` with these networks, stage by stage: every
/// graph recorded at its real shapes and planned, no weights read; with `device`, the scratch
/// it needs for the nodes it runs its own way (vendor GEMMs) counted in the arenas.
pub fn memory_plan(cfg: &Configs, size: Size, device: Option<&dyn Device>) -> Result<MemoryPlan> {
    let graphs = stage_graphs(cfg, size, (1, 1))?;
    let mut names: Vec<StageId> = graphs.iter().map(|g| g.stage).collect();
    names.dedup();
    // A stage's graphs share their weights (one cache) and run one at a time.
    let stages = names
        .into_iter()
        .map(|stage| {
            let of_stage = graphs.iter().filter(|g| g.stage == stage).map(|g| &g.graph);
            stage_plan(stage, of_stage, device)
        })
        .collect();
    Ok(MemoryPlan { stages })
}

/// Stage C's latent shapes (channels-last, batch 1).
pub(super) fn stage_c_shapes(cfg: &Configs, sizes: &LatentSizes) -> StageCShapes {
    let c = cfg.stage_c.c_in;
    let (h, w) = sizes.stage_c;
    let (lh, lw) = sizes.stage_c_lr;
    StageCShapes {
        lr: [1, lh, lw, c],
        hr: [1, h, w, c],
    }
}

/// Stage B's latent shape (channels-last, batch 1).
pub(super) fn stage_b_shape(cfg: &Configs, sizes: &LatentSizes) -> [usize; 4] {
    let (h, w) = sizes.stage_b;
    [1, h, w, cfg.stage_b.c_in]
}

/// The memory of one stage: its distinct weights (as uploaded) and its largest arena.
pub(super) fn stage_plan<'a>(
    stage: StageId,
    graphs: impl Iterator<Item = &'a Graph>,
    device: Option<&dyn Device>,
) -> StagePlan {
    let mut seen = HashSet::new();
    let mut weight_bytes = 0u64;
    let (mut arena_bytes, mut arenas_sum_bytes) = (0u64, 0u64);
    for g in graphs {
        for d in g.tensors.iter().filter(|d| d.role == Role::Weight) {
            if seen.insert((d.name.clone(), d.shape.clone(), d.dtype)) {
                weight_bytes += d.bytes().div_ceil(ALIGN) as u64 * ALIGN as u64;
            }
        }
        let plan = match device {
            Some(d) => {
                let scratch = node_scratch(d, g);
                planner::plan_with_scratch(g, &|i| scratch[i])
            }
            None => planner::plan(g),
        };
        arena_bytes = arena_bytes.max(plan.peak as u64);
        arenas_sum_bytes += plan.peak as u64;
    }
    StagePlan {
        stage,
        weight_bytes,
        arena_bytes,
        arenas_sum_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latent_sizes_follow_the_reference_table() {
        // (H, W) → Stage C HR latent, LR latent, Stage B latent (docs/MODEL.md §1.3).
        for (h, w, c, lr, b) in [
            (1024, 1024, (24, 24), (24, 24), (256, 256)),
            (2048, 2048, (48, 48), (24, 24), (512, 512)),
            (2560, 5120, (60, 120), (17, 34), (640, 1280)),
            (2304, 4096, (54, 96), (18, 32), (576, 1024)),
            (2160, 3840, (51, 90), (18, 32), (540, 960)),
            (4096, 4096, (96, 96), (24, 24), (1024, 1024)),
        ] {
            let s = LatentSizes::of(Size::new(w, h).unwrap());
            assert_eq!((s.stage_c, s.stage_c_lr, s.stage_b), (c, lr, b), "{w}x{h}");
        }
    }

    #[test]
    fn plans_add_weights_and_the_largest_arena() {
        let stage = |stage, weight_bytes, arena_bytes, arenas_sum_bytes| StagePlan {
            stage,
            weight_bytes,
            arena_bytes,
            arenas_sum_bytes,
        };
        let mut plan = MemoryPlan {
            stages: vec![
                stage(StageId::TextEncoder, 50, 5, 5),
                stage(StageId::StageC, 100, 30, 45),
                stage(StageId::StageB, 20, 60, 60),
            ],
        };
        assert_eq!(plan.sequential_peak(), 130);
        assert_eq!(plan.resident_peak(), 120 + 60);
        // Kept sessions: every Stage C and B arena, plus the largest for what runs beside.
        assert_eq!(plan.reuse_peak(), 120 + 45 + 60 + 60);
        // A ControlNet's weights stay resident, its arena is never kept.
        plan.stages
            .insert(1, stage(StageId::ControlNet, 7, 90, 200));
        assert_eq!(plan.reuse_peak(), 127 + 45 + 60 + 90);
        // Never below the resident peak (a text encoder larger than everything else).
        plan.stages[0] = stage(StageId::TextEncoder, 1000, 5, 5);
        assert_eq!(plan.reuse_peak(), 1005);
    }

    #[test]
    fn work_by_op_adds_every_node_once_and_views_move_nothing() {
        let cfg = Configs {
            text: Default::default(),
            stage_c: Default::default(),
            stage_b: Default::default(),
            stage_a: Default::default(),
        };
        let size = Size::new(1024, 1536).unwrap();
        let work = work_by_op(&cfg, size, (3, 2)).unwrap();
        assert!(work.windows(2).all(|w| w[0].cost.bytes >= w[1].cost.bytes));
        let (mut flops, mut bytes, mut views, mut tiles) = (0.0, 0.0, 0.0, 0);
        for g in stage_graphs(&cfg, size, (3, 2)).unwrap() {
            if g.stage == StageId::StageA {
                tiles = g.runs;
            }
            let c = g.graph.cost();
            flops += c.flops * g.runs as f64;
            bytes += c.bytes * g.runs as f64;
            for n in g.graph.nodes.iter().filter(|n| n.op.name() == "reshape") {
                views += g.graph.node_cost(n).bytes * g.runs as f64;
            }
        }
        let total = work.iter().fold(Cost::default(), |a, w| a + w.cost);
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b;
        assert!(close(total.flops, flops), "{} vs {flops}", total.flops);
        assert!(views > 0.0 && close(total.bytes, bytes - views));
        let find = |stage, op| {
            work.iter()
                .find(|w| (w.stage, w.op) == (stage, op))
                .unwrap()
        };
        assert_eq!(find(StageId::StageC, "reshape").cost, Cost::default());
        // Stage A's upsampler once per tile (two at this size), Stage B's three upscalers at
        // each of its 2 steps.
        let up = find(StageId::StageA, "conv_transpose2d");
        assert!(
            up.cost.flops > 0.0 && up.runs == tiles && tiles == 2,
            "{up:?}"
        );
        assert_eq!(find(StageId::StageB, "conv_transpose2d").runs, 3 * 2);
    }
}
