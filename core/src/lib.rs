//! Foundation shared by every unclip-rs crate.
//!
//! - [`device`]: one place that decides CPU or CUDA (and the `UNCLIP_DEVICE` override), and says
//!   why CUDA cannot be used;
//! - [`dtype`]: `f32` / `f16` / `bf16` parsing;
//! - [`weights`]: safetensors loading that names the missing or misshapen tensor, and saving;
//! - [`config`]: reading diffusers / transformers `config.json` files;
//! - [`nn`]: layers shared by several models (timestep embeddings, multi-head attention);
//! - [`fsutil`]: atomic file writes, regular-file-only reads, stale-temporary cleanup, stage
//!   completion markers, safe installs of a folder;
//! - [`memory`]: sizes before allocation, refused with what they would need;
//! - [`train`]: model-independent training machinery (AdamW, LR schedules, EMA, checkpoints, logs).

pub mod config;
mod cuda_link;
pub mod device;
pub mod dtype;
pub mod error;
pub mod fsutil;
pub mod memory;
pub mod nn;
pub mod testing;
pub mod train;
pub mod weights;

pub use device::{
    check_device, cuda_available, cuda_unavailable_reason, parse_device, select_device,
};
pub use dtype::parse_dtype;
pub use error::{Error, Result};

/// Re-exported so downstream crates and users name one `tch`.
pub use tch;

/// The libtorch version this build linked against (e.g. `2.13.0+cu130`), read at build time.
pub fn libtorch_version() -> &'static str {
    env!("UNCLIP_LIBTORCH_VERSION")
}
