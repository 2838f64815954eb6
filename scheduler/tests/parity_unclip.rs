//! UnCLIPScheduler with Karlo's three configs against diffusers 0.42.1 (single steps with
//! their x0 estimates, and whole loops with noise). Tolerance: see `common::{RTOL, ATOL}`.

mod common;

use common::{Fixture, close, model};
use unclip_scheduler::{
    Scheduler, TorchNoise, UnCLIPScheduler, UnCLIPSchedulerConfig, VarianceType,
};

fn configs() -> [(&'static str, UnCLIPSchedulerConfig); 3] {
    [
        ("prior", UnCLIPSchedulerConfig::karlo_prior()),
        ("decoder", UnCLIPSchedulerConfig::karlo_decoder()),
        ("super_res", UnCLIPSchedulerConfig::karlo_super_res()),
    ]
}

#[test]
fn karlo_configs_match_diffusers() {
    let f = Fixture::load("unclip");
    let _lock = common::rng_lock();
    for (name, cfg) in configs() {
        let var = Some(cfg.variance_type);
        let mut s = UnCLIPScheduler::new(cfg).unwrap();
        for n in [25usize, 7] {
            s.set_timesteps(n).unwrap();
            let ts = s.timesteps().to_vec();
            let x = f.get(&format!("{name}.{n}.x"));
            for i in [0, n / 2, n - 1] {
                let key = format!("{name}.{n}.step{i}");
                let mut noise = TorchNoise::new(100 + i as u64);
                let r = s.step_full(&model(x, ts[i], var), ts[i], x, &mut noise).unwrap();
                close(&format!("{key}.prev"), &r.prev_sample, f.get(&format!("{key}.prev_sample")));
                close(
                    &format!("{key}.x0"),
                    &r.pred_original_sample,
                    f.get(&format!("{key}.pred_original_sample")),
                );
                // The explicit diffusers form gives the same step.
                let prev = ts.get(i + 1).copied();
                let mut noise = TorchNoise::new(100 + i as u64);
                let r2 = s.step_to(&model(x, ts[i], var), ts[i], x, prev, &mut noise).unwrap();
                assert!(r2.prev_sample.equal(&r.prev_sample));
            }
            let mut noise = TorchNoise::new(7);
            let mut y = x.shallow_clone();
            for &t in &ts {
                y = s.step(&model(&y, t, var), t, &y, &mut noise).unwrap();
            }
            close(&format!("{name}.{n}.loop"), &y, f.get(&format!("{name}.{n}.loop")));
        }
    }
    assert_eq!(configs()[1].1.variance_type, VarianceType::LearnedRange);
}
