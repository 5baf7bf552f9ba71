//! Kernel checks: every op on fresh random inputs (odd shapes included) through a backend,
//! compared with its f32 CPU reference. Used by the test suite on the host emulator and by
//! `ultrapixel verify` on the GPU, so the same checks run everywhere.

use crate::runtime::graph::{Graph, TensorId};
use crate::runtime::session::SessionOptions;
use crate::runtime::Backend;
use crate::tensor::{bf16_bits_to_f32, f32_to_bf16_bits, DType, HostTensor};
use crate::Result;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::collections::HashMap;

/// Pass when max|out − ref| ≤ atol + rtol · max|ref|.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    pub atol: f32,
    pub rtol: f32,
}

impl Tolerance {
    /// Outputs rounded to bf16: one rounding (2⁻⁹ relative) plus accumulation-order slack.
    pub const BF16_OUT: Tolerance = Tolerance {
        atol: 1e-6,
        rtol: 8e-3,
    };
}

/// Tensors with at least this many values are drawn in parallel chunks of [`DRAW_CHUNK`]
/// (above every emulator-size tensor, whose values stay those of one serial stream).
pub const PARALLEL_DRAW: usize = 1 << 20;
const DRAW_CHUNK: usize = 1 << 16;

/// How big the shapes get: the emulator runs small shapes, a GPU adds larger ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    Emulator,
    Gpu,
}

/// One op instance with its inputs, ready to run on any backend.
pub struct OpCheck {
    pub name: String,
    pub graph: Graph,
    pub inputs: Vec<(TensorId, Vec<f32>)>,
    pub weights: HashMap<String, HostTensor>,
    pub tol: Tolerance,
}

/// Builds an [`OpCheck`]: random inputs and weights, exactly representable in their
/// storage dtype so the reference and the kernels see the same values.
pub struct CheckBuilder {
    pub graph: Graph,
    rng: StdRng,
    inputs: Vec<(TensorId, Vec<f32>)>,
    weights: HashMap<String, HostTensor>,
}

impl CheckBuilder {
    pub fn new(seed: u64) -> Self {
        CheckBuilder {
            graph: Graph::new(),
            rng: StdRng::seed_from_u64(seed),
            inputs: Vec::new(),
            weights: HashMap::new(),
        }
    }

    /// Uniform values in [-scale, scale), rounded to the dtype. Tensors of at least
    /// [`PARALLEL_DRAW`] values (GPU-size checks only) are drawn in parallel, in chunks with
    /// their own generators seeded from this one: deterministic for any thread count.
    pub fn values(&mut self, n: usize, scale: f32, dtype: DType) -> Vec<f32> {
        let draw = |rng: &mut StdRng, out: &mut [f32]| {
            for o in out {
                let v = (rng.random::<f32>() * 2.0 - 1.0) * scale;
                *o = match dtype {
                    DType::F32 => v,
                    DType::BF16 => bf16_bits_to_f32(f32_to_bf16_bits(v)),
                };
            }
        };
        let mut v = vec![0f32; n];
        if n < PARALLEL_DRAW {
            draw(&mut self.rng, &mut v);
        } else {
            use rayon::prelude::*;
            let base: u64 = self.rng.random();
            v.par_chunks_mut(DRAW_CHUNK)
                .enumerate()
                .for_each(|(i, chunk)| {
                    let mut rng = StdRng::seed_from_u64(base.wrapping_add(i as u64));
                    draw(&mut rng, chunk);
                });
        }
        v
    }

    pub fn input(&mut self, shape: &[usize], dtype: DType, scale: f32) -> Result<TensorId> {
        let name = format!("in{}", self.inputs.len());
        let id = self.graph.input(&name, shape, dtype)?;
        let v = self.values(id_numel(shape), scale, dtype);
        self.inputs.push((id, v));
        Ok(id)
    }

    /// An f32 key mask: 0 (masked) with probability `p_masked`, 1 otherwise; the first entry
    /// along the last axis always 1, as CLIP's BOS token is always visible.
    pub fn mask(&mut self, shape: &[usize], p_masked: f32) -> Result<TensorId> {
        let name = format!("in{}", self.inputs.len());
        let id = self.graph.input(&name, shape, DType::F32)?;
        let last = *shape.last().unwrap_or(&1);
        let v = (0..id_numel(shape))
            .map(|i| (i % last == 0 || self.rng.random::<f32>() >= p_masked) as u8 as f32)
            .collect();
        self.inputs.push((id, v));
        Ok(id)
    }

