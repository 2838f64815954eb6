//! The prior network: Karlo / diffusers' `PriorTransformer`, a causal transformer over
//! `[text tokens, text embedding, timestep, noisy image embedding, prd]` whose last token's output
//! is the predicted (normalized) CLIP image embedding.

use crate::block::TransformerBlock;
use crate::{Error, PriorConfig, Result};
use std::path::Path;
use tch::{Device, Kind, Tensor, nn, nn::Module};
use unclip_core::nn::{TimestepEmbedding, timestep_features};
use unclip_core::weights::{Unexpected, load_file, save_file};

/// Weight file name inside a diffusers component folder.
pub const WEIGHTS_NAME: &str = "diffusion_pytorch_model.safetensors";
/// Config file name inside a diffusers component folder.
pub const CONFIG_NAME: &str = "config.json";

/// Additive mask value diffusers uses for masked positions (not -inf: a fully masked row stays
/// finite).
const MASKED: f64 = -10000.0;

/// The diffusion prior. VarStore names equal the checkpoint's tensor names.
#[derive(Debug)]
pub struct PriorTransformer {
    time_embedding: TimestepEmbedding,
    proj_in: nn::Linear,
    embedding_proj_norm: Option<nn::LayerNorm>,
    embedding_proj: nn::Linear,
    encoder_hidden_states_proj: nn::Linear,
    positional_embedding: Tensor,
    prd_embedding: Tensor,
    norm_in: Option<nn::LayerNorm>,
    transformer_blocks: Vec<TransformerBlock>,
    norm_out: nn::LayerNorm,
    proj_to_clip_embeddings: nn::Linear,
    /// Statistics of the CLIP image embeddings the prior was trained on: it works on
    /// `(emb - clip_mean) / clip_std`. Stored in the checkpoint, not trained by gradient.
    clip_mean: Tensor,
    clip_std: Tensor,
    /// (1, S, S) with `MASKED` above the diagonal: built once (not a checkpoint tensor).
    causal_mask: Tensor,
    cfg: PriorConfig,
}

impl PriorTransformer {
    /// Creates the variables under `p` (fresh initialisation; load a checkpoint into the
    /// VarStore afterwards). `clip_mean`/`clip_std` start at 0/1 so a fresh model's
    /// un-normalization is the identity.
    pub fn new(p: nn::Path, cfg: &PriorConfig) -> Result<Self> {
        cfg.validate()?;
        unclip_core::check_device(p.device())?;
        let d = cfg.inner_dim();
        let ln = nn::LayerNormConfig { eps: 1e-5, ..Default::default() };
        let layer_norm = |name: &str, dim: i64, kind: &Option<String>| {
            kind.as_ref().map(|_| unclip_core::nn::layer_norm(&p / name, dim, ln))
        };
        let linear = |name: &str, i: i64, o: i64| {
            unclip_core::nn::linear(&p / name, i, o, Default::default())
        };
        let time_embedding = TimestepEmbedding::new(&p / "time_embedding", d, d);
        let proj_in = linear("proj_in", cfg.embedding_dim, d);
        let embedding_proj_norm = layer_norm(
            "embedding_proj_norm",
            cfg.embedding_proj_dim(),
            &cfg.embedding_proj_norm_type,
        );
        let embedding_proj = linear("embedding_proj", cfg.embedding_proj_dim(), d);
        let encoder_hidden_states_proj = linear("encoder_hidden_states_proj", cfg.embedding_dim, d);
        let zero = nn::Init::Const(0.0);
        let positional_embedding =
            unclip_core::nn::var(&p, "positional_embedding", &[1, cfg.seq_len(), d], zero);
        let prd_embedding = unclip_core::nn::var(&p, "prd_embedding", &[1, 1, d], zero);
        let transformer_blocks = (0..cfg.num_layers)
            .map(|i| {
                TransformerBlock::new(&p / "transformer_blocks" / i, d, cfg.num_attention_heads)
            })
            .collect();
        let norm_in = layer_norm("norm_in", d, &cfg.norm_in_type);
        let norm_out = unclip_core::nn::layer_norm(&p / "norm_out", d, ln);
        let proj_to_clip_embeddings = linear("proj_to_clip_embeddings", d, cfg.clip_embed_dim());
        let clip_mean =
            unclip_core::nn::var_no_train(&p, "clip_mean", &[1, cfg.clip_embed_dim()], 0.0);
        let clip_std =
            unclip_core::nn::var_no_train(&p, "clip_std", &[1, cfg.clip_embed_dim()], 1.0);
        let s = cfg.seq_len();
        let opts = (Kind::Float, p.device());
        let causal_mask =
            unclip_core::nn::buffer("the prior's causal mask", &[s, s], opts.0, opts.1, || {
                Tensor::f_full([s, s], MASKED, opts)?.f_triu(1)?.f_unsqueeze(0)
            })?;
        Ok(Self {
            time_embedding,
            proj_in,
            embedding_proj_norm,
            embedding_proj,
            encoder_hidden_states_proj,
            positional_embedding,
            prd_embedding,
            norm_in,
            transformer_blocks,
            norm_out,
            proj_to_clip_embeddings,
            clip_mean,
            clip_std,
            causal_mask,
            cfg: cfg.clone(),
        })
    }

