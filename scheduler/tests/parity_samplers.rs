//! DDPM, DDIM, DDIM inversion and DPM-Solver++ against diffusers 0.42.1: whole sampling loops
//! of the analytic model (fixtures/gen_scheduler.py), with noise from the same seeds.
//! Tolerance: see `common::{RTOL, ATOL}`.

mod common;

use common::{Fixture, close, model};
use unclip_scheduler::*;

const PREDICTIONS: [(&str, PredictionType); 3] = [
    ("epsilon", PredictionType::Epsilon),
    ("sample", PredictionType::Sample),
    ("v_prediction", PredictionType::VPrediction),
];

fn run(
    s: &mut dyn Scheduler,
    x: &tch::Tensor,
    var: Option<VarianceType>,
    seed: u64,
) -> tch::Tensor {
    let _lock = common::rng_lock();
    let mut noise = TorchNoise::new(seed);
    let mut y = x.shallow_clone();
    for t in s.timesteps().to_vec() {
        y = s.step(&model(&y, t, var), t, &y, &mut noise).unwrap();
    }
    y
}

#[test]
fn ddpm_matches_diffusers() {
    let f = Fixture::load("ddpm");
    let vars = [
        ("fixed_small", VarianceType::FixedSmall),
        ("fixed_small_log", VarianceType::FixedSmallLog),
        ("fixed_large", VarianceType::FixedLarge),
        ("learned", VarianceType::Learned),
        ("learned_range", VarianceType::LearnedRange),
    ];
    for (vn, var) in vars {
        for (pn, pred) in PREDICTIONS {
            for (bn, bs) in [
                ("linear", BetaSchedule::Linear),
                ("squaredcos_cap_v2", BetaSchedule::SquaredcosCapV2),
            ] {
                let cfg = DdpmSchedulerConfig {
                    beta_schedule: bs,
                    variance_type: var,
                    prediction_type: pred,
                    ..Default::default()
                };
                let mut s = DdpmScheduler::new(cfg).unwrap();
                s.set_timesteps(10).unwrap();
                let y = run(&mut s, f.get("x"), Some(var), 8);
                close(&format!("ddpm {vn}.{pn}.{bn}"), &y, f.get(&format!("{vn}.{pn}.{bn}.loop")));
            }
        }
    }
    let x = f.get("x3");
    let d = DdpmSchedulerConfig::default();
    let variants = [
        (
            "threshold",
            DdpmSchedulerConfig {
                thresholding: true,
                dynamic_thresholding_ratio: 0.9,
                sample_max_value: 1.5,
                ..d.clone()
            },
        ),
        ("noclip", DdpmSchedulerConfig { clip_sample: false, ..d.clone() }),
        (
            "linspace",
            DdpmSchedulerConfig {
                timestep_spacing: TimestepSpacing::Linspace,
                clip_sample_range: 2.0,
                ..d.clone()
            },
        ),
        (
            "trailing",
            DdpmSchedulerConfig { timestep_spacing: TimestepSpacing::Trailing, ..d.clone() },
        ),
    ];
    for (name, cfg) in variants {
        let mut s = DdpmScheduler::new(cfg).unwrap();
        s.set_timesteps(10).unwrap();
        let ts = s.timesteps().to_vec();
        for i in [0usize, 9] {
            let _lock = common::rng_lock();
            let mut noise = TorchNoise::new(30 + i as u64);
            let r = s.step_full(&model(x, ts[i], None), ts[i], x, &mut noise).unwrap();
            close(
                &format!("{name}.{i}.prev"),
                &r.prev_sample,
                f.get(&format!("{name}.step{i}.prev_sample")),
            );
            close(
                &format!("{name}.{i}.x0"),
                &r.pred_original_sample,
                f.get(&format!("{name}.step{i}.pred_original_sample")),
            );
        }
    }
}

