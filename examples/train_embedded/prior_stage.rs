//! Stage 3: the diffusion prior on our CLIP's embeddings: `clip_mean`/`clip_std` fitted on
//! training images first, then x0-prediction with 10% of the captions dropped to the empty one
//! (`unclip_prior::PriorTrainer`).

use crate::stage::{Ctx, encode_images, encode_text, train};
use tch::{Tensor, nn::VarStore};
use unclip::prior::{
    PriorBatch, PriorConfig, PriorTrainer, PriorTransformer, TrainOptions, fit_clip_stats,
};
use unclip::scheduler::TorchNoise;

/// Images the embedding statistics are computed from.
const STAT_IMAGES: usize = 4096;

pub fn run(ctx: &Ctx) -> anyhow::Result<()> {
    let tok = ctx.tokenizer()?;
    let clip = ctx.clip()?;
    let data = ctx.data();
    let device = ctx.device;
    let cfg: PriorConfig = serde_json::from_value(ctx.recipe.prior_config())?;
    // Same seed, same initial weights (a resumed run loads them from its checkpoint).
    tch::manual_seed(ctx.recipe.seed as i64);
    let vs = VarStore::new(device);
    let mut model = PriorTransformer::new(vs.root(), &cfg)?;
    // Deterministic, so a resumed run fits the same values (the checkpoint holds them too).
    let n = STAT_IMAGES.min(data.len);
    let mut embeds = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(256) {
        embeds.push(encode_images(&clip, &data.batch(chunk, device)?.pixels)?);
    }
    fit_clip_stats(&mut model, &Tensor::f_cat(&embeds, 0)?)?;
    let uncond = encode_text(&clip, &tok, &[""])?;
    let trainer = PriorTrainer::karlo(uncond, TrainOptions { cond_drop_prob: 0.1 })?;
    train(
        ctx,
        "prior",
        &vs,
        &ctx.recipe.prior,
        &[],
        |_, idx| {
            let batch = data.batch(idx, device)?;
            let text = encode_text(&clip, &tok, &batch.captions)?;
            let image_embeds = encode_images(&clip, &batch.pixels)?;
            let loss = trainer.loss(
                &model,
                &PriorBatch { image_embeds, text },
                &mut TorchNoise::unseeded(),
            )?;
            Ok((loss, vec![]))
        },
        || Ok(()),
    )?;
    Ok(())
}