    /// Reads `dir/config.json`, builds the model on `device` and loads
    /// `dir/diffusion_pytorch_model.safetensors` (any float dtype in the file), then casts the
    /// parameters to `kind`.
    pub fn from_pretrained(
        dir: &Path,
        device: Device,
        kind: Kind,
    ) -> Result<(nn::VarStore, PriorTransformer)> {
        let cfg = PriorConfig::from_file(&dir.join(CONFIG_NAME))?;
        let weights = dir.join(WEIGHTS_NAME);
        // Sized against the checkpoint before anything is allocated.
        let layout = Self::layout(&cfg)?;
        let config = dir.join(CONFIG_NAME);
        unclip_core::weights::check_layout(
            &config,
            &weights,
            &layout,
            Unexpected::Error,
            kind,
            device,
        )?;
        let mut vs = nn::VarStore::new(device);
        // Every variable is overwritten below: skip the random initialisation.
        let model = unclip_core::nn::for_loading(|| PriorTransformer::new(vs.root(), &cfg))?;
        load_file(&vs, &weights, Unexpected::Error)?;
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        Ok((vs, model))
    }

    /// The names and shapes of the variables `cfg` implies, computed without allocating them.
    pub fn layout(cfg: &PriorConfig) -> Result<unclip_core::nn::Layout> {
        let vs = nn::VarStore::new(Device::Cpu);
        unclip_core::nn::measure(|| PriorTransformer::new(vs.root(), cfg))
    }

