//! TMA tensor maps: the descriptor a `cp.async.bulk.tensor` copy reads (kernels/common/
//! hopper_sm90a.cuh), built by one function for both kernel backends. On cuda it is the
//! driver's `CUtensorMap` from `cuTensorMapEncodeTiled`; on hostsim it is the emulator's own
//! `hostsim::TensorMapDesc` (kernels/common/hostsim.h). Either way the spec is first checked
//! against the driver's documented rules for `cuTensorMapEncodeTiled`, so a map the GPU would
//! refuse fails on the emulator too, with an error that names the rule.
//!
//! Dimension 0 is the innermost (contiguous) one: a row-major R×C matrix has dims [C, R] and
//! strides [C·element bytes].

use super::BackendKind;
use crate::{Error, Result};

/// Element types the kernels copy with TMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TmaDtype {
    Bf16,
    F16,
    F32,
}

impl TmaDtype {
    pub fn bytes(self) -> u32 {
        match self {
            TmaDtype::Bf16 | TmaDtype::F16 => 2,
            TmaDtype::F32 => 4,
        }
    }
}

/// The shared-memory swizzle of the box (the wgmma descriptors' swizzle modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TmaSwizzle {
    None,
    B32,
    B64,
    B128,
}

impl TmaSwizzle {
    /// The swizzle span in bytes (0: none).
    pub fn span(self) -> u32 {
        match self {
            TmaSwizzle::None => 0,
            TmaSwizzle::B32 => 32,
            TmaSwizzle::B64 => 64,
            TmaSwizzle::B128 => 128,
        }
    }
}

/// A tiled tensor map's parameters (`cuTensorMapEncodeTiled`'s, without interleave, with no
/// L2 promotion choice and out-of-range elements filled with zeros).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMapSpec {
    pub dtype: TmaDtype,
    /// Device address of element 0 (a host address under the emulator).
    pub global_address: u64,
    /// Elements per dimension, innermost first (rank = its length).
    pub dims: Vec<u64>,
    /// Byte strides of dimensions 1.. (rank − 1 entries).
    pub strides: Vec<u64>,
    /// The box (elements per copy) per dimension.
    pub box_dims: Vec<u32>,
    /// Traversal stride per dimension (1: every element); dimension 0's must be 1.
    pub element_strides: Vec<u32>,
    pub swizzle: TmaSwizzle,
}

/// An encoded tensor map, passed by value to a `const __grid_constant__ CUtensorMap`
/// parameter ([`Args::tensor_map`](super::launch::Args::tensor_map)). 64-byte aligned, as the
/// driver requires.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct TensorMap {
    pub words: [u64; 16],
}

/// `hostsim::TensorMapDesc`: its magic and byte offsets (asserted there too).
const MAGIC: u64 = u64::from_le_bytes(*b"TORSMAP1");
const OFF_STRIDES: usize = 16;
const OFF_DIMS: usize = 48;
const OFF_BOX: usize = 68;
const OFF_ELEM_STRIDES: usize = 78;
const OFF_RANK: usize = 83;

impl TensorMapSpec {
    pub fn rank(&self) -> usize {
        self.dims.len()
    }

    /// Bytes one copy moves: the box with its element strides, out-of-range elements included
    /// (what `mbarrier_arrive_expect_tx` must announce).
    pub fn box_bytes(&self) -> u64 {
        let elements: u64 = self
            .box_dims
            .iter()
            .zip(&self.element_strides)
            .map(|(&b, &e)| b.div_ceil(e.max(1)) as u64)
            .product();
        elements * self.dtype.bytes() as u64
    }

