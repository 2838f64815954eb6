//! Learning-rate schedules: linear warmup, then constant, cosine or linear decay to a floor.
//!
//! `lr(step)` is the rate for the update with 0-based index `step`, with the conventions of
//! transformers' `get_*_schedule_with_warmup` (the warmup starts at 0 and reaches `peak` at
//! `step == warmup_steps`), except that past `total_steps` the rate stays at the floor.

use crate::{Error, Result};

/// A learning-rate schedule; serializable so a recipe's config can hold it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LrSchedule {
    /// `lr` after an optional linear warmup.
    Constant { lr: f64, warmup_steps: u64 },
    /// Warmup to `peak`, then half a cosine down to `floor` at `total_steps`.
    WarmupCosine { peak: f64, floor: f64, warmup_steps: u64, total_steps: u64 },
    /// Warmup to `peak`, then a straight line down to `floor` at `total_steps`.
    WarmupLinear { peak: f64, floor: f64, warmup_steps: u64, total_steps: u64 },
}

impl LrSchedule {
    /// A constant rate without warmup.
    pub fn constant(lr: f64) -> Self {
        LrSchedule::Constant { lr, warmup_steps: 0 }
    }

    /// Refuses negative or non-finite rates, a floor above the peak, and a warmup longer than the
    /// run.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: &str| {
            Err(Error::InvalidArgument(format!("learning-rate schedule {self:?}: {why}")))
        };
        let rate = |x: f64| x.is_finite() && x >= 0.0;
        match *self {
            LrSchedule::Constant { lr, .. } if !rate(lr) => bad("lr must be finite and >= 0"),
            LrSchedule::WarmupCosine { peak, floor, warmup_steps, total_steps }
            | LrSchedule::WarmupLinear { peak, floor, warmup_steps, total_steps } => {
                if !rate(peak) || !rate(floor) {
                    bad("rates must be finite and >= 0")
                } else if floor > peak {
                    bad("floor is above peak")
                } else if total_steps == 0 || warmup_steps > total_steps {
                    bad("need 0 < total_steps and warmup_steps <= total_steps")
                } else {
                    Ok(())
                }
            }
            LrSchedule::Constant { .. } => Ok(()),
        }
    }

    /// The highest rate of the schedule.
    pub fn peak(&self) -> f64 {
        match *self {
            LrSchedule::Constant { lr, .. } => lr,
            LrSchedule::WarmupCosine { peak, .. } | LrSchedule::WarmupLinear { peak, .. } => peak,
        }
    }

    /// The rate of update number `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        let (peak, warmup) = match *self {
            LrSchedule::Constant { lr, warmup_steps } => (lr, warmup_steps),
            LrSchedule::WarmupCosine { peak, warmup_steps, .. }
            | LrSchedule::WarmupLinear { peak, warmup_steps, .. } => (peak, warmup_steps),
        };
        if step < warmup {
            return peak * step as f64 / warmup as f64;
        }
        match *self {
            LrSchedule::Constant { lr, .. } => lr,
            LrSchedule::WarmupCosine { peak, floor, warmup_steps, total_steps } => {
                let p = progress(step, warmup_steps, total_steps);
                let factor = 0.5 * (1.0 + (std::f64::consts::PI * p).cos());
                floor + (peak - floor) * factor
            }
            LrSchedule::WarmupLinear { peak, floor, warmup_steps, total_steps } => {
                let p = progress(step, warmup_steps, total_steps);
                floor + (peak - floor) * (1.0 - p)
            }
        }
    }
}

/// Fraction of the decay phase done at `step`, in [0, 1].
fn progress(step: u64, warmup: u64, total: u64) -> f64 {
    let span = total.saturating_sub(warmup).max(1) as f64;
    ((step.saturating_sub(warmup)) as f64 / span).min(1.0)
}
