//! Sinusoidal embeddings: Stable Cascade's r-embedding (every TimestepBlock, the INR time
//! FiLM and, of the scale signal, the scale-aware norm), plus the f32 numerics the embeddings
//! share with the INR positional encoding and the sampler: accurate sin/cos/exp and
//! `torch.linspace`'s exact f32 values.
//!
//! The arguments reach 10⁴ rad, so every step follows the official f32 order and sin/cos are
//! evaluated accurately (f64 of the f32 argument, rounded once): the f32 rounding of the
//! argument alone is worth about 2e-4 absolute, any other order adds up to 1e-3.

use super::layout::{input_values, rows_launch};
use super::{inputs_n, require_f32, to_i32, LaunchIo, OpImpl, OutSpec};
use crate::runtime::graph::TensorDesc;
use crate::runtime::launch::{Args, Launch};
use crate::tensor::{DType, HostTensor};
use crate::verify::{CheckBuilder, OpCheck, Scale, Tolerance};
use crate::{Error, Result};

/// `max_positions` of `gen_r_embedding`: r is scaled by it, and it sets the frequency range.
const MAX_POSITIONS: f32 = 10000.0;

/// `f` (sin, cos, exp, ln, acos …) of an f32 argument, evaluated in f64 and rounded once:
/// correctly rounded but for rare double-rounding ties, like PyTorch's accurate f32 math.
pub(crate) fn accurate(f: fn(f64) -> f64, x: f32) -> f32 {
    f(x as f64) as f32
}

/// `torch.linspace(start, end, steps)` in f32, value for value: step = (end − start)/(steps − 1)
/// in f32; the first half is `start + step·k`, the second half `end − step·(steps − 1 − k)`,
/// each rounded once (PyTorch's CPU kernel is a scalar loop its x86 builds compile with fused
/// multiply-adds; this reproduces the `r_range_20` input of the `sampler_step` case bit for bit).
pub fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    (0..steps)
        .map(|k| {
            if k < steps / 2 {
                step.mul_add(k as f32, start)
            } else {
                (-step).mul_add((steps - 1 - k) as f32, end)
            }
        })
        .collect()
}

/// The exponent step k = −ln 10000/(c/2 − 1) of a c-wide embedding: a double rounded to f32.
fn frequency_step(c: usize) -> f32 {
    (-(MAX_POSITIONS as f64).ln() / (c / 2 - 1) as f64) as f32
}

/// The frequencies f_i = exp(i·k) of a c-wide embedding: i an f32, the product in f32.
fn frequencies(c: usize) -> Vec<f32> {
    let k = frequency_step(c);
    (0..c / 2)
        .map(|i| accurate(f64::exp, i as f32 * k))
        .collect()
}

/// emb_c(r) for each value of `r` into consecutive rows of `out` (`r.len()·c` values):
/// [sin(r′·f_0 …), cos(r′·f_0 …)] with r′ = r·10000 and every product in f32.
pub fn sin_embedding_ref(r: &[f32], c: usize, out: &mut [f32]) {
    let freqs = frequencies(c);
    for (&rv, row) in r.iter().zip(out.chunks_exact_mut(c)) {
        let (sin, cos) = row.split_at_mut(c / 2);
        let scaled = rv * MAX_POSITIONS;
        for ((s, co), &f) in sin.iter_mut().zip(cos.iter_mut()).zip(&freqs) {
            let arg = scaled * f;
            *s = accurate(f64::sin, arg);
            *co = accurate(f64::cos, arg);
        }
    }
}

/// The scale-aware norm's resolution signal s = √(ln(H·W)/ln 576) for an H×W map, computed
/// in f64 and rounded to f32 as the official code does (s = 1 at 24×24). H·W must be at
/// least 1 (0 gives NaN).
pub fn scale_signal(h: usize, w: usize) -> f32 {
    (((h * w) as f64).ln() / 576f64.ln()).sqrt() as f32
}

/// Stable Cascade's `gen_r_embedding`: f32 `r [B]` → f32 `[B, c]`, sin block then cos block.
#[derive(Clone, Debug, PartialEq)]
pub struct SinEmbedding {
    /// Embedding width: even, at least 4 (64 everywhere in the models).
    pub c: usize,
}

