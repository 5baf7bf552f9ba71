//! Model-shape benchmarks (`ultrapixel bench --shapes`): every distinct GEMM and attention
//! shape of a generation, read off the stage graphs at their real shapes and weighted by how
//! often one image runs it. GEMMs are timed with our portable kernel, our sm_90a kernel (where
//! the device runs it: compute capability 9.0, or the emulator) and cuBLASLt in the same run,
//! all as the plain product (bf16 in and out, f32 accumulation, no epilogue: the main loops,
//! where the time goes); attention with our portable and sm_90a kernels, against the matmul
//! ceiling; the fused depthwise conv + LayerNorm of every ResBlock with our kernel, as
//! bandwidth. The same
//! list, as JSON (`--list`), drives the PyTorch peer (`tools/torch-peer.py`), which runs the
//! unfused sequence the reference runs for the last.

use super::stages::time_graph;
use super::vendor::{describe_ceiling, VendorGemm};
use crate::ops::attention::Attention;
use crate::ops::conv::DwConvLn;
use crate::ops::gemm::Gemm;
use crate::pipeline::open_models::Configs;
use crate::pipeline::plan::{stage_graphs, StageGraph};
use crate::pipeline::Size;
use crate::runtime::device::{dry_node_launches, Device, WeightCache};
use crate::runtime::graph::{Graph, Node, Role};
use crate::runtime::kernel_choice::KernelChoice;
use crate::tensor::{numel, DType};
use crate::Result;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One distinct GEMM `[M, K] · [N, K]ᵀ` of a generation.
#[derive(Clone, Debug, PartialEq)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Executions per image (over every step of every stage).
    pub per_image: usize,
    /// Where it first occurs: stage, part and node label.
    pub example: String,
}

impl GemmShape {
    pub fn flops(&self) -> f64 {
        2.0 * (self.m * self.n) as f64 * self.k as f64
    }
}

/// One distinct attention of a generation: `batch × heads` problems of `queries` queries
/// against `queries + extra` keys, `head_dim` wide.
#[derive(Clone, Debug)]
pub struct AttentionShape {
    pub op: Attention,
    pub batch: usize,
    pub queries: usize,
    pub extra: usize,
    pub head_dim: usize,
    pub per_image: usize,
    pub example: String,
    /// The node alone, with inputs of its shapes and dtypes.
    pub graph: Graph,
}

impl AttentionShape {
    /// `b2 n9216 m85 h32x64 causal=false mask=false`: the shape as the tables print it.
    pub fn label(&self) -> String {
        format!(
            "b{} n{} m{} h{}x{} causal={} mask={}",
            self.batch,
            self.queries,
            self.extra,
            self.op.heads,
            self.head_dim,
            self.op.causal,
            self.op.key_mask
        )
    }

    /// Q·Kᵀ and P·V.
    pub fn flops(&self) -> f64 {
        4.0 * (self.batch * self.queries * (self.queries + self.extra)) as f64
            * (self.op.heads * self.head_dim) as f64
    }
}

/// One distinct depthwise conv + LayerNorm (a ResBlock's front) over `[batch, h, w, c]`.
#[derive(Clone, Debug)]
pub struct DwConvLnShape {
    pub op: DwConvLn,
    pub shape: [usize; 4],
    pub per_image: usize,
    pub example: String,
    /// The node alone, with inputs of its shapes and dtypes.
    pub graph: Graph,
}

/// `node` of `graph` as a graph of its own: its inputs (weights and graph inputs keep their
/// roles and names, so the benchmarks give them valid values; activations become inputs) and
/// its outputs.
fn isolate(graph: &Graph, node: &Node) -> Result<Graph> {
    let mut g = Graph::new();
    let mut ins = Vec::new();
    for (i, &id) in node.inputs.iter().enumerate() {
        let d = graph.desc(id);
        ins.push(match d.role {
            Role::Weight => g.weight(&d.name, &d.shape, d.dtype)?,
            Role::Input => g.input(&d.name, &d.shape, d.dtype)?,
            Role::Activation => g.input(&format!("in{i}"), &d.shape, d.dtype)?,
        });
    }
    let outs = g.op_shared(node.op.clone(), &ins)?;
    for (i, o) in outs.into_iter().enumerate() {
        g.output(o, &format!("out{i}"))?;
    }
    Ok(g)
}

/// Every op whose kernel is our tensor-core GEMM (with any epilogue).
pub fn is_gemm(op_name: &str) -> bool {
    matches!(
        op_name,
        "gemm" | "gemm_film" | "gemm_grn_stats" | "gemm_scaled_a"
    )
}

