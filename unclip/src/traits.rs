//! The stage interfaces the pipelines compose. Each stage is a trait object, so a user can swap in
//! their own prior, decoder or upsampler, or leave the upsampler out; samplers come through the
//! scheduler crate's [`Scheduler`](unclip_scheduler::Scheduler) trait.
//!
//! Stages take their inputs on any device/dtype and return results on their own device; the
//! pipeline runs the diffusion loops (guidance, noise draws, callbacks) around their single
//! model evaluations.

use crate::Result;
use image::DynamicImage;
use std::path::Path;
use tch::{Device, Kind, Tensor};
pub use unclip_prior::TextConditioning;

/// CLIP text outputs of a batch of prompts, with what the tokenizer had to change.
#[derive(Debug)]
pub struct TextEncoding {
    /// (B, L) token ids.
    pub input_ids: Tensor,
    /// The conditioning: projected text embeddings (B, D), last hidden states (B, L, E),
    /// keep-mask (B, L).
    pub conditioning: TextConditioning,
    /// One line per prompt that was truncated to the context length.
    pub warnings: Vec<String>,
}

/// Prompts to CLIP text embeddings (the prior's and the decoder's text conditioning).
pub trait TextEncoder {
    /// Encodes `prompts` (at least one; the empty prompt is valid). Too-long prompts are
    /// truncated and reported in [`TextEncoding::warnings`].
    fn encode(&self, prompts: &[&str]) -> Result<TextEncoding>;

    /// Writes the component (tokenizer excluded) in its checkpoint layout.
    fn save_pretrained(&self, dir: &Path) -> Result<()>;

    /// Writes the tokenizer folder.
    fn save_tokenizer(&self, dir: &Path) -> Result<()>;
}

/// Images to CLIP image embeddings (image variations, interpolation, reranking).
pub trait ImageEncoder {
    /// (B, D) unnormalized CLIP image embeddings of decoded images (any size or color type).
    fn embed_images(&self, images: &[DynamicImage]) -> Result<Tensor>;

    /// (B, D) embeddings of image tensors (B, 3, H, W) with values in [0, 1].
    fn embed_tensor(&self, images: &Tensor) -> Result<Tensor>;

    /// Writes the encoder and its preprocessing config (`image_encoder/`, `feature_extractor/`).
    fn save_pretrained(&self, encoder_dir: &Path, processor_dir: &Path) -> Result<()>;
}

/// The diffusion prior: one denoising evaluation in its normalized embedding space.
pub trait Prior {
    /// Size of the image embedding it samples.
    fn embedding_dim(&self) -> i64;
    fn device(&self) -> Device;
    fn kind(&self) -> Kind;
    /// The model output at timestep `t` for noisy latents (B, D) and text conditioning of B rows
    /// (Karlo: the predicted clean latents).
    fn predict(&self, latents: &Tensor, t: i64, text: &TextConditioning) -> Result<Tensor>;
    /// Sampled latents to CLIP image embedding space (Karlo: `x * clip_std + clip_mean`).
    fn post_process(&self, latents: &Tensor) -> Result<Tensor>;
    fn save_pretrained(&self, dir: &Path) -> Result<()>;
}

/// One decoder evaluation, with the conditioning prepared once per sampling run.
pub trait DecoderStep {
    /// Model output (rows of the prepared batch, out_channels, H, W) for a sample of the same
    /// number of rows at timestep `t`.
    fn predict(&self, sample: &Tensor, t: i64) -> Result<Tensor>;
}

/// The image decoder: CLIP image embedding (+ text) to a small image in [-1, 1].
pub trait Decoder {
    /// (channels, height, width) of the samples it denoises.
    fn sample_shape(&self) -> Result<(i64, i64, i64)>;
    /// Channels of its output (2x the sample's channels with a learned variance).
    fn out_channels(&self) -> i64;
    fn device(&self) -> Device;
    fn kind(&self) -> Kind;
    /// Prepares the conditioning for B image embeddings (B, D). `text` has B rows, or 2B rows
    /// ordered `[uncond, cond]` when `guided` (the decoder then also puts its null image
    /// embedding in front of the image embeddings).
    fn prepare<'a>(
        &'a self,
        image_embeddings: &Tensor,
        text: &TextConditioning,
        guided: bool,
    ) -> Result<Box<dyn DecoderStep + 'a>>;
    /// Writes `decoder/` and `text_proj/` (diffusers layout).
    fn save_pretrained(&self, decoder_dir: &Path, text_proj_dir: &Path) -> Result<()>;
}

/// A diffusion upsampler conditioned on a low-resolution image.
pub trait Upsampler {
    /// (channels, height, width) of its output.
    fn sample_shape(&self) -> Result<(i64, i64, i64)>;
    fn device(&self) -> Device;
    fn kind(&self) -> Kind;
    /// The low-resolution image (B, C, h, w) in [-1, 1] brought to the output size, as the model
    /// consumes it at every step.
    fn condition(&self, image_small: &Tensor) -> Result<Tensor>;
    /// Model output at timestep `t`; `last` is true on the final step (Karlo switches to
    /// `super_res_last` there).
    fn predict(&self, sample: &Tensor, low_res: &Tensor, t: i64, last: bool) -> Result<Tensor>;
    /// Writes `super_res_first/` and `super_res_last/`.
    fn save_pretrained(&self, first_dir: &Path, last_dir: &Path) -> Result<()>;
}
