//! `ultrapixel info`: the build's kernels, the GPU and its tuning table, the ptxas resource
//! table, and with --size the memory plan and launch count of a generation and which kernel
//! (cuBLASLt, sm_90a or portable) its GEMM and attention ops run, as the tuning dispatch
//! decides at session build.

use super::backend_arg::BackendArg;
use crate::runtime::cuda::probe;
use crate::runtime::device::{dry_node_entries, Device, DrySubstitution};
use crate::runtime::kernel_choice::{KernelCensus, KernelChoice, KernelTarget};
use crate::runtime::kernels::{CUDA_ARCHS, KERNELS_COMPILED, NVCC_VERSION, PTXAS, PTX_ARCH};
use crate::tune::dispatch::{self, Dispatch};
use crate::Result;

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// Also plan the GPU memory of a generation at this size (WIDTHxHEIGHT).
    #[arg(long)]
    pub size: Option<crate::pipeline::Size>,
    /// Plan with this model directory's configurations (default: the released model).
    #[arg(long)]
    pub model_dir: Option<std::path::PathBuf>,
    /// With --size: plan a generation with this ControlNet (its weights and activations).
    #[arg(long, value_name = "KIND", requires = "size")]
    pub control: Option<crate::pipeline::ControlKind>,
    /// With --size: list the GEMM and attention kernels for this backend under
    /// `UPX_KERNELS` (default: the GPU when one is usable, else the emulator).
    #[arg(long, value_enum, requires = "size")]
    pub backend: Option<BackendArg>,
    /// With --size: list the kernels this tuning table picks (under `UPX_KERNELS=auto`), as
    /// on a GPU it matches, instead of the table the GPU's sessions would use (none on the
    /// emulator). Used unless stale: measured with other kernels than this build's.
    #[arg(long, value_name = "FILE", requires = "size")]
    pub tuning_table: Option<std::path::PathBuf>,
}

pub fn info(a: InfoArgs) -> Result<i32> {
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
        let gpu = crate::backend::open_gpu(0).ok();
        let device = gpu.as_deref().map(|d| d as &dyn Device);
        let target = match (a.backend, gpu.as_deref()) {
            (Some(BackendArg::Cuda) | None, Some(d)) => {
                Ok((d.kernel_target(), d.describe(), Some(d)))
            }
            (Some(BackendArg::Hostsim) | None, _) => {
                Ok((KernelTarget::hostsim(), "the emulator".to_string(), None))
            }
            (Some(BackendArg::Cuda), None) => Err("no usable GPU"),
            (Some(BackendArg::Cpu), _) => Err("the cpu backend runs no kernels"),
        };
        let listing = target.map(|(target, on, gpu)| {
            let dispatch = listing_dispatch(a.tuning_table.as_deref(), gpu);
            (target, on, dispatch)
        });
        let launches = listing.as_ref().ok().map(|(target, _, dispatch)| {
            (*target, dispatch.get().map(|d| d as &dyn DrySubstitution))
        });
        let configs = print_plan(size, a.model_dir.as_deref(), a.control, device, launches)?;
        match &listing {
            Ok((target, on, dispatch)) => print_kernels(&configs, size, *target, on, dispatch)?,
            Err(why) => println!("\nGEMM and attention kernels: not listed ({why})"),
        }
    }
    Ok(0)
}

/// The tuning dispatch a listing applies, as the sessions on its target would: the table
/// given (`--tuning-table`), else the GPU's own (the one its sessions use), else none (the
/// emulator's sessions use no table: every node runs the op's own launches).
enum ListingDispatch<'a> {
    Given(Dispatch),
    Gpu(&'a Dispatch),
    None,
}

fn listing_dispatch<'a>(
    table: Option<&std::path::Path>,
    gpu: Option<&'a crate::runtime::cuda::CudaDevice>,
) -> ListingDispatch<'a> {
    match (table, gpu) {
        (Some(path), _) => ListingDispatch::Given(Dispatch::with(dispatch::unless_off(|| {
            crate::tune::Selection::load_file(path)
        }))),
        (None, Some(d)) => ListingDispatch::Gpu(dispatch::of(d)),
        (None, None) => ListingDispatch::None,
    }
}

impl ListingDispatch<'_> {
    fn get(&self) -> Option<&Dispatch> {
        match self {
            ListingDispatch::Given(d) => Some(d),
            ListingDispatch::Gpu(d) => Some(d),
            ListingDispatch::None => None,
        }
    }

    /// Which rules pick the kernels, for the listing's heading.
    fn describe(&self) -> String {
        match self.get() {
            Some(d) => d.selection().describe(),
            None => "none (the emulator's sessions use no tuning table; \
                     --tuning-table FILE lists what a table picks)"
                .into(),
        }
    }
}

