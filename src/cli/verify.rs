//! `ultrapixel verify`: every kernel check against its CPU reference on the GPU (then GPU ↔
//! emulator parity), or on the emulator where there is no GPU. Checks whose launches change
//! when the Hopper kernels are forced run a second time with them, tagged `op[sm90a]`
//! (`OpCheck::sm90a_variant`), where the backend can run them: on the emulator always, on a
//! GPU of compute capability 9.0. On the GPU each check runs in isolation: a failure is
//! reported with the op and kernel that failed (the check is rerun synchronized after every
//! launch to find it), a sticky fault restarts the context, and the remaining checks still
//! run.

use super::tally::{selected, Tally};
use crate::runtime::cuda::CudaDevice;
use crate::runtime::kernel_choice::{KernelChoice, KernelTarget};
use crate::runtime::{Backend, BackendKind};
use crate::verify::{self, CheckResult, OpCheck, Scale};
use crate::Result;
use std::borrow::Cow;
use std::sync::mpsc;

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// Random seed of the inputs (default: fresh each run; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Only checks whose name contains this text.
    #[arg(long)]
    pub filter: Option<String>,
    /// Instead of the op checks: run the emulator self-test kernels on this GPU, write their
    /// raw outputs to FILE (the hardware truth fixture, tests/fixtures/truth-sm90.safetensors)
    /// and replay it on the emulator, which must agree bit for bit.
    #[arg(long, value_name = "FILE")]
    pub truth: Option<std::path::PathBuf>,
    /// Instead: run the emulator-size checks on the host emulator for N seeds (in parallel,
    /// from --seed, default 0) and report each op's worst error/limit ratio; Ctrl-C stops
    /// early with the report so far.
    #[arg(long, value_name = "N", conflicts_with = "truth")]
    pub sweep: Option<u64>,
    /// With --sweep: only these check families (repeatable; default all).
    #[arg(long, requires = "sweep")]
    pub family: Vec<String>,
}

