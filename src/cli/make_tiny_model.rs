//! `ultrapixel make-tiny-model`: a complete model directory with tiny random networks.

use crate::Result;
use std::path::PathBuf;

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
