//! Elementwise ops (`kernels/elementwise.cu`): exact GELU, SiLU, `a + α·b`, and FiLM
//! `x·(k + a) + b` with per-sample, per-channel a and b.

use super::math::{gelu_ref, silu_ref};
use super::{arity, linear_launch, rows_channels, to_i32};
use crate::runtime::graph::{LaunchIo, OpImpl, OutSpec, TensorDesc};
use crate::runtime::launch::{Args, Launch};
use crate::tensor::{DType, HostTensor};
use crate::verify::{seed_sequence, CheckBuilder, OpCheck, Scale, Tolerance};
use crate::{Error, Result};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Gelu,
    Silu,
}

impl Act {
    fn apply(self, x: f32) -> f32 {
        match self {
            Act::Gelu => gelu_ref(x),
            Act::Silu => silu_ref(x),
        }
    }

    fn kernel(self) -> &'static str {
        match self {
            Act::Gelu => "gelu",
            Act::Silu => "silu",
        }
    }
}

/// An elementwise activation.
#[derive(Clone, Debug, PartialEq)]
pub struct Activation {
    pub act: Act,
    pub out: DType,
}

impl OpImpl for Activation {
    fn name(&self) -> &'static str {
        self.act.kernel()
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let ins = arity(self.name(), inputs, 1)?;
        Ok(vec![(ins[0].shape.clone(), self.out)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        outputs[0]
            .data
            .par_iter_mut()
            .zip(&inputs[0].data)
            .for_each(|(o, &x)| *o = self.act.apply(x));
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let x = io.inputs[0];
        let n = x.desc.numel();
        let name = format!(
            "{}_{}_{}",
            self.act.kernel(),
            x.desc.dtype.suffix(),
            self.out.suffix()
        );
        linear_launch(
            &name,
            n,
            Args::new().ptr(x.ptr).ptr(io.outputs[0].ptr).u64(n as u64),
        )
    }
}

/// `y = a + α·b` (same shapes).
#[derive(Clone, Debug, PartialEq)]
pub struct Add {
    pub alpha: f32,
    pub out: DType,
}

impl Add {
    pub fn plain(out: DType) -> Self {
        Add { alpha: 1.0, out }
    }
}

impl OpImpl for Add {
    fn name(&self) -> &'static str {
        "add"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let ins = arity(self.name(), inputs, 2)?;
        if ins[0].shape != ins[1].shape {
            return Err(Error::shape(
                self.name(),
                format!("shapes differ: {:?} and {:?}", ins[0].shape, ins[1].shape),
            ));
        }
        Ok(vec![(ins[0].shape.clone(), self.out)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        outputs[0]
            .data
            .par_iter_mut()
            .zip(&inputs[0].data)
            .zip(&inputs[1].data)
            .for_each(|((o, a), b)| *o = a + self.alpha * b);
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let (a, b) = (io.inputs[0], io.inputs[1]);
        let n = a.desc.numel();
        let name = format!(
            "add_{}_{}_{}",
            a.desc.dtype.suffix(),
            b.desc.dtype.suffix(),
            self.out.suffix()
        );
        let args = Args::new()
            .ptr(a.ptr)
            .ptr(b.ptr)
            .ptr(io.outputs[0].ptr)
            .u64(n as u64)
            .f32(self.alpha);
        linear_launch(&name, n, args)
    }
}

/// FiLM: `y = x·(k + a) + b` where `ab` is f32 `[B, 2C]` (a = first C columns) and x is
/// `[B, …, C]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Film {
    pub k: f32,
    pub out: DType,
}

impl Film {
    fn dims(&self, x: &[usize], ab: &[usize]) -> Result<(usize, usize)> {
        let (_, c) = rows_channels(self.name(), x)?;
        let b = x[0];
        if ab != [b, 2 * c] {
            return Err(Error::shape(
                self.name(),
                format!(
                    "modulation must be [{b}, {}] for x {x:?}, got {ab:?}",
                    2 * c
                ),
            ));
        }
        Ok((c, x.iter().product::<usize>() / b))
    }
}

impl OpImpl for Film {
    fn name(&self) -> &'static str {
        "film"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let ins = arity(self.name(), inputs, 2)?;
        if ins[1].dtype != DType::F32 {
            return Err(Error::shape(self.name(), "the modulation must be f32"));
        }
        self.dims(&ins[0].shape, &ins[1].shape)?;
        Ok(vec![(ins[0].shape.clone(), self.out)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let (x, ab) = (inputs[0], inputs[1]);
        let (c, per_sample) = self.dims(&x.shape, &ab.shape)?;
        outputs[0]
            .data
            .par_iter_mut()
            .zip(&x.data)
            .enumerate()
            .for_each(|(i, (o, &v))| {
                let row = &ab.data[(i / per_sample) * 2 * c..][..2 * c];
                let ch = i % c;
                *o = v * (self.k + row[ch]) + row[c + ch];
            });
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let (x, ab) = (io.inputs[0], io.inputs[1]);
        let (c, per_sample) = self.dims(&x.desc.shape, &ab.desc.shape)?;
        let n = x.desc.numel();
        let name = format!("film_{}_{}", x.desc.dtype.suffix(), self.out.suffix());
        let args = Args::new()
            .ptr(x.ptr)
            .ptr(ab.ptr)
            .ptr(io.outputs[0].ptr)
            .u64(n as u64)
            .i32(to_i32(self.name(), "channels", c)?)
            .u64(per_sample as u64)
            .f32(self.k);
        linear_launch(&name, n, args)
    }
}

/// Checks for `verify` and the emulator tests. Every limit is a per-element bound on
/// |kernel − reference| (f32 arithmetic on the kernel side, fused multiply-adds allowed; the
/// reference f32, or f64 rounded once), plus the bf16 store's rounding where the output is
/// bf16:
/// - GELU 0.5·x·(1 + erff(x/√2)): erff's 2 ulp (≤ 2u absolute) and the rounding of 1 + erf
///   (≤ 2u) times 0.5·|x|; the argument's two roundings move erf by ≤ 0.97u, times 0.5·|x|;
///   the product u·|y|; the reference u·|y|: ≤ 4.5u·|x| (|y| ≤ |x|), 5u with the second
///   order.
/// - SiLU x/(1 + expf(−x)): expf's 2 ulp (4u relative on e ≤ 1 + e), the sum's and the
///   quotient's roundings: ≤ 6u·|y|, the reference u·|y|: 7u·|y|.
/// - add a + α·b: the sides differ in α·b's rounding (an FMA skips it) and the sum's:
///   3u·(|a| + |α·b|): the terms' magnitudes, since the sum may cancel.
/// - FiLM x·(k + a) + β: k + a is the same f32 on both sides; the product and the sum
///   (fused or not): 4u·(|x·(k + a)| + |β|).
pub fn checks(seed: u64, scale: Scale) -> Result<Vec<OpCheck>> {
    use crate::verify::bound::{stored, U};
    let mut sizes = vec![1, 37, 1000, 4097];
    if scale == Scale::Gpu {
        sizes.push(3 << 22);
    }
    let mut v = Vec::new();
    let mut seeds = seed_sequence(seed);
    let mut next = || CheckBuilder::new(seeds());
    for &n in &sizes {
        for (act, d) in [
            (Act::Gelu, DType::F32),
            (Act::Gelu, DType::BF16),
            (Act::Silu, DType::F32),
            (Act::Silu, DType::BF16),
        ] {
            let mut b = next();
            let x = b.input(&[n], d, 6.0)?;
            let y = b.graph.op1(Activation { act, out: d }, &[x])?;
            let bf16 = d == DType::BF16;
            let check = b.finish(format!("{act:?} {d:?} [{n}]"), &[y], Tolerance::BOUND)?;
            v.push(check.with_scale(move |c, r| {
                let e = |xv: f32, yv: f32| match act {
                    Act::Gelu => 5.0 * U * xv.abs() as f64,
                    Act::Silu => 7.0 * U * yv.abs() as f64,
                };
                vec![c
                    .values(x)
                    .iter()
                    .zip(&r[0])
                    .map(|(&xv, &yv)| stored(e(xv, yv), yv as f64, bf16) as f32)
                    .collect()]
            }));
        }
        for (da, db, dout) in [
            (DType::F32, DType::F32, DType::F32),
            (DType::F32, DType::BF16, DType::F32),
            (DType::BF16, DType::BF16, DType::BF16),
        ] {
            let mut b = next();
            let x = b.input(&[n], da, 4.0)?;
            let y = b.input(&[n], db, 4.0)?;
            let alpha = if n % 2 == 1 { 0.7 } else { 1.0 };
            let z = b.graph.op1(Add { alpha, out: dout }, &[x, y])?;
            let bf16 = dout == DType::BF16;
            let check = b.finish(
                format!("add {da:?}+{alpha}*{db:?}->{dout:?} [{n}]"),
                &[z],
                Tolerance::BOUND,
            )?;
            v.push(check.with_scale(move |c, r| {
                let (xs, ys) = (c.values(x), c.values(y));
                vec![(0..xs.len())
                    .map(|i| {
                        let m = xs[i].abs() as f64 + (alpha * ys[i]).abs() as f64;
                        stored(3.0 * U * m, r[0][i] as f64, bf16) as f32
                    })
                    .collect()]
            }));
        }
    }
    let mut film_shapes = vec![(1, 1, 8), (3, 37, 33), (2, 63, 320)];
    if scale == Scale::Gpu {
        film_shapes.push((2, 9216, 2048));
    }
    for (bs, p, c) in film_shapes {
        for (dx, dout, k) in [
            (DType::F32, DType::F32, 1.0),
            (DType::F32, DType::BF16, 2.0),
            (DType::BF16, DType::BF16, 1.0),
        ] {
            let mut b = next();
            let x = b.input(&[bs, p, c], dx, 3.0)?;
            let ab = b.input(&[bs, 2 * c], DType::F32, 1.0)?;
            let y = b.graph.op1(Film { k, out: dout }, &[x, ab])?;
            let bf16 = dout == DType::BF16;
            let check = b.finish(
                format!("film k={k} {dx:?}->{dout:?} [{bs},{p},{c}]"),
                &[y],
                Tolerance::BOUND,
            )?;
            v.push(check.with_scale(move |chk, r| {
                let (xs, m) = (chk.values(x), chk.values(ab));
                let per = xs.len() / bs;
                vec![(0..xs.len())
                    .map(|i| {
                        let row = &m[i / per * 2 * c..][..2 * c];
                        let ch = i % c;
                        let t = (xs[i] * (k + row[ch])).abs() as f64 + row[c + ch].abs() as f64;
                        stored(4.0 * U * t, r[0][i] as f64, bf16) as f32
                    })
                    .collect()]
            }));
        }
    }
    Ok(v)
}
