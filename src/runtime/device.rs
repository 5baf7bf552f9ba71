//! What the kernel executors (hostsim and cuda) share: device memory, launching, and the
//! session that places a graph in one arena and replays its launch list.

use super::graph::{Graph, Node, Role, TensorDesc, TensorId};
use super::kernel_choice::{KernelChoice, KernelTarget};
use super::launch::{Entry, Launch};
use super::planner::{self, ArenaPlan, ALIGN};
use super::session::{check_input, load_weight, Session, SessionOptions, WeightSource};
use crate::runtime::graph::{DevTensor, LaunchIo};
use crate::tensor::DType;
use crate::tensor::{decode, encode};
use crate::{Error, Result};
use std::any::Any;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// An owned device allocation; freed when dropped.
pub struct DeviceBuffer {
    pub ptr: u64,
    pub bytes: usize,
    /// Frees the memory on drop.
    _owner: Box<dyn Any + Send + Sync>,
}

impl DeviceBuffer {
    pub fn new(ptr: u64, bytes: usize, owner: Box<dyn Any + Send + Sync>) -> Self {
        DeviceBuffer {
            ptr,
            bytes,
            _owner: owner,
        }
    }
}

/// The launches of one graph, in order (our kernels, and on the cuda backend the vendor calls
/// the tuning table chose for some GEMMs), with the node label of each (for error messages),
/// and backend state kept between runs (a captured CUDA graph).
pub struct LaunchList {
    pub launches: Vec<Entry>,
    pub labels: Vec<String>,
    pub replay: Option<Box<dyn Any + Send>>,
}

pub trait Device: Send + Sync {
    /// Human-readable description (device name, compute capability).
    fn describe(&self) -> String;
    fn alloc(&self, bytes: usize) -> Result<DeviceBuffer>;
    fn write(&self, dst: u64, data: &[u8]) -> Result<()>;
    /// Uploads `data` to `dst` beside the work in flight, for memory no enqueued work
    /// touches (weights placed ahead of their sessions, from any thread); done once
    /// [`Device::finish_uploads`] returns. By default a plain [`Device::write`].
    fn upload(&self, dst: u64, data: &[u8]) -> Result<()> {
        self.write(dst, data)
    }
    /// Waits for every [`Device::upload`].
    fn finish_uploads(&self) -> Result<()> {
        Ok(())
    }
    fn read(&self, src: u64, out: &mut [u8]) -> Result<()>;
    fn fill(&self, dst: u64, byte: u8, len: usize) -> Result<()>;
    /// Runs every launch of the list in order; returns when they are done.
    fn execute(&self, list: &mut LaunchList) -> Result<()>;

    /// What launches are built for on this device (`runtime::kernel_choice`): the default
    /// (no backend) builds portable launches only.
    fn kernel_target(&self) -> KernelTarget {
        KernelTarget::default()
    }

    /// Scratch bytes [`Device::substitute`] needs to run `node` in a graph built for
    /// `choice` (0: it runs the op's own launches).
    fn substitute_scratch(
        &self,
        _node: &Node,
        _inputs: &[&TensorDesc],
        _choice: KernelChoice,
    ) -> usize {
        0
    }

    /// Entries that replace a node's own launches (a vendor GEMM the tuning table chose, with
    /// our epilogue pass), writing the node's outputs, with `scratch` bytes of
    /// [`Device::substitute_scratch`] at that address; None: the op's own launches. Only the
    /// cuda backend substitutes; the choice is fixed per device, so runs stay bit-identical.
    fn substitute(
        &self,
        _node: &Node,
        _io: &LaunchIo,
        _scratch: u64,
    ) -> Result<Option<Vec<Entry>>> {
        Ok(None)
    }

    /// Seconds per execution of the list, averaged over `iters` back-to-back runs (device
    /// time where the device can measure it, else wall time).
    fn time(&self, list: &mut LaunchList, iters: usize) -> Result<f64> {
        let start = std::time::Instant::now();
        for _ in 0..iters {
            self.execute(list)?;
        }
        Ok(start.elapsed().as_secs_f64() / iters.max(1) as f64)
    }
}

/// Weights already on the device, shared by the sessions of one stage (its low- and
/// high-resolution step graphs read the same Stage C weights): keyed by graph weight name,
/// shape and dtype. Dropping the cache (and its sessions) frees them.
#[derive(Default)]
pub struct WeightCache {
    entries: Mutex<HashMap<WeightKey, (Arc<DeviceBuffer>, u64)>>,
}

type WeightKey = (String, Vec<usize>, DType);

