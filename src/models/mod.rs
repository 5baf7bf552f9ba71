//! The networks of the cascade, each recorded as an op graph, and how their graph weights are
//! made from checkpoint tensors.
//!
//! A model records its forward pass through a [`ModelBuilder`]: every parameter is either a
//! checkpoint tensor (possibly reshaped) or derived from declared checkpoint tensors (a q/k/v
//! concatenation, a transposed conv kernel, a folded scalar). The resulting [`WeightPlan`]
//! knows every checkpoint key and shape the graph needs (its manifest) and, bound to a
//! [`Checkpoint`], serves the graph's weights to any executor.

pub mod blocks;
pub mod clip_text;
pub mod config;
pub mod controlnet;
pub mod effnet;
pub mod effnet_encoder;
pub mod inr;
pub mod previewer;
pub mod stage_a;
pub mod stage_b;
pub mod stage_c;

use crate::runtime::graph::{Graph, TensorId};
use crate::runtime::session::WeightSource;
use crate::tensor::{numel, DType, HostTensor};
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Checkpoint tensors stacked along their first axis (q, k, v projections into one packed
/// weight): a [`ModelBuilder::derived`] transform.
pub fn stack_rows(t: &[HostTensor]) -> Result<HostTensor> {
    let mut shape = t[0].shape.clone();
    shape[0] = t.iter().map(|x| x.shape[0]).sum();
    let data = t.iter().flat_map(|x| x.data.iter().copied()).collect();
    Ok(HostTensor::new(shape, data))
}

/// Checkpoint keys with their shapes.
pub type Manifest = Vec<(String, Vec<usize>)>;

/// The checkpoint keys (with shapes) that `record` reads.
pub fn manifest_of(record: impl FnOnce(&mut ModelBuilder) -> Result<()>) -> Result<Manifest> {
    let mut mb = ModelBuilder::new();
    record(&mut mb)?;
    Ok(mb.finish().1.manifest())
}

/// Read access to checkpoint tensors by their original (Stable Cascade / HF) names.
pub trait Checkpoint {
    fn tensor(&self, key: &str) -> Result<HostTensor>;
}

impl Checkpoint for HashMap<String, HostTensor> {
    fn tensor(&self, key: &str) -> Result<HostTensor> {
        self.get(key)
            .cloned()
            .ok_or_else(|| Error::Weights(format!("missing tensor {key}")))
    }
}

type Transform = Arc<dyn Fn(&[HostTensor]) -> Result<HostTensor> + Send + Sync>;

/// How one graph weight is made.
#[derive(Clone)]
struct Recipe {
    /// Checkpoint keys it reads, with their expected shapes.
    sources: Vec<(String, Vec<usize>)>,
    /// The graph tensor's shape.
    shape: Vec<usize>,
    /// None: the single source, reshaped to `shape`.
    transform: Option<Transform>,
}

/// Records a model: the graph plus the recipe of each of its weights.
#[derive(Default)]
pub struct ModelBuilder {
    pub g: Graph,
    recipes: BTreeMap<String, Recipe>,
}

impl ModelBuilder {
    pub fn new() -> Self {
        ModelBuilder::default()
    }

    /// A checkpoint tensor used as is.
    pub fn weight(&mut self, key: &str, shape: &[usize], dtype: DType) -> Result<TensorId> {
        self.weight_as(key, shape, shape, dtype)
    }

    /// A checkpoint tensor of shape `ckpt_shape`, seen by the graph as `shape` (same element
    /// count, same order: e.g. a `[C, 1, 3, 3]` depthwise kernel as `[C, 9]`).
    pub fn weight_as(
        &mut self,
        key: &str,
        ckpt_shape: &[usize],
        shape: &[usize],
        dtype: DType,
    ) -> Result<TensorId> {
        if numel(ckpt_shape) != numel(shape) {
            return Err(Error::Weights(format!(
                "{key}: cannot view {ckpt_shape:?} as {shape:?}"
            )));
        }
        self.add(
            key,
            Recipe {
                sources: vec![(key.to_string(), ckpt_shape.to_vec())],
                shape: shape.to_vec(),
                transform: None,
            },
            dtype,
        )
    }

    /// A weight computed from checkpoint tensors: `f` receives the `sources` in order and
    /// must return a tensor of `shape`. `name` must not collide with a checkpoint key.
    pub fn derived(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        sources: &[(&str, &[usize])],
        f: impl Fn(&[HostTensor]) -> Result<HostTensor> + Send + Sync + 'static,
    ) -> Result<TensorId> {
        self.add(
            name,
            Recipe {
                sources: sources
                    .iter()
                    .map(|(k, s)| (k.to_string(), s.to_vec()))
                    .collect(),
                shape: shape.to_vec(),
                transform: Some(Arc::new(f)),
            },
            dtype,
        )
    }

    fn add(&mut self, name: &str, recipe: Recipe, dtype: DType) -> Result<TensorId> {
        let id = self.g.weight(name, &recipe.shape, dtype)?;
        if let Some(old) = self.recipes.get(name) {
            if old.sources != recipe.sources {
                return Err(Error::Weights(format!(
                    "weight {name} recorded with two recipes"
                )));
            }
        }
        self.recipes.insert(name.to_string(), recipe);
        Ok(id)
    }

    pub fn finish(self) -> (Graph, WeightPlan) {
        (
            self.g,
            WeightPlan {
                recipes: self.recipes,
            },
        )
    }
}

/// The recipes of a graph's weights.
#[derive(Clone, Default)]
pub struct WeightPlan {
    recipes: BTreeMap<String, Recipe>,
}

impl WeightPlan {
    /// Every checkpoint key the graph reads, with its expected shape (sorted, unique).
    pub fn manifest(&self) -> Manifest {
        let mut m: BTreeMap<&str, &[usize]> = BTreeMap::new();
        for r in self.recipes.values() {
            for (k, s) in &r.sources {
                m.insert(k, s);
            }
        }
        m.into_iter()
            .map(|(k, s)| (k.to_string(), s.to_vec()))
            .collect()
    }

    /// Serves the graph's weights from `ckpt`.
    pub fn bind<'a>(&'a self, ckpt: &'a dyn Checkpoint) -> BoundWeights<'a> {
        BoundWeights { plan: self, ckpt }
    }
}

pub struct BoundWeights<'a> {
    plan: &'a WeightPlan,
    ckpt: &'a dyn Checkpoint,
}

