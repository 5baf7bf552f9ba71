//! GlobalResponseNorm (ConvNeXt-V2 GRN, Stable Cascade's ResBlock MLP) as a modulation:
//! the op computes the per-sample, per-channel factors, and the existing
//! [`Film`](super::elementwise::Film) with k = 1 applies them, since
//! γ·(h·N) + β + h = h·(1 + γ·N) + β.
//!
//! `G[b,d] = √(Σ_p h[b,p,d]²)` over every pixel p, N = G / (mean_d G + eps). The reduction over
//! all pixels is a barrier between the MLP's two GEMMs; the kernels may fuse the sum of
//! squares into the first GEMM's epilogue and fold the factor into the second GEMM.

use super::math::sums_of_squares;
use super::{inputs_n, require_f32, to_i32, Shaped};
use crate::runtime::graph::{LaunchIo, OpImpl, OutSpec, TensorDesc};
use crate::runtime::kernel_choice::KernelChoice;
use crate::runtime::kernels::KernelId;
use crate::runtime::launch::{ceil_div, Args, Launch};
use crate::tensor::{DType, HostTensor};
use crate::verify::{CheckBuilder, OpCheck, Scale, Tolerance};
use crate::{Error, Result};

/// Inputs `h [B, …, D]` (the pixels in between), f32 `gamma [D]`, f32 `beta [D]`. Output f32
/// `ab [B, 2D]`: `a = γ_d·N[b,d]`, `b = β_d`, the modulation `Film { k: 1 }` takes.
#[derive(Clone, Debug, PartialEq)]
pub struct GrnModulation {
    /// 1e-6 in Stable Cascade.
    pub eps: f32,
}

impl GrnModulation {
    /// (B, pixels per sample, D).
    fn dims<T: Shaped>(&self, ins: &[&T]) -> Result<(usize, usize, usize)> {
        let op = self.name();
        let [h, gamma, beta] = inputs_n(op, ins)?;
        let shape = h.shape();
        let (b, d) = match shape {
            [b, .., d] if shape.len() >= 2 && *b > 0 && *d > 0 => (*b, *d),
            _ => {
                return Err(Error::shape(
                    op,
                    format!("h must be a non-empty [B, …, D], got {shape:?}"),
                ))
            }
        };
        for (what, p) in [("gamma", gamma), ("beta", beta)] {
            if p.shape() != [d] {
                return Err(Error::shape(
                    op,
                    format!("{what} must be [{d}], got {:?}", p.shape()),
                ));
            }
        }
        Ok((b, shape.iter().product::<usize>() / (b * d), d))
    }
}

