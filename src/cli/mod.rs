//! Command-line interface (`ultrapixel <command>`).

mod generate;
mod models;
mod sweep;
mod tune;
mod verify;

use crate::runtime::cuda::{probe, CudaDevice};
use crate::runtime::device::Device;
use crate::runtime::kernels::{CUDA_ARCHS, KERNELS_COMPILED, NVCC_VERSION, PTXAS, PTX_ARCH};
use crate::runtime::{Backend, BackendKind};
use crate::Result;
use clap::{Parser, Subcommand};
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(
    name = "ultrapixel",
    version,
    about = "UltraPixel text-to-image (1K-6K) through fused CUDA kernels"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate images from a prompt (PNG with the settings as metadata).
    Generate(generate::GenerateArgs),
    /// Fetch the model files from the Hugging Face hub (checksums verified, resumable).
    Download(models::DownloadArgs),
    /// Print the generation settings stored in a PNG.
    Meta(models::MetaArgs),
    /// Write a complete tiny model with random weights (for tests and trying the CLI).
    MakeTinyModel(models::TinyModelArgs),
    /// Show the GPU, the embedded kernel architectures and the ptxas resource table; with
    /// --size, the device memory a generation of that size needs.
    Info(InfoArgs),
    /// Run every kernel on this device against its CPU reference (and the host emulator).
    Verify(verify::VerifyArgs),
    /// Time every kernel on the GPU against the device's copy bandwidth.
    Bench(BenchArgs),
    /// Convert a PyTorch zip checkpoint (e.g. the released ultrapixel_t2i.safetensors, a
    /// pickle despite its name) to safetensors, without executing any pickled code.
    Convert(ConvertArgs),
    /// Run golden case files (see tests/cases/README.md) and compare every output with its
    /// tolerance: exit 0 when all pass, 1 when any fails, 2 on unreadable input.
    Validate(ValidateArgs),
    /// Time every candidate kernel (ours, cuBLASLt's heuristics with our epilogue) of every
    /// GEMM and attention shape of a generation and write the winners to tuning/<device>.json.
    Tune(tune::TuneArgs),
}

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// Also plan the GPU memory of a generation at this size (WIDTHxHEIGHT).
    #[arg(long)]
    pub size: Option<crate::pipeline::Size>,
    /// Plan with this model directory's configurations (default: the released model).
    #[arg(long)]
    pub model_dir: Option<std::path::PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    /// Where to run: cpu uses the f32 tolerances, hostsim and cuda (bf16 kernels) the bf16 rule.
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
    /// Case files (safetensors).
    #[arg(required = true)]
    pub cases: Vec<std::path::PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// The PyTorch checkpoint (a torch.save zip).
    pub input: std::path::PathBuf,
    /// The safetensors file to write (replaced atomically; nothing is written on error).
    pub output: std::path::PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Timed runs per kernel (per part with --stages).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Only benchmarks whose name contains this text.
    #[arg(long)]
    pub filter: Option<String>,
    /// Time every part of a generation (text encoder, both Stage C passes, the INR
    /// reconstruction, Stage B, Stage A tiles) with random full-size weights, per --size.
    #[arg(long)]
    pub stages: bool,
    /// Time every distinct GEMM shape of a generation (ours and cuBLASLt's) and every
    /// attention shape, per --size.
    #[arg(long, conflicts_with = "stages")]
    pub shapes: bool,
    /// With --shapes: print the shapes as JSON (the PyTorch peer's input) and time nothing.
    #[arg(long, requires = "shapes")]
    pub list: bool,
    /// Output sizes for --stages and --shapes (repeatable).
    #[arg(long = "size", default_values_t = [
        crate::pipeline::Size { width: 1024, height: 1024 },
        crate::pipeline::Size { width: 2048, height: 2048 },
        crate::pipeline::Size { width: 4096, height: 4096 },
    ])]
    pub sizes: Vec<crate::pipeline::Size>,
    /// With --stages or --shapes: the tiny test configuration instead of the released one.
    #[arg(long)]
    pub tiny: bool,
    /// With --stages or --shapes: where to run (hostsim checks the harness without a GPU).
    #[arg(long, value_enum, default_value_t = BackendKind::Cuda)]
    pub backend: BackendKind,
}

