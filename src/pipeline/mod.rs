//! The text-to-image product around the models: the validated [`request::Request`], the model
//! files ([`model_dir`]), and PNG output with metadata ([`png_out`]).

pub mod control;
pub mod generate;
pub mod lora;
pub mod model_dir;
mod observer;
pub mod open_models;
pub mod plan;
pub mod png_out;
pub mod preview;
pub mod request;
pub mod stages;
pub mod tiny;
pub mod tiny_lora;

pub use control::{Control, ControlKind};
pub use generate::{Event, Image, Pipeline, PipelineOptions};
pub use lora::LoraSpec;
pub use model_dir::ModelDir;
pub use plan::MemoryPlan;
pub use png_out::{decode_png, read_metadata, write_png, ImageMetadata, LoraUse, Rgb8Image};
pub use request::{OutputPattern, Request, Size, StageSettings};
