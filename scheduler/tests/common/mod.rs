//! Shared by the parity tests: fixture access and the analytic "model" of gen_scheduler.py.
#![allow(dead_code)]

use std::collections::HashMap;
use tch::Tensor;
use unclip_scheduler::VarianceType;

/// Parity tolerance against diffusers: |ours − ref| ≤ ATOL + RTOL·|ref|.
pub const RTOL: f64 = 1e-6;
/// Absolute floor for values near 0.
pub const ATOL: f64 = 1e-6;

/// Serializes tests that seed and draw from libtorch's global generator.
pub fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    unclip_scheduler::global_rng_lock()
}

pub struct Fixture(pub HashMap<String, Tensor>);

impl Fixture {
    pub fn load(name: &str) -> Self {
        Fixture(unclip_core::testing::load_fixture(&format!("scheduler/{name}.safetensors")))
    }
    pub fn get(&self, key: &str) -> &Tensor {
        self.0.get(key).unwrap_or_else(|| panic!("fixture tensor {key} missing"))
    }
    pub fn vec_i64(&self, key: &str) -> Vec<i64> {
        Vec::<i64>::try_from(self.get(key)).unwrap()
    }
}

/// Asserts parity within (ATOL, RTOL) and logs the worst difference (`--nocapture` shows it).
pub fn close(what: &str, ours: &Tensor, reference: &Tensor) {
    unclip_core::testing::assert_close(what, ours, reference, ATOL, RTOL);
    println!("{what}: max |diff| {:.3e}", unclip_core::testing::max_abs_diff(ours, reference));
}

/// out = x·a(t) + b(t), a = 0.5 + 0.3 cos(t/100), b = 0.1 sin(t/50), plus variance channels:
/// the same float ops as `model` in fixtures/gen_scheduler.py.
pub fn model(x: &Tensor, t: i64, variance: Option<VarianceType>) -> Tensor {
    let tf = t as f64;
    let a = 0.5 + 0.3 * (tf / 100.0).cos();
    let b = 0.1 * (tf / 50.0).sin();
    let out = x * a + b;
    match variance {
        Some(VarianceType::LearnedRange) => Tensor::cat(&[out, x.tanh()], 1),
        Some(VarianceType::Learned) => Tensor::cat(&[out, x.sigmoid() * 0.01 + 1e-4], 1),
        _ => out,
    }
}
