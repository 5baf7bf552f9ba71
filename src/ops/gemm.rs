//! bf16 GEMM on tensor cores with fused epilogues (`kernels/gemm.cu`).
//!
//! `C = epilogue(A·Wᵀ)`: a PyTorch Linear (W `[N, K]`) applied to every row of A (`[…, K]`),
//! i.e. also a 1×1 conv on channels-last maps. The epilogue adds a bias, applies exact GELU
//! and adds a residual, in that order, each optional.

use super::elementwise::{gelu_ref, Film};
use super::{arity, rows_channels, to_i32, Cost, LaunchIo, OpImpl, OutSpec};
use crate::runtime::graph::{Role, TensorDesc};
use crate::runtime::kernels::KernelId;
use crate::runtime::launch::{ceil_div, Args, Launch};
use crate::tensor::{DType, HostTensor};
use crate::verify::{CheckBuilder, OpCheck, Scale, Tolerance};
use crate::{Error, Result};
use rayon::prelude::*;

const TILE_M: usize = 128;
const TILE_N: usize = 128;
/// STAGES · (TILE_M + TILE_N) · padded row pitch 40 · 2 bytes.
const SMEM_BYTES: u32 = 3 * (128 + 128) * 40 * 2;

#[derive(Clone, Debug, PartialEq)]
pub struct Gemm {
    /// Inputs include an f32 `[N]` bias after W.
    pub bias: bool,
    pub gelu: bool,
    /// Inputs end with a residual `[…, N]` of the output dtype, added last.
    pub residual: bool,
    pub out: DType,
}

impl Gemm {
    /// A Linear layer with bias and nothing else.
    pub fn linear(out: DType) -> Self {
        Gemm {
            bias: true,
            gelu: false,
            residual: false,
            out,
        }
    }

    fn n_inputs(&self) -> usize {
        2 + self.bias as usize + self.residual as usize
    }

    /// (M, N, K) of a validated input list.
    fn dims(&self, a: &[usize], w: &[usize]) -> Result<(usize, usize, usize)> {
        let (m, k) = rows_channels(self.name(), a)?;
        match w {
            [n, kw] if *kw == k && *n > 0 => Ok((m, *n, k)),
            _ => Err(Error::shape(
                self.name(),
                format!("weight must be [N, {k}] for input {a:?}, got {w:?}"),
            )),
        }
    }
}

/// The f32 reference: rows in parallel, f64 accumulation.
pub fn gemm_ref(
    a: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    gelu: bool,
    residual: Option<&[f32]>,
    (n, k): (usize, usize),
    c: &mut [f32],
) {
    c.par_chunks_mut(n).enumerate().for_each(|(row, out)| {
        let ar = &a[row * k..][..k];
        for (col, o) in out.iter_mut().enumerate() {
            let wr = &w[col * k..][..k];
            let mut v = ar
                .iter()
                .zip(wr)
                .map(|(&x, &y)| x as f64 * y as f64)
                .sum::<f64>() as f32;
            if let Some(b) = bias {
                v += b[col];
            }
            if gelu {
                v = gelu_ref(v);
            }
            if let Some(r) = residual {
                v += r[row * n + col];
            }
            *o = v;
        }
    });
}