/// Which kernel the GEMM and attention ops of a generation at `size` run on `target` (`on`
/// names it) under `UPX_KERNELS` and the tuning `dispatch` (its decision per node, as at
/// session build): per op family, executions per image on each kernel, and why the portable
/// ones did not take the sm_90a kernel where it was allowed.
fn print_kernels(
    configs: &crate::pipeline::open_models::Configs,
    size: crate::pipeline::Size,
    target: KernelTarget,
    on: &str,
    dispatch: &ListingDispatch,
) -> Result<()> {
    let choice = target.resolve(None)?;
    let mut census = KernelCensus::default();
    let substitution = dispatch.get().map(|d| d as &dyn DrySubstitution);
    for g in crate::pipeline::plan::stage_graphs(configs, size, (20, 10))? {
        census.add(&g.graph, target, substitution, g.runs)?;
    }
    // Under auto the tuning line below says which rules pick them.
    let not_here = match target.why_not_sm90a(choice) {
        Some(why) if choice == KernelChoice::Sm90a => format!("; no sm_90a kernels: {why}"),
        _ => String::new(),
    };
    println!(
        "\nGEMM and attention kernels per image ({}={} on {on}{not_here}):",
        crate::runtime::kernel_choice::ENV,
        choice.name()
    );
    println!("  tuning: {}", dispatch.describe());
    for line in census.lines() {
        println!("  {line}");
    }
    Ok(())
}

/// The memory plan of a generation at `size`, stage by stage, and its launches per part
/// (built for `launches`' target with its substitution, as the kernel listing; without one
/// the portable kernels'); returns the configurations it planned with.
fn print_plan(
    size: crate::pipeline::Size,
    dir: Option<&std::path::Path>,
    control: Option<crate::pipeline::ControlKind>,
    device: Option<&dyn Device>,
    launches: Option<(KernelTarget, Option<&dyn DrySubstitution>)>,
) -> Result<crate::pipeline::open_models::Configs> {
    use crate::pipeline::control::net::add_to_plan;
    use crate::pipeline::open_models::{open_controlnet, Configs};
    use crate::pipeline::plan::memory_plan;
    let (configs, controlnet, which) = match dir {
        Some(d) => {
            let md =
                crate::pipeline::ModelDir::resolve(Some(d), &crate::hub::HubOptions::from_env())?;
            let controlnet = match control {
                Some(kind) => {
                    let c = open_controlnet(&md, kind)?;
                    Some((c.net.config, c.encoder.map(|e| e.config)))
                }
                None => None,
            };
            (Configs::read(&md)?, controlnet, d.display().to_string())
        }
        None => (
            Configs::default(),
            control.map(|kind| {
                let encoder = kind.encoder_file().map(|_| Default::default());
                (kind.released_config(), encoder)
            }),
            "the released model".to_string(),
        ),
    };
    let mut plan = memory_plan(&configs, size, device)?;
    if let Some((cfg, encoder)) = &controlnet {
        add_to_plan(&mut plan, cfg, encoder.as_ref(), size, device)?;
    }
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
    println!(
        "a server keeps each stage's sessions for the next request of this size from {} MiB \
         (placed once: arenas, launch lists, CUDA graphs)",
        mib(plan.reuse_peak())
    );
    // Each part is one CUDA graph, replayed per run: its launches are the kernel boundaries
    // a run pays for.
    println!(
        "\nlaunches, our kernels and the cuBLASLt calls below (one CUDA graph per part; 20 Stage \
         C steps per pass, 10 Stage B):"
    );
    let mut total = 0;
    for g in crate::pipeline::plan::stage_graphs(&configs, size, (20, 10))? {
        let n = match launches {
            Some((target, substitution)) => dry_node_entries(&g.graph, target, substitution)?
                .iter()
                .map(|node| node.entries.len())
                .sum(),
            None => crate::runtime::device::dry_launches(&g.graph)?.len(),
        };
        total += n * g.runs;
        println!("{:<13} {:<20} {n:>6} × {:>3}", g.stage, g.part, g.runs);
    }
    println!("per image: {total} launches");
    print_work(&configs, size)?;
    Ok(configs)
}

/// The work per image by stage and op kind (tensor-core FLOPs, the bytes each op must move
/// at least), the kinds that move at least 1 GB or compute 10 GFLOP; the rest summed.
fn print_work(
    configs: &crate::pipeline::open_models::Configs,
    size: crate::pipeline::Size,
) -> Result<()> {
    let work = crate::pipeline::plan::work_by_op(configs, size, (20, 10))?;
    println!(
        "
work per image by op, most bytes first (TFLOP on tensor cores, GB moved at least):"
    );
    let (shown, rest): (Vec<_>, Vec<_>) = work
        .iter()
        .partition(|w| w.cost.bytes >= 1e9 || w.cost.flops >= 1e10);
    for w in shown {
        println!(
            "{:<13} {:<20} {:>9.2} TFLOP {:>9.1} GB {:>7} runs",
            w.stage,
            w.op,
            w.cost.flops / 1e12,
            w.cost.bytes / 1e9,
            w.runs
        );
    }
    let bytes: f64 = rest.iter().map(|w| w.cost.bytes).sum();
    println!("{} smaller op kinds: {:.2} GB", rest.len(), bytes / 1e9);
    Ok(())
}
