//! Noise schedules, training targets and samplers for unCLIP's diffusion models, matched to
//! diffusers.
//!
//! Every sampler implements the object-safe [`Scheduler`] trait so pipelines can hold a
//! `Box<dyn Scheduler>` and swap samplers. Randomness comes through a [`NoiseSource`].

pub mod error;
pub mod noise;
pub mod traits;

pub use error::{Error, Result};
pub use noise::{NoiseSource, TorchNoise};
pub use traits::Scheduler;