impl WeightSource for BoundWeights<'_> {
    fn tensor(&self, name: &str) -> Result<HostTensor> {
        let r = self
            .plan
            .recipes
            .get(name)
            .ok_or_else(|| Error::Weights(format!("no recipe for graph weight {name}")))?;
        let mut sources = Vec::with_capacity(r.sources.len());
        for (key, shape) in &r.sources {
            let t = self.ckpt.tensor(key)?;
            if &t.shape != shape {
                return Err(Error::Weights(format!(
                    "{key}: expected shape {shape:?}, found {:?}",
                    t.shape
                )));
            }
            sources.push(t);
        }
        let t = match &r.transform {
            None => sources.pop().expect("one source").reshaped(&r.shape),
            Some(f) => f(&sources)?,
        };
        if t.shape != r.shape {
            return Err(Error::Weights(format!(
                "{name}: derived tensor has shape {:?}, expected {:?}",
                t.shape, r.shape
            )));
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipes_reshape_derive_and_list_the_manifest() {
        let mut ckpt = HashMap::new();
        ckpt.insert(
            "a".to_string(),
            HostTensor::new(vec![2, 1, 1, 3], vec![1., 2., 3., 4., 5., 6.]),
        );
        ckpt.insert("b".to_string(), HostTensor::new(vec![2], vec![10., 20.]));
        let mut mb = ModelBuilder::new();
        mb.weight_as("a", &[2, 1, 1, 3], &[2, 3], DType::F32)
            .unwrap();
        mb.derived(
            "a+b",
            &[2],
            DType::F32,
            &[("a", &[2, 1, 1, 3]), ("b", &[2])],
            |s| {
                Ok(HostTensor::new(
                    vec![2],
                    vec![s[0].data[0] + s[1].data[0], s[0].data[3] + s[1].data[1]],
                ))
            },
        )
        .unwrap();
        let (_, plan) = mb.finish();
        assert_eq!(
            plan.manifest(),
            vec![
                ("a".to_string(), vec![2, 1, 1, 3]),
                ("b".to_string(), vec![2])
            ]
        );
        let w = plan.bind(&ckpt);
        assert_eq!(w.tensor("a").unwrap().shape, vec![2, 3]);
        assert_eq!(w.tensor("a+b").unwrap().data, vec![11., 24.]);
        ckpt.insert("b".to_string(), HostTensor::new(vec![3], vec![0.; 3]));
        let err = plan.bind(&ckpt).tensor("a+b").unwrap_err().to_string();
        assert!(err.contains("expected shape [2]"), "{err}");
    }
}