#[derive(Default)]
pub struct ModelShapes {
    /// Most work per image first.
    pub gemms: Vec<GemmShape>,
    pub attention: Vec<AttentionShape>,
    pub dwconv_ln: Vec<DwConvLnShape>,
}

fn where_used(sg: &StageGraph, node: &Node) -> String {
    format!("{} {}: {}", sg.stage, sg.part, node.label)
}

/// The distinct GEMM and attention shapes of a generation at `size`.
pub fn model_shapes(cfg: &Configs, size: Size, steps: (usize, usize)) -> Result<ModelShapes> {
    let mut gemms: BTreeMap<(usize, usize, usize), GemmShape> = BTreeMap::new();
    let mut attention: Vec<AttentionShape> = Vec::new();
    let mut dwconv_ln: Vec<DwConvLnShape> = Vec::new();
    for sg in stage_graphs(cfg, size, steps)? {
        for node in &sg.graph.nodes {
            // Every GEMM op takes A `[…, K]` then W `[N, K]`; attention takes qkv `[B, N, 3C]`,
            // then (with extra keys) kv `[B, M, 2C]`.
            if is_gemm(node.op.name()) {
                let a = sg.graph.shape(node.inputs[0]);
                let k = a[a.len() - 1];
                let (m, n) = (numel(a) / k, sg.graph.shape(node.inputs[1])[0]);
                gemms
                    .entry((m, n, k))
                    .or_insert_with(|| GemmShape {
                        m,
                        n,
                        k,
                        per_image: 0,
                        example: where_used(&sg, node),
                    })
                    .per_image += sg.runs;
            } else if let Some(op) = node.op.as_any().downcast_ref::<Attention>() {
                let a = sg.graph.shape(node.inputs[0]);
                let extra = if op.extra_kv {
                    sg.graph.shape(node.inputs[1])[1]
                } else {
                    0
                };
                let (batch, queries) = (a[0], a[1]);
                let same = |s: &&mut AttentionShape| {
                    (&s.op, s.batch, s.queries, s.extra) == (op, batch, queries, extra)
                };
                match attention.iter_mut().find(same) {
                    Some(s) => s.per_image += sg.runs,
                    None => attention.push(AttentionShape {
                        op: op.clone(),
                        batch,
                        queries,
                        extra,
                        head_dim: a[2] / 3 / op.heads,
                        per_image: sg.runs,
                        example: where_used(&sg, node),
                        graph: isolate(&sg.graph, node)?,
                    }),
                }
            } else if let Some(op) = node.op.as_any().downcast_ref::<DwConvLn>() {
                let x = sg.graph.desc(node.inputs[0]);
                let shape: [usize; 4] = x.shape[..].try_into().expect("NHWC");
                let same = |s: &&mut DwConvLnShape| {
                    (&s.op, s.shape, s.graph.tensors[0].dtype) == (op, shape, x.dtype)
                };
                match dwconv_ln.iter_mut().find(same) {
                    Some(s) => s.per_image += sg.runs,
                    None => dwconv_ln.push(DwConvLnShape {
                        op: op.clone(),
                        shape,
                        per_image: sg.runs,
                        example: where_used(&sg, node),
                        graph: isolate(&sg.graph, node)?,
                    }),
                }
            }
        }
    }
    let mut gemms: Vec<GemmShape> = gemms.into_values().collect();
    gemms.sort_by(|a, b| {
        (b.flops() * b.per_image as f64).total_cmp(&(a.flops() * a.per_image as f64))
    });
    attention.sort_by(|a, b| {
        (b.flops() * b.per_image as f64).total_cmp(&(a.flops() * a.per_image as f64))
    });
    dwconv_ln.sort_by_key(|s| std::cmp::Reverse(numel(&s.shape) * s.per_image));
    Ok(ModelShapes {
        gemms,
        attention,
        dwconv_ln,
    })
}

/// Our plain GEMM of one shape, as a one-node graph built under `kernels`.
fn gemm_graph(s: &GemmShape, kernels: KernelChoice) -> Result<Graph> {
    let mut g = Graph::new();
    g.set_kernels(Some(kernels));
    let a = g.input("a", &[s.m, s.k], DType::BF16)?;
    let w = g.weight("w", &[s.n, s.k], DType::BF16)?;
    let op = Gemm {
        bias: false,
        gelu: false,
        residual: false,
        out: DType::BF16,
    };
    let y = g.op1(op, &[a, w])?;
    g.output(y, "y")?;
    Ok(g)
}

