//! What the tuner times: every distinct GEMM of a generation with its epilogue (the key a
//! GEMM node is looked up by at run time) and every distinct attention, over the sizes asked.

use crate::bench::shapes::{model_shapes, AttentionShape};
use crate::ops::attention::Attention;
use crate::ops::gemm::{Gemm, GemmFilm, GemmGrnStats, GemmScaledA};
use crate::pipeline::open_models::Configs;
use crate::pipeline::plan::stage_graphs;
use crate::pipeline::Size;
use crate::runtime::graph::{Node, OpImpl, TensorDesc};
use crate::tensor::{numel, DType};
use crate::Result;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

use super::table::Use;

/// The work around a GEMM's main loop, as far as it changes what a vendor GEMM must be paired
/// with (FiLM's k and the scaling's k do not).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Epilogue {
    pub bias: bool,
    pub gelu: bool,
    pub residual: bool,
    pub film: bool,
    pub grn_stats: bool,
    pub scaled_a: bool,
}

const PARTS: [&str; 6] = ["bias", "gelu", "residual", "film", "grn_stats", "scaled_a"];

impl Epilogue {
    fn flags(&self) -> [bool; 6] {
        [
            self.bias,
            self.gelu,
            self.residual,
            self.film,
            self.grn_stats,
            self.scaled_a,
        ]
    }

    /// `none`, or the parts joined by `+` in a fixed order (`bias+gelu`).
    pub fn name(&self) -> String {
        let parts: Vec<&str> = PARTS
            .iter()
            .zip(self.flags())
            .filter(|(_, on)| *on)
            .map(|(p, _)| *p)
            .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join("+")
        }
    }

    pub fn parse(s: &str) -> Option<Epilogue> {
        let mut e = Epilogue::default();
        if s == "none" {
            return Some(e);
        }
        for part in s.split('+') {
            let flag = match part {
                "bias" => &mut e.bias,
                "gelu" => &mut e.gelu,
                "residual" => &mut e.residual,
                "film" => &mut e.film,
                "grn_stats" => &mut e.grn_stats,
                "scaled_a" => &mut e.scaled_a,
                _ => return None,
            };
            if *flag {
                return None;
            }
            *flag = true;
        }
        Some(e)
    }

    /// What cuBLASLt does alone: a bias (its own epilogue) and a residual (as C, β = 1).
    pub fn vendor_fusable(&self) -> bool {
        !(self.gelu || self.film || self.grn_stats || self.scaled_a)
    }
}

/// How a GEMM node is looked up in a tuning table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmKey {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Samples the rows split into where FiLM, GRN or the operand scaling use them; else 1.
    pub samples: usize,
    pub epilogue: Epilogue,
    pub out: DType,
}

impl GemmKey {
    pub fn flops(&self) -> f64 {
        2.0 * (self.m * self.n) as f64 * self.k as f64
    }

    pub fn describe(&self) -> String {
        let samples = if self.samples > 1 {
            format!(" ({} samples)", self.samples)
        } else {
            String::new()
        };
        format!(
            "{}x{}x{} {}->{}{samples}",
            self.m,
            self.n,
            self.k,
            self.epilogue.name(),
            self.out.suffix()
        )
    }
}

/// The GEMM op behind a node, its plain GEMM part and its epilogue (None for other ops).
pub fn gemm_parts(op: &dyn OpImpl) -> Option<(&Gemm, Epilogue)> {
    let any = op.as_any();
    let base = |g: &Gemm| Epilogue {
        bias: g.bias,
        gelu: g.gelu,
        residual: g.residual,
        ..Epilogue::default()
    };
    if let Some(g) = any.downcast_ref::<Gemm>() {
        Some((g, base(g)))
    } else if let Some(f) = any.downcast_ref::<GemmFilm>() {
        Some((
            &f.gemm,
            Epilogue {
                film: true,
                ..base(&f.gemm)
            },
        ))
    } else if let Some(s) = any.downcast_ref::<GemmGrnStats>() {
        Some((
            &s.gemm,
            Epilogue {
                grn_stats: true,
                ..base(&s.gemm)
            },
        ))
    } else if let Some(s) = any.downcast_ref::<GemmScaledA>() {
        Some((
            &s.gemm,
            Epilogue {
                scaled_a: true,
                ..base(&s.gemm)
            },
        ))
    } else {
        None
    }
}

