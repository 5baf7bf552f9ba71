//! Criterion benchmarks of every op check at GPU size, timed with CUDA events over replayed
//! CUDA graphs (`ultrapixel::bench`). Without a GPU: prints "skipped: no GPU" and exits.

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use std::time::Duration;
use ultrapixel::ops::all_checks;
use ultrapixel::verify::Scale;

fn ops(c: &mut Criterion) {
    let Some(dev) = common::gpu() else { return };
    let (ceilings, timings) = ultrapixel::bench::run(&dev, 20, None).expect("bench");
    println!("{}", ceilings.describe());
    for t in &timings {
        println!("{}", t.line(&ceilings));
    }
    let mut group = c.benchmark_group("ops");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(2));
    for check in all_checks(7, Scale::Gpu).expect("checks") {
        let mut s = ultrapixel::bench::session(&dev, &check).expect("session");
        common::bench_session(&mut group, &check.name, &mut s);
    }
    group.finish();
}

criterion_group!(benches, ops);
criterion_main!(benches);
