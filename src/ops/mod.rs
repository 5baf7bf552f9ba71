//! One module per kernel family (mirroring `kernels/<family>.cu`): shape validation, the
//! naive f32 CPU reference (the truth the kernels are tested against) and the launch plan.
//!
//! Index of ops: [`norm`] (LayerNorm over channels), [`elementwise`] (GELU, add, FiLM),
//! [`gemm`] (bf16 tensor-core GEMM with fused epilogues).

pub mod elementwise;
pub mod gemm;
pub mod norm;

use crate::runtime::graph::TensorDesc;
use crate::runtime::launch::Launch;
use crate::tensor::{DType, HostTensor};
use crate::{Error, Result};

/// Shape and dtype of one output.
pub type OutSpec = (Vec<usize>, DType);

/// A fused op. Layout convention: activations are channels-last (`[B, H, W, C]` or
/// `[B, N, C]`); "rows" are everything but the last axis.
pub trait OpImpl: std::fmt::Debug + Send + Sync {
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