impl SinEmbedding {
    fn batch(&self, r: &[usize]) -> Result<usize> {
        if self.c < 4 || self.c % 2 != 0 {
            return Err(Error::shape(
                self.name(),
                format!("the width c = {} must be even and at least 4", self.c),
            ));
        }
        match r {
            [b] => Ok(*b),
            _ => Err(Error::shape(
                self.name(),
                format!("r must be a vector [B], got shape {r:?}"),
            )),
        }
    }
}

impl OpImpl for SinEmbedding {
    fn name(&self) -> &'static str {
        "sin_embedding"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let [r] = inputs_n(self.name(), inputs)?;
        require_f32(self.name(), "r", r)?;
        let b = self.batch(&r.shape)?;
        Ok(vec![(vec![b, self.c], DType::F32)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        self.batch(&inputs[0].shape)?;
        sin_embedding_ref(&inputs[0].data, self.c, &mut outputs[0].data);
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let r = io.inputs[0];
        require_f32(self.name(), "r", r.desc)?;
        let b = self.batch(&r.desc.shape)?;
        let args = Args::new()
            .ptr(r.ptr)
            .ptr(io.outputs[0].ptr)
            .u64(b as u64)
            .i32(to_i32(self.name(), "width", self.c)?)
            .f32(frequency_step(self.c));
        Ok(vec![rows_launch("sin_embedding_f32", b, self.c / 2, args)?])
    }
}

/// Checks for `verify` and the emulator tests: 1 to 1000 values of r (±1.5, the ends 0 and
/// 1 included) at the model width 64 and at small and wide odd half-widths.
pub fn checks(seed: u64, _scale: Scale) -> Result<Vec<OpCheck>> {
    // The same f32 argument on both sides (frequencies: exp in double of the same f32
    // product, rounded once), sin and cos in double rounded once: at a rounding tie the sides
    // differ by one ulp, ≤ 2⁻²⁴ below 1 (2⁻²³ bounds it with |y| = 1 included).
    let tol = Tolerance {
        atol: 2.0 * crate::verify::bound::U as f32,
        rtol: 0.0,
    };
    let mut v = Vec::new();
    for (i, (batch, c)) in [(1, 64), (7, 64), (37, 6), (1000, 64), (5, 202)]
        .into_iter()
        .enumerate()
    {
        let mut b = CheckBuilder::new(seed.wrapping_add(i as u64));
        let r = b.input(&[batch], DType::F32, 1.5)?;
        let y = b.graph.op1(SinEmbedding { c }, &[r])?;
        let mut check = b.finish(format!("sin_embedding b{batch} c{c}"), &[y], tol)?;
        for (value, end) in input_values(&mut check, r).iter_mut().zip([1.0, 0.0]) {
            *value = end;
        }
        v.push(check);
    }
    Ok(v)
}

/// Test data for the op modules: golden case files (read with the `safetensors` crate
/// directly) and random tensors.
#[cfg(test)]
pub(crate) mod test_data {
    use crate::tensor::{DType, HostTensor};
    use crate::verify::CheckBuilder;
    use std::collections::HashMap;

    /// Uniform values in [−scale, scale) from `seed`.
    pub fn random(seed: u64, shape: &[usize], scale: f32) -> HostTensor {
        let n = shape.iter().product();
        HostTensor::new(
            shape.to_vec(),
            CheckBuilder::new(seed).values(n, scale, DType::F32),
        )
    }

    /// The golden case files committed with the tests.
    fn dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases")
    }