impl WeightCache {
    pub fn new() -> Self {
        WeightCache::default()
    }

    /// Forgets every weight; the memory is freed once no session holds it.
    pub fn clear(&self) {
        self.entries.lock().expect("weight cache lock").clear();
    }

    /// Uploads the weights of `graph` that are not here yet, so that the sessions placed
    /// later find them (the next stage's, while this one runs).
    pub fn upload(
        &self,
        device: &dyn Device,
        graph: &Graph,
        weights: &dyn WeightSource,
    ) -> Result<()> {
        let mut ptrs = vec![0; graph.tensors.len()];
        place_weights(
            device,
            graph,
            weights,
            Some(self),
            &mut ptrs,
            UploadOrder::Ahead,
        )?;
        device.finish_uploads()
    }

    /// Device bytes the cached weights occupy.
    pub fn bytes(&self) -> usize {
        let entries = self.entries.lock().expect("weight cache lock");
        let mut seen = std::collections::HashSet::new();
        entries
            .values()
            .filter(|(b, _)| seen.insert(b.ptr))
            .map(|(b, _)| b.bytes)
            .sum()
    }
}

/// How weights reach the device: in order with the kernels ([`Device::write`]), or beside
/// them, ahead of the session that reads them ([`Device::upload`]).
#[derive(Clone, Copy, PartialEq)]
enum UploadOrder {
    InOrder,
    Ahead,
}

/// Points `ptrs` at the weights of `graph`: those in `cache` from there, the others uploaded
/// in one allocation (and added to `cache`). Returns the buffers they live in.
fn place_weights(
    device: &dyn Device,
    graph: &Graph,
    weights: &dyn WeightSource,
    cache: Option<&WeightCache>,
    ptrs: &mut [u64],
    order: UploadOrder,
) -> Result<Vec<Arc<DeviceBuffer>>> {
    let mut held = Vec::new();
    let mut missing = Vec::new();
    {
        let entries = cache.map(|c| c.entries.lock().expect("weight cache lock"));
        for (id, d) in graph.weights() {
            match entries.as_ref().and_then(|e| e.get(&weight_key(d))) {
                Some((buf, off)) => {
                    ptrs[id.index()] = buf.ptr + off;
                    held.push(buf.clone());
                }
                None => missing.push(id),
            }
        }
    }
    // The weights not cached yet, in one allocation.
    let mut woffs = Vec::with_capacity(missing.len());
    let mut total = 0usize;
    for &id in &missing {
        woffs.push(total);
        total += graph.desc(id).bytes().div_ceil(ALIGN) * ALIGN;
    }
    if total > 0 {
        let buf = Arc::new(device.alloc(total)?);
        for (&id, &off) in missing.iter().zip(&woffs) {
            let t = load_weight(graph, id, weights)?;
            let ptr = buf.ptr + off as u64;
            let bytes = encode(&t.data, graph.desc(id).dtype);
            match order {
                UploadOrder::InOrder => device.write(ptr, &bytes)?,
                UploadOrder::Ahead => device.upload(ptr, &bytes)?,
            }
            ptrs[id.index()] = ptr;
        }
        if let Some(cache) = cache {
            let mut entries = cache.entries.lock().expect("weight cache lock");
            for (&id, &off) in missing.iter().zip(&woffs) {
                entries.insert(weight_key(graph.desc(id)), (buf.clone(), off as u64));
            }
        }
        held.push(buf);
    }
    Ok(held)
}

fn weight_key(d: &super::graph::TensorDesc) -> WeightKey {
    (d.name.clone(), d.shape.clone(), d.dtype)
}

pub struct KernelSession {
    device: Arc<dyn Device>,
    graph: Graph,
    plan: ArenaPlan,
    _arena: DeviceBuffer,
    /// The weight buffers this session reads (its own, or shared through a cache).
    _weights: Vec<Arc<DeviceBuffer>>,
    ptrs: Vec<u64>,
    list: LaunchList,
}

