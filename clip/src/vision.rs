//! The vision tower: `vision_model.*` and `visual_projection` of transformers' CLIP.

use crate::config::VisionConfig;
use crate::encoder::{Encoder, EncoderDims, layer_norm};
use crate::{Error, Result};
use tch::{Kind, Tensor, nn, nn::Module};

/// `vision_model.embeddings`: patch convolution (no bias), class token, position embeddings.
#[derive(Debug)]
pub struct VisionEmbeddings {
    class_embedding: Tensor,
    patch_embedding: nn::Conv2D,
    position_embedding: nn::Embedding,
    num_positions: i64,
}

impl VisionEmbeddings {
    pub fn new(p: nn::Path, cfg: &VisionConfig) -> Self {
        let h = cfg.hidden_size;
        let class_embedding = unclip_core::nn::var(
            &p,
            "class_embedding",
            &[h],
            nn::Init::Randn { mean: 0.0, stdev: (h as f64).powf(-0.5) },
        );
        let conv = nn::ConvConfig {
            stride: cfg.patch_size,
            bias: false,
            ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.02 },
            ..Default::default()
        };
        let patch_embedding = unclip_core::nn::conv2d(
            &p / "patch_embedding",
            cfg.num_channels,
            h,
            cfg.patch_size,
            conv,
        );
        let ec = nn::EmbeddingConfig {
            ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.02 },
            ..Default::default()
        };
        let num_positions = cfg.num_positions();
        let position_embedding =
            unclip_core::nn::embedding(&p / "position_embedding", num_positions, h, ec);
        Self { class_embedding, patch_embedding, position_embedding, num_positions }
    }

    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.size()[0];
        let patches = self.patch_embedding.forward(pixels).f_flatten(2, -1)?.f_transpose(1, 2)?;
        let h = self.class_embedding.size()[0];
        let cls = self.class_embedding.f_view([1, 1, h])?.f_expand([b, 1, h], false)?;
        let x = Tensor::f_cat(&[cls, patches], 1)?;
        let pos = Tensor::f_arange(self.num_positions, (Kind::Int64, pixels.device()))?;
        Ok(x + self.position_embedding.forward(&pos).f_unsqueeze(0)?)
    }
}

/// Outputs of [`VisionTransformer::forward`].
#[derive(Debug)]
pub struct VisionOutput {
    /// (B, 1 + patches, hidden), from the last layer (no final norm, as in transformers).
    pub last_hidden_state: Tensor,
    /// (B, hidden): `post_layernorm` of the class token.
    pub pooled: Tensor,
}

/// `vision_model` (transformers' `CLIPVisionModel`).
#[derive(Debug)]
pub struct VisionTransformer {
    embeddings: VisionEmbeddings,
    pre_layrnorm: nn::LayerNorm,
    encoder: Encoder,
    post_layernorm: nn::LayerNorm,
    cfg: VisionConfig,
}

impl VisionTransformer {
    /// `p` is the `vision_model` path.
    pub fn new(p: nn::Path, cfg: &VisionConfig) -> Result<Self> {
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
            embeddings: VisionEmbeddings::new(&p / "embeddings", cfg),
            // The checkpoint's spelling ("layrnorm") is kept so names match.
            pre_layrnorm: layer_norm(&p / "pre_layrnorm", cfg.hidden_size, cfg.layer_norm_eps),
            encoder: Encoder::new(&p / "encoder", &dims),
            post_layernorm: layer_norm(&p / "post_layernorm", cfg.hidden_size, cfg.layer_norm_eps),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// `pixel_values` (B, C, S, S), already preprocessed (see [`crate::preprocess`]).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<VisionOutput> {
        let size = pixel_values.size();
        let (c, s) = (self.cfg.num_channels, self.cfg.image_size);
        if size.len() != 4 || size[0] == 0 || size[1] != c || size[2] != s || size[3] != s {
            return Err(Error::Input(format!(
                "pixel_values must be (batch >= 1, {c}, {s}, {s}), got {size:?}"
            )));
        }
        let w = &self.embeddings.class_embedding;
        let pixels = pixel_values.f_to_device(w.device())?.f_to_kind(w.kind())?;
        let x = self.pre_layrnorm.forward(&self.embeddings.forward(&pixels)?);
        let last_hidden_state = self.encoder.forward(&x, None)?;
        let pooled = self.post_layernorm.forward(&last_hidden_state.f_select(1, 0)?);
        Ok(VisionOutput { last_hidden_state, pooled })
    }
}

/// `vision_model` + `visual_projection` (`CLIPVisionModelWithProjection`, the vision half of `CLIPModel`).
#[derive(Debug)]
pub struct VisionTower {
    pub vision_model: VisionTransformer,
    visual_projection: nn::Linear,
}

/// Outputs of [`VisionTower::forward`].
#[derive(Debug)]
pub struct ImageEmbeds {
    pub last_hidden_state: Tensor,
    pub pooled: Tensor,
    /// (B, projection_dim), not normalized.
    pub image_embeds: Tensor,
}

impl VisionTower {
    pub fn new(p: nn::Path, cfg: &VisionConfig, projection_dim: i64) -> Result<Self> {
        let vision_model = VisionTransformer::new(&p / "vision_model", cfg)?;
        let visual_projection =
            crate::encoder::projection(&p / "visual_projection", cfg.hidden_size, projection_dim)?;
        Ok(Self { vision_model, visual_projection })
    }

    pub fn forward(&self, pixel_values: &Tensor) -> Result<ImageEmbeds> {
        let VisionOutput { last_hidden_state, pooled } = self.vision_model.forward(pixel_values)?;
        let image_embeds = self.visual_projection.forward(&pooled);
        Ok(ImageEmbeds { last_hidden_state, pooled, image_embeds })
    }
}