pub fn verify_cmd(a: VerifyArgs) -> Result<i32> {
    if let Some(path) = &a.truth {
        return truth_cmd(path);
    }
    if let Some(n) = a.sweep {
        return super::sweep::sweep_cmd(&a, n);
    }
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    println!("verify: seed {seed} (rerun with --seed {seed})");
    let require_gpu = std::env::var("UPX_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let runs = |c: &OpCheck| Runs::of(a.filter.as_deref(), c);
    let mut counts = Tally::default();
    match Backend::open(BackendKind::Cuda) {
        Ok(gpu) => {
            let target = gpu.device().map(|d| d.kernel_target()).unwrap_or_default();
            if let Some(why) = target.why_not_sm90a(KernelChoice::Sm90a) {
                println!("the sm_90a kernels' checks: skipped ({why})");
            }
            let mut gpu = IsolatedGpu::new(gpu, target);
            let checks: Vec<_> = crate::ops::all_checks(seed, Scale::Gpu)?
                .into_iter()
                .filter(|c| runs(c).any())
                .collect();
            gpu.against_references("cuda", &checks, &runs, &mut counts)?;
            if cfg!(feature = "hostsim") {
                let checks: Vec<_> = crate::ops::all_checks(seed, Scale::Emulator)?
                    .into_iter()
                    .filter(|c| runs(c).any())
                    .collect();
                gpu.against_emulator(&checks, &runs, &mut counts)?;
            }
            if gpu.restarts > 0 {
                println!("the GPU context was restarted {} times", gpu.restarts);
            }
        }
        Err(e) => {
            println!("skipped: no GPU ({e})");
            if require_gpu {
                println!("UPX_REQUIRE_GPU=1: a GPU is required");
                return Ok(1);
            }
            if cfg!(feature = "hostsim") {
                on_emulator(seed, &runs, &mut counts)?;
            }
        }
    }
    Ok(counts.finish())
}

/// Which runs of a check `--filter` selects: as it is, and with the Hopper kernels forced
/// (the `op[sm90a]` name).
#[derive(Clone, Copy)]
struct Runs {
    own: bool,
    sm90a: bool,
}

impl Runs {
    fn of(filter: Option<&str>, c: &OpCheck) -> Self {
        Runs {
            own: selected(filter, &c.name),
            sm90a: selected(filter, &c.sm90a_name()),
        }
    }

    fn any(self) -> bool {
        self.own || self.sm90a
    }
}

/// Every emulator-size check on the emulator against its CPU reference, the qualifying ones
/// with the Hopper kernels forced too.
fn on_emulator(seed: u64, runs: &dyn Fn(&OpCheck) -> Runs, counts: &mut Tally) -> Result<()> {
    let hostsim = Backend::open(BackendKind::Hostsim)?;
    for check in crate::ops::all_checks(seed, Scale::Emulator)? {
        let want = runs(&check);
        if !want.any() {
            continue;
        }
        let forced = match want.sm90a {
            true => check.sm90a_variant(KernelTarget::hostsim())?,
            false => None,
        };
        let own = want.own.then_some(&check);
        let reference = verify::run_on(&check, &Backend::Cpu);
        for c in own.into_iter().chain(&forced) {
            let results = reference.as_ref().map_err(|e| e.to_string()).and_then(|r| {
                let got = verify::run_on(c, &hostsim).map_err(|e| e.to_string())?;
                Ok(c.compare(r, &got, 1.0))
            });
            match results {
                Ok(results) => {
                    for r in results {
                        print_result("hostsim", &r);
                        counts.add(r.passed());
                    }
                }
                Err(e) => {
                    println!("FAIL {:<8} {}: {e}", "hostsim", c.name);
                    counts.add(false);
                }
            }
        }
    }
    Ok(())
}

/// `verify --truth FILE`: the fixture from this GPU, then the emulator against it.
fn truth_cmd(path: &std::path::Path) -> Result<i32> {
    let gpu = match Backend::open(BackendKind::Cuda) {
        Ok(Backend::Cuda(d)) => d,
        Ok(_) => unreachable!("the cuda backend opens a cuda device"),
        Err(e) => {
            println!("skipped: no GPU ({e})");
            let require_gpu = std::env::var("UPX_REQUIRE_GPU").is_ok_and(|v| v == "1");
            return Ok(if require_gpu { 1 } else { 0 });
        }
    };
    let info = gpu.info();
    let description = format!(
        "{} GiB, CUDA driver {}.{}",
        info.total_bytes >> 30,
        info.driver_version / 1000,
        info.driver_version % 1000 / 10
    );
    let summary = crate::truth::capture_to_file(gpu.as_ref(), path, &description)?;
    println!(
        "truth: {} cases from {} written to {} ({} bytes)",
        summary.cases,
        crate::runtime::device::Device::describe(gpu.as_ref()),
        path.display(),
        summary.bytes
    );
    drop(gpu);
    emulator_against(path)
}

/// Replays a truth file on the emulator: exit 0 when it agrees bit for bit.
#[cfg(feature = "hostsim")]
fn emulator_against(path: &std::path::Path) -> Result<i32> {
    let hostsim = crate::runtime::hostsim::HostsimDevice::new();
    let mismatches = crate::truth::check_file(&hostsim, path)?;
    if mismatches.is_empty() {
        println!("1 passed, 0 failed (the emulator agrees bit for bit)");
        return Ok(0);
    }
    print!("{}", crate::truth::report(&mismatches, 8));
    println!(
        "0 passed, 1 failed (the emulator differs from this GPU in {} elements)",
        mismatches.len()
    );
    Ok(1)
}

#[cfg(not(feature = "hostsim"))]
fn emulator_against(_: &std::path::Path) -> Result<i32> {
    println!("skipped: the emulator comparison (built without the hostsim feature)");
    Ok(0)
}

pub fn print_result(backend: &str, r: &CheckResult) {
    let status = if r.passed() { "PASS" } else { "FAIL" };
    println!(
        "{status} {backend:<8} {:<72} {:<6} max_err {:.3e} limit {:.3e} (max|ref| {:.3e}){}",
        r.check,
        r.output,
        r.max_err,
        r.limit,
        r.max_ref,
        if r.non_finite > 0 {
            format!(" {} non-finite", r.non_finite)
        } else {
            String::new()
        }
    );
}

/// The GPU backend, reopened after a fault that left its context unusable.
struct IsolatedGpu {
    backend: Option<Backend>,
    restarts: usize,
    /// What its launches are built for (the sm_90a checks run where it allows them).
    target: KernelTarget,
}

impl IsolatedGpu {
    fn new(backend: Backend, target: KernelTarget) -> Self {
        IsolatedGpu {
            backend: Some(backend),
            restarts: 0,
            target,
        }
    }

    /// The runs of `check` that `want` selects: the check itself, and with the Hopper kernels
    /// forced where this GPU runs them and they change a launch.
    fn runs<'a>(&self, check: &'a OpCheck, want: Runs) -> Result<Vec<Cow<'a, OpCheck>>> {
        let mut v = Vec::new();
        if want.own {
            v.push(Cow::Borrowed(check));
        }
        if want.sm90a {
            v.extend(check.sm90a_variant(self.target)?.map(Cow::Owned));
        }
        Ok(v)
    }

    fn device(&self) -> Option<&std::sync::Arc<CudaDevice>> {
        match &self.backend {
            Some(Backend::Cuda(d)) => Some(d),
            _ => None,
        }
    }

    fn backend(&mut self) -> std::result::Result<&Backend, String> {
        if self.backend.is_none() {
            let b = Backend::open(BackendKind::Cuda)
                .map_err(|e| format!("the GPU could not be reopened: {e}"))?;
            self.backend = Some(b);
        }
        Ok(self.backend.as_ref().expect("just opened"))
    }

    /// Restarts the context if a fault made it unusable (every handle is dropped first).
    fn recover(&mut self) {
        if self.device().is_some_and(|d| d.healthy()) {
            return;
        }
        self.backend = None;
        self.restarts += 1;
        match CudaDevice::reset(0) {
            Ok(()) => println!("note: the GPU context was lost; restarted it"),
            Err(e) => println!("note: the GPU context was lost and could not be reset: {e}"),
        }
    }

    /// Runs `check` on the GPU; on failure, recovers the context and reruns the check
    /// synchronized after every launch, so the error names the op and kernel that failed.
    fn run(&mut self, check: &OpCheck) -> std::result::Result<Vec<Vec<f32>>, String> {
        let first = match verify::run_on(check, self.backend()?) {
            Ok(out) => return Ok(out),
            Err(e) => e.to_string(),
        };
        self.recover();
        let _ = self.backend()?;
        let Some(dev) = self.device().cloned() else {
            return Err(first);
        };
        dev.set_debug(true);
        let again = verify::run_on(check, self.backend()?);
        dev.set_debug(false);
        drop(dev);
        match again {
            Ok(_) => Err(format!(
                "{first} (passes when synchronized after every launch: a graph replay or \
                 ordering problem)"
            )),
            Err(e) => {
                self.recover();
                Err(format!("{e} (first run: {first})"))
            }
        }
    }

    /// Every check on the GPU against its CPU reference; the references are computed on
    /// another thread ahead of the GPU so the two overlap.
    fn against_references(
        &mut self,
        label: &str,
        checks: &[OpCheck],
        runs: &dyn Fn(&OpCheck) -> Runs,
        counts: &mut Tally,
    ) -> Result<()> {
        std::thread::scope(|scope| {
            let (tx, rx) = mpsc::sync_channel(2);
            scope.spawn(move || {
                for check in checks {
                    if tx.send(verify::run_on(check, &Backend::Cpu)).is_err() {
                        break;
                    }
                }
            });
            for check in checks {
                let reference = rx.recv().expect("the reference thread ended early")?;
                for c in self.runs(check, runs(check))? {
                    self.report(label, &c, &reference, 1.0, counts);
                }
            }
            Ok(())
        })
    }

    /// GPU ↔ emulator parity on the emulator-sized checks (the sm_90a runs on both sides
    /// with the Hopper kernels): the only test that catches compensating mistakes in the
    /// emulated fragment layouts.
    fn against_emulator(
        &mut self,
        checks: &[OpCheck],
        runs: &dyn Fn(&OpCheck) -> Runs,
        counts: &mut Tally,
    ) -> Result<()> {
        let hostsim = Backend::open(BackendKind::Hostsim)?;
        for check in checks {
            for c in self.runs(check, runs(check))? {
                let emulated = match verify::run_on(&c, &hostsim) {
                    Ok(out) => out,
                    Err(e) => {
                        println!("FAIL {:<8} {}: {e}", "hostsim", c.name);
                        counts.add(false);
                        continue;
                    }
                };
                self.report("cuda~emu", &c, &emulated, 2.0, counts);
            }
        }
        Ok(())
    }

    /// Runs `check` on the GPU and compares every output with `expected`.
    /// `slack` scales the check's bound: 1 against the reference, 2 against the emulator
    /// (each errs by up to the bound).
    fn report(
        &mut self,
        label: &str,
        check: &OpCheck,
        expected: &[Vec<f32>],
        slack: f32,
        counts: &mut Tally,
    ) {
        match self.run(check) {
            Ok(got) => {
                for r in check.compare(expected, &got, slack) {
                    print_result(label, &r);
                    counts.add(r.passed());
                }
            }
            Err(e) => {
                println!("FAIL {label:<8} {}: {e}", check.name);
                counts.add(false);
            }
        }
    }
}
