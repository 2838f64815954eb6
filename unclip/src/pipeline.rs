//! The unCLIP pipeline object and text-to-image generation: prompt(s) -> CLIP text embeddings ->
//! prior (guided) -> image embedding -> decoder (guided) -> 64 px -> super-resolution.
//!
//! The diffusion loops run here, over the stage traits, in UnCLIPPipeline's order: with
//! [`TorchNoise`] on the CPU the same seed draws the same noise as diffusers (spec section 1).

use crate::sampling::SamplingDefaults;
use crate::traits::{
    Decoder, ImageEncoder, Prior, TextConditioning, TextEncoder, TextEncoding, Upsampler,
};
use crate::{Error, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};
use unclip_scheduler::{NoiseSource, Scheduler, TorchNoise, classifier_free_guidance};

/// Which loop a step belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Prior,
    Decoder,
    SuperRes,
    /// The second super-resolution stage ([`Unclip::upsampler_2`]).
    SuperRes2,
    /// DDIM inversion of an input image (variations from the image itself).
    Inversion,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Prior => "prior",
            Stage::Decoder => "decoder",
            Stage::SuperRes => "super-resolution",
            Stage::SuperRes2 => "second super-resolution",
            Stage::Inversion => "DDIM inversion",
        })
    }
}

/// What the per-step callback sees (for progress bars, previews and inspection).
#[derive(Debug)]
pub struct StepInfo<'a> {
    pub stage: Stage,
    /// 0-based index of the step just taken.
    pub step: usize,
    pub total: usize,
    pub timestep: i64,
    /// The (guided) model output the sampler consumed.
    pub model_output: &'a Tensor,
    /// The latents after the step.
    pub latents: &'a Tensor,
}

/// A no-op per-step callback.
pub fn no_progress(_: &StepInfo) {}

/// Text-to-image settings. Defaults are UnCLIPPipeline's (25/25/7 steps, guidance 4 and 8).
#[derive(Debug, Clone, PartialEq)]
pub struct TextToImage {
    pub prompts: Vec<String>,
    /// The unconditional prompt of classifier-free guidance (diffusers: always "").
    pub negative_prompt: String,
    pub num_images_per_prompt: usize,
    pub prior_steps: usize,
    pub prior_guidance_scale: f64,
    /// Best-of-N: sample this many image embeddings per image and keep the one closest to the
    /// prompt's CLIP text embedding (1: off; then the draws equal diffusers').
    pub prior_candidates: usize,
    pub decoder_steps: usize,
    pub decoder_guidance_scale: f64,
    /// Best-of-N at the decoder: draw this many decoder images per image and upsample only the
    /// one whose CLIP image embedding is closest to the prompt's text embedding (1: off). Cheap
    /// where the decoder is small and the upsamplers dominate; needs an image encoder.
    pub decoder_candidates: usize,
    pub super_res_steps: usize,
    /// Seeds libtorch's generator (same seed, same images); `None` continues its current state.
    pub seed: Option<u64>,
}

impl Default for TextToImage {
    fn default() -> Self {
        let k = SamplingDefaults::KARLO;
        Self {
            prompts: Vec::new(),
            negative_prompt: String::new(),
            num_images_per_prompt: 1,
            prior_steps: k.prior_steps,
            prior_guidance_scale: k.prior_guidance_scale,
            prior_candidates: 1,
            decoder_steps: k.decoder_steps,
            decoder_guidance_scale: k.decoder_guidance_scale,
            decoder_candidates: k.decoder_candidates,
            super_res_steps: k.super_res_steps,
            seed: None,
        }
    }
}

impl TextToImage {
    pub fn new<S: Into<String>>(prompt: S) -> Self {
        Self { prompts: vec![prompt.into()], ..Self::default() }
    }
}

/// Decoder and super-resolution settings (shared by every way of getting an image embedding).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeOptions {
    pub decoder_steps: usize,
    pub decoder_guidance_scale: f64,
    pub super_res_steps: usize,
    pub seed: Option<u64>,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        SamplingDefaults::KARLO.decode_options()
    }
}

/// The most rows (images, or prior candidates) one call computes: about a million. Larger
/// counts are certainly mistakes (`usize::MAX` from an unchecked subtraction, say), and every
/// count must stay far below the `i64` sizes libtorch takes.
pub const MAX_BATCH: usize = 1 << 20;

pub(crate) fn check_steps(what: &str, n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::Input(format!("{what} must be at least 1")));
    }
    Ok(())
}

