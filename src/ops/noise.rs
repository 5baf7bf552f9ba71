//! Standard normal noise drawn on the device from a seed (`kernels/noise.cu`): the sampler's
//! initial latents and per-step noise, bit-identical on the cpu, hostsim and cuda backends,
//! so a seed reproduces an image on any of them.
//!
//! The draw is a counter-based stream: Philox4x32-10 keyed by the 64-bit seed, counters
//! (group, stream, step), Box–Muller in f64 rounded once to f32. The key lives in a small
//! input tensor, so a graph replayed for the next step draws new noise when the host only
//! rewrites that tensor.

use super::{arity, linear_launch};
use crate::runtime::graph::{LaunchIo, OpImpl, OutSpec, TensorDesc};
use crate::runtime::launch::{Args, Launch};
use crate::tensor::{DType, HostTensor};
use crate::verify::{CheckBuilder, OpCheck, Scale, Tolerance};
use crate::{Error, Result};
use rayon::prelude::*;
use std::f64::consts::PI;

/// Input `key` f32 `[4]` holding the u32 bit patterns of [`noise_key`]; output f32 `shape`.
#[derive(Clone, Debug, PartialEq)]
pub struct GaussianNoise {
    pub shape: Vec<usize>,
}

/// The key tensor's values for `seed`, a `stream` (which tensor: latents of stage C, B, …)
/// and the sampler `step`: u32 words carried bit for bit in f32 slots.
pub fn noise_key(seed: u64, stream: u32, step: u32) -> [f32; 4] {
    [seed as u32, (seed >> 32) as u32, stream, step].map(f32::from_bits)
}

const PHILOX_M0: u64 = 0xD251_1F53;
const PHILOX_M1: u64 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// Philox4x32-10 of `counter` under `key`.
fn philox(mut c: [u32; 4], [mut k0, mut k1]: [u32; 2]) -> [u32; 4] {
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(PHILOX_W0);
            k1 = k1.wrapping_add(PHILOX_W1);
        }
        let p0 = PHILOX_M0 * c[0] as u64;
        let p1 = PHILOX_M1 * c[2] as u64;
        c = [
            (p1 >> 32) as u32 ^ c[1] ^ k0,
            p1 as u32,
            (p0 >> 32) as u32 ^ c[3] ^ k1,
            p0 as u32,
        ];
    }
    c
}

/// The reference stream: element e of the draw for the key words `key`.
pub fn gaussian_noise_ref(key: [u32; 4], out: &mut [f32]) {
    let uniform = |x: u32| (x as f64 + 1.0) * 2f64.powi(-32);
    out.par_chunks_mut(4).enumerate().for_each(|(g, chunk)| {
        let g = g as u64;
        let c = philox(
            [g as u32, (g >> 32) as u32, key[2], key[3]],
            [key[0], key[1]],
        );
        let mut z = [0f32; 4];
        for pair in 0..2 {
            let radius = (-2.0 * uniform(c[2 * pair]).ln()).sqrt();
            let angle = 2.0 * PI * uniform(c[2 * pair + 1]);
            z[2 * pair] = (radius * angle.cos()) as f32;
            z[2 * pair + 1] = (radius * angle.sin()) as f32;
        }
        chunk.copy_from_slice(&z[..chunk.len()]);
    });
}

impl OpImpl for GaussianNoise {
    fn name(&self) -> &'static str {
        "gaussian_noise"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let [key] = arity(self.name(), inputs, 1)? else {
            unreachable!("arity checked")
        };
        if key.shape != [4] || key.dtype != DType::F32 {
            return Err(Error::shape(
                self.name(),
                format!(
                    "key must be f32 [4] (see noise_key), got {:?} {:?}",
                    key.dtype, key.shape
                ),
            ));
        }
        if self.shape.iter().product::<usize>() == 0 {
            return Err(Error::shape(
                self.name(),
                format!("empty shape {:?}", self.shape),
            ));
        }
        Ok(vec![(self.shape.clone(), DType::F32)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let k = &inputs[0].data;
        let key = [k[0], k[1], k[2], k[3]].map(f32::to_bits);
        gaussian_noise_ref(key, &mut outputs[0].data);
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let n = io.outputs[0].desc.numel();
        let args = Args::new()
            .ptr(io.inputs[0].ptr)
            .ptr(io.outputs[0].ptr)
            .u64(n as u64);
        linear_launch("gaussian_noise_f32", n.div_ceil(4), args)
    }
}

/// Hostsim/GPU checks: odd lengths (partial last group), seeds past 2^32, late steps. The
/// kernel and the reference evaluate the same f64 formulas: agreement to an f32 ulp or two.
pub fn checks(seed: u64, scale: Scale) -> Result<Vec<OpCheck>> {
    let mut shapes = vec![vec![1], vec![7], vec![2, 16, 13, 9]];
    if scale == Scale::Gpu {
        shapes.push(vec![2, 16, 256, 256]);
    }
    let mut v = Vec::new();
    for (i, shape) in shapes.into_iter().enumerate() {
        let mut cb = CheckBuilder::new(seed);
        let key_seed = seed.rotate_left(i as u32 * 17) ^ (1 << 40);
        let key = cb.input_values(&[4], &noise_key(key_seed, i as u32, 19 * i as u32))?;
        let y = cb.graph.op1(
            GaussianNoise {
                shape: shape.clone(),
            },
            &[key],
        )?;
        // Both sides evaluate the same f64 formulas from the same Philox words and round
        // once: the f64 values differ by ~1e-15 (libm vs libdevice, each ≤ 1 ulp; radius ≤
        // √(2·32·ln 2) < 6.7), so the f32 results differ by at most one ulp at a rounding tie:
        // ≤ 2⁻²¹ for |z| < 8 (and 1e-13 covers the f64 difference itself near zero).
        v.push(cb.finish(
            format!("gaussian_noise {shape:?}"),
            &[y],
            Tolerance {
                atol: 2f32.powi(-21) + 1e-13,
                rtol: 0.0,
            },
        )?);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_matches_the_random123_known_answer() {
        // Random123's kat_vectors: philox4x32_10 of counter 0, key 0.
        assert_eq!(
            philox([0; 4], [0; 2]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
    }

    #[test]
    fn draws_look_standard_normal_and_depend_on_every_key_word() {
        let n = 200_000;
        let mut a = vec![0f32; n];
        gaussian_noise_ref([1, 2, 3, 4], &mut a);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.01,
            "mean {mean}, var {var}"
        );
        for changed in [[9, 2, 3, 4], [1, 9, 3, 4], [1, 2, 9, 4], [1, 2, 3, 9]] {
            let mut b = vec![0f32; 64];
            gaussian_noise_ref(changed, &mut b);
            assert_ne!(&a[..64], &b[..], "key {changed:?}");
        }
        let mut c = vec![0f32; 5];
        gaussian_noise_ref([1, 2, 3, 4], &mut c);
        assert_eq!(
            &a[..5],
            &c[..],
            "a prefix of a longer draw is the shorter draw"
        );
    }

    #[test]
    fn noise_key_round_trips_its_words() {
        let k = noise_key(0x1234_5678_9abc_def0, 7, u32::MAX);
        assert_eq!(k.map(f32::to_bits), [0x9abc_def0, 0x1234_5678, 7, u32::MAX]);
    }
}
