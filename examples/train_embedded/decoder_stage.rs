//! Stage 4: the decoder (Karlo's `UNet2DConditionModel` + `UnCLIPTextProjModel`) at the low
//! resolution, conditioned on our CLIP's image embedding and caption: v prediction with learned
//! variance, image embedding dropped 10% and caption 50% of the time (`unclip_decoder::train`).

use crate::stage::{Ctx, encode_images, encode_text, train};
use tch::Tensor;
use tch::nn::VarStore;
use unclip::core::weights::{Unexpected, load_tensors, read_tensors};
use unclip::decoder::train::{DecoderBatch, DecoderTrainer, EmptyCaption, Timesteps};
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
    let r = &ctx.recipe;
    let timesteps = if r.decoder_high_noise > 0.0 {
        Timesteps::HighNoise { share: r.decoder_high_noise, from: r.decoder_high_noise_from }
    } else {
        Timesteps::Uniform
    };
    let mut trainer = DecoderTrainer::karlo().with_prediction(PREDICTION).with_timesteps(timesteps);
    trainer.text_dropout = r.decoder_text_dropout;
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
    if let Some(path) = &r.decoder_init {
        warm_start(&vs, path)?;
    }
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

/// Loads a finished decoder stage's weights into `vs` (a resumed run then loads its own
/// checkpoint over them) with the checked loader, which names every missing or misshapen tensor.
/// One difference is allowed: an input convolution that gained input channels (coordinate
/// inputs) gets zero weights for them, so the fine-tune starts from exactly the old model.
pub(crate) fn warm_start(vs: &VarStore, path: &std::path::Path) -> anyhow::Result<()> {
    let mut saved = read_tensors(path)?;
    for (name, var) in vs.variables() {
        let Some(old) = saved.get(&name).filter(|_| name.ends_with("conv_in.weight")) else {
            continue;
        };
        let (want, have) = (var.size(), old.size());
        if want.len() == 4 && have.len() == 4 && want[1] > have[1] && want[0] == have[0] {
            let extra = old.f_new_zeros(
                [have[0], want[1] - have[1], have[2], have[3]],
                (old.kind(), old.device()),
            )?;
            let widened = Tensor::f_cat(&[old.shallow_clone(), extra], 1)?;
            saved.insert(name, widened);
        }
    }
    load_tensors(vs, &saved, &path.display().to_string(), Unexpected::Error)?;
    println!("decoder: started from {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::Recipe;
    use tch::{Device, Kind};

    /// A decoder (UNet + text projection) of `recipe`'s shape in a fresh VarStore.
    fn build(recipe: &Recipe, seed: i64) -> (VarStore, UNet2DConditionModel) {
        let cfg: UNet2DConditionConfig = serde_json::from_value(recipe.decoder_config()).unwrap();
        let proj: TextProjConfig = serde_json::from_value(recipe.text_proj_config()).unwrap();
        tch::manual_seed(seed);
        let vs = VarStore::new(Device::Cpu);
        let unet = UNet2DConditionModel::new(vs.root() / UNET, &cfg).unwrap();
        UnCLIPTextProjModel::new(vs.root() / TEXT_PROJ, &proj).unwrap();
        (vs, unet)
    }

    #[test]
    fn a_warm_start_with_coordinate_inputs_begins_as_the_old_decoder() {
        let dir = unclip::core::fsutil::scratch_dir("decoder-warm-start").unwrap();
        let path = dir.join("weights.safetensors");
        let plain = Recipe::quick();
        let (old_vs, old) = build(&plain, 1);
        old_vs.save(&path).unwrap();

        let coords = Recipe { decoder_coordinates: true, ..plain.clone() };
        let (vs, unet) = build(&coords, 2);
        warm_start(&vs, &path).unwrap();
        let d = coords.clip_dim;
        let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let ctx = Tensor::randn([2, 5, d], (Kind::Float, Device::Cpu));
        let class = Tensor::randn([2, 4 * 32], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[10i64, 900]);
        let (a, b) = tch::no_grad(|| {
            (
                old.forward(&x, &t, Some(&ctx), Some(&class), None).unwrap(),
                unet.forward(&x, &t, Some(&ctx), Some(&class), None).unwrap(),
            )
        });
        assert_eq!(
            Vec::<f32>::try_from(a.flatten(0, -1)).unwrap(),
            Vec::<f32>::try_from(b.flatten(0, -1)).unwrap()
        );

        // Anything else that differs is refused, naming the tensor.
        let wider = Recipe { decoder_channels: vec![32, 64, 96], ..plain };
        let (vs, _) = build(&wider, 3);
        let e = warm_start(&vs, &path).unwrap_err().to_string();
        assert!(e.contains("decoder.") && e.contains("expected"), "{e}");
    }
}
