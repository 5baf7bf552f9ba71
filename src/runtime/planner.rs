//! The arena planner: every activation and input of a graph gets an offset in one arena from
//! its liveness (defined by a node, dead after its last consumer), so the peak memory of a
//! whole stage is known before any device memory is touched, and pointers stay fixed for
//! CUDA-graph replay. Best-fit over a free list with coalescing (ggml-alloc style);
//! deterministic for a given graph.

use super::graph::{Graph, Role};
use crate::{Error, Result};

/// Offsets are aligned to this (≥ the 16 bytes of vector loads and cp.async; 256 matches the
/// driver's allocation alignment).
pub const ALIGN: usize = 256;

#[derive(Clone, Debug, PartialEq)]
pub struct ArenaPlan {
    /// Offset of each tensor (None for weights).
    pub offsets: Vec<Option<usize>>,
    /// Offset of each node's workspace (None when it needs none).
    pub workspaces: Vec<Option<usize>>,
    /// Offset of each node's device scratch (a vendor GEMM's product and scaled operand; None
    /// when the device runs the node's own kernels). Live, like a workspace, only during its
    /// node.
    pub scratch: Vec<Option<usize>>,
    /// Arena size: the peak of simultaneously live bytes, fragmentation included.
    pub peak: usize,
}

/// When a block of the arena is in use: from `first` (node index, or 0 for inputs) to
/// `last` inclusive.
#[derive(Clone, Copy, Debug)]
struct Life {
    first: usize,
    last: usize,
}

fn aligned(bytes: usize) -> usize {
    bytes.max(1).div_ceil(ALIGN) * ALIGN
}

/// For each tensor, the tensor whose arena block holds it: itself, or for the output of a
/// view op ([`OpImpl::is_view`](super::graph::OpImpl::is_view)) whose input lives in the arena,
/// that input's holder. Weights are not in the arena, so a view of one is its own copy.
pub fn holders(graph: &Graph) -> Vec<usize> {
    let mut holder: Vec<usize> = (0..graph.tensors.len()).collect();
    for node in &graph.nodes {
        if let ([x], [y]) = (&node.inputs[..], &node.outputs[..]) {
            let x = holder[x.index()];
            if node.op.is_view() && graph.tensors[x].role != Role::Weight {
                holder[y.index()] = x;
            }
        }
    }
    holder
}

/// Live ranges of every tensor that owns an arena block, indexed like `graph.tensors`: from
/// its definition to its last use or that of any view held in its block. None for weights
/// and views.
fn lifetimes(graph: &Graph) -> Vec<Option<Life>> {
    let mut life = own_lifetimes(graph);
    for (t, h) in holders(graph).into_iter().enumerate() {
        if h != t {
            if let Some(view) = life[t].take() {
                let l = life[h]
                    .as_mut()
                    .expect("a view's holder lives in the arena");
                l.last = l.last.max(view.last);
            }
        }
    }
    life
}

/// Live ranges of every non-weight tensor by itself, indexed like `graph.tensors`.
fn own_lifetimes(graph: &Graph) -> Vec<Option<Life>> {
    let end = graph.nodes.len();
    let mut life: Vec<Option<Life>> = graph
        .tensors
        .iter()
        .map(|d| (d.role == Role::Input).then_some(Life { first: 0, last: 0 }))
        .collect();
    for (i, node) in graph.nodes.iter().enumerate() {
        for &o in &node.outputs {
            life[o.index()] = Some(Life { first: i, last: i });
        }
        for &t in &node.inputs {
            if let Some(l) = life[t.index()].as_mut() {
                l.last = l.last.max(i);
            }
        }
    }
    for &o in graph.outputs.iter().chain(&graph.constants) {
        if let Some(l) = life[o.index()].as_mut() {
            l.last = end;
        }
    }
    life
}

#[derive(Default)]
struct FreeList {
    /// Sorted, non-adjacent free blocks (offset, size) below `top`.
    blocks: Vec<(usize, usize)>,
    top: usize,
    peak: usize,
}

