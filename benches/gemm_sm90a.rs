//! Criterion benchmark of the Hopper GEMM (`kernels/gemm_sm90a.cu`) against the portable one:
//! every GEMM op check at GPU size, built once with `UPX_KERNELS=portable` and once with
//! `UPX_KERNELS=sm90a`, timed with CUDA events over replayed CUDA graphs. Needs a compute
//! capability 9.0 GPU (H100, H200); elsewhere it prints why it skipped and exits. No hardware
//! numbers exist yet (docs/PERF.md).

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use std::time::Duration;
use ultrapixel::runtime::kernel_choice::ENV;
use ultrapixel::verify::Scale;

fn gemm_sm90a(c: &mut Criterion) {
    let Some(dev) = common::gpu() else { return };
    let cc = dev.info().compute_capability;
    if cc != (9, 0) {
        println!("skipped: the sm_90a GEMM needs compute capability 9.0, this GPU is {cc:?}");
        return;
    }
    let mut group = c.benchmark_group("gemm_sm90a");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(2));
    for check in ultrapixel::ops::gemm::checks(7, Scale::Gpu).expect("checks") {
        for kernels in ["portable", "sm90a"] {
            // The choice is read when the session builds its launches.
            std::env::set_var(ENV, kernels);
            let mut s = ultrapixel::bench::session(&dev, &check).expect("session");
            common::bench_session(&mut group, &format!("{}/{kernels}", check.name), &mut s);
        }
    }
    std::env::remove_var(ENV);
    group.finish();
}

criterion_group!(benches, gemm_sm90a);
criterion_main!(benches);
