//! The prior stage: the diffusion prior on the conditioning CLIP's embeddings, x0 prediction
//! with `prior.text_dropout` of the captions replaced by the empty one
//! (`unclip_prior::PriorTrainer`). A fresh model fits `clip_mean`/`clip_std` on training images
//! first; a fine-tuned one keeps its own.

use super::super::config::SourceKind;
use super::super::dist::step_noise;
use super::super::loop_::{self, Ctx, MODEL, StageHooks, StageSteps, WEIGHTS};
use super::super::source::Needs;
use super::super::{Result, TrainError, grid, write_json};
use super::{component_dir, seed_init};
use crate::data::Batch;
use serde_json::json;
use std::path::Path;
use tch::{Tensor, nn::VarStore};
use unclip_core::train::Ema;
use unclip_prior::{
    PriorBatch, PriorConfig, PriorTrainer, PriorTransformer, SampleOptions, TrainOptions,
    fit_clip_stats, sample, sampling::karlo_prior_scheduler,
};
use unclip_scheduler::TorchNoise;

/// diffusers' `PriorTransformer` config in Karlo's layout.
pub(crate) fn model_config(
    m: &crate::train::config::PriorModelConfig,
    dim: i64,
    tokens: i64,
) -> serde_json::Value {
    json!({
        "_class_name": "PriorTransformer",
        "num_attention_heads": m.heads,
        "attention_head_dim": dim / m.heads,
        "num_layers": m.layers,
        "embedding_dim": dim,
        "num_embeddings": tokens,
        "additional_embeddings": 4,
        "dropout": 0.0,
        "time_embed_act_fn": "silu",
        "norm_in_type": null,
        "embedding_proj_norm_type": null,
        "encoder_hid_proj_type": "linear",
        "added_emb_type": "prd",
        "time_embed_dim": null,
        "embedding_proj_dim": null,
        "clip_embed_dim": null,
    })
}

/// Karlo's prior sampler config (x0 prediction).
pub(crate) fn scheduler_config() -> serde_json::Value {
    json!({
        "_class_name": "UnCLIPScheduler", "_diffusers_version": "0.42.1",
        "beta_schedule": "squaredcos_cap_v2", "clip_sample": true, "clip_sample_range": 5.0,
        "num_train_timesteps": 1000, "prediction_type": "sample", "variance_type": "fixed_small_log",
    })
}

