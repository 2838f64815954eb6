//! One reverse step of each sampler on a prior-sized (1,768), a small-image (2,3,64,64) and a
//! super-res-sized (1,3,256,256) tensor. A step should cost little next to a model call: the
//! per-timestep coefficients are precomputed in `set_timesteps`, so a step is a handful of
//! elementwise ops (plus one noise draw for the stochastic samplers).
//!
//! `cargo bench -p unclip-benches --bench sampler_step` (device: `UNCLIP_DEVICE`, default
//! CUDA when available).

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use tch::{Device, Kind, Tensor};
use unclip_scheduler::*;

const SHAPES: [&[i64]; 3] = [&[1, 768], &[2, 3, 64, 64], &[1, 3, 256, 256]];
const STEPS: usize = 25;

fn label(shape: &[i64]) -> String {
    shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x")
}

fn doubled(shape: &[i64]) -> Vec<i64> {
    let mut s = shape.to_vec();
    s[1] *= 2;
    s
}

/// Steps a stateless sampler at the middle timestep of a 25-step schedule.
fn bench_stateless(
    c: &mut Criterion,
    name: &str,
    mut sched: Box<dyn Scheduler>,
    learned: bool,
    device: Device,
) {
    sched.set_timesteps(STEPS).unwrap();
    let t = sched.timesteps()[STEPS / 2];
    let mut noise = TorchNoise::new(0);
    for shape in SHAPES {
        let x = Tensor::randn(shape, (Kind::Float, device));
        let out_shape = if learned { doubled(shape) } else { shape.to_vec() };
        let out = Tensor::randn(out_shape.as_slice(), (Kind::Float, device)).tanh();
        c.bench_function(&format!("{name}/{}", label(shape)), |b| {
            b.iter(|| {
                let y = sched.step(black_box(&out), t, black_box(&x), &mut noise).unwrap();
                if device.is_cuda() {
                    tch::Cuda::synchronize(device_index(device));
                }
                y
            })
        });
    }
}

fn device_index(device: Device) -> i64 {
    match device {
        Device::Cuda(i) => i as i64,
        _ => 0,
    }
}

fn benches(c: &mut Criterion) {
    let device = unclip_core::select_device(None).expect("device");
    let _guard = tch::no_grad_guard();
    let cos = BetaSchedule::SquaredcosCapV2;
    let samplers: Vec<(&str, Box<dyn Scheduler>, bool)> = vec![
        (
            "unclip_learned_range",
            Box::new(UnCLIPScheduler::new(UnCLIPSchedulerConfig::karlo_decoder()).unwrap()),
            true,
        ),
        (
            "unclip_fixed_small_log",
            Box::new(UnCLIPScheduler::new(UnCLIPSchedulerConfig::karlo_super_res()).unwrap()),
            false,
        ),
        (
            "ddpm_fixed_small",
            Box::new(
                DdpmScheduler::new(DdpmSchedulerConfig {
                    beta_schedule: cos,
                    ..Default::default()
                })
                .unwrap(),
            ),
            false,
        ),
        (
            "ddim_eta0",
            Box::new(
                DdimScheduler::new(DdimSchedulerConfig {
                    beta_schedule: cos,
                    ..Default::default()
                })
                .unwrap(),
            ),
            false,
        ),
        (
            "ddim_eta1",
            Box::new(
                DdimScheduler::new(DdimSchedulerConfig {
                    beta_schedule: cos,
                    ..Default::default()
                })
                .unwrap()
                .with_eta(1.0)
                .unwrap(),
            ),
            false,
        ),
    ];
    for (name, sched, learned) in samplers {
        bench_stateless(c, name, sched, learned, device);
    }

    // DPM-Solver++ 2M is multistep: time its second (second-order) step; the setup, excluded
    // from the timing, resets the schedule and takes the first step.
    for shape in SHAPES {
        let x = Tensor::randn(shape, (Kind::Float, device));
        let out = Tensor::randn(shape, (Kind::Float, device));
        let mut noise = TorchNoise::new(0);
        c.bench_function(&format!("dpmpp_2m/{}", label(shape)), |b| {
            b.iter_batched(
                || {
                    let mut s = DpmSolverMultistepScheduler::new(DpmSolverConfig {
                        beta_schedule: cos,
                        ..Default::default()
                    })
                    .unwrap();
                    s.set_timesteps(STEPS).unwrap();
                    let t0 = s.timesteps()[0];
                    let x1 = s.step(&out, t0, &x, &mut TorchNoise::unseeded()).unwrap();
                    (s, x1)
                },
                |(mut s, x1)| {
                    let t1 = s.timesteps()[1];
                    let y = s.step(black_box(&out), t1, black_box(&x1), &mut noise).unwrap();
                    if device.is_cuda() {
                        tch::Cuda::synchronize(device_index(device));
                    }
                    y
                },
                BatchSize::SmallInput,
            )
        });
    }
}

criterion_group!(sampler_step, benches);
criterion_main!(sampler_step);