/// A count of images (or candidates, frames): at least 1 and at most [`MAX_BATCH`].
pub(crate) fn check_count(what: &str, n: usize) -> Result<()> {
    check_steps(what, n)?;
    if n > MAX_BATCH {
        return Err(Error::Input(format!(
            "{what} is {n}, more than the {MAX_BATCH} one call allows"
        )));
    }
    Ok(())
}

/// The product of named counts, refused (naming them) when it exceeds [`MAX_BATCH`].
pub(crate) fn check_product(counts: &[(&str, usize)]) -> Result<i64> {
    let total = counts.iter().try_fold(1usize, |acc, (_, n)| acc.checked_mul(*n));
    match total {
        Some(t) if t <= MAX_BATCH => Ok(t as i64),
        _ => {
            let terms: Vec<String> = counts.iter().map(|(w, n)| format!("{w} ({n})")).collect();
            Err(Error::Input(format!(
                "{} asks for more than the {MAX_BATCH} rows one call allows",
                terms.join(" x ")
            )))
        }
    }
}

/// Index of the first row (along dim 0) holding a NaN or an infinity, if any. A 0-d or 1-d
/// tensor counts as one row.
pub(crate) fn first_non_finite_row(t: &Tensor) -> Result<Option<usize>> {
    let ok = t.f_isfinite()?;
    let rows = match t.dim() {
        0 | 1 => ok.f_all()?.f_reshape([1])?,
        _ => ok.f_flatten(1, -1)?.f_all_dim(1, false)?,
    };
    let rows = Vec::<u8>::try_from(rows.f_to_kind(Kind::Uint8)?.f_to_device(Device::Cpu)?)?;
    Ok(rows.iter().position(|&r| r == 0))
}

/// An input tensor the user gave, refused when it holds NaN or infinite values (naming it and
/// the row).
pub(crate) fn check_finite_input(what: &str, t: &Tensor) -> Result<()> {
    match first_non_finite_row(t)? {
        None => Ok(()),
        Some(r) => Err(Error::Input(format!("{what} holds NaN or infinite values (row {r})"))),
    }
}

pub(crate) fn check_guidance(what: &str, g: f64) -> Result<()> {
    if !g.is_finite() || g <= 0.0 {
        return Err(Error::Input(format!("{what} must be finite and > 0, got {g}")));
    }
    Ok(())
}

impl DecodeOptions {
    pub(crate) fn validate(&self) -> Result<()> {
        check_steps("decoder_steps", self.decoder_steps)?;
        check_steps("super_res_steps", self.super_res_steps)?;
        check_guidance("decoder_guidance_scale", self.decoder_guidance_scale)
    }
}

/// Best-of-N details of one stage of a text-to-image run.
#[derive(Debug)]
pub struct Candidates {
    /// (N, B, D): every sampled image embedding.
    pub embeddings: Tensor,
    /// (N, B): cosine similarity of each to its prompt's text embedding.
    pub scores: Tensor,
    /// (B,): the kept candidate.
    pub chosen: Tensor,
}

/// Images and the intermediate results that led to them.
#[derive(Debug)]
pub struct Generation {
    /// (B, 3, H, W) float32 in [0, 1] on the CPU (see [`crate::output`] for images and arrays).
    pub images: Tensor,
    /// (B, 3, h, w) the decoder's image in [-1, 1] (before super-resolution).
    pub image_small: Tensor,
    /// (B, D) the CLIP image embeddings the decoder was conditioned on.
    pub image_embeddings: Tensor,
    /// For each image, the index of its prompt (or input image).
    pub source_index: Vec<usize>,
    /// Prior best-of-N (`prior_candidates` > 1): embeddings are CLIP image embeddings.
    pub candidates: Option<Candidates>,
    /// Decoder best-of-N (`decoder_candidates` > 1): embeddings are the CLIP image embeddings
    /// of the decoder's images.
    pub decoder_candidates: Option<Candidates>,
    /// Things the user should know (e.g. truncated prompts).
    pub warnings: Vec<String>,
}

/// A further super-resolution stage run on the first upsampler's output, with its own sampler
/// (Karlo stops at 256 px after one; the embedded model goes 32 -> 64 -> 256 px). Stored as
/// `super_res_2/` and `super_res_2_scheduler/` in a model folder, our extension of the layout.
pub struct CascadeStage {
    pub upsampler: Box<dyn Upsampler>,
    pub scheduler: Box<dyn Scheduler>,
}

