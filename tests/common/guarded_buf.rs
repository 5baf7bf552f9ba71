//! For the emulator tests: the test seed, a random source seeded with it, and guarded device
//! buffers. (Included by path, `#[path = "common/guarded_buf.rs"] mod guarded_buf;`.)
// Each test that includes this file uses its own subset.
#![allow(dead_code)]

use half::bf16;
use rand::rngs::StdRng;
use rand::SeedableRng;
use ultrapixel::tensor::DType;

/// `UPX_TEST_SEED`, or a fresh seed that is printed for a rerun.
pub fn seed() -> u64 {
    let seed = std::env::var("UPX_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (rerun with UPX_TEST_SEED={seed})");
    seed
}

/// A random source from [`seed`].
pub fn rng() -> StdRng {
    StdRng::seed_from_u64(seed())
}

/// 16-byte-aligned device memory (host memory under the emulator), poisoned with 0xFF bytes
/// (NaN in f32 and bf16), `guard` extra bytes after the payload to catch unmasked stores.
pub struct Buf {
    words: Vec<u128>,
    bytes: usize,
}

pub const GUARD: usize = 4096;

impl Buf {
    pub fn new(bytes: usize) -> Self {
        Buf {
            words: vec![u128::MAX; (bytes + GUARD).div_ceil(16)],
            bytes,
        }
    }
    pub fn of_bf16(v: &[f32]) -> Self {
        let mut b = Buf::new(v.len() * 2);
        let bits: Vec<u16> = v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
        b.raw_mut()[..v.len() * 2].copy_from_slice(bytemuck::cast_slice(&bits));
        b
    }
    pub fn of_f32(v: &[f32]) -> Self {
        let mut b = Buf::new(v.len() * 4);
        b.raw_mut()[..v.len() * 4].copy_from_slice(bytemuck::cast_slice(v));
        b
    }
    pub fn of(v: &[f32], dtype: DType) -> Self {
        match dtype {
            DType::BF16 => Buf::of_bf16(v),
            _ => Buf::of_f32(v),
        }
    }
    pub fn raw_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.words)
    }
    pub fn raw(&self) -> &[u8] {
        bytemuck::cast_slice(&self.words)
    }
    pub fn addr(&self) -> u64 {
        self.words.as_ptr() as u64
    }
    pub fn read(&self, dtype: DType) -> Vec<f32> {
        let b = &self.raw()[..self.bytes];
        match dtype {
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            _ => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        }
    }
    pub fn guard_intact(&self) -> bool {
        self.raw()[self.bytes..].iter().all(|&b| b == 0xFF)
    }
}
