//! A kernel launch as data: which kernel, the launch shape and the packed arguments. The
//! same record drives the CUDA driver and the host emulator (both take `void**` arguments,
//! the `cuLaunchKernel` convention). A launch list's [`Entry`] is such a launch or a vendor
//! library's call (cuBLASLt, chosen per GEMM by the tuning table on the cuda backend).

use super::kernels::KernelId;
use std::ffi::c_void;
use std::sync::Arc;

/// Work a library enqueues in place of our kernels (cuBLASLt on the cuda backend). It goes to
/// the executor's stream, so it is ordered with our launches and captured in the same graph.
pub trait VendorCall: Send + Sync {
    /// Enqueues the call on `stream` (a `CUstream`, as an integer).
    ///
    /// # Safety
    /// The device buffers the call was built with must be live, and `stream` a stream of the
    /// context they belong to.
    unsafe fn enqueue(&self, stream: usize) -> crate::Result<()>;
    /// What it runs, for error messages and reports.
    fn describe(&self) -> String;
}

/// One entry of a launch list: our kernel, or a vendor library's call.
#[derive(Clone)]
pub enum Entry {
    Kernel(Launch),
    Vendor(Arc<dyn VendorCall>),
}

impl Entry {
    /// The kernel launch, if this entry is one.
    pub fn kernel(&self) -> Option<&Launch> {
        match self {
            Entry::Kernel(l) => Some(l),
            Entry::Vendor(_) => None,
        }
    }

    /// The kernel's name or the vendor call's description.
    pub fn name(&self) -> String {
        match self {
            Entry::Kernel(l) => l.kernel.name().to_string(),
            Entry::Vendor(v) => v.describe(),
        }
    }
}

impl From<Launch> for Entry {
    fn from(l: Launch) -> Entry {
        Entry::Kernel(l)
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Entry::Kernel(l) => l.fmt(f),
            Entry::Vendor(v) => write!(f, "Vendor({})", v.describe()),
        }
    }
}

/// Kernel arguments, one 8-byte slot each (every kernel parameter is a scalar or a pointer of
/// at most 8 bytes; little endian, so a 4-byte value in the low half of its slot reads right).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Args {
    slots: Vec<u64>,
}

impl Args {
    pub fn new() -> Self {
        Args::default()
    }

    /// A device pointer (a host address under the emulator).
    pub fn ptr(mut self, p: u64) -> Self {
        self.slots.push(p);
        self
    }

    /// Several device pointers in order.
    pub fn ptrs(self, ps: &[u64]) -> Self {
        ps.iter().fold(self, |a, &p| a.ptr(p))
    }

    pub fn i32(mut self, v: i32) -> Self {
        self.slots.push(v as u32 as u64);
        self
    }

    pub fn u32(mut self, v: u32) -> Self {
        self.slots.push(v as u64);
        self
    }

    pub fn f32(mut self, v: f32) -> Self {
        self.slots.push(v.to_bits() as u64);
        self
    }

    pub fn u64(mut self, v: u64) -> Self {
        self.slots.push(v);
        self
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The `void**` array: pointers into this argument list, valid while `self` is neither
    /// moved nor modified.
    pub fn pointers(&mut self) -> Vec<*mut c_void> {
        self.slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub kernel: KernelId,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    /// Dynamic shared memory in bytes.
    pub smem: u32,
    pub args: Args,
}

impl Launch {
    /// A 1-d grid of `blocks` blocks of `threads` threads.
    pub fn linear(kernel: KernelId, blocks: u32, threads: u32, args: Args) -> Self {
        Launch {
            kernel,
            grid: [blocks, 1, 1],
            block: [threads, 1, 1],
            smem: 0,
            args,
        }
    }

    pub fn threads_per_block(&self) -> u32 {
        self.block.iter().product()
    }
}

/// ceil(a / b) for launch shapes.
pub fn ceil_div(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argument_slots_hold_values_in_their_low_bytes() {
        let mut a = Args::new().i32(-3).f32(1.5).ptr(0xdead_beef_0000);
        let p = a.pointers();
        unsafe {
            assert_eq!(*(p[0] as *const i32), -3);
            assert_eq!(*(p[1] as *const f32), 1.5);
            assert_eq!(*(p[2] as *const u64), 0xdead_beef_0000);
        }
    }
}
