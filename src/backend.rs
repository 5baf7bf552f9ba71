//! Opening a backend: the runtime's executor and, on a GPU, the GEMM dispatch of the tuning
//! table that matches it. The dispatch belongs to a layer above the runtime (it knows the GEMM
//! ops and the table); installing it here keeps the runtime free of that layer.

use crate::runtime::cuda::CudaDevice;
use crate::runtime::{Backend, BackendKind};
use crate::Result;
use std::sync::Arc;

impl Backend {
    pub fn open(kind: BackendKind) -> Result<Backend> {
        match kind {
            BackendKind::Cpu => Ok(Backend::Cpu),
            #[cfg(feature = "hostsim")]
            BackendKind::Hostsim => Ok(Backend::Hostsim(Arc::new(
                crate::runtime::hostsim::HostsimDevice::new(),
            ))),
            #[cfg(not(feature = "hostsim"))]
            BackendKind::Hostsim => Err(crate::Error::HostsimUnavailable),
            BackendKind::Cuda => Ok(Backend::Cuda(open_gpu(0)?)),
        }
    }
}

/// GPU `ordinal` with the tuning table's GEMM dispatch installed.
pub fn open_gpu(ordinal: usize) -> Result<Arc<CudaDevice>> {
    let dev = CudaDevice::new(ordinal)?;
    crate::tune::dispatch::of(&dev);
    Ok(dev)
}
