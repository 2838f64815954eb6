//! Image variations: image -> CLIP image embedding -> decoder -> super-resolution, from noise
//! (UnCLIPImageVariationPipeline) or from the DDIM inversion of the image itself (the paper's
//! variations that keep the image's layout).

use crate::output::image_to_tensor;
use crate::pipeline::{
    DecodeOptions, Generation, Stage, StepInfo, Unclip, check_count, check_product,
    first_non_finite_row, interleave, noise_for, run_loop,
};
use crate::{Error, Result};
use image::DynamicImage;
use tch::Tensor;
use unclip_decoder::upsample::resize_bicubic_aa;
use unclip_scheduler::{
    BetaSchedule, DdimInverseScheduler, DdimInverseSchedulerConfig, DdimScheduler,
    DdimSchedulerConfig, NoiseSource, Scheduler, TimestepSpacing,
};

/// Where the decoder starts.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Start {
    /// Gaussian noise (diffusers' pipeline).
    #[default]
    Noise,
    /// The decoder's DDIM inversion of the input image (resized to the decoder's size),
    /// conditioned on its own embedding; then DDIM sampling with `eta` (0 reconstructs, larger
    /// values vary more).
    DdimInversion { eta: f64 },
}

/// Image-variation settings (defaults: UnCLIPImageVariationPipeline's 25 decoder / 7
/// super-resolution steps, guidance 8).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Variations {
    pub num_images_per_image: usize,
    pub decode: DecodeOptions,
    pub start: Start,
}

impl Default for Variations {
    fn default() -> Self {
        Self { num_images_per_image: 1, decode: DecodeOptions::default(), start: Start::Noise }
    }
}

/// The DDIM pair used for inversion: Karlo's cosine schedule, the same spacing both ways.
fn ddim_pair(eta: f64) -> Result<(DdimInverseScheduler, DdimScheduler)> {
    let inv = DdimInverseScheduler::new(DdimInverseSchedulerConfig {
        beta_schedule: BetaSchedule::SquaredcosCapV2,
        clip_sample: false,
        set_alpha_to_one: false,
        timestep_spacing: TimestepSpacing::Leading,
        ..Default::default()
    })?;
    let fwd = DdimScheduler::new(DdimSchedulerConfig {
        beta_schedule: BetaSchedule::SquaredcosCapV2,
        clip_sample: true,
        set_alpha_to_one: false,
        timestep_spacing: TimestepSpacing::Leading,
        ..Default::default()
    })?
    .with_eta(eta)?;
    Ok((inv, fwd))
}

impl Unclip {
    /// CLIP image embeddings (B, D) of images (needs an image encoder). An embedding with NaN
    /// or infinite values (broken encoder weights) is an error naming the image.
    pub fn embed_images(&self, images: &[DynamicImage]) -> Result<Tensor> {
        if images.is_empty() {
            return Err(Error::Input("no images given".into()));
        }
        check_count("images", images.len())?;
        let embeds = self
            .image_encoder
            .as_deref()
            .ok_or_else(|| {
                Error::Pipeline(
                    "no image encoder: load an image-variation checkpoint or add one with \
                     Unclip::load_image_encoder"
                        .into(),
                )
            })?
            .embed_images(images)?;
        match first_non_finite_row(&embeds)? {
            None => Ok(embeds),
            Some(i) => Err(Error::Pipeline(format!(
                "the image encoder's embedding of image {i} holds NaN or infinite values (its \
                 weights are broken)"
            ))),
        }
    }