/// An unCLIP model: the stages and their samplers. Any stage can be replaced by assigning the
/// public fields (e.g. another prior, a DDIM decoder sampler, no upsampler).
pub struct Unclip {
    pub text_encoder: Box<dyn TextEncoder>,
    /// Absent in image-variation checkpoints.
    pub prior: Option<Box<dyn Prior>>,
    pub decoder: Box<dyn Decoder>,
    /// `None`: the decoder's image is the output.
    pub upsampler: Option<Box<dyn Upsampler>>,
    /// A second upsampler after `upsampler` (`None` in Karlo folders).
    pub upsampler_2: Option<CascadeStage>,
    /// Needed for image variations, interpolation, text diffs and reranking.
    pub image_encoder: Option<Box<dyn ImageEncoder>>,
    pub prior_scheduler: Box<dyn Scheduler>,
    pub decoder_scheduler: Box<dyn Scheduler>,
    pub super_res_scheduler: Box<dyn Scheduler>,
    /// Whether `decoder_scheduler` consumes the decoder's learned-variance channels (Karlo's
    /// learned_range sampler); otherwise only the first half of the channels is passed.
    pub decoder_learned_variance: bool,
    /// The steps and guidance the model folder recommends (`sampling_config.json`; Karlo's
    /// values when absent): `model.sampling.text_to_image(prompt)` builds a request with them.
    pub sampling: SamplingDefaults,
    pub(crate) scheduler_configs: BTreeMap<String, Value>,
    pub(crate) source_class: String,
}

impl std::fmt::Debug for Unclip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unclip")
            .field("class", &self.source_class)
            .field("prior", &self.prior.is_some())
            .field("upsampler", &self.upsampler.is_some())
            .field("upsampler_2", &self.upsampler_2.is_some())
            .field("image_encoder", &self.image_encoder.is_some())
            .finish()
    }
}

/// Runs one reverse-diffusion loop, calling `model(x_in, t, step, last)` per step.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_loop(
    stage: Stage,
    scheduler: &mut dyn Scheduler,
    mut x: Tensor,
    noise: &mut dyn NoiseSource,
    progress: &mut dyn FnMut(&StepInfo),
    mut model: impl FnMut(&Tensor, i64, usize, bool) -> Result<Tensor>,
) -> Result<Tensor> {
    let ts = scheduler.timesteps().to_vec();
    let n = ts.len();
    // One device-side flag per step, read once at the end: no synchronisation inside the loop.
    let mut finite = Vec::with_capacity(n);
    for (i, &t) in ts.iter().enumerate() {
        let x_in = scheduler.scale_model_input(&x, t)?;
        let out = model(&x_in, t, i, i + 1 == n)?;
        x = scheduler.step(&out, t, &x, noise)?;
        finite.push(x.f_isfinite()?.f_all()?);
        progress(&StepInfo {
            stage,
            step: i,
            total: n,
            timestep: t,
            model_output: &out,
            latents: &x,
        });
    }
    if !finite.is_empty() {
        let flags =
            Tensor::f_stack(&finite, 0)?.f_to_kind(Kind::Uint8)?.f_to_device(Device::Cpu)?;
        if let Some(i) = Vec::<u8>::try_from(flags)?.iter().position(|&f| f == 0) {
            return Err(Error::NonFinite { stage, step: i + 1, total: n });
        }
    }
    Ok(x)
}

pub(crate) fn noise_for(seed: Option<u64>) -> TorchNoise {
    match seed {
        Some(s) => TorchNoise::new(s),
        None => TorchNoise::unseeded(),
    }
}

/// Each tensor's rows repeated `n` times in place (row i -> rows i*n .. i*n+n), as
/// `repeat_interleave` in diffusers' `num_images_per_prompt`.
/// The text conditioning of `k` candidates per image, block after block (row j*B + i is
/// candidate j of image i), with guidance's unconditional half first as in `text`.
fn candidate_text(
    cond: &TextConditioning,
    text: &TextConditioning,
    guided: bool,
    k: i64,
) -> Result<TextConditioning> {
    if !guided {
        return Ok(cond.repeat(k)?);
    }
    let b = cond.batch();
    let half = |t: &Tensor| t.f_narrow(0, 0, b);
    let un = TextConditioning::new(
        half(&text.text_embeds)?,
        half(&text.hidden_states)?,
        half(&text.mask)?,
    )?;
    Ok(un.repeat(k)?.cat(&cond.repeat(k)?)?)
}

pub(crate) fn interleave(text: &TextConditioning, n: i64) -> Result<TextConditioning> {
    let r = |t: &Tensor| t.f_repeat_interleave_self_int(n, 0, None);
    Ok(TextConditioning::new(r(&text.text_embeds)?, r(&text.hidden_states)?, r(&text.mask)?)?)
}

