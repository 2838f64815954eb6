//! Sampling CLIP image embeddings from the prior: classifier-free guidance through any
//! [`Scheduler`] (Karlo uses the UnCLIPScheduler predicting x0, clipped to ±5), un-normalization
//! with `clip_mean`/`clip_std`, and the paper's best-of-N selection.

use crate::{Error, PriorTransformer, Result, TextConditioning};
use tch::{Kind, Tensor};
use unclip_scheduler::{
    NoiseSource, Scheduler, UnCLIPScheduler, UnCLIPSchedulerConfig, classifier_free_guidance,
};

/// How to sample. Defaults are UnCLIPPipeline's: 25 steps, guidance 4.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleOptions {
    pub num_inference_steps: usize,
    /// `uncond + s * (cond - uncond)`; 1 disables guidance (one model call per step on the
    /// prompts only). Must be finite and > 0.
    pub guidance_scale: f64,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self { num_inference_steps: 25, guidance_scale: 4.0 }
    }
}

impl SampleOptions {
    fn validate(&self) -> Result<()> {
        if self.num_inference_steps == 0 {
            return Err(Error::Input("the number of inference steps must be at least 1".into()));
        }
        let g = self.guidance_scale;
        if !g.is_finite() || g <= 0.0 {
            return Err(Error::Input(format!("guidance scale must be finite and > 0, got {g}")));
        }
        Ok(())
    }

    fn guided(&self) -> bool {
        self.guidance_scale != 1.0
    }
}

/// Karlo's prior sampler: UnCLIPScheduler with variance fixed_small_log, x0 prediction, x0
/// clipped to [-5, 5].
pub fn karlo_prior_scheduler() -> Result<UnCLIPScheduler> {
    Ok(UnCLIPScheduler::new(UnCLIPSchedulerConfig::karlo_prior())?)
}

/// Samples one image embedding per prompt of `cond`, in CLIP space (B, C).
///
/// The initial latents (B, C) are the first draw from `noise`, then the scheduler draws its step
/// noise, as in UnCLIPPipeline: with [`unclip_scheduler::TorchNoise`] and the same seed this
/// reproduces diffusers on the CPU. `uncond` is the empty prompt's conditioning (1 row or B
/// rows); required unless the guidance scale is 1.
pub fn sample(
    model: &PriorTransformer,
    scheduler: &mut dyn Scheduler,
    cond: &TextConditioning,
    uncond: Option<&TextConditioning>,
    opts: &SampleOptions,
    noise: &mut dyn NoiseSource,
) -> Result<Tensor> {
    opts.validate()?;
    cond.check(model.config())?;
    let shape = [cond.batch(), model.config().embedding_dim];
    let latents = noise.randn(&shape, model.kind(), model.device());
    sample_from(model, scheduler, cond, uncond, opts, latents, noise)
}

/// [`sample`] from given initial latents (B, embedding_dim), already scaled by the scheduler's
/// `init_noise_sigma`.
pub fn sample_from(
    model: &PriorTransformer,
    scheduler: &mut dyn Scheduler,
    cond: &TextConditioning,
    uncond: Option<&TextConditioning>,
    opts: &SampleOptions,
    latents: Tensor,
    noise: &mut dyn NoiseSource,
) -> Result<Tensor> {
    opts.validate()?;
    let cfg = model.config();
    cond.check(cfg)?;
    let b = cond.batch();
    if cfg.clip_embed_dim() != cfg.embedding_dim {
        return Err(Error::Config(format!(
            "sampling needs clip_embed_dim ({}) == embedding_dim ({}): the output is the next input",
            cfg.clip_embed_dim(),
            cfg.embedding_dim
        )));
    }
    if latents.size() != [b, cfg.embedding_dim] {
        return Err(Error::Input(format!(
            "initial latents must have shape ({b}, {}), got {:?}",
            cfg.embedding_dim,
            latents.size()
        )));
    }
    // The guidance batch [uncond, cond] is built once, outside the loop.
    let text = if opts.guided() {
        let uncond = uncond.ok_or_else(|| {
            Error::Input("guidance needs the unconditional (empty prompt) conditioning".into())
        })?;
        uncond.check(cfg)?;
        uncond.to_device(cond.text_embeds.device())?.expand_to(b)?.cat(cond)?
    } else {
        cond.clone()
    };
    let text = text.to_device(model.device())?;
    scheduler.set_timesteps(opts.num_inference_steps)?;
    let timesteps = scheduler.timesteps().to_vec();
    tch::no_grad(|| -> Result<Tensor> {
        let mut x = latents.f_to_device(model.device())?.f_to_kind(model.kind())?;
        for t in timesteps {
            let x_in = scheduler.scale_model_input(&x, t)?;
            let x_in = if opts.guided() { Tensor::f_cat(&[&x_in, &x_in], 0)? } else { x_in };
            let pred = model.forward(
                &x_in,
                &Tensor::from(t),
                &text.text_embeds,
                &text.hidden_states,
                Some(&text.mask),
            )?;
            let pred = if opts.guided() {
                classifier_free_guidance(&pred, opts.guidance_scale, None)?
            } else {
                pred
            };
            x = scheduler.step(&pred, t, &x, noise)?;
        }
        model.post_process_latents(&x)
    })
}