pub(crate) fn run(ctx: &Ctx) -> Result<StageSteps> {
    let stage =
        ctx.cfg.prior.as_ref().ok_or_else(|| TrainError::stage("prior", "no [prior] section"))?;
    let cond = ctx.conditioning()?;
    let device = ctx.device;
    let t = &stage.train;
    // Embedding shards carry the image embeddings: no pictures to decode.
    let pixels = (ctx.cfg.data.source != SourceKind::Embeddings).then_some(cond.image_size);
    let needs = |b| Needs {
        batch_size: b,
        resolution: pixels,
        clip_resolution: pixels,
        low_resolution: None,
    };
    let (loader, holdout) = ctx.loaders("prior", needs, t.batch_size)?;
    seed_init(ctx);
    let vs = VarStore::new(device);
    let model = match (&stage.init, &stage.model) {
        (Some(init), _) => {
            let dir = component_dir(init, "prior", "prior.init")?;
            let cfg = PriorConfig::from_file(&dir.join("config.json"))?;
            let model = PriorTransformer::new(vs.root(), &cfg)?;
            unclip_core::weights::load_file(
                &vs,
                &dir.join("diffusion_pytorch_model.safetensors"),
                unclip_core::weights::Unexpected::Error,
            )?;
            println!("prior: started from {}", dir.display());
            model
        }
        (None, Some(m)) => {
            let tokens = cond.tok.context_length() as i64;
            let cfg: PriorConfig =
                serde_json::from_value(model_config(m, cond.embed_dim()?, tokens))
                    .map_err(|e| TrainError::stage("prior", format!("model config: {e}")))?;
            cfg.validate()?;
            let mut model = PriorTransformer::new(vs.root(), &cfg)?;
            // Deterministic, so a resumed run fits the same values (the checkpoint holds them too).
            let stats = super::super::source::loader(
                ctx.data.train.clone(),
                &ctx.cfg.data,
                ctx.seed(),
                0x57a7,
                needs(256.min(ctx.data.train.len())),
            )?;
            let mut embeds = Vec::new();
            let mut seen = 0;
            let mut i = 0u64;
            while seen < stage.stat_items.min(ctx.data.train.len()) {
                let b = stats.batch(i)?;
                let e = cond.image_embeds(&b, "prior")?;
                seen += e.size()[0] as usize;
                embeds.push(e);
                i += 1;
            }
            fit_clip_stats(&mut model, &Tensor::f_cat(&embeds, 0)?)?;
            model
        }
        (None, None) => {
            return Err(TrainError::stage("prior", "prior.model or prior.init is required"));
        }
    };
    let uncond = cond.encode_text(&[""])?;
    let trainer = PriorTrainer::karlo(uncond, TrainOptions { cond_drop_prob: stage.text_dropout })?;
    let mut step = |batch: &Batch| -> Result<(Tensor, Vec<f64>)> {
        let text = cond.encode_text(&batch.captions)?;
        let image_embeds = cond.image_embeds(batch, "prior")?;
        let loss =
            trainer.loss(&model, &PriorBatch { image_embeds, text }, &mut step_noise(ctx.dist))?;
        Ok((loss, vec![]))
    };
    let mut after = || Ok(());
    // Validation: the prior's samples (EMA weights) for the held-out captions against the
    // held-out images' true embeddings: mean cosine to the own image and top-1 retrieval in
    // `validation/metrics.csv`; the picture shows the first `validation.grid` true images over
    // the held-out images nearest to their captions' samples.
    let held = grid::holdout_batch(ctx, needs)?;
    let truth = match &held {
        Some(b) => Some((cond.image_embeds(b, "prior")?, cond.encode_text(&b.captions)?)),
        None => None,
    };
    let empty = cond.encode_text(&[""])?;
    let model_cfg = model.config().clone();
    let (shown, sample_steps) = (ctx.cfg.validation.grid, ctx.cfg.validation.sample_steps);
    let mut pictures = |done: u64, ema: Option<&Ema>, dir: &Path| -> Result<()> {
        let (Some(b), Some((truth, text))) = (&held, &truth) else { return Ok(()) };
        let mut eval_vs = VarStore::new(device);
        let eval = PriorTransformer::new(eval_vs.root(), &model_cfg)?;
        eval_vs.copy(&vs)?; // with clip_mean / clip_std
        if let Some(e) = ema {
            e.copy_to(&eval_vs)?;
        }
        let opts = SampleOptions { num_inference_steps: sample_steps, guidance_scale: 4.0 };
        let mut noise = TorchNoise::new(ctx.seed() ^ 0x0070_7269_6f72);
        let sampled = tch::no_grad(|| {
            sample(&eval, &mut karlo_prior_scheduler()?, text, Some(&empty), &opts, &mut noise)
        })?;
        let sim = grid::cosine(&sampled, truth)?;
        let own = sim.f_diagonal(0, 0, 1)?.f_mean(tch::Kind::Float)?.f_double_value(&[])?;
        let (top1, nearest) = grid::top1(&sim)?;
        grid::log_metrics("prior", dir, done, &["mean_cosine", "top1_retrieval"], &[own, top1])?;
        match &b.images {
            Some(images) if shown > 0 => {
                let g = (shown as i64).min(nearest.size()[0]);
                let found = images
                    .f_index_select(0, &nearest.f_narrow(0, 0, g)?.f_to_device(images.device())?)?;
                grid::save(dir, done, Some(&images.f_narrow(0, 0, g)?), &found)
            }
            _ => Ok(()),
        }
    };
    let hooks = StageHooks { step: &mut step, after: &mut after, pictures: &mut pictures };
    let dir = ctx.stage_dir("prior");
    let steps = loop_::train(ctx, "prior", &vs, t, &[], &loader, holdout.as_ref(), hooks)?;
    if steps.finished && ctx.is_main() {
        unclip_core::weights::load_file(
            &vs,
            &dir.join(WEIGHTS),
            unclip_core::weights::Unexpected::Error,
        )?;
        let dest = dir.join(MODEL);
        model.save_pretrained(&vs, &dest.join("prior"), None)?;
        write_json(
            &dest.join("prior_scheduler").join("scheduler_config.json"),
            &scheduler_config(),
        )?;
    }
    Ok(steps)
}