    /// An input with the given values (e.g. a noise key).
    pub fn input_values(&mut self, shape: &[usize], values: &[f32]) -> Result<TensorId> {
        let name = format!("in{}", self.inputs.len());
        let id = self.graph.input(&name, shape, DType::F32)?;
        self.inputs.push((id, values.to_vec()));
        Ok(id)
    }

    pub fn weight(&mut self, shape: &[usize], dtype: DType, scale: f32) -> Result<TensorId> {
        let name = format!("w{}", self.weights.len());
        let id = self.graph.weight(&name, shape, dtype)?;
        let v = self.values(id_numel(shape), scale, dtype);
        self.weights
            .insert(name, HostTensor::new(shape.to_vec(), v));
        Ok(id)
    }

    pub fn finish(mut self, name: String, outputs: &[TensorId], tol: Tolerance) -> Result<OpCheck> {
        for (i, &o) in outputs.iter().enumerate() {
            self.graph.output(o, &format!("out{i}"))?;
        }
        Ok(OpCheck {
            name,
            graph: self.graph,
            inputs: self.inputs,
            weights: self.weights,
            tol,
        })
    }
}

fn id_numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

#[derive(Clone, Debug)]
pub struct CheckResult {
    pub check: String,
    pub output: String,
    pub max_err: f32,
    pub max_ref: f32,
    pub limit: f32,
    /// Elements that are NaN/Inf in the output but finite in the reference (unwritten or
    /// overflowed).
    pub non_finite: usize,
}

impl CheckResult {
    pub fn passed(&self) -> bool {
        self.non_finite == 0 && self.max_err <= self.limit
    }
}

/// Compares one output with its reference.
pub fn compare(
    check: &str,
    output: &str,
    out: &[f32],
    reference: &[f32],
    tol: Tolerance,
) -> CheckResult {
    let max_ref = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut max_err = 0f32;
    let mut non_finite = 0;
    for (&o, &r) in out.iter().zip(reference) {
        if !o.is_finite() && r.is_finite() {
            non_finite += 1;
        } else {
            max_err = max_err.max((o - r).abs());
        }
    }
    CheckResult {
        check: check.to_string(),
        output: output.to_string(),
        max_err,
        max_ref,
        limit: tol.atol + tol.rtol * max_ref,
        non_finite: non_finite + out.len().abs_diff(reference.len()),
    }
}

/// Runs `check` on the CPU reference and on `backend` (outputs poisoned first) and compares
/// every output.
pub fn run_check(check: &OpCheck, backend: &Backend) -> Result<Vec<CheckResult>> {
    let reference = run_on(check, &Backend::Cpu)?;
    let got = run_on(check, backend)?;
    Ok(check
        .graph
        .outputs
        .iter()
        .zip(reference.iter().zip(&got))
        .map(|(&o, (r, g))| compare(&check.name, &check.graph.desc(o).name, g, r, check.tol))
        .collect())
}

/// Runs a check's graph on one backend and returns its outputs.
pub fn run_on(check: &OpCheck, backend: &Backend) -> Result<Vec<Vec<f32>>> {
    let mut s = backend.session(
        check.graph.clone(),
        &check.weights,
        SessionOptions { poison: true },
    )?;
    for (id, v) in &check.inputs {
        s.set_input(*id, v)?;
    }
    s.run()?;
    check.graph.outputs.iter().map(|&o| s.read(o)).collect()
}

/// Every op check of every kernel family.
pub fn all_checks(seed: u64, scale: Scale) -> Result<Vec<OpCheck>> {
    let mut v = crate::ops::norm::checks(seed, scale)?;
    v.extend(crate::ops::elementwise::checks(seed ^ 0x1, scale)?);
    v.extend(crate::ops::gemm::checks(seed ^ 0x2, scale)?);
    v.extend(crate::ops::attention::checks(seed ^ 0x3, scale)?);
    v.extend(crate::ops::conv::checks(seed ^ 0x4, scale)?);
    v.extend(crate::ops::grn::checks(seed ^ 0x6, scale)?);
    v.extend(crate::ops::inr::checks(seed ^ 0x7, scale)?);
    v.extend(crate::ops::noise::checks(seed ^ 0xb, scale)?);
    v.extend(crate::ops::layout::checks(seed ^ 0x5, scale)?);
    v.extend(crate::ops::resample::checks(seed ^ 0x8, scale)?);
    v.extend(crate::ops::embed::checks(seed ^ 0x9, scale)?);
    v.extend(crate::ops::sampler::checks(seed ^ 0xa, scale)?);
    Ok(v)
}
