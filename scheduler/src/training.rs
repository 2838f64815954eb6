//! Training losses: the simple MSE and the variational-bound term that teaches a
//! `learned_range` model its variance (improved DDPM §3.1, used by GLIDE and Karlo's decoder).
//!
//! The VLB term of one sample at timestep t is, in bits per dimension,
//! - t > 0: KL(q(x_{t−1} | x_t, x0) ‖ p(x_{t−1} | x_t)),
//! - t = 0: −log p(x0 | x_1) under a Gaussian discretized to 256 bins on [−1, 1].
//!
//! The model mean is computed from the prediction with its gradient stopped, so the VLB term
//! trains only the variance channels and L_simple trains the mean.

use crate::config::PredictionType;
use crate::schedule::NoiseSchedule;
use crate::step::split_output;
use crate::{Error, Result};
use tch::{Kind, Tensor};

/// The λ of improved DDPM's L_hybrid = L_simple + λ·L_vlb.
pub const HYBRID_VLB_WEIGHT: f64 = 0.001;

/// Per-timestep tables of the true posterior q(x_{t−1} | x_t, x0), in f64 (as improved DDPM).
#[derive(Debug)]
pub struct VlbLoss {
    num_train_timesteps: usize,
    /// [T] each: posterior mean coefficients of x0 and x_t, clipped posterior log-variance,
    /// log β, sqrt(1/ᾱ), sqrt(1/ᾱ − 1), sqrt(ᾱ), sqrt(1 − ᾱ).
    tables: Tensor,
}

const COEF_X0: i64 = 0;
const COEF_XT: i64 = 1;
const LOG_VAR_MIN: i64 = 2;
const LOG_VAR_MAX: i64 = 3;
const SQRT_RECIP_AC: i64 = 4;
const SQRT_RECIPM1_AC: i64 = 5;
const SQRT_AC: i64 = 6;
const SQRT_1M_AC: i64 = 7;

/// The three numbers a hybrid-loss step reports (each a 0-d tensor).
#[derive(Debug)]
pub struct HybridLoss {
    /// `mse + weight · T · mean(vb)`: the quantity to backpropagate.
    pub loss: Tensor,
    /// L_simple: mean squared error of the prediction channels against the target.
    pub mse: Tensor,
    /// Mean VLB term over the batch, in bits per dimension.
    pub vb: Tensor,
}

impl VlbLoss {
    /// Tables for `schedule` (betas read as f64, ᾱ re-accumulated in f64).
    pub fn new(schedule: &NoiseSchedule) -> Self {
        let betas: Vec<f64> = schedule.betas().iter().map(|&b| b as f64).collect();
        let n = betas.len();
        let mut ac = Vec::with_capacity(n);
        let mut acc = 1.0f64;
        for b in &betas {
            acc *= 1.0 - b;
            ac.push(acc);
        }
        let ac_prev = |t: usize| if t == 0 { 1.0 } else { ac[t - 1] };
        let post_var: Vec<f64> =
            (0..n).map(|t| betas[t] * (1.0 - ac_prev(t)) / (1.0 - ac[t])).collect();
        let mut rows: Vec<Vec<f64>> = (0..8).map(|_| Vec::with_capacity(n)).collect();
        for t in 0..n {
            let (a, ap, b) = (ac[t], ac_prev(t), betas[t]);
            rows[COEF_X0 as usize].push(b * ap.sqrt() / (1.0 - a));
            rows[COEF_XT as usize].push((1.0 - ap) * (1.0 - b).sqrt() / (1.0 - a));
            // β̃_0 = 0: use β̃_1 there, as improved DDPM does.
            let clipped = if t == 0 && n > 1 { post_var[1] } else { post_var[t] };
            rows[LOG_VAR_MIN as usize].push(clipped.max(1e-20).ln());
            rows[LOG_VAR_MAX as usize].push(b.ln());
            rows[SQRT_RECIP_AC as usize].push((1.0 / a).sqrt());
            rows[SQRT_RECIPM1_AC as usize].push((1.0 / a - 1.0).sqrt());
            rows[SQRT_AC as usize].push(a.sqrt());
            rows[SQRT_1M_AC as usize].push((1.0 - a).sqrt());
        }
        let flat: Vec<f64> = rows.concat();
        let tables = Tensor::from_slice(&flat).view([8, n as i64]);
        Self { num_train_timesteps: n, tables }
    }

