//! The model-file commands: `download`, `make-tiny-model`, `meta`.

use crate::hub::{Hub, HubOptions};
use crate::pipeline::model_dir;
use crate::pipeline::png_out::{read_metadata, JSON_KEY};
use crate::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct DownloadArgs {
    /// Put the files in this directory instead of the Hugging Face cache.
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn download(a: DownloadArgs) -> Result<i32> {
    let hub = Hub::new(HubOptions {
        progress: !a.quiet,
        ..HubOptions::from_env()
    });
    let dir = model_dir::download(&hub, a.model_dir.as_deref(), |d| {
        let what = if d.fetched {
            "downloaded"
        } else {
            "up to date"
        };
        println!("{what:>10}  {}  ({})", d.name, d.path.display());
    })?;
    println!("model files complete in {}", dir.location);
    Ok(0)
}

#[derive(clap::Args, Debug)]
pub struct TinyModelArgs {
    /// The directory to write (created if missing; existing files are replaced).
    pub dir: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn make_tiny_model(a: TinyModelArgs) -> Result<i32> {
    let done = crate::pipeline::tiny::make_tiny_model(&a.dir, a.seed)?;
    println!(
        "{}: tiny random model, {} tensors in {} files; try `ultrapixel generate --model-dir {} --backend hostsim --size 512x512 \"a test\"`",
        a.dir.display(),
        done.tensors,
        done.files.len(),
        a.dir.display()
    );
    Ok(0)
}

#[derive(clap::Args, Debug)]
pub struct MetaArgs {
    /// A PNG file (ours, or any other tool's).
    pub file: PathBuf,
}

/// Prints a PNG's text chunks; ours as the A1111 text and pretty JSON.
pub fn meta(a: MetaArgs) -> Result<i32> {
    let m = read_metadata(&a.file)?;
    println!("{}: {}x{}", a.file.display(), m.width, m.height);
    if m.text.is_empty() {
        println!("no text metadata");
    }
    for (key, text) in &m.text {
        if key == JSON_KEY {
            continue;
        }
        println!("[{key}]\n{text}");
    }
    if let Some(ours) = &m.ultrapixel {
        println!(
            "[{JSON_KEY}]\n{}",
            serde_json::to_string_pretty(ours).expect("metadata serializes")
        );
    }
    Ok(0)
}
