//! The vocabulary shared by every scheduler config, spelled as diffusers spells it in
//! `scheduler_config.json`.

use serde::{Deserialize, Serialize};

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise ε added to x0.
    #[default]
    Epsilon,
    /// x0 itself (Karlo's prior).
    Sample,
    /// v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0.
    VPrediction,
}

/// How a DDPM-family sampler chooses the variance of each reverse step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    /// The posterior variance β̃_t.
    #[default]
    FixedSmall,
    /// β̃_t, computed through its log (clamped at 1e-20) as Karlo does.
    FixedSmallLog,
    /// β_t.
    FixedLarge,
    /// The model's extra channels are the variance itself (diffusers' reading).
    Learned,
    /// The model's extra channels v ∈ [-1, 1] interpolate log β̃_t .. log β_t (improved DDPM).
    LearnedRange,
}

impl VarianceType {
    /// Whether the model output carries extra variance channels.
    pub fn is_learned(self) -> bool {
        matches!(self, VarianceType::Learned | VarianceType::LearnedRange)
    }
}

/// How `set_timesteps` spreads the inference steps over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `linspace(0, T-1, n)` rounded.
    Linspace,
    /// Multiples of `T / n` (integer division) from 0, plus `steps_offset`.
    #[default]
    Leading,
    /// `arange(T, 0, -T/n)` rounded, minus 1: always includes T-1.
    Trailing,
}
