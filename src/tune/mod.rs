//! Per-shape kernel choice: `ultrapixel tune` measures every candidate of every distinct GEMM
//! and attention shape of a generation on the GPU ([`tuner`]) and writes the winners to
//! `tuning/<device>.json` ([`table`]); at run time the table that matches the device picks
//! per shape, and the built-in rules (our kernels) apply when there is none or it is stale.
//!
//! - [`problems`]: the distinct GEMMs (with their epilogues: the lookup key) and attentions.
//! - cuBLASLt itself (our own handle and workspace, several heuristics, replayable
//!   algorithms) is a runtime service: [`crate::runtime::cuda::cublaslt`].
//! - [`engine`]: runs and times step lists (our launches and cuBLASLt calls) in one CUDA
//!   graph; an emulator engine tests the flow without a GPU.
//! - [`tuner`]: the GEMM candidates, and the run over every shape; [`attention`]: the
//!   attention candidates; [`checking`]: how a candidate is checked, timed and picked.
//! - [`table`]: the table format, keys, staleness and the [`Selection`] in use.
//! - [`pair`]: a vendor GEMM completed by our passes (scaling, epilogue).
//! - [`dispatch`]: at run time under `UPX_KERNELS=auto`, a GEMM node whose winner is cuBLASLt
//!   runs it in the session's CUDA graph, and a GEMM or attention node whose winner is our
//!   Hopper kernel runs that (a GEMM in the winner's tile width); forced kernel choices keep
//!   their family whatever the table says (forced `sm90a` takes a Hopper winner's width).

pub mod attention;
pub mod checking;
pub mod dispatch;
pub mod engine;
pub mod pair;
pub mod problems;
pub mod table;
pub mod tuner;

pub use problems::{attention_key, gemm_key, AttentionDims, AttentionKey, Epilogue, GemmKey};
pub use table::{AttentionChoice, GemmChoice};
pub use table::{Selection, Table, TableKey};

/// The selection for the CUDA device `info` describes (this machine's driver and cuBLASLt),
/// as a GEMM node on that device uses it.
pub fn selection_for(info: &crate::runtime::cuda::DeviceInfo) -> Selection {
    dispatch::Dispatch::new(&engine::cuda_key(info))
        .selection()
        .clone()
}
