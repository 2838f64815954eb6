//! DPM-Solver++ multistep (diffusers' `DPMSolverMultistepScheduler` with algorithm
//! `dpmsolver++`): first order (= DDIM) or the 2M second-order update, midpoint or Heun.

use crate::config::{PredictionType, TimestepSpacing, VarianceType};
use crate::schedule::{BetaSchedule, NoiseSchedule, from_diffusers};
use crate::spacing::dpm_timesteps;
use crate::step::{X0Clamp, split_output};
use crate::{Error, NoiseSource, Result, Scheduler};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Kind, Tensor};

/// The second-order update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SolverType {
    #[default]
    Midpoint,
    Heun,
}

/// σ of the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmas {
    /// End at σ = 0 (the final step returns the x0 estimate).
    #[default]
    Zero,
    /// End at σ of timestep 0.
    SigmaMin,
}

/// diffusers' `DPMSolverMultistepScheduler` config (unknown keys ignored). Supported:
/// `algorithm_type` "dpmsolver++", `solver_order` 1 or 2, no Karras/exponential/beta/lu/flow
/// sigmas; anything else is a config error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DpmSolverConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub solver_order: usize,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
    pub algorithm_type: String,
    pub solver_type: SolverType,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub use_lu_lambdas: bool,
    pub use_flow_sigmas: bool,
    pub final_sigmas_type: FinalSigmas,
    /// Clips the tail of λ(t) for numerical stability (default −∞: no clipping). JSON has no
    /// −∞; a missing key or `null` means the default.
    #[serde(deserialize_with = "lambda_or_default")]
    pub lambda_min_clipped: f64,
    pub variance_type: Option<VarianceType>,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    pub rescale_betas_zero_snr: bool,
}

fn lambda_or_default<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NEG_INFINITY))
}

impl Default for DpmSolverConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            solver_order: 2,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            algorithm_type: "dpmsolver++".into(),
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            final_sigmas_type: FinalSigmas::Zero,
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

impl DpmSolverConfig {
    /// Reads a diffusers `scheduler_config.json` (unknown keys ignored, missing ones default).
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::from_config::read_config(path)
    }

    fn validate(&self) -> Result<()> {
        if self.algorithm_type != "dpmsolver++" {
            return Err(Error::Config(format!(
                "algorithm_type {:?} is not supported (only dpmsolver++)",
                self.algorithm_type
            )));
        }
        if !(1..=2).contains(&self.solver_order) {
            return Err(Error::Config(format!(
                "solver_order {} is not supported (1 or 2)",
                self.solver_order
            )));
        }
        let exotic = [
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("use_lu_lambdas", self.use_lu_lambdas),
            ("use_flow_sigmas", self.use_flow_sigmas),
        ];
        if let Some((name, _)) = exotic.iter().find(|(_, on)| *on) {
            return Err(Error::Config(format!("{name} is not supported")));
        }
        if self.lambda_min_clipped.is_nan() {
            return Err(Error::Config("lambda_min_clipped is NaN".into()));
        }
        Ok(())
    }
}

/// α_t, σ_t of a VP diffusion from σ = sqrt((1−ᾱ)/ᾱ), in f32 as diffusers.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

fn lambda(sigma: f32) -> f32 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

/// Per-step f32 scalars (kept as f64) in diffusers' op order.
#[derive(Debug, Clone, Copy)]
struct Coefficients {
    /// x0 = (x − σ·ε)/α at this step's σ (or α·x − σ·v).
    alpha: f64,
    sigma: f64,
    /// x_next = c_sample·x − c_d0·D0 [− c_d1·D1 (midpoint) | + c_d1·D1 (Heun)].
    c_sample: f64,
    c_d0: f64,
    c_d1: f64,
    /// 1/r0, the D1 scale (second order only; NaN at step 0).
    r_inv: f64,
}

/// DPM-Solver++ (2M) sampler. Keeps the previous x0 estimate between steps, so steps must be
/// taken in order; `set_timesteps` resets it.
#[derive(Debug)]
pub struct DpmSolverMultistepScheduler {
    config: DpmSolverConfig,
    schedule: NoiseSchedule,
    clamp: X0Clamp,
    timesteps: Vec<i64>,
    steps: Vec<Coefficients>,
    previous_x0: Option<Tensor>,
    lower_order_nums: usize,
    step_index: usize,
}

