//! The forward process: beta schedules, ᾱ, noising, and the training targets.

use crate::config::PredictionType;
use crate::{Error, NoiseSource, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// The beta schedules of diffusers' `beta_schedule` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end, T)` in f32.
    #[default]
    #[serde(rename = "linear")]
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end), T)²` in f32 (Stable Diffusion).
    #[serde(rename = "scaled_linear")]
    ScaledLinear,
    /// Improved DDPM's cosine ᾱ(t) = cos²((t+0.008)/1.008·π/2), betas capped at 0.999,
    /// computed in f64 then cast to f32 (Karlo, GLIDE).
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
    /// `sigmoid(linspace(-6, 6, T))·(beta_end − beta_start) + beta_start` in f32.
    #[serde(rename = "sigmoid")]
    Sigmoid,
}

/// Betas, alphas and ᾱ (`alphas_cumprod`) of a discrete diffusion, in f32 as diffusers keeps
/// them. Immutable; samplers precompute their per-step coefficients from it.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    betas: Vec<f32>,
    alphas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
}

/// The cosine ᾱ(t) of improved DDPM, in f64.
fn cosine_alpha_bar(t: f64) -> f64 {
    ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2)
}

/// Most training timesteps a schedule may have: real models use 1000, and each step costs a few
/// table entries, so a config asking for 10^12 is refused instead of aborting on allocation.
pub const MAX_TRAIN_TIMESTEPS: usize = 1 << 20;

impl NoiseSchedule {
    /// The schedule `kind` with `num_train_timesteps` steps. `beta_start`/`beta_end` are used by
    /// the linear, scaled-linear and sigmoid schedules (diffusers' defaults: 1e-4 and 0.02).
    pub fn new(
        kind: BetaSchedule,
        num_train_timesteps: usize,
        beta_start: f64,
        beta_end: f64,
    ) -> Result<Self> {
        let n = num_train_timesteps;
        if n == 0 {
            return Err(Error::Config("num_train_timesteps must be at least 1".into()));
        }
        if n > MAX_TRAIN_TIMESTEPS {
            return Err(Error::Config(format!(
                "num_train_timesteps = {n} is more than {MAX_TRAIN_TIMESTEPS} (real models use 1000; \
                 the schedule's tables would take {} bytes)",
                n.saturating_mul(8 * 8)
            )));
        }
        if !(beta_start.is_finite() && beta_end.is_finite()) {
            return Err(Error::Config(format!(
                "beta_start {beta_start} and beta_end {beta_end} must be finite"
            )));
        }
        let cpu = (Kind::Float, Device::Cpu);
        // The f32 schedules go through libtorch's own linspace so they equal torch's bit for bit.
        let betas: Vec<f32> = match kind {
            BetaSchedule::Linear => to_vec(&Tensor::linspace(beta_start, beta_end, n as i64, cpu))?,
            BetaSchedule::ScaledLinear => to_vec(
                &Tensor::linspace(beta_start.sqrt(), beta_end.sqrt(), n as i64, cpu).square(),
            )?,
            BetaSchedule::Sigmoid => to_vec(
                &(Tensor::linspace(-6.0, 6.0, n as i64, cpu).sigmoid() * (beta_end - beta_start)
                    + beta_start),
            )?,
            BetaSchedule::SquaredcosCapV2 => (0..n)
                .map(|i| {
                    let t1 = i as f64 / n as f64;
                    let t2 = (i + 1) as f64 / n as f64;
                    (1.0 - cosine_alpha_bar(t2) / cosine_alpha_bar(t1)).min(0.999) as f32
                })
                .collect(),
        };
        Self::from_betas(betas)
    }

    /// Karlo's schedule: cosine, T = 1000.
    pub fn karlo() -> Self {
        Self::new(BetaSchedule::SquaredcosCapV2, 1000, 1e-4, 0.02)
            .expect("the cosine schedule is valid")
    }

    /// A schedule from explicit betas (diffusers' `trained_betas`); each must lie in (0, 1).
    pub fn from_betas(betas: Vec<f32>) -> Result<Self> {
        if betas.is_empty() {
            return Err(Error::Config("the beta schedule is empty".into()));
        }
        if let Some((i, b)) = betas.iter().enumerate().find(|(_, b)| !(**b > 0.0 && **b < 1.0)) {
            return Err(Error::Config(format!("beta[{i}] = {b} is outside (0, 1)")));
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        // torch.cumprod on the CPU accumulates in f64; each prefix product is cast to f32.
        let mut acc = 1.0f64;
        let alphas_cumprod = alphas
            .iter()
            .map(|&a| {
                acc *= a as f64;
                acc as f32
            })
            .collect();
        Ok(Self { betas, alphas, alphas_cumprod })
    }

    /// T, the number of training timesteps.
    pub fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// β_t for t in 0..T.
    pub fn betas(&self) -> &[f32] {
        &self.betas
    }

    /// α_t = 1 − β_t.
    pub fn alphas(&self) -> &[f32] {
        &self.alphas
    }

    /// ᾱ_t = ∏_{s≤t} α_s.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// ᾱ as a tensor of `kind` on `device` (one small host-to-device copy).
    pub fn alphas_cumprod_tensor(&self, kind: Kind, device: Device) -> Tensor {
        Tensor::from_slice(&self.alphas_cumprod).to_device(device).to_kind(kind)
    }

    /// Checks a batch of timesteps against the schedule and `x`'s batch; returns sqrt(ᾱ_t) and
    /// sqrt(1 − ᾱ_t) shaped to broadcast over `x`, in `x`'s kind (as diffusers' `add_noise`).
    fn coefficients(&self, x: &Tensor, t: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = self.check_timesteps(x, t)?;
        let ac = self.alphas_cumprod_tensor(x.kind(), x.device()).f_index_select(0, &t)?;
        let mut shape = vec![-1i64];
        shape.resize(x.dim(), 1);
        let sqrt_ac = ac.sqrt().reshape(&shape);
        let sqrt_1m = (1.0f64 - ac).sqrt().reshape(&shape);
        Ok((sqrt_ac, sqrt_1m))
    }

    /// Validates `t` (integer, 0-d or 1-d with one entry per batch item or a single entry, all in
    /// 0..T) and returns it flattened as int64 on `x`'s device. Reads the range on the host.
    pub(crate) fn check_timesteps(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        if !matches!(t.kind(), Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8) {
            return Err(Error::InvalidInput(format!(
                "timesteps must be an integer tensor, got {:?}",
                t.kind()
            )));
        }
        if t.dim() > 1 || x.dim() == 0 {
            return Err(Error::InvalidInput(format!(
                "timesteps must be 0-d or 1-d and the sample batched, got timesteps {:?}, sample {:?}",
                t.size(),
                x.size()
            )));
        }
        let t = t.flatten(0, -1).to_kind(Kind::Int64);
        let n = t.size()[0];
        let batch = x.size()[0];
        if n != batch && n != 1 {
            return Err(Error::Shape {
                what: "timesteps (one per batch item)".into(),
                expected: vec![batch],
                found: vec![n],
            });
        }
        if n == 0 {
            return Ok(t.to_device(x.device()));
        }
        let lo = t.min().int64_value(&[]);
        let hi = t.max().int64_value(&[]);
        let big_t = self.num_train_timesteps() as i64;
        if lo < 0 || hi >= big_t {
            let bad = if lo < 0 { lo } else { hi };
            return Err(Error::InvalidInput(format!(
                "timestep {bad} is outside the training range 0..{big_t}"
            )));
        }
        Ok(t.to_device(x.device()))
    }

    fn check_pair(what: &str, a: &Tensor, b: &Tensor) -> Result<()> {
        if a.size() != b.size() {
            return Err(Error::Shape { what: what.into(), expected: a.size(), found: b.size() });
        }
        if a.device() != b.device() {
            return Err(Error::InvalidInput(format!(
                "{what}: tensors on different devices ({:?}, {:?})",
                a.device(),
                b.device()
            )));
        }
        Ok(())
    }

    /// The forward process q(x_t | x0): sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·noise, per batch item.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Result<Tensor> {
        Self::check_pair("noise vs x0", x0, noise)?;
        let (a, s) = self.coefficients(x0, t)?;
        Ok(a * x0 + s * noise)
    }

    /// The v-prediction target sqrt(ᾱ_t)·noise − sqrt(1−ᾱ_t)·x0 (diffusers' `get_velocity`).
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Result<Tensor> {
        Self::check_pair("noise vs x0", x0, noise)?;
        let (a, s) = self.coefficients(x0, t)?;
        Ok(a * noise - s * x0)
    }

    /// What a model of `prediction` type should output for x_t = add_noise(x0, noise, t).
    pub fn target(
        &self,
        prediction: PredictionType,
        x0: &Tensor,
        noise: &Tensor,
        t: &Tensor,
    ) -> Result<Tensor> {
        Self::check_pair("noise vs x0", x0, noise)?;
        match prediction {
            PredictionType::Epsilon => Ok(noise.shallow_clone()),
            PredictionType::Sample => Ok(x0.shallow_clone()),
            PredictionType::VPrediction => self.velocity(x0, noise, t),
        }
    }

    /// `batch` training timesteps drawn uniformly from 0..T (int64, on `device`).
    pub fn sample_timesteps(
        &self,
        batch: usize,
        device: Device,
        rng: &mut dyn NoiseSource,
    ) -> Tensor {
        rng.randint(self.num_train_timesteps() as i64, &[batch as i64], device)
    }
}

/// The schedule a diffusers DDPM-family config describes (its `trained_betas` win).
pub(crate) fn from_diffusers(
    kind: BetaSchedule,
    num_train_timesteps: usize,
    beta_start: f64,
    beta_end: f64,
    trained_betas: Option<&[f64]>,
    rescale_betas_zero_snr: bool,
) -> Result<NoiseSchedule> {
    if rescale_betas_zero_snr {
        return Err(Error::Config("rescale_betas_zero_snr is not supported".into()));
    }
    match trained_betas {
        Some(b) => {
            if b.len() != num_train_timesteps {
                return Err(Error::Config(format!(
                    "trained_betas has {} entries but num_train_timesteps is {num_train_timesteps}",
                    b.len()
                )));
            }
            NoiseSchedule::from_betas(b.iter().map(|&x| x as f32).collect())
        }
        None => NoiseSchedule::new(kind, num_train_timesteps, beta_start, beta_end),
    }
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(t)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn karlo_cosine_matches_spec_values() {
        let s = NoiseSchedule::karlo();
        // Values quoted in the reference spec (section 2), computed by diffusers.
        assert_eq!(s.betas()[0], 4.1284224e-05);
        assert!((s.alphas_cumprod()[0] - 0.9999587).abs() < 1e-7);
        assert!((s.alphas_cumprod()[999] / 2.4287e-09 - 1.0).abs() < 1e-4);
    }

    #[test]
    fn rejects_bad_betas() {
        assert!(matches!(NoiseSchedule::from_betas(vec![0.1, 1.0]), Err(Error::Config(_))));
        assert!(matches!(NoiseSchedule::from_betas(vec![]), Err(Error::Config(_))));
        assert!(NoiseSchedule::new(BetaSchedule::Linear, 10, 0.0, 0.02).is_err());
        assert!(NoiseSchedule::new(BetaSchedule::Linear, 0, 1e-4, 0.02).is_err());
        assert!(NoiseSchedule::new(BetaSchedule::Linear, 10, f64::NAN, 0.02).is_err());
    }

    #[test]
    fn sampled_timesteps_are_uniform_over_the_schedule() {
        let s = NoiseSchedule::new(BetaSchedule::Linear, 10, 1e-4, 0.02).unwrap();
        let t = {
            let _lock = crate::global_rng_lock();
            s.sample_timesteps(100_000, Device::Cpu, &mut crate::TorchNoise::new(1))
        };
        assert_eq!((t.size(), t.kind()), (vec![100_000], Kind::Int64));
        let counts = Vec::<i64>::try_from(t.bincount(None::<Tensor>, 10)).unwrap();
        // Each bin expects 10 000 (sd 95); 600 is over 6 sd.
        assert!(counts.iter().all(|&c| (c - 10_000).abs() < 600), "{counts:?}");
    }

    #[test]
    fn add_noise_checks_inputs() {
        let s = NoiseSchedule::karlo();
        let x = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[0i64, 1000]);
        assert!(matches!(s.add_noise(&x, &x, &t), Err(Error::InvalidInput(_))));
        let t = Tensor::from_slice(&[0i64, 1, 2]);
        assert!(matches!(s.add_noise(&x, &x, &t), Err(Error::Shape { .. })));
        let t = Tensor::from_slice(&[0.5f32, 1.0]);
        assert!(s.add_noise(&x, &x, &t).is_err());
        let y = Tensor::zeros([2, 4], (Kind::Float, Device::Cpu));
        assert!(matches!(
            s.add_noise(&x, &y, &Tensor::from_slice(&[1i64])),
            Err(Error::Shape { .. })
        ));
    }
}
