//! `ultrapixel convert`: a PyTorch zip checkpoint to safetensors, without running pickled code.

use crate::Result;

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// The PyTorch checkpoint (a torch.save zip).
    pub input: std::path::PathBuf,
    /// The safetensors file to write (replaced atomically; nothing is written on error).
    pub output: std::path::PathBuf,
}

pub fn convert(a: ConvertArgs) -> Result<i32> {
    let report = crate::weights::convert(&a.input, &a.output)?;
    println!("{}: {report}", a.output.display());
    Ok(0)
}