#[test]
fn ddim_and_inversion_match_diffusers() {
    let f = Fixture::load("ddim");
    let x = f.get("x");
    for (en, eta) in [("0.0", 0.0), ("1.0", 1.0)] {
        for (pn, pred) in PREDICTIONS {
            for (sn, sp) in [
                ("leading", TimestepSpacing::Leading),
                ("trailing", TimestepSpacing::Trailing),
                ("linspace", TimestepSpacing::Linspace),
            ] {
                let cfg = DdimSchedulerConfig {
                    beta_schedule: BetaSchedule::SquaredcosCapV2,
                    prediction_type: pred,
                    timestep_spacing: sp,
                    ..Default::default()
                };
                let mut s = DdimScheduler::new(cfg).unwrap().with_eta(eta).unwrap();
                s.set_timesteps(10).unwrap();
                close(
                    &format!("ddim {en}.{pn}.{sn}"),
                    &run(&mut s, x, None, 9),
                    f.get(&format!("{en}.{pn}.{sn}.loop")),
                );
            }
        }
    }
    let cfg = DdimSchedulerConfig {
        clip_sample: false,
        set_alpha_to_one: false,
        thresholding: true,
        sample_max_value: 2.0,
        ..Default::default()
    };
    let mut s =
        DdimScheduler::new(cfg).unwrap().with_eta(0.5).unwrap().with_clipped_model_output(true);
    s.set_timesteps(20).unwrap();
    close("ddim variant", &run(&mut s, &(x * 3.0), None, 9), f.get("variant.loop"));
    for (sn, sp) in [("leading", TimestepSpacing::Leading), ("trailing", TimestepSpacing::Trailing)]
    {
        for (pn, pred) in PREDICTIONS {
            let cfg = DdimInverseSchedulerConfig {
                beta_schedule: BetaSchedule::SquaredcosCapV2,
                prediction_type: pred,
                timestep_spacing: sp,
                clip_sample: false,
                set_alpha_to_one: pred != PredictionType::Sample,
                ..Default::default()
            };
            let mut s = DdimInverseScheduler::new(cfg).unwrap();
            s.set_timesteps(10).unwrap();
            close(
                &format!("inverse {sn}.{pn}"),
                &run(&mut s, x, None, 0),
                f.get(&format!("inverse.{sn}.{pn}.loop")),
            );
        }
    }
}

#[test]
fn dpm_solver_matches_diffusers() {
    let f = Fixture::load("dpm");
    let x = f.get("x") * 2.0;
    let d = DpmSolverConfig::default();
    let cases = [
        ("default", d.clone()),
        ("cosine", DpmSolverConfig { beta_schedule: BetaSchedule::SquaredcosCapV2, ..d.clone() }),
        ("heun", DpmSolverConfig { solver_type: SolverType::Heun, ..d.clone() }),
        ("order1", DpmSolverConfig { solver_order: 1, ..d.clone() }),
        ("sigma_min", DpmSolverConfig { final_sigmas_type: FinalSigmas::SigmaMin, ..d.clone() }),
        ("threshold", DpmSolverConfig { thresholding: true, sample_max_value: 1.5, ..d.clone() }),
        (
            "leading",
            DpmSolverConfig {
                timestep_spacing: TimestepSpacing::Leading,
                steps_offset: 1,
                ..d.clone()
            },
        ),
        ("trailing", DpmSolverConfig { timestep_spacing: TimestepSpacing::Trailing, ..d.clone() }),
        (
            "no_lower_final",
            DpmSolverConfig {
                lower_order_final: false,
                final_sigmas_type: FinalSigmas::SigmaMin,
                ..d.clone()
            },
        ),
        (
            "learned_range",
            DpmSolverConfig { variance_type: Some(VarianceType::LearnedRange), ..d.clone() },
        ),
        (
            "lambda_clip",
            DpmSolverConfig {
                beta_schedule: BetaSchedule::SquaredcosCapV2,
                lambda_min_clipped: -5.1,
                ..d.clone()
            },
        ),
    ];
    for (name, cfg) in cases {
        for (pn, pred) in PREDICTIONS {
            if name == "learned_range" && pred != PredictionType::Epsilon {
                continue;
            }
            for n in [10usize, 20] {
                let mut s = DpmSolverMultistepScheduler::new(DpmSolverConfig {
                    prediction_type: pred,
                    ..cfg.clone()
                })
                .unwrap();
                s.set_timesteps(n).unwrap();
                let var = cfg.variance_type;
                close(
                    &format!("dpm {name}.{pn}.{n}"),
                    &run(&mut s, &x, var, 0),
                    f.get(&format!("{name}.{pn}.{n}.loop")),
                );
            }
        }
    }
}
