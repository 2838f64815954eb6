//! Foundation shared by every unclip-rs crate.
//!
//! - [`device`]: one place that decides CPU or CUDA (and the `UNCLIP_DEVICE` override);
//! - [`dtype`]: `f32` / `f16` / `bf16` parsing;
//! - [`weights`]: safetensors loading that names the missing or misshapen tensor, and saving;
//! - [`config`]: reading diffusers / transformers `config.json` files;
//! - [`nn`]: layers shared by several models (timestep embeddings, multi-head attention);
//! - [`fsutil`]: atomic file writes for checkpoints, regular-file-only reads;
//! - [`memory`]: sizes before allocation, refused with what they would need;
//! - [`train`]: model-independent training machinery (AdamW, LR schedules, EMA, checkpoints, logs).

pub mod config;
pub mod device;
pub mod dtype;
pub mod error;
pub mod fsutil;
pub mod memory;
pub mod nn;
pub mod testing;
pub mod train;
pub mod weights;

pub use device::{cuda_available, parse_device, select_device};
pub use dtype::parse_dtype;
pub use error::{Error, Result};

/// Re-exported so downstream crates and users name one `tch`.
pub use tch;

/// The libtorch version this build linked against (e.g. `2.13.0+cu130`), read at build time.
pub fn libtorch_version() -> &'static str {
    env!("UNCLIP_LIBTORCH_VERSION")
}
