//! DDIM (diffusers' `DDIMScheduler`): deterministic at eta = 0, ancestral-like at eta = 1.

use crate::config::{PredictionType, TimestepSpacing};
use crate::schedule::{BetaSchedule, NoiseSchedule, from_diffusers};
use crate::spacing::ddpm_timesteps;
use crate::step::{StepOutput, X0Clamp, index_of, split_output};
use crate::{Error, NoiseSource, Result, Scheduler};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::Tensor;

/// diffusers' `DDIMScheduler` config (`scheduler_config.json`; unknown keys ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DdimSchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub clip_sample: bool,
    /// ᾱ after the last step: 1 (true) or ᾱ_0.
    pub set_alpha_to_one: bool,
    pub steps_offset: i64,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub clip_sample_range: f64,
    pub sample_max_value: f64,
    pub timestep_spacing: TimestepSpacing,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimSchedulerConfig {
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
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

impl DdimSchedulerConfig {
    /// Reads a diffusers `scheduler_config.json` (unknown keys ignored, missing ones default).
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::from_config::read_config(path)
    }
}

/// x0 and ε from a model output, for the DDIM family (`sqrt_a` = sqrt(ᾱ_t), `sqrt_b` =
/// sqrt(1 − ᾱ_t)), in diffusers' op order.
pub(crate) fn x0_and_eps(
    prediction: PredictionType,
    out: &Tensor,
    sample: &Tensor,
    sqrt_a: f64,
    sqrt_b: f64,
) -> (Tensor, Tensor) {
    match prediction {
        PredictionType::Epsilon => ((sample - out * sqrt_b) / sqrt_a, out.shallow_clone()),
        PredictionType::Sample => ((out.shallow_clone()), (sample - out * sqrt_a) / sqrt_b),
        PredictionType::VPrediction => {
            (sample * sqrt_a - out * sqrt_b, out * sqrt_a + sample * sqrt_b)
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Coefficients {
    sqrt_alpha_prod: f64,
    sqrt_beta_prod: f64,
    sqrt_alpha_prod_prev: f64,
    direction: f64,
    std: f64,
}

/// DDIM sampler with stochasticity `eta` (0: deterministic ODE sampler).
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    config: DdimSchedulerConfig,
    schedule: NoiseSchedule,
    clamp: X0Clamp,
    eta: f64,
    use_clipped_model_output: bool,
    timesteps: Vec<i64>,
    steps: Vec<Coefficients>,
}

impl DdimScheduler {
    /// A deterministic (eta = 0) scheduler for `config` (validated).
    pub fn new(config: DdimSchedulerConfig) -> Result<Self> {
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
        Ok(Self {
            config,
            schedule,
            clamp,
            eta: 0.0,
            use_clipped_model_output: false,
            timesteps: Vec::new(),
            steps: Vec::new(),
        })
    }

    /// Sets eta (≥ 0; 1 matches DDPM's posterior variance). Takes effect at `set_timesteps`.
    pub fn with_eta(mut self, eta: f64) -> Result<Self> {
        if !(eta.is_finite() && eta >= 0.0) {
            return Err(Error::InvalidInput(format!(
                "eta must be a finite number >= 0, got {eta}"
            )));
        }
        self.eta = eta;
        if !self.timesteps.is_empty() {
            self.set_timesteps(self.timesteps.len())?;
        }
        Ok(self)
    }

    /// Recomputes ε from the clipped x0 (diffusers' `use_clipped_model_output`).
    pub fn with_clipped_model_output(mut self, yes: bool) -> Self {
        self.use_clipped_model_output = yes;
        self
    }

    /// The config it was built with.
    pub fn config(&self) -> &DdimSchedulerConfig {
        &self.config
    }

    /// Its noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    fn coefficients(&self, t: i64, prev: i64) -> Coefficients {
        let ac = self.schedule.alphas_cumprod();
        let final_ac = if self.config.set_alpha_to_one { 1.0f32 } else { ac[0] };
        let alpha_prod_t = ac[t as usize];
        let alpha_prod_prev = if prev >= 0 { ac[prev as usize] } else { final_ac };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_prev = 1.0 - alpha_prod_prev;
        let variance = beta_prod_prev / beta_prod_t * (1.0 - alpha_prod_t / alpha_prod_prev);
        let std = self.eta as f32 * variance.sqrt();
        Coefficients {
            sqrt_alpha_prod: alpha_prod_t.sqrt() as f64,
            sqrt_beta_prod: beta_prod_t.sqrt() as f64,
            sqrt_alpha_prod_prev: alpha_prod_prev.sqrt() as f64,
            direction: (1.0 - alpha_prod_prev - std * std).sqrt() as f64,
            std: std as f64,
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
        let eps = if self.use_clipped_model_output {
            (sample - &x0 * c.sqrt_alpha_prod) / c.sqrt_beta_prod
        } else {
            eps
        };
        let mut prev = &x0 * c.sqrt_alpha_prod_prev + eps * c.direction;
        if self.eta > 0.0 {
            let z = noise.randn(&out.size(), out.kind(), out.device());
            prev += z * c.std;
        }
        Ok(StepOutput { prev_sample: prev, pred_original_sample: x0 })
    }
}

impl Scheduler for DdimScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let t_train = self.config.num_train_timesteps;
        let ts = ddpm_timesteps(
            self.config.timestep_spacing,
            t_train,
            num_inference_steps,
            self.config.steps_offset,
        )?;
        // diffusers steps to t − T/n whatever the spacing.
        let stride = (t_train / num_inference_steps) as i64;
        self.steps = ts.iter().map(|&t| self.coefficients(t, t - stride)).collect();
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
