//! One-stage sampling of the decoder and of the super-resolution UNets, through any
//! [`Scheduler`]. Mirrors Karlo's pipeline: classifier-free guidance on the noise prediction only,
//! one batched UNet call on `[uncond, cond]`, the learned variance taken from the conditional
//! half; the text projection, masks and conditioning are computed once, outside the loop.

use crate::text_proj::UnCLIPTextProjModel;
use crate::unet_2d::UNet2DModel;
use crate::unet_2d_condition::{Conditioning, UNet2DConditionModel};
use crate::upsample::resize_bicubic_aa;
use crate::{Error, Result};
use tch::Tensor;
use unclip_scheduler::{NoiseSource, Scheduler, classifier_free_guidance};

/// What the decoder is conditioned on (CLIP outputs for B images).
#[derive(Debug)]
pub struct DecoderInputs<'a> {
    /// CLIP image embeddings (B, clip_embeddings_dim) (from the prior, or an image encoder).
    pub image_embeddings: &'a Tensor,
    /// CLIP text embeddings: (2B, D) ordered [uncond, cond] with guidance, (B, D) without.
    pub prompt_embeds: &'a Tensor,
    /// CLIP last hidden states, (2B | B, L, D), same order.
    pub text_hidden_states: &'a Tensor,
    /// Keep-mask of the text tokens, (2B | B, L).
    pub text_mask: &'a Tensor,
}

/// Sampling settings of the decoder stage.
#[derive(Debug, Clone, Copy)]
pub struct DecoderSampling {
    pub num_inference_steps: usize,
    /// `Some(s)`: classifier-free guidance with scale `s` (Karlo: 8.0); `None`: conditional only.
    pub guidance_scale: Option<f64>,
    /// Output (height, width); `None`: the config's `sample_size`.
    pub size: Option<(i64, i64)>,
}

fn check_steps(steps: usize) -> Result<()> {
    if steps == 0 {
        return Err(Error::Input("num_inference_steps must be at least 1".into()));
    }
    Ok(())
}

fn initial_latents(
    latents: Option<&Tensor>,
    shape: [i64; 4],
    sigma: f64,
    template: &Tensor,
    noise: &mut dyn NoiseSource,
) -> Result<Tensor> {
    match latents {
        Some(l) if l.size() != shape => {
            Err(Error::Input(format!("latents must have shape {shape:?}, got {:?}", l.size())))
        }
        Some(l) => {
            Ok(l.f_to_kind(template.kind())?.f_to_device(template.device())?.f_mul_scalar(sigma)?)
        }
        None => Ok(noise.randn(&shape, template.kind(), template.device()).f_mul_scalar(sigma)?),
    }
}

fn size_or(
    size: Option<(i64, i64)>,
    sample_size: Option<crate::config::SampleSize>,
) -> Result<(i64, i64)> {
    size.or(sample_size.map(|s| s.hw())).ok_or_else(|| {
        Error::Input("no output size given and the config has no sample_size".into())
    })
}

