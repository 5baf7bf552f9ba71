//! Squeeze-and-excitation gates (`kernels/squeeze_excite.cu`): global average pool, FC, SiLU,
//! FC, sigmoid, per sample. The channel scale itself is fused into the 1×1 projection that
//! follows in an MBConv block ([`super::conv2d::Conv2d`]'s gate), so the expanded map is
//! read once more instead of written twice.

use super::math::silu_ref;
use super::{inputs_n, require_f32, to_i32, Shaped};
use crate::runtime::graph::{LaunchIo, OpImpl, OutSpec, TensorDesc};
use crate::runtime::kernels::KernelId;
use crate::runtime::launch::Launch;
use crate::tensor::{DType, HostTensor};
use crate::verify::{CheckBuilder, OpCheck, Scale, Tolerance};
use crate::{Error, Result};

/// `g [B, C]` f32 from `x [B, …pixels, C]`, `w1` f32 `[Cs, C]`, `b1 [Cs]`, `w2 [C, Cs]`,
/// `b2 [C]`: `g = sigmoid(w2·silu(w1·mean_pixels(x) + b1) + b2)`.
#[derive(Clone, Debug, PartialEq)]
pub struct SeGate;

/// (B, pixels per sample, C, Cs) of validated inputs.
fn dims<T: Shaped>(op: &str, ins: &[&T]) -> Result<(usize, usize, usize, usize)> {
    let [x, w1, b1, w2, b2] = inputs_n(op, ins)?;
    let xs = x.shape();
    let (b, c) = match xs {
        [b, .., c] if xs.len() >= 3 && *b > 0 && *c > 0 => (*b, *c),
        _ => {
            return Err(Error::shape(
                op,
                format!("x must be [B, …pixels, C], got {xs:?}"),
            ))
        }
    };
    let p = xs[1..xs.len() - 1].iter().product::<usize>();
    if p == 0 {
        return Err(Error::shape(op, format!("x has no pixels: {xs:?}")));
    }
    let cs = match w1.shape() {
        [cs, cw] if *cw == c && *cs > 0 => *cs,
        s => return Err(Error::shape(op, format!("w1 must be [Cs, {c}], got {s:?}"))),
    };
    for (what, t, want) in [
        ("b1", b1.shape(), vec![cs]),
        ("w2", w2.shape(), vec![c, cs]),
        ("b2", b2.shape(), vec![c]),
    ] {
        if t != want.as_slice() {
            return Err(Error::shape(
                op,
                format!("{what} must be {want:?}, got {t:?}"),
            ));
        }
    }
    if (c + cs) * 4 > SMEM_LIMIT {
        return Err(Error::shape(
            op,
            format!("C + Cs = {} exceeds the kernel's 12288", c + cs),
        ));
    }
    Ok((b, p, c, cs))
}

/// The kernel's shared memory ceiling (no opt-in needed).
const SMEM_LIMIT: usize = 48 << 10;

fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

/// The reference's intermediate values, and what bounds reuse: per sample the pool `m`,
/// hidden `h` and gate `g`, each rounded to f32 once.
struct Stages {
    m: Vec<f32>,
    h: Vec<f32>,
    g: Vec<f32>,
}

fn stages(ins: &[&[f32]], (b, p, c, cs): (usize, usize, usize, usize)) -> Stages {
    let [x, w1, b1, w2, b2] = [ins[0], ins[1], ins[2], ins[3], ins[4]];
    let mut m = vec![0f32; b * c];
    for bi in 0..b {
        for (ci, mv) in m[bi * c..][..c].iter_mut().enumerate() {
            let s: f64 = (0..p).map(|pi| x[(bi * p + pi) * c + ci] as f64).sum();
            *mv = (s / p as f64) as f32;
        }
    }
    let dot =
        |w: &[f32], v: &[f32]| -> f64 { w.iter().zip(v).map(|(&a, &b)| a as f64 * b as f64).sum() };
    let mut h = vec![0f32; b * cs];
    let mut g = vec![0f32; b * c];
    for bi in 0..b {
        let mb = &m[bi * c..][..c];
        for j in 0..cs {
            h[bi * cs + j] = silu_ref((b1[j] as f64 + dot(&w1[j * c..][..c], mb)) as f32);
        }
        let hb = &h[bi * cs..][..cs];
        for ci in 0..c {
            g[bi * c + ci] = sigmoid(b2[ci] as f64 + dot(&w2[ci * cs..][..cs], hb)) as f32;
        }
    }
    Stages { m, h, g }
}

