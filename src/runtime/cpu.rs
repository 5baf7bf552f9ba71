//! The cpu executor: runs every node's f32 reference. Slow and exact; the oracle for the
//! kernels and the golden cases.

use super::graph::{Graph, Role, TensorId};
use super::session::{check_input, load_weight, Session, WeightSource};
use crate::tensor::HostTensor;
use crate::{Error, Result};

pub struct CpuSession {
    graph: Graph,
    values: Vec<Option<HostTensor>>,
    /// For each node, the tensors whose last use it is (freed after it runs).
    frees: Vec<Vec<TensorId>>,
    peak: usize,
}

impl CpuSession {
    pub fn new(graph: Graph, weights: &dyn WeightSource) -> Result<Self> {
        let mut values = vec![None; graph.tensors.len()];
        for (id, _) in graph.weights() {
            values[id.index()] = Some(load_weight(&graph, id, weights)?);
        }
        let mut last = vec![None; graph.tensors.len()];
        for (i, n) in graph.nodes.iter().enumerate() {
            for &t in &n.inputs {
                last[t.index()] = Some(i);
            }
        }
        let mut frees = vec![Vec::new(); graph.nodes.len()];
        for (t, l) in last.iter().enumerate() {
            let id = TensorId(t as u32);
            let d = graph.desc(id);
            if let Some(i) = l {
                if d.role == Role::Activation && !graph.outputs.contains(&id) {
                    frees[*i].push(id);
                }
            }
        }
        Ok(CpuSession {
            graph,
            values,
            frees,
            peak: 0,
        })
    }
}

impl Session for CpuSession {
    fn graph(&self) -> &Graph {
        &self.graph
    }

    fn set_input(&mut self, id: TensorId, data: &[f32]) -> Result<()> {
        check_input(&self.graph, id, data.len())?;
        let shape = self.graph.desc(id).shape.clone();
        self.values[id.index()] = Some(HostTensor::new(shape, data.to_vec()));
        Ok(())
    }

    fn run(&mut self) -> Result<()> {
        let mut live = 0usize;
        for (i, node) in self.graph.nodes.iter().enumerate() {
            let mut outs: Vec<HostTensor> = node
                .outputs
                .iter()
                .map(|&o| HostTensor::full(&self.graph.desc(o).shape, f32::NAN))
                .collect();
            {
                let ins: Vec<&HostTensor> = node
                    .inputs
                    .iter()
                    .map(|&t| {
                        self.values[t.index()].as_ref().ok_or_else(|| {
                            Error::InvalidArgument(format!(
                                "{}: input {} was not set",
                                node.label,
                                self.graph.desc(t).name
                            ))
                        })
                    })
                    .collect::<Result<_>>()?;
                node.op.reference(&ins, &mut outs)?;
            }
            for (&o, v) in node.outputs.iter().zip(outs) {
                live += v.numel() * 4;
                self.values[o.index()] = Some(v);
            }
            self.peak = self.peak.max(live);
            for &t in &self.frees[i] {
                if let Some(v) = self.values[t.index()].take() {
                    live -= v.numel() * 4;
                }
            }
        }
        Ok(())
    }

    fn read(&mut self, id: TensorId) -> Result<Vec<f32>> {
        self.values[id.index()]
            .as_ref()
            .map(|v| v.data.clone())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{} has no value: not an output, or the graph has not run",
                    self.graph.desc(id).name
                ))
            })
    }

    fn arena_bytes(&self) -> usize {
        self.peak
    }
}
