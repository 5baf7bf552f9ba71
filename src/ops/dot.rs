//! The references' dot products, fast without changing a single result: every sum is still
//! accumulated in f64, term by term in index order from −0.0 (the order of
//! `iter().sum::<f64>()`), but R × [`LANES`] independent sums advance side by side over a
//! packed panel of the other operand, so the CPU overlaps their latencies, vectorizes the
//! lanes and keeps the panel in cache. The f64 product of two f32 values is exact, so a fused
//! multiply-add rounds exactly as a multiply and an add: the AVX2/FMA path gives the same
//! bits as the portable one.

/// Lanes per panel: independent sums that share one row of the packed operand.
pub const LANES: usize = 8;

/// `acc[r][j] += Σ_k x[r][k]·panel[k·LANES + j]` for k in order.
#[inline(always)]
fn accumulate_generic<const R: usize, const FUSED: bool>(
    acc: &mut [[f64; LANES]; R],
    x: [&[f32]; R],
    panel: &[f64],
) {
    for (kk, lanes) in panel.chunks_exact(LANES).enumerate() {
        let lanes: &[f64; LANES] = lanes.try_into().expect("LANES values");
        for r in 0..R {
            let v = x[r][kk] as f64;
            for j in 0..LANES {
                acc[r][j] = if FUSED {
                    v.mul_add(lanes[j], acc[r][j])
                } else {
                    acc[r][j] + v * lanes[j]
                };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn accumulate_avx2<const R: usize>(acc: &mut [[f64; LANES]; R], x: [&[f32]; R], panel: &[f64]) {
    accumulate_generic::<R, true>(acc, x, panel)
}

/// `acc[r][j] += Σ_k x[r][k]·panel[k·LANES + j]`, summed over k in order for each (r, j):
/// `panel` holds K rows of `LANES` values, every row of `x` at least K values.
pub fn accumulate<const R: usize>(acc: &mut [[f64; LANES]; R], x: [&[f32]; R], panel: &[f64]) {
    let k = panel.len() / LANES;
    assert!(
        panel.len() == k * LANES && x.iter().all(|r| r.len() >= k),
        "a panel of K rows and rows of K values"
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for (checked just above).
        unsafe { accumulate_avx2(acc, x, panel) };
        return;
    }
    accumulate_generic::<R, false>(acc, x, panel)
}

/// `m [rows, cols]` packed as f64 panels for [`accumulate`]: panel p holds, for each column
/// c, rows [p·LANES, (p + 1)·LANES) of `m` (zeros past the last row), at
/// `[p·cols·LANES + c·LANES + j]`.
pub fn pack_panels(m: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    use rayon::prelude::*;
    let mut t = vec![0f64; rows.div_ceil(LANES) * cols * LANES];
    t.par_chunks_mut(cols * LANES)
        .enumerate()
        .for_each(|(p, panel)| {
            for j in 0..LANES.min(rows - p * LANES) {
                let row = &m[(p * LANES + j) * cols..][..cols];
                for (c, &v) in row.iter().enumerate() {
                    panel[c * LANES + j] = v as f64;
                }
            }
        });
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_support::random;

    #[test]
    fn blocked_sums_are_the_serial_sums_bit_for_bit() {
        for (rows, lanes, k) in [(3, 11, 37), (1, 8, 1), (2, 5, 256)] {
            let x = random(&[rows, k], 1);
            let w = random(&[lanes, k], 2);
            let panels = pack_panels(&w.data, lanes, k);
            for r in 0..rows {
                for p in 0..lanes.div_ceil(LANES) {
                    let mut acc = [[-0.0; LANES]; 1];
                    let panel = &panels[p * k * LANES..][..k * LANES];
                    accumulate(&mut acc, [&x.data[r * k..][..k]], panel);
                    for j in p * LANES..lanes.min((p + 1) * LANES) {
                        let serial: f64 = (0..k)
                            .map(|kk| x.data[r * k + kk] as f64 * w.data[j * k + kk] as f64)
                            .sum();
                        assert_eq!(acc[0][j - p * LANES].to_bits(), serial.to_bits());
                    }
                }
            }
        }
    }
}