fn rate(flops: f64, seconds: f64) -> String {
    format!("{:>6.1} TFLOP/s", flops / seconds / 1e12)
}

/// `graph` with our portable kernels.
fn portable(mut graph: Graph) -> Graph {
    graph.set_kernels(Some(KernelChoice::Portable));
    graph
}

/// Seconds per run of `graph` with the sm_90a kernels forced, where `device` runs them and
/// every node of the graph takes them; else why not.
fn time_sm90a(
    device: &Arc<dyn Device>,
    mut graph: Graph,
    iters: usize,
    cache: &WeightCache,
) -> Result<std::result::Result<f64, String>> {
    let target = device.kernel_target();
    if let Some(why) = target.why_not_sm90a(KernelChoice::Sm90a) {
        return Ok(Err(why));
    }
    graph.set_kernels(Some(KernelChoice::Sm90a));
    let fallback = dry_node_launches(&graph, target)?
        .into_iter()
        .find_map(|n| n.sm90a_fallback);
    if let Some(why) = fallback {
        return Ok(Err(why));
    }
    Ok(Ok(time_graph(device, graph, iters, cache)?.0))
}

/// The shapes of each size as JSON, for the PyTorch peer.
pub fn list_json(cfg: &Configs, sizes: &[Size]) -> Result<serde_json::Value> {
    let mut out = serde_json::Map::new();
    for &size in sizes {
        let s = model_shapes(cfg, size, (20, 10))?;
        let gemms: Vec<_> = s
            .gemms
            .iter()
            .map(|g| json!({"m": g.m, "n": g.n, "k": g.k, "per_image": g.per_image, "example": g.example}))
            .collect();
        let attention: Vec<_> = s
            .attention
            .iter()
            .map(|a| {
                json!({
                    "batch": a.batch, "queries": a.queries, "extra": a.extra,
                    "heads": a.op.heads, "head_dim": a.head_dim, "causal": a.op.causal,
                    "key_mask": a.op.key_mask, "per_image": a.per_image, "example": a.example,
                })
            })
            .collect();
        let dwconv_ln: Vec<_> = s
            .dwconv_ln
            .iter()
            .map(|d| {
                let [batch, h, w, c] = d.shape;
                let x_dtype = d.graph.tensors[0].dtype;
                json!({
                    "batch": batch, "h": h, "w": w, "c": c, "k": d.op.k, "eps": d.op.eps,
                    "x_f32": x_dtype == DType::F32, "bytes": d.graph.cost().bytes,
                    "per_image": d.per_image, "example": d.example,
                })
            })
            .collect();
        out.insert(
            size.to_string(),
            json!({"gemms": gemms, "attention": attention, "dwconv_ln": dwconv_ln}),
        );
    }
    Ok(serde_json::Value::Object(out))
}