impl Unclip {
    /// Composes a pipeline from stages (for checkpoints: [`Unclip::from_pretrained`]).
    pub fn new(
        text_encoder: Box<dyn TextEncoder>,
        prior: Option<Box<dyn Prior>>,
        decoder: Box<dyn Decoder>,
        upsampler: Option<Box<dyn Upsampler>>,
        prior_scheduler: Box<dyn Scheduler>,
        decoder_scheduler: Box<dyn Scheduler>,
        super_res_scheduler: Box<dyn Scheduler>,
    ) -> Self {
        Self {
            text_encoder,
            prior,
            decoder,
            upsampler,
            upsampler_2: None,
            image_encoder: None,
            prior_scheduler,
            decoder_scheduler,
            super_res_scheduler,
            decoder_learned_variance: true,
            sampling: SamplingDefaults::default(),
            scheduler_configs: BTreeMap::new(),
            source_class: String::new(),
        }
    }

    /// Encodes prompts (CLIP text outputs, truncation warnings).
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<TextEncoding> {
        self.text_encoder.encode(prompts)
    }

    /// Guidance text for B images: `[uncond x B, cond]` when guided, else `cond`.
    pub(crate) fn guidance_text(
        &self,
        cond: &TextConditioning,
        negative: &str,
        guided: bool,
    ) -> Result<TextConditioning> {
        if !guided {
            return Ok(cond.clone());
        }
        let uncond = self.text_encoder.encode(&[negative])?.conditioning;
        Ok(uncond.expand_to(cond.batch())?.cat(cond)?)
    }

    /// Prompts to images.
    pub fn text_to_image(
        &mut self,
        req: &TextToImage,
        progress: &mut dyn FnMut(&StepInfo),
    ) -> Result<Generation> {
        check_prompts(req)?;
        let images = request_images(req)?;
        if let Err(Error::Input(count)) =
            check_count("num_images_per_prompt", req.num_images_per_prompt)
        {
            // Past the hard limit, also say what it would need and point to chunked generation.
            return Err(Error::Input(match self.check_fits(images) {
                Err(fit) => format!("{count}: {fit}"),
                Ok(()) => count,
            }));
        }
        self.check_fits(images)?;
        check_count("prior_candidates", req.prior_candidates)?;
        check_count("decoder_candidates", req.decoder_candidates)?;
        for k in [
            ("prior_candidates", req.prior_candidates),
            ("decoder_candidates", req.decoder_candidates),
        ] {
            check_product(&[
                ("prompts", req.prompts.len()),
                ("num_images_per_prompt", req.num_images_per_prompt),
                k,
            ])?;
        }
        if req.decoder_candidates > 1 && self.image_encoder.is_none() {
            return Err(Error::Pipeline(
                "decoder_candidates > 1 ranks the decoder's images in CLIP space and needs an \
                 image encoder (Unclip::load_image_encoder)"
                    .into(),
            ));
        }
        let dec = DecodeOptions {
            decoder_steps: req.decoder_steps,
            decoder_guidance_scale: req.decoder_guidance_scale,
            super_res_steps: req.super_res_steps,
            seed: None,
        };
        dec.validate()?;
        let mut noise = noise_for(req.seed);
        let PriorDraw { cond, text, guided, image_embeddings, candidates, warnings } =
            self.draw_prior(req, &mut noise, progress)?;
        let k = req.decoder_candidates as i64;
        let (image_small, decoder_candidates) = if k > 1 {
            let rows = image_embeddings.f_repeat([k, 1])?;
            let text = candidate_text(&cond, &text, guided, k)?;
            let all = self.decoder_loop(&rows, &text, guided, &dec, &mut noise, progress, None)?;
            let (best, c) = self.best_decoded(&all, &cond.text_embeds, k)?;
            (best, Some(c))
        } else {
            (
                self.decoder_loop(
                    &image_embeddings,
                    &text,
                    guided,
                    &dec,
                    &mut noise,
                    progress,
                    None,
                )?,
                None,
            )
        };
        let images = self.upsample_all(&image_small, dec.super_res_steps, &mut noise, progress)?;
        let source_index = (0..req.prompts.len())
            .flat_map(|i| std::iter::repeat_n(i, req.num_images_per_prompt))
            .collect();
        Ok(Generation {
            images,
            image_small,
            image_embeddings,
            source_index,
            candidates,
            decoder_candidates,
            warnings,
        })
    }