    /// Every table at `t` in one transfer and one gather: [8, B] in `like`'s kind and device.
    fn gather(&self, t: &Tensor, like: &Tensor) -> Tensor {
        self.tables.to_device(like.device()).index_select(1, t).to_kind(like.kind())
    }

    /// The VLB term per batch item (shape `[B]`, bits per dimension, in `model_output`'s kind;
    /// computed in f64).
    ///
    /// `model_output` has 2C channels: the prediction (of `prediction` type) then the
    /// `learned_range` channels v ∈ [−1, 1]; `x0` is the clean sample, `x_t` its noised version
    /// at timesteps `t` (int, `[B]`).
    pub fn vb_bits(
        &self,
        model_output: &Tensor,
        prediction: PredictionType,
        x0: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
    ) -> Result<Tensor> {
        if x0.size() != x_t.size() {
            return Err(Error::Shape {
                what: "x_t vs x0".into(),
                expected: x0.size(),
                found: x_t.size(),
            });
        }
        let schedule_len = self.num_train_timesteps;
        let t = check_t(t, x_t, schedule_len)?;
        let (pred, v) = split_output(model_output, x_t, true)?;
        // In f64: at t = 0 the bin probabilities of a narrow Gaussian cancel badly in f32.
        let out_kind = model_output.kind();
        let f64 = |x: &Tensor| x.to_kind(Kind::Double);
        let (x0, x_t) = (&f64(x0), &f64(x_t));
        let v = v.ok_or_else(|| Error::Shape {
            what: "model output with learned variance".into(),
            expected: x_t.size(),
            found: model_output.size(),
        })?;
        let v = f64(&v);
        let pred = f64(&pred.detach());
        let at_t = self.gather(&t, x_t);
        let mut bshape = vec![-1i64];
        bshape.resize(x_t.dim(), 1);
        let take = |row: i64| at_t.get(row).reshape(&bshape);

        let pred_x0 = match prediction {
            PredictionType::Epsilon => take(SQRT_RECIP_AC) * x_t - take(SQRT_RECIPM1_AC) * &pred,
            PredictionType::Sample => pred,
            PredictionType::VPrediction => take(SQRT_AC) * x_t - take(SQRT_1M_AC) * &pred,
        };
        let c0 = take(COEF_X0);
        let ct = take(COEF_XT);
        let true_mean = &c0 * x0 + &ct * x_t;
        let model_mean = c0 * pred_x0 + ct * x_t;
        let min_log = take(LOG_VAR_MIN);
        let max_log = take(LOG_VAR_MAX);
        let frac = (v + 1.0) / 2.0;
        let model_log_var = &frac * max_log + (1.0f64 - &frac) * &min_log;

        let reduce: Vec<i64> = (1..x_t.dim() as i64).collect();
        let ln2 = std::f64::consts::LN_2;
        let kl = normal_kl(&true_mean, &min_log, &model_mean, &model_log_var).mean_dim(
            reduce.as_slice(),
            false,
            None,
        ) / ln2;
        let nll = -discretized_gaussian_log_likelihood(x0, &model_mean, &(model_log_var * 0.5))
            .mean_dim(reduce.as_slice(), false, None)
            / ln2;
        Ok(nll.where_self(&t.eq(0), &kl).to_kind(out_kind))
    }

    /// L_hybrid = L_simple + `vlb_weight`·L_vlb, with L_vlb = T·`E_t[L_t]` estimated by uniformly
    /// sampled t (so the VLB term is weighted `vlb_weight·T`; 1 for T = 1000 and
    /// [`HYBRID_VLB_WEIGHT`], as improved DDPM's rescaled MSE). `target` is what the
    /// prediction channels should output ([`NoiseSchedule::target`]).
    #[allow(clippy::too_many_arguments)]
    pub fn hybrid_loss(
        &self,
        model_output: &Tensor,
        prediction: PredictionType,
        target: &Tensor,
        x0: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
        vlb_weight: f64,
    ) -> Result<HybridLoss> {
        if !vlb_weight.is_finite() || vlb_weight < 0.0 {
            return Err(Error::InvalidInput(format!("vlb_weight must be >= 0, got {vlb_weight}")));
        }
        if target.size() != x_t.size() {
            return Err(Error::Shape {
                what: "target vs x_t".into(),
                expected: x_t.size(),
                found: target.size(),
            });
        }
        let vb = self.vb_bits(model_output, prediction, x0, x_t, t)?.mean(None);
        let c = x_t.size()[1];
        let pred = model_output.narrow(1, 0, c);
        let mse = (pred - target).square().mean(None);
        let loss = &mse + &vb * (vlb_weight * self.num_train_timesteps as f64);
        Ok(HybridLoss { loss, mse, vb })
    }
}

