//! Running a graph: the executor-independent interface. A session binds one graph to one
//! backend (its weights uploaded, its arena planned) and runs it any number of times.

use super::graph::{Graph, TensorId};
use crate::tensor::HostTensor;
use crate::{Error, Result};
use std::collections::HashMap;

/// Where sessions get parameter values from, by the names the graph recorded.
pub trait WeightSource {
    fn tensor(&self, name: &str) -> Result<HostTensor>;
}

impl WeightSource for HashMap<String, HostTensor> {
    fn tensor(&self, name: &str) -> Result<HostTensor> {
        self.get(name)
            .cloned()
            .ok_or_else(|| Error::Weights(format!("missing weight {name}")))
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct SessionOptions {
    /// Fill device memory with 0xFF (NaN in f32 and bf16) before the first run, so elements
    /// a kernel forgets to write show up in comparisons.
    pub poison: bool,
}

pub trait Session {
    fn graph(&self) -> &Graph;

    /// Writes an input (f32 values, converted to the tensor's dtype).
    fn set_input(&mut self, id: TensorId, data: &[f32]) -> Result<()>;

    fn run(&mut self) -> Result<()>;

    /// Reads a graph output (or input) as f32.
    fn read(&mut self, id: TensorId) -> Result<Vec<f32>>;

    /// Activation memory of one run in bytes (the arena size on the kernel backends).
    fn arena_bytes(&self) -> usize;
}

/// Shared argument check for `set_input`.
pub(crate) fn check_input(graph: &Graph, id: TensorId, len: usize) -> Result<()> {
    let d = graph.desc(id);
    if d.role != super::graph::Role::Input {
        return Err(Error::InvalidArgument(format!(
            "{} is not a graph input",
            d.name
        )));
    }
    if d.numel() != len {
        return Err(Error::InvalidArgument(format!(
            "input {} has shape {:?} ({} values) but {len} values were given",
            d.name,
            d.shape,
            d.numel()
        )));
    }
    Ok(())
}

/// Loads a weight and checks it against the graph's declaration.
pub(crate) fn load_weight(
    graph: &Graph,
    id: TensorId,
    weights: &dyn WeightSource,
) -> Result<HostTensor> {
    let d = graph.desc(id);
    let t = weights.tensor(&d.name)?;
    if t.shape != d.shape {
        return Err(Error::Weights(format!(
            "{}: expected shape {:?}, found {:?}",
            d.name, d.shape, t.shape
        )));
    }
    Ok(t)
}