/// The table key of a GEMM node with these inputs (None for other ops). Every GEMM op takes
/// A `[…, K]` then W `[N, K]`; FiLM's modulation is its last input.
pub fn gemm_key(op: &dyn OpImpl, inputs: &[&TensorDesc]) -> Option<GemmKey> {
    let (gemm, epilogue) = gemm_parts(op)?;
    let a = &inputs.first()?.shape;
    let k = *a.last()?;
    let n = *inputs.get(1)?.shape.first()?;
    let samples = if epilogue.film {
        inputs.last()?.shape[0]
    } else if epilogue.grn_stats || epilogue.scaled_a {
        a[0]
    } else {
        1
    };
    Some(GemmKey {
        m: numel(a) / k.max(1),
        n,
        k,
        samples,
        epilogue,
        out: gemm.out,
    })
}

/// The shape of an attention as a tuning table records it: `batch × heads` problems of
/// `queries` queries against `queries + extra` keys, `head_dim` wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AttentionDims {
    pub batch: usize,
    pub queries: usize,
    pub extra: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub key_mask: bool,
}

/// How an attention node is looked up in a tuning table: its shape and output dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttentionKey {
    pub dims: AttentionDims,
    pub out: DType,
}

impl AttentionKey {
    fn of(op: &Attention, batch: usize, queries: usize, extra: usize, head_dim: usize) -> Self {
        AttentionKey {
            dims: AttentionDims {
                batch,
                queries,
                extra,
                heads: op.heads,
                head_dim,
                causal: op.causal,
                key_mask: op.key_mask,
            },
            out: op.out,
        }
    }
}

/// The table key of an attention node with these inputs (None for other ops): qkv
/// `[B, N, 3C]`, then (with extra keys) kv `[B, M, 2C]`.
pub fn attention_key(op: &dyn OpImpl, inputs: &[&TensorDesc]) -> Option<AttentionKey> {
    let op = op.as_any().downcast_ref::<Attention>()?;
    let &[batch, queries, qkv_channels] = inputs.first()?.shape.as_slice() else {
        return None;
    };
    let extra = if op.extra_kv {
        *inputs.get(1)?.shape.get(1)?
    } else {
        0
    };
    let head_dim = qkv_channels / 3 / op.heads.max(1);
    Some(AttentionKey::of(op, batch, queries, extra, head_dim))
}

/// One distinct GEMM to tune: the op of its first node, with that node's input and output
/// descriptions, and where it occurs.
#[derive(Clone, Debug)]
pub struct GemmProblem {
    pub key: GemmKey,
    pub op: Arc<dyn OpImpl>,
    pub inputs: Vec<TensorDesc>,
    pub outputs: Vec<TensorDesc>,
    pub uses: Vec<Use>,
}

impl AttentionProblem {
    pub fn key(&self) -> AttentionKey {
        let s = &self.shape;
        AttentionKey::of(&s.op, s.batch, s.queries, s.extra, s.head_dim)
    }
}

impl GemmProblem {
    /// Runs of every size together (for ordering).
    pub fn runs(&self) -> usize {
        self.uses.iter().map(|u| u.per_image).sum()
    }
}

/// One distinct attention, with where it occurs.
#[derive(Clone, Debug)]
pub struct AttentionProblem {
    pub shape: AttentionShape,
    pub uses: Vec<Use>,
}