fn check_t(t: &Tensor, x: &Tensor, n: usize) -> Result<Tensor> {
    if t.dim() != 1 || t.size()[0] != x.size()[0] {
        return Err(Error::Shape {
            what: "timesteps (one per batch item)".into(),
            expected: vec![x.size()[0]],
            found: t.size(),
        });
    }
    if t.is_floating_point() {
        return Err(Error::InvalidInput("timesteps must be an integer tensor".into()));
    }
    let t = t.to_kind(Kind::Int64);
    let (lo, hi) = (t.min().int64_value(&[]), t.max().int64_value(&[]));
    if lo < 0 || hi >= n as i64 {
        return Err(Error::InvalidInput(format!("timesteps must lie in 0..{n}, got {lo}..={hi}")));
    }
    Ok(t.to_device(x.device()))
}

/// KL(N(m1, e^lv1) ‖ N(m2, e^lv2)) elementwise, in nats.
pub fn normal_kl(mean1: &Tensor, logvar1: &Tensor, mean2: &Tensor, logvar2: &Tensor) -> Tensor {
    ((logvar2 - logvar1) + (logvar1 - logvar2).exp() + (mean1 - mean2).square() * (-logvar2).exp()
        - 1.0)
        * 0.5
}

/// Φ(x) by the tanh approximation GLIDE and improved DDPM use.
fn approx_standard_normal_cdf(x: &Tensor) -> Tensor {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    ((x + x.pow_tensor_scalar(3) * 0.044715) * k).tanh().g_add_scalar(1.0) * 0.5
}

/// log p(x) of images `x` in [−1, 1] quantized to 256 levels under N(means, e^{2·log_scales}),
/// elementwise, in nats; the edge bins take the whole tails.
pub fn discretized_gaussian_log_likelihood(
    x: &Tensor,
    means: &Tensor,
    log_scales: &Tensor,
) -> Tensor {
    let centered = x - means;
    let inv_std = (-log_scales).exp();
    let cdf_plus = approx_standard_normal_cdf(&(&inv_std * (&centered + 1.0 / 255.0)));
    let cdf_min = approx_standard_normal_cdf(&(&inv_std * (&centered - 1.0 / 255.0)));
    let log_cdf_plus = cdf_plus.clamp_min(1e-12).log();
    let log_one_minus_cdf_min = (1.0f64 - &cdf_min).clamp_min(1e-12).log();
    let log_delta = (cdf_plus - cdf_min).clamp_min(1e-12).log();
    let upper = log_one_minus_cdf_min.where_self(&x.gt(0.999), &log_delta);
    log_cdf_plus.where_self(&x.lt(-0.999), &upper)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn kl_is_zero_for_equal_gaussians_and_positive_otherwise() {
        let m = Tensor::from_slice(&[0.3f64, -1.0]);
        let lv = Tensor::from_slice(&[-2.0f64, 0.5]);
        assert!(normal_kl(&m, &lv, &m, &lv).abs().max().double_value(&[]) < 1e-15);
        let kl = normal_kl(&m, &lv, &(&m + 0.1), &(&lv + 0.2));
        assert!(kl.min().double_value(&[]) > 0.0);
    }

    #[test]
    fn discretized_likelihood_sums_to_one_over_bins() {
        // The 256 bin probabilities of one Gaussian must sum to 1 (edge bins take the tails).
        let x = Tensor::linspace(-1.0, 1.0, 256, (Kind::Double, Device::Cpu));
        let means = Tensor::full([256], 0.1, (Kind::Double, Device::Cpu));
        let ls = Tensor::full([256], -1.5, (Kind::Double, Device::Cpu));
        let p = discretized_gaussian_log_likelihood(&x, &means, &ls).exp().sum(None);
        assert!((p.double_value(&[]) - 1.0).abs() < 1e-9);
    }
}