/// Prints the GEMM and attention tables of each size; `missing` says why there is no
/// cuBLASLt column.
pub fn print(
    device: &Arc<dyn Device>,
    vendor: Option<&VendorGemm>,
    missing: &str,
    cfg: &Configs,
    sizes: &[Size],
    iters: usize,
) -> Result<()> {
    println!("device: {}", device.describe());
    let ceiling = match vendor {
        Some(v) => {
            let c = v.ceiling(iters)?;
            println!("matmul ceiling: {}", describe_ceiling(c));
            Some(c)
        }
        None => {
            println!("cuBLASLt: skipped: {missing}");
            None
        }
    };
    let skip_sm90a = device.kernel_target().why_not_sm90a(KernelChoice::Sm90a);
    if let Some(why) = &skip_sm90a {
        println!("sm_90a kernels: skipped: {why}");
    }
    let cache = WeightCache::new();
    for &size in sizes {
        let shapes = model_shapes(cfg, size, (20, 10))?;
        println!(
            "\n{size}: {} GEMM shapes (20 Stage C steps per pass, 10 Stage B steps, CFG batch 2)",
            shapes.gemms.len()
        );
        println!(
            "{:>8} {:>6} {:>6} {:>5}  {:>10} {:>14}  {:>11} {:>14}  {:>5}  {:>9} {:>14}  {:>5}  first use",
            "M", "N", "K", "runs", "ours ms", "", "cuBLASLt ms", "", "ratio", "sm90a ms", "",
            "ratio"
        );
        // Per image: our portable kernel, cuBLASLt, our sm_90a kernel (the portable one for
        // shapes it does not take).
        let (mut ours, mut theirs, mut hopper, mut flops) = (0.0, 0.0, 0.0, 0.0);
        for s in &shapes.gemms {
            let graph = gemm_graph(s, KernelChoice::Portable)?;
            let (t, _) = time_graph(device, graph, iters, &cache)?;
            let runs = s.per_image as f64;
            ours += t * runs;
            flops += s.flops() * runs;
            let tv = match vendor {
                Some(v) => Some(v.time(s.m, s.n, s.k, iters)?),
                None => None,
            };
            let peer = match tv {
                Some(tv) => {
                    theirs += tv * runs;
                    format!(
                        "{:>11.3} {}  {:>4.0}%",
                        tv * 1e3,
                        rate(s.flops(), tv),
                        100.0 * tv / t
                    )
                }
                None => format!("{:>11} {:>14}  {:>5}", "-", "", "-"),
            };
            let hopper_graph = gemm_graph(s, KernelChoice::Sm90a)?;
            let (sm90a, fallback) = match time_sm90a(device, hopper_graph, iters, &cache)? {
                Ok(th) => {
                    hopper += th * runs;
                    let ratio = tv.map_or("-".into(), |tv| format!("{:.0}%", 100.0 * tv / th));
                    let col = format!("{:>9.3} {}  {ratio:>5}", th * 1e3, rate(s.flops(), th));
                    (col, String::new())
                }
                Err(why) => {
                    hopper += t * runs;
                    let col = format!("{:>9} {:>14}  {:>5}", "-", "", "-");
                    (
                        col,
                        if skip_sm90a.is_some() {
                            String::new()
                        } else {
                            format!(" (sm_90a: {why})")
                        },
                    )
                }
            };
            println!(
                "{:>8} {:>6} {:>6} {:>5}  {:>10.3} {}  {peer}  {sm90a}  {}{fallback}",
                s.m,
                s.n,
                s.k,
                s.per_image,
                t * 1e3,
                rate(s.flops(), t),
                s.example
            );
        }
        print!(
            "GEMMs of one image: {:.1} TFLOP in {ours:.3} s ({})",
            flops / 1e12,
            rate(flops, ours).trim()
        );
        if vendor.is_some() {
            print!(
                "; cuBLASLt {theirs:.3} s: ours at {:.0} % of its speed (target ≥ 90 %)",
                100.0 * theirs / ours
            );
        }
        if skip_sm90a.is_none() {
            print!("; sm_90a {hopper:.3} s ({})", rate(flops, hopper).trim());
            if vendor.is_some() {
                print!(": at {:.0} % of cuBLASLt's speed", 100.0 * theirs / hopper);
            }
        }
        println!("\n\n{size}: {} attention shapes", shapes.attention.len());
        let (mut attn_time, mut attn_hopper) = (0.0, 0.0);
        for s in &shapes.attention {
            let (t, _) = time_graph(device, portable(s.graph.clone()), iters, &cache)?;
            attn_time += t * s.per_image as f64;
            let share = |t: f64| {
                ceiling.map_or(String::new(), |c| {
                    format!(
                        " ({:.0} % of the matmul ceiling)",
                        100.0 * s.flops() / t / c
                    )
                })
            };
            let sm90a = match time_sm90a(device, s.graph.clone(), iters, &cache)? {
                Ok(th) => {
                    attn_hopper += th * s.per_image as f64;
                    format!(
                        "; sm90a {:.3} ms {}{}",
                        th * 1e3,
                        rate(s.flops(), th),
                        share(th)
                    )
                }
                Err(why) => {
                    attn_hopper += t * s.per_image as f64;
                    if skip_sm90a.is_some() {
                        String::new()
                    } else {
                        format!("; sm90a: {why}")
                    }
                }
            };
            println!(
                "{} × {:>3}: {:>9.3} ms {}{}{sm90a}  {}",
                s.label(),
                s.per_image,
                t * 1e3,
                rate(s.flops(), t),
                share(t),
                s.example
            );
        }
        print!("attention of one image: {attn_time:.3} s");
        if skip_sm90a.is_none() {
            print!("; sm_90a {attn_hopper:.3} s");
        }
        println!();
        println!(
            "\n{size}: {} depthwise conv + LayerNorm shapes",
            shapes.dwconv_ln.len()
        );
        let mut dw_time = 0.0;
        for s in &shapes.dwconv_ln {
            let (t, cost) = time_graph(device, s.graph.clone(), iters, &cache)?;
            dw_time += t * s.per_image as f64;
            let [b, h, w, c] = s.shape;
            println!(
                "b{b} {h}x{w} c{c} k{} × {:>3}: {:>9.3} ms {:>7.0} GB/s  {}",
                s.op.k,
                s.per_image,
                t * 1e3,
                cost.bytes / t / 1e9,
                s.example
            );
        }
        println!("depthwise conv + LayerNorm of one image: {dw_time:.3} s");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::tiny::tiny_configs;

    /// The shape tables account for every GEMM and attention node of every graph, with its
    /// runs: the per-image FLOPs they imply equal the ops' own cost counts.
    #[test]
    fn model_shapes_cover_every_gemm_and_attention_of_a_generation() {
        let cfg = tiny_configs();
        let size = Size {
            width: 512,
            height: 520,
        };
        let steps = (3, 2);
        let shapes = model_shapes(&cfg, size, steps).unwrap();
        let (mut gemm_flops, mut gemm_nodes) = (0.0, 0);
        let (mut attn_flops, mut attn_nodes) = (0.0, 0);
        let (mut dw_bytes, mut dw_nodes) = (0.0, 0);
        for sg in stage_graphs(&cfg, size, steps).unwrap() {
            for node in &sg.graph.nodes {
                let cost = sg.graph.node_cost(node);
                let flops = cost.flops * sg.runs as f64;
                if is_gemm(node.op.name()) {
                    gemm_flops += flops;
                    gemm_nodes += sg.runs;
                } else if node.op.name() == "attention" {
                    attn_flops += flops;
                    attn_nodes += sg.runs;
                } else if node.op.name() == "dwconv_ln" {
                    dw_bytes += cost.bytes * sg.runs as f64;
                    dw_nodes += sg.runs;
                }
            }
        }
        assert!(gemm_nodes > 0 && attn_nodes > 0 && dw_nodes > 0);
        let runs = |v: &[usize]| v.iter().sum::<usize>();
        let g: Vec<usize> = shapes.gemms.iter().map(|s| s.per_image).collect();
        let a: Vec<usize> = shapes.attention.iter().map(|s| s.per_image).collect();
        assert_eq!(runs(&g), gemm_nodes);
        assert_eq!(runs(&a), attn_nodes);
        let d: Vec<usize> = shapes.dwconv_ln.iter().map(|s| s.per_image).collect();
        assert_eq!(runs(&d), dw_nodes);
        // Each isolated node does its original's work.
        let table: f64 = shapes
            .dwconv_ln
            .iter()
            .map(|s| s.graph.cost().bytes * s.per_image as f64)
            .sum();
        let close = |x: f64, y: f64| (x - y).abs() <= 1e-9 * y;
        assert!(close(table, dw_bytes), "{table} vs {dw_bytes}");
        let per_image = |flops: f64, runs: usize| flops * runs as f64;
        let table: f64 = shapes
            .gemms
            .iter()
            .map(|s| per_image(s.flops(), s.per_image))
            .sum();
        assert!(close(table, gemm_flops), "{table} vs {gemm_flops}");
        let table: f64 = (shapes.attention.iter())
            .map(|s| per_image(s.flops(), s.per_image))
            .sum();
        assert!(close(table, attn_flops), "{table} vs {attn_flops}");
        // Distinct, and sorted by work per image.
        for w in shapes.gemms.windows(2) {
            assert!(w[0].flops() * w[0].per_image as f64 >= w[1].flops() * w[1].per_image as f64);
        }
        let mut keys: Vec<_> = shapes.gemms.iter().map(|s| (s.m, s.n, s.k)).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), shapes.gemms.len());
        // Each isolated attention node does the work its shape's fields say.
        for s in &shapes.attention {
            assert!(close(s.graph.cost().flops, s.flops()), "{s:?}");
        }
    }

    /// The peer shapes are among the released model's at 4096²: Stage C's high-res
    /// attention (9216 image + 85 text tokens, 32 heads × 64, CFG batch 2) and Stage B's
    /// level 2 (16 384 tokens, 18 heads).
    #[test]
    fn the_released_model_at_4096_has_the_peer_attention_shapes() {
        let size = Size {
            width: 4096,
            height: 4096,
        };
        let s = model_shapes(&Configs::default(), size, (20, 10)).unwrap();
        let has = |q, m, h| {
            s.attention
                .iter()
                .any(|a| (a.batch, a.queries, a.extra, a.op.heads, a.head_dim) == (2, q, m, h, 64))
        };
        assert!(has(9216, 85, 32), "{:#?}", s.attention);
        assert!(has(576, 85, 32), "{:#?}", s.attention);
        assert!(has(16384, 4, 18), "{:#?}", s.attention);
    }
}
