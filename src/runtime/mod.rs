//! The runtime: op graph, arena planner, executors (cpu, hostsim, cuda) and the kernel table.

pub mod abi;
pub mod cpu;
pub mod cuda;
pub mod device;
pub mod graph;
#[cfg(feature = "hostsim")]
pub mod hostsim;
pub mod kernel_choice;
pub mod kernels;
pub mod launch;
pub mod planner;
pub mod session;
pub mod session_cache;
pub mod tensor_map;

use crate::Result;
use graph::Graph;
use session::{Session, SessionOptions, WeightSource};
use std::sync::Arc;

/// Which executor runs a graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Our CUDA kernels on an NVIDIA GPU (compute capability 8.0+).
    Cuda,
    /// The same kernels on the CPU through the host emulator (very slow; for testing).
    Hostsim,
    /// Naive f32 reference implementations on the CPU (slow; exact).
    Cpu,
}

/// An opened backend: sessions created from it share its device.
#[derive(Clone)]
pub enum Backend {
    Cpu,
    #[cfg(feature = "hostsim")]
    Hostsim(Arc<hostsim::HostsimDevice>),
    Cuda(Arc<cuda::CudaDevice>),
}

/// `Backend::open` lives with what it installs, in `crate::backend`.
impl Backend {
    pub fn kind(&self) -> BackendKind {
        match self {
            Backend::Cpu => BackendKind::Cpu,
            #[cfg(feature = "hostsim")]
            Backend::Hostsim(_) => BackendKind::Hostsim,
            Backend::Cuda(_) => BackendKind::Cuda,
        }
    }

    /// Bytes the device has free for a generation (None: the CPU backends, which have no
    /// limit of their own).
    pub fn free_memory(&self) -> Result<Option<u64>> {
        match self {
            Backend::Cuda(d) => Ok(Some(d.memory()?.0 as u64)),
            _ => Ok(None),
        }
    }

    /// The kernel executor's device (None for the cpu backend).
    pub fn device(&self) -> Option<Arc<dyn device::Device>> {
        match self {
            Backend::Cpu => None,
            #[cfg(feature = "hostsim")]
            Backend::Hostsim(d) => Some(d.clone()),
            Backend::Cuda(d) => Some(d.clone()),
        }
    }

    /// Places `graph` on this backend with its weights; ready to run.
    pub fn session(
        &self,
        graph: Graph,
        weights: &dyn WeightSource,
        opts: SessionOptions,
    ) -> Result<Box<dyn Session + Send>> {
        self.session_sharing(graph, weights, opts, None)
    }

    /// As [`Backend::session`], taking the weights already in `cache` from there and adding
    /// the others to it (kernel backends; the cpu backend keeps its own copies).
    pub fn session_sharing(
        &self,
        graph: Graph,
        weights: &dyn WeightSource,
        opts: SessionOptions,
        cache: Option<&device::WeightCache>,
    ) -> Result<Box<dyn Session + Send>> {
        let Some(device) = self.device() else {
            return Ok(Box::new(cpu::CpuSession::new(graph, weights)?));
        };
        let session = device::KernelSession::new(device, graph, weights, opts, cache)?;
        Ok(Box::new(session))
    }
}
