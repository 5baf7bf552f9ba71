//! ultrapixel: UltraPixel text-to-image (Stable Cascade stage C with UltraPixel's
//! low-res guidance, stage B lite, stage A, CLIP ViT-bigG) through our own CUDA kernels.
//!
//! # Embedding
//!
//! Open a model directory and a backend once, then generate as often as needed (one
//! generation runs at a time; [`Pipeline::generate_with`] reports progress and can stop):
//!
//! ```
//! use ultrapixel::{Backend, BackendKind, HubOptions, ModelDir, Pipeline, PipelineOptions};
//! use ultrapixel::{Request, Size};
//! # let tmp = tempfile::tempdir()?;
//! # ultrapixel::pipeline::tiny::make_tiny_model(tmp.path(), 0)?;
//! # let path = tmp.path();
//!
//! let dir = ModelDir::resolve(Some(path), &HubOptions::from_env())?;
//! let pipeline = Pipeline::load(&dir, Backend::open(BackendKind::Cpu)?, PipelineOptions::default())?;
//! let mut request = Request::new("a lighthouse at dusk, photo");
//! request.size = Size::new(512, 512)?;
//! (request.stage_c.steps, request.stage_b.steps, request.seed) = (2, 2, Some(7));
//! for image in pipeline.generate(&request)? {
//!     assert_eq!((image.rgb.width, image.rgb.height), (512, 512));
//!     println!("seed {}: {:?}", image.seed, image.timings);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! (`BackendKind::Cuda` for a GPU and `ModelDir::resolve(None, ..)` for the released model
//! in the Hugging Face cache; the tiny random model here is what the tests use.)
//!
//! # Layers, bottom up
//!
//! - [`tensor`]: host tensors and dtypes.
//! - [`runtime`]: the op graph and the contract ops implement, the arena planner, the
//!   executors (cpu, hostsim, cuda) and the kernel table.
//! - [`ops`]: one module per kernel family: shape rules, CPU reference, launch plan, checks.
//! - [`weights`]: safetensors, the safe pickle conversion, checkpoint name maps.
//! - [`models`]: the networks of the cascade, recorded as op graphs.
//! - [`sampling_loop`]: the GDF sampling loop both diffusion stages run.
//! - [`pipeline`]: requests, model directories, planning, the stages and [`Pipeline`].
//! - [`control`]: control-image preprocessing (reading, the official resize, Canny).
//! - [`verify`], [`truth`], [`tune`]: every kernel against its reference, hardware truth
//!   fixtures, the per-device choice between our GEMMs and the vendor's.

pub mod atomic_file;
pub mod backend;
#[doc(hidden)]
pub mod bench;
/// The build script's ptxas report reader (build/ptxas.rs), unit-tested with the library.
#[cfg(test)]
#[path = "../build/ptxas.rs"]
mod build_ptxas;
#[doc(hidden)]
pub mod cli;
pub mod control;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
#[doc(hidden)]
pub mod golden;
pub mod hub;
pub mod models;
pub mod ops;
pub mod pipeline;
pub mod runtime;
pub mod sampling_loop;
pub mod serve;
pub mod tensor;
pub mod text;
pub mod truth;
pub mod tune;
pub mod verify;
pub mod weights;

pub use error::{Error, Result};
pub use hub::HubOptions;
pub use pipeline::{
    Event, Image, ImageMetadata, ModelDir, OutputPattern, Pipeline, PipelineOptions, Request,
    Rgb8Image, Size, StageSettings,
};
pub use runtime::{Backend, BackendKind};
