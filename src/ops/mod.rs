//! One module per kernel family (mirroring `kernels/<family>.cu`): shape validation, the
//! naive f32 CPU reference (the truth the kernels are tested against) and the launch plan.
//!
//! Index of ops: [`norm`] (LayerNorm over channels), [`elementwise`] (GELU, add, FiLM),
//! [`gemm`] (bf16 tensor-core GEMM with fused epilogues), [`gemm_epilogue`] (the epilogue,
//! the operand scaling and the tuner's comparison as passes around a vendor GEMM), [`layout`]
//! (pixel (un)shuffle, concat, slice, broadcast, cast, embedding and row gathers), [`conv`]
//! (depthwise conv, also fused with LayerNorm2d or SiLU, strided), [`conv2d`] (dense k×k conv
//! as an implicit GEMM: the EfficientNetV2 backbone), [`conv_transpose`] (transposed conv, on
//! the same kernel one output phase at a time), [`squeeze_excite`] (SE gates), [`resample`]
//! (bilinear and
//! nearest resizes), [`attention`] (multi-head softmax attention: extra keys, causal and
//! padding masks), [`grn`] (GlobalResponseNorm as a FiLM modulation), [`embed`] (sinusoidal
//! r-embedding, scale signal), [`inr`] (UltraPixel INR: modulated weights, coordinate
//! encoding, hyper-MLP), [`sampler`] (GDF schedule, CFG combine with rescale, DDPM step).

pub mod attention;
pub mod attention_sm90a;
pub mod conv;
pub mod conv2d;
pub mod conv_transpose;
mod dot;
pub mod elementwise;
pub mod embed;
pub mod gemm;
pub mod gemm_epilogue;
pub mod gemm_sm90a;
pub mod grn;
pub mod inr;
pub mod layout;
pub mod math;
pub mod noise;
pub mod norm;
pub mod resample;
pub mod sampler;
pub mod squeeze_excite;

use crate::runtime::graph::TensorDesc;
use crate::runtime::kernels::KernelId;
use crate::runtime::launch::{ceil_div, Args, Launch};
use crate::verify::{Family, OpCheck, Scale};

use crate::tensor::{DType, HostTensor};
use crate::{Error, Result};

/// Every op family once, with its checks (the order `verify` runs them in). `verify`, the
/// op tests, the benchmarks and `bench` iterate this table.
pub const FAMILIES: [Family; 15] = [
    Family {
        name: "norm",
        seed_xor: 0x0,
        checks: norm::checks,
    },
    Family {
        name: "elementwise",
        seed_xor: 0x1,
        checks: elementwise::checks,
    },
    Family {
        name: "gemm",
        seed_xor: 0x2,
        checks: gemm::checks,
    },
    Family {
        name: "attention",
        seed_xor: 0x3,
        checks: attention::checks,
    },
    Family {
        name: "conv",
        seed_xor: 0x4,
        checks: conv::checks,
    },
    Family {
        name: "grn",
        seed_xor: 0x6,
        checks: grn::checks,
    },
    Family {
        name: "inr",
        seed_xor: 0x7,
        checks: inr::checks,
    },
    Family {
        name: "noise",
        seed_xor: 0xb,
        checks: noise::checks,
    },
    Family {
        name: "layout",
        seed_xor: 0x5,
        checks: layout::checks,
    },
    Family {
        name: "resample",
        seed_xor: 0x8,
        checks: resample::checks,
    },
    Family {
        name: "embed",
        seed_xor: 0x9,
        checks: embed::checks,
    },
    Family {
        name: "sampler",
        seed_xor: 0xa,
        checks: sampler::checks,
    },
    Family {
        name: "conv2d",
        seed_xor: 0xc,
        checks: conv2d::checks,
    },
    Family {
        name: "squeeze_excite",
        seed_xor: 0xd,
        checks: squeeze_excite::checks,
    },
    Family {
        name: "conv_transpose",
        seed_xor: 0xe,
        checks: conv_transpose::checks,
    },
];

/// The family called `name`.
pub fn family(name: &str) -> Result<&'static Family> {
    FAMILIES.iter().find(|f| f.name == name).ok_or_else(|| {
        let known: Vec<&str> = FAMILIES.iter().map(|f| f.name).collect();
        Error::InvalidArgument(format!(
            "no check family {name:?} (families: {})",
            known.join(", ")
        ))
    })
}

/// Every op check of every family for the `verify` seed `seed`.
pub fn all_checks(seed: u64, scale: Scale) -> Result<Vec<OpCheck>> {
    let mut v = Vec::new();
    for f in &FAMILIES {
        v.extend(f.checks_for(seed, scale)?);
    }
    Ok(v)
}

const GRID_STRIDE_THREADS: usize = 256;
/// Grid-stride kernels never need more blocks than this.
const MAX_BLOCKS: usize = 1 << 20;

/// One launch of a grid-stride kernel over `n` elements (256 threads per block).
pub(crate) fn linear_launch(kernel: &str, n: usize, args: Args) -> Result<Vec<Launch>> {
    let blocks = ceil_div(n, GRID_STRIDE_THREADS).clamp(1, MAX_BLOCKS) as u32;
    Ok(vec![Launch::linear(
        KernelId::lookup(kernel)?,
        blocks,
        GRID_STRIDE_THREADS as u32,
        args,
    )])
}

/// Threads per block of the row kernels (layout, resample, embed, sampler).
const ROW_THREADS: usize = 256;
/// Row kernels loop over their rows and columns, so they never need more blocks than this
/// (several waves of resident blocks on any GPU).
const ROW_MAX_BLOCKS: usize = 8192;
/// The hardware limit of gridDim.y.
const MAX_GRID_Y: usize = 65535;