    /// Writes `dir/config.json` and `dir/diffusion_pytorch_model.safetensors` (checkpoint names,
    /// optionally cast to `kind`), creating `dir`.
    pub fn save_pretrained(&self, vs: &nn::VarStore, dir: &Path, kind: Option<Kind>) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| unclip_core::Error::io(dir, e))?;
        self.cfg.to_file(&dir.join(CONFIG_NAME))?;
        save_file(vs, &dir.join(WEIGHTS_NAME), kind)?;
        Ok(())
    }

    pub fn config(&self) -> &PriorConfig {
        &self.cfg
    }

    /// Device of the parameters.
    pub fn device(&self) -> Device {
        self.proj_in.ws.device()
    }

    /// Dtype of the parameters.
    pub fn kind(&self) -> Kind {
        self.proj_in.ws.kind()
    }

    /// `clip_mean` (1, C).
    pub fn clip_mean(&self) -> &Tensor {
        &self.clip_mean
    }

    /// `clip_std` (1, C).
    pub fn clip_std(&self) -> &Tensor {
        &self.clip_std
    }

    /// Replaces the stored image-embedding statistics (each (C) or (1, C), finite, std > 0).
    pub fn set_clip_stats(&mut self, mean: &Tensor, std: &Tensor) -> Result<()> {
        let c = self.cfg.clip_embed_dim();
        for (name, t) in [("clip_mean", mean), ("clip_std", std)] {
            if t.numel() != c as usize || t.dim() > 2 {
                return Err(Error::Input(format!(
                    "{name} must have {c} values, got shape {:?}",
                    t.size()
                )));
            }
            if !bool::try_from(t.f_isfinite()?.f_all()?)? {
                return Err(Error::Input(format!("{name} has non-finite values")));
            }
        }
        if !bool::try_from(std.f_gt(0.0)?.f_all()?)? {
            return Err(Error::Input("clip_std must be positive".into()));
        }
        tch::no_grad(|| -> Result<()> {
            self.clip_mean.f_copy_(&mean.f_reshape([1, c])?)?;
            self.clip_std.f_copy_(&std.f_reshape([1, c])?)?;
            Ok(())
        })
    }

    /// Normalized space -> CLIP image embedding space: `x * clip_std + clip_mean`
    /// (diffusers' `post_process_latents`).
    pub fn post_process_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let latents = self.check_2d("latents", latents, self.cfg.clip_embed_dim(), None)?;
        Ok(latents.f_mul(&self.clip_std)?.f_add(&self.clip_mean)?)
    }

    /// CLIP image embedding space -> the normalized space the prior diffuses in (training).
    pub fn normalize(&self, image_embeds: &Tensor) -> Result<Tensor> {
        let x = self.check_2d("image embeddings", image_embeds, self.cfg.clip_embed_dim(), None)?;
        Ok(x.f_sub(&self.clip_mean)?.f_div(&self.clip_std)?)
    }

    /// Checks a (B, dim) input and moves it to the model's device and dtype.
    fn check_2d(&self, what: &str, t: &Tensor, dim: i64, batch: Option<i64>) -> Result<Tensor> {
        let size = t.size();
        if size.len() != 2 || size[1] != dim {
            return Err(Error::Input(format!(
                "{what} must have shape (batch, {dim}), got {size:?}"
            )));
        }
        if let Some(b) = batch.filter(|&b| b != size[0]) {
            return Err(Error::Input(format!("{what} has batch size {}, expected {b}", size[0])));
        }
        Ok(t.f_to_device(self.device())?.f_to_kind(self.kind())?)
    }

    /// Predicts the clean normalized image embedding (B, C).
    ///
    /// - `latents` (B, embedding_dim): the noisy normalized image embeddings;
    /// - `timesteps`: one timestep for the whole batch (0-dim or 1 element) or one per row (B);
    /// - `text_embeds` (B, embedding_proj_dim): CLIP text embeddings (`proj_embedding`);
    /// - `text_hidden` (B, num_embeddings, embedding_dim): CLIP's last hidden states;
    /// - `text_mask` (B, num_embeddings), true/1 = real token. As in diffusers, with `None` no mask
    ///   at all is applied (not even the causal one); Karlo always passes the text mask.
    pub fn forward(
        &self,
        latents: &Tensor,
        timesteps: &Tensor,
        text_embeds: &Tensor,
        text_hidden: &Tensor,
        text_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (device, kind) = (self.device(), self.kind());
        let b = *latents.size().first().unwrap_or(&0);
        let latents = self.check_2d("latents", latents, cfg.embedding_dim, None)?;
        let text_embeds =
            self.check_2d("text embeddings", text_embeds, cfg.embedding_proj_dim(), Some(b))?;
        let (n, e) = (cfg.num_embeddings, cfg.embedding_dim);
        if text_hidden.size() != [b, n, e] {
            return Err(Error::Input(format!(
                "text hidden states must have shape ({b}, {n}, {e}), got {:?}",
                text_hidden.size()
            )));
        }
        let text_hidden = text_hidden.f_to_device(device)?.f_to_kind(kind)?;
        let t = match timesteps.numel() {
            1 if timesteps.dim() <= 1 => timesteps.f_reshape([1])?.f_expand([b], false)?,
            _ if timesteps.size() == [b] => timesteps.shallow_clone(),
            _ => {
                return Err(Error::Input(format!(
                    "timesteps must be one value or one per row ({b}), got shape {:?}",
                    timesteps.size()
                )));
            }
        };
        let t = t.f_to_device(device)?;

        let d = cfg.inner_dim();
        let t_emb = timestep_features(&t, d, true, 0.0, 10000.0)?.f_to_kind(kind)?;
        let t_emb = self.time_embedding.forward(&t_emb);
        let text_embeds = match &self.embedding_proj_norm {
            Some(norm) => norm.forward(&text_embeds),
            None => text_embeds,
        };
        let proj_emb = self.embedding_proj.forward(&text_embeds);
        let enc = self.encoder_hidden_states_proj.forward(&text_hidden);
        let x_tok = self.proj_in.forward(&latents);
        let prd = self.prd_embedding.f_expand([b, 1, d], false)?;
        let seq = Tensor::f_cat(
            &[enc, proj_emb.f_unsqueeze(1)?, t_emb.f_unsqueeze(1)?, x_tok.f_unsqueeze(1)?, prd],
            1,
        )?;
        let mut h = seq.f_add(&self.positional_embedding)?;

        let mask = match text_mask {
            Some(m) => Some(self.attention_mask(m, b)?),
            None => None,
        };
        if let Some(norm) = &self.norm_in {
            h = norm.forward(&h);
        }
        for block in &self.transformer_blocks {
            h = block.forward(&h, mask.as_ref())?;
        }
        let h = self.norm_out.forward(&h).f_select(1, -1)?;
        Ok(self.proj_to_clip_embeddings.forward(&h))
    }

    /// Additive (B, 1, S, S) mask: padded text tokens and future positions get -10000.
    fn attention_mask(&self, text_mask: &Tensor, b: i64) -> Result<Tensor> {
        let n = self.cfg.num_embeddings;
        if text_mask.size() != [b, n] {
            return Err(Error::Input(format!(
                "text mask must have shape ({b}, {n}), got {:?}",
                text_mask.size()
            )));
        }
        let (device, kind) = (self.device(), self.kind());
        let pad = text_mask
            .f_to_device(device)?
            .f_to_kind(kind)?
            .f_neg()?
            .f_add_scalar(1.0)?
            .f_mul_scalar(MASKED)?
            .f_constant_pad_nd([0, self.cfg.additional_embeddings])?;
        let causal = self.causal_mask.f_to_device(device)?.f_to_kind(kind)?;
        Ok(pad.f_unsqueeze(1)?.f_add(&causal)?.f_unsqueeze(1)?)
    }
}
