//! A vendor GEMM completed by our passes, as the tuner times it and a GEMM node runs it: our
//! operand scaling first where the op modulates A (GRN), the vendor product, then our
//! epilogue pass (bias, exact GELU, residual, FiLM, GRN sums) into the op's outputs. Every GEMM
//! op takes A `[…, K]`, W `[N, K]`, then the bias and the residual where it has them, then
//! its modulation (FiLM's `ab`, or the scaling's) last.

use super::problems::GemmKey;
use crate::ops::gemm::{Gemm, GemmFilm, GemmScaledA};
use crate::ops::gemm_epilogue::{GemmEpilogue, GemmScaleA};
use crate::runtime::graph::{DevTensor, LaunchIo, OpImpl, Role, TensorDesc};
use crate::runtime::launch::{Entry, Launch};
use crate::tensor::DType;
use crate::Result;

/// FiLM's k (1 for ops without FiLM).
pub fn film_k(op: &dyn OpImpl) -> f32 {
    op.as_any().downcast_ref::<GemmFilm>().map_or(1.0, |f| f.k)
}

/// The operand scaling's k (1 for ops without it).
pub fn scale_k(op: &dyn OpImpl) -> f32 {
    op.as_any()
        .downcast_ref::<GemmScaledA>()
        .map_or(1.0, |s| s.k)
}

/// The epilogue pass that completes a vendor product for a GEMM op with this key.
pub fn epilogue_op(op: &dyn OpImpl, key: &GemmKey) -> GemmEpilogue {
    let e = key.epilogue;
    GemmEpilogue {
        bias: e.bias,
        gelu: e.gelu,
        residual: e.residual,
        film: e.film.then(|| film_k(op)),
        grn_stats: e.grn_stats,
        out: key.out,
    }
}

/// The description of the vendor product: the op's first output's shape, in `dtype`.
pub fn product_desc(output: &TensorDesc, dtype: DType) -> TensorDesc {
    TensorDesc {
        name: "vendor product".into(),
        shape: output.shape.clone(),
        dtype,
        role: Role::Activation,
    }
}

/// The epilogue pass's inputs: the product, then the op's bias, residual and FiLM modulation.
pub fn epilogue_inputs<'a>(
    key: &GemmKey,
    op_inputs: &[DevTensor<'a>],
    product: DevTensor<'a>,
) -> Vec<DevTensor<'a>> {
    let e = key.epilogue;
    let mut v = vec![product];
    let mut next = 2;
    if e.bias {
        v.push(op_inputs[next]);
        next += 1;
    }
    if e.residual {
        v.push(op_inputs[next]);
    }
    if e.film {
        v.push(op_inputs[op_inputs.len() - 1]);
    }
    v
}

/// Where a vendor GEMM with this epilogue reads its bias and its C (the residual).
pub fn bias_index() -> usize {
    2
}

pub fn residual_index(key: &GemmKey) -> usize {
    2 + key.epilogue.bias as usize
}

/// The epilogue pass's launches from `product` into the op's outputs.
pub fn epilogue_launches(
    op: &dyn OpImpl,
    key: &GemmKey,
    op_io: &LaunchIo,
    product: DevTensor,
) -> Result<Vec<Entry>> {
    let io = LaunchIo {
        inputs: epilogue_inputs(key, &op_io.inputs, product),
        outputs: op_io.outputs.clone(),
        workspace: op_io.workspace,
        target: Default::default(),
    };
    Ok(kernels(epilogue_op(op, key).launches(&io)?))
}

/// The scaling pass's launches: the op's A, scaled by its modulation (last input), into `out`.
pub fn scale_launches(op: &dyn OpImpl, op_io: &LaunchIo, out: DevTensor) -> Result<Vec<Entry>> {
    let io = LaunchIo {
        inputs: vec![op_io.inputs[0], op_io.inputs[op_io.inputs.len() - 1]],
        outputs: vec![out],
        workspace: 0,
        target: Default::default(),
    };
    Ok(kernels(GemmScaleA { k: scale_k(op) }.launches(&io)?))
}

/// Our plain GEMM (no epilogue) from A at `a` (`[M, K]` bf16) and W into `d` in `product`:
/// the emulator's stand-in for a vendor GEMM.
pub fn plain_gemm(key: &GemmKey, a: u64, w: DevTensor, d: u64, product: DType) -> Result<Entry> {
    let gemm = Gemm {
        bias: false,
        gelu: false,
        residual: false,
        out: product,
    };
    let a_desc = TensorDesc {
        name: "A".into(),
        shape: vec![key.m, key.k],
        dtype: DType::BF16,
        role: Role::Input,
    };
    let out = TensorDesc {
        name: "product".into(),
        shape: vec![key.m, key.n],
        dtype: product,
        role: Role::Activation,
    };
    let io = LaunchIo {
        inputs: vec![
            DevTensor {
                ptr: a,
                desc: &a_desc,
            },
            w,
        ],
        outputs: vec![DevTensor { ptr: d, desc: &out }],
        workspace: 0,
        target: Default::default(),
    };
    let mut l = gemm.launches(&io)?;
    match l.len() {
        1 => Ok(Entry::Kernel(l.remove(0))),
        n => Err(crate::Error::InvalidArgument(format!(
            "the plain GEMM has {n} launches"
        ))),
    }
}

pub fn kernels(launches: Vec<Launch>) -> Vec<Entry> {
    launches.into_iter().map(Entry::Kernel).collect()
}

/// Rounds up to the arena alignment.
pub fn aligned(bytes: usize) -> usize {
    bytes.div_ceil(256) * 256
}
