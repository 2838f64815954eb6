//! Training every stage of unCLIP on any [`crate::data::Dataset`], driven by a run config.
//!
//! ```text
//! config.toml --RunConfig::load--> Trainer::open(run folder) --run--> tokenizer, clip, prior, decoder, upsampler
//!                                                              --export--> diffusers-layout model folder
//! ```
//!
//! - [`config`]: the TOML run config, validated before any work ([`ConfigError`] names the file,
//!   the key and what was expected);
//! - [`Trainer`]: the run folder (effective config saved, resume by rerunning, steps extended),
//!   one stage runner per stage on `unclip_core::train::TrainLoop` (AdamW, EMA, schedule,
//!   clipping, atomic checkpoints, bit-exact resume, CSV log, loss picture), held-out loss and
//!   validation grids (the prior's and CLIP's: retrieval numbers and pictures), non-finite
//!   steps skipped and counted, gradient accumulation (`accumulate`) and bf16 autocast
//!   (`run.precision`, f32 master weights);
//! - [`export`]: the trained stages as a model folder `Unclip::from_pretrained` loads, written
//!   beside the target and swapped in, never deleting anything it did not write.
//!
//! A stage is complete only when its marker `<run>/<stage>/complete.json`
//! (`fsutil::mark_complete`), written last, says so; a stage without it is resumed from its
//! newest checkpoint (or started).

pub mod config;
pub mod dist;
pub mod export;
mod grid;
mod loop_;
mod precision;
mod source;
mod stages;
pub mod tokenizer;

pub use config::{ConfigError, Precision, RunConfig};
pub use dist::{DATA_PARALLEL_STAGES, Dist};
pub use export::{ExportOptions, export};
pub use loop_::{RunOptions, RunSummary, Trainer};
pub use source::Subset;
pub use stages::clip::contrastive_step as clip_contrastive_step;
pub use stages::decoder::{TEXT_PROJ, UNET, warm_start};

/// What can go wrong while training or exporting.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Model(#[from] crate::Error),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// A stage cannot run or failed, with the reason.
    #[error("stage {stage}: {message}")]
    Stage { stage: String, message: String },
    /// Too many non-finite steps in a row.
    #[error(
        "stage {stage}: the loss or the gradients were not finite for {count} steps in a row (steps {first} to {step}); stopped. The last finite step was {last_good}; last good checkpoint: {checkpoint} (skipped steps leave the weights unchanged)"
    )]
    NonFinite {
        stage: String,
        count: u64,
        first: u64,
        step: u64,
        last_good: u64,
        checkpoint: String,
    },
    #[error("export: {0}")]
    Export(String),
    #[error("{}: {source}", path.display())]
    Io { path: std::path::PathBuf, source: std::io::Error },
}

impl TrainError {
    pub(crate) fn stage(stage: &str, message: impl Into<String>) -> Self {
        Self::Stage { stage: stage.into(), message: message.into() }
    }
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }
}

macro_rules! via_model_error {
    ($($t:ty),*) => {$(
        impl From<$t> for TrainError {
            fn from(e: $t) -> Self {
                Self::Model(e.into())
            }
        }
    )*};
}
via_model_error!(
    unclip_core::Error,
    tch::TchError,
    unclip_clip::Error,
    unclip_prior::Error,
    unclip_decoder::Error,
    unclip_scheduler::Error
);

pub type Result<T> = std::result::Result<T, TrainError>;

/// Writes a small file atomically.
pub(crate) fn write_bytes(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    unclip_core::fsutil::atomic_write(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| unclip_core::Error::io(tmp, e))
    })?;
    Ok(())
}

/// Writes pretty JSON atomically.
pub(crate) fn write_json(path: &std::path::Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| TrainError::Export(format!("{}: {e}", path.display())))?;
    write_bytes(path, text.as_bytes())
}
