//! Karlo's sampler (diffusers' `UnCLIPScheduler`): DDPM with its own timestep rounding and
//! betas recomputed for the skipped steps.

use crate::config::{PredictionType, VarianceType};
use crate::schedule::{BetaSchedule, NoiseSchedule};
use crate::step::{StepOutput, index_of, split_output};
use crate::{Error, NoiseSource, Result, Scheduler};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::Tensor;

/// diffusers' `UnCLIPScheduler` config (`scheduler_config.json`; unknown keys ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UnCLIPSchedulerConfig {
    pub num_train_timesteps: usize,
    /// `fixed_small_log` or `learned_range`.
    pub variance_type: VarianceType,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    /// `epsilon`, `sample`, or `v_prediction` (an extension: diffusers' UnCLIPScheduler accepts
    /// only the first two; the embedded model's decoder predicts v).
    pub prediction_type: PredictionType,
    /// Only `squaredcos_cap_v2`.
    pub beta_schedule: BetaSchedule,
}

impl Default for UnCLIPSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            variance_type: VarianceType::FixedSmallLog,
            clip_sample: true,
            clip_sample_range: 1.0,
            prediction_type: PredictionType::Epsilon,
            beta_schedule: BetaSchedule::SquaredcosCapV2,
        }
    }
}

impl UnCLIPSchedulerConfig {
    /// Karlo's prior scheduler: predicts x0, fixed_small_log, clip ±5.
    pub fn karlo_prior() -> Self {
        Self { prediction_type: PredictionType::Sample, clip_sample_range: 5.0, ..Self::default() }
    }

    /// Karlo's decoder scheduler: epsilon with learned_range variance, clip ±1.
    pub fn karlo_decoder() -> Self {
        Self { variance_type: VarianceType::LearnedRange, ..Self::default() }
    }

    /// Karlo's super-resolution scheduler: epsilon, fixed_small_log, clip ±1.
    pub fn karlo_super_res() -> Self {
        Self::default()
    }

    /// Reads a diffusers `scheduler_config.json` (unknown keys ignored, missing ones default).
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::from_config::read_config(path)
    }

    fn validate(&self) -> Result<()> {
        if self.beta_schedule != BetaSchedule::SquaredcosCapV2 {
            return Err(Error::Config(
                "UnCLIPScheduler only supports beta_schedule squaredcos_cap_v2".into(),
            ));
        }
        if !matches!(self.variance_type, VarianceType::FixedSmallLog | VarianceType::LearnedRange) {
            return Err(Error::Config(format!(
                "UnCLIPScheduler supports variance_type fixed_small_log or learned_range, not {:?}",
                self.variance_type
            )));
        }
        if !(self.clip_sample_range.is_finite() && self.clip_sample_range > 0.0) {
            return Err(Error::Config(format!(
                "clip_sample_range must be positive, got {}",
                self.clip_sample_range
            )));
        }
        Ok(())
    }
}

/// The f32 scalars of one step from `t` to `prev`, computed in the order diffusers computes
/// them on 0-d f32 tensors, kept as f64 (exact) for the tensor ops.
#[derive(Debug, Clone, Copy)]
struct Coefficients {
    t: i64,
    sqrt_alpha_prod: f64,
    sqrt_beta_prod: f64,
    x0_coeff: f64,
    sample_coeff: f64,
    /// fixed_small_log: the standard deviation.
    std: f64,
    /// learned_range: log β̃ and log β.
    min_log: f64,
    max_log: f64,
}

/// Karlo's sampler. Construct with a config, call `set_timesteps`, then `step`.
#[derive(Debug, Clone)]
pub struct UnCLIPScheduler {
    config: UnCLIPSchedulerConfig,
    schedule: NoiseSchedule,
    timesteps: Vec<i64>,
    steps: Vec<Coefficients>,
}

impl UnCLIPScheduler {
    /// A scheduler for `config` (validated).
    pub fn new(config: UnCLIPSchedulerConfig) -> Result<Self> {
        config.validate()?;
        let schedule = NoiseSchedule::new(
            BetaSchedule::SquaredcosCapV2,
            config.num_train_timesteps,
            1e-4,
            0.02,
        )?;
        Ok(Self { config, schedule, timesteps: Vec::new(), steps: Vec::new() })
    }

    /// The config it was built with.
    pub fn config(&self) -> &UnCLIPSchedulerConfig {
        &self.config
    }