    /// The f32 tensors (`input.*`, `output.*`) and the metadata of `<name>.safetensors`; a
    /// missing file fails the test.
    pub fn load(name: &str) -> (HashMap<String, HostTensor>, HashMap<String, String>) {
        let path = dir().join(format!("{name}.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let tensors = st
            .iter()
            .filter(|(_, v)| v.dtype() == safetensors::Dtype::F32)
            .map(|(k, v)| {
                let data = crate::tensor::decode(v.data(), DType::F32);
                (k.to_string(), HostTensor::new(v.shape().to_vec(), data))
            })
            .collect();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        (tensors, meta.metadata().clone().unwrap_or_default())
    }

    /// max|out − ref| and the limit atol + rtol·max|ref| of `tests/cases/README.md`.
    pub fn error(out: &[f32], reference: &[f32], atol: f32, rtol: f32) -> (f32, f32) {
        assert_eq!(out.len(), reference.len());
        let r = crate::verify::compare(
            "",
            "",
            out,
            reference,
            crate::verify::Tolerance { atol, rtol },
        );
        assert_eq!(r.non_finite, 0);
        (r.max_err, r.limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::graph::Graph;

    #[test]
    fn matches_the_r_embedding_case() {
        let (t, _) = test_data::load("r_embedding");
        let r = &t["input.r"];
        let c = t["output.emb"].shape[1];
        let mut emb = vec![f32::NAN; r.numel() * c];
        sin_embedding_ref(&r.data, c, &mut emb);
        let (err, limit) = test_data::error(&emb, &t["output.emb"].data, 1e-4, 1e-3);
        eprintln!("r_embedding emb: max err {err:.3e} (limit {limit:.3e})");
        assert!(err <= limit);

        // Stage C's r_embed_full: emb(r) ++ emb(0) ++ emb(0) (sca = crp = 0).
        let mut zero = vec![f32::NAN; c];
        sin_embedding_ref(&[0.0], c, &mut zero);
        let full: Vec<f32> = emb
            .chunks_exact(c)
            .flat_map(|row| row.iter().chain(&zero).chain(&zero).copied())
            .collect();
        let (err, limit) = test_data::error(&full, &t["output.r_embed_full"].data, 1e-4, 1e-3);
        eprintln!("r_embedding r_embed_full: max err {err:.3e} (limit {limit:.3e})");
        assert!(err <= limit);
    }

    #[test]
    fn embedding_of_zero_is_zeros_then_ones() {
        let mut e = vec![f32::NAN; 64];
        sin_embedding_ref(&[0.0], 64, &mut e);
        assert!(e[..32].iter().all(|&v| v == 0.0) && e[32..].iter().all(|&v| v == 1.0));
    }

    #[test]
    fn scale_signal_matches_the_spec_table() {
        // The values listed in docs/MODEL.md §3.3.
        assert_eq!(scale_signal(24, 24), 1.0);
        for (h, w, s) in [(48, 48, 1.1037), (60, 120, 1.1821), (96, 96, 1.1984)] {
            assert!((scale_signal(h, w) - s).abs() < 1e-4, "{h}x{w}");
        }
    }

    #[test]
    fn linspace_matches_torch_values() {
        // torch.linspace(1, 0, 21) as stored in the sampler_step case (index 9 is where an
        // unfused evaluation of 1 + step·9 rounds the other way).
        let t = linspace(1.0, 0.0, 21);
        assert_eq!(t[9].to_bits(), 0x3f0c_cccd);
        assert_eq!((t[0], t[10], t[20]), (1.0, 0.5, 0.0));
        assert_eq!(linspace(0.25, 1.0, 1), vec![0.25]);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let mut g = Graph::new();
        let r = g.input("r", &[3], DType::F32).unwrap();
        let r2 = g.input("r2", &[3, 1], DType::F32).unwrap();
        let rb = g.input("rb", &[3], DType::BF16).unwrap();
        assert!(g.op(SinEmbedding { c: 63 }, &[r]).is_err());
        assert!(g.op(SinEmbedding { c: 2 }, &[r]).is_err());
        assert!(g.op(SinEmbedding { c: 64 }, &[r2]).is_err());
        assert!(g.op(SinEmbedding { c: 64 }, &[rb]).is_err());
        assert!(g.op(SinEmbedding { c: 64 }, &[r, r]).is_err());
        let e = g.op1(SinEmbedding { c: 64 }, &[r]).unwrap();
        assert_eq!(g.shape(e), [3, 64]);
    }
}
