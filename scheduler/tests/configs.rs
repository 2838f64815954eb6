//! diffusers-saved `scheduler_config.json` files (fixtures/gen_scheduler.py `configs()`) read
//! into the typed configs and dispatched on `_class_name`.

use unclip_core::testing::fixture_path;
use unclip_scheduler::*;

fn path(name: &str) -> std::path::PathBuf {
    fixture_path(&format!("scheduler/configs/{name}/scheduler_config.json"))
}

/// The timesteps a boxed scheduler from the file picks equal those of the typed one.
fn same_timesteps(name: &str, mut typed: Box<dyn Scheduler>) {
    let mut boxed = scheduler_from_file(&path(name)).unwrap();
    boxed.set_timesteps(25).unwrap();
    typed.set_timesteps(25).unwrap();
    assert_eq!(boxed.timesteps(), typed.timesteps(), "{name}");
}

#[test]
fn karlo_configs_read_as_their_constructors() {
    for (name, expected) in [
        ("karlo_prior", UnCLIPSchedulerConfig::karlo_prior()),
        ("karlo_decoder", UnCLIPSchedulerConfig::karlo_decoder()),
        ("karlo_super_res", UnCLIPSchedulerConfig::karlo_super_res()),
    ] {
        assert_eq!(UnCLIPSchedulerConfig::from_file(&path(name)).unwrap(), expected, "{name}");
        same_timesteps(name, Box::new(UnCLIPScheduler::new(expected).unwrap()));
    }
}

#[test]
fn diffusers_defaults_read_as_ours() {
    assert_eq!(
        DdpmSchedulerConfig::from_file(&path("ddpm")).unwrap(),
        DdpmSchedulerConfig::default()
    );
    let lr = DdpmSchedulerConfig::from_file(&path("ddpm_learned_range")).unwrap();
    assert_eq!(lr.variance_type, VarianceType::LearnedRange);
    assert_eq!(lr.beta_schedule, BetaSchedule::SquaredcosCapV2);
    assert_eq!(
        DdimSchedulerConfig::from_file(&path("ddim")).unwrap(),
        DdimSchedulerConfig::default()
    );
    assert_eq!(
        DdimInverseSchedulerConfig::from_file(&path("ddim_inverse")).unwrap(),
        DdimInverseSchedulerConfig::default()
    );
    // diffusers writes lambda_min_clipped = -inf as the non-JSON literal -Infinity.
    let dpm = DpmSolverConfig::from_file(&path("dpm")).unwrap();
    assert_eq!(dpm, DpmSolverConfig::default());
    assert_eq!(dpm.lambda_min_clipped, f64::NEG_INFINITY);
    same_timesteps("ddpm", Box::new(DdpmScheduler::new(DdpmSchedulerConfig::default()).unwrap()));
    same_timesteps("ddim", Box::new(DdimScheduler::new(DdimSchedulerConfig::default()).unwrap()));
    same_timesteps("dpm", Box::new(DpmSolverMultistepScheduler::new(dpm).unwrap()));
    let inv = DdimInverseScheduler::new(DdimInverseSchedulerConfig::default()).unwrap();
    same_timesteps("ddim_inverse", Box::new(inv));
}

#[test]
fn bad_configs_are_clear_errors() {
    let e = scheduler_from_json(
        r#"{"_class_name": "DDPMScheduler", "variance_type": "fixed_large_log"}"#,
    );
    assert!(matches!(e, Err(Error::Config(m)) if m.contains("fixed_large_log")));
    let e = scheduler_from_json(r#"{"_class_name": "UnCLIPScheduler", "beta_schedule": "linear"}"#);
    assert!(matches!(e, Err(Error::Config(_))));
    let e = scheduler_from_json(
        r#"{"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": true}"#,
    );
    assert!(matches!(e, Err(Error::Config(m)) if m.contains("karras")));
    let e = scheduler_from_json(r#"{"_class_name": "DDIMScheduler", "beta_start": 0.0}"#);
    assert!(matches!(e, Err(Error::Config(_))));
    let e = scheduler_from_file(std::path::Path::new("/nonexistent/scheduler_config.json"));
    assert!(e.is_err());
}