    /// The prior's image embeddings (prompts x `num_images_per_prompt`, D) for a text-to-image
    /// request, without decoding: the draws [`Unclip::text_to_image`] starts with for the same
    /// request and seed (its `image_embeddings`), so a prior can be measured on its own, as
    /// diffusers' separate prior pipelines allow. The decoder fields of `req` only set whether
    /// guidance runs (one flag for both stages, as in `text_to_image`).
    pub fn prior_image_embeddings(&mut self, req: &TextToImage) -> Result<Tensor> {
        check_prompts(req)?;
        request_images(req)?;
        check_count("num_images_per_prompt", req.num_images_per_prompt)?;
        check_count("prior_candidates", req.prior_candidates)?;
        check_product(&[
            ("prompts", req.prompts.len()),
            ("num_images_per_prompt", req.num_images_per_prompt),
            ("prior_candidates", req.prior_candidates),
        ])?;
        check_guidance("decoder_guidance_scale", req.decoder_guidance_scale)?;
        let mut noise = noise_for(req.seed);
        Ok(self.draw_prior(req, &mut noise, &mut no_progress)?.image_embeddings)
    }

    /// Encodes the prompts and samples the prior: the first half of text-to-image.
    fn draw_prior(
        &mut self,
        req: &TextToImage,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(&StepInfo),
    ) -> Result<PriorDraw> {
        check_steps("prior_steps", req.prior_steps)?;
        check_guidance("prior_guidance_scale", req.prior_guidance_scale)?;
        if self.prior.is_none() {
            return Err(Error::Pipeline(
                "this model has no prior (an image-variation checkpoint): text-to-image needs one"
                    .into(),
            ));
        }
        let prompts: Vec<&str> = req.prompts.iter().map(String::as_str).collect();
        let enc = self.text_encoder.encode(&prompts)?;
        let cond = interleave(&enc.conditioning, req.num_images_per_prompt as i64)?;
        // One guidance flag for both stages, as UnCLIPPipeline.
        let guided = req.prior_guidance_scale > 1.0 || req.decoder_guidance_scale > 1.0;
        let text = self.guidance_text(&cond, &req.negative_prompt, guided)?;
        let (image_embeddings, candidates) =
            self.sample_prior(&cond, &text, guided, req, noise, progress)?;
        Ok(PriorDraw { cond, text, guided, image_embeddings, candidates, warnings: enc.warnings })
    }

    /// Text to image in chunks of at most `batch_size` images, each handed to `on_chunk` (with
    /// the index of its first image in the whole request) as soon as it is done: a request of
    /// any size runs in the memory of one chunk. Rows are the request's in order (prompt 0's
    /// images, then prompt 1's...), and `source_index` in each chunk refers to `req.prompts`.
    /// When the request fits in one chunk this is [`Unclip::text_to_image`] exactly; otherwise
    /// the first chunk is seeded with `req.seed` and the next ones continue the generator, so a
    /// seed and a batch size give the same images every time. Returns the number of images.
    pub fn text_to_image_chunked(
        &mut self,
        req: &TextToImage,
        batch_size: usize,
        progress: &mut dyn FnMut(&StepInfo),
        on_chunk: &mut dyn FnMut(Generation, usize) -> Result<()>,
    ) -> Result<usize> {
        check_steps("batch_size", batch_size)?;
        check_steps("num_images_per_prompt", req.num_images_per_prompt)?;
        let total = request_images(req)? as usize;
        if total <= batch_size {
            on_chunk(self.text_to_image(req, progress)?, 0)?;
            return Ok(total);
        }
        let per = req.num_images_per_prompt;
        let mut first = 0;
        while first < total {
            let rows = first..total.min(first + batch_size);
            let sub = TextToImage {
                prompts: rows.clone().map(|r| req.prompts[r / per].clone()).collect(),
                num_images_per_prompt: 1,
                seed: if first == 0 { req.seed } else { None },
                ..req.clone()
            };
            let mut g = self.text_to_image(&sub, progress)?;
            g.source_index = rows.map(|r| r / per).collect();
            on_chunk(g, first)?;
            first += batch_size;
        }
        Ok(total)
    }

    /// At least the memory `images` images take at once in the decoder and upsampler loops:
    /// the decoder's latents (twice, with guidance) and output, the upsampler's latents and the
    /// final float images. The networks' activations come on top; this is the part that grows
    /// with the request whatever the model, so a request beyond it cannot fit.
    pub fn memory_needed(&self, images: u128) -> Result<u128> {
        let (c, h, w) = self.decoder.sample_shape()?;
        let elt = unclip_core::memory::element_size(self.decoder.kind());
        let small = [3u128 * 4, c as u128 * elt * 3];
        let mut per_image = small.iter().sum::<u128>() * (h as u128) * (w as u128);
        if let Some(up) = &self.upsampler {
            let (c2, h2, w2) = up.sample_shape()?;
            let elt2 = unclip_core::memory::element_size(up.kind());
            per_image += (c2 as u128 * elt2 * 2 + 3 * 4) * (h2 as u128) * (w2 as u128);
        }
        if let Some(s) = &self.upsampler_2 {
            let (c3, h3, w3) = s.upsampler.sample_shape()?;
            let elt3 = unclip_core::memory::element_size(s.upsampler.kind());
            per_image += (c3 as u128 * elt3 * 2 + 3 * 4) * (h3 as u128) * (w3 as u128);
        }
        images
            .checked_mul(per_image)
            .ok_or_else(|| Error::Input(format!("{images} images: the memory they need overflows")))
    }

