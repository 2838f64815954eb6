//! Gradient clipping by global norm, refusing to touch non-finite gradients (scaling them by a
//! NaN factor would spread the damage into every weight at the next step).

use crate::{Error, Result};
use tch::{Kind, Tensor};

/// The global gradient norm, and whether clipping scaled the gradients down.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradNorm {
    /// L2 norm over all gradients together, before clipping.
    pub norm: f64,
    pub clipped: bool,
}

impl GradNorm {
    /// False for NaN or infinite norms: the caller should skip the update.
    pub fn is_finite(&self) -> bool {
        self.norm.is_finite()
    }
}

/// The norm of all `grads` as one vector (the L2 norm of the per-tensor norms, as torch's
/// `clip_grad_norm_` computes it), as a 0-d tensor in the gradients' dtype.
fn total_norm(grads: &[Tensor]) -> Result<Option<Tensor>> {
    if grads.is_empty() {
        return Ok(None);
    }
    let device = grads[0].device();
    let norms = grads
        .iter()
        .map(|g| Ok(g.f_norm()?.f_to_device(device)?))
        .collect::<Result<Vec<Tensor>>>()?;
    Ok(Some(Tensor::f_stack(&norms, 0)?.f_norm()?))
}

/// The global L2 norm of `grads` without changing them (0 when there are none).
pub fn grad_norm(grads: &[Tensor]) -> Result<GradNorm> {
    let norm = match total_norm(grads)? {
        Some(t) => t.f_to_kind(Kind::Double)?.f_double_value(&[])?,
        None => 0.0,
    };
    Ok(GradNorm { norm, clipped: false })
}

/// Scales `grads` in place so their global L2 norm is at most `max_norm` (factor
/// `max_norm / (norm + 1e-6)`, as torch's `clip_grad_norm_`), and returns the norm before
/// clipping. Non-finite norms leave the gradients untouched; check [`GradNorm::is_finite`].
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Result<GradNorm> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::InvalidArgument(format!("max_norm must be > 0, got {max_norm}")));
    }
    let Some(total) = total_norm(grads)? else {
        return Ok(GradNorm { norm: 0.0, clipped: false });
    };
    let norm = total.f_to_kind(Kind::Double)?.f_double_value(&[])?;
    if !norm.is_finite() {
        return Ok(GradNorm { norm, clipped: false });
    }
    let coef = total.f_add_scalar(1e-6)?.f_reciprocal()?.f_mul_scalar(max_norm)?;
    let coef = coef.f_clamp_max(1.0)?;
    let clipped = max_norm / (norm + 1e-6) < 1.0;
    tch::no_grad(|| -> Result<()> {
        for g in grads {
            let mut g = g.shallow_clone();
            let _ = g.f_mul_(&coef.f_to_device(g.device())?)?;
        }
        Ok(())
    })?;
    Ok(GradNorm { norm, clipped })
}
