//! The upsampler stage: Karlo's super-resolution UNet (low -> high resolution) trained on
//! random crops of the high-resolution images, the low-resolution input optionally blurred as
//! in unCLIP's first upsampler (`unclip_decoder::train::UpsamplerTrainer`).

use super::super::config::UpsamplerModelConfig;
use super::super::dist::step_noise;
use super::super::loop_::{self, Ctx, MODEL, StageHooks, StageSteps, WEIGHTS};
use super::super::source::Needs;
use super::super::{Result, TrainError, write_json};
use super::decoder::prediction;
use super::{component_dir, seed_init};
use crate::data::Batch;
use crate::loading::{SUPER_RES_2, SUPER_RES_2_SCHEDULER};
use serde_json::{Value, json};
use std::path::Path;
use tch::{Kind, Tensor};
use unclip_core::train::Ema;
use unclip_core::weights::Unexpected;
use unclip_decoder::checkpoint;
use unclip_decoder::sampling::{SuperResSampling, sample_super_res};
use unclip_decoder::train::{LowResCorruption, UpsamplerTrainer};
use unclip_decoder::upsample::resize_bicubic_aa;
use unclip_decoder::{UNet2DConfig, UNet2DModel};
use unclip_scheduler::{NoiseSchedule, TorchNoise};

/// diffusers' `UNet2DModel` config of Karlo's super-resolution UNets (low-res image
/// concatenated to the noisy sample; no attention, so it can train on crops).
pub(crate) fn model_config(m: &UpsamplerModelConfig, side: u32) -> Value {
    let n = m.channels.len();
    json!({
        "_class_name": "UNet2DModel", "act_fn": "silu", "add_attention": false,
        "attention_head_dim": null, "block_out_channels": m.channels, "center_input_sample": false,
        "class_embed_type": null, "down_block_types": vec!["ResnetDownsampleBlock2D"; n],
        "downsample_padding": 1, "dropout": 0.0, "flip_sin_to_cos": true, "freq_shift": 0,
        "in_channels": 6, "layers_per_block": m.layers_per_block, "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2D", "norm_eps": 1e-5, "norm_num_groups": m.norm_groups,
        "out_channels": 3, "resnet_time_scale_shift": "scale_shift", "sample_size": side,
        "time_embedding_type": "positional", "up_block_types": vec!["ResnetUpsampleBlock2D"; n],
    })
}

