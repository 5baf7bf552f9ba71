//! Criterion benchmark of the attention op on the shapes that dominate a 4096² image (Stage C
//! high-res: 9216 image tokens + 85 CLIP tokens, 32 heads of 64; Stage B: 128² tokens + 4
//! mapped CLIP tokens, 18 heads of 64) and a plain self-attention, each with the portable
//! kernel (`UPX_KERNELS=portable`) and the Hopper one (`UPX_KERNELS=sm90a`,
//! kernels/attention_sm90a.cu), timed with CUDA events over replayed CUDA graphs
//! (`ultrapixel::bench`). Prints TFLOP/s per shape and kernel. Without a GPU: prints
//! "skipped: no GPU" and exits; on a GPU that is not compute capability 9.0 both rows run the
//! portable kernel.

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use std::time::Duration;
use ultrapixel::ops::attention::Attention;
use ultrapixel::tensor::DType;
use ultrapixel::verify::{CheckBuilder, OpCheck, Tolerance};

/// (name, batch, image tokens, extra tokens, heads); head dim 64.
const SHAPES: [(&str, usize, usize, usize, usize); 3] = [
    ("stage_c_hr_4096", 2, 9216, 85, 32),
    ("stage_b_4096", 2, 16384, 4, 18),
    ("self_4096", 1, 4096, 0, 32),
];

fn check(batch: usize, n: usize, m: usize, heads: usize) -> OpCheck {
    let mut b = CheckBuilder::new(7);
    let c = heads * 64;
    let mut ins = vec![b.input(&[batch, n, 3 * c], DType::BF16, 2.0).expect("qkv")];
    if m > 0 {
        ins.push(b.input(&[batch, m, 2 * c], DType::BF16, 2.0).expect("kv"));
    }
    let op = Attention {
        heads,
        causal: false,
        extra_kv: m > 0,
        key_mask: false,
        out: DType::BF16,
    };
    let y = b.graph.op1(op, &ins).expect("graph");
    b.finish(
        format!("attention b{batch} n{n} m{m} h{heads}x64"),
        &[y],
        Tolerance::BOUND,
    )
    .expect("check")
}

fn attention(c: &mut Criterion) {
    let Some(dev) = common::gpu() else { return };
    let mut group = c.benchmark_group("attention_sm90a");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3));
    for (name, batch, n, m, heads) in SHAPES {
        let flops = 4.0 * batch as f64 * n as f64 * (n + m) as f64 * (heads * 64) as f64;
        for kernels in ["portable", "sm90a"] {
            // The launches are built when the session is, under this choice.
            std::env::set_var("UPX_KERNELS", kernels);
            let chk = check(batch, n, m, heads);
            let mut s = ultrapixel::bench::session(&dev, &chk).expect("session");
            let secs = s.time(20).expect("timing");
            println!(
                "{name:<16} {kernels:<8} {:>9.1} us {:>6.0} TFLOP/s",
                secs * 1e6,
                flops / secs / 1e12
            );
            common::bench_session(&mut group, &format!("{name}/{kernels}"), &mut s);
        }
    }
    std::env::remove_var("UPX_KERNELS");
    group.finish();
}

criterion_group!(benches, attention);
criterion_main!(benches);
