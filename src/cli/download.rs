//! `ultrapixel download`: the model files from the Hugging Face hub.

use crate::hub::{Hub, HubOptions};
use crate::pipeline::control::ControlKind;
use crate::pipeline::model_dir::{self, Downloaded};
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
    /// Also fetch this ControlNet (canny: `controlnet/canny.safetensors` of
    /// stabilityai/stable-cascade; sr: `controlnet/super_resolution.safetensors` and
    /// `effnet_encoder.safetensors`; inpaint: `controlnet/inpainting.safetensors`), which
    /// `generate --control` and `upscale` need.
    #[arg(long, value_name = "KIND")]
    pub control: Option<ControlKind>,
}

pub fn download(a: DownloadArgs) -> Result<i32> {
    let hub = Hub::new(HubOptions {
        progress: !a.quiet,
        ..HubOptions::from_env()
    });
    let report = |d: &Downloaded| {
        let what = if d.fetched {
            "downloaded"
        } else {
            "up to date"
        };
        println!("{what:>10}  {}  ({})", d.name, d.path.display());
    };
    let dir = model_dir::download(&hub, a.model_dir.as_deref(), report)?;
    for file in a.control.into_iter().flat_map(ControlKind::files) {
        report(&model_dir::download_control(
            &hub,
            a.model_dir.as_deref(),
            file,
        )?);
    }
    println!("model files complete in {}", dir.location);
    Ok(0)
}