impl OpImpl for Gemm {
    fn name(&self) -> &'static str {
        "gemm"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let ins = arity(self.name(), inputs, self.n_inputs())?;
        let (a, w) = (ins[0], ins[1]);
        let (_, n, k) = self.dims(&a.shape, &w.shape)?;
        if a.dtype != DType::BF16 || w.dtype != DType::BF16 {
            return Err(Error::shape(self.name(), "A and W must be bf16"));
        }
        if k % 8 != 0 {
            return Err(Error::shape(
                self.name(),
                format!("K = {k} is not a multiple of 8: the kernel loads 16-byte rows; pad the channels"),
            ));
        }
        let mut out_shape = a.shape.clone();
        *out_shape.last_mut().unwrap() = n;
        if self.bias && (ins[2].shape != [n] || ins[2].dtype != DType::F32) {
            return Err(Error::shape(
                self.name(),
                format!(
                    "bias must be f32 [{n}], got {:?} {:?}",
                    ins[2].dtype, ins[2].shape
                ),
            ));
        }
        if self.residual {
            let r = ins[ins.len() - 1];
            if r.shape != out_shape || r.dtype != self.out {
                return Err(Error::shape(
                    self.name(),
                    format!(
                        "residual must be {:?} {out_shape:?}, got {:?} {:?}",
                        self.out, r.dtype, r.shape
                    ),
                ));
            }
        }
        Ok(vec![(out_shape, self.out)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let (_, n, k) = self.dims(&inputs[0].shape, &inputs[1].shape)?;
        let bias = self.bias.then(|| inputs[2].data.as_slice());
        let res = self
            .residual
            .then(|| inputs[inputs.len() - 1].data.as_slice());
        gemm_ref(
            &inputs[0].data,
            &inputs[1].data,
            bias,
            self.gelu,
            res,
            (n, k),
            &mut outputs[0].data,
        );
        Ok(())
    }

    fn cost(&self, inputs: &[&TensorDesc], outputs: &[&TensorDesc]) -> Cost {
        let (m, n, k) = self
            .dims(&inputs[0].shape, &inputs[1].shape)
            .unwrap_or((0, 0, 0));
        Cost {
            flops: 2.0 * m as f64 * n as f64 * k as f64,
            bytes: inputs.iter().chain(outputs).map(|d| d.bytes() as f64).sum(),
        }
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        self.launch(io, None)
    }
}

/// The FiLM part of a [`GemmFilm`] launch: the modulation's device pointer, the rows of A per
/// sample and k.
struct FilmEpilogue {
    ab: u64,
    rows_per_sample: usize,
    k: f32,
}

impl Gemm {
    fn launch(&self, io: &LaunchIo, film: Option<FilmEpilogue>) -> Result<Vec<Launch>> {
        let (a, w) = (io.inputs[0], io.inputs[1]);
        let (m, n, k) = self.dims(&a.desc.shape, &w.desc.shape)?;
        let bias = if self.bias { io.inputs[2].ptr } else { 0 };
        let res = if self.residual {
            io.inputs[io.inputs.len() - 1].ptr
        } else {
            0
        };
        let name = format!("gemm_bf16_{}", self.out.suffix());
        let op = self.name();
        let args = Args::new()
            .ptr(a.ptr)
            .ptr(w.ptr)
            .ptr(bias)
            .ptr(res)
            .ptr(io.outputs[0].ptr)
            .i32(to_i32(op, "M", m)?)
            .i32(to_i32(op, "N", n)?)
            .i32(to_i32(op, "K", k)?)
            .i32(self.gelu as i32);
        let args = match film {
            Some(f) => args
                .ptr(f.ab)
                .i32(to_i32(op, "rows per sample", f.rows_per_sample)?)
                .f32(f.k),
            None => args.ptr(0).i32(1).f32(0.0),
        };
        let grid_n = ceil_div(n, TILE_N);
        if grid_n > 65535 {
            return Err(Error::shape(
                op,
                format!("N = {n} exceeds the grid's y range"),
            ));
        }
        Ok(vec![Launch {
            kernel: KernelId::lookup(&name)?,
            grid: [
                to_i32(op, "row tiles", ceil_div(m, TILE_M))? as u32,
                grid_n as u32,
                1,
            ],
            block: [256, 1, 1],
            smem: SMEM_BYTES,
            args,
        }])
    }
}

/// A [`Gemm`] followed by [`Film`] `{ k }` in its epilogue: `y·(k + a[s]) + β[s]` per sample s
/// (a TimestepBlock after the ResBlock's last GEMM). Inputs: the GEMM's, then f32
/// `ab [B, 2N]`; A's rows split evenly into the B samples.
#[derive(Clone, Debug, PartialEq)]
pub struct GemmFilm {
    pub gemm: Gemm,
    pub k: f32,
}

impl GemmFilm {
    fn film(&self) -> Film {
        Film {
            k: self.k,
            out: self.gemm.out,
        }
    }

    fn split<'a, T>(&self, inputs: &'a [T]) -> Result<(&'a [T], &'a T)> {
        match inputs.split_last() {
            Some((ab, gemm)) if gemm.len() == self.gemm.n_inputs() => Ok((gemm, ab)),
            _ => Err(Error::shape(
                self.name(),
                format!(
                    "expected {} inputs, got {}",
                    self.gemm.n_inputs() + 1,
                    inputs.len()
                ),
            )),
        }
    }
}

