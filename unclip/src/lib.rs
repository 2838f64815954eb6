//! unCLIP text-to-image on libtorch: the facade over the stage crates.
//!
//! ```text
//! prompt --clip--> text embedding --prior--> image embedding --decoder--> 64 px --upsamplers--> 256 px
//! ```
//!
//! - [`traits`]: the stage interfaces ([`TextEncoder`], [`ImageEncoder`], [`Prior`],
//!   [`Decoder`], [`Upsampler`]; samplers through [`scheduler::Scheduler`]), implemented for
//!   this workspace's models in [`stages`];
//! - [`loading`]: [`Unclip::from_pretrained`] / [`Unclip::save_pretrained`] for diffusers-layout
//!   Karlo folders, with per-component device and dtype ([`LoadOptions`]);
//! - [`hub`]: Hugging Face repo ids (`org/name`) resolved through the local hub cache (and
//!   downloaded, with the `hub` feature);
//! - [`pipeline`]: text-to-image ([`TextToImage`]), per-step callbacks, intermediate results;
//! - [`sampling`]: the steps and guidance a model folder recommends ([`SamplingDefaults`]);
//! - [`variation`], [`manipulate`], [`rerank`]: image variations (also from DDIM inversion),
//!   interpolation, text diffs, CLIP reranking;
//! - [`output`]: tensors to `RgbImage`, `ndarray` and PNG;
//! - [`data`]: training data from your own images (image folders, webdataset shards,
//!   precomputed embeddings, the shapes scenes) and a parallel, resumable batch loader;
//! - [`train`]: every stage trained from a TOML run config on any [`data`] source, resumable, and
//!   exported as a model folder.
//!
//! ```no_run
//! # fn main() -> unclip::Result<()> {
//! use unclip::{LoadOptions, TextToImage, Unclip, output};
//! let mut model = Unclip::from_pretrained("karlo-v1-alpha", &LoadOptions::default())?;
//! let req = TextToImage { seed: Some(0), ..TextToImage::new("a photo of a corgi") };
//! let out = model.text_to_image(&req, &mut |s| eprintln!("{:?} {}/{}", s.stage, s.step + 1, s.total))?;
//! output::save_pngs(&out.images, std::path::Path::new("out"), "corgi-")?;
//! # Ok(()) }
//! ```
//!
//! The stage crates are re-exported: [`clip`], [`prior`], [`decoder`], [`scheduler`], [`core`].

pub mod data;
pub mod error;
pub mod hub;
pub mod loading;
pub mod manipulate;
pub mod output;
pub mod pipeline;
pub mod rerank;
pub mod sampling;
pub mod shapes;
pub mod stages;
pub mod train;
pub mod traits;
pub mod variation;

pub use error::{Error, Result};
pub use loading::LoadOptions;
pub use manipulate::{Endpoint, slerp, text_diff_embedding};
pub use pipeline::{
    Candidates, CascadeStage, DecodeOptions, Generation, Stage, StepInfo, TextToImage, Unclip,
    no_progress,
};
pub use rerank::Ranked;
pub use sampling::SamplingDefaults;
pub use traits::{Decoder, DecoderStep, ImageEncoder, Prior, TextEncoder, TextEncoding, Upsampler};
pub use unclip_clip as clip;
pub use unclip_core as core;
pub use unclip_core::tch;
pub use unclip_decoder as decoder;
pub use unclip_dist as dist;
pub use unclip_prior as prior;
pub use unclip_scheduler as scheduler;
pub use variation::{Start, Variations};