/// Best-of-N: all candidates and the ones kept.
#[derive(Debug)]
pub struct BestOfN {
    /// (B, C): per prompt, the candidate most similar to its text embedding.
    pub image_embeds: Tensor,
    /// (B,): which candidate was kept.
    pub chosen: Tensor,
    /// (N, B): cosine similarity of every candidate to its text embedding.
    pub scores: Tensor,
    /// (N, B, C): every candidate.
    pub candidates: Tensor,
}

/// The paper's best-of-N: samples `n` candidate image embeddings per prompt in one batch and
/// keeps, per prompt, the one with the highest cosine similarity to the prompt's CLIP text
/// embedding (the paper compares unit-norm CLIP embeddings by dot product).
///
/// Candidates are laid out block after block (row `k * B + i` is candidate `k` of prompt `i`),
/// so candidate 0 uses the same noise rows as `n = 1` would.
pub fn sample_best_of_n(
    model: &PriorTransformer,
    scheduler: &mut dyn Scheduler,
    cond: &TextConditioning,
    uncond: Option<&TextConditioning>,
    opts: &SampleOptions,
    n: usize,
    noise: &mut dyn NoiseSource,
) -> Result<BestOfN> {
    if n == 0 {
        return Err(Error::Input("best-of-N needs at least one candidate".into()));
    }
    cond.check(model.config())?;
    let (n, b) = (n as i64, cond.batch());
    let all = sample(model, scheduler, &cond.repeat(n)?, uncond, opts, noise)?;
    let candidates = all.f_view([n, b, -1])?;
    let (chosen, scores) = select_best(&candidates, &cond.text_embeds)?;
    let image_embeds = tch::no_grad(|| -> Result<Tensor> {
        let idx = chosen.f_view([1, b, 1])?.f_expand([1, b, candidates.size()[2]], false)?;
        Ok(candidates.f_gather(0, &idx, false)?.f_squeeze_dim(0)?)
    })?;
    Ok(BestOfN { image_embeds, chosen, scores, candidates })
}

/// For candidates (N, B, C) and text embeddings (B, C): the index (B,) of the candidate with the
/// highest cosine similarity per prompt, and all similarities (N, B).
pub fn select_best(candidates: &Tensor, text_embeds: &Tensor) -> Result<(Tensor, Tensor)> {
    let (cs, ts) = (candidates.size(), text_embeds.size());
    if cs.len() != 3 || ts.len() != 2 || cs[1] != ts[0] || cs[2] != ts[1] {
        return Err(Error::Input(format!(
            "best-of-N compares candidates (N, B, C) with text embeddings (B, C); got {cs:?} and {ts:?}"
        )));
    }
    tch::no_grad(|| -> Result<(Tensor, Tensor)> {
        let c = candidates.f_to_kind(Kind::Float)?;
        let t = text_embeds.f_to_device(c.device())?.f_to_kind(Kind::Float)?.f_unsqueeze(0)?;
        let scores = Tensor::f_cosine_similarity(&c, &t, 2, 1e-8)?;
        Ok((scores.f_argmax(0, false)?, scores))
    })
}
