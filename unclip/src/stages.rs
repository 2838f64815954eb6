//! The stage traits implemented for this workspace's models (Karlo's components).

use crate::traits::{
    Decoder, DecoderStep, ImageEncoder, Prior, TextConditioning, TextEncoder, TextEncoding,
    Upsampler,
};
use crate::{Error, Result};
use image::DynamicImage;
use serde_json::Value;
use std::path::Path;
use tch::{Device, Kind, Tensor, nn};
use unclip_clip::{ClipModel, ClipTokenizer, ImageProcessor, ProcessorConfig, Towers, Truncation};
use unclip_decoder::checkpoint::{self, Loaded};
use unclip_decoder::upsample::resize_bicubic_aa;
use unclip_decoder::{Conditioning, UNet2DConditionModel, UNet2DModel, UnCLIPTextProjModel};
use unclip_prior::PriorTransformer;

fn on(t: &Tensor, device: Device, kind: Kind) -> Result<Tensor> {
    Ok(t.f_to_device(device)?.f_to_kind(kind)?)
}

fn text_on(text: &TextConditioning, device: Device, kind: Kind) -> Result<TextConditioning> {
    Ok(TextConditioning::new(
        on(&text.text_embeds, device, kind)?,
        on(&text.hidden_states, device, kind)?,
        text.mask.f_to_device(device)?,
    )?)
}

/// CLIP's tokenizer and text tower (`tokenizer/`, `text_encoder/`).
#[derive(Debug)]
pub struct ClipTextEncoder {
    pub tokenizer: ClipTokenizer,
    pub model: ClipModel,
}

impl ClipTextEncoder {
    /// The text tower of `model_dir` (a `CLIPTextModelWithProjection` or a whole `CLIPModel`)
    /// with the tokenizer of `tokenizer_dir`.
    pub fn load(
        model_dir: &Path,
        tokenizer_dir: &Path,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let model = ClipModel::load(model_dir, Towers::Text, device, kind)?;
        let tokenizer = ClipTokenizer::from_dir(tokenizer_dir)?;
        Ok(ClipTextEncoder { tokenizer, model })
    }
}

impl TextEncoder for ClipTextEncoder {
    fn encode(&self, prompts: &[&str]) -> Result<TextEncoding> {
        if prompts.is_empty() {
            return Err(Error::Input("no prompts given".into()));
        }
        let device = self.model.device();
        let batch = self.tokenizer.encode_batch(prompts, Truncation::Truncate, device)?;
        let ctx = self.tokenizer.context_length();
        let warnings = prompts
            .iter()
            .zip(batch.truncated.iter().zip(&batch.original_lens))
            .filter(|(_, (t, _))| **t)
            .map(|(p, (_, n))| {
                format!("prompt truncated from {n} to {ctx} tokens (CLIP's context): {p:?}")
            })
            .collect();
        // As diffusers: the text tower sees no padding mask (CLIP's causal mask suffices); the
        // mask conditions the prior and the decoder.
        let out = tch::no_grad(|| self.model.encode_text(&batch.input_ids, None))?;
        let mask = batch.attention_mask.f_ne(0)?;
        let conditioning = TextConditioning::new(out.text_embeds, out.last_hidden_state, mask)?;
        Ok(TextEncoding { input_ids: batch.input_ids, conditioning, warnings })
    }

    fn save_pretrained(&self, dir: &Path) -> Result<()> {
        Ok(self.model.save(dir, None)?)
    }

    fn save_tokenizer(&self, dir: &Path) -> Result<()> {
        Ok(self.tokenizer.save(dir)?)
    }
}

/// CLIP's vision tower with its image processor (`image_encoder/`, `feature_extractor/`).
#[derive(Debug)]
pub struct ClipImageEncoder {
    pub processor: ImageProcessor,
    /// `preprocessor_config.json` as read, written back unchanged by `save_pretrained`.
    pub processor_json: Value,
    pub model: ClipModel,
    pub kind: Kind,
}