impl KernelSession {
    /// Places `graph` on `device`: one arena for its activations; its weights from `cache`
    /// where they are already uploaded, the others uploaded (in one allocation) and added to
    /// it.
    pub fn new(
        device: Arc<dyn Device>,
        graph: Graph,
        weights: &dyn WeightSource,
        opts: SessionOptions,
        cache: Option<&WeightCache>,
    ) -> Result<Self> {
        let (graph, target) = resolve_kernels(Cow::Owned(graph), device.kernel_target())?;
        let graph = graph.into_owned();
        // The scratch of the nodes the device runs its own way (vendor GEMMs) is planned in the
        // arena like a workspace; without the memory for it, they run our kernels.
        let scratch = node_scratch(device.as_ref(), &graph);
        let with_scratch = planner::plan_with_scratch(&graph, &|i| scratch[i]);
        let (plan, arena, substitute) = match device.alloc(with_scratch.peak.max(ALIGN)) {
            Ok(arena) => (with_scratch, arena, true),
            Err(e) if scratch.iter().any(|&b| b > 0) => {
                let plan = planner::plan(&graph);
                eprintln!(
                    "warning: no memory for the vendor GEMMs' scratch ({e}); our GEMM kernels run \
                     instead"
                );
                let arena = device.alloc(plan.peak.max(ALIGN))?;
                (plan, arena, false)
            }
            Err(e) => return Err(e),
        };
        if opts.poison {
            device.fill(arena.ptr, 0xff, arena.bytes)?;
        }
        let mut ptrs: Vec<u64> = plan
            .offsets
            .iter()
            .map(|o| o.map_or(0, |o| arena.ptr + o as u64))
            .collect();

        let held = place_weights(
            device.as_ref(),
            &graph,
            weights,
            cache,
            &mut ptrs,
            UploadOrder::InOrder,
        )?;

        let substitute = substitute.then_some(device.as_ref());
        let list = build_launches(&graph, &plan, &ptrs, arena.ptr, substitute, target)?;
        super::kernel_choice::count_launches(&list.launches);
        Ok(KernelSession {
            device,
            graph,
            plan,
            _arena: arena,
            _weights: held,
            ptrs,
            list,
        })
    }

    pub fn plan(&self) -> &ArenaPlan {
        &self.plan
    }

    pub fn launch_count(&self) -> usize {
        self.list.launches.len()
    }

    /// What a run launches, each once in order of first use: our kernels by name, vendor
    /// calls by their description.
    pub fn kernel_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for e in &self.list.launches {
            let name = match e {
                Entry::Kernel(l) => l.kernel.name().to_string(),
                Entry::Vendor(v) => v.describe(),
            };
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }

    /// Seconds per run, averaged over `iters` runs (inputs as last set).
    pub fn time(&mut self, iters: usize) -> Result<f64> {
        self.device.time(&mut self.list, iters)
    }

    /// Total work of one run.
    pub fn cost(&self) -> crate::runtime::graph::Cost {
        self.graph.cost()
    }
}

/// `graph` with its kernel choice resolved for `target` ([`KernelTarget::resolve`]: the
/// target's, else the graph's, else `UPX_KERNELS`) and its workspaces sized for it, and the
/// target carrying that choice.
fn resolve_kernels(
    mut graph: Cow<'_, Graph>,
    target: KernelTarget,
) -> Result<(Cow<'_, Graph>, KernelTarget)> {
    let choice = target.resolve(graph.kernels())?;
    if graph.kernels() != Some(choice) {
        graph.to_mut().set_kernels(Some(choice));
    }
    Ok((graph, target.with_choice(choice)))
}

/// Scratch bytes `device` needs for each node of `graph` to run it its own way (0: the op's
/// launches).
pub fn node_scratch(device: &dyn Device, graph: &Graph) -> Vec<usize> {
    // An unreadable UPX_KERNELS plans none: building the launches reports it.
    match graph.kernels().map_or_else(KernelChoice::from_env, Ok) {
        Ok(choice) => scratch_by_node(graph, |n, ins| device.substitute_scratch(n, ins, choice)),
        Err(_) => vec![0; graph.nodes.len()],
    }
}

/// `bytes(node, its inputs)` for each node of `graph`.
fn scratch_by_node(graph: &Graph, bytes: impl Fn(&Node, &[&TensorDesc]) -> usize) -> Vec<usize> {
    graph
        .nodes
        .iter()
        .map(|n| {
            let ins: Vec<&TensorDesc> = n.inputs.iter().map(|&t| graph.desc(t)).collect();
            bytes(n, &ins)
        })
        .collect()
}

