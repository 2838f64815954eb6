//! CLIP text and vision encoders, CLIP's BPE tokenizer, preprocessing and contrastive training; transformers-compatible weights.
//!
//! - [`config`]: transformers' `config.json` in its three CLIP layouts;
//! - [`encoder`]: the pre-LN transformer layer both towers share;
//! - [`text`] / [`vision`]: the towers, named as the checkpoints name their tensors;
//! - [`model`]: [`ClipModel`], similarity and zero-shot classification.

pub mod config;
pub mod encoder;
pub mod error;
pub mod model;
pub mod pipeline;
pub mod preprocess;
pub mod text;
pub mod tokenizer;
pub mod train;
pub mod vision;

pub use config::{AnyConfig, ClipConfig, TextConfig, VisionConfig};
pub use error::{Error, Result};
/// Re-exported so users open images with the same `image` version.
pub use image;
pub use model::{ClipModel, ClipOutput, Towers, normalize, similarity};
pub use pipeline::{ClipPipeline, LabelScore};
pub use preprocess::{ImageProcessor, ProcessorConfig};
pub use tokenizer::{ClipTokenizer, Encoding, Truncation};
pub use train::{ClipTrainer, TrainConfig, contrastive_loss};