impl OpImpl for GemmFilm {
    fn name(&self) -> &'static str {
        "gemm_film"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let (gemm_in, ab) = self.split(inputs)?;
        let (shape, dtype) = self.gemm.infer(gemm_in)?.remove(0);
        let y = TensorDesc {
            name: "gemm output".into(),
            shape,
            dtype,
            role: Role::Activation,
        };
        self.film().infer(&[&y, ab])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let (gemm_in, ab) = self.split(inputs)?;
        let mut y = vec![outputs[0].clone()];
        self.gemm.reference(gemm_in, &mut y)?;
        self.film().reference(&[&y[0], ab], outputs)
    }

    fn cost(&self, inputs: &[&TensorDesc], outputs: &[&TensorDesc]) -> Cost {
        let mut c = self.gemm.cost(&inputs[..inputs.len() - 1], outputs);
        c.bytes += inputs[inputs.len() - 1].bytes() as f64;
        c
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let descs: Vec<&TensorDesc> = io.inputs.iter().map(|t| t.desc).collect();
        self.infer(&descs)?;
        let (m, _) = rows_channels(self.name(), &descs[0].shape)?;
        let samples = descs[descs.len() - 1].shape[0];
        let film = FilmEpilogue {
            ab: io.inputs[io.inputs.len() - 1].ptr,
            rows_per_sample: m / samples,
            k: self.k,
        };
        let gemm_io = LaunchIo {
            inputs: io.inputs[..io.inputs.len() - 1].to_vec(),
            outputs: io.outputs.clone(),
            workspace: io.workspace,
        };
        self.gemm.launch(&gemm_io, Some(film))
    }
}

/// Checks for `verify` and the emulator tests: M, N, K off the tile sizes, every epilogue.
pub fn checks(seed: u64, scale: Scale) -> Result<Vec<OpCheck>> {
    let mut shapes = vec![
        (1, 8, 8),
        (7, 37, 40),
        (37, 130, 72),
        (130, 200, 264),
        (1000, 24, 32),
    ];
    if scale == Scale::Gpu {
        shapes.extend([(2048, 2048, 2048), (1000, 4096, 1280), (18432, 2048, 2048)]);
    }
    let mut v = Vec::new();
    for (i, &(m, n, k)) in shapes.iter().enumerate() {
        for (j, &(bias, gelu, residual, out)) in [
            (false, false, false, DType::F32),
            (true, true, false, DType::BF16),
            (true, false, true, DType::F32),
            (true, true, true, DType::BF16),
        ]
        .iter()
        .enumerate()
        {
            let mut b = CheckBuilder::new(seed.wrapping_add((i * 4 + j) as u64));
            let mut ins = vec![
                b.input(&[m, k], DType::BF16, 1.0)?,
                b.weight(&[n, k], DType::BF16, 1.0)?,
            ];
            if bias {
                ins.push(b.weight(&[n], DType::F32, 1.0)?);
            }
            if residual {
                ins.push(b.input(&[m, n], out, 2.0)?);
            }
            let op = Gemm {
                bias,
                gelu,
                residual,
                out,
            };
            let y = b.graph.op1(op, &ins)?;
            // f32 outputs: products are exact, so only the summation order differs.
            let tol = if out == DType::BF16 {
                Tolerance::BF16_OUT
            } else {
                Tolerance {
                    atol: 1e-5,
                    rtol: 1e-5,
                }
            };
            v.push(b.finish(
                format!("gemm [{m},{k}]x[{n},{k}] bias={bias} gelu={gelu} residual={residual} ->{out:?}"),
                &[y],
                tol,
            )?);
            // The same GEMM with a FiLM epilogue, over samples that split the rows unevenly
            // across the 128-row tiles.
            if let Some(samples) = [37, 7, 5, 1]
                .into_iter()
                .find(|s| m % s == 0 && (j + i) % 2 == 0)
            {
                let mut b = CheckBuilder::new(seed.wrapping_add(1000 + (i * 4 + j) as u64));
                let mut ins = vec![
                    b.input(&[samples, m / samples, k], DType::BF16, 1.0)?,
                    b.weight(&[n, k], DType::BF16, 1.0)?,
                ];
                if bias {
                    ins.push(b.weight(&[n], DType::F32, 1.0)?);
                }
                if residual {
                    ins.push(b.input(&[samples, m / samples, n], out, 2.0)?);
                }
                ins.push(b.input(&[samples, 2 * n], DType::F32, 0.5)?);
                let gemm = Gemm {
                    bias,
                    gelu,
                    residual,
                    out,
                };
                let y = b.graph.op1(
                    GemmFilm {
                        gemm,
                        k: 1.0 + j as f32 % 2.0,
                    },
                    &ins,
                )?;
                v.push(b.finish(
                    format!("gemm_film [{m},{k}]x[{n},{k}] samples={samples} bias={bias} gelu={gelu} residual={residual} ->{out:?}"),
                    &[y],
                    tol,
                )?);
            }
        }
    }
    Ok(v)
}
