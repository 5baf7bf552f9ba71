//! The typed op graph: tensors (shape, dtype, role) and nodes (one fused op each). Model code
//! records its forward pass here; it never touches memory or launches. The contract every op
//! implements ([`OpImpl`]: shapes, reference, launches, cost) lives here too: the graph, the
//! planner and the executors use it, the op families in `ops` implement it.

use crate::runtime::kernel_choice::KernelChoice;
use crate::runtime::launch::{Args, Launch};
use crate::tensor::{numel, DType, HostTensor};
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(pub u32);

impl TensorId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Written by the caller before each run.
    Input,
    /// A parameter, bound by name to a weight source; lives outside the arena.
    Weight,
    /// Produced by a node.
    Activation,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorDesc {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub role: Role,
}

impl TensorDesc {
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub op: Arc<dyn OpImpl>,
    pub inputs: Vec<TensorId>,
    pub outputs: Vec<TensorId>,
    /// Scratch bytes the node's kernels need while it runs.
    pub workspace: usize,
    pub label: String,
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub tensors: Vec<TensorDesc>,
    pub nodes: Vec<Node>,
    /// Tensors the caller reads after a run; they stay live until the end of the graph.
    pub outputs: Vec<TensorId>,
    /// Inputs written once and read by every run (conditioning, cached guidance): their
    /// memory is never reused, so they keep their values between runs.
    pub constants: Vec<TensorId>,
    by_name: HashMap<String, TensorId>,
    scope: Vec<String>,
    /// The kernel family choice the launches are built under instead of `UPX_KERNELS`
    /// (`runtime::kernel_choice`); None: the environment's, read when a session places the
    /// graph (the node workspaces are then the portable kernels' until it does).
    kernels: Option<KernelChoice>,
}

impl Graph {
    pub fn new() -> Self {
        Graph::default()
    }

    /// The graph's own kernel choice (None: `UPX_KERNELS`).
    pub fn kernels(&self) -> Option<KernelChoice> {
        self.kernels
    }

    /// Builds this graph's launches under `choice` instead of `UPX_KERNELS` (None: the
    /// environment's), with every node's workspace sized for it.
    pub fn set_kernels(&mut self, choice: Option<KernelChoice>) {
        self.kernels = choice;
        let kernels = choice.unwrap_or_default();
        for node in &mut self.nodes {
            let descs: Vec<&TensorDesc> = node
                .inputs
                .iter()
                .map(|&i| &self.tensors[i.index()])
                .collect();
            node.workspace = node.op.workspace_bytes(&descs, kernels);
        }
    }

    pub fn desc(&self, id: TensorId) -> &TensorDesc {
        &self.tensors[id.index()]
    }

    pub fn shape(&self, id: TensorId) -> &[usize] {
        &self.tensors[id.index()].shape
    }