impl ClipImageEncoder {
    /// The vision tower of `model_dir` (a `CLIPVisionModelWithProjection` or a whole
    /// `CLIPModel`) with the preprocessing of `processor_file` (`preprocessor_config.json`;
    /// CLIP's default at the model's image size when it does not exist).
    pub fn load(
        model_dir: &Path,
        processor_file: &Path,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let model = ClipModel::load(model_dir, Towers::Vision, device, kind)?;
        // Present in any form (a FIFO or a folder included) means read it: `read_json` names what it
        // is instead of silently falling back to the default.
        let (processor, processor_json) = if unclip_core::fsutil::is_present(processor_file) {
            let v: Value = unclip_core::config::read_json(processor_file)?;
            (ImageProcessor::new(ProcessorConfig::from_value(&v)?), v)
        } else {
            let side = model.vision_config().map(|v| v.image_size).unwrap_or(224) as usize;
            (
                ImageProcessor::new(ProcessorConfig::clip(side)),
                crate::loading::clip_processor_json(side),
            )
        };
        Ok(ClipImageEncoder { processor, processor_json, model, kind })
    }

    fn embed_pixels(&self, pixels: &Tensor) -> Result<Tensor> {
        let pixels = on(pixels, self.model.device(), self.kind)?;
        Ok(tch::no_grad(|| self.model.encode_image(&pixels))?.image_embeds)
    }
}

impl ImageEncoder for ClipImageEncoder {
    fn embed_images(&self, images: &[DynamicImage]) -> Result<Tensor> {
        let pixels = self.processor.preprocess_batch(images)?;
        self.embed_pixels(&pixels)
    }

    fn embed_tensor(&self, images: &Tensor) -> Result<Tensor> {
        let pixels = self.processor.preprocess_tensor(&images.f_to_device(Device::Cpu)?)?;
        self.embed_pixels(&pixels)
    }

    fn save_pretrained(&self, encoder_dir: &Path, processor_dir: &Path) -> Result<()> {
        self.model.save(encoder_dir, None)?;
        std::fs::create_dir_all(processor_dir)
            .map_err(|e| unclip_core::Error::io(processor_dir, e))?;
        unclip_core::config::write_json(
            &processor_dir.join("preprocessor_config.json"),
            &self.processor_json,
        )?;
        Ok(())
    }
}

/// Karlo's `PriorTransformer` (`prior/`).
#[derive(Debug)]
pub struct KarloPrior {
    pub vs: nn::VarStore,
    pub model: PriorTransformer,
}

impl Prior for KarloPrior {
    fn embedding_dim(&self) -> i64 {
        self.model.config().embedding_dim
    }

    fn device(&self) -> Device {
        self.model.device()
    }

    fn kind(&self) -> Kind {
        self.model.kind()
    }

    fn predict(&self, latents: &Tensor, t: i64, text: &TextConditioning) -> Result<Tensor> {
        text.check(self.model.config())?;
        let text = text_on(text, self.device(), self.kind())?;
        Ok(tch::no_grad(|| {
            self.model.forward(
                latents,
                &Tensor::from(t),
                &text.text_embeds,
                &text.hidden_states,
                Some(&text.mask),
            )
        })?)
    }

    fn post_process(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(tch::no_grad(|| self.model.post_process_latents(latents))?)
    }

    fn save_pretrained(&self, dir: &Path) -> Result<()> {
        Ok(self.model.save_pretrained(&self.vs, dir, None)?)
    }
}

fn loaded_kind(vs: &nn::VarStore) -> Kind {
    vs.variables().values().next().map(|t| t.kind()).unwrap_or(Kind::Float)
}

/// Karlo's decoder UNet and text projection (`decoder/`, `text_proj/`).
#[derive(Debug)]
pub struct KarloDecoder {
    pub unet: Loaded<UNet2DConditionModel>,
    pub text_proj: Loaded<UnCLIPTextProjModel>,
}

struct KarloDecoderStep<'a> {
    unet: &'a UNet2DConditionModel,
    cond: Conditioning,
    device: Device,
    kind: Kind,
}

impl DecoderStep for KarloDecoderStep<'_> {
    fn predict(&self, sample: &Tensor, t: i64) -> Result<Tensor> {
        let x = on(sample, self.device, self.kind)?;
        Ok(tch::no_grad(|| self.unet.forward_cond(&x, &Tensor::from(t), &self.cond))?)
    }
}

