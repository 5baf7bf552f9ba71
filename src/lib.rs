//! ultrapixel: UltraPixel text-to-image (Stable Cascade stage C with UltraPixel's
//! low-res guidance, stage B lite, stage A, CLIP ViT-bigG) through our own CUDA kernels.
//!
//! Layers, bottom up: [`tensor`] (host tensors, dtypes), [`runtime`] (op graph, arena
//! planner, executors cpu / hostsim / cuda, kernel table), [`ops`] (one module per kernel
//! family: shape checks, CPU reference, launch plan), [`weights`] (safetensors, safe pickle
//! conversion, name maps), [`verify`] (every kernel against its reference), [`truth`] (hardware
//! truth fixtures: the selftest kernels' raw outputs, replayed on the emulator).

pub mod atomic_file;
pub mod bench;
pub mod cli;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod golden;
pub mod hub;
pub mod models;
pub mod ops;
pub mod pipeline;
pub mod runtime;
pub mod sampling;
pub mod tensor;
pub mod text;
pub mod truth;
pub mod tune;
pub mod verify;
pub mod weights;

pub use error::{Error, Result};