    /// A hash of everything that decides what the graph computes and how it is placed: its
    /// tensors (names, shapes, dtypes, roles), its nodes (ops with every parameter, wiring,
    /// workspaces, labels), outputs, constants and kernel choice. Equal graphs, built twice, hash equal.
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        use std::io::Write;
        let mut h = Sha256::new();
        // Debug output is exact for every field (floats print in round-trip form) and in
        // order (no hash maps: `by_name` is derived from `tensors`).
        write!(
            h,
            "{:?}|{:?}|{:?}|{:?}|{:?}",
            self.tensors, self.nodes, self.outputs, self.constants, self.kernels
        )
        .expect("hashing never fails");
        h.finalize().into()
    }

    pub fn find(&self, name: &str) -> Option<TensorId> {
        self.by_name.get(name).copied()
    }

    /// Looks up a named tensor, with an error naming it.
    pub fn get(&self, name: &str) -> Result<TensorId> {
        self.find(name)
            .ok_or_else(|| Error::InvalidArgument(format!("the graph has no tensor named {name}")))
    }

    fn push(&mut self, desc: TensorDesc) -> Result<TensorId> {
        let id = TensorId(self.tensors.len() as u32);
        if self.by_name.insert(desc.name.clone(), id).is_some() {
            return Err(Error::InvalidArgument(format!(
                "graph: the tensor name {} is used twice",
                desc.name
            )));
        }
        self.tensors.push(desc);
        Ok(id)
    }

    pub fn input(&mut self, name: &str, shape: &[usize], dtype: DType) -> Result<TensorId> {
        self.push(TensorDesc {
            name: name.to_string(),
            shape: shape.to_vec(),
            dtype,
            role: Role::Input,
        })
    }

    /// An input that keeps its value across runs (see [`Graph::constants`]).
    pub fn constant_input(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: DType,
    ) -> Result<TensorId> {
        let id = self.input(name, shape, dtype)?;
        self.constants.push(id);
        Ok(id)
    }

    /// A parameter bound by `name` to the weight source. Asking twice for the same name
    /// returns the same tensor (shared weights), provided shape and dtype agree.
    pub fn weight(&mut self, name: &str, shape: &[usize], dtype: DType) -> Result<TensorId> {
        if let Some(id) = self.find(name) {
            let d = self.desc(id);
            if d.role != Role::Weight || d.shape != shape || d.dtype != dtype {
                return Err(Error::Weights(format!(
                    "weight {name} requested as {shape:?} {dtype:?} but already recorded as {:?} {:?} ({:?})",
                    d.shape, d.dtype, d.role
                )));
            }
            return Ok(id);
        }
        self.push(TensorDesc {
            name: name.to_string(),
            shape: shape.to_vec(),
            dtype,
            role: Role::Weight,
        })
    }

    /// Records `op` applied to `inputs`; returns its outputs.
    pub fn op(&mut self, op: impl OpImpl + 'static, inputs: &[TensorId]) -> Result<Vec<TensorId>> {
        self.op_shared(Arc::new(op), inputs)
    }

    /// [`Self::op`] for an op another graph already holds.
    pub fn op_shared(&mut self, op: Arc<dyn OpImpl>, inputs: &[TensorId]) -> Result<Vec<TensorId>> {
        let descs: Vec<&TensorDesc> = inputs.iter().map(|&i| self.desc(i)).collect();
        let specs = op.infer(&descs)?;
        let workspace = op.workspace_bytes(&descs, self.kernels.unwrap_or_default());
        let label = self.label(op.name());
        let mut outputs = Vec::with_capacity(specs.len());
        for (k, (shape, dtype)) in specs.into_iter().enumerate() {
            let name = format!("{label}:{k}");
            outputs.push(self.push(TensorDesc {
                name,
                shape,
                dtype,
                role: Role::Activation,
            })?);
        }
        self.nodes.push(Node {
            op,
            inputs: inputs.to_vec(),
            outputs: outputs.clone(),
            workspace,
            label,
        });
        Ok(outputs)
    }

    /// Records a single-output op.
    pub fn op1(&mut self, op: impl OpImpl + 'static, inputs: &[TensorId]) -> Result<TensorId> {
        let out = self.op(op, inputs)?;
        match out.as_slice() {
            [one] => Ok(*one),
            _ => Err(Error::InvalidArgument(format!(
                "op1 used for an op with {} outputs",
                out.len()
            ))),
        }
    }

    /// Marks `id` as a graph output readable after a run, under an extra name.
    pub fn output(&mut self, id: TensorId, name: &str) -> Result<()> {
        if self.by_name.insert(name.to_string(), id).is_some() {
            return Err(Error::InvalidArgument(format!(
                "graph: the output name {name} is used twice"
            )));
        }
        if !self.outputs.contains(&id) {
            self.outputs.push(id);
        }
        Ok(())
    }

    /// Runs `f` with `name` appended to the label scope of the nodes it records.
    pub fn scoped<R>(&mut self, name: &str, f: impl FnOnce(&mut Self) -> R) -> R {
        self.scope.push(name.to_string());
        let r = f(self);
        self.scope.pop();
        r
    }

    fn label(&self, op: &str) -> String {
        let n = self.nodes.len();
        if self.scope.is_empty() {
            format!("{op}#{n}")
        } else {
            format!("{}/{op}#{n}", self.scope.join("."))
        }
    }

    /// Tensors with the Weight role.
    pub fn weights(&self) -> impl Iterator<Item = (TensorId, &TensorDesc)> {
        self.ids().filter(|(_, d)| d.role == Role::Weight)
    }

    pub fn inputs(&self) -> impl Iterator<Item = (TensorId, &TensorDesc)> {
        self.ids().filter(|(_, d)| d.role == Role::Input)
    }

    /// The work of one of this graph's nodes (for benchmarks).
    pub fn node_cost(&self, node: &Node) -> Cost {
        let ins: Vec<_> = node.inputs.iter().map(|&t| self.desc(t)).collect();
        let outs: Vec<_> = node.outputs.iter().map(|&t| self.desc(t)).collect();
        node.op.cost(&ins, &outs)
    }

    /// The work of one run: every node's.
    pub fn cost(&self) -> Cost {
        self.nodes
            .iter()
            .map(|n| self.node_cost(n))
            .fold(Cost::default(), |a, b| a + b)
    }

    fn ids(&self) -> impl Iterator<Item = (TensorId, &TensorDesc)> {
        self.tensors
            .iter()
            .enumerate()
            .map(|(i, d)| (TensorId(i as u32), d))
    }
}

