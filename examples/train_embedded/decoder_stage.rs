//! Stage 4: the decoder (Karlo's `UNet2DConditionModel` + `UnCLIPTextProjModel`) at the low
//! resolution, conditioned on our CLIP's image embedding and caption: learned-variance hybrid
//! loss, image embedding dropped 10% and caption 50% of the time (`unclip_decoder::train`).

use crate::recipe::Optim;
use crate::stage::{Ctx, encode_images, encode_text, stage_weights, train};
use std::path::Path;
use tch::nn::VarStore;
use unclip::core::weights::{Unexpected, load_file};
use unclip::decoder::train::{DecoderBatch, DecoderTrainer, EmptyCaption};
use unclip::decoder::{
    TextProjConfig, UNet2DConditionConfig, UNet2DConditionModel, UnCLIPTextProjModel,
};
use unclip::scheduler::TorchNoise;

/// VarStore prefixes of the two models trained together (split again at export).
pub const UNET: &str = "decoder";
pub const TEXT_PROJ: &str = "text_proj";

/// Timesteps from here to T get half of each fine-tuning batch.
pub const TUNE_FROM: i64 = 850;
/// Cap of the 1/SNR weight of the fine-tuning's implied-x0 loss term.
pub const TUNE_X0_CAP: f64 = 50.0;

pub fn run(ctx: &Ctx) -> anyhow::Result<()> {
    train_decoder(ctx, "decoder", &ctx.recipe.decoder, DecoderTrainer::karlo(), None)
}

/// Stage 4b: continues from the decoder's EMA weights with half of each batch's timesteps in
/// `[TUNE_FROM, T)` and an implied-x0 loss term weighted by min(1/SNR, TUNE_X0_CAP)
/// (`DecoderTrainer::with_high_noise_emphasis`); export ships this decoder.
pub fn tune(ctx: &Ctx) -> anyhow::Result<()> {
    let start = stage_weights(ctx, "decoder")?;
    let trainer = DecoderTrainer::karlo().with_high_noise_emphasis(TUNE_FROM, 0.5, TUNE_X0_CAP)?;
    train_decoder(ctx, "decoder_tune", &ctx.recipe.decoder_tune, trainer, Some(&start))
}

fn train_decoder(
    ctx: &Ctx,
    name: &str,
    optim: &Optim,
    trainer: DecoderTrainer,
    start_from: Option<&Path>,
) -> anyhow::Result<()> {
    let tok = ctx.tokenizer()?;
    let clip = ctx.clip()?;
    let data = ctx.data();
    let device = ctx.device;
    let unet_cfg: UNet2DConditionConfig = serde_json::from_value(ctx.recipe.decoder_config())?;
    let proj_cfg: TextProjConfig = serde_json::from_value(ctx.recipe.text_proj_config())?;
    unet_cfg.validate()?;
    proj_cfg.validate()?;
    // Same seed, same initial weights (a resumed run loads them from its checkpoint).
    tch::manual_seed(ctx.recipe.seed as i64);
    let vs = VarStore::new(device);
    let unet = UNet2DConditionModel::new(vs.root() / UNET, &unet_cfg)?;
    let text_proj = UnCLIPTextProjModel::new(vs.root() / TEXT_PROJ, &proj_cfg)?;
    if let Some(path) = start_from {
        load_file(&vs, path, Unexpected::Error)?;
    }
    let empty = encode_text(&clip, &tok, &[""])?;
    train(
        ctx,
        name,
        &vs,
        optim,
        &["mse", "vb"],
        |_, idx| {
            let batch = data.batch(idx, device)?;
            let text = encode_text(&clip, &tok, &batch.captions)?;
            let image_embeddings = encode_images(&clip, &batch.pixels)?;
            let b = DecoderBatch {
                images: &batch.low,
                image_embeddings: &image_embeddings,
                prompt_embeds: &text.text_embeds,
                text_hidden_states: &text.hidden_states,
                text_mask: &text.mask,
                empty_caption: Some(EmptyCaption {
                    prompt_embeds: &empty.text_embeds,
                    text_hidden_states: &empty.hidden_states,
                    text_mask: &empty.mask,
                }),
            };
            let l = trainer.loss(&unet, &text_proj, &b, &mut TorchNoise::unseeded())?;
            let extra = vec![l.mse.f_double_value(&[])?, l.vb.f_double_value(&[])?];
            Ok((l.loss, extra))
        },
        || Ok(()),
    )?;
    Ok(())
}
