//! `ultrapixel meta`: the generation settings stored in a PNG.

use crate::pipeline::png_out::{read_metadata, JSON_KEY};
use crate::Result;
use std::path::PathBuf;

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