/// Shape and dtype of one output.
pub type OutSpec = (Vec<usize>, DType);

/// A fused op. Layout convention: activations are channels-last (`[B, H, W, C]` or
/// `[B, N, C]`); "rows" are everything but the last axis.
pub trait OpImpl: AsAny + std::fmt::Debug + Send + Sync {
    fn name(&self) -> &'static str;

    /// Validates the inputs and returns the outputs' shapes and dtypes.
    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>>;

    /// Scratch memory the kernels need while the node runs, with its launches built under
    /// `kernels` (`runtime::kernel_choice`).
    fn workspace_bytes(&self, _inputs: &[&TensorDesc], _kernels: KernelChoice) -> usize {
        0
    }

    /// The f32 reference: fills every element of `outputs` (pre-shaped, poisoned with NaN).
    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()>;

    /// The kernel launches that compute the op on the given device buffers.
    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>>;

    /// For an op with a Hopper kernel (`runtime::kernel_choice`): why its launches for `io`
    /// take the portable kernel although `io.target` allows the Hopper one. None where they
    /// take it, where the target does not allow it, and for ops without one.
    fn sm90a_fallback(&self, _io: &LaunchIo) -> Result<Option<String>> {
        Ok(None)
    }

    /// Whether the op's one output is its first input's bytes as they are (same dtype, same
    /// row-major order, another shape): the planner then places the output on the input's
    /// block where that is in the arena, and the op launches nothing when its output and input
    /// pointers coincide (`runtime::planner`).
    fn is_view(&self) -> bool {
        false
    }

    /// Work of one execution, for benchmarks: tensor-core FLOPs and the bytes the op must
    /// move at least (by default every input and output once).
    fn cost(&self, inputs: &[&TensorDesc], outputs: &[&TensorDesc]) -> Cost {
        Cost {
            flops: 0.0,
            bytes: inputs.iter().chain(outputs).map(|d| d.bytes() as f64).sum(),
        }
    }
}

/// The concrete op behind a `dyn OpImpl` (benchmarks read an attention node's heads).
pub trait AsAny {
    fn as_any(&self) -> &dyn std::any::Any;
}

impl<T: std::any::Any> AsAny for T {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// FLOPs and bytes of one op execution.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    pub flops: f64,
    pub bytes: f64,
}

impl std::ops::Add for Cost {
    type Output = Cost;
    fn add(self, o: Cost) -> Cost {
        Cost {
            flops: self.flops + o.flops,
            bytes: self.bytes + o.bytes,
        }
    }
}

/// A tensor placed in device memory (a host address under the emulator).
#[derive(Clone, Copy, Debug)]
pub struct DevTensor<'a> {
    pub ptr: u64,
    pub desc: &'a TensorDesc,
}

pub struct LaunchIo<'a> {
    pub inputs: Vec<DevTensor<'a>>,
    pub outputs: Vec<DevTensor<'a>>,
    pub workspace: u64,
    /// What the launches are for (backend, GPU): decides where a Hopper kernel may run
    /// (`runtime::kernel_choice`). The default builds portable launches.
    pub target: super::kernel_choice::KernelTarget,
}

impl LaunchIo<'_> {
    /// Arguments starting with every input pointer, then every output pointer: the
    /// parameter order of most kernels.
    pub fn tensor_args(&self) -> Args {
        self.inputs
            .iter()
            .chain(&self.outputs)
            .fold(Args::new(), |a, t| a.ptr(t.ptr))
    }
}
