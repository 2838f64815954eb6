//! Properties of schedules, spacings and samplers (proptest and exhaustive sweeps).

mod common;

use proptest::prelude::*;
use tch::{Device, Kind, Tensor};
use unclip_scheduler::spacing::{ddpm_timesteps, dpm_timesteps, inverse_timesteps};
use unclip_scheduler::*;

fn kind_strategy() -> impl Strategy<Value = BetaSchedule> {
    prop_oneof![
        Just(BetaSchedule::Linear),
        Just(BetaSchedule::ScaledLinear),
        Just(BetaSchedule::SquaredcosCapV2),
        Just(BetaSchedule::Sigmoid),
    ]
}

fn strictly_decreasing(ts: &[i64]) -> bool {
    ts.windows(2).all(|w| w[0] > w[1])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn alphas_cumprod_strictly_decreasing_in_unit_interval(
        kind in kind_strategy(),
        t in 2usize..2000,
        start in 1e-5f64..5e-3,
        span in 1e-3f64..0.05,
    ) {
        let s = NoiseSchedule::new(kind, t, start, start + span).unwrap();
        let ac = s.alphas_cumprod();
        prop_assert!(ac[0] <= 1.0 && ac[t - 1] > 0.0);
        prop_assert!(ac.windows(2).all(|w| w[1] < w[0]), "not strictly decreasing");
    }

    #[test]
    fn spacings_give_valid_timesteps_for_any_train_length(t in 1usize..1500, frac in 0.0f64..1.0) {
        let n = 1 + ((t - 1) as f64 * frac) as usize;
        for sp in [TimestepSpacing::Linspace, TimestepSpacing::Leading, TimestepSpacing::Trailing] {
            let ts = ddpm_timesteps(sp, t, n, 0).unwrap();
            prop_assert_eq!(ts.len(), n);
            prop_assert!(strictly_decreasing(&ts) && ts[0] < t as i64 && ts[n - 1] >= 0);
        }
    }

    #[test]
    fn add_noise_at_t0_is_close_to_x0(seed in 0u64..1000, kind in kind_strategy()) {
        let s = NoiseSchedule::new(kind, 1000, 1e-4, 0.02).unwrap();
        let _lock = common::rng_lock();
        let mut rng = TorchNoise::new(seed);
        let x0 = rng.randn(&[3, 4, 5], Kind::Float, Device::Cpu);
        let noise = rng.randn(&[3, 4, 5], Kind::Float, Device::Cpu);
        let xt = s.add_noise(&x0, &noise, &Tensor::from_slice(&[0i64])).unwrap();
        let a0 = s.alphas_cumprod()[0] as f64;
        let bound = (1.0 - a0.sqrt()) * x0.abs().max().double_value(&[])
            + (1.0 - a0).sqrt() * noise.abs().max().double_value(&[]) + 1e-6;
        prop_assert!((xt - &x0).abs().max().double_value(&[]) <= bound);
        // t = 0 barely scales x0 and lets in at most a 1/60 of the noise (sigmoid's β_0 is the
        // largest of the four, 1.5e-4). The bound above scales with the largest |noise| drawn,
        // which has no fixed limit, so the schedule's coefficients are what is checked here.
        prop_assert!(1.0 - a0.sqrt() < 1e-4 && (1.0 - a0).sqrt() < 1.0 / 60.0, "a0 = {a0}");
    }

    #[test]
    fn samplers_fed_the_true_x0_end_at_x0(seed in 0u64..1000, n in 2usize..40) {
        let _lock = common::rng_lock();
        let mut rng = TorchNoise::new(seed);
        let x0 = rng.randn(&[2, 3, 4], Kind::Float, Device::Cpu).tanh();
        let start = rng.randn(&[2, 3, 4], Kind::Float, Device::Cpu);
        for (name, mut s) in x0_samplers() {
            s.set_timesteps(n).unwrap();
            let mut x = start.shallow_clone();
            for t in s.timesteps().to_vec() {
                x = s.step(&x0, t, &x, &mut rng).unwrap();
            }
            // Karlo's last step scales x0 by β_0/(1 − ᾱ_0), which is 1 only up to the f32
            // rounding of 1 − ᾱ_0 (≈ 5e-4 relative, as in diffusers); the others are exact to f32.
            let tol = if name == "unclip" { 1e-3 } else { 1e-5 };
            let err = (&x - &x0).abs().max().double_value(&[]);
            prop_assert!(err < tol, "{} ended {} from x0", name, err);
        }
    }

    #[test]
    fn ddim_eta0_is_deterministic(seed in 0u64..1000, n in 1usize..50) {
        let cfg = DdimSchedulerConfig { beta_schedule: BetaSchedule::SquaredcosCapV2, ..Default::default() };
        let mut s = DdimScheduler::new(cfg).unwrap();
        s.set_timesteps(n).unwrap();
        let _lock = common::rng_lock();
        let x = TorchNoise::new(seed).randn(&[1, 3, 4, 4], Kind::Float, Device::Cpu);
        let mut ends = Vec::new();
        for noise_seed in [seed, seed + 1] {
            let mut rng = TorchNoise::new(noise_seed);
            let mut y = x.shallow_clone();
            for t in s.timesteps().to_vec() {
                y = s.step(&common::model(&y, t, None), t, &y, &mut rng).unwrap();
            }
            ends.push(y);
        }
        prop_assert!(ends[0].equal(&ends[1]));
    }
}