/// The launch list of a graph whose tensors live at `ptrs` (workspaces and scratch at
/// `arena` + offset), with the nodes `substitute` runs its own way.
fn build_launches(
    graph: &Graph,
    plan: &ArenaPlan,
    ptrs: &[u64],
    arena: u64,
    substitute: Option<&dyn Device>,
    target: KernelTarget,
) -> Result<LaunchList> {
    let mut list = LaunchList {
        launches: Vec::new(),
        labels: Vec::new(),
        replay: None,
    };
    for (i, node) in graph.nodes.iter().enumerate() {
        let io = node_io(graph, plan, ptrs, arena, target, i);
        let entries = match substitute {
            Some(device) => {
                let scratch = plan.scratch[i].map_or(0, |o| arena + o as u64);
                device.substitute(node, &io, scratch)?
            }
            None => None,
        };
        let entries = match entries {
            Some(e) => e,
            None => node
                .op
                .launches(&io)?
                .into_iter()
                .map(Entry::Kernel)
                .collect(),
        };
        for e in entries {
            list.launches.push(e);
            list.labels.push(node.label.clone());
        }
    }
    Ok(list)
}

/// The device tensors of node `i` of a graph whose tensors live at `ptrs` (its workspace at
/// `arena` + offset), for launches built for `target`.
fn node_io<'a>(
    graph: &'a Graph,
    plan: &ArenaPlan,
    ptrs: &[u64],
    arena: u64,
    target: KernelTarget,
    i: usize,
) -> LaunchIo<'a> {
    let node = &graph.nodes[i];
    let dev = |ids: &[TensorId]| -> Vec<DevTensor<'a>> {
        ids.iter()
            .map(|&t| DevTensor {
                ptr: ptrs[t.index()],
                desc: graph.desc(t),
            })
            .collect()
    };
    LaunchIo {
        inputs: dev(&node.inputs),
        outputs: dev(&node.outputs),
        workspace: plan.workspaces[i].map_or(0, |o| arena + o as u64),
        target,
    }
}

/// The launches a graph would make, at made-up addresses: for inspecting which kernels a
/// graph uses without any device.
pub fn dry_launches(graph: &Graph) -> Result<Vec<Launch>> {
    dry_launches_for(graph, Default::default())
}

/// [`dry_launches`] built for `target` (e.g. the emulator with the Hopper kernels forced:
/// `KernelTarget::hostsim().with_choice(KernelChoice::Sm90a)`), under the choice a session
/// on it would resolve.
pub fn dry_launches_for(graph: &Graph, target: KernelTarget) -> Result<Vec<Launch>> {
    Ok(dry_node_launches(graph, target)?
        .into_iter()
        .flat_map(|n| n.entries)
        .filter_map(|e| e.kernel().cloned())
        .collect())
}

/// What a device's sessions run instead of some nodes' own launches, for a listing without
/// that device: the tuning dispatch's decision, the vendor calls as stand-ins that name them.
pub trait DrySubstitution {
    /// Scratch bytes the node needs in a graph built for `choice` (as
    /// [`Device::substitute_scratch`]).
    fn scratch_bytes(&self, node: &Node, inputs: &[&TensorDesc], choice: KernelChoice) -> usize;
    /// The node's entries (as [`Device::substitute`]) and the target its own launches among
    /// them were built for (for the fallback reason); None: the op's own launches.
    fn entries(
        &self,
        node: &Node,
        io: &LaunchIo,
        scratch: u64,
    ) -> Result<Option<(Vec<Entry>, KernelTarget)>>;
}

/// One node's part of a dry listing.
pub struct DryNode {
    /// The node's index in the graph.
    pub node: usize,
    pub entries: Vec<Entry>,
    /// Why the node takes a portable kernel although the target it was built for allows its
    /// Hopper one ([`OpImpl::sm90a_fallback`](super::graph::OpImpl::sm90a_fallback)).
    pub sm90a_fallback: Option<String>,
}

/// [`dry_launches_for`] node by node, with why a node falls back to a portable kernel.
pub fn dry_node_launches(graph: &Graph, target: KernelTarget) -> Result<Vec<DryNode>> {
    dry_node_entries(graph, target, None)
}

