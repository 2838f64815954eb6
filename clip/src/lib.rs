//! CLIP text and vision encoders, CLIP's BPE tokenizer, preprocessing and contrastive training; transformers-compatible weights.

pub mod error;

pub use error::{Error, Result};
