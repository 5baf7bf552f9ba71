//! One error type for the whole crate. Every variant's message says what went wrong and,
//! where there is one, what to do about it.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no CUDA driver found (libcuda.so could not be loaded); without an NVIDIA GPU, use the hostsim or cpu backend")]
    NoDriver,
    #[error("no CUDA device: {0}; without an NVIDIA GPU, use the hostsim or cpu backend")]
    NoDevice(String),
    #[error("kernels not compiled: this binary was built without nvcc; run tools/install-cuda-toolchain.sh and rebuild")]
    KernelsNotCompiled,
    #[error("GPU compute capability {major}.{minor} is not supported: ultrapixel needs 8.0 (Ampere) or newer for bf16 tensor cores")]
    UnsupportedDevice { major: i32, minor: i32 },
    #[error("CUDA error in {context}: {message}")]
    Cuda { context: String, message: String },
    #[error("kernels missing from the embedded modules: {}", .0.join(", "))]
    KernelsMissing(Vec<String>),
    #[error("host emulator: kernel {kernel} failed: {message}")]
    Hostsim { kernel: String, message: String },
    #[error("kernel {kernel}: the launch's arguments do not match the kernel's parameters in kernels/*.cu: {message}")]
    KernelAbi { kernel: String, message: String },
    #[error("host emulator not built in: rebuild with the `hostsim` feature (on by default)")]
    HostsimUnavailable,
    #[error("shape error in {op}: {message}")]
    Shape { op: String, message: String },
    #[error("{0}")]
    InvalidArgument(String),
    /// A generation request setting out of range: `field` is the request's field
    /// (`stage_c.steps`, `batch`, `output`...), so a front end can name its own option.
    #[error("{field} {value}: {reason}")]
    InvalidSetting {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    /// A download that failed on the way (the network, the hub's servers, a corrupt or cut
    /// transfer): running the command again may succeed, and resumes it (exit code 1).
    #[error("{what}: {message}")]
    Download { what: String, message: String },
    #[error("weights: {0}")]
    Weights(String),
    #[error("case {case}: {message}")]
    Case { case: String, message: String },
    #[error("not enough GPU memory: {need_mib} MiB needed, {free_mib} MiB free; {advice}")]
    OutOfMemory {
        need_mib: u64,
        free_mib: u64,
        advice: String,
    },
    #[error("interrupted")]
    Interrupted,
    #[error("{stage} produced {count} NaN/Inf values of {total}: the numbers overflowed or the weights are corrupt (re-download them; if they were converted to float16, use bf16 or f32 files)")]
    NonFinite {
        stage: String,
        count: usize,
        total: usize,
    },
}

impl Error {
    pub fn shape(op: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Shape {
            op: op.into(),
            message: message.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            message: message.into(),
        }
    }

    pub fn cuda(context: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Error::Cuda {
            context: context.into(),
            message: message.to_string(),
        }
    }
}
