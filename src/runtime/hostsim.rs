//! The hostsim executor: the real kernels, compiled by g++ against the emulator
//! (`kernels/common/hostsim.h`), run on the CPU. "Device memory" is host memory, so device
//! pointers are host addresses.

use super::device::{Device, DeviceBuffer, LaunchList};
use super::kernels::{hostsim_entry, hostsim_last_error};
use super::launch::{Entry, Launch};
use crate::{Error, Result};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ffi::{c_void, CStr};

/// `hostsim::LaunchCfg` of the emulator.
#[repr(C)]
pub struct LaunchCfg {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub smem_bytes: u32,
}

pub type LaunchFn = unsafe extern "C" fn(*const LaunchCfg, *mut *mut c_void) -> i32;

extern "C" {
    fn hostsim_set_race_check(on: i32) -> i32;
}

/// Forces the emulator's shared-memory race check on or off for launches from the calling
/// thread (None: `HOSTSIM_RACECHECK=1` decides, the default). Returns false when the kernels
/// were built without the instrumentation the check needs.
pub fn set_race_check(on: Option<bool>) -> bool {
    // SAFETY: sets a flag of this thread's emulator state.
    unsafe { hostsim_set_race_check(on.map_or(-1, i32::from)) != 0 }
}

/// Runs one launch on the emulator (synchronously, on the calling thread).
pub fn launch(l: &mut Launch) -> Result<()> {
    let entry = hostsim_entry(l.kernel);
    let cfg = LaunchCfg {
        grid: l.grid,
        block: l.block,
        smem_bytes: l.smem,
    };
    let mut ptrs = l.params()?;
    // SAFETY: the launcher reads one value per kernel parameter from `ptrs`; the op's launch
    // plan packs exactly the kernel's parameters (checked in debug builds), and its pointers
    // address live buffers.
    let rc = unsafe { entry(&cfg, ptrs.as_mut_ptr()) };
    if rc != 0 {
        // SAFETY: the emulator returns a NUL-terminated thread-local message.
        let message = unsafe { CStr::from_ptr(hostsim_last_error()) }
            .to_string_lossy()
            .into_owned();
        return Err(Error::Hostsim {
            kernel: l.kernel.name().into(),
            message,
        });
    }
    Ok(())
}

struct HostAlloc {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: a plain heap block, only accessed through the session that owns it.
unsafe impl Send for HostAlloc {}
unsafe impl Sync for HostAlloc {}

impl Drop for HostAlloc {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `HostsimDevice::alloc`.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// The emulator as a device. `UPX_HOSTSIM_FAIL_KERNEL=<text>` makes every launch of a kernel
/// whose name contains the text fail, as a faulting GPU launch would (for fault tests).
#[derive(Default)]
pub struct HostsimDevice {
    fail_kernel: Option<String>,
}

impl HostsimDevice {
    pub fn new() -> Self {
        HostsimDevice {
            fail_kernel: std::env::var("UPX_HOSTSIM_FAIL_KERNEL")
                .ok()
                .filter(|v| !v.is_empty()),
        }
    }
}

impl Device for HostsimDevice {
    fn describe(&self) -> String {
        "host emulator (kernels compiled by g++, run on the CPU)".into()
    }

    fn kernel_target(&self) -> super::kernel_choice::KernelTarget {
        super::kernel_choice::KernelTarget::hostsim()
    }

    fn alloc(&self, bytes: usize) -> Result<DeviceBuffer> {
        let layout = Layout::from_size_align(bytes.max(1), 256)
            .map_err(|e| Error::InvalidArgument(format!("allocation of {bytes} bytes: {e}")))?;
        // SAFETY: non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(Error::OutOfMemory {
                need_mib: (bytes >> 20) as u64,
                free_mib: 0,
                advice: "the host emulator could not allocate its arena".into(),
            });
        }
        Ok(DeviceBuffer::new(
            ptr as u64,
            bytes,
            Box::new(HostAlloc { ptr, layout }),
        ))
    }

    fn write(&self, dst: u64, data: &[u8]) -> Result<()> {
        // SAFETY: `dst` addresses a buffer from `alloc` with room for `data` (the session
        // computes both from the same plan).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst as *mut u8, data.len()) };
        Ok(())
    }

    fn read(&self, src: u64, out: &mut [u8]) -> Result<()> {
        // SAFETY: as in `write`.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    fn fill(&self, dst: u64, byte: u8, len: usize) -> Result<()> {
        // SAFETY: as in `write`.
        unsafe { std::ptr::write_bytes(dst as *mut u8, byte, len) };
        Ok(())
    }

    fn execute(&self, list: &mut LaunchList) -> Result<()> {
        for (entry, label) in list.launches.iter_mut().zip(&list.labels) {
            let l = match entry {
                Entry::Kernel(l) => l,
                Entry::Vendor(v) => {
                    return Err(Error::Hostsim {
                        kernel: format!("{} ({label})", v.describe()),
                        message: "vendor libraries do not run on the emulator".into(),
                    })
                }
            };
            if let Some(f) = self
                .fail_kernel
                .as_deref()
                .filter(|f| l.kernel.name().contains(f))
            {
                return Err(Error::Hostsim {
                    kernel: format!("{} ({label})", l.kernel.name()),
                    message: format!("launch failed (injected by UPX_HOSTSIM_FAIL_KERNEL={f})"),
                });
            }
            launch(l).map_err(|e| match e {
                Error::Hostsim { kernel, message } => Error::Hostsim {
                    kernel: format!("{kernel} ({label})"),
                    message,
                },
                e => e,
            })?;
        }
        Ok(())
    }
}