impl FreeList {
    fn alloc(&mut self, size: usize) -> usize {
        let best = self
            .blocks
            .iter()
            .enumerate()
            .filter(|(_, b)| b.1 >= size)
            .min_by_key(|(_, b)| (b.1, b.0))
            .map(|(i, _)| i);
        if let Some(i) = best {
            let (off, s) = self.blocks[i];
            if s == size {
                self.blocks.remove(i);
            } else {
                self.blocks[i] = (off + size, s - size);
            }
            return off;
        }
        // Grow from the top, absorbing a free block that ends there.
        let off = match self.blocks.last() {
            Some(&(o, s)) if o + s == self.top => {
                self.blocks.pop();
                o
            }
            _ => self.top,
        };
        self.top = off + size;
        self.peak = self.peak.max(self.top);
        off
    }

    fn free(&mut self, off: usize, size: usize) {
        let i = self.blocks.partition_point(|b| b.0 < off);
        self.blocks.insert(i, (off, size));
        // Coalesce with the next and the previous block.
        if i + 1 < self.blocks.len() && self.blocks[i].0 + self.blocks[i].1 == self.blocks[i + 1].0
        {
            self.blocks[i].1 += self.blocks[i + 1].1;
            self.blocks.remove(i + 1);
        }
        if i > 0 && self.blocks[i - 1].0 + self.blocks[i - 1].1 == self.blocks[i].0 {
            self.blocks[i - 1].1 += self.blocks[i].1;
            self.blocks.remove(i);
        }
        // A free block at the top just lowers the top.
        if let Some(&(o, s)) = self.blocks.last() {
            if o + s == self.top {
                self.blocks.pop();
                self.top = o;
            }
        }
    }
}

pub fn plan(graph: &Graph) -> ArenaPlan {
    plan_with_scratch(graph, &|_| 0)
}

/// [`plan`], with `scratch(i)` more bytes live during node `i` (what the device needs to run
/// that node its own way), so the arena, and every memory plan, counts them.
pub fn plan_with_scratch(graph: &Graph, scratch: &dyn Fn(usize) -> usize) -> ArenaPlan {
    let life = lifetimes(graph);
    let mut offsets = vec![None; graph.tensors.len()];
    let mut workspaces = vec![None; graph.nodes.len()];
    let mut scratches = vec![None; graph.nodes.len()];
    let mut fl = FreeList::default();
    // Dying tensors per node index.
    let mut dies: Vec<Vec<usize>> = vec![Vec::new(); graph.nodes.len() + 1];
    for (t, l) in life.iter().enumerate() {
        if let Some(l) = l {
            dies[l.last].push(t);
        }
    }
    for (t, d) in graph.tensors.iter().enumerate() {
        if d.role == Role::Input {
            offsets[t] = Some(fl.alloc(aligned(d.bytes())));
        }
    }
    let size = |t: usize| aligned(graph.tensors[t].bytes());
    let holder = holders(graph);
    for (i, node) in graph.nodes.iter().enumerate() {
        // Outputs and workspace are allocated before this node's dying inputs are released,
        // so no output shares bytes with an input of the same node, except a view's.
        for &o in &node.outputs {
            let o = o.index();
            offsets[o] = match holder[o] {
                h if h == o => Some(fl.alloc(size(o))),
                h => offsets[h],
            };
        }
        let (ws, sc) = (node.workspace, scratch(i));
        if ws + sc > 0 {
            let ws_bytes = if ws > 0 { aligned(ws) } else { 0 };
            let total = ws_bytes + if sc > 0 { aligned(sc) } else { 0 };
            let off = fl.alloc(total);
            workspaces[i] = (ws > 0).then_some(off);
            scratches[i] = (sc > 0).then_some(off + ws_bytes);
            fl.free(off, total);
        }
        for &t in &dies[i] {
            if let Some(off) = offsets[t] {
                fl.free(off, size(t));
            }
        }
    }
    ArenaPlan {
        offsets,
        workspaces,
        scratch: scratches,
        peak: fl.peak,
    }
}

/// Checks that no two tensors (or workspaces) live at the same time share bytes, and that
/// everything fits in the arena. Used by tests and debug builds.
pub fn check(graph: &Graph, plan: &ArenaPlan) -> Result<()> {
    check_with_scratch(graph, plan, &|_| 0)
}