impl DpmSolverMultistepScheduler {
    /// A scheduler for `config` (validated).
    pub fn new(config: DpmSolverConfig) -> Result<Self> {
        config.validate()?;
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
            false,
            1.0,
        )?;
        Ok(Self {
            config,
            schedule,
            clamp,
            timesteps: Vec::new(),
            steps: Vec::new(),
            previous_x0: None,
            lower_order_nums: 0,
            step_index: 0,
        })
    }

    /// The config it was built with.
    pub fn config(&self) -> &DpmSolverConfig {
        &self.config
    }

    /// σ_t for every training timestep (f32, as diffusers).
    fn train_sigmas(&self) -> Vec<f32> {
        self.schedule.alphas_cumprod().iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
    }

    /// diffusers' last timestep T − #(λ_t < lambda_min_clipped).
    fn last_timestep(&self) -> usize {
        let t = self.config.num_train_timesteps;
        let clip = self.config.lambda_min_clipped;
        if clip == f64::NEG_INFINITY {
            return t;
        }
        let ac = self.schedule.alphas_cumprod();
        let below =
            ac.iter().filter(|&&a| ((a.sqrt().ln() - (1.0 - a).sqrt().ln()) as f64) < clip).count();
        t - below
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let ts = dpm_timesteps(
            self.config.timestep_spacing,
            self.config.num_train_timesteps,
            self.last_timestep(),
            num_inference_steps,
            self.config.steps_offset,
        )?;
        if ts.is_empty() {
            return Err(Error::Steps {
                steps: num_inference_steps,
                reason: "lambda_min_clipped leaves no timesteps".into(),
            });
        }
        let train = self.train_sigmas();
        let mut sigmas: Vec<f32> = ts.iter().map(|&t| train[t as usize]).collect();
        sigmas.push(match self.config.final_sigmas_type {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => train[0],
        });
        let heun = self.config.solver_type == SolverType::Heun;
        self.steps = (0..ts.len())
            .map(|i| {
                let (alpha, sigma) = alpha_sigma(sigmas[i]);
                let (alpha_t, sigma_t) = alpha_sigma(sigmas[i + 1]);
                let lambda_t = lambda(sigmas[i + 1]);
                let lambda_s0 = lambda(sigmas[i]);
                let h = lambda_t - lambda_s0;
                let em1 = (-h).exp() - 1.0;
                let c_d0 = alpha_t * em1;
                let (c_d1, r_inv) = if i == 0 {
                    (f32::NAN, f32::NAN)
                } else {
                    let h0 = lambda_s0 - lambda(sigmas[i - 1]);
                    let r0 = h0 / h;
                    let c = if heun { alpha_t * (em1 / h + 1.0) } else { 0.5 * (alpha_t * em1) };
                    (c, 1.0 / r0)
                };
                Coefficients {
                    alpha: alpha as f64,
                    sigma: sigma as f64,
                    c_sample: (sigma_t / sigma) as f64,
                    c_d0: c_d0 as f64,
                    c_d1: c_d1 as f64,
                    r_inv: r_inv as f64,
                }
            })
            .collect();
        self.timesteps = ts;
        self.previous_x0 = None;
        self.lower_order_nums = 0;
        self.step_index = 0;
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let n = self.timesteps.len();
        if n == 0 {
            return Err(Error::NotInitialized);
        }
        let i = self.step_index;
        if i >= n || self.timesteps[i] != timestep {
            return match self.timesteps.iter().position(|&t| t == timestep) {
                None => Err(Error::TimestepNotInSchedule(timestep)),
                Some(_) => Err(Error::InvalidInput(format!(
                    "DPM-Solver is multistep: expected timestep {:?} (step {i}), got {timestep}; \
                     call set_timesteps to start over",
                    self.timesteps.get(i)
                ))),
            };
        }
        let learned = self.config.variance_type.is_some_and(VarianceType::is_learned);
        let (out, _) = split_output(model_output, sample, learned)?;
        let _guard = tch::no_grad_guard();
        let c = self.steps[i];
        let x0 = match self.config.prediction_type {
            PredictionType::Epsilon => (sample - &out * c.sigma) / c.alpha,
            PredictionType::Sample => out.shallow_clone(),
            PredictionType::VPrediction => sample * c.alpha - &out * c.sigma,
        };
        let x0 = self.clamp.apply(x0);
        let sample32 = sample.to_kind(Kind::Float);

        let lower_order_final = i == n - 1
            && (self.config.euler_at_final
                || (self.config.lower_order_final && n < 15)
                || self.config.final_sigmas_type == FinalSigmas::Zero);
        let first_order =
            self.config.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final;
        let prev = match (&self.previous_x0, first_order) {
            (Some(m1), false) => {
                let d1 = (&x0 - m1) * c.r_inv;
                let base = sample32 * c.c_sample - &x0 * c.c_d0;
                match self.config.solver_type {
                    SolverType::Midpoint => base - d1 * c.c_d1,
                    SolverType::Heun => base + d1 * c.c_d1,
                }
            }
            _ => sample32 * c.c_sample - &x0 * c.c_d0,
        };
        if self.lower_order_nums < self.config.solver_order {
            self.lower_order_nums += 1;
        }
        self.previous_x0 = Some(x0);
        self.step_index += 1;
        Ok(prev.to_kind(model_output.kind()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TorchNoise;
    use tch::Device;

    #[test]
    fn steps_must_come_in_order_and_set_timesteps_restarts() {
        let mut s = DpmSolverMultistepScheduler::new(DpmSolverConfig::default()).unwrap();
        s.set_timesteps(5).unwrap();
        let ts = s.timesteps().to_vec();
        let x = Tensor::ones([1, 2, 3], (Kind::Float, Device::Cpu));
        let mut n = TorchNoise::unseeded();
        assert!(matches!(s.step(&x, ts[1], &x, &mut n), Err(Error::InvalidInput(_))));
        let a = s.step(&x, ts[0], &x, &mut n).unwrap();
        assert!(matches!(s.step(&x, ts[0], &x, &mut n), Err(Error::InvalidInput(_))));
        s.set_timesteps(5).unwrap();
        assert!(s.step(&x, ts[0], &x, &mut n).unwrap().equal(&a));
        let half = x.to_kind(Kind::Half);
        assert_eq!(s.step(&half, ts[1], &x, &mut n).unwrap().kind(), Kind::Half);
    }

    #[test]
    fn lambda_min_clipped_reads_null_and_cuts_the_tail() {
        let c: DpmSolverConfig = serde_json::from_str(r#"{"lambda_min_clipped": null}"#).unwrap();
        assert_eq!(c.lambda_min_clipped, f64::NEG_INFINITY);
        let cfg = DpmSolverConfig {
            lambda_min_clipped: -5.1,
            beta_schedule: BetaSchedule::SquaredcosCapV2,
            ..Default::default()
        };
        let mut s = DpmSolverMultistepScheduler::new(cfg).unwrap();
        s.set_timesteps(10).unwrap();
        assert!(s.timesteps()[0] < 999);
    }
}
