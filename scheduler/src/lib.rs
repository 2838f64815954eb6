//! Noise schedules, training targets and samplers for unCLIP's diffusion models, matched to
//! diffusers.
//!
//! - [`NoiseSchedule`]: betas / ᾱ of the four beta schedules, `add_noise`, `velocity`, targets;
//! - [`training`]: the learned-variance VLB term and the hybrid loss (improved DDPM / GLIDE);
//! - samplers behind the object-safe [`Scheduler`] trait, so pipelines can hold a
//!   `Box<dyn Scheduler>`: [`UnCLIPScheduler`] (Karlo), [`DdpmScheduler`], [`DdimScheduler`]
//!   (and [`DdimInverseScheduler`]), [`DpmSolverMultistepScheduler`] (2M).
//!
//! Randomness comes through a [`NoiseSource`]; on the CPU, [`TorchNoise`] reproduces diffusers'
//! draws for the same seed.

pub mod config;
pub mod ddim;
pub mod ddim_inverse;
pub mod ddpm;
pub mod dpm_solver;
pub mod error;
pub mod from_config;
pub mod noise;
pub mod schedule;
pub mod spacing;
pub mod step;
pub mod training;
pub mod traits;
pub mod unclip;

pub use config::{PredictionType, TimestepSpacing, VarianceType};
pub use ddim::{DdimScheduler, DdimSchedulerConfig};
pub use ddim_inverse::{DdimInverseScheduler, DdimInverseSchedulerConfig};
pub use ddpm::{DdpmScheduler, DdpmSchedulerConfig};
pub use dpm_solver::{DpmSolverConfig, DpmSolverMultistepScheduler, FinalSigmas, SolverType};
pub use error::{Error, Result};
pub use from_config::{scheduler_from_file, scheduler_from_json};
pub use noise::{NoiseSource, TorchNoise, global_rng_lock};
pub use schedule::{BetaSchedule, NoiseSchedule};
pub use step::{StepOutput, classifier_free_guidance, dynamic_threshold};
pub use training::{HYBRID_VLB_WEIGHT, HybridLoss, VlbLoss};
pub use traits::Scheduler;
pub use unclip::{UnCLIPScheduler, UnCLIPSchedulerConfig};
