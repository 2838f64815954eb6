//! The text tower: `text_model.*` and `text_projection` of transformers' CLIP.

use crate::config::{EosRule, TextConfig};
use crate::encoder::{Encoder, EncoderDims, layer_norm, mask_value};
use crate::{Error, Result};
use tch::{Device, Kind, Tensor, nn, nn::Module};

/// `text_model.embeddings`: token plus learned position embeddings.
#[derive(Debug)]
pub struct TextEmbeddings {
    token_embedding: nn::Embedding,
    position_embedding: nn::Embedding,
}

impl TextEmbeddings {
    pub fn new(p: nn::Path, cfg: &TextConfig) -> Self {
        let ec = nn::EmbeddingConfig {
            ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.02 },
            ..Default::default()
        };
        Self {
            token_embedding: unclip_core::nn::embedding(
                &p / "token_embedding",
                cfg.vocab_size,
                cfg.hidden_size,
                ec,
            ),
            position_embedding: unclip_core::nn::embedding(
                &p / "position_embedding",
                cfg.max_position_embeddings,
                cfg.hidden_size,
                ec,
            ),
        }
    }

    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let len = ids.size()[1];
        let pos = Tensor::f_arange(len, (Kind::Int64, ids.device()))?.f_unsqueeze(0)?;
        Ok(self.token_embedding.forward(ids) + self.position_embedding.forward(&pos))
    }
}

/// Outputs of [`TextTransformer::forward`].
#[derive(Debug)]
pub struct TextOutput {
    /// (B, L, hidden) after `final_layer_norm`.
    pub last_hidden_state: Tensor,
    /// (B, hidden): the state at the end-of-text token.
    pub pooled: Tensor,
}

/// `text_model`: causal pre-LN transformer (transformers' `CLIPTextModel`).
#[derive(Debug)]
pub struct TextTransformer {
    embeddings: TextEmbeddings,
    encoder: Encoder,
    final_layer_norm: nn::LayerNorm,
    eos_rule: EosRule,
    cfg: TextConfig,
}

impl TextTransformer {
    /// `p` is the `text_model` path. Fails on an invalid config.
    pub fn new(p: nn::Path, cfg: &TextConfig) -> Result<Self> {
        let activation = cfg.validate()?;
        let dims = EncoderDims {
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_attention_heads: cfg.num_attention_heads,
            num_hidden_layers: cfg.num_hidden_layers,
            layer_norm_eps: cfg.layer_norm_eps,
            activation,
        };
        Ok(Self {
            embeddings: TextEmbeddings::new(&p / "embeddings", cfg),
            encoder: Encoder::new(&p / "encoder", &dims),
            final_layer_norm: layer_norm(
                &p / "final_layer_norm",
                cfg.hidden_size,
                cfg.layer_norm_eps,
            ),
            eos_rule: cfg.eos_rule()?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// Checks ids (B, L) against the vocabulary and context length; returns them as int64.
    fn check_ids(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let size = ids.size();
        if size.len() != 2 || size[0] == 0 || size[1] == 0 {
            return Err(Error::Input(format!(
                "input_ids must be (batch, length) and non-empty, got {size:?}"
            )));
        }
        if !matches!(ids.kind(), Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8) {
            return Err(Error::Input(format!("input_ids must be integers, got {:?}", ids.kind())));
        }
        if size[1] > self.cfg.max_position_embeddings {
            return Err(Error::Input(format!(
                "sequence of {} tokens is longer than the context length {}",
                size[1], self.cfg.max_position_embeddings
            )));
        }
        let ids = ids.f_to_kind(Kind::Int64)?;
        let (lo, hi) = (ids.f_min()?.int64_value(&[]), ids.f_max()?.int64_value(&[]));
        if lo < 0 || hi >= self.cfg.vocab_size {
            return Err(Error::Input(format!(
                "token ids must lie in 0..{}, found {lo}..={hi}",
                self.cfg.vocab_size
            )));
        }
        if let Some(m) = mask {
            if m.size() != size {
                return Err(Error::Input(format!(
                    "attention_mask has shape {:?}, input_ids {size:?}",
                    m.size()
                )));
            }
        }
        Ok(ids)
    }

    /// Additive (B or 1, 1, L, L) mask: causal, plus padding where `mask` is 0.
    fn attention_mask(
        &self,
        len: i64,
        mask: Option<&Tensor>,
        kind: Kind,
        device: Device,
    ) -> Result<Tensor> {
        let future = Tensor::f_ones([len, len], (Kind::Bool, device))?.f_triu(1)?;
        let mut blocked = future.f_view([1, 1, len, len])?;
        if let Some(m) = mask {
            let pad = m.f_to_device(device)?.f_eq(0)?.f_view([-1, 1, 1, len])?;
            blocked = blocked.f_logical_or(&pad)?;
        }
        let zeros = Tensor::f_zeros(blocked.size(), (kind, device))?;
        Ok(zeros.f_masked_fill(&blocked, mask_value(kind))?)
    }

    /// `input_ids` (B, L) integers; `attention_mask` (B, L) with 1 for real tokens, 0 for padding
    /// (optional: CLIP was trained with the causal mask only, and Karlo passes the padding mask).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<TextOutput> {
        let device = self.embeddings.token_embedding.ws.device();
        let ids = self.check_ids(&input_ids.f_to_device(device)?, attention_mask)?;
        let x = self.embeddings.forward(&ids)?;
        let mask = self.attention_mask(ids.size()[1], attention_mask, x.kind(), device)?;
        let x = self.encoder.forward(&x, Some(&mask))?;
        let last_hidden_state = self.final_layer_norm.forward(&x);
        let index = match self.eos_rule {
            EosRule::ArgmaxId => ids.f_argmax(-1, false)?,
            // argmax returns the first maximum: the first eos (0 when a row has none, as in transformers).
            EosRule::FirstId(eos) => ids.f_eq(eos)?.f_to_kind(Kind::Int)?.f_argmax(-1, false)?,
        };
        let batch = Tensor::f_arange(ids.size()[0], (Kind::Int64, device))?;
        let pooled = last_hidden_state.f_index(&[Some(batch), Some(index)])?;
        Ok(TextOutput { last_hidden_state, pooled })
    }
}

/// `text_model` + `text_projection` (transformers' `CLIPTextModelWithProjection`, and the text half of `CLIPModel`).
#[derive(Debug)]
pub struct TextTower {
    pub text_model: TextTransformer,
    text_projection: nn::Linear,
}

/// Outputs of [`TextTower::forward`].
#[derive(Debug)]
pub struct TextEmbeds {
    pub last_hidden_state: Tensor,
    pub pooled: Tensor,
    /// (B, projection_dim), not normalized (what Karlo's prior is conditioned on).
    pub text_embeds: Tensor,
}

impl TextTower {
    /// `p` is the model root; tensors `text_model.*` and `text_projection.weight`.
    pub fn new(p: nn::Path, cfg: &TextConfig, projection_dim: i64) -> Result<Self> {
        let text_model = TextTransformer::new(&p / "text_model", cfg)?;
        let text_projection =
            crate::encoder::projection(&p / "text_projection", cfg.hidden_size, projection_dim)?;
        Ok(Self { text_model, text_projection })
    }

    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<TextEmbeds> {
        let TextOutput { last_hidden_state, pooled } =
            self.text_model.forward(input_ids, attention_mask)?;
        let text_embeds = self.text_projection.forward(&pooled);
        Ok(TextEmbeds { last_hidden_state, pooled, text_embeds })
    }
}
