//! The sampler trait every stage samples through.

use crate::{NoiseSource, Result};
use tch::Tensor;

/// One reverse-diffusion sampler. Object safe: pipelines hold `Box<dyn Scheduler>`.
///
/// The loop a pipeline runs:
/// ```text
/// sched.set_timesteps(n)?;
/// let mut x = noise.randn(shape) * sched.init_noise_sigma();
/// for &t in sched.timesteps().to_vec().iter() {
///     let out = model(sched.scale_model_input(&x, t)?, t);
///     x = sched.step(&out, t, &x, &mut noise)?;
/// }
/// ```
pub trait Scheduler: Send {
    /// Chooses the `n` inference timesteps (and resets any multistep state).
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;

    /// The inference timesteps, in sampling order (decreasing). Empty before `set_timesteps`.
    fn timesteps(&self) -> &[i64];

    /// Number of training timesteps of the schedule (T).
    fn num_train_timesteps(&self) -> usize;

    /// Standard deviation of the initial noise (1 for all DDPM-family samplers).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Input scaling the model expects at `timestep` (identity for DDPM-family samplers).
    fn scale_model_input(&self, sample: &Tensor, _timestep: i64) -> Result<Tensor> {
        Ok(sample.shallow_clone())
    }

    /// One reverse step from `timestep` to the next timestep of the schedule.
    /// `model_output` may carry extra variance channels (learned variance: 2x the sample's
    /// channels). Noise, when the step needs it, is drawn from `noise`.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
}
