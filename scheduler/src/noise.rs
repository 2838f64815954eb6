//! Where samplers and pipelines get their Gaussian noise.

use tch::{Device, Kind, Tensor};

/// A source of standard normal noise. Pipelines pass one through every draw so a seed reproduces
/// a whole run.
pub trait NoiseSource {
    /// A tensor of shape `shape` with i.i.d. N(0, 1) entries, of `kind`, on `device`.
    fn randn(&mut self, shape: &[i64], kind: Kind, device: Device) -> Tensor;

    /// A tensor of shape `shape` with i.i.d. integers uniform in `0..high` (int64, on `device`);
    /// used for training timesteps. The default draws from libtorch's CPU generator and moves.
    fn randint(&mut self, high: i64, shape: &[i64], device: Device) -> Tensor {
        Tensor::randint(high, shape, (Kind::Int64, Device::Cpu)).to_device(device)
    }
}

/// libtorch has one global CPU generator, and [`TorchNoise`] seeds and draws from it: threads
/// that interleave seeding and drawing (the tests of one binary run in parallel threads) get
/// each other's numbers. Hold this lock from `TorchNoise::new(seed)` to the last draw that must
/// be reproducible.
pub fn global_rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Noise from libtorch's default CPU generator (seeded by [`TorchNoise::new`]), drawn in f32 on
/// the CPU and then moved: with the same seed and draw order this reproduces diffusers' draws
/// from a `torch.Generator("cpu")`, on any device.
#[derive(Debug, Clone, Copy)]
pub struct TorchNoise {
    _private: (),
}

impl TorchNoise {
    /// Seeds libtorch's global generators (CPU and CUDA) with `seed`.
    pub fn new(seed: u64) -> Self {
        tch::manual_seed(seed as i64);
        Self { _private: () }
    }

    /// Uses the generator as it is, without reseeding.
    pub fn unseeded() -> Self {
        Self { _private: () }
    }
}

impl NoiseSource for TorchNoise {
    fn randn(&mut self, shape: &[i64], kind: Kind, device: Device) -> Tensor {
        let t = Tensor::randn(shape, (Kind::Float, Device::Cpu));
        if kind == Kind::Float && device == Device::Cpu {
            t
        } else {
            t.to_device(device).to_kind(kind)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise() {
        let _lock = global_rng_lock();
        let a = TorchNoise::new(7).randn(&[3, 4], Kind::Float, Device::Cpu);
        let b = TorchNoise::new(7).randn(&[3, 4], Kind::Float, Device::Cpu);
        assert!(a.equal(&b));
        let c = TorchNoise::unseeded().randn(&[3, 4], Kind::Half, Device::Cpu);
        assert_eq!(c.kind(), Kind::Half);
        assert!(!a.equal(&c.to_kind(Kind::Float)));
    }
}