impl OpImpl for GrnModulation {
    fn name(&self) -> &'static str {
        "grn_modulation"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let (b, _, d) = self.dims(inputs)?;
        require_f32(self.name(), "gamma", inputs[1])?;
        require_f32(self.name(), "beta", inputs[2])?;
        Ok(vec![(vec![b, 2 * d], DType::F32)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let (_, pixels, d) = self.dims(inputs)?;
        let (h, gamma, beta) = (&inputs[0].data, &inputs[1].data, &inputs[2].data);
        for (sample, ab) in h
            .chunks_exact(pixels * d)
            .zip(outputs[0].data.chunks_exact_mut(2 * d))
        {
            let ss = sums_of_squares(sample, d);
            modulation_from_sumsq(&ss, gamma, beta, self.eps, ab);
        }
        Ok(())
    }

    /// The per-(sample, channel) sums of squares between the two launches.
    fn workspace_bytes(&self, inputs: &[&TensorDesc], _: KernelChoice) -> usize {
        self.dims(inputs).map_or(0, |(b, _, d)| b * d * 4)
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let op = self.name();
        let descs: Vec<&TensorDesc> = io.inputs.iter().map(|t| t.desc).collect();
        let (b, pixels, d) = self.dims(&descs)?;
        let batch = to_i32(op, "B", b)?;
        if batch > 65535 {
            return Err(Error::shape(op, format!("batch {b} exceeds 65535")));
        }
        let ss = io.workspace;
        let sumsq = Launch {
            kernel: KernelId::lookup(&format!("grn_sumsq_{}", descs[0].dtype.suffix()))?,
            grid: [ceil_div(d, 32) as u32, batch as u32, 1],
            block: [256, 1, 1],
            smem: 0,
            args: Args::new()
                .ptr(io.inputs[0].ptr)
                .ptr(ss)
                .u64(pixels as u64)
                .i32(to_i32(op, "D", d)?),
        };
        let finish = finish_launch(op, io, ss, b, d, self.eps)?;
        Ok(vec![sumsq, finish])
    }
}

/// Hostsim/GPU checks: odd pixel counts and channel counts (not multiples of 32), both dtypes.
pub fn checks(seed: u64, scale: Scale) -> Result<Vec<OpCheck>> {
    let mut shapes = vec![(1, 1, 1), (2, 63, 37), (3, 7, 130), (1, 1000, 64)];
    if scale == Scale::Gpu {
        shapes.push((2, 128 * 128, 2560));
    }
    let mut v = Vec::new();
    for (i, &(b, p, d)) in shapes.iter().enumerate() {
        for dtype in [DType::F32, DType::BF16] {
            let mut cb =
                CheckBuilder::new(seed.wrapping_add(i as u64 * 2 + (dtype == DType::BF16) as u64));
            let h = cb.input(&[b, p, d], dtype, 2.0)?;
            let gamma = cb.input(&[d], DType::F32, 1.0)?;
            let beta = cb.input(&[d], DType::F32, 1.0)?;
            let y = cb
                .graph
                .op1(GrnModulation { eps: 1e-6 }, &[h, gamma, beta])?;
            v.push(cb.finish(
                format!("grn_modulation {dtype:?} [{b},{p},{d}]"),
                &[y],
                Tolerance {
                    atol: 0.0,
                    rtol: modulation_rtol(p, d),
                },
            )?);
        }
    }
    Ok(v)
}

/// A bound on the relative error of every output of [`GrnModulation`] over p pixels and d
/// channels (relative to max|ref| too, since the β half is copied exactly): grn_sumsq sums
/// positive terms in f32 (≤ p/8 per warp, then 8 partials): sum(p/8 + 9, u) relative on Σh²;
/// G = √Σh² half of that + u; the mean of G (a block sum over ≤ d/256 + 8 steps) the largest
/// G error + sum(d/256 + 8, u) + 2u; a = γ·G/(mean + eps) both + 2u; the reference rounds its
/// f64 once: ≤ sum(p/8 + 9, u) + sum(d/256 + 8, u) + 7u.
fn modulation_rtol(p: usize, d: usize) -> f32 {
    use crate::verify::bound::{sum, U};
    (sum(p / 8 + 9, U) + sum(d / 256 + 8, U) + 7.0 * U) as f32
}

/// One sample's `ab` row from its per-channel sums of squares: a = γ·G/(mean G + eps), b = β.
fn modulation_from_sumsq(ss: &[f64], gamma: &[f32], beta: &[f32], eps: f32, ab: &mut [f32]) {
    let g: Vec<f64> = ss.iter().map(|v| v.sqrt()).collect();
    let denom = g.iter().sum::<f64>() / g.len() as f64 + eps as f64;
    let (a, b) = ab.split_at_mut(g.len());
    for ((a, gv), &gm) in a.iter_mut().zip(&g).zip(gamma) {
        *a = (gm as f64 * gv / denom) as f32;
    }
    b.copy_from_slice(beta);
}

/// The GRN modulation from sums of squares computed elsewhere (the epilogue of the GEMM that
/// made the hidden, [`GemmGrnStats`](super::gemm::GemmGrnStats)). Inputs f32 `sumsq [B, D]`,
/// `gamma [D]`, `beta [D]`; output f32 `ab [B, 2D]` as [`GrnModulation`]'s.
#[derive(Clone, Debug, PartialEq)]
pub struct GrnFromSumsq {
    pub eps: f32,
}

impl OpImpl for GrnFromSumsq {
    fn name(&self) -> &'static str {
        "grn_from_sumsq"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let [ss, gamma, beta] = inputs_n(self.name(), inputs)?;
        let [b, d] = ss.shape[..] else {
            return Err(Error::shape(
                self.name(),
                format!("sumsq must be [B, D], got {:?}", ss.shape),
            ));
        };
        for t in [ss, gamma, beta] {
            require_f32(self.name(), &t.name, t)?;
        }
        if gamma.shape != [d] || beta.shape != [d] {
            return Err(Error::shape(
                self.name(),
                format!("gamma and beta must be [{d}]"),
            ));
        }
        Ok(vec![(vec![b, 2 * d], DType::F32)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let d = inputs[1].data.len();
        for (ss, ab) in inputs[0]
            .data
            .chunks_exact(d)
            .zip(outputs[0].data.chunks_exact_mut(2 * d))
        {
            let ss: Vec<f64> = ss.iter().map(|&v| v as f64).collect();
            modulation_from_sumsq(&ss, &inputs[1].data, &inputs[2].data, self.eps, ab);
        }
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let op = self.name();
        let [b, d] = io.inputs[0].desc.shape[..] else {
            return Err(Error::shape(op, "sumsq must be [B, D]"));
        };
        Ok(vec![finish_launch(
            op,
            io,
            io.inputs[0].ptr,
            b,
            d,
            self.eps,
        )?])
    }
}

/// `grn_finish` over sums of squares at `ss`: one block per sample.
fn finish_launch(op: &str, io: &LaunchIo, ss: u64, b: usize, d: usize, eps: f32) -> Result<Launch> {
    let batch = to_i32(op, "B", b)?;
    if batch > 65535 {
        return Err(Error::shape(op, format!("batch {b} exceeds 65535")));
    }
    Ok(Launch::linear(
        KernelId::lookup("grn_finish")?,
        batch as u32,
        256,
        Args::new()
            .ptr(ss)
            .ptr(io.inputs[1].ptr)
            .ptr(io.inputs[2].ptr)
            .ptr(io.outputs[0].ptr)
            .i32(to_i32(op, "D", d)?)
            .f32(eps),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::elementwise::Film;
    use crate::ops::test_support::{desc, run};
    use crate::runtime::session::SessionOptions;
    use crate::runtime::Backend;
    use crate::verify::CheckBuilder;
    use std::collections::HashMap;

    /// GRN straight from its definition, per (sample, channel), in f64.
    fn grn_direct(
        h: &[f32],
        (b, p, d): (usize, usize, usize),
        gamma: &[f32],
        beta: &[f32],
    ) -> Vec<f32> {
        let at = |s: usize, px: usize, ch: usize| h[(s * p + px) * d + ch] as f64;
        let mut out = vec![0f32; h.len()];
        for s in 0..b {
            let g: Vec<f64> = (0..d)
                .map(|ch| (0..p).map(|px| at(s, px, ch).powi(2)).sum::<f64>().sqrt())
                .collect();
            let mean = g.iter().sum::<f64>() / d as f64;
            for px in 0..p {
                for ch in 0..d {
                    let x = at(s, px, ch);
                    let n = g[ch] / (mean + 1e-6);
                    out[(s * p + px) * d + ch] =
                        (gamma[ch] as f64 * (x * n) + beta[ch] as f64 + x) as f32;
                }
            }
        }
        out
    }

    #[test]
    fn film_of_the_modulation_is_grn_on_the_cpu_executor() {
        let (b, hh, ww, d) = (3, 5, 7, 19);
        let mut cb = CheckBuilder::new(11);
        let h = cb.input(&[b, hh, ww, d], DType::F32, 3.0).unwrap();
        let gamma = cb.input(&[d], DType::F32, 1.0).unwrap();
        let beta = cb.input(&[d], DType::F32, 1.0).unwrap();
        let ab = cb
            .graph
            .op1(GrnModulation { eps: 1e-6 }, &[h, gamma, beta])
            .unwrap();
        let y = cb
            .graph
            .op1(
                Film {
                    k: 1.0,
                    out: DType::F32,
                },
                &[h, ab],
            )
            .unwrap();
        let check = cb
            .finish(
                "grn".into(),
                &[y],
                crate::verify::Tolerance {
                    atol: 0.0,
                    rtol: 0.0,
                },
            )
            .unwrap();
        let mut s = Backend::Cpu
            .session(
                check.graph.clone(),
                &HashMap::new(),
                SessionOptions::default(),
            )
            .unwrap();
        for (id, v) in &check.inputs {
            s.set_input(*id, v).unwrap();
        }
        s.run().unwrap();
        let got = s.read(y).unwrap();
        let [hv, gv, bv] = [0, 1, 2].map(|i| check.inputs[i].1.as_slice());
        let want = grn_direct(hv, (b, hh * ww, d), gv, bv);
        let max_ref = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err <= 2e-6 * max_ref,
            "max err {err} for max|ref| {max_ref}"
        );
    }

    #[test]
    fn one_pixel_rank_two_input_works() {
        // [B, D]: one pixel per sample, G = |h|.
        let h = HostTensor::new(vec![1, 2], vec![3.0, -1.0]);
        let ones = HostTensor::new(vec![2], vec![1.0, 1.0]);
        let zeros = HostTensor::zeros(&[2]);
        let ab = run(&GrnModulation { eps: 0.0 }, &[&h, &ones, &zeros]).unwrap();
        assert_eq!(ab.data, vec![1.5, 0.5, 0.0, 0.0]);
    }

    #[test]
    fn bad_shapes_and_dtypes_are_errors() {
        let op = GrnModulation { eps: 1e-6 };
        let d = |s: &[usize]| desc(s, DType::F32);
        let infer = |ins: &[TensorDesc]| op.infer(&ins.iter().collect::<Vec<_>>());
        assert!(infer(&[d(&[2, 4, 8]), d(&[8]), d(&[8])]).is_ok());
        assert!(
            infer(&[d(&[8]), d(&[8]), d(&[8])]).is_err(),
            "no batch axis"
        );
        assert!(infer(&[d(&[0, 4, 8]), d(&[8]), d(&[8])]).is_err(), "empty");
        assert!(infer(&[d(&[2, 4, 8]), d(&[7]), d(&[8])]).is_err(), "gamma");
        assert!(
            infer(&[d(&[2, 4, 8]), d(&[8]), d(&[1, 8])]).is_err(),
            "beta"
        );
        assert!(infer(&[d(&[2, 4, 8]), d(&[8])]).is_err(), "arity");
        assert!(
            infer(&[d(&[2, 4, 8]), desc(&[8], DType::BF16), d(&[8])]).is_err(),
            "bf16 gamma"
        );
        assert!(
            infer(&[desc(&[2, 4, 8], DType::BF16), d(&[8]), d(&[8])]).is_ok(),
            "bf16 h"
        );
    }
}
