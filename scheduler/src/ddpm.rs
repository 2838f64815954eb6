//! DDPM ancestral sampling (diffusers' `DDPMScheduler`): every variance type and prediction
//! type, any spacing, clipping or dynamic thresholding of x0.

use crate::config::{PredictionType, TimestepSpacing, VarianceType};
use crate::schedule::{BetaSchedule, NoiseSchedule, from_diffusers};
use crate::spacing::ddpm_timesteps;
use crate::step::{StepOutput, X0Clamp, index_of, split_output};
use crate::{NoiseSource, Result, Scheduler};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::Tensor;

/// diffusers' `DDPMScheduler` config (`scheduler_config.json`; unknown keys ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DdpmSchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub variance_type: VarianceType,
    pub clip_sample: bool,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub clip_sample_range: f64,
    pub sample_max_value: f64,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdpmSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            variance_type: VarianceType::FixedSmall,
            clip_sample: true,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

impl DdpmSchedulerConfig {
    /// Reads a diffusers `scheduler_config.json` (unknown keys ignored, missing ones default).
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::from_config::read_config(path)
    }
}

/// Per-step f32 scalars, computed in diffusers' order on 0-d f32 tensors, kept as f64.
#[derive(Debug, Clone, Copy)]
struct Coefficients {
    t: i64,
    sqrt_alpha_prod: f64,
    sqrt_beta_prod: f64,
    x0_coeff: f64,
    sample_coeff: f64,
    /// Standard deviation for the fixed variance types.
    std: f64,
    /// learned_range: log β̃ (clamped) and log β.
    min_log: f64,
    max_log: f64,
}

/// DDPM ancestral sampler.
#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    config: DdpmSchedulerConfig,
    schedule: NoiseSchedule,
    clamp: X0Clamp,
    timesteps: Vec<i64>,
    steps: Vec<Coefficients>,
}

impl DdpmScheduler {
    /// A scheduler for `config` (validated).
    pub fn new(config: DdpmSchedulerConfig) -> Result<Self> {
        let schedule = from_diffusers(
            config.beta_schedule,
            config.num_train_timesteps,
            config.beta_start,
            config.beta_end,
            config.trained_betas.as_deref(),
            config.rescale_betas_zero_snr,
        )?;
        let clamp = X0Clamp::new(
            config.thresholding,
            config.dynamic_thresholding_ratio,
            config.sample_max_value,
            config.clip_sample,
            config.clip_sample_range,
        )?;
        Ok(Self { config, schedule, clamp, timesteps: Vec::new(), steps: Vec::new() })
    }

    /// The config it was built with.
    pub fn config(&self) -> &DdpmSchedulerConfig {
        &self.config
    }

    /// Its noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    fn coefficients(&self, t: i64, prev: i64) -> Coefficients {
        let ac = self.schedule.alphas_cumprod();
        let alpha_prod_t = ac[t as usize];
        let alpha_prod_prev = if prev >= 0 { ac[prev as usize] } else { 1.0f32 };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_prev = 1.0 - alpha_prod_prev;
        let current_alpha = alpha_prod_t / alpha_prod_prev;
        let current_beta = 1.0 - current_alpha;
        let variance = (beta_prod_prev / beta_prod_t * current_beta).max(1e-20);
        let std = match self.config.variance_type {
            VarianceType::FixedSmall => variance.sqrt(),
            VarianceType::FixedSmallLog => (0.5 * variance.ln()).exp(),
            VarianceType::FixedLarge => current_beta.sqrt(),
            VarianceType::Learned | VarianceType::LearnedRange => f32::NAN,
        };
        Coefficients {
            t,
            sqrt_alpha_prod: alpha_prod_t.sqrt() as f64,
            sqrt_beta_prod: beta_prod_t.sqrt() as f64,
            x0_coeff: (alpha_prod_prev.sqrt() * current_beta / beta_prod_t) as f64,
            sample_coeff: (current_alpha.sqrt() * beta_prod_prev / beta_prod_t) as f64,
            std: std as f64,
            min_log: variance.ln() as f64,
            max_log: current_beta.ln() as f64,
        }
    }

    /// [`Scheduler::step`] that also returns the x0 estimate.
    pub fn step_full(
        &self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let c = self.steps[index_of(&self.timesteps, timestep)?];
        let vt = self.config.variance_type;
        let (out, predicted_variance) = split_output(model_output, sample, vt.is_learned())?;
        let _guard = tch::no_grad_guard();
        let x0 = match self.config.prediction_type {
            PredictionType::Epsilon => (sample - &out * c.sqrt_beta_prod) / c.sqrt_alpha_prod,
            PredictionType::Sample => out.shallow_clone(),
            PredictionType::VPrediction => sample * c.sqrt_alpha_prod - &out * c.sqrt_beta_prod,
        };
        let x0 = self.clamp.apply(x0);
        let mut prev = &x0 * c.x0_coeff + sample * c.sample_coeff;
        if c.t > 0 {
            let z = noise.randn(&out.size(), out.kind(), out.device());
            let scaled = match (vt, predicted_variance) {
                (VarianceType::Learned, Some(v)) => v.sqrt() * z,
                (VarianceType::LearnedRange, Some(v)) => {
                    let frac = (v + 1.0) / 2.0;
                    let log_var = &frac * c.max_log + (1.0f64 - frac) * c.min_log;
                    (log_var * 0.5).exp() * z
                }
                _ => z * c.std,
            };
            prev += scaled;
        }
        Ok(StepOutput { prev_sample: prev, pred_original_sample: x0 })
    }
}

impl Scheduler for DdpmScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let ts = ddpm_timesteps(
            self.config.timestep_spacing,
            self.config.num_train_timesteps,
            num_inference_steps,
            self.config.steps_offset,
        )?;
        self.steps = ts
            .iter()
            .enumerate()
            .map(|(i, &t)| self.coefficients(t, ts.get(i + 1).copied().unwrap_or(-1)))
            .collect();
        self.timesteps = ts;
        Ok(())
    }

    fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        Ok(self.step_full(model_output, timestep, sample, noise)?.prev_sample)
    }
}