/// Samplers predicting x0 directly (so the model's "prediction" is x0 itself).
fn x0_samplers() -> Vec<(&'static str, Box<dyn Scheduler>)> {
    let pred = PredictionType::Sample;
    let cos = BetaSchedule::SquaredcosCapV2;
    vec![
        (
            "unclip",
            Box::new(UnCLIPScheduler::new(UnCLIPSchedulerConfig::karlo_prior()).unwrap())
                as Box<dyn Scheduler>,
        ),
        (
            "ddpm",
            Box::new(
                DdpmScheduler::new(DdpmSchedulerConfig {
                    prediction_type: pred,
                    beta_schedule: cos,
                    ..Default::default()
                })
                .unwrap(),
            ),
        ),
        (
            "ddim eta 1",
            Box::new(
                DdimScheduler::new(DdimSchedulerConfig {
                    prediction_type: pred,
                    ..Default::default()
                })
                .unwrap()
                .with_eta(1.0)
                .unwrap(),
            ),
        ),
        (
            "dpm++ 2m",
            Box::new(
                DpmSolverMultistepScheduler::new(DpmSolverConfig {
                    prediction_type: pred,
                    ..Default::default()
                })
                .unwrap(),
            ),
        ),
    ]
}

#[test]
fn every_step_count_gives_valid_timesteps() {
    let t = 1000;
    for n in 1..=t {
        for sp in [TimestepSpacing::Linspace, TimestepSpacing::Leading, TimestepSpacing::Trailing] {
            let ts = ddpm_timesteps(sp, t, n, 0).unwrap();
            assert!(
                ts.len() == n && strictly_decreasing(&ts) && ts[0] < 1000 && ts[n - 1] >= 0,
                "{sp:?} {n}"
            );
            if sp != TimestepSpacing::Linspace {
                let inv = inverse_timesteps(sp, t, n, 0).unwrap();
                assert!(
                    inv.len() == n
                        && inv.windows(2).all(|w| w[0] < w[1])
                        && inv[0] >= 0
                        && inv[n - 1] < 1000
                );
            }
            // DPM spaces n+1 points, so at n = T its linspace and leading spacings must repeat
            // (diffusers returns them; we refuse). Trailing stays valid.
            if n < t || sp == TimestepSpacing::Trailing {
                let d = dpm_timesteps(sp, t, t, n, 0).unwrap();
                assert!(
                    d.len() == n && strictly_decreasing(&d) && d[0] < 1000 && d[n - 1] >= 0,
                    "dpm {sp:?} {n}"
                );
            }
        }
        if n >= 2 {
            let ts = UnCLIPScheduler::spaced_timesteps(t, n).unwrap();
            assert!(ts.len() == n && strictly_decreasing(&ts) && ts[0] == 999 && ts[n - 1] == 0);
        }
    }
}

