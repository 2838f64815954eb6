//! Stage 2: CLIP, both towers from scratch, with the contrastive loss of `unclip_clip::train`
//! on (caption, rendered image) pairs; the learned temperature is clamped as CLIP does. Each
//! batch holds groups of counterpart scenes (`Recipe::clip_group`): hard negatives.

use crate::stage::{Ctx, WEIGHTS, train, write_bytes};
use tch::{Kind, Tensor};
use unclip::clip::train::MAX_LOGIT_SCALE;
use unclip::clip::{AnyConfig, ClipModel, Towers, Truncation, contrastive_loss};

pub fn run(ctx: &Ctx) -> anyhow::Result<()> {
    let tok = ctx.tokenizer()?;
    let dir = ctx.out.join("clip");
    std::fs::create_dir_all(&dir)?;
    let cfg = ctx.recipe.clip_config(tok.vocab_size(), tok.bos_id(), tok.eos_id(), tok.pad_id());
    // Same seed, same initial weights (a resumed run loads them from its checkpoint).
    tch::manual_seed(ctx.recipe.seed as i64);
    let model = ClipModel::new(AnyConfig::from_value(cfg)?, Towers::Both, ctx.device, Kind::Float)?;
    let json = serde_json::to_string_pretty(&model.config_json())?;
    write_bytes(&dir.join("config.json"), json.as_bytes())?;
    let data = ctx.data();
    let device = ctx.device;
    let vs = model.var_store();
    train(
        ctx,
        "clip",
        vs,
        &ctx.recipe.clip,
        &["batch_acc"],
        |_, idx| {
            let batch = data.contrastive_batch(idx, ctx.recipe.clip_group, device)?;
            let enc = tok.encode_batch(&batch.captions, Truncation::Truncate, device)?;
            let out = model.forward(&enc.input_ids, None, &batch.pixels)?;
            let loss = contrastive_loss(&out.logits_per_text)?;
            // Fraction of captions whose own image scores highest in the batch.
            let acc = tch::no_grad(|| -> anyhow::Result<f64> {
                let n = idx.len() as i64;
                let hit = out
                    .logits_per_text
                    .f_argmax(1, false)?
                    .f_eq_tensor(&Tensor::f_arange(n, (Kind::Int64, device))?)?;
                Ok(hit.f_to_kind(Kind::Float)?.f_mean(Kind::Float)?.f_double_value(&[])?)
            })?;
            Ok((loss, vec![acc]))
        },
        || {
            tch::no_grad(|| -> anyhow::Result<()> {
                let mut s = model.logit_scale()?.shallow_clone();
                let _ = s.f_clamp_(0.0, MAX_LOGIT_SCALE)?;
                Ok(())
            })
        },
    )?;
    debug_assert!(dir.join(WEIGHTS).exists());
    Ok(())
}
