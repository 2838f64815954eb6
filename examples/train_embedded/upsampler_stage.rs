//! Stage 5: the super-resolution UNet (low -> high resolution), trained on random crops of the
//! high-res renders with the low-res input blurred as in unCLIP's first upsampler
//! (`unclip_decoder::train::UpsamplerTrainer`), predicting v like the decoder.

use crate::decoder_stage::PREDICTION;
use crate::stage::{Ctx, train};
use tch::nn::VarStore;
use unclip::decoder::train::{LowResCorruption, UpsamplerTrainer};
use unclip::decoder::{UNet2DConfig, UNet2DModel};
use unclip::scheduler::{NoiseSchedule, TorchNoise};

pub fn run(ctx: &Ctx) -> anyhow::Result<()> {
    let data = ctx.data();
    let device = ctx.device;
    let r = &ctx.recipe;
    let cfg: UNet2DConfig = serde_json::from_value(r.upsampler_config())?;
    cfg.validate()?;
    // Same seed, same initial weights (a resumed run loads them from its checkpoint).
    tch::manual_seed(ctx.recipe.seed as i64);
    let vs = VarStore::new(device);
    let unet = UNet2DModel::new(vs.root(), &cfg)?;
    let trainer = UpsamplerTrainer::new(
        NoiseSchedule::karlo(),
        r.high_res / r.low_res,
        r.upsampler_crop,
        LowResCorruption::Blur { sigma: 0.6 },
    )?
    .with_prediction(PREDICTION);
    train(
        ctx,
        "upsampler",
        &vs,
        &r.upsampler,
        &[],
        |_, idx| {
            let batch = data.batch(idx, device)?;
            let l = trainer.loss(&unet, &batch.high, &mut TorchNoise::unseeded())?;
            Ok((l.loss, vec![]))
        },
        || Ok(()),
    )?;
    Ok(())
}
