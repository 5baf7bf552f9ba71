//! One module per kernel family (mirroring `kernels/<family>.cu`): shape validation, the
//! naive f32 CPU reference (the truth the kernels are tested against) and the launch plan.
//!
//! Index of ops: [`norm`] (LayerNorm over channels), [`elementwise`] (GELU, add, FiLM),
//! [`gemm`] (bf16 tensor-core GEMM with fused epilogues), [`gemm_epilogue`] (the epilogue,
//! the operand scaling and the tuner's comparison as passes around a vendor GEMM), [`layout`]
//! (pixel (un)shuffle, concat, slice, broadcast, cast, embedding and row gathers), [`conv`]
//! (depthwise conv, also fused with LayerNorm2d; transposed conv), [`resample`] (bilinear and
//! nearest resizes), [`attention`] (multi-head softmax attention: extra keys, causal and
//! padding masks), [`grn`] (GlobalResponseNorm as a FiLM modulation), [`embed`] (sinusoidal
//! r-embedding, scale signal), [`inr`] (UltraPixel INR: modulated weights, coordinate
//! encoding, hyper-MLP), [`gdf`] (GDF schedule, CFG combine with rescale, DDPM step).

pub mod attention;
pub mod conv;
mod dot;
pub mod elementwise;
pub mod embed;
pub mod gdf;
pub mod gemm;
pub mod gemm_epilogue;
pub mod grn;
pub mod inr;
pub mod layout;
pub mod noise;
pub mod norm;
pub mod resample;

use crate::runtime::graph::TensorDesc;
use crate::runtime::kernels::KernelId;
use crate::runtime::launch::{ceil_div, Args, Launch};
use crate::tensor::{DType, HostTensor};
use crate::{Error, Result};

/// Shape and dtype of one output.
pub type OutSpec = (Vec<usize>, DType);

/// A fused op. Layout convention: activations are channels-last (`[B, H, W, C]` or
/// `[B, N, C]`); "rows" are everything but the last axis.
pub trait OpImpl: AsAny + std::fmt::Debug + Send + Sync {
    fn name(&self) -> &'static str;

    /// Validates the inputs and returns the outputs' shapes and dtypes.
    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>>;

    /// Scratch memory the kernels need while the node runs.
    fn workspace_bytes(&self, _inputs: &[&TensorDesc]) -> usize {
        0
    }

    /// The f32 reference: fills every element of `outputs` (pre-shaped, poisoned with NaN).
    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()>;

    /// The kernel launches that compute the op on the given device buffers.
    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>>;

    /// Work of one execution, for benchmarks: tensor-core FLOPs and the bytes the op must
    /// move at least (by default every input and output once).
    fn cost(&self, inputs: &[&TensorDesc], outputs: &[&TensorDesc]) -> Cost {
        Cost {
            flops: 0.0,
            bytes: inputs.iter().chain(outputs).map(|d| d.bytes() as f64).sum(),
        }
    }
}

/// The concrete op behind a `dyn OpImpl` (benchmarks read an attention node's heads).
pub trait AsAny {
    fn as_any(&self) -> &dyn std::any::Any;
}

impl<T: std::any::Any> AsAny for T {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// FLOPs and bytes of one op execution.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    pub flops: f64,
    pub bytes: f64,
}

impl std::ops::Add for Cost {
    type Output = Cost;
    fn add(self, o: Cost) -> Cost {
        Cost {
            flops: self.flops + o.flops,
            bytes: self.bytes + o.bytes,
        }
    }
}

/// A tensor placed in device memory (a host address under the emulator).
#[derive(Clone, Copy, Debug)]
pub struct DevTensor<'a> {
    pub ptr: u64,
    pub desc: &'a TensorDesc,
}

pub struct LaunchIo<'a> {
    pub inputs: Vec<DevTensor<'a>>,
    pub outputs: Vec<DevTensor<'a>>,
    pub workspace: u64,
}

impl LaunchIo<'_> {
    /// Arguments starting with every input pointer, then every output pointer: the
    /// parameter order of most kernels.
    pub fn tensor_args(&self) -> Args {
        self.inputs
            .iter()
            .chain(&self.outputs)
            .fold(Args::new(), |a, t| a.ptr(t.ptr))
    }
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

/// Runs ops' references outside a graph, for the unit tests of the op modules.
#[cfg(test)]
pub(crate) mod test_support {
    use super::OpImpl;
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
