//! `--backend`: the command-line face of [`BackendKind`] (clap stays out of the runtime).

use crate::runtime::{Backend, BackendKind};
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    /// Our CUDA kernels on an NVIDIA GPU (compute capability 8.0+).
    Cuda,
    /// The same kernels on the CPU through the host emulator (very slow; for testing).
    Hostsim,
    /// Naive f32 reference implementations on the CPU (slow; exact).
    Cpu,
}

impl BackendArg {
    /// The option's value, as typed.
    pub fn name(self) -> &'static str {
        match self {
            BackendArg::Cuda => "cuda",
            BackendArg::Hostsim => "hostsim",
            BackendArg::Cpu => "cpu",
        }
    }
}

impl From<BackendArg> for BackendKind {
    fn from(a: BackendArg) -> BackendKind {
        match a {
            BackendArg::Cuda => BackendKind::Cuda,
            BackendArg::Hostsim => BackendKind::Hostsim,
            BackendArg::Cpu => BackendKind::Cpu,
        }
    }
}

/// Opens the backend; without a usable GPU, the error says what the CPU backends offer.
pub fn open(arg: BackendArg) -> Result<Backend> {
    open_device(arg, 0)
}

/// As [`open`], on GPU `ordinal` for cuda (the CPU backends have one device each: a second
/// ordinal opens another instance of the same).
pub fn open_device(arg: BackendArg, ordinal: usize) -> Result<Backend> {
    let opened = match arg {
        BackendArg::Cuda => crate::backend::open_gpu(ordinal).map(Backend::Cuda),
        _ => Backend::open(arg.into()),
    };
    opened.map_err(|e| match (e, arg) {
        (
            e @ (Error::NoDriver | Error::NoDevice(_) | Error::KernelsNotCompiled),
            BackendArg::Cuda,
        ) => Error::InvalidArgument(format!(
            "{e} (--backend hostsim runs our kernels under the CPU emulator, --backend cpu \
                 the reference code; only the tiny test model of `ultrapixel make-tiny-model \
                 DIR` finishes in reasonable time on them: hostsim about a minute at 512x512, \
                 cpu seconds)"
        )),
        (e, _) => e,
    })
}
