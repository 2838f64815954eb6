//! `UnCLIPTextProjModel`: how the CLIP embeddings condition the decoder (unCLIP section 2.1).
//! The image embedding is projected and added to the timestep embedding, and projected into
//! extra context tokens placed before the projected text tokens; a learned null image embedding
//! stands in for the unconditional half of classifier-free guidance.

use crate::config::TextProjConfig;
use crate::layers::{LayerNorm, Linear};
use crate::{Error, Result};
use tch::{Tensor, nn};

/// What the text projection hands the decoder UNet.
#[derive(Debug)]
pub struct TextProjOutput {
    /// Context tokens (B, extra + L, cross_attention_dim): extra image tokens first.
    pub encoder_hidden_states: Tensor,
    /// Added to the UNet's time embedding (B, time_embed_dim) (its `class_labels`).
    pub additive_clip_time_embeddings: Tensor,
}

#[derive(Debug)]
pub struct UnCLIPTextProjModel {
    learned_classifier_free_guidance_embeddings: Tensor,
    embedding_proj: Linear,
    clip_image_embeddings_project_to_time_embeddings: Linear,
    clip_extra_context_tokens_proj: Linear,
    encoder_hidden_states_proj: Linear,
    text_encoder_hidden_states_norm: LayerNorm,
    cfg: TextProjConfig,
}

impl UnCLIPTextProjModel {
    pub fn new(p: nn::Path, cfg: &TextProjConfig) -> Result<Self> {
        cfg.validate()?;
        let (d, t, x) = (cfg.clip_embeddings_dim, cfg.time_embed_dim, cfg.cross_attention_dim);
        Ok(Self {
            // Zero-initialized, as in diffusers: the null embedding is learned in training.
            learned_classifier_free_guidance_embeddings: unclip_core::nn::var(
                &p,
                "learned_classifier_free_guidance_embeddings",
                &[d],
                nn::Init::Const(0.0),
            ),
            embedding_proj: Linear::new(&p / "embedding_proj", d, t),
            clip_image_embeddings_project_to_time_embeddings: Linear::new(
                &p / "clip_image_embeddings_project_to_time_embeddings",
                d,
                t,
            ),
            clip_extra_context_tokens_proj: Linear::new(
                &p / "clip_extra_context_tokens_proj",
                d,
                cfg.clip_extra_context_tokens * x,
            ),
            encoder_hidden_states_proj: Linear::new(&p / "encoder_hidden_states_proj", d, x),
            text_encoder_hidden_states_norm: LayerNorm::new(
                &p / "text_encoder_hidden_states_norm",
                x,
                1e-5,
            ),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &TextProjConfig {
        &self.cfg
    }

    /// The learned null image embedding expanded to (n, clip_embeddings_dim).
    pub fn null_image_embeddings(&self, n: i64) -> Result<Tensor> {
        Ok(self
            .learned_classifier_free_guidance_embeddings
            .f_unsqueeze(0)?
            .f_expand([n, -1], false)?)
    }

    /// `image_embeddings` (B, D) — with `classifier_free_guidance` the null embedding batch is put
    /// in front, so `prompt_embeds` (CLIP text embeddings) and `text_hidden_states` (CLIP last
    /// hidden states, (., L, D)) must then cover 2B rows ordered [uncond, cond]; otherwise B.
    pub fn forward(
        &self,
        image_embeddings: &Tensor,
        prompt_embeds: &Tensor,
        text_hidden_states: &Tensor,
        classifier_free_guidance: bool,
    ) -> Result<TextProjOutput> {
        let d = self.cfg.clip_embeddings_dim;
        let isz = image_embeddings.size();
        if isz.len() != 2 || isz[1] != d {
            return Err(Error::Input(format!("image_embeddings must be (B, {d}), got {isz:?}")));
        }
        let image = if classifier_free_guidance {
            Tensor::f_cat(
                &[
                    self.null_image_embeddings(isz[0])?.f_to_kind(image_embeddings.kind())?,
                    image_embeddings.shallow_clone(),
                ],
                0,
            )?
        } else {
            image_embeddings.shallow_clone()
        };
        let b = image.size()[0];
        if prompt_embeds.size() != [b, d] {
            return Err(Error::Input(format!(
                "prompt_embeds must be ({b}, {d}) to match the image embeddings{}, got {:?}",
                if classifier_free_guidance { " with the null batch" } else { "" },
                prompt_embeds.size()
            )));
        }
        let tsz = text_hidden_states.size();
        if tsz.len() != 3 || tsz[0] != b || tsz[2] != d {
            return Err(Error::Input(format!(
                "text_hidden_states must be ({b}, L, {d}), got {tsz:?}"
            )));
        }
        let additive = self
            .clip_image_embeddings_project_to_time_embeddings
            .forward(&image)?
            .f_add(&self.embedding_proj.forward(prompt_embeds)?)?;
        // (B, n*X) viewed as (B, X, n): token j takes every n-th element starting at j.
        let n = self.cfg.clip_extra_context_tokens;
        let extra = self
            .clip_extra_context_tokens_proj
            .forward(&image)?
            .f_reshape([b, -1, n])?
            .f_permute([0, 2, 1])?;
        let text = self
            .text_encoder_hidden_states_norm
            .forward(&self.encoder_hidden_states_proj.forward(text_hidden_states)?)?;
        Ok(TextProjOutput {
            encoder_hidden_states: Tensor::f_cat(&[extra, text], 1)?,
            additive_clip_time_embeddings: additive,
        })
    }

    /// The decoder's attention mask from the text mask (B, L): the extra tokens are always kept.
    pub fn decoder_attention_mask(&self, text_mask: &Tensor) -> Result<Tensor> {
        let size = text_mask.size();
        if size.len() != 2 {
            return Err(Error::Input(format!("text mask must be (B, L), got {size:?}")));
        }
        let ones = Tensor::f_ones(
            [size[0], self.cfg.clip_extra_context_tokens],
            (text_mask.kind(), text_mask.device()),
        )?;
        Ok(Tensor::f_cat(&[ones, text_mask.shallow_clone()], 1)?)
    }
}
