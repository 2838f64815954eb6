//! Helpers for parity tests against fixtures written by the reference Python packages
//! (see `fixtures/README.md`). Public so every crate's tests share them.

use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Kind, Tensor};

/// `<workspace>/fixtures/data/<rel>`.
pub fn fixture_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("fixtures").join("data").join(rel)
}

/// Reads a fixture safetensors file; panics with the path if it is absent (tests only).
pub fn load_fixture(rel: &str) -> HashMap<String, Tensor> {
    let path = fixture_path(rel);
    crate::weights::read_tensors(&path).unwrap_or_else(|e| {
        panic!("fixture {}: {e} (regenerate with scripts/make-fixtures.sh)", path.display())
    })
}

/// Largest absolute difference between two tensors (compared in f64 on the CPU).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_device(tch::Device::Cpu).to_kind(Kind::Double);
    let b = b.to_device(tch::Device::Cpu).to_kind(Kind::Double);
    (a - b).abs().max().double_value(&[])
}

/// Panics unless `ours` and `reference` have the same shape and `|ours - reference| <= atol + rtol
/// |reference|` everywhere; the message gives the worst difference.
pub fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, atol: f64, rtol: f64) {
    assert_eq!(ours.size(), reference.size(), "{what}: shape differs");
    let a = ours.to_device(tch::Device::Cpu).to_kind(Kind::Double);
    let b = reference.to_device(tch::Device::Cpu).to_kind(Kind::Double);
    let excess = (&a - &b).abs() - (b.abs() * rtol + atol);
    let worst = excess.max().double_value(&[]);
    assert!(
        worst <= 0.0,
        "{what}: max |diff| {:.3e} exceeds atol {atol:e} + rtol {rtol:e} (max |ref| {:.3e})",
        max_abs_diff(&a, &b),
        b.abs().max().double_value(&[])
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "exceeds")]
    fn assert_close_fails_on_difference() {
        let a = Tensor::from_slice(&[1.0f32, 2.0]);
        assert_close("x", &a, &(&a + 1e-3), 1e-4, 0.0);
    }

    #[test]
    fn assert_close_passes_within_tolerance() {
        let a = Tensor::from_slice(&[1.0f32, 2.0]);
        assert_close("x", &a, &(&a + 1e-6), 1e-5, 0.0);
        assert!(max_abs_diff(&a, &(&a + 0.5)) > 0.49);
    }
}
