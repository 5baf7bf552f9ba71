//! Host-side tensors (f32, used by the CPU reference executor, case files and weight
//! conversion) and the storage dtypes of graph tensors.

use half::bf16;
use serde::Serialize;

/// Storage type of a graph tensor on the kernel executors. The CPU executor always
/// computes in f32; the dtype tells the kernel executors what to store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum DType {
    F32,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
        }
    }

    /// Suffix used in kernel names (`layernorm_f32_bf16`).
    pub fn suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
        }
    }
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// A dense row-major f32 tensor on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            numel(&shape),
            data.len(),
            "HostTensor: shape {shape:?} does not match {} values",
            data.len()
        );
        HostTensor { shape, data }
    }

    pub fn zeros(shape: &[usize]) -> Self {
        HostTensor {
            shape: shape.to_vec(),
            data: vec![0.0; numel(shape)],
        }
    }

    pub fn full(shape: &[usize], value: f32) -> Self {
        HostTensor {
            shape: shape.to_vec(),
            data: vec![value; numel(shape)],
        }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// The same data under another shape with the same element count.
    pub fn reshaped(mut self, shape: &[usize]) -> Self {
        assert_eq!(
            numel(shape),
            self.data.len(),
            "reshape {:?} -> {shape:?}",
            self.shape
        );
        self.shape = shape.to_vec();
        self
    }

    /// [B, C, H, W] -> [B, H, W, C].
    pub fn nchw_to_nhwc(&self) -> Self {
        let [b, c, h, w] = dims4(&self.shape);
        let mut out = vec![0.0; self.data.len()];
        for bi in 0..b {
            for ci in 0..c {
                for p in 0..h * w {
                    out[(bi * h * w + p) * c + ci] = self.data[(bi * c + ci) * h * w + p];
                }
            }
        }
        HostTensor::new(vec![b, h, w, c], out)
    }

    /// [B, H, W, C] -> [B, C, H, W].
    pub fn nhwc_to_nchw(&self) -> Self {
        let [b, h, w, c] = dims4(&self.shape);
        let mut out = vec![0.0; self.data.len()];
        for bi in 0..b {
            for p in 0..h * w {
                for ci in 0..c {
                    out[(bi * c + ci) * h * w + p] = self.data[(bi * h * w + p) * c + ci];
                }
            }
        }
        HostTensor::new(vec![b, c, h, w], out)
    }

    /// Largest absolute value (0 for an empty tensor).
    pub fn max_abs(&self) -> f32 {
        self.data.iter().fold(0.0f32, |m, v| m.max(v.abs()))
    }
}

fn dims4(shape: &[usize]) -> [usize; 4] {
    shape
        .try_into()
        .unwrap_or_else(|_| panic!("expected a 4-d tensor, got shape {shape:?}"))
}

/// f32 -> bf16 bits, round to nearest even (NaN stays NaN), as `__float2bfloat16_rn`.
pub fn f32_to_bf16_bits(v: f32) -> u16 {
    bf16::from_f32(v).to_bits()
}

pub fn bf16_bits_to_f32(b: u16) -> f32 {
    bf16::from_bits(b).to_f32()
}

/// Encodes f32 values as the bytes of `dtype` (little endian).
pub fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck::cast_slice(values).to_vec(),
        DType::BF16 => values
            .iter()
            .flat_map(|&v| f32_to_bf16_bits(v).to_le_bytes())
            .collect(),
    }
}

/// Decodes little-endian bytes of `dtype` into f32 values.
pub fn decode(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nchw_nhwc_roundtrip_moves_channels_last() {
        let t = HostTensor::new(vec![2, 3, 2, 5], (0..60).map(|v| v as f32).collect());
        let n = t.nchw_to_nhwc();
        assert_eq!(n.shape, vec![2, 2, 5, 3]);
        // element (b=1, c=2, y=1, x=4) keeps its value.
        assert_eq!(
            n.data[((2 + 1) * 5 + 4) * 3 + 2],
            t.data[((3 + 2) * 2 + 1) * 5 + 4]
        );
        assert_eq!(n.nhwc_to_nchw(), t);
    }

    #[test]
    fn bf16_encoding_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even mantissa (1.0).
        let x = 1.0 + 2f32.powi(-8);
        assert_eq!(decode(&encode(&[x], DType::BF16), DType::BF16), vec![1.0]);
        let y = 1.0 + 3.0 * 2f32.powi(-8);
        assert_eq!(
            decode(&encode(&[y], DType::BF16), DType::BF16),
            vec![1.0 + 2f32.powi(-6)]
        );
    }
}