/// [`dry_node_launches`] with the nodes `substitution` runs its own way, their scratch
/// planned in the arena as a session plans it.
pub fn dry_node_entries(
    graph: &Graph,
    target: KernelTarget,
    substitution: Option<&dyn DrySubstitution>,
) -> Result<Vec<DryNode>> {
    let (graph, target) = resolve_kernels(Cow::Borrowed(graph), target)?;
    let graph = graph.as_ref();
    let choice = target.kernel_choice()?;
    let scratch: Vec<usize> = match substitution {
        Some(s) => scratch_by_node(graph, |n, ins| s.scratch_bytes(n, ins, choice)),
        None => vec![0; graph.nodes.len()],
    };
    let plan = planner::plan_with_scratch(graph, &|i| scratch[i]);
    const ARENA: u64 = 1 << 40;
    const WEIGHTS: u64 = 1 << 44;
    let mut next_weight = WEIGHTS;
    let ptrs: Vec<u64> = graph
        .tensors
        .iter()
        .zip(&plan.offsets)
        .map(|(d, o)| match o {
            Some(o) => ARENA + *o as u64,
            None => {
                let p = next_weight;
                next_weight += d.bytes().div_ceil(ALIGN) as u64 * ALIGN as u64;
                p
            }
        })
        .collect();
    (0..graph.nodes.len())
        .map(|i| {
            let io = node_io(graph, &plan, &ptrs, ARENA, target, i);
            let node = &graph.nodes[i];
            let scratch = plan.scratch[i].map_or(0, |o| ARENA + o as u64);
            let substituted = match substitution {
                Some(s) => s.entries(node, &io, scratch)?,
                None => None,
            };
            let (entries, built_for) = match substituted {
                Some(e) => e,
                None => (
                    node.op
                        .launches(&io)?
                        .into_iter()
                        .map(Entry::Kernel)
                        .collect(),
                    target,
                ),
            };
            let io = LaunchIo {
                target: built_for,
                ..io
            };
            Ok(DryNode {
                node: i,
                entries,
                sm90a_fallback: node.op.sm90a_fallback(&io)?,
            })
        })
        .collect()
}

impl Session for KernelSession {
    fn graph(&self) -> &Graph {
        &self.graph
    }

    fn set_input(&mut self, id: TensorId, data: &[f32]) -> Result<()> {
        check_input(&self.graph, id, data.len())?;
        let d = self.graph.desc(id);
        self.device
            .write(self.ptrs[id.index()], &encode(data, d.dtype))
    }

    fn run(&mut self) -> Result<()> {
        self.device.execute(&mut self.list)
    }

    fn read(&mut self, id: TensorId) -> Result<Vec<f32>> {
        let d = self.graph.desc(id);
        if d.role == Role::Weight {
            return Err(Error::InvalidArgument(format!(
                "{} is a weight, not readable",
                d.name
            )));
        }
        let mut bytes = vec![0u8; d.bytes()];
        self.device.read(self.ptrs[id.index()], &mut bytes)?;
        Ok(decode(&bytes, d.dtype))
    }

    fn arena_bytes(&self) -> usize {
        self.plan.peak
    }
}

#[cfg(all(test, feature = "hostsim"))]
mod tests {
    use super::*;
    use crate::ops::elementwise::Add;
    use crate::runtime::{Backend, BackendKind};
    use crate::tensor::HostTensor;
    use std::collections::HashMap;

    /// Weights uploaded ahead of a session are the ones it reads: placing it uploads nothing
    /// more, and it computes what a session with its own upload computes.
    #[test]
    fn weights_uploaded_ahead_serve_the_session_placed_later() {
        let device = Backend::open(BackendKind::Hostsim)
            .unwrap()
            .device()
            .unwrap();
        let n = 37;
        let mut g = Graph::new();
        let x = g.input("x", &[n], DType::F32).unwrap();
        let w = g.weight("w", &[n], DType::BF16).unwrap();
        let v = g.weight("v", &[n], DType::F32).unwrap();
        let y = g.op1(Add::plain(DType::F32), &[x, w]).unwrap();
        let y = g.op1(Add::plain(DType::F32), &[y, v]).unwrap();
        g.output(y, "y").unwrap();
        let values = |k: f32| (0..n).map(|i| (i as f32 - 11.0) * k).collect::<Vec<_>>();
        let weights: HashMap<String, HostTensor> = [
            ("w".to_string(), HostTensor::new(vec![n], values(0.5))),
            ("v".to_string(), HostTensor::new(vec![n], values(-0.125))),
        ]
        .into();
        let cache = WeightCache::new();
        cache.upload(device.as_ref(), &g, &weights).unwrap();
        let uploaded = cache.bytes();
        assert!(uploaded >= n * (2 + 4), "{uploaded}");
        let opts = SessionOptions { poison: true };
        let run = |cache: Option<&WeightCache>| {
            let mut s =
                KernelSession::new(device.clone(), g.clone(), &weights, opts, cache).unwrap();
            s.set_input(x, &values(1.0)).unwrap();
            s.run().unwrap();
            s.read(y).unwrap()
        };
        let ahead = run(Some(&cache));
        assert_eq!(cache.bytes(), uploaded, "the session uploaded again");
        assert_eq!(ahead, run(None));
        let want: Vec<f32> = (0..n).map(|i| (i as f32 - 11.0) * 1.375).collect();
        assert_eq!(ahead, want);
    }
}
