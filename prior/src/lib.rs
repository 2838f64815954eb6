//! The unCLIP diffusion prior (Karlo/diffusers PriorTransformer): text embedding to CLIP image embedding.

pub mod error;

pub use error::{Error, Result};
