//! DDIM inversion (diffusers' `DDIMInverseScheduler`): runs the deterministic DDIM update
//! upwards, from an image x0 to the x_T that DDIM (eta 0) maps back to it — how an image
//! variation starts from a given picture.

use crate::config::{PredictionType, TimestepSpacing};
use crate::ddim::x0_and_eps;
use crate::schedule::{BetaSchedule, NoiseSchedule, from_diffusers};
use crate::spacing::inverse_timesteps;
use crate::step::{StepOutput, X0Clamp, index_of, split_output};
use crate::{NoiseSource, Result, Scheduler};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::Tensor;

/// diffusers' `DDIMInverseScheduler` config (unknown keys ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DdimInverseSchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub clip_sample: bool,
    /// ᾱ before the first step: 1 (true) or ᾱ_0.
    pub set_alpha_to_one: bool,
    pub steps_offset: i64,
    pub prediction_type: PredictionType,
    pub clip_sample_range: f64,
    /// `leading` or `trailing`.
    pub timestep_spacing: TimestepSpacing,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimInverseSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            clip_sample_range: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

impl DdimInverseSchedulerConfig {
    /// Reads a diffusers `scheduler_config.json` (unknown keys ignored, missing ones default).
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::from_config::read_config(path)
    }
}

#[derive(Debug, Clone, Copy)]
struct Coefficients {
    sqrt_alpha_prod: f64,
    sqrt_beta_prod: f64,
    sqrt_alpha_next: f64,
    sqrt_beta_next: f64,
}

/// DDIM inversion. Its `timesteps()` are increasing; `step(out, t, x)` moves x from the level
/// t − T/n to level t, with `out` the model evaluated at t (diffusers' approximation).
#[derive(Debug, Clone)]
pub struct DdimInverseScheduler {
    config: DdimInverseSchedulerConfig,
    schedule: NoiseSchedule,
    clamp: X0Clamp,
    timesteps: Vec<i64>,
    steps: Vec<Coefficients>,
}

impl DdimInverseScheduler {
    /// An inversion scheduler for `config` (validated).
    pub fn new(config: DdimInverseSchedulerConfig) -> Result<Self> {
        let schedule = from_diffusers(
            config.beta_schedule,
            config.num_train_timesteps,
            config.beta_start,
            config.beta_end,
            config.trained_betas.as_deref(),
            config.rescale_betas_zero_snr,
        )?;
        let clamp = X0Clamp::new(false, 0.995, 1.0, config.clip_sample, config.clip_sample_range)?;
        Ok(Self { config, schedule, clamp, timesteps: Vec::new(), steps: Vec::new() })
    }

    /// The config it was built with.
    pub fn config(&self) -> &DdimInverseSchedulerConfig {
        &self.config
    }

    /// [`Scheduler::step`] that also returns the x0 estimate.
    pub fn step_full(
        &self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
    ) -> Result<StepOutput> {
        let c = self.steps[index_of(&self.timesteps, timestep)?];
        let (out, _) = split_output(model_output, sample, false)?;
        let _guard = tch::no_grad_guard();
        let (x0, eps) = x0_and_eps(
            self.config.prediction_type,
            &out,
            sample,
            c.sqrt_alpha_prod,
            c.sqrt_beta_prod,
        );
        let x0 = self.clamp.apply(x0);
        let prev = &x0 * c.sqrt_alpha_next + eps * c.sqrt_beta_next;
        Ok(StepOutput { prev_sample: prev, pred_original_sample: x0 })
    }
}

impl Scheduler for DdimInverseScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let t_train = self.config.num_train_timesteps;
        let ts = inverse_timesteps(
            self.config.timestep_spacing,
            t_train,
            num_inference_steps,
            self.config.steps_offset,
        )?;
        let stride = (t_train / num_inference_steps) as i64;
        let ac = self.schedule.alphas_cumprod();
        let initial = if self.config.set_alpha_to_one { 1.0f32 } else { ac[0] };
        self.steps = ts
            .iter()
            .map(|&t| {
                let from = (t - stride).min(t_train as i64 - 1);
                let a = if from >= 0 { ac[from as usize] } else { initial };
                let a_next = ac[t as usize];
                Coefficients {
                    sqrt_alpha_prod: a.sqrt() as f64,
                    sqrt_beta_prod: (1.0 - a).sqrt() as f64,
                    sqrt_alpha_next: a_next.sqrt() as f64,
                    sqrt_beta_next: (1.0 - a_next).sqrt() as f64,
                }
            })
            .collect();
        self.timesteps = ts;
        Ok(())
    }

    /// Increasing: inversion walks up the noise levels.
    fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    /// Deterministic: draws no noise.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        Ok(self.step_full(model_output, timestep, sample)?.prev_sample)
    }
}