impl Decoder for KarloDecoder {
    fn sample_shape(&self) -> Result<(i64, i64, i64)> {
        let cfg = &self.unet.config;
        let (h, w) = cfg
            .sample_size
            .map(|s| s.hw())
            .ok_or_else(|| Error::Pipeline("the decoder config has no sample_size".into()))?;
        Ok((cfg.sample_channels(), h, w))
    }

    fn out_channels(&self) -> i64 {
        self.unet.config.out_channels
    }

    fn device(&self) -> Device {
        self.unet.vs.device()
    }

    fn kind(&self) -> Kind {
        loaded_kind(&self.unet.vs)
    }

    fn prepare<'a>(
        &'a self,
        image_embeddings: &Tensor,
        text: &TextConditioning,
        guided: bool,
    ) -> Result<Box<dyn DecoderStep + 'a>> {
        let (pd, pk) = (self.text_proj.vs.device(), loaded_kind(&self.text_proj.vs));
        let (device, kind) = (self.device(), self.kind());
        let text = text_on(text, pd, pk)?;
        let image = on(image_embeddings, pd, pk)?;
        let cond = tch::no_grad(|| -> Result<Conditioning> {
            let proj = self.text_proj.model.forward(
                &image,
                &text.text_embeds,
                &text.hidden_states,
                guided,
            )?;
            let mask = self.text_proj.model.decoder_attention_mask(&text.mask)?;
            Ok(Conditioning::new(
                &self.unet.config,
                Some(&on(&proj.encoder_hidden_states, device, kind)?),
                Some(&on(&proj.additive_clip_time_embeddings, device, kind)?),
                Some(&mask.f_to_device(device)?),
            )?)
        })?;
        Ok(Box::new(KarloDecoderStep { unet: &self.unet.model, cond, device, kind }))
    }

    fn save_pretrained(&self, decoder_dir: &Path, text_proj_dir: &Path) -> Result<()> {
        checkpoint::save(&self.unet, decoder_dir, None)?;
        checkpoint::save(&self.text_proj, text_proj_dir, None)?;
        Ok(())
    }
}

/// Karlo's two super-resolution UNets (`super_res_first/`, `super_res_last/`); `last` runs the
/// final step only.
#[derive(Debug)]
pub struct KarloUpsampler {
    pub first: Loaded<UNet2DModel>,
    pub last: Option<Loaded<UNet2DModel>>,
}

impl Upsampler for KarloUpsampler {
    fn sample_shape(&self) -> Result<(i64, i64, i64)> {
        let cfg = &self.first.config;
        let (h, w) = cfg.sample_size.map(|s| s.hw()).ok_or_else(|| {
            Error::Pipeline("the super-resolution config has no sample_size".into())
        })?;
        Ok((cfg.in_channels / 2, h, w))
    }

    fn device(&self) -> Device {
        self.first.vs.device()
    }

    fn kind(&self) -> Kind {
        loaded_kind(&self.first.vs)
    }

    fn condition(&self, image_small: &Tensor) -> Result<Tensor> {
        let (c, h, w) = self.sample_shape()?;
        let size = image_small.size();
        if size.len() != 4 || size[1] != c {
            return Err(Error::Input(format!(
                "the upsampler takes (B, {c}, h, w) images, got {size:?}"
            )));
        }
        let x = on(image_small, self.device(), self.kind())?;
        Ok(tch::no_grad(|| resize_bicubic_aa(&x, h, w))?)
    }

    fn predict(&self, sample: &Tensor, low_res: &Tensor, t: i64, last: bool) -> Result<Tensor> {
        let unet = match (&self.last, last) {
            (Some(l), true) => &l.model,
            _ => &self.first.model,
        };
        let x = on(sample, self.device(), self.kind())?;
        tch::no_grad(|| -> Result<Tensor> {
            Ok(unet.forward(&Tensor::f_cat(&[&x, low_res], 1)?, &Tensor::from(t), None)?)
        })
    }

    fn save_pretrained(&self, first_dir: &Path, last_dir: &Path) -> Result<()> {
        checkpoint::save(&self.first, first_dir, None)?;
        if let Some(l) = &self.last {
            checkpoint::save(l, last_dir, None)?;
        }
        Ok(())
    }
}
