//! Training the prior: x0-prediction MSE on normalized CLIP image embeddings, with the text
//! conditioning dropped (replaced by the empty prompt's) a fraction of the time so the same
//! model serves the unconditional branch of classifier-free guidance.

use crate::{Error, PriorTransformer, Result, TextConditioning};
use tch::{Kind, Reduction, Tensor, nn};
use unclip_scheduler::{NoiseSchedule, NoiseSource};

/// Resolution of the Bernoulli draw for conditioning dropout (drawn as an integer so that every
/// random draw goes through the [`NoiseSource`]).
const DROP_RESOLUTION: i64 = 1 << 24;

/// One training batch: CLIP image embeddings (B, C) in CLIP space (not normalized) and the CLIP
/// text outputs of their captions.
#[derive(Debug)]
pub struct PriorBatch {
    pub image_embeds: Tensor,
    pub text: TextConditioning,
}

/// Training options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainOptions {
    /// Probability that a row's text conditioning is replaced by the empty prompt's (0.1 in the
    /// unCLIP paper).
    pub cond_drop_prob: f64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self { cond_drop_prob: 0.1 }
    }
}

/// Computes the loss of a batch and takes optimizer steps; any training loop can call it.
#[derive(Debug)]
pub struct PriorTrainer {
    schedule: NoiseSchedule,
    uncond: TextConditioning,
    opts: TrainOptions,
}

impl PriorTrainer {
    /// `schedule` is the forward process (Karlo: [`NoiseSchedule::karlo`], squaredcos_cap_v2
    /// over 1000 steps); `uncond` is the empty prompt's conditioning (one row).
    pub fn new(
        schedule: NoiseSchedule,
        uncond: TextConditioning,
        opts: TrainOptions,
    ) -> Result<Self> {
        let p = opts.cond_drop_prob;
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::Input(format!("cond_drop_prob must be in [0, 1], got {p}")));
        }
        if uncond.batch() != 1 {
            return Err(Error::Input(format!(
                "the unconditional text must be one row (the empty prompt), got {}",
                uncond.batch()
            )));
        }
        Ok(Self { schedule, uncond, opts })
    }

    /// Karlo's forward process with the given empty-prompt conditioning and options.
    pub fn karlo(uncond: TextConditioning, opts: TrainOptions) -> Result<Self> {
        Self::new(NoiseSchedule::karlo(), uncond, opts)
    }

    pub fn options(&self) -> &TrainOptions {
        &self.opts
    }

    /// The x0-prediction MSE of one batch (a scalar with a graph to the model's parameters).
    ///
    /// Draws, in order from `rng`: timesteps (B) uniform in 0..T, noise (B, C), and the
    /// conditioning-dropout decisions (B).
    pub fn loss(
        &self,
        model: &PriorTransformer,
        batch: &PriorBatch,
        rng: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let cfg = model.config();
        if cfg.clip_embed_dim() != cfg.embedding_dim {
            return Err(Error::Config(format!(
                "training needs clip_embed_dim ({}) == embedding_dim ({})",
                cfg.clip_embed_dim(),
                cfg.embedding_dim
            )));
        }
        batch.text.check(cfg)?;
        self.uncond.check(cfg)?;
        let b = batch.text.batch();
        let size = batch.image_embeds.size();
        if size.len() != 2 || size[0] != b {
            return Err(Error::Input(format!(
                "image embeddings must be (batch {b}, {}), got {size:?}",
                cfg.clip_embed_dim()
            )));
        }
        let (device, kind) = (model.device(), model.kind());
        let x0 = model.normalize(&batch.image_embeds)?;
        let t = self.schedule.sample_timesteps(b as usize, device, rng);
        let noise = rng.randn(&[b, cfg.embedding_dim], kind, device);
        let x_t = self.schedule.add_noise(&x0, &noise, &t)?;
        let threshold = (self.opts.cond_drop_prob * DROP_RESOLUTION as f64).round() as i64;
        let drop = rng.randint(DROP_RESOLUTION, &[b], device).f_lt(threshold)?;
        let text = batch.text.where_rows(&drop, &self.uncond.expand_to(b)?)?;
        let pred =
            model.forward(&x_t, &t, &text.text_embeds, &text.hidden_states, Some(&text.mask))?;
        Ok(pred.f_to_kind(Kind::Float)?.f_mse_loss(&x0.f_to_kind(Kind::Float)?, Reduction::Mean)?)
    }

    /// One optimizer step on `batch`; returns the loss before the step.
    pub fn step(
        &self,
        model: &PriorTransformer,
        opt: &mut nn::Optimizer,
        batch: &PriorBatch,
        rng: &mut dyn NoiseSource,
    ) -> Result<f64> {
        let loss = self.loss(model, batch, rng)?;
        opt.zero_grad();
        loss.f_backward()?;
        opt.step();
        Ok(loss.f_double_value(&[])?)
    }
}

/// Per-dimension mean and standard deviation (each (1, C)) of a set of CLIP image embeddings
/// (N, C), N >= 2: the `clip_mean` / `clip_std` the prior normalizes with. Store them with
/// [`PriorTransformer::set_clip_stats`] (or use [`fit_clip_stats`]) before training.
pub fn clip_stats(image_embeds: &Tensor) -> Result<(Tensor, Tensor)> {
    let size = image_embeds.size();
    if size.len() != 2 || size[0] < 2 {
        return Err(Error::Input(format!(
            "statistics need a set of at least 2 embeddings (N, C), got shape {size:?}"
        )));
    }
    tch::no_grad(|| -> Result<(Tensor, Tensor)> {
        let x = image_embeds.f_to_kind(Kind::Double)?;
        let mean = x.f_mean_dim(0, true, Kind::Double)?;
        let std = x.f_std_dim(0, true, true)?;
        if !bool::try_from(std.f_gt(0.0)?.f_all()?)? {
            return Err(Error::Input("some embedding dimension is constant or not finite".into()));
        }
        Ok((mean.f_to_kind(Kind::Float)?, std.f_to_kind(Kind::Float)?))
    })
}

/// Computes [`clip_stats`] of `image_embeds` and stores them in `model`.
pub fn fit_clip_stats(model: &mut PriorTransformer, image_embeds: &Tensor) -> Result<()> {
    let (mean, std) = clip_stats(image_embeds)?;
    model.set_clip_stats(&mean, &std)
}