/// [`check`] of a plan made by [`plan_with_scratch`] with the same `scratch`.
pub fn check_with_scratch(
    graph: &Graph,
    plan: &ArenaPlan,
    scratch: &dyn Fn(usize) -> usize,
) -> Result<()> {
    // Every tensor by its own live range; a view may share bytes only with its holder's
    // block, at the holder's offset.
    let life = own_lifetimes(graph);
    let holder = holders(graph);
    // (first, last, offset, bytes, what, holder: None for workspaces and scratch)
    let mut spans: Vec<(usize, usize, usize, usize, String, Option<usize>)> = Vec::new();
    for (t, l) in life.iter().enumerate() {
        if let Some(l) = l {
            let off = plan.offsets[t].ok_or_else(|| {
                Error::InvalidArgument(format!("planner: tensor {t} has no offset"))
            })?;
            let d = &graph.tensors[t];
            if holder[t] != t && plan.offsets[holder[t]] != Some(off) {
                return Err(Error::InvalidArgument(format!(
                    "planner: the view {} is not at its holder's offset",
                    d.name
                )));
            }
            spans.push((
                l.first,
                l.last,
                off,
                d.bytes(),
                d.name.clone(),
                Some(holder[t]),
            ));
        }
    }
    for (i, (n, w)) in graph.nodes.iter().zip(&plan.workspaces).enumerate() {
        if let Some(off) = w {
            let what = format!("{} workspace", n.label);
            spans.push((i, i, *off, n.workspace, what, None));
        }
    }
    for (i, (n, sc)) in graph.nodes.iter().zip(&plan.scratch).enumerate() {
        if let Some(off) = sc {
            let what = format!("{} scratch", n.label);
            spans.push((i, i, *off, scratch(i), what, None));
        }
    }
    for s in &spans {
        if s.2 + s.3 > plan.peak {
            return Err(Error::InvalidArgument(format!(
                "planner: {} ends at {} beyond the arena ({})",
                s.4,
                s.2 + s.3,
                plan.peak
            )));
        }
    }
    for (a, x) in spans.iter().enumerate() {
        for y in &spans[a + 1..] {
            let live_together = x.0 <= y.1 && y.0 <= x.1;
            let overlap = x.2 < y.2 + y.3 && y.2 < x.2 + x.3;
            let one_block = x.5.is_some() && x.5 == y.5;
            if live_together && overlap && x.3 > 0 && y.3 > 0 && !one_block {
                return Err(Error::InvalidArgument(format!(
                    "planner: {} and {} are live together and overlap",
                    x.4, y.4
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::graph::{LaunchIo, OpImpl, OutSpec};
    use crate::runtime::graph::{TensorDesc, TensorId};
    use crate::runtime::launch::Launch;
    use crate::tensor::{DType, HostTensor};
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    /// An op that only has shapes: `outs` outputs of `len` f32 values each.
    #[derive(Debug)]
    struct Shaped {
        outs: usize,
        len: usize,
        ws: usize,
    }

    impl OpImpl for Shaped {
        fn name(&self) -> &'static str {
            "shaped"
        }
        fn infer(&self, _: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
            Ok(vec![(vec![self.len], DType::F32); self.outs])
        }
        fn workspace_bytes(
            &self,
            _: &[&TensorDesc],
            _: crate::runtime::kernel_choice::KernelChoice,
        ) -> usize {
            self.ws
        }
        fn reference(&self, _: &[&HostTensor], _: &mut [HostTensor]) -> Result<()> {
            Ok(())
        }
        fn launches(&self, _: &LaunchIo) -> Result<Vec<Launch>> {
            Ok(vec![])
        }
    }

    /// A view op ([`OpImpl::is_view`]): its output is its input under the same shape.
    #[derive(Debug)]
    struct View;

    impl OpImpl for View {
        fn name(&self) -> &'static str {
            "view"
        }
        fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
            Ok(vec![(inputs[0].shape.clone(), inputs[0].dtype)])
        }
        fn is_view(&self) -> bool {
            true
        }
        fn reference(&self, _: &[&HostTensor], _: &mut [HostTensor]) -> Result<()> {
            Ok(())
        }
        fn launches(&self, _: &LaunchIo) -> Result<Vec<Launch>> {
            Ok(vec![])
        }
    }

    fn random_graph(seed: u64) -> Graph {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut g = Graph::new();
        let mut pool: Vec<TensorId> = (0..rng.random_range(1..4))
            .map(|i| {
                g.input(&format!("in{i}"), &[rng.random_range(1..3000)], DType::BF16)
                    .unwrap()
            })
            .collect();
        pool.push(g.weight("w", &[100], DType::F32).unwrap());
        for _ in 0..rng.random_range(1..60) {
            let n_in = rng.random_range(1..4).min(pool.len());
            let ins: Vec<TensorId> = (0..n_in)
                .map(|_| pool[rng.random_range(0..pool.len())])
                .collect();
            let op = Shaped {
                outs: rng.random_range(1..3),
                len: rng.random_range(1..5000),
                ws: if rng.random_bool(0.2) {
                    rng.random_range(1..9000)
                } else {
                    0
                },
            };
            pool.extend(g.op(op, &ins).unwrap());
            // Views of activations, inputs and the weight, and views of views.
            if rng.random_bool(0.25) {
                let x = pool[rng.random_range(0..pool.len())];
                pool.push(g.op1(View, &[x]).unwrap());
            }
        }
        for _ in 0..rng.random_range(0..3) {
            let t = pool[rng.random_range(0..pool.len())];
            if g.desc(t).role != Role::Weight {
                let name = format!("out{}", g.outputs.len());
                g.output(t, &name).unwrap();
            }
        }
        g
    }

    #[test]
    fn random_graphs_never_overlap_live_tensors() {
        let base: u64 = rand::random();
        for s in 0..300 {
            let g = random_graph(base.wrapping_add(s));
            let p = plan(&g);
            check(&g, &p).unwrap_or_else(|e| panic!("seed {}: {e}", base.wrapping_add(s)));
            for (t, off) in p.offsets.iter().enumerate() {
                let is_weight = g.tensors[t].role == Role::Weight;
                assert_eq!(
                    off.is_none(),
                    is_weight,
                    "seed {}: tensor {t}",
                    base.wrapping_add(s)
                );
                if let Some(o) = off {
                    assert_eq!(o % ALIGN, 0);
                }
            }
            // A view sits on its input's block unless the input is a weight.
            for node in g.nodes.iter().filter(|n| n.op.is_view()) {
                let (x, y) = (node.inputs[0].index(), node.outputs[0].index());
                let on_input = p.offsets[y] == p.offsets[x];
                assert_eq!(on_input, g.tensors[x].role != Role::Weight);
            }
        }
    }

    #[test]
    fn a_view_keeps_its_holders_block_until_its_last_use() {
        let shaped = || Shaped {
            outs: 1,
            len: 1 << 10,
            ws: 0,
        };
        let mut g = Graph::new();
        let x = g.input("x", &[1 << 10], DType::F32).unwrap();
        let a = g.op1(shaped(), &[x]).unwrap();
        let v = g.op1(View, &[a]).unwrap();
        // `a` itself is dead here; only its view is read later.
        let b = g.op1(shaped(), &[x]).unwrap();
        let c = g.op1(shaped(), &[v, b]).unwrap();
        g.output(c, "c").unwrap();
        let mut p = plan(&g);
        check(&g, &p).unwrap();
        assert_eq!(p.offsets[v.index()], p.offsets[a.index()]);
        assert_ne!(p.offsets[b.index()], p.offsets[a.index()]);
        // A plan that reuses the block while the view lives is caught.
        p.offsets[b.index()] = p.offsets[a.index()];
        let e = check(&g, &p).unwrap_err().to_string();
        assert!(e.contains("live together and overlap"), "{e}");
        // And a view placed off its holder.
        let mut p = plan(&g);
        p.offsets[v.index()] = p.offsets[b.index()];
        let e = check(&g, &p).unwrap_err().to_string();
        assert!(e.contains("not at its holder's offset"), "{e}");
    }

    #[test]
    fn scratch_is_planned_beside_workspaces_and_never_overlaps() {
        let base: u64 = rand::random();
        for s in 0..200 {
            let seed = base.wrapping_add(s);
            let g = random_graph(seed);
            // A scratch on about a third of the nodes, of odd sizes.
            let sizes: Vec<usize> = {
                let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
                (0..g.nodes.len())
                    .map(|_| {
                        if rng.random_bool(0.3) {
                            rng.random_range(1..20000)
                        } else {
                            0
                        }
                    })
                    .collect()
            };
            let scratch = |i: usize| sizes[i];
            let p = plan_with_scratch(&g, &scratch);
            check_with_scratch(&g, &p, &scratch).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            for (i, sc) in p.scratch.iter().enumerate() {
                assert_eq!(sc.is_some(), sizes[i] > 0, "seed {seed}: node {i}");
                if let Some(o) = sc {
                    assert_eq!(o % ALIGN, 0, "seed {seed}: node {i}");
                }
            }
            // Scratch only adds bytes: the arena never shrinks for it.
            assert!(p.peak >= plan(&g).peak, "seed {seed}");
        }
    }

    #[test]
    fn check_catches_a_scratch_that_overlaps_a_live_tensor() {
        let mut g = Graph::new();
        let x = g.input("x", &[1 << 10], DType::F32).unwrap();
        let y = g
            .op1(
                Shaped {
                    outs: 1,
                    len: 1 << 10,
                    ws: 0,
                },
                &[x],
            )
            .unwrap();
        g.output(y, "y").unwrap();
        let scratch = |_: usize| 4096;
        let mut p = plan_with_scratch(&g, &scratch);
        check_with_scratch(&g, &p, &scratch).unwrap();
        p.scratch[0] = p.offsets[x.index()];
        assert!(check_with_scratch(&g, &p, &scratch).is_err());
    }

    #[test]
    fn plans_are_deterministic() {
        let seed: u64 = rand::random();
        assert_eq!(
            plan(&random_graph(seed)),
            plan(&random_graph(seed)),
            "seed {seed}"
        );
    }

    #[test]
    fn memory_is_reused_along_a_chain() {
        // x -> a -> b -> c -> d: at most two 1 MiB tensors are live at once.
        let mut g = Graph::new();
        let mut t = g.input("x", &[1 << 18], DType::F32).unwrap();
        for _ in 0..4 {
            t = g
                .op1(
                    Shaped {
                        outs: 1,
                        len: 1 << 18,
                        ws: 0,
                    },
                    &[t],
                )
                .unwrap();
        }
        g.output(t, "y").unwrap();
        let p = plan(&g);
        assert_eq!(p.peak, 2 << 20);
        check(&g, &p).unwrap();
    }

    #[test]
    fn constant_inputs_are_never_overwritten() {
        // c is read first, then a chain of 1 MiB tensors follows: c's memory stays reserved.
        let mut g = Graph::new();
        let c = g.constant_input("c", &[1 << 18], DType::F32).unwrap();
        let mut t = g.input("x", &[1 << 18], DType::F32).unwrap();
        t = g
            .op1(
                Shaped {
                    outs: 1,
                    len: 1 << 18,
                    ws: 0,
                },
                &[t, c],
            )
            .unwrap();
        for _ in 0..3 {
            t = g
                .op1(
                    Shaped {
                        outs: 1,
                        len: 1 << 18,
                        ws: 0,
                    },
                    &[t],
                )
                .unwrap();
        }
        g.output(t, "y").unwrap();
        let p = plan(&g);
        check(&g, &p).unwrap();
        let c_span = p.offsets[c.index()].unwrap()..p.offsets[c.index()].unwrap() + (1 << 20);
        for (i, off) in p.offsets.iter().enumerate() {
            if let (Some(o), true) = (off, i != c.index()) {
                assert!(
                    !c_span.contains(o),
                    "tensor {i} reuses the constant's memory"
                );
            }
        }
        assert_eq!(p.peak, 3 << 20);
    }

    #[test]
    fn check_rejects_an_overlapping_plan() {
        let mut g = Graph::new();
        let x = g.input("x", &[64], DType::F32).unwrap();
        let y = g
            .op1(
                Shaped {
                    outs: 1,
                    len: 64,
                    ws: 0,
                },
                &[x],
            )
            .unwrap();
        g.output(y, "y").unwrap();
        let mut p = plan(&g);
        p.offsets[y.index()] = p.offsets[x.index()];
        assert!(check(&g, &p).is_err());
    }
}
