//! The kernel ABI: every kernel's parameter list as build.rs read it from its
//! `extern "C" __global__` declaration ([`KernelId::params`]), and the check of a launch's
//! arguments against it — the count, each slot's width, pointer or scalar, integer or float,
//! and a parameter struct's name and size. Executors run the check on every launch in debug
//! builds ([`Launch::params`](super::launch::Launch::params)); a test runs it over every
//! op's launches.
//!
//! The wide kernels (GEMM, attention, CFG's apply pass) take one parameter struct by value:
//! a C struct in the kernel file (or in a `kernels/common` header it includes, as the two GEMM
//! kernels share `GemmParams` and the two attention kernels `AttentionParams`), mirrored by a
//! `#[repr(C)]` Rust struct that `mirror_kernel_struct!` ties to it. build.rs lays the C
//! struct out and asserts that layout on both sides at build time (see build/abi.rs): they
//! cannot drift apart.

use super::kernels::KernelId;
use crate::{Error, Result};

/// How one argument is passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgKind {
    /// A device pointer (8 bytes).
    Ptr,
    /// An integer of this many bytes.
    Int(u8),
    /// A float of this many bytes.
    Float(u8),
    /// A struct by value: its C name and size in bytes.
    Struct(&'static str, usize),
}

impl std::fmt::Display for ArgKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArgKind::Ptr => write!(f, "a pointer"),
            ArgKind::Int(b) => write!(f, "a {b}-byte integer"),
            ArgKind::Float(b) => write!(f, "a {b}-byte float"),
            ArgKind::Struct(name, size) => write!(f, "struct {name} ({size} bytes)"),
        }
    }
}

/// One kernel parameter: its name in the kernel file and how it is passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Param {
    pub name: &'static str,
    pub kind: ArgKind,
}

/// A Rust mirror of a kernel parameter struct, passed by value with
/// [`Args::by_value`](super::launch::Args::by_value). Implemented only by
/// `mirror_kernel_struct!`, next to the assertions that the mirror has the C layout;
/// `Pod` guarantees it has no padding, so its bytes are all fields.
pub trait KernelStruct: bytemuck::Pod {
    /// The C struct's name.
    const C_NAME: &'static str;
}

/// Declares that the `#[repr(C)]` struct `$name` (in scope) mirrors the kernel parameter
/// struct of that name: includes what build.rs generated from the C definition — the
/// [`KernelStruct`] impl and const assertions on the size, the alignment, every field's offset
/// and type, and that there is no other field.
macro_rules! mirror_kernel_struct {
    ($name:ident) => {
        include!(concat!(env!("OUT_DIR"), "/abi_", stringify!($name), ".rs"));
    };
}
pub(crate) use mirror_kernel_struct;

