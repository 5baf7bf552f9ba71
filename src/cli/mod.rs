//! Command-line interface (`ultrapixel <command>`).

mod backend_arg;
mod bench;
mod convert;
mod download;
mod generate;
mod info;
mod make_tiny_model;
mod meta;
mod serve;
mod sweep;
mod tally;
mod tune;
mod upscale;
mod validate;
mod verify;

use crate::Result;
use clap::{Parser, Subcommand};

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
    /// Enlarge an image through the cascade with the super-resolution ControlNet.
    Upscale(upscale::UpscaleArgs),
    /// Fetch the model files from the Hugging Face hub (checksums verified, resumable).
    Download(download::DownloadArgs),
    /// Print the generation settings stored in a PNG.
    Meta(meta::MetaArgs),
    /// Write a complete tiny model with random weights (for tests and trying the CLI).
    MakeTinyModel(make_tiny_model::TinyModelArgs),
    /// Show the GPU, the embedded kernel architectures and the ptxas resource table; with
    /// --size, the device memory a generation of that size needs.
    Info(info::InfoArgs),
    /// Run every kernel on this device against its CPU reference (and the host emulator).
    Verify(verify::VerifyArgs),
    /// Time every kernel on the GPU against the device's copy bandwidth.
    Bench(bench::BenchArgs),
    /// Convert a PyTorch zip checkpoint (e.g. the released ultrapixel_t2i.safetensors, a
    /// pickle despite its name) to safetensors, without executing any pickled code.
    Convert(convert::ConvertArgs),
    /// Run golden case files (see tests/cases/README.md) and compare every output with its
    /// tolerance: exit 0 when all pass, 1 when any fails, 2 on unreadable input.
    Validate(validate::ValidateArgs),
    /// Time every candidate kernel (ours, cuBLASLt's heuristics with our epilogue) of every
    /// GEMM and attention shape of a generation and write the winners to `tuning/<device>.json`.
    Tune(tune::TuneArgs),
    /// Serve the OpenAI images API and Automatic1111's txt2img over HTTP, the model loaded
    /// once per device (health, readiness and Prometheus metrics included; docs/DEPLOY.md).
    Serve(serve::ServeArgs),
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
        | E::InvalidSetting { .. }
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
        Command::Upscale(a) => upscale::upscale(a),
        Command::Download(a) => download::download(a),
        Command::Meta(a) => meta::meta(a),
        Command::MakeTinyModel(a) => make_tiny_model::make_tiny_model(a),
        Command::Info(a) => info::info(a),
        Command::Verify(a) => verify::verify_cmd(a),
        Command::Validate(a) => validate::validate(a),
        Command::Convert(a) => convert::convert(a),
        Command::Tune(a) => tune::tune(a),
        Command::Bench(a) => bench::bench(a),
        Command::Serve(a) => serve::serve(a),
    }
}
