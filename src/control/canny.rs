//! The Canny edge detector as the official preprocessing runs it (OpenCV's `cv2.Canny`
//! with aperture 3 and the L1 gradient) and the official `CannyFilter(resize=224)` around
//! it. Written from the algorithm's definition and checked pixel for pixel against OpenCV
//! through the `canny_filter` golden case.
//!
//! 1. Gradients: 3×3 Sobel with replicated borders, in integers. On a multi-channel image
//!    every pixel takes the channel with the largest |dx| + |dy| (the first on ties).
//! 2. Non-maximum suppression against the two neighbours across the edge: the direction
//!    is binned with tan 22.5° in 15-bit fixed point (as OpenCV, so the bins agree exactly);
//!    outside the image the magnitude is 0. Horizontal and vertical bins need strictly
//!    more than the previous neighbour and at least the next one, diagonals strictly more
//!    than both.
//! 3. Hysteresis: a surviving pixel above `high` is an edge, and so is every surviving
//!    pixel above `low` 8-connected to an edge. Thresholds are floored to integers.

use super::resize::bilinear;
use crate::tensor::HostTensor;

/// ⌊tan 22.5° · 2¹⁵ + 0.5⌋, the direction bin limit in 15-bit fixed point.
const TAN_22_5_Q15: i64 = 13573;

/// The official Canny parameters (`CannyFilter`: `cv2.Canny(x, 100, 200)`, resize 224).
pub const LOW_THRESHOLD: f64 = 100.0;
pub const HIGH_THRESHOLD: f64 = 200.0;
pub const FILTER_SIZE: usize = 224;

/// Edges of an 8-bit image stored channels-last (`[h, w, c]`): 255 on edges, 0 elsewhere.
pub fn canny(pixels: &[u8], h: usize, w: usize, c: usize, low: f64, high: f64) -> Vec<u8> {
    assert_eq!(pixels.len(), h * w * c, "pixels must be h·w·c bytes");
    let (mut low, mut high) = (low.floor() as i64, high.floor() as i64);
    if low > high {
        std::mem::swap(&mut low, &mut high);
    }
    let (dx, dy, mag) = gradients(pixels, h, w, c);
    // Magnitude with a zero frame, so the suppression never reads outside.
    let fw = w + 2;
    let mut framed = vec![0i64; (h + 2) * fw];
    for y in 0..h {
        framed[(y + 1) * fw + 1..][..w].copy_from_slice(&mag[y * w..][..w]);
    }
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        No,
        Weak,
        Strong,
    }
    let mut marks = vec![Mark::No; h * w];
    let mut stack = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let m = mag[i];
            if m <= low {
                continue;
            }
            let at = |dy: isize, dx: isize| {
                framed[((y + 1) as isize + dy) as usize * fw + ((x + 1) as isize + dx) as usize]
            };
            let (gx, gy) = (dx[i], dy[i]);
            let ax = gx.abs();
            let ay = gy.abs() << 15;
            let tg22 = ax * TAN_22_5_Q15;
            let keep = if ay < tg22 {
                m > at(0, -1) && m >= at(0, 1)
            } else if ay > tg22 + (ax << 16) {
                m > at(-1, 0) && m >= at(1, 0)
            } else {
                let s = if (gx ^ gy) < 0 { -1 } else { 1 };
                m > at(-1, -s) && m > at(1, s)
            };
            if keep {
                if m > high {
                    marks[i] = Mark::Strong;
                    stack.push((y, x));
                } else {
                    marks[i] = Mark::Weak;
                }
            }
        }
    }
    while let Some((y, x)) = stack.pop() {
        for ny in y.saturating_sub(1)..(y + 2).min(h) {
            for nx in x.saturating_sub(1)..(x + 2).min(w) {
                let j = ny * w + nx;
                if marks[j] == Mark::Weak {
                    marks[j] = Mark::Strong;
                    stack.push((ny, nx));
                }
            }
        }
    }
    marks
        .iter()
        .map(|&m| if m == Mark::Strong { 255 } else { 0 })
        .collect()
}

/// Sobel dx, dy (replicated borders) of the channel with the largest |dx| + |dy|, and
/// that magnitude, per pixel.
fn gradients(p: &[u8], h: usize, w: usize, c: usize) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
    let px = |y: isize, x: isize, k: usize| {
        let y = y.clamp(0, h as isize - 1) as usize;
        let x = x.clamp(0, w as isize - 1) as usize;
        p[(y * w + x) * c + k] as i64
    };
    let n = h * w;
    let (mut gx, mut gy, mut mag) = (vec![0; n], vec![0; n], vec![0; n]);
    for y in 0..h as isize {
        for x in 0..w as isize {
            let i = y as usize * w + x as usize;
            for k in 0..c {
                let dx = px(y - 1, x + 1, k) + 2 * px(y, x + 1, k) + px(y + 1, x + 1, k)
                    - px(y - 1, x - 1, k)
                    - 2 * px(y, x - 1, k)
                    - px(y + 1, x - 1, k);
                let dy = px(y + 1, x - 1, k) + 2 * px(y + 1, x, k) + px(y + 1, x + 1, k)
                    - px(y - 1, x - 1, k)
                    - 2 * px(y - 1, x, k)
                    - px(y - 1, x + 1, k);
                let m = dx.abs() + dy.abs();
                if k == 0 || m > mag[i] {
                    (gx[i], gy[i], mag[i]) = (dx, dy, m);
                }
            }
        }
    }
    (gx, gy, mag)
}

