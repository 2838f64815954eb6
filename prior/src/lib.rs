//! The unCLIP diffusion prior (Karlo/diffusers PriorTransformer): text embedding to CLIP image
//! embedding.
//!
//! - [`config`]: the checkpoint's `config.json`;
//! - [`model`]: [`PriorTransformer`], loading and saving diffusers checkpoints;
//! - [`block`]: its transformer block;
//! - [`conditioning`]: the CLIP text outputs it is conditioned on;
//! - [`sampling`]: guided sampling through the scheduler crate, best-of-N;
//! - [`train`]: the training loss and step, `clip_mean`/`clip_std` statistics.
//!
//! ```no_run
//! # fn main() -> unclip_prior::Result<()> {
//! use unclip_prior::{PriorTransformer, SampleOptions, TextConditioning, sample, sampling};
//! use unclip_scheduler::TorchNoise;
//! # let (embeds, hidden, mask, e0, h0, m0) = (tch::Tensor::zeros([1, 768], tch::kind::FLOAT_CPU),
//! #     tch::Tensor::zeros([1, 77, 768], tch::kind::FLOAT_CPU), tch::Tensor::ones([1, 77], tch::kind::FLOAT_CPU),
//! #     tch::Tensor::zeros([1, 768], tch::kind::FLOAT_CPU), tch::Tensor::zeros([1, 77, 768], tch::kind::FLOAT_CPU),
//! #     tch::Tensor::ones([1, 77], tch::kind::FLOAT_CPU));
//! let dir = std::path::Path::new("karlo-v1-alpha/prior");
//! let (_vs, prior) = PriorTransformer::from_pretrained(dir, tch::Device::Cpu, tch::Kind::Float)?;
//! // CLIP text outputs of the prompts, and of the empty prompt for guidance.
//! let cond = TextConditioning::new(embeds, hidden, mask)?;
//! let uncond = TextConditioning::new(e0, h0, m0)?;
//! let mut scheduler = sampling::karlo_prior_scheduler()?;
//! let image_embeds = sample(&prior, &mut scheduler, &cond, Some(&uncond),
//!     &SampleOptions::default(), &mut TorchNoise::new(0))?;
//! # Ok(()) }
//! ```

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
