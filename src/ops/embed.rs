//! Sinusoidal embeddings: Stable Cascade's r-embedding (every TimestepBlock, the INR time
//! FiLM and, of the scale signal, the scale-aware norm), plus the f32 numerics the embeddings
//! share with the INR positional encoding and the sampler: accurate sin/cos/exp and
//! `torch.linspace`'s exact f32 values.
//!
//! The arguments reach 10⁴ rad, so every step follows the official f32 order and sin/cos are
//! evaluated accurately (f64 of the f32 argument, rounded once): the f32 rounding of the
//! argument alone is worth about 2e-4 absolute, any other order adds up to 1e-3.

use super::math::accurate;
use super::{inputs_n, require_f32, rows_launch, to_i32};
use crate::runtime::graph::{LaunchIo, OpImpl, OutSpec, TensorDesc};
use crate::runtime::launch::{Args, Launch};
use crate::tensor::{DType, HostTensor};
use crate::verify::input_values;
use crate::verify::{CheckBuilder, OpCheck, Scale, Tolerance};
use crate::{Error, Result};

/// `max_positions` of `gen_r_embedding`: r is scaled by it, and it sets the frequency range.
const MAX_POSITIONS: f32 = 10000.0;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_data;
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