impl OpImpl for SeGate {
    fn name(&self) -> &'static str {
        "se_gate"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let (b, _, c, _) = dims(self.name(), inputs)?;
        for (what, t) in ["w1", "b1", "w2", "b2"].iter().zip(&inputs[1..]) {
            require_f32(self.name(), what, t)?;
        }
        Ok(vec![(vec![b, c], DType::F32)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let d = dims(self.name(), inputs)?;
        let ins: Vec<&[f32]> = inputs.iter().map(|t| t.data.as_slice()).collect();
        outputs[0].data.copy_from_slice(&stages(&ins, d).g);
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let op = self.name();
        let descs: Vec<&TensorDesc> = io.inputs.iter().map(|t| t.desc).collect();
        let (b, p, c, cs) = dims(op, &descs)?;
        let args = io
            .tensor_args()
            .u64(p as u64)
            .i32(to_i32(op, "C", c)?)
            .i32(to_i32(op, "Cs", cs)?);
        let name = format!("se_gate_{}", descs[0].dtype.suffix());
        let mut launch = Launch::linear(
            KernelId::lookup(&name)?,
            to_i32(op, "B", b)? as u32,
            256,
            args,
        );
        launch.smem = ((c + cs) * 4) as u32;
        Ok(vec![launch])
    }
}

/// Per-element bounds on |kernel − reference| of the gate, stage by stage (u = 2⁻²⁴):
/// - pool: the P-term f32 chain, sum(P, u)·mean|x|, the division and the reference's
///   rounding, 2u·|m|;
/// - FC1: Σ|w1|·e_m carried, sum(C + 1, u)·(|b1| + Σ|w1·m|) of its own, u·|z| rounded;
///   SiLU: |silu′| ≤ 1.1, expf's 2 ulp and three roundings (2⁻²² + 3u)·|h|;
/// - FC2 likewise; sigmoid: |σ′| ≤ 1/4, (2⁻²² + 3u)·|g|.
fn bounds(ins: &[&[f32]], d @ (b, p, c, cs): (usize, usize, usize, usize)) -> Vec<f32> {
    use crate::verify::bound::{sum, U, ULP2};
    let st = stages(ins, d);
    let abs_x: Vec<f32> = ins[0].iter().map(|v| v.abs()).collect();
    let mut abs_ins = ins.to_vec();
    abs_ins[0] = &abs_x;
    let mean_abs = stages(&abs_ins, d).m;
    let (w1, b1, w2, b2) = (ins[1], ins[2], ins[3], ins[4]);
    let mut out = vec![0f32; b * c];
    for bi in 0..b {
        let e_m: Vec<f64> = (0..c)
            .map(|ci| {
                let i = bi * c + ci;
                sum(p, U) * mean_abs[i] as f64 + 2.0 * U * st.m[i].abs() as f64
            })
            .collect();
        let e_h: Vec<f64> = (0..cs)
            .map(|j| {
                let row = &w1[j * c..][..c];
                let carried: f64 = row.iter().zip(&e_m).map(|(&w, e)| w.abs() as f64 * e).sum();
                let mag: f64 = b1[j].abs() as f64
                    + row
                        .iter()
                        .zip(&st.m[bi * c..])
                        .map(|(&w, &m)| (w * m).abs() as f64)
                        .sum::<f64>();
                let e_z = carried + (sum(c + 1, U) + U) * mag;
                1.1 * e_z + (ULP2 + 3.0 * U) * st.h[bi * cs + j].abs() as f64
            })
            .collect();
        for ci in 0..c {
            let row = &w2[ci * cs..][..cs];
            let carried: f64 = row.iter().zip(&e_h).map(|(&w, e)| w.abs() as f64 * e).sum();
            let mag: f64 = b2[ci].abs() as f64
                + row
                    .iter()
                    .zip(&st.h[bi * cs..])
                    .map(|(&w, &h)| (w * h).abs() as f64)
                    .sum::<f64>();
            let e_z = carried + (sum(cs + 1, U) + U) * mag;
            let g = st.g[bi * c + ci] as f64;
            out[bi * c + ci] = (0.25 * e_z + (ULP2 + 3.0 * U) * g) as f32;
        }
    }
    out
}

/// Hostsim/GPU checks of [`SeGate`] on odd sizes, f32 and bf16 inputs.
pub fn checks(seed: u64, scale: Scale) -> Result<Vec<OpCheck>> {
    // (B, H, W, C, Cs)
    let mut shapes = vec![
        (1, 1, 1, 1, 1),
        (2, 7, 5, 37, 9),
        (3, 4, 9, 96, 6),
        (1, 13, 3, 300, 70),
    ];
    if scale == Scale::Gpu {
        shapes.extend([(2, 48, 64, 768, 32), (1, 24, 32, 1536, 64)]);
    }
    let mut v = Vec::new();
    for (i, &(b, h, w, c, cs)) in shapes.iter().enumerate() {
        for (j, din) in [DType::F32, DType::BF16].into_iter().enumerate() {
            let mut cb = CheckBuilder::new(seed.wrapping_add((i * 2 + j) as u64));
            let ins = vec![
                cb.input(&[b, h, w, c], din, 2.0)?,
                cb.input(&[cs, c], DType::F32, 1.0)?,
                cb.input(&[cs], DType::F32, 0.5)?,
                cb.input(&[c, cs], DType::F32, 1.0)?,
                cb.input(&[c], DType::F32, 0.5)?,
            ];
            let g = cb.graph.op1(SeGate, &ins)?;
            let check = cb.finish(
                format!("se_gate {din:?} [{b},{h},{w},{c}] Cs {cs}"),
                &[g],
                Tolerance::BOUND,
            )?;
            v.push(check.with_scale(move |chk, _| {
                let vals: Vec<&[f32]> = ins.iter().map(|&id| chk.values(id)).collect();
                vec![bounds(&vals, (b, h * w, c, cs))]
            }));
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_support::{assert_rejected, random, run, Rejected};

    #[test]
    fn the_gate_of_a_constant_map_is_sigmoid_of_the_mlp_of_that_constant() {
        // Every pixel of a sample holds the same vector v: the pool returns v itself.
        let (b, p, c, cs) = (2, 6, 5, 3);
        let v = random(&[b, c], 1);
        let x = HostTensor::new(
            vec![b, p, c],
            (0..b * p * c)
                .map(|i| v.data[i / (p * c) * c + i % c])
                .collect(),
        );
        let (w1, b1, w2, b2) = (
            random(&[cs, c], 2),
            random(&[cs], 3),
            random(&[c, cs], 4),
            random(&[c], 5),
        );
        let g = run(&SeGate, &[&x, &w1, &b1, &w2, &b2]).unwrap();
        for bi in 0..b {
            let h: Vec<f64> = (0..cs)
                .map(|j| {
                    let z = b1.data[j] as f64
                        + (0..c)
                            .map(|ci| w1.data[j * c + ci] as f64 * v.data[bi * c + ci] as f64)
                            .sum::<f64>();
                    z / (1.0 + (-z).exp())
                })
                .collect();
            for ci in 0..c {
                let z = b2.data[ci] as f64
                    + (0..cs)
                        .map(|j| w2.data[ci * cs + j] as f64 * h[j])
                        .sum::<f64>();
                let want = 1.0 / (1.0 + (-z).exp());
                assert!((g.data[bi * c + ci] as f64 - want).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn invalid_shapes_are_errors() {
        let f = DType::F32;
        let se = || Box::new(SeGate) as Box<dyn OpImpl>;
        let cases: Vec<Rejected> = vec![
            (
                se(),
                vec![
                    (&[2, 4], f),
                    (&[3, 4], f),
                    (&[3], f),
                    (&[4, 3], f),
                    (&[4], f),
                ],
            ),
            (
                se(),
                vec![
                    (&[2, 5, 4], f),
                    (&[3, 5], f),
                    (&[3], f),
                    (&[4, 3], f),
                    (&[4], f),
                ],
            ),
            (
                se(),
                vec![
                    (&[2, 5, 4], f),
                    (&[3, 4], f),
                    (&[3], f),
                    (&[3, 4], f),
                    (&[4], f),
                ],
            ),
            (
                se(),
                vec![(&[2, 5, 4], f), (&[3, 4], f), (&[3], f), (&[4, 3], f)],
            ),
            (
                se(),
                vec![
                    (&[2, 5, 9000], f),
                    (&[4000, 9000], f),
                    (&[4000], f),
                    (&[9000, 4000], f),
                    (&[9000], f),
                ],
            ),
        ];
        assert_rejected(&cases);
    }
}