    /// The driver's validity rules for `cuTensorMapEncodeTiled` (CUDA driver API, "Tensor Map
    /// Object Management"), and the one this project adds (element stride 1 in dimension 0).
    pub fn validate(&self) -> Result<()> {
        let bad = |rule: &str, detail: String| {
            Err(Error::InvalidArgument(format!(
                "tensor map rejected: {rule} ({detail})"
            )))
        };
        let rank = self.rank();
        if !(1..=5).contains(&rank) {
            return bad("the rank must be 1 to 5", format!("rank {rank}"));
        }
        if self.strides.len() != rank - 1
            || self.box_dims.len() != rank
            || self.element_strides.len() != rank
        {
            return bad(
                "a rank-r map has r dims, r − 1 strides, r box sides and r element strides",
                format!(
                    "{} dims, {} strides, {} box sides, {} element strides",
                    rank,
                    self.strides.len(),
                    self.box_dims.len(),
                    self.element_strides.len()
                ),
            );
        }
        if self.global_address % 16 != 0 {
            return bad(
                "the global address must be 16-byte aligned",
                format!("{:#x}", self.global_address),
            );
        }
        for (d, &n) in self.dims.iter().enumerate() {
            if n == 0 || n > 1 << 32 {
                return bad(
                    "every dimension must be 1 to 2^32 elements",
                    format!("dimension {d} has {n}"),
                );
            }
        }
        for (i, &s) in self.strides.iter().enumerate() {
            if s % 16 != 0 || s >= 1 << 40 {
                return bad(
                    "every global stride must be a multiple of 16 bytes below 2^40",
                    format!("dimension {} has stride {s}", i + 1),
                );
            }
        }
        for (d, &b) in self.box_dims.iter().enumerate() {
            if b == 0 || b > 256 {
                return bad(
                    "every box side must be 1 to 256 elements",
                    format!("dimension {d} has {b}"),
                );
            }
        }
        let inner = self.box_dims[0] * self.dtype.bytes();
        if inner % 16 != 0 {
            return bad(
                "the inner box side must be a multiple of 16 bytes",
                format!(
                    "{} elements of {} bytes",
                    self.box_dims[0],
                    self.dtype.bytes()
                ),
            );
        }
        let span = self.swizzle.span();
        if span != 0 && inner > span {
            return bad(
                "the inner box side must not exceed the swizzle span",
                format!("{inner} bytes with a {span}-byte swizzle"),
            );
        }
        for (d, &e) in self.element_strides.iter().enumerate() {
            if e == 0 || e > 8 {
                return bad(
                    "every element stride must be 1 to 8",
                    format!("dimension {d} has {e}"),
                );
            }
        }
        if self.element_strides[0] != 1 {
            return bad(
                "dimension 0's element stride must be 1 (the kernels and the emulator support no other)",
                format!("{}", self.element_strides[0]),
            );
        }
        Ok(())
    }

    /// The map for `backend`: the driver's encoding on cuda, the emulator's on hostsim.
    pub fn encode(&self, backend: BackendKind) -> Result<TensorMap> {
        self.validate()?;
        match backend {
            BackendKind::Cuda => self.encode_cuda(),
            BackendKind::Hostsim => Ok(self.encode_hostsim()),
            BackendKind::Cpu => Err(Error::InvalidArgument(
                "tensor map: the cpu backend runs no kernels".into(),
            )),
        }
    }

    fn encode_hostsim(&self) -> TensorMap {
        let mut map = TensorMap { words: [0; 16] };
        let b: &mut [u8] = bytemuck::bytes_of_mut(&mut map);
        let mut put = |at: usize, bytes: &[u8]| b[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &MAGIC.to_le_bytes());
        put(8, &self.global_address.to_le_bytes());
        for (i, s) in self.strides.iter().enumerate() {
            put(OFF_STRIDES + 8 * i, &s.to_le_bytes());
        }
        for (d, &n) in self.dims.iter().enumerate() {
            put(OFF_DIMS + 4 * d, &((n - 1) as u32).to_le_bytes());
            put(OFF_BOX + 2 * d, &(self.box_dims[d] as u16).to_le_bytes());
            put(OFF_ELEM_STRIDES + d, &[self.element_strides[d] as u8]);
        }
        put(
            OFF_RANK,
            &[
                self.rank() as u8,
                self.dtype.bytes() as u8,
                self.swizzle.span() as u8,
            ],
        );
        map
    }