/// Samples B images with the decoder (Karlo: 64x64 in [-1, 1], clamped). `latents` replaces the
/// initial noise draw (shape (B, sample channels, H, W)).
pub fn sample_decoder(
    unet: &UNet2DConditionModel,
    text_proj: &UnCLIPTextProjModel,
    inputs: &DecoderInputs,
    settings: &DecoderSampling,
    scheduler: &mut dyn Scheduler,
    noise: &mut dyn NoiseSource,
    latents: Option<&Tensor>,
) -> Result<Tensor> {
    check_steps(settings.num_inference_steps)?;
    if let Some(s) = settings.guidance_scale {
        if !s.is_finite() {
            return Err(Error::Input(format!("guidance scale must be finite, got {s}")));
        }
    }
    let cfg = unet.config();
    let guided = settings.guidance_scale.is_some();
    tch::no_grad(|| {
        let proj = text_proj.forward(
            inputs.image_embeddings,
            inputs.prompt_embeds,
            inputs.text_hidden_states,
            guided,
        )?;
        let mask = text_proj.decoder_attention_mask(inputs.text_mask)?;
        let cond = Conditioning::new(
            cfg,
            Some(&proj.encoder_hidden_states),
            Some(&proj.additive_clip_time_embeddings),
            Some(&mask),
        )?;
        let b = inputs.image_embeddings.size()[0];
        let (h, w) = size_or(settings.size, cfg.sample_size)?;
        let c = cfg.sample_channels();
        if cfg.out_channels != c && cfg.out_channels != 2 * c {
            return Err(Error::Config(format!(
                "decoder out_channels {} must be its sample channels {c} or twice it",
                cfg.out_channels
            )));
        }
        scheduler.set_timesteps(settings.num_inference_steps)?;
        let template = &proj.encoder_hidden_states;
        let mut x =
            initial_latents(latents, [b, c, h, w], scheduler.init_noise_sigma(), template, noise)?;
        for t in scheduler.timesteps().to_vec() {
            let x_in = scheduler.scale_model_input(&x, t)?;
            let x_in = if guided { Tensor::f_cat(&[&x_in, &x_in], 0)? } else { x_in };
            let out = unet.forward_cond(&x_in, &Tensor::from(t), &cond)?;
            let out = match settings.guidance_scale {
                Some(s) => classifier_free_guidance(&out, s, Some(c))?,
                None => out,
            };
            x = scheduler.step(&out, t, &x, noise)?;
        }
        Ok(x.f_clamp(-1.0, 1.0)?)
    })
}

/// Sampling settings of a super-resolution stage.
#[derive(Debug, Clone, Copy)]
pub struct SuperResSampling {
    pub num_inference_steps: usize,
    /// Output (height, width); `None`: the first UNet's `sample_size`.
    pub size: Option<(i64, i64)>,
}

/// Upsamples `image_small` (B, C, h, w) in [-1, 1]: the low-res image is resized with
/// antialiased bicubic and concatenated to the noisy sample at every step; `last` (Karlo's
/// `super_res_last`) replaces `first` on the final step when given. Returns the final sample
/// (not clamped; Karlo maps it to pixels with `clamp(x / 2 + 0.5, 0, 1)`).
pub fn sample_super_res(
    first: &UNet2DModel,
    last: Option<&UNet2DModel>,
    image_small: &Tensor,
    settings: &SuperResSampling,
    scheduler: &mut dyn Scheduler,
    noise: &mut dyn NoiseSource,
    latents: Option<&Tensor>,
) -> Result<Tensor> {
    check_steps(settings.num_inference_steps)?;
    let cfg = first.config();
    let c = cfg.in_channels / 2;
    let size = image_small.size();
    if cfg.in_channels % 2 != 0 || size.len() != 4 || size[1] != c {
        return Err(Error::Input(format!(
            "low-res image must be (B, {c}, h, w) for an upsampler with {} input channels, got {size:?}",
            cfg.in_channels
        )));
    }
    if let Some(l) = last {
        if l.config().in_channels != cfg.in_channels {
            return Err(Error::Input("the two super-res UNets take different inputs".into()));
        }
    }
    let (h, w) = size_or(settings.size, cfg.sample_size)?;
    tch::no_grad(|| {
        scheduler.set_timesteps(settings.num_inference_steps)?;
        let mut x = initial_latents(
            latents,
            [size[0], c, h, w],
            scheduler.init_noise_sigma(),
            image_small,
            noise,
        )?;
        let upscaled = resize_bicubic_aa(image_small, h, w)?;
        let timesteps = scheduler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            let unet = match last {
                Some(l) if i + 1 == timesteps.len() => l,
                _ => first,
            };
            let x_in = scheduler.scale_model_input(&x, t)?;
            let out =
                unet.forward(&Tensor::f_cat(&[&x_in, &upscaled], 1)?, &Tensor::from(t), None)?;
            x = scheduler.step(&out, t, &x, noise)?;
        }
        Ok(x)
    })
}