    /// Variations of each image.
    pub fn variations(
        &mut self,
        images: &[DynamicImage],
        opts: &Variations,
        progress: &mut dyn FnMut(&StepInfo),
    ) -> Result<Generation> {
        opts.decode.validate()?;
        check_count("num_images_per_image", opts.num_images_per_image)?;
        check_product(&[
            ("images", images.len()),
            ("num_images_per_image", opts.num_images_per_image),
        ])?;
        let n = opts.num_images_per_image as i64;
        let embeds = self.embed_images(images)?.f_repeat_interleave_self_int(n, 0, None)?;
        let mut noise = noise_for(opts.decode.seed);
        let blank = vec![""; images.len()];
        let (small, out) = match opts.start {
            Start::Noise => {
                self.decode_empty_text(&embeds, &blank, n, &opts.decode, &mut noise, progress)?
            }
            Start::DdimInversion { eta } => {
                let pixels = images
                    .iter()
                    .map(image_to_tensor)
                    .collect::<Result<Vec<_>>>()?
                    .into_iter()
                    .map(|t| self.decoder_sized(&t))
                    .collect::<Result<Vec<_>>>()?;
                let x0 = Tensor::f_cat(&pixels, 0)?.f_repeat_interleave_self_int(n, 0, None)?;
                self.decode_inverted(&embeds, &x0, eta, &opts.decode, &mut noise, progress)?
            }
        };
        Ok(Generation {
            images: out,
            image_small: small,
            image_embeddings: embeds,
            source_index: (0..images.len())
                .flat_map(|i| std::iter::repeat_n(i, n as usize))
                .collect(),
            candidates: None,
            decoder_candidates: None,
            warnings: Vec::new(),
        })
    }

    /// An image tensor (1, 3, H, W) in [0, 1] at the decoder's size, in [-1, 1].
    pub(crate) fn decoder_sized(&self, img: &Tensor) -> Result<Tensor> {
        let (_, h, w) = self.decoder.sample_shape()?;
        Ok(resize_bicubic_aa(img, h, w)?
            .f_mul_scalar(2.0)?
            .f_sub_scalar(1.0)?
            .f_clamp(-1.0, 1.0)?)
    }

    /// Decodes with the empty prompt as text (the variation pipeline's conditioning).
    pub(crate) fn decode_empty_text(
        &mut self,
        embeds: &Tensor,
        prompts: &[&str],
        n: i64,
        opts: &DecodeOptions,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(&StepInfo),
    ) -> Result<(Tensor, Tensor)> {
        let guided = opts.decoder_guidance_scale > 1.0;
        let cond = interleave(&self.text_encoder.encode(prompts)?.conditioning, n)?;
        let cond = cond.expand_to(embeds.size()[0])?;
        let text = self.guidance_text(&cond, "", guided)?;
        self.decode_with(embeds, &text, guided, opts, noise, progress, None)
    }

    /// DDIM-inverts `x0` (B, 3, h, w) in [-1, 1] through the decoder conditioned on `embeds`,
    /// then decodes from the result with DDIM.
    pub(crate) fn decode_inverted(
        &mut self,
        embeds: &Tensor,
        x0: &Tensor,
        eta: f64,
        opts: &DecodeOptions,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(&StepInfo),
    ) -> Result<(Tensor, Tensor)> {
        if !eta.is_finite() || eta < 0.0 {
            return Err(Error::Input(format!("eta must be finite and >= 0, got {eta}")));
        }
        let b = embeds.size()[0];
        let (mut inv, mut fwd) = ddim_pair(eta)?;
        let cond = self.text_encoder.encode(&[""])?.conditioning.expand_to(b)?;
        let (c, device, kind) =
            (self.decoder.sample_shape()?.0, self.decoder.device(), self.decoder.kind());
        let xt = {
            // Inversion runs conditional only: guidance would not be inverted by the reverse pass.
            let step = self.decoder.prepare(embeds, &cond, false)?;
            inv.set_timesteps(opts.decoder_steps)?;
            let x = x0.f_to_device(device)?.f_to_kind(kind)?;
            run_loop(Stage::Inversion, &mut inv, x, noise, progress, |x, t, _, _| {
                let out = step.predict(x, t)?;
                Ok(out.f_narrow(1, 0, c.min(out.size()[1]))?)
            })?
        };
        // A diverged inversion (non-finite latents) stopped the loop with Error::NonFinite.
        let guided = opts.decoder_guidance_scale > 1.0;
        let text = self.guidance_text(&cond, "", guided)?;
        self.decode_with(embeds, &text, guided, opts, noise, progress, Some((xt, &mut fwd)))
    }
}