/// The exit code of a failed command, as the README's table gives them: 2 for bad input or a
/// refusal before any work (arguments, files that are missing, unreadable, unwritable or
/// invalid, the hub denying access or lacking a file, offline with files missing, too little
/// GPU memory, no usable device for the backend asked), 130 for Ctrl-C, 1 for a failure while
/// running (a download that failed on the way, a kernel or CUDA error, NaN/Inf).
pub fn exit_code(e: &crate::Error) -> i32 {
    use crate::Error as E;
    match e {
        E::Interrupted => 130,
        E::InvalidArgument(_)
        | E::Format { .. }
        | E::Io { .. }
        | E::Case { .. }
        | E::Weights(_)
        | E::OutOfMemory { .. } => 2,
        E::NoDriver
        | E::NoDevice(_)
        | E::KernelsNotCompiled
        | E::UnsupportedDevice { .. }
        | E::HostsimUnavailable => 2,
        E::Download { .. }
        | E::Cuda { .. }
        | E::KernelsMissing(_)
        | E::KernelAbi { .. }
        | E::Hostsim { .. }
        | E::Shape { .. }
        | E::NonFinite { .. } => 1,
    }
}

/// Runs a parsed command; the return value is the process exit code.
pub fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Generate(a) => generate::generate(a),
        Command::Download(a) => models::download(a),
        Command::Meta(a) => models::meta(a),
        Command::MakeTinyModel(a) => models::make_tiny_model(a),
        Command::Info(a) => info(a),
        Command::Verify(a) => verify::verify_cmd(a),
        Command::Validate(a) => validate_cmd(a),
        Command::Convert(a) => {
            let report = crate::weights::convert(&a.input, &a.output)?;
            println!("{}: {report}", a.output.display());
            Ok(0)
        }
        Command::Tune(a) => tune::tune(a),
        Command::Bench(a) if a.stages || a.shapes => bench_model(a),
        Command::Bench(a) => {
            let dev = CudaDevice::new(0)?;
            crate::bench::print(&dev, a.iters, a.filter.as_deref())?;
            Ok(0)
        }
    }
}

/// `bench --stages` and `bench --shapes`: the released (or tiny) networks at real shapes.
fn bench_model(a: BenchArgs) -> Result<i32> {
    let cfg = if a.tiny {
        crate::pipeline::tiny::tiny_configs()
    } else {
        crate::pipeline::models::Configs::default()
    };
    if a.list {
        let list = crate::bench::shapes::list_json(&cfg, &a.sizes)?;
        println!(
            "{}",
            serde_json::to_string_pretty(&list).expect("JSON of plain values")
        );
        return Ok(0);
    }
    let (device, cuda): (Arc<dyn Device>, _) = match Backend::open(a.backend)? {
        Backend::Cuda(d) => (d.clone(), Some(d)),
        #[cfg(feature = "hostsim")]
        Backend::Hostsim(d) => (d, None),
        Backend::Cpu => {
            return Err(crate::Error::InvalidArgument(
                "bench --stages and --shapes time the kernels: use --backend cuda or hostsim"
                    .into(),
            ))
        }
    };
    if a.stages {
        crate::bench::stages::print(&device, &cfg, &a.sizes, a.iters)?;
        return Ok(0);
    }
    let vendor = match &cuda {
        Some(d) => crate::bench::vendor::VendorGemm::open(d),
        None => Err("the emulator has no vendor library".to_string()),
    };
    let missing = vendor.as_ref().err().cloned().unwrap_or_default();
    crate::bench::shapes::print(
        &device,
        vendor.as_ref().ok(),
        &missing,
        &cfg,
        &a.sizes,
        a.iters,
    )?;
    Ok(0)
}

fn info(a: InfoArgs) -> Result<i32> {
    println!("ultrapixel {}", env!("CARGO_PKG_VERSION"));
    if KERNELS_COMPILED {
        println!(
            "kernels: compiled by nvcc ({NVCC_VERSION}) for {} + PTX {PTX_ARCH}",
            CUDA_ARCHS.join(", ")
        );
    } else {
        println!("kernels: NOT compiled (built without nvcc; run tools/install-cuda-toolchain.sh and rebuild)");
    }
    println!(
        "host emulator: {}",
        if cfg!(feature = "hostsim") {
            "built in"
        } else {
            "not built in"
        }
    );
    match probe(0) {
        Ok((_, i)) => {
            println!(
                "GPU: {} (compute capability {}.{}), {} MiB free of {} MiB",
                i.name,
                i.compute_capability.0,
                i.compute_capability.1,
                i.free_bytes >> 20,
                i.total_bytes >> 20
            );
            println!("tuning: {}", crate::tune::selection_for(&i).describe());
        }
        Err(e) => println!("GPU: none usable: {e}"),
    }
    if !PTXAS.is_empty() {
        println!(
            "\nptxas resource use (registers, shared memory bytes, stack bytes, spill bytes):"
        );
        println!(
            "{:<36} {:<7} {:>5} {:>7} {:>6} {:>6}",
            "kernel", "arch", "regs", "smem", "stack", "spills"
        );
        for e in PTXAS {
            println!(
                "{:<36} {:<7} {:>5} {:>7} {:>6} {:>6}",
                e.kernel,
                e.arch,
                e.registers,
                e.smem_bytes,
                e.stack_bytes,
                e.spill_stores + e.spill_loads
            );
        }
    }
    if let Some(size) = a.size {
        // With a GPU, the plan counts the scratch of the GEMMs its tuning table hands to
        // cuBLASLt.
        let gpu = CudaDevice::new(0).ok();
        let device = gpu.as_deref().map(|d| d as &dyn Device);
        print_plan(size, a.model_dir.as_deref(), device)?;
    }
    Ok(0)
}

