//! Stage 4: the decoder (Karlo's `UNet2DConditionModel` + `UnCLIPTextProjModel`) at the low
//! resolution, conditioned on our CLIP's image embedding and caption: v prediction with learned
//! variance, image embedding dropped 10% and caption 50% of the time (`unclip_decoder::train`).

use crate::stage::{Ctx, encode_images, encode_text, train};
use tch::nn::VarStore;
use unclip::decoder::train::{DecoderBatch, DecoderTrainer, EmptyCaption};
use unclip::decoder::{
    TextProjConfig, UNet2DConditionConfig, UNet2DConditionModel, UnCLIPTextProjModel,
};
use unclip::scheduler::{PredictionType, TorchNoise};

/// VarStore prefixes of the two models trained together (split again at export).
pub const UNET: &str = "decoder";
pub const TEXT_PROJ: &str = "text_proj";

/// The decoder predicts v (`DecoderTrainer::with_prediction` says why): an epsilon decoder of the
/// same size and steps ignored its conditioning at high noise and drew random backgrounds, an x0
/// decoder was imprecise at low noise and its learned variance blew up (README, "The embedded
/// model").
pub const PREDICTION: PredictionType = PredictionType::VPrediction;

pub fn run(ctx: &Ctx) -> anyhow::Result<()> {
    let trainer = DecoderTrainer::karlo().with_prediction(PREDICTION);
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
    let empty = encode_text(&clip, &tok, &[""])?;
    train(
        ctx,
        "decoder",
        &vs,
        &ctx.recipe.decoder,
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
