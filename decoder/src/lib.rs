//! The unCLIP decoder UNet, text projection and super-resolution UNets (Karlo/diffusers layout).
//!
//! - [`config`]: the components' `config.json` files (serde), with unsupported options refused;
//! - [`layers`], [`resnet`], [`attention`], [`blocks`]: the shared building blocks;
//! - [`unet_2d_condition`]: the decoder UNet; [`unet_2d`]: the super-resolution UNets;
//! - [`text_proj`]: how CLIP embeddings condition the decoder;
//! - [`upsample`]: the antialiased bicubic resize of the low-res input;
//! - [`checkpoint`]: loading and saving in the diffusers layout;
//! - [`sampling`]: guided decoder sampling and super-resolution through any `Scheduler`;
//! - [`train`]: the decoder and upsampler training losses and an optimizer step.

pub mod attention;
pub mod blocks;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod layers;
pub mod resnet;
pub mod sampling;
pub mod text_proj;
pub mod train;
pub mod unet_2d;
pub mod unet_2d_condition;
pub mod upsample;

pub use config::{TextProjConfig, UNet2DConditionConfig, UNet2DConfig};
pub use error::{Error, Result};
pub use text_proj::{TextProjOutput, UnCLIPTextProjModel};
pub use unet_2d::UNet2DModel;
pub use unet_2d_condition::{Conditioning, UNet2DConditionModel};