/// A launch of a row kernel: `rows` rows of `cols` elements, rows over grid/block y and the
/// elements of a row over grid/block x (2-d grid-stride loops in the kernel). Blocks have 256
/// threads shaped (tx, 256/tx), tx the row length rounded up to a power of two (at most 256),
/// so that short rows still fill the block.
pub(crate) fn rows_launch(kernel: &str, rows: usize, cols: usize, args: Args) -> Result<Launch> {
    let tx = cols.next_power_of_two().clamp(1, ROW_THREADS);
    let ty = ROW_THREADS / tx;
    let gx = ceil_div(cols, tx).clamp(1, ROW_MAX_BLOCKS);
    let gy = ceil_div(rows, ty).clamp(1, (ROW_MAX_BLOCKS / gx).clamp(1, MAX_GRID_Y));
    Ok(Launch {
        kernel: KernelId::lookup(kernel)?,
        grid: [gx as u32, gy as u32, 1],
        block: [tx as u32, ty as u32, 1],
        smem: 0,
        args,
    })
}

/// Checks the input count.
pub(crate) fn arity<'a, 'b>(
    op: &str,
    inputs: &'b [&'a TensorDesc],
    n: usize,
) -> Result<&'b [&'a TensorDesc]> {
    if inputs.len() != n {
        return Err(Error::shape(
            op,
            format!("expected {n} inputs, got {}", inputs.len()),
        ));
    }
    Ok(inputs)
}

/// Splits a channels-last shape into (rows, channels).
pub(crate) fn rows_channels(op: &str, shape: &[usize]) -> Result<(usize, usize)> {
    match shape.split_last() {
        Some((&c, rest)) if c > 0 => Ok((rest.iter().product(), c)),
        _ => Err(Error::shape(
            op,
            format!("needs a channel axis, got shape {shape:?}"),
        )),
    }
}

/// Kernel launch dimensions are u32/i32: refuse anything larger with a clear error.
pub(crate) fn to_i32(op: &str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::shape(op, format!("{what} = {v} exceeds the kernel's i32 range")))
}

/// Anything with a shape: graph tensors in `infer`, host tensors in `reference`, so one shape
/// check serves both.
pub(crate) trait Shaped {
    fn shape(&self) -> &[usize];
}

impl Shaped for TensorDesc {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

impl Shaped for HostTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

/// Checks the input count and hands the inputs back as an array to destructure.
pub(crate) fn inputs_n<'a, T, const N: usize>(op: &str, inputs: &[&'a T]) -> Result<[&'a T; N]> {
    inputs
        .try_into()
        .map_err(|_| Error::shape(op, format!("expected {N} inputs, got {}", inputs.len())))
}

/// Splits a non-empty channels-last image shape `[B, H, W, C]`.
pub(crate) fn nhwc(op: &str, what: &str, shape: &[usize]) -> Result<[usize; 4]> {
    match <[usize; 4]>::try_from(shape) {
        Ok(d) if !d.contains(&0) => Ok(d),
        _ => Err(Error::shape(
            op,
            format!("{what} must be a non-empty image [B, H, W, C], got {shape:?}"),
        )),
    }
}

/// Small parameters and index tensors are f32 on every executor.
pub(crate) fn require_f32(op: &str, what: &str, t: &TensorDesc) -> Result<()> {
    if t.dtype != DType::F32 {
        return Err(Error::shape(
            op,
            format!("{what} must be f32, got {:?}", t.dtype),
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod test_data;

/// Runs ops' references outside a graph, for the unit tests of the op modules.
#[cfg(test)]
pub(crate) mod test_support {
    use crate::runtime::graph::OpImpl;
    use crate::runtime::graph::{Role, TensorDesc};
    use crate::tensor::{DType, HostTensor};
    use crate::Result;

    pub fn desc(shape: &[usize], dtype: DType) -> TensorDesc {
        TensorDesc {
            name: "t".into(),
            shape: shape.to_vec(),
            dtype,
            role: Role::Input,
        }
    }

    /// `infer` on f32 descriptors of `inputs`, then the reference into NaN-poisoned outputs;
    /// panics if any output element stays unwritten.
    pub fn run(op: &dyn OpImpl, inputs: &[&HostTensor]) -> Result<HostTensor> {
        let descs: Vec<TensorDesc> = inputs.iter().map(|t| desc(&t.shape, DType::F32)).collect();
        let specs = op.infer(&descs.iter().collect::<Vec<_>>())?;
        let mut outs: Vec<HostTensor> = specs
            .iter()
            .map(|(shape, _)| HostTensor::full(shape, f32::NAN))
            .collect();
        op.reference(inputs, &mut outs)?;
        let out = outs.swap_remove(0);
        assert!(
            out.data.iter().all(|v| !v.is_nan()),
            "{}: unwritten output elements",
            op.name()
        );
        Ok(out)
    }

    /// An op and the input (shape, dtype) list its `infer` must refuse.
    pub type Rejected = (Box<dyn OpImpl>, Vec<(&'static [usize], DType)>);

    pub fn assert_rejected(cases: &[Rejected]) {
        for (op, inputs) in cases {
            let descs: Vec<TensorDesc> = inputs.iter().map(|(s, d)| desc(s, *d)).collect();
            let result = op.infer(&descs.iter().collect::<Vec<_>>());
            assert!(result.is_err(), "{op:?} accepted {inputs:?}");
        }
    }

    /// Uniform random values in [-1, 1).
    pub fn random(shape: &[usize], seed: u64) -> HostTensor {
        let n = shape.iter().product();
        let values = crate::verify::CheckBuilder::new(seed).values(n, 1.0, DType::F32);
        HostTensor::new(shape.to_vec(), values)
    }
}
