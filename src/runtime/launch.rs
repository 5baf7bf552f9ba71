//! A kernel launch as data: which kernel, the launch shape and the packed arguments. The
//! same record drives the CUDA driver and the host emulator (both take `void**` arguments,
//! the `cuLaunchKernel` convention). A launch list's [`Entry`] is such a launch or a vendor
//! library's call (cuBLASLt, chosen per GEMM by the tuning table on the cuda backend).

use super::abi::{self, ArgKind, KernelStruct};
use super::kernels::KernelId;
use crate::Result;
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

/// Kernel arguments: each one's value from an 8-byte boundary (little endian, so a 4-byte
/// value in the low half of its word reads right; a parameter struct takes as many words as
/// it needs), and how it was passed, which [`Launch::check_abi`] compares with the kernel's
/// parameters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Args {
    words: Vec<u64>,
    /// Each argument's first word and kind.
    slots: Vec<(usize, ArgKind)>,
}

impl Args {
    pub fn new() -> Self {
        Args::default()
    }

    fn push(mut self, kind: ArgKind, words: &[u64]) -> Self {
        self.slots.push((self.words.len(), kind));
        self.words.extend_from_slice(words);
        self
    }

    /// A device pointer (a host address under the emulator).
    pub fn ptr(self, p: u64) -> Self {
        self.push(ArgKind::Ptr, &[p])
    }

    /// Several device pointers in order.
    pub fn ptrs(self, ps: &[u64]) -> Self {
        ps.iter().fold(self, |a, &p| a.ptr(p))
    }

    pub fn i32(self, v: i32) -> Self {
        self.push(ArgKind::Int(4), &[v as u32 as u64])
    }

    pub fn u32(self, v: u32) -> Self {
        self.push(ArgKind::Int(4), &[v as u64])
    }

    pub fn f32(self, v: f32) -> Self {
        self.push(ArgKind::Float(4), &[v.to_bits() as u64])
    }

    /// A 64-bit integer (`long long`).
    pub fn u64(self, v: u64) -> Self {
        self.push(ArgKind::Int(8), &[v])
    }

    /// A parameter struct, by value.
    pub fn by_value<T: KernelStruct>(self, v: &T) -> Self {
        let bytes = bytemuck::bytes_of(v);
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        self.push(ArgKind::Struct(T::C_NAME, bytes.len()), &words)
    }

    /// A TMA tensor map, for a `const __grid_constant__ CUtensorMap` parameter.
    pub fn tensor_map(self, m: &super::tensor_map::TensorMap) -> Self {
        self.push(ArgKind::Struct("CUtensorMap", 128), &m.words)
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// How each argument is passed.
    pub fn kinds(&self) -> Vec<ArgKind> {
        self.slots.iter().map(|&(_, k)| k).collect()
    }

    /// The `void**` array: pointers into this argument list, valid while `self` is neither
    /// moved nor modified.
    fn pointers(&mut self) -> Vec<*mut c_void> {
        let base = self.words.as_mut_ptr();
        self.slots
            .iter()
            .map(|&(word, _)| base.wrapping_add(word) as *mut c_void)
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

    /// Checks the arguments against the kernel's parameters (count, width, pointer or
    /// scalar, integer or float, struct name and size).
    pub fn check_abi(&self) -> Result<()> {
        abi::check(self.kernel, &self.args.kinds())
    }

    /// The `cuLaunchKernel` argument array, valid while `self` is neither moved nor modified.
    /// Debug builds check the arguments against the kernel's parameters first, on every
    /// launch of every executor.
    pub fn params(&mut self) -> Result<Vec<*mut c_void>> {
        if cfg!(debug_assertions) {
            self.check_abi()?;
        }
        Ok(self.args.pointers())
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

    /// A parameter struct's bytes, whole and 8-byte aligned (no struct here needs more), at
    /// its argument's pointer, between the arguments around it.
    #[test]
    fn a_struct_argument_holds_its_bytes() {
        use crate::ops::gemm::GemmParams;
        let g = GemmParams {
            a: 0x1000,
            m: 7,
            film_k: 0.5,
            pad: -1,
            ..bytemuck::Zeroable::zeroed()
        };
        let mut a = Args::new().i32(-3).by_value(&g).f32(1.5);
        assert_eq!(
            a.kinds(),
            [
                ArgKind::Int(4),
                ArgKind::Struct("GemmParams", size_of::<GemmParams>()),
                ArgKind::Float(4)
            ]
        );
        let p = a.pointers();
        assert_eq!(p[1] as usize % align_of::<GemmParams>(), 0);
        unsafe {
            assert_eq!(*(p[0] as *const i32), -3);
            let back = *(p[1] as *const GemmParams);
            assert_eq!(bytemuck::bytes_of(&back), bytemuck::bytes_of(&g));
            assert_eq!(*(p[2] as *const f32), 1.5);
        }
    }
}