/// Trains `[upsampler]` (exported as Karlo's `super_res_first`/`super_res_last`) or
/// `[upsampler2]` (`name`; exported as `super_res_2`, run after the first).
pub(crate) fn run(ctx: &Ctx, name: &'static str) -> Result<StageSteps> {
    let (section, unet_names, sched_name): (_, &[&str], _) = match name {
        "upsampler" => {
            (&ctx.cfg.upsampler, &["super_res_first", "super_res_last"], "super_res_scheduler")
        }
        _ => (&ctx.cfg.upsampler2, &[SUPER_RES_2], SUPER_RES_2_SCHEDULER),
    };
    let stage =
        section.as_ref().ok_or_else(|| TrainError::stage(name, format!("no [{name}] section")))?;
    let device = ctx.device;
    let (cfg, init): (UNet2DConfig, _) = match (&stage.init, &stage.model) {
        (Some(init), _) => {
            let dir = component_dir(init, unet_names[0], &format!("{name}.init"))?;
            (checkpoint::read_config::<UNet2DModel>(&dir)?, Some(dir))
        }
        (None, Some(m)) => (
            serde_json::from_value(model_config(m, stage.resolution))
                .map_err(|e| TrainError::stage(name, format!("model config: {e}")))?,
            None,
        ),
        (None, None) => {
            return Err(TrainError::stage(
                name,
                format!("{name}.model or {name}.init is required"),
            ));
        }
    };
    cfg.validate()?;
    seed_init(ctx);
    let loaded = checkpoint::init::<UNet2DModel>(&cfg, device, Kind::Float)?;
    if let Some(dir) = &init {
        unclip_core::weights::load_file(
            &loaded.vs,
            &dir.join("diffusion_pytorch_model.safetensors"),
            Unexpected::Error,
        )?;
        println!("{name}: started from {}", dir.display());
    }
    let pred = prediction(stage.prediction);
    let corruption = match stage.blur_sigma_max {
        Some(max) => LowResCorruption::BlurRange { min: stage.blur_sigma, max },
        None if stage.blur_sigma > 0.0 => LowResCorruption::Blur { sigma: stage.blur_sigma },
        None => LowResCorruption::None,
    };
    let scale = (stage.resolution / stage.low_resolution) as i64;
    let trainer = UpsamplerTrainer::new(NoiseSchedule::karlo(), scale, stage.crop, corruption)?
        .with_prediction(pred);
    let t = &stage.train;
    let needs = |b| Needs {
        batch_size: b,
        resolution: Some(stage.resolution),
        clip_resolution: None,
        low_resolution: None,
    };
    let (loader, holdout) = ctx.loaders(name, needs, t.batch_size)?;
    let unet = &loaded.model;
    let mut step = |batch: &Batch| -> Result<(Tensor, Vec<f64>)> {
        let high = batch
            .images
            .as_ref()
            .ok_or_else(|| TrainError::stage(name, "the batch has no images"))?;
        let l = trainer.loss(unet, &high.f_to_device(device)?, &mut step_noise(ctx.dist))?;
        Ok((l.loss, vec![]))
    };
    let mut after = || Ok(());
    let grid_batch = super::grid_batch(ctx, needs)?;
    let low_side = stage.low_resolution as i64;
    let sched = super::decoder::scheduler_config(pred, "fixed_small_log");
    let n_steps = ctx.cfg.validation.sample_steps;
    let mut pictures = |done: u64, ema: Option<&Ema>, dir: &Path| -> Result<()> {
        let Some(batch) = &grid_batch else { return Ok(()) };
        let Some(high) = &batch.images else { return Ok(()) };
        let mut eval = checkpoint::init::<UNet2DModel>(&cfg, device, Kind::Float)?;
        match ema {
            Some(e) => e.copy_to(&eval.vs)?,
            None => eval.vs.copy(&loaded.vs)?,
        }
        let low = resize_bicubic_aa(&high.f_to_device(device)?, low_side, low_side)?;
        let mut scheduler = unclip_scheduler::UnCLIPScheduler::new(
            serde_json::from_value(sched.clone())
                .map_err(|e| TrainError::stage(name, e.to_string()))?,
        )?;
        let settings = SuperResSampling { num_inference_steps: n_steps, size: None };
        tch::manual_seed(ctx.seed() as i64);
        let out = sample_super_res(
            &eval.model,
            None,
            &low,
            &settings,
            &mut scheduler,
            &mut TorchNoise::unseeded(),
            None,
        )?;
        let out = out.f_clamp(-1.0, 1.0)?;
        let side = out.size()[2];
        let low_up = resize_bicubic_aa(&low, side, side)?;
        super::super::grid::save(dir, done, Some(&low_up), &out)
    };
    let hooks = StageHooks { step: &mut step, after: &mut after, pictures: &mut pictures };
    let dir = ctx.stage_dir(name);
    let steps = loop_::train(ctx, name, &loaded.vs, t, &[], &loader, holdout.as_ref(), hooks)?;
    if steps.finished && ctx.is_main() {
        unclip_core::weights::load_file(&loaded.vs, &dir.join(WEIGHTS), Unexpected::Error)?;
        let dest = dir.join(MODEL);
        // One upsampler serves as both Karlo super-res UNets (the last one runs the final step).
        for unet in unet_names {
            checkpoint::save(&loaded, &dest.join(unet), None)?;
        }
        write_json(&dest.join(sched_name).join("scheduler_config.json"), &sched)?;
    }
    Ok(steps)
}