    /// Refuses a request of `images` images that cannot fit in the memory of the decoder's
    /// device, saying how much it would need.
    pub(crate) fn check_fits(&self, images: u128) -> Result<()> {
        let bytes = self.memory_needed(images)?;
        let (_, h, w) = self.decoder.sample_shape()?;
        let up = match &self.upsampler {
            Some(u) => {
                u.sample_shape().map(|(_, h, w)| format!(", upsampler sample_size {h}x{w}"))?
            }
            None => String::new(),
        };
        let what = format!(
            "generating {images} images at once (decoder sample_size {h}x{w}{up}; at least, use \
             a smaller batch: Unclip::text_to_image_chunked, or --batch-size)"
        );
        Ok(unclip_core::memory::ensure_fits(&what, bytes, self.decoder.device())?)
    }

    /// The prior's image embeddings (best-of-N applied) without callbacks.
    pub(crate) fn prior_embeddings(
        &mut self,
        cond: &TextConditioning,
        text: &TextConditioning,
        req: &TextToImage,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        check_steps("prior_steps", req.prior_steps)?;
        check_guidance("prior_guidance_scale", req.prior_guidance_scale)?;
        let guided = text.batch() != cond.batch();
        Ok(self.sample_prior(cond, text, guided, req, noise, &mut no_progress)?.0)
    }

    fn sample_prior(
        &mut self,
        cond: &TextConditioning,
        text: &TextConditioning,
        guided: bool,
        req: &TextToImage,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(&StepInfo),
    ) -> Result<(Tensor, Option<Candidates>)> {
        let prior = self.prior.as_deref().ok_or_else(|| Error::Pipeline("no prior".into()))?;
        let k = req.prior_candidates as i64;
        let b = cond.batch();
        let text = if k > 1 { candidate_text(cond, text, guided, k)? } else { text.clone() };
        let rows = k * b;
        self.prior_scheduler.set_timesteps(req.prior_steps)?;
        let sigma = self.prior_scheduler.init_noise_sigma();
        let x = noise
            .randn(&[rows, prior.embedding_dim()], prior.kind(), prior.device())
            .f_mul_scalar(sigma)?;
        let g = req.prior_guidance_scale;
        let latents = run_loop(
            Stage::Prior,
            self.prior_scheduler.as_mut(),
            x,
            noise,
            progress,
            |x, t, _, _| {
                let x_in = if guided { Tensor::f_cat(&[x, x], 0)? } else { x.shallow_clone() };
                let out = prior.predict(&x_in, t, &text)?;
                if guided { Ok(classifier_free_guidance(&out, g, None)?) } else { Ok(out) }
            },
        )?;
        let embeds = prior.post_process(&latents)?;
        if first_non_finite_row(&embeds)?.is_some() {
            let total = self.prior_scheduler.timesteps().len();
            return Err(Error::NonFinite { stage: Stage::Prior, step: total, total });
        }
        if k == 1 {
            return Ok((embeds, None));
        }
        let all = embeds.f_view([k, b, -1])?;
        let (chosen, scores) = unclip_prior::sampling::select_best(&all, &cond.text_embeds)?;
        let d = all.size()[2];
        let idx =
            chosen.f_view([1, b, 1])?.f_expand([1, b, d], false)?.f_to_device(all.device())?;
        let best = all.f_gather(0, &idx, false)?.f_squeeze_dim(0)?;
        Ok((best, Some(Candidates { embeddings: all, scores, chosen })))
    }

    /// Decoder + super-resolution for image embeddings (B, D), conditioned on the text of the
    /// given prompts (one per row, or one for all; "" as in image variations).
    pub fn decode(
        &mut self,
        image_embeddings: &Tensor,
        prompts: &[&str],
        opts: &DecodeOptions,
        progress: &mut dyn FnMut(&StepInfo),
    ) -> Result<(Tensor, Tensor)> {
        opts.validate()?;
        let b = check_embeddings(image_embeddings)?;
        check_finite_input("image_embeddings", image_embeddings)?;
        let enc = self.text_encoder.encode(prompts)?;
        let cond = enc.conditioning.expand_to(b)?;
        let guided = opts.decoder_guidance_scale > 1.0;
        let text = self.guidance_text(&cond, "", guided)?;
        let mut noise = noise_for(opts.seed);
        self.decode_with(image_embeddings, &text, guided, opts, &mut noise, progress, None)
    }

