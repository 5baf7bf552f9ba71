//! The element types weight files store: f32, f16 and bf16 (little endian), and int64 for
//! the few index tensors a checkpoint may carry (a LoRA's learned token rows).

use crate::tensor::{bf16_bits_to_f32, f32_to_bf16_bits};
use half::f16;
use safetensors::Dtype;

/// A stored dtype; the float ones convert to f32 without loss, int64 values up to 2^24.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WeightDtype {
    F32,
    F16,
    BF16,
    /// Indices, kept through a conversion; never served as a weight.
    I64,
}

impl WeightDtype {
    /// The dtypes weights may have.
    pub const ALL: [WeightDtype; 3] = [WeightDtype::F32, WeightDtype::F16, WeightDtype::BF16];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WeightDtype::I64 => 8,
            WeightDtype::F32 => 4,
            WeightDtype::F16 | WeightDtype::BF16 => 2,
        }
    }

    /// The safetensors header name (`F32`, `F16`, `BF16`, `I64`).
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "F32",
            WeightDtype::F16 => "F16",
            WeightDtype::BF16 => "BF16",
            WeightDtype::I64 => "I64",
        }
    }

    pub fn to_safetensors(self) -> Dtype {
        match self {
            WeightDtype::F32 => Dtype::F32,
            WeightDtype::F16 => Dtype::F16,
            WeightDtype::BF16 => Dtype::BF16,
            WeightDtype::I64 => Dtype::I64,
        }
    }

    /// The weight dtype of a stored one; None for those weights never use (integers, f64,
    /// fp8, ...).
    pub fn from_safetensors(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 => Some(WeightDtype::F32),
            Dtype::F16 => Some(WeightDtype::F16),
            Dtype::BF16 => Some(WeightDtype::BF16),
            _ => None,
        }
    }

    /// Little-endian bytes to f32 values; a trailing partial element is ignored (callers
    /// have checked the length).
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            WeightDtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            WeightDtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            WeightDtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            WeightDtype::I64 => bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
        }
    }

    /// f32 values to little-endian bytes, rounding to nearest even (to the nearest integer
    /// for I64).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            WeightDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            WeightDtype::F16 => values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())
                .collect(),
            WeightDtype::BF16 => values
                .iter()
                .flat_map(|&v| f32_to_bf16_bits(v).to_le_bytes())
                .collect(),
            WeightDtype::I64 => values
                .iter()
                .flat_map(|&v| (v.round() as i64).to_le_bytes())
                .collect(),
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_round_trips_values_it_can_represent() {
        let values = [0.0, -1.5, 0.15625, 1024.0, -3.0e-3];
        for dtype in WeightDtype::ALL {
            let bytes = dtype.encode(&values);
            assert_eq!(bytes.len(), values.len() * dtype.size());
            let back = dtype.decode(&bytes);
            for (a, b) in values.iter().zip(&back) {
                assert!((a - b).abs() <= a.abs() * 4e-3, "{dtype}: {a} -> {b}");
            }
            assert_eq!(dtype.decode(&dtype.encode(&back)), back, "{dtype}");
            assert_eq!(
                WeightDtype::from_safetensors(dtype.to_safetensors()),
                Some(dtype)
            );
        }
        assert_eq!(WeightDtype::from_safetensors(Dtype::I64), None);
        let rows = [0.0, 49408.0, -3.0];
        let bytes = WeightDtype::I64.encode(&rows);
        assert_eq!(&bytes[8..16], &49408i64.to_le_bytes());
        assert_eq!(WeightDtype::I64.decode(&bytes), rows);
    }
}