    fn encode_cuda(&self) -> Result<TensorMap> {
        use cudarc::driver::sys;
        if !super::cuda::driver_present() {
            return Err(Error::NoDriver);
        }
        let dtype = match self.dtype {
            TmaDtype::Bf16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            TmaDtype::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
            TmaDtype::F32 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
        };
        let swizzle = match self.swizzle {
            TmaSwizzle::None => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
            TmaSwizzle::B32 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_32B,
            TmaSwizzle::B64 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B,
            TmaSwizzle::B128 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
        };
        let mut map = TensorMap { words: [0; 16] };
        // SAFETY: `map` is 128 bytes, 64-byte aligned (the driver's CUtensorMap); the arrays
        // hold `rank` (strides: rank − 1) entries, as validate() checked.
        unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map as *mut TensorMap as *mut sys::CUtensorMap,
                dtype,
                self.rank() as u32,
                self.global_address as *mut std::ffi::c_void,
                self.dims.as_ptr(),
                self.strides.as_ptr(),
                self.box_dims.as_ptr(),
                self.element_strides.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
            .result()
        }
        .map_err(|e| {
            Error::InvalidArgument(format!("cuTensorMapEncodeTiled refused {self:?}: {e}"))
        })?;
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid 2-d bf16 map: 37 rows of 50 elements (112 bytes apart), a 64 × 8 box (wider than
    /// the rows: the rest reads as zeros), 128-byte swizzle.
    fn spec() -> TensorMapSpec {
        TensorMapSpec {
            dtype: TmaDtype::Bf16,
            global_address: 0x1000,
            dims: vec![50, 37],
            strides: vec![112],
            box_dims: vec![64, 8],
            element_strides: vec![1, 1],
            swizzle: TmaSwizzle::B128,
        }
    }

    fn rejected(s: TensorMapSpec, rule: &str) {
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains(rule), "expected `{rule}` in: {e}");
        assert!(s.encode(BackendKind::Hostsim).is_err());
    }

    #[test]
    fn every_driver_rule_rejects_with_its_name() {
        spec().validate().unwrap();
        let with = |f: &dyn Fn(&mut TensorMapSpec)| {
            let mut s = spec();
            f(&mut s);
            s
        };
        rejected(
            with(&|s| {
                s.dims = vec![4; 6];
                s.strides = vec![16; 5];
                s.box_dims = vec![8; 6];
                s.element_strides = vec![1; 6];
            }),
            "the rank must be 1 to 5",
        );
        rejected(with(&|s| s.strides.clear()), "r − 1 strides");
        rejected(with(&|s| s.global_address = 0x1008), "16-byte aligned");
        rejected(with(&|s| s.dims[1] = 0), "1 to 2^32 elements");
        rejected(with(&|s| s.dims[0] = (1 << 32) + 1), "1 to 2^32 elements");
        rejected(
            with(&|s| s.strides[0] = 104),
            "multiple of 16 bytes below 2^40",
        );
        rejected(
            with(&|s| s.strides[0] = 1 << 40),
            "multiple of 16 bytes below 2^40",
        );
        rejected(with(&|s| s.box_dims[1] = 257), "1 to 256 elements");
        rejected(with(&|s| s.box_dims[1] = 0), "1 to 256 elements");
        rejected(with(&|s| s.box_dims[0] = 60), "multiple of 16 bytes");
        rejected(
            with(&|s| s.box_dims[0] = 72),
            "must not exceed the swizzle span",
        );
        rejected(
            with(&|s| {
                s.swizzle = TmaSwizzle::B32;
                s.box_dims[0] = 32;
            }),
            "must not exceed the swizzle span",
        );
        rejected(with(&|s| s.element_strides[1] = 9), "1 to 8");
        rejected(with(&|s| s.element_strides[1] = 0), "1 to 8");
        rejected(
            with(&|s| s.element_strides[0] = 2),
            "dimension 0's element stride",
        );
        // Without swizzle a 512-byte inner side is fine (256 elements of f32 is too, at the limit).
        with(&|s| {
            s.swizzle = TmaSwizzle::None;
            s.dtype = TmaDtype::F32;
            s.box_dims[0] = 256;
        })
        .validate()
        .unwrap();
    }

    #[test]
    fn box_bytes_count_element_strides_and_out_of_range_elements() {
        let mut s = spec();
        assert_eq!(s.box_bytes(), 64 * 8 * 2);
        s.element_strides[1] = 3;
        assert_eq!(s.box_bytes(), 64 * 3 * 2);
    }

    #[test]
    fn the_emulator_encoding_has_the_documented_layout() {
        let m = spec().encode(BackendKind::Hostsim).unwrap();
        let b: &[u8] = bytemuck::bytes_of(&m);
        assert_eq!(&b[0..8], b"TORSMAP1");
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 0x1000);
        assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 112);
        assert_eq!(u32::from_le_bytes(b[48..52].try_into().unwrap()), 49);
        assert_eq!(u32::from_le_bytes(b[52..56].try_into().unwrap()), 36);
        assert_eq!(u16::from_le_bytes(b[68..70].try_into().unwrap()), 64);
        assert_eq!(&b[78..80], &[1, 1]);
        assert_eq!(&b[83..86], &[2, 2, 128]);
        assert_eq!(std::mem::align_of::<TensorMap>(), 64);
    }
}