    /// The decoder and super-resolution loops. `start`: initial decoder latents and the sampler
    /// to use instead of `decoder_scheduler` (DDIM after an inversion).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn decode_with(
        &mut self,
        image_embeddings: &Tensor,
        text: &TextConditioning,
        guided: bool,
        opts: &DecodeOptions,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(&StepInfo),
        start: Option<(Tensor, &mut dyn Scheduler)>,
    ) -> Result<(Tensor, Tensor)> {
        let small =
            self.decoder_loop(image_embeddings, text, guided, opts, noise, progress, start)?;
        let images = self.upsample_all(&small, opts.super_res_steps, noise, progress)?;
        Ok((small, images))
    }

    /// The decoder's loop alone, from noise or from `start`'s latents and sampler: images
    /// (B, 3, h, w) in [-1, 1], before super-resolution.
    #[allow(clippy::too_many_arguments)]
    fn decoder_loop(
        &mut self,
        image_embeddings: &Tensor,
        text: &TextConditioning,
        guided: bool,
        opts: &DecodeOptions,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(&StepInfo),
        start: Option<(Tensor, &mut dyn Scheduler)>,
    ) -> Result<Tensor> {
        let b = check_embeddings(image_embeddings)?;
        self.check_fits(b as u128)?;
        let (c, h, w) = self.decoder.sample_shape()?;
        let step = self.decoder.prepare(image_embeddings, text, guided)?;
        let (learned, scale) = (self.decoder_learned_variance, opts.decoder_guidance_scale);
        let (device, kind) = (self.decoder.device(), self.decoder.kind());
        let model = |x: &Tensor, t: i64, learned: bool| -> Result<Tensor> {
            let x_in = if guided { Tensor::f_cat(&[x, x], 0)? } else { x.shallow_clone() };
            let out = step.predict(&x_in, t)?;
            let out = if guided { classifier_free_guidance(&out, scale, Some(c))? } else { out };
            if !learned && out.size()[1] > c { Ok(out.f_narrow(1, 0, c)?) } else { Ok(out) }
        };
        let small = match start {
            Some((x, sched)) => {
                sched.set_timesteps(opts.decoder_steps)?;
                let x = x.f_to_device(device)?.f_to_kind(kind)?;
                run_loop(Stage::Decoder, sched, x, noise, progress, |x, t, _, _| {
                    model(x, t, false)
                })?
            }
            None => {
                self.decoder_scheduler.set_timesteps(opts.decoder_steps)?;
                let sigma = self.decoder_scheduler.init_noise_sigma();
                let x = noise.randn(&[b, c, h, w], kind, device).f_mul_scalar(sigma)?;
                run_loop(
                    Stage::Decoder,
                    self.decoder_scheduler.as_mut(),
                    x,
                    noise,
                    progress,
                    |x, t, _, _| model(x, t, learned),
                )?
            }
        };
        drop(step);
        Ok(small.f_clamp(-1.0, 1.0)?)
    }

    /// Decoder images (K*B, 3, h, w) in [-1, 1], candidate j of image i in row j*B + i, ranked
    /// by CLIP: the best per image (B, 3, h, w), and all candidates' CLIP embeddings and scores.
    fn best_decoded(
        &self,
        all: &Tensor,
        text_embeds: &Tensor,
        k: i64,
    ) -> Result<(Tensor, Candidates)> {
        let b = all.size()[0] / k;
        let clip = self.clip_image_embeddings(&to_unit_range(all)?)?;
        let embeddings = clip.f_view([k, b, -1])?;
        let (chosen, scores) = unclip_prior::sampling::select_best(&embeddings, text_embeds)?;
        let rows =
            chosen.f_mul_scalar(b)?.f_add(&Tensor::f_arange(b, (Kind::Int64, Device::Cpu))?)?;
        let best = all.f_index_select(0, &rows.f_to_device(all.device())?)?;
        Ok((best, Candidates { embeddings, scores, chosen }))
    }

    /// The super-resolution stages, if any, on decoder images in [-1, 1]; float images in
    /// [0, 1] on the CPU.
    fn upsample_all(
        &mut self,
        small: &Tensor,
        steps: usize,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(&StepInfo),
    ) -> Result<Tensor> {
        if self.upsampler.is_none() {
            return to_unit_range(small);
        }
        to_unit_range(&self.upsample_with(small, steps, noise, progress)?)
    }

    /// Super-resolution alone: the upsampler's loop on low-resolution images (B, 3, h, w) in
    /// [0, 1], as if the decoder had drawn them. Grades the upsampler apart from the decoder (on
    /// ground-truth renders, say). Returns images in [0, 1] on the CPU.
    pub fn super_resolve(
        &mut self,
        images: &Tensor,
        steps: usize,
        seed: Option<u64>,
    ) -> Result<Tensor> {
        check_steps("super_res_steps", steps)?;
        if self.upsampler.is_none() {
            return Err(Error::Input("this model has no upsampler".into()));
        }
        check_finite_input("images", images)?;
        let small = images.f_mul_scalar(2.0)?.f_sub_scalar(1.0)?.f_clamp(-1.0, 1.0)?;
        let mut noise = noise_for(seed);
        let last = self.upsample_with(&small, steps, &mut noise, &mut no_progress)?;
        to_unit_range(&last)
    }

    /// The upsampler's loop on `small` (B, 3, h, w) in [-1, 1]; the caller checks there is one.
    fn upsample_with(
        &mut self,
        small: &Tensor,
        steps: usize,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(&StepInfo),
    ) -> Result<Tensor> {
        let Some(up) = self.upsampler.as_deref() else {
            return Err(Error::Pipeline("no upsampler".into()));
        };
        let low = up.condition(small)?;
        let b = small.size()[0];
        let (c2, h2, w2) = up.sample_shape()?;
        self.super_res_scheduler.set_timesteps(steps)?;
        let sigma = self.super_res_scheduler.init_noise_sigma();
        let x = noise.randn(&[b, c2, h2, w2], up.kind(), up.device()).f_mul_scalar(sigma)?;
        let out = run_loop(
            Stage::SuperRes,
            self.super_res_scheduler.as_mut(),
            x,
            noise,
            progress,
            |x, t, _, last| up.predict(x, &low, t, last),
        )?;
        let Some(stage) = self.upsampler_2.as_mut() else { return Ok(out) };
        let up = stage.upsampler.as_ref();
        let low = up.condition(&out.f_clamp(-1.0, 1.0)?)?;
        drop(out);
        let (c3, h3, w3) = up.sample_shape()?;
        stage.scheduler.set_timesteps(steps)?;
        let sigma = stage.scheduler.init_noise_sigma();
        let x = noise.randn(&[b, c3, h3, w3], up.kind(), up.device()).f_mul_scalar(sigma)?;
        run_loop(Stage::SuperRes2, stage.scheduler.as_mut(), x, noise, progress, |x, t, _, last| {
            up.predict(x, &low, t, last)
        })
    }
}

