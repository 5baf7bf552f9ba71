//! Stage benchmarks (`ultrapixel bench --stages`): every graph of a generation at its real
//! shapes, with random weights of the real sizes (the same work as the released model),
//! timed on the device; per part the time per run, the achieved tensor-core rate, and the
//! end-to-end estimate (time × runs per image, summed). Memory is the plan's, printed beside.

use super::{hash, uniform};
use crate::ops::noise::noise_key;
use crate::ops::sampler::{timesteps, StepCoefficients};
use crate::pipeline::open_models::Configs;
use crate::pipeline::plan::{memory_plan, stage_graphs, StageGraph};
use crate::pipeline::Size;
use crate::runtime::device::{Device, KernelSession, WeightCache};
use crate::runtime::graph::{Cost, Graph};
use crate::runtime::session::{Session, SessionOptions, WeightSource};
use crate::tensor::{numel, HostTensor};
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::Arc;

/// One part of a generation, timed.
pub struct PartTiming {
    pub stage: crate::pipeline::stages::StageId,
    pub part: &'static str,
    pub runs: usize,
    pub seconds: f64,
    pub flops: f64,
}

impl PartTiming {
    pub fn line(&self) -> String {
        let rate = if self.flops > 0.0 {
            format!("{:>7.1} TFLOP/s", self.flops / self.seconds / 1e12)
        } else {
            String::new()
        };
        format!(
            "{:<13} {:<20} {:>10.3} ms × {:>3} = {:>9.1} ms  {rate}",
            self.stage,
            self.part,
            self.seconds * 1e3,
            self.runs,
            self.seconds * 1e3 * self.runs as f64
        )
    }
}

/// Times every part of a generation at `size` (Stage C / Stage B steps as given) on
/// `device`, `iters` replays each; weights are shared through `cache` across calls.
pub fn time_stages(
    device: &Arc<dyn Device>,
    cfg: &Configs,
    size: Size,
    steps: (usize, usize),
    iters: usize,
    cache: &WeightCache,
) -> Result<Vec<PartTiming>> {
    let mut out = Vec::new();
    for StageGraph {
        stage,
        part,
        graph,
        runs,
    } in stage_graphs(cfg, size, steps)?
    {
        let (seconds, cost) = time_graph(device, graph, iters, cache)?;
        out.push(PartTiming {
            stage,
            part,
            runs,
            seconds,
            flops: cost.flops,
        });
    }
    Ok(out)
}

/// Device seconds per run of `graph` with random weights of its shapes and valid inputs,
/// and its work.
pub fn time_graph(
    device: &Arc<dyn Device>,
    graph: Graph,
    iters: usize,
    cache: &WeightCache,
) -> Result<(f64, Cost)> {
    let weights = RandomWeights::of(&graph);
    let inputs = inputs_of(&graph);
    let mut s = KernelSession::new(
        device.clone(),
        graph,
        &weights,
        SessionOptions::default(),
        Some(cache),
    )?;
    for (id, v) in &inputs {
        s.set_input(*id, v)?;
    }
    let cost = s.cost();
    Ok((s.time(iters)?, cost))
}

/// Prints the stage benchmark of each size.
pub fn print(device: &Arc<dyn Device>, cfg: &Configs, sizes: &[Size], iters: usize) -> Result<()> {
    println!("device: {}", device.describe());
    let cache = WeightCache::new();
    for &size in sizes {
        let parts = time_stages(device, cfg, size, (20, 10), iters, &cache)?;
        println!("\n{size}: 20 Stage C steps per pass, 10 Stage B steps, CFG batch 2");
        for p in &parts {
            println!("{}", p.line());
        }
        let total: f64 = parts.iter().map(|p| p.seconds * p.runs as f64).sum();
        let plan = memory_plan(cfg, size, Some(device.as_ref()))?;
        println!(
            "end to end (device time, one image): {:.2} s; planned peak memory {} MiB (weights \
             freed per stage) / {} MiB (kept)",
            total,
            plan.sequential_peak() >> 20,
            plan.resident_peak() >> 20
        );
    }
    Ok(())
}

/// Random weights of a graph's shapes: uniform with the variance of N(0, 1/fan_in) for
/// matrices, small for vectors (biases, norm shifts). Values only need the right scale: the
/// benchmark measures work, not images.
struct RandomWeights {
    shapes: HashMap<String, Vec<usize>>,
}

impl RandomWeights {
    fn of(graph: &Graph) -> Self {
        RandomWeights {
            shapes: graph
                .weights()
                .map(|(_, d)| (d.name.clone(), d.shape.clone()))
                .collect(),
        }
    }
}

impl WeightSource for RandomWeights {
    fn tensor(&self, name: &str) -> Result<HostTensor> {
        let shape = self
            .shapes
            .get(name)
            .ok_or_else(|| Error::Weights(format!("no weight {name}")))?;
        let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
        let scale = if shape.len() > 1 {
            (3.0 / fan_in as f32).sqrt()
        } else {
            0.1
        };
        Ok(HostTensor::new(
            shape.clone(),
            uniform(hash(name), numel(shape), scale),
        ))
    }
}

/// Values for every input of a graph, valid where the kernels need them to be (token ids,
/// positions, masks, sampler coefficients, the noise key), random elsewhere.
fn inputs_of(graph: &Graph) -> Vec<(crate::runtime::graph::TensorId, Vec<f32>)> {
    let step = StepCoefficients::ddpm(timesteps(20)[10], timesteps(20)[11])
        .expect("a schedule step")
        .row();
    graph
        .inputs()
        .map(|(id, d)| {
            let n = d.numel();
            let v = match d.name.as_str() {
                "coef" => step.repeat(n / 5),
                "noise_key" => noise_key(1, 0, 0).to_vec(),
                "input_ids" => (0..n).map(|i| (i % 49_000) as f32).collect(),
                "attention_mask" => vec![1.0; n],
                "pooled_position" => vec![76.0; n],
                "r" => vec![0.5; n],
                _ => uniform(hash(&d.name), n, 1.0),
            };
            (id, v)
        })
        .collect()
}