/// Every distinct GEMM and attention of a generation at each size (20 Stage C steps per pass,
/// 10 Stage B steps), the most work first.
pub fn problems(
    cfg: &Configs,
    sizes: &[Size],
) -> Result<(Vec<GemmProblem>, Vec<AttentionProblem>)> {
    let mut gemms: Vec<GemmProblem> = Vec::new();
    let mut attention: Vec<AttentionProblem> = Vec::new();
    let steps = (20, 10);
    for &size in sizes {
        let size_name = size.to_string();
        let add_use = |uses: &mut Vec<Use>, runs: usize, example: &dyn Fn() -> String| match uses
            .iter_mut()
            .find(|u| u.size == size_name)
        {
            Some(u) => u.per_image += runs,
            None => uses.push(Use {
                size: size_name.clone(),
                per_image: runs,
                example: example(),
            }),
        };
        for sg in stage_graphs(cfg, size, steps)? {
            for node in &sg.graph.nodes {
                let descs = |ids: &[crate::runtime::graph::TensorId]| -> Vec<TensorDesc> {
                    ids.iter().map(|&t| sg.graph.desc(t).clone()).collect()
                };
                let inputs = descs(&node.inputs);
                let refs: Vec<&TensorDesc> = inputs.iter().collect();
                let Some(key) = gemm_key(node.op.as_ref(), &refs) else {
                    continue;
                };
                let example = || where_used(sg.stage.label(), sg.part, node);
                match gemms.iter_mut().find(|g| g.key == key) {
                    Some(g) => add_use(&mut g.uses, sg.runs, &example),
                    None => {
                        let mut uses = Vec::new();
                        add_use(&mut uses, sg.runs, &example);
                        gemms.push(GemmProblem {
                            key,
                            op: node.op.clone(),
                            inputs,
                            outputs: descs(&node.outputs),
                            uses,
                        });
                    }
                }
            }
        }
        for s in model_shapes(cfg, size, steps)?.attention {
            let same = |p: &&mut AttentionProblem| {
                (&p.shape.op, p.shape.batch, p.shape.queries, p.shape.extra)
                    == (&s.op, s.batch, s.queries, s.extra)
            };
            match attention.iter_mut().find(same) {
                Some(p) => add_use(&mut p.uses, s.per_image, &|| s.example.clone()),
                None => {
                    let mut uses = Vec::new();
                    add_use(&mut uses, s.per_image, &|| s.example.clone());
                    attention.push(AttentionProblem { shape: s, uses });
                }
            }
        }
    }
    gemms.sort_by(|a, b| {
        (b.key.flops() * b.runs() as f64).total_cmp(&(a.key.flops() * a.runs() as f64))
    });
    attention.sort_by(|a, b| {
        let w = |p: &AttentionProblem| {
            p.shape.flops() * p.uses.iter().map(|u| u.per_image).sum::<usize>() as f64
        };
        w(b).total_cmp(&w(a))
    });
    Ok((gemms, attention))
}

/// The problems as JSON (`tune --list`): GEMM keys with their uses, attention shapes.
pub fn list_json(gemms: &[GemmProblem], attention: &[AttentionProblem]) -> serde_json::Value {
    let gemms: Vec<_> = gemms
        .iter()
        .map(|g| {
            serde_json::json!({
                "m": g.key.m, "n": g.key.n, "k": g.key.k, "samples": g.key.samples,
                "epilogue": g.key.epilogue.name(), "out_dtype": g.key.out.suffix(),
                "uses": g.uses,
            })
        })
        .collect();
    let attention: Vec<_> = attention
        .iter()
        .map(|a| {
            let s = &a.shape;
            serde_json::json!({
                "batch": s.batch, "queries": s.queries, "extra": s.extra,
                "heads": s.op.heads, "head_dim": s.head_dim, "causal": s.op.causal,
                "key_mask": s.op.key_mask, "uses": a.uses,
            })
        })
        .collect();
    serde_json::json!({"gemm": gemms, "attention": attention})
}

fn where_used(stage: &str, part: &str, node: &Node) -> String {
    format!("{stage} {part}: {}", node.label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epilogue_names_round_trip() {
        for bits in 0u32..64 {
            let f = |i: u32| bits & (1 << i) != 0;
            let e = Epilogue {
                bias: f(0),
                gelu: f(1),
                residual: f(2),
                film: f(3),
                grn_stats: f(4),
                scaled_a: f(5),
            };
            assert_eq!(Epilogue::parse(&e.name()), Some(e), "{}", e.name());
        }
        assert_eq!(Epilogue::default().name(), "none");
        assert_eq!(Epilogue::parse("bias+bias"), None);
        assert_eq!(Epilogue::parse("bias+relu"), None);
    }
}
