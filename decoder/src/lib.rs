//! The unCLIP decoder UNet, text projection and super-resolution UNets (Karlo/diffusers layout).

pub mod error;

pub use error::{Error, Result};