/// ε of the exact denoiser for data x0 ~ N(m, s²) (so DDIM's ODE is the exact flow).
fn gaussian_eps(x: &Tensor, ac: f64, m: f64, s2: f64) -> Tensor {
    (x - ac.sqrt() * m) * ((1.0 - ac).sqrt() / (ac * s2 + 1.0 - ac))
}

#[test]
fn ddim_inversion_then_sampling_returns_to_the_start() {
    let (m, s2, n) = (0.3f64, 0.25f64, 500);
    let cos = BetaSchedule::SquaredcosCapV2;
    let mut inv = DdimInverseScheduler::new(DdimInverseSchedulerConfig {
        beta_schedule: cos,
        clip_sample: false,
        ..Default::default()
    })
    .unwrap();
    let mut fwd = DdimScheduler::new(DdimSchedulerConfig {
        beta_schedule: cos,
        clip_sample: false,
        ..Default::default()
    })
    .unwrap();
    inv.set_timesteps(n).unwrap();
    fwd.set_timesteps(n).unwrap();
    let ac: Vec<f64> = NoiseSchedule::new(cos, 1000, 1e-4, 0.02)
        .unwrap()
        .alphas_cumprod()
        .iter()
        .map(|&a| a as f64)
        .collect();
    let x0 = {
        let _lock = common::rng_lock();
        TorchNoise::new(3).randn(&[2, 3, 8, 8], Kind::Float, Device::Cpu) * s2.sqrt() + m
    };
    let mut rng = TorchNoise::unseeded();
    let mut x = x0.shallow_clone();
    for t in inv.timesteps().to_vec() {
        x = inv.step(&gaussian_eps(&x, ac[t as usize], m, s2), t, &x, &mut rng).unwrap();
    }
    let latent_std = x.std(true).double_value(&[]);
    assert!((latent_std - 1.0).abs() < 0.2, "inverted latent std {latent_std}");
    for t in fwd.timesteps().to_vec() {
        x = fwd.step(&gaussian_eps(&x, ac[t as usize], m, s2), t, &x, &mut rng).unwrap();
    }
    let err = (&x - &x0).abs().max().double_value(&[]);
    println!(
        "DDIM inversion round trip ({n} steps): max |x - x0| = {err:.2e}, latent std {latent_std:.3}"
    );
    assert!(err < 0.02, "round trip error {err}");
}

#[test]
fn schedulers_are_object_safe_and_report_errors() {
    let mut all: Vec<Box<dyn Scheduler>> = x0_samplers().into_iter().map(|(_, s)| s).collect();
    let x = Tensor::zeros([1, 3, 4], (Kind::Float, Device::Cpu));
    let mut rng = TorchNoise::unseeded();
    for s in all.iter_mut() {
        assert!(matches!(s.step(&x, 999, &x, &mut rng), Err(Error::NotInitialized)));
        assert!(matches!(s.set_timesteps(0), Err(Error::Steps { .. })));
        assert!(matches!(s.set_timesteps(1001), Err(Error::Steps { .. })));
        s.set_timesteps(10).unwrap();
        let t = s.timesteps()[0];
        let wrong = Tensor::zeros([1, 3, 5], (Kind::Float, Device::Cpu));
        assert!(matches!(s.step(&wrong, t, &x, &mut rng), Err(Error::Shape { .. })));
        assert!(matches!(s.step(&x, 1, &x, &mut rng), Err(Error::TimestepNotInSchedule(1))));
        assert_eq!(s.num_train_timesteps(), 1000);
    }
    assert!(
        DdimScheduler::new(DdimSchedulerConfig::default()).unwrap().with_eta(f64::NAN).is_err()
    );
    let bad = DdpmSchedulerConfig {
        trained_betas: Some(vec![0.5, 1.5]),
        num_train_timesteps: 2,
        ..Default::default()
    };
    assert!(matches!(DdpmScheduler::new(bad), Err(Error::Config(_))));
    let bad = DpmSolverConfig { solver_order: 3, ..Default::default() };
    assert!(matches!(DpmSolverMultistepScheduler::new(bad), Err(Error::Config(_))));
    let bad = DdpmSchedulerConfig {
        thresholding: true,
        dynamic_thresholding_ratio: 1.5,
        ..Default::default()
    };
    assert!(matches!(DdpmScheduler::new(bad), Err(Error::Config(_))));
}