    /// Its noise schedule (for `add_noise` and training targets).
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// Karlo's spacing: `round_half_even(i·(T−1)/(n−1))`, reversed; always 999 … 0.
    pub fn spaced_timesteps(num_train_timesteps: usize, n: usize) -> Result<Vec<i64>> {
        if n == 0 {
            return Err(Error::Steps { steps: n, reason: "at least one step is needed".into() });
        }
        if n == 1 {
            return Err(Error::Steps {
                steps: n,
                reason: "UnCLIPScheduler needs at least 2 steps (its spacing divides by n-1)"
                    .into(),
            });
        }
        if n > num_train_timesteps {
            return Err(Error::Steps {
                steps: n,
                reason: format!("more than the {num_train_timesteps} training timesteps"),
            });
        }
        let ratio = (num_train_timesteps - 1) as f64 / (n - 1) as f64;
        Ok((0..n).rev().map(|i| (i as f64 * ratio).round_ties_even() as i64).collect())
    }

    fn coefficients(&self, t: i64, prev: i64) -> Coefficients {
        let ac = self.schedule.alphas_cumprod();
        let alpha_prod_t = ac[t as usize];
        let alpha_prod_prev = if prev >= 0 { ac[prev as usize] } else { 1.0f32 };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_prev = 1.0 - alpha_prod_prev;
        let (beta, alpha) = if prev == t - 1 {
            (self.schedule.betas()[t as usize], self.schedule.alphas()[t as usize])
        } else {
            let beta = 1.0 - alpha_prod_t / alpha_prod_prev;
            (beta, 1.0 - beta)
        };
        let variance = beta_prod_prev / beta_prod_t * beta;
        Coefficients {
            t,
            sqrt_alpha_prod: alpha_prod_t.sqrt() as f64,
            sqrt_beta_prod: beta_prod_t.sqrt() as f64,
            x0_coeff: (alpha_prod_prev.sqrt() * beta / beta_prod_t) as f64,
            sample_coeff: (alpha.sqrt() * beta_prod_prev / beta_prod_t) as f64,
            std: (0.5 * variance.max(1e-20).ln()).exp() as f64,
            min_log: variance.ln() as f64,
            max_log: beta.ln() as f64,
        }
    }

    /// One step from `timestep` to `prev_timestep` (diffusers' explicit form; `None` means
    /// `timestep − 1`), returning x_{prev} and the x0 estimate. Both timesteps may be any in 0..T.
    pub fn step_to(
        &self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
        prev_timestep: Option<i64>,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let big_t = self.config.num_train_timesteps as i64;
        if !(0..big_t).contains(&timestep) {
            return Err(Error::TimestepNotInSchedule(timestep));
        }
        let prev = prev_timestep.unwrap_or(timestep - 1);
        if prev >= timestep || prev >= big_t || prev < -1 {
            return Err(Error::InvalidInput(format!(
                "previous timestep {prev} must lie in -1..{timestep}"
            )));
        }
        let c = self.coefficients(timestep, prev);
        self.apply(&c, model_output, sample, noise)
    }

    /// [`Scheduler::step`] that also returns the x0 estimate.
    pub fn step_full(
        &self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let i = index_of(&self.timesteps, timestep)?;
        self.apply(&self.steps[i], model_output, sample, noise)
    }

    fn apply(
        &self,
        c: &Coefficients,
        model_output: &Tensor,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let learned = self.config.variance_type == VarianceType::LearnedRange;
        let (out, predicted_variance) = split_output(model_output, sample, learned)?;
        let _guard = tch::no_grad_guard();
        let mut x0 = match self.config.prediction_type {
            PredictionType::Epsilon => (sample - &out * c.sqrt_beta_prod) / c.sqrt_alpha_prod,
            PredictionType::Sample => out.shallow_clone(),
            PredictionType::VPrediction => sample * c.sqrt_alpha_prod - &out * c.sqrt_beta_prod,
        };
        if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            x0 = x0.clamp(-r, r);
        }
        let mut prev = &x0 * c.x0_coeff + sample * c.sample_coeff;
        if c.t > 0 {
            let z = noise.randn(&out.size(), out.kind(), out.device());
            let scaled = match predicted_variance {
                Some(v) => {
                    let frac = (v + 1.0) / 2.0;
                    let log_var = &frac * c.max_log + (1.0f64 - frac) * c.min_log;
                    (log_var * 0.5).exp() * z
                }
                None => z * c.std,
            };
            prev += scaled;
        }
        Ok(StepOutput { prev_sample: prev, pred_original_sample: x0 })
    }
}

