//! LayerNorm over the channel axis of a channels-last tensor (`kernels/norm.cu`).
//!
//! y = (x − μ) / √(σ² + eps) · γ + β per row, with μ and the biased σ² in f32. Without
//! affine parameters (Stable Cascade's LayerNorm2d, eps 1e-6) γ = 1, β = 0; with them (CLIP,
//! the INR transformer, eps 1e-5) γ and β are f32 `[C]` inputs.

use super::math::{layernorm_bounds, layernorm_ref, LnParams};
use super::{arity, rows_channels, to_i32};
use crate::runtime::graph::{LaunchIo, OpImpl, OutSpec, TensorDesc};
use crate::runtime::kernels::KernelId;
use crate::runtime::launch::{ceil_div, Args, Launch};
use crate::tensor::{DType, HostTensor};
use crate::verify::{CheckBuilder, OpCheck, Scale, Tolerance};
use crate::{Error, Result};

/// Rows per block: one warp per row.
const ROWS_PER_BLOCK: usize = 8;

#[derive(Clone, Debug, PartialEq)]
pub struct LayerNorm {
    pub eps: f32,
    /// Inputs are (x, γ, β) instead of (x).
    pub affine: bool,
    pub out: DType,
}

impl LayerNorm {
    pub fn plain(eps: f32, out: DType) -> Self {
        LayerNorm {
            eps,
            affine: false,
            out,
        }
    }

    pub fn affine(eps: f32, out: DType) -> Self {
        LayerNorm {
            eps,
            affine: true,
            out,
        }
    }
}

impl OpImpl for LayerNorm {
    fn name(&self) -> &'static str {
        "layernorm"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let ins = arity(self.name(), inputs, if self.affine { 3 } else { 1 })?;
        let (_, c) = rows_channels(self.name(), &ins[0].shape)?;
        for p in &ins[1..] {
            if p.shape != [c] || p.dtype != DType::F32 {
                return Err(Error::shape(
                    self.name(),
                    format!("γ/β must be f32 [{c}], got {:?} {:?}", p.dtype, p.shape),
                ));
            }
        }
        Ok(vec![(ins[0].shape.clone(), self.out)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let x = inputs[0];
        let c = *x.shape.last().unwrap();
        let (g, b) = match inputs {
            [_, g, b] => (Some(g.data.as_slice()), Some(b.data.as_slice())),
            _ => (None, None),
        };
        layernorm_ref(&x.data, c, self.eps, g, b, &mut outputs[0].data);
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let x = io.inputs[0];
        let (rows, c) = rows_channels(self.name(), &x.desc.shape)?;
        let name = format!("layernorm_{}_{}", x.desc.dtype.suffix(), self.out.suffix());
        let (g, b) = if self.affine {
            (io.inputs[1].ptr, io.inputs[2].ptr)
        } else {
            (0, 0)
        };
        let args = Args::new()
            .ptr(x.ptr)
            .ptr(g)
            .ptr(b)
            .ptr(io.outputs[0].ptr)
            .i32(to_i32(self.name(), "rows", rows)?)
            .i32(to_i32(self.name(), "channels", c)?)
            .f32(self.eps);
        let blocks = to_i32(self.name(), "blocks", ceil_div(rows, ROWS_PER_BLOCK))? as u32;
        Ok(vec![Launch::linear(
            KernelId::lookup(&name)?,
            blocks,
            (ROWS_PER_BLOCK * 32) as u32,
            args,
        )])
    }
}

/// Checks for `verify` and the emulator tests: odd row and channel counts, every dtype
/// combination, with and without affine parameters.
pub fn checks(seed: u64, scale: Scale) -> Result<Vec<OpCheck>> {
    let mut shapes = vec![(1, 2048), (7, 33), (37, 320), (1000, 32), (5, 1)];
    if scale == Scale::Gpu {
        shapes.extend([(4096, 2048), (100_003, 320)]);
    }
    let dtypes = [DType::F32, DType::BF16];
    let mut v = Vec::new();
    for (i, &(rows, c)) in shapes.iter().enumerate() {
        for (j, (&din, &dout)) in dtypes
            .iter()
            .flat_map(|a| dtypes.iter().map(move |b| (a, b)))
            .enumerate()
        {
            let affine = (i + j) % 2 == 1;
            let mut b = CheckBuilder::new(seed.wrapping_add((i * 8 + j) as u64));
            let x = b.input(&[rows, c], din, 3.0)?;
            let op = LayerNorm {
                eps: if affine { 1e-5 } else { 1e-6 },
                affine,
                out: dout,
            };
            let ins = if affine {
                vec![
                    x,
                    b.input(&[c], DType::F32, 2.0)?,
                    b.input(&[c], DType::F32, 1.0)?,
                ]
            } else {
                vec![x]
            };
            let eps = op.eps;
            let y = b.graph.op1(op, &ins)?;
            let check = b.finish(
                format!("layernorm {din:?}->{dout:?} [{rows},{c}] affine={affine}"),
                &[y],
                Tolerance::BOUND,
            )?;
            let bf16 = dout == DType::BF16;
            v.push(check.with_scale(move |chk, r| {
                let gb = affine.then(|| (chk.values(ins[1]), chk.values(ins[2])));
                let p = LnParams { c, eps, affine: gb };
                vec![layernorm_bounds(chk.values(x), None, &p, &r[0], bf16)]
            }));
        }
    }
    Ok(v)
}