/// The memory plan of a generation at `size`, stage by stage.
fn print_plan(
    size: crate::pipeline::Size,
    dir: Option<&std::path::Path>,
    device: Option<&dyn Device>,
) -> Result<()> {
    use crate::pipeline::generate::memory_plan;
    use crate::pipeline::models::Configs;
    let (configs, which) = match dir {
        Some(d) => {
            let md =
                crate::pipeline::ModelDir::resolve(Some(d), &crate::hub::HubOptions::from_env())?;
            (Configs::read(&md)?, d.display().to_string())
        }
        None => (Configs::default(), "the released model".to_string()),
    };
    let plan = memory_plan(&configs, size, device)?;
    let mib = |b: u64| b.div_ceil(1 << 20);
    println!("\nGPU memory plan for {size} ({which}), MiB:");
    println!(
        "{:<14} {:>9} {:>12} {:>9}",
        "stage", "weights", "activations", "total"
    );
    for s in &plan.stages {
        println!(
            "{:<14} {:>9} {:>12} {:>9}",
            s.stage,
            mib(s.weight_bytes),
            mib(s.arena_bytes),
            mib(s.weight_bytes + s.arena_bytes)
        );
    }
    println!(
        "peak: {} MiB with each stage's weights freed after it (--low-vram), {} MiB with them kept",
        mib(plan.sequential_peak()),
        mib(plan.resident_peak())
    );
    // Each part is one CUDA graph, replayed per run: its launches are the kernel boundaries
    // a run pays for.
    println!("\nkernel launches (one CUDA graph per part; 20 Stage C steps per pass, 10 Stage B):");
    let mut total = 0;
    for g in crate::pipeline::generate::stage_graphs(&configs, size, (20, 10))? {
        let n = crate::runtime::device::dry_launches(&g.graph)?.len();
        total += n * g.runs;
        println!("{:<13} {:<20} {n:>6} × {:>3}", g.stage, g.part, g.runs);
    }
    println!("per image: {total} launches");
    Ok(())
}

/// `validate`: every case is read first, so a bad file stops the run before any work (exit 2);
/// a case that fails to run counts as failed, with its error.
fn validate_cmd(a: ValidateArgs) -> Result<i32> {
    let cases = a
        .cases
        .iter()
        .map(|p| crate::golden::Case::load(p))
        .collect::<Result<Vec<_>>>()?;
    if let Some(c) = cases
        .iter()
        .find(|c| !crate::golden::SUPPORTED_KINDS.contains(&c.module.as_str()))
    {
        return Err(crate::Error::Case {
            case: c.path.display().to_string(),
            message: format!(
                "unknown or unsupported case kind `{}` (this build runs: {})",
                c.module,
                crate::golden::SUPPORTED_KINDS.join(", ")
            ),
        });
    }
    let backend = crate::runtime::Backend::open(a.backend)?;
    let (mut passed, mut failed) = (0, 0);
    for case in &cases {
        match crate::golden::run_case(case, &backend) {
            Ok(checks) => {
                for c in checks {
                    let ok = c.passed();
                    println!(
                        "{:<24} {:<24} {} {:.3e} <= {:.3e}  {}",
                        c.case,
                        c.output,
                        c.rule,
                        c.error,
                        c.limit,
                        if ok { "PASS" } else { "FAIL" }
                    );
                    if ok {
                        passed += 1;
                    } else {
                        failed += 1;
                    }
                }
            }
            Err(e) => {
                println!("{:<24} {:<24} FAIL ({e})", case.path.display(), "-");
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 { 0 } else { 1 })
}