/// The steps of the official `CannyFilter(resize=224)` on one image `[c, h, w]` in [0, 1].
pub struct CannySteps {
    /// The image resized to 224×224 and quantized: `uint8(x · 255)`, truncated, `[c, 224, 224]`.
    pub quantized: Vec<u8>,
    /// The 224×224 edges in {0, 1}, `[1, 224, 224]`.
    pub edges_small: HostTensor,
    /// The edges resized back to the image size, `[1, h, w]`: the control map.
    pub edges: HostTensor,
}

/// `CannyFilter(resize=224)(image)`: bilinear to 224×224, 8-bit quantization, Canny
/// (100, 200) over the colour channels, then bilinear back to the image size.
pub fn canny_filter(image: &HostTensor) -> CannySteps {
    let [c, h, w]: [usize; 3] = image
        .shape
        .as_slice()
        .try_into()
        .expect("a channels-first image [c, h, w]");
    let s = FILTER_SIZE;
    let small = bilinear(image, s, s);
    // Channels-last bytes for the detector; the float → u8 cast truncates, as numpy's.
    let mut hwc = vec![0u8; s * s * c];
    for (k, plane) in small.data.chunks_exact(s * s).enumerate() {
        for (i, &v) in plane.iter().enumerate() {
            hwc[i * c + k] = (v * 255.0) as u8;
        }
    }
    let e = canny(&hwc, s, s, c, LOW_THRESHOLD, HIGH_THRESHOLD);
    let edges_small = HostTensor::new(vec![1, s, s], e.iter().map(|&v| v as f32 / 255.0).collect());
    let edges = bilinear(&edges_small, h, w);
    let quantized = (0..c)
        .flat_map(|k| (0..s * s).map(move |i| (k, i)))
        .map(|(k, i)| hwc[i * c + k])
        .collect();
    CannySteps {
        quantized,
        edges_small,
        edges,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random()).collect()
    }

    /// A vertical step gives one edge column at the step, whatever the colour count, and
    /// nothing where the image is flat.
    #[test]
    fn a_step_gives_one_edge_line() {
        for (h, w, c) in [(9, 14, 1), (13, 7, 3)] {
            let mut p = vec![10u8; h * w * c];
            for y in 0..h {
                for x in w / 2..w {
                    p[(y * w + x) * c + c - 1] = 200;
                }
            }
            let e = canny(&p, h, w, c, 100.0, 200.0);
            for y in 0..h {
                for x in 0..w {
                    let want = if x == w / 2 - 1 { 255 } else { 0 };
                    assert_eq!(e[y * w + x], want, "{h}x{w}x{c} at {y},{x}");
                }
            }
            assert!(canny(&vec![77; h * w * c], h, w, c, 1.0, 2.0)
                .iter()
                .all(|&v| v == 0));
        }
    }

    /// Properties on fresh random images of odd sizes: edges only where the gradient
    /// exceeds `low`; raising `high` never adds an edge; every edge pixel is connected to
    /// a pixel above `high`; swapping the thresholds changes nothing.
    #[test]
    fn thresholds_and_hysteresis_behave_on_random_images() {
        for (seed, (h, w, c)) in [(1, (17, 23, 1)), (2, (31, 9, 3)), (3, (5, 41, 3))] {
            let p = noise(seed, h * w * c);
            let (_, _, mag) = gradients(&p, h, w, c);
            let e = canny(&p, h, w, c, 150.0, 400.0);
            assert!(e.contains(&255));
            assert_eq!(e, canny(&p, h, w, c, 400.0, 150.0));
            let stricter = canny(&p, h, w, c, 150.0, 900.0);
            for ((&ei, &mi), &si) in e.iter().zip(&mag).zip(&stricter) {
                assert!(ei == 0 || mi > 150, "edge at or below low");
                assert!(si == 0 || ei == 255, "a stricter high added an edge");
            }
            // Flood from the strong pixels over edge pixels reaches every edge pixel.
            let mut seen: Vec<bool> = (0..h * w).map(|i| e[i] == 255 && mag[i] > 400).collect();
            let mut stack: Vec<usize> = (0..h * w).filter(|&i| seen[i]).collect();
            while let Some(i) = stack.pop() {
                let (y, x) = (i / w, i % w);
                for ny in y.saturating_sub(1)..(y + 2).min(h) {
                    for nx in x.saturating_sub(1)..(x + 2).min(w) {
                        let j = ny * w + nx;
                        if e[j] == 255 && !seen[j] {
                            seen[j] = true;
                            stack.push(j);
                        }
                    }
                }
            }
            assert!((0..h * w).all(|i| (e[i] == 255) == seen[i]));
        }
    }

    #[test]
    fn the_filter_returns_maps_of_the_image_size_in_unit_range() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (h, w) = (37, 301);
        let data = (0..3 * h * w).map(|_| rng.random::<f32>()).collect();
        let steps = canny_filter(&HostTensor::new(vec![3, h, w], data));
        assert_eq!(steps.edges.shape, [1, h, w]);
        assert_eq!(steps.quantized.len(), 3 * 224 * 224);
        assert!(steps.edges.data.iter().all(|v| (0.0..=1.0).contains(v)));
        assert!(steps.edges.data.iter().any(|&v| v > 0.0));
    }
}