/// Checks arguments of the given kinds against `kernel`'s parameters.
pub fn check(kernel: KernelId, args: &[ArgKind]) -> Result<()> {
    let params = kernel.params();
    let mismatch = |message: String| Error::KernelAbi {
        kernel: kernel.name().into(),
        message,
    };
    if args.len() != params.len() {
        return Err(mismatch(format!(
            "{} arguments for {} parameters ({})",
            args.len(),
            params.len(),
            params.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
        )));
    }
    for (i, (arg, p)) in args.iter().zip(params).enumerate() {
        if *arg != p.kind {
            return Err(mismatch(format!(
                "argument {i} is {arg}, parameter `{}` is {}",
                p.name, p.kind
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::launch::{Args, Launch};

    fn launch(kernel: &str, args: Args) -> Launch {
        Launch::linear(KernelId::lookup(kernel).unwrap(), 1, 32, args)
    }

    /// layernorm_f32_f32(const float* x, const float* g, const float* b, float* y, int rows,
    /// int c, float eps).
    fn layernorm(args: impl FnOnce(Args) -> Args) -> Launch {
        launch("layernorm_f32_f32", args(Args::new().ptrs(&[1, 2, 3, 4])))
    }

    fn error(l: &Launch) -> String {
        l.check_abi().unwrap_err().to_string()
    }

    #[test]
    fn build_rs_reads_every_parameter() {
        let k = KernelId::lookup("layernorm_f32_f32").unwrap();
        let kinds: Vec<(&str, ArgKind)> = k.params().iter().map(|p| (p.name, p.kind)).collect();
        use ArgKind::*;
        assert_eq!(
            kinds,
            [
                ("x", Ptr),
                ("g", Ptr),
                ("b", Ptr),
                ("y", Ptr),
                ("rows", Int(4)),
                ("c", Int(4)),
                ("eps", Float(4)),
            ]
        );
        let gemm = KernelId::lookup("gemm_bf16_f32").unwrap().params();
        assert_eq!(gemm.len(), 1);
        assert!(matches!(gemm[0].kind, Struct("GemmParams", _)));
        // A struct of a shared header (kernels/common/attention.cuh), taken by two files.
        let size = std::mem::size_of::<crate::ops::attention::AttentionParams>();
        for name in ["attention_d64_bf16", "attention_sm90a_d64_bf16"] {
            let params = KernelId::lookup(name).unwrap().params();
            let last = params.last().unwrap();
            assert_eq!(last.kind, Struct("AttentionParams", size), "{name}");
        }
    }

    #[test]
    fn matching_arguments_pass() {
        layernorm(|a| a.i32(8).i32(16).f32(1e-5))
            .check_abi()
            .unwrap();
    }

    /// Deliberate mismatches, one per property checked: each fails, naming the parameter.
    #[test]
    fn mismatched_arguments_fail() {
        let missing = layernorm(|a| a.i32(8).i32(16));
        assert!(error(&missing).contains("6 arguments for 7 parameters"));
        let extra = layernorm(|a| a.i32(8).i32(16).f32(1e-5).f32(0.0));
        assert!(error(&extra).contains("8 arguments for 7 parameters"));
        let int_for_float = layernorm(|a| a.i32(8).i32(16).i32(1));
        assert!(error(&int_for_float)
            .contains("argument 6 is a 4-byte integer, parameter `eps` is a 4-byte float"));
        let wide = layernorm(|a| a.u64(8).i32(16).f32(1e-5));
        assert!(error(&wide).contains("argument 4 is a 8-byte integer, parameter `rows`"));
        let ptr_for_int = layernorm(|a| a.ptr(8).i32(16).f32(1e-5));
        assert!(error(&ptr_for_int).contains("argument 4 is a pointer, parameter `rows`"));
        let scalar_for_ptr = launch(
            "layernorm_f32_f32",
            Args::new().ptrs(&[1, 2, 3]).i32(4).i32(8).i32(16).f32(1e-5),
        );
        assert!(error(&scalar_for_ptr).contains("argument 3 is a 4-byte integer, parameter `y`"));
    }

    /// The GEMM takes its struct: the 15 separate arguments it once took no longer match.
    #[test]
    fn a_struct_kernel_rejects_separate_arguments() {
        let old = Args::new()
            .ptrs(&[1, 2, 0, 0, 5])
            .i32(128)
            .i32(128)
            .i32(64)
            .i32(0)
            .ptr(0)
            .i32(128)
            .f32(0.0)
            .ptr(0)
            .ptr(0)
            .f32(0.0);
        let e = error(&launch("gemm_bf16_bf16", old));
        assert!(e.contains("15 arguments for 1 parameters"), "{e}");
    }

    /// In debug builds, executing a mismatched launch fails before the kernel runs.
    #[cfg(all(feature = "hostsim", debug_assertions))]
    #[test]
    fn the_emulator_refuses_a_mismatched_launch() {
        let mut out = [0.0f32; 32];
        let x = [1.0f32; 32];
        // selftest_bf16_round(const float* x, __nv_bfloat16* y, int n), n passed as a float.
        let mut l = launch(
            "selftest_bf16_round",
            Args::new()
                .ptr(x.as_ptr() as u64)
                .ptr(out.as_mut_ptr() as u64)
                .f32(32.0),
        );
        let e = crate::runtime::hostsim::launch(&mut l)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("argument 2 is a 4-byte float, parameter `n` is a 4-byte integer"),
            "{e}"
        );
        assert_eq!(out, [0.0; 32], "the kernel ran");
    }
}