impl Scheduler for UnCLIPScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let ts = Self::spaced_timesteps(self.config.num_train_timesteps, num_inference_steps)?;
        // The pipeline passes the next timestep as prev_timestep, and None (t − 1) on the last.
        self.steps = ts
            .iter()
            .enumerate()
            .map(|(i, &t)| self.coefficients(t, ts.get(i + 1).copied().unwrap_or(t - 1)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn karlo_timesteps_round_half_to_even() {
        // Lists quoted in the reference spec (section 2), produced by diffusers.
        let t25 = UnCLIPScheduler::spaced_timesteps(1000, 25).unwrap();
        assert_eq!(
            t25,
            [
                999, 957, 916, 874, 832, 791, 749, 708, 666, 624, 583, 541, 500, 458, 416, 375,
                333, 291, 250, 208, 166, 125, 83, 42, 0
            ]
        );
        assert_eq!(
            UnCLIPScheduler::spaced_timesteps(1000, 7).unwrap(),
            [999, 832, 666, 500, 333, 166, 0]
        );
        assert_eq!(UnCLIPScheduler::spaced_timesteps(1000, 2).unwrap(), [999, 0]);
    }

    #[test]
    fn v_prediction_recovers_x0_like_epsilon() {
        // The same noised sample, scored by an oracle of each kind: both steps must agree.
        let schedule = crate::NoiseSchedule::karlo();
        let x0 = Tensor::rand([1, 3, 4, 4], (tch::Kind::Float, tch::Device::Cpu)) * 2.0 - 1.0;
        let noise = Tensor::randn([1, 3, 4, 4], (tch::Kind::Float, tch::Device::Cpu));
        let t = 832;
        let tt = Tensor::from_slice(&[t]);
        let x_t = schedule.add_noise(&x0, &noise, &tt).unwrap();
        let mut out = Vec::new();
        for (pred, oracle) in [
            (PredictionType::Epsilon, noise.shallow_clone()),
            (PredictionType::VPrediction, schedule.velocity(&x0, &noise, &tt).unwrap()),
        ] {
            let cfg = UnCLIPSchedulerConfig { prediction_type: pred, ..Default::default() };
            let mut s = UnCLIPScheduler::new(cfg).unwrap();
            s.set_timesteps(7).unwrap();
            let step = s.step_full(&oracle, t, &x_t, &mut crate::TorchNoise::new(1)).unwrap();
            out.push(step);
        }
        let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        assert!(diff(&out[1].pred_original_sample, &x0.clamp(-1.0, 1.0)) < 1e-5);
        assert!(diff(&out[0].pred_original_sample, &out[1].pred_original_sample) < 1e-5);
        assert!(diff(&out[0].prev_sample, &out[1].prev_sample) < 1e-5);
    }

    #[test]
    fn clear_errors() {
        let mut s = UnCLIPScheduler::new(UnCLIPSchedulerConfig::karlo_decoder()).unwrap();
        assert!(matches!(s.set_timesteps(0), Err(Error::Steps { .. })));
        assert!(matches!(s.set_timesteps(1001), Err(Error::Steps { .. })));
        let x = Tensor::zeros([1, 3, 2, 2], (tch::Kind::Float, tch::Device::Cpu));
        let mut n = crate::TorchNoise::new(0);
        assert!(matches!(s.step(&x, 999, &x, &mut n), Err(Error::NotInitialized)));
        s.set_timesteps(2).unwrap();
        assert!(matches!(s.step(&x, 500, &x, &mut n), Err(Error::TimestepNotInSchedule(500))));
        assert!(matches!(s.step(&x, 999, &x, &mut n), Err(Error::Shape { .. })));
        let bad =
            UnCLIPSchedulerConfig { beta_schedule: BetaSchedule::Linear, ..Default::default() };
        assert!(matches!(UnCLIPScheduler::new(bad), Err(Error::Config(_))));
        let bad =
            UnCLIPSchedulerConfig { variance_type: VarianceType::FixedLarge, ..Default::default() };
        assert!(matches!(UnCLIPScheduler::new(bad), Err(Error::Config(_))));
    }

    #[test]
    fn reads_diffusers_config_json() {
        let json = r#"{"_class_name": "UnCLIPScheduler", "_diffusers_version": "0.17.0",
            "clip_sample": true, "clip_sample_range": 5.0, "num_train_timesteps": 1000,
            "prediction_type": "sample", "variance_type": "fixed_small_log"}"#;
        let c: UnCLIPSchedulerConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c, UnCLIPSchedulerConfig::karlo_prior());
        let c: UnCLIPSchedulerConfig =
            serde_json::from_str(r#"{"variance_type": "learned_range"}"#).unwrap();
        assert_eq!(c, UnCLIPSchedulerConfig::karlo_decoder());
    }
}