/// A text-to-image request's prompt checks: at least one, none empty.
fn check_prompts(req: &TextToImage) -> Result<()> {
    if req.prompts.is_empty() {
        return Err(Error::Input("no prompts given".into()));
    }
    if let Some(i) = req.prompts.iter().position(|p| p.trim().is_empty()) {
        return Err(Error::Input(format!(
            "prompt {i} is empty (the empty prompt is the unconditional one; use image \
             variations or pass a description)"
        )));
    }
    Ok(())
}

/// What [`Unclip::draw_prior`] hands the decoder stage.
struct PriorDraw {
    cond: TextConditioning,
    text: TextConditioning,
    guided: bool,
    image_embeddings: Tensor,
    candidates: Option<Candidates>,
    warnings: Vec<String>,
}

/// How many images a request makes (prompts x images per prompt), refused when it overflows.
fn request_images(req: &TextToImage) -> Result<u128> {
    (req.prompts.len() as u128)
        .checked_mul(req.num_images_per_prompt as u128)
        .filter(|&n| n <= i64::MAX as u128)
        .ok_or_else(|| {
            Error::Input(format!(
                "num_images_per_prompt {} x {} prompts is too many images",
                req.num_images_per_prompt,
                req.prompts.len()
            ))
        })
}

/// Model-range images ([-1, 1]) as float images in [0, 1] on the CPU.
fn to_unit_range(x: &Tensor) -> Result<Tensor> {
    Ok(x.f_to_kind(Kind::Float)?
        .f_mul_scalar(0.5)?
        .f_add_scalar(0.5)?
        .f_clamp(0.0, 1.0)?
        .f_to_device(Device::Cpu)?)
}

pub(crate) fn check_embeddings(e: &Tensor) -> Result<i64> {
    let s = e.size();
    if s.len() != 2 || s[0] == 0 {
        return Err(Error::Input(format!("image embeddings must be (B, D) with B > 0, got {s:?}")));
    }
    Ok(s[0])
}
