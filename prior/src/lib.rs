//! The unCLIP diffusion prior (Karlo/diffusers PriorTransformer): text embedding to CLIP image
//! embedding.
//!
//! - [`config`]: the checkpoint's `config.json`;
//! - [`model`]: [`PriorTransformer`], loading and saving diffusers checkpoints;
//! - [`block`]: its transformer block;
//! - [`conditioning`]: the CLIP text outputs it is conditioned on;
//! - [`sampling`]: guided sampling through the scheduler crate, best-of-N;
//! - [`train`]: the training loss and step, `clip_mean`/`clip_std` statistics.

pub mod block;
pub mod conditioning;
pub mod config;
pub mod error;
pub mod model;
pub mod sampling;
pub mod train;

pub use conditioning::TextConditioning;
pub use config::PriorConfig;
pub use error::{Error, Result};
pub use model::PriorTransformer;
pub use sampling::{BestOfN, SampleOptions, sample, sample_best_of_n, sample_from};
pub use train::{PriorBatch, PriorTrainer, TrainOptions, clip_stats, fit_clip_stats};
