//! `verify --sweep N`: every emulator-size check over many seeds on the host emulator, to
//! find the seeds where a tolerance breaks (see `verify::sweep`).

use super::verify::VerifyArgs;
use crate::ops::{family, FAMILIES};
use crate::runtime::{Backend, BackendKind};
use crate::verify::{self, Family, SweepReport};
use crate::Result;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Prints a progress line at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(60);

pub fn sweep_cmd(a: &VerifyArgs, n: u64) -> Result<i32> {
    let families: Vec<&Family> = if a.family.is_empty() {
        FAMILIES.iter().collect()
    } else {
        a.family.iter().map(|f| family(f)).collect::<Result<_>>()?
    };
    let backend = Backend::open(BackendKind::Hostsim)?;
    let start = a.seed.unwrap_or(0);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // Ctrl-C: finish the seeds under way and report (a second handler cannot be installed,
    // which only matters if another command already did).
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    println!(
        "sweep: {n} seeds from {start} on the host emulator, {} threads (seed i = verify::sweep_seed({start}, i); rerun one with verify --seed)",
        rayon::current_num_threads()
    );
    let t0 = Instant::now();
    let last = Mutex::new(Instant::now());
    let progress = |r: &SweepReport| {
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= PROGRESS_EVERY {
            *last = Instant::now();
            let worst = r
                .entries
                .iter()
                .max_by(|x, y| x.1.worst_ratio.total_cmp(&y.1.worst_ratio));
            println!(
                "  {} seeds, {:.1} min, {} failures{}",
                r.seeds_done,
                t0.elapsed().as_secs_f64() / 60.0,
                r.failures(),
                worst.map_or(String::new(), |((f, op), e)| format!(
                    ", worst {f}/{op} {:.3} at seed {}",
                    e.worst_ratio, e.worst_seed
                ))
            );
        }
    };
    let report = verify::sweep(
        &backend,
        (start, n),
        &families,
        a.filter.as_deref(),
        &stop,
        &progress,
    );
    let minutes = t0.elapsed().as_secs_f64() / 60.0;
    print_report(&report);
    println!(
        "{} of {n} seeds in {minutes:.1} min ({:.1} seeds/min){}; {} failures",
        report.seeds_done,
        report.seeds_done as f64 / minutes.max(1e-9),
        if stop.load(Ordering::SeqCst) {
            " (stopped early)"
        } else {
            ""
        },
        report.failures()
    );
    Ok(if report.failures() == 0 { 0 } else { 1 })
}

fn print_report(r: &SweepReport) {
    println!(
        "\n{:<12} {:<24} {:>8} {:>9} {:>22} {:>6}  worst check / output",
        "family", "op", "outputs", "worst", "at seed", "fails"
    );
    for ((family, op), e) in &r.entries {
        println!(
            "{family:<12} {op:<24} {:>8} {:>9.4} {:>22} {:>6}  {}",
            e.outputs, e.worst_ratio, e.worst_seed, e.failures, e.worst
        );
        if !e.failed_seeds.is_empty() {
            let seeds: Vec<String> = e.failed_seeds.iter().map(|s| s.to_string()).collect();
            println!("{:<37} failing seeds: {}", "", seeds.join(", "));
        }
    }
    if !r.lines.is_empty() {
        println!("\nfailures:");
        for l in &r.lines {
            println!("  {l}");
        }
    }
}
