//! The decoder stage: Karlo's `UNet2DConditionModel` + `UnCLIPTextProjModel` at
//! `decoder.resolution`, conditioned on the conditioning CLIP's image embedding and caption,
//! with learned variance; image embedding dropped 10% and caption `decoder.text_dropout` of the
//! time (`unclip_decoder::train`). `decoder.init` fine-tunes a pretrained decoder folder.

use super::super::config::{DecoderModelConfig, DecoderStage, Prediction};
use super::super::dist::step_noise;
use super::super::loop_::{self, Conditioning, Ctx, MODEL, StageHooks, StageSteps, WEIGHTS};
use super::super::source::Needs;
use super::super::{Result, TrainError, write_json};
use super::{component_dir, seed_init};
use crate::data::Batch;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::Path;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use unclip_core::train::Ema;
use unclip_core::weights::{Unexpected, load_tensors, read_tensors};
use unclip_decoder::checkpoint::{self, Component};
use unclip_decoder::sampling::{DecoderInputs, DecoderSampling, sample_decoder};
use unclip_decoder::train::{DecoderBatch, DecoderTrainer, EmptyCaption, Timesteps};
use unclip_decoder::{
    TextProjConfig, UNet2DConditionConfig, UNet2DConditionModel, UnCLIPTextProjModel,
};
use unclip_scheduler::{PredictionType, TorchNoise};

/// VarStore prefixes of the two models trained together (split again into components).
pub const UNET: &str = "decoder";
pub const TEXT_PROJ: &str = "text_proj";

pub(crate) fn prediction(p: Prediction) -> PredictionType {
    match p {
        Prediction::Epsilon => PredictionType::Epsilon,
        Prediction::VPrediction => PredictionType::VPrediction,
        Prediction::Sample => PredictionType::Sample,
    }
}

/// diffusers' `UNet2DConditionModel` config in Karlo's decoder layout (learned variance: 6
/// output channels; scale-shift time conditioning; simple cross-attention below the top).
pub(crate) fn unet_config(m: &DecoderModelConfig, dim: i64, side: u32) -> Value {
    let n = m.channels.len();
    let down: Vec<&str> = (0..n)
        .map(|i| if i == 0 { "ResnetDownsampleBlock2D" } else { "SimpleCrossAttnDownBlock2D" })
        .collect();
    let up: Vec<&str> = (0..n)
        .map(|i| if i + 1 == n { "ResnetUpsampleBlock2D" } else { "SimpleCrossAttnUpBlock2D" })
        .collect();
    let coords = if m.coordinates { 2 } else { 0 };
    let mut cfg = json!({
        "_class_name": "UNet2DConditionModel", "act_fn": "silu",
        "attention_head_dim": m.attention_head_dim, "block_out_channels": m.channels,
        "center_input_sample": false, "class_embed_type": "identity", "cross_attention_dim": dim,
        "down_block_types": down, "downsample_padding": 1, "dual_cross_attention": false,
        "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 3 + coords,
        "layers_per_block": m.layers_per_block, "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "norm_eps": 1e-5,
        "norm_num_groups": m.norm_groups, "only_cross_attention": false, "out_channels": 6,
        "resnet_time_scale_shift": "scale_shift", "sample_size": side,
        "time_embedding_type": "positional", "up_block_types": up, "upcast_attention": false,
        "use_linear_projection": false,
    });
    if coords > 0 {
        cfg["coordinate_channels"] = json!(coords);
    }
    cfg
}

/// diffusers' `UnCLIPTextProjModel` config matching the decoder.
pub(crate) fn text_proj_config(m: &DecoderModelConfig, dim: i64) -> Value {
    json!({
        "_class_name": "UnCLIPTextProjModel", "clip_embeddings_dim": dim,
        "clip_extra_context_tokens": 4, "cross_attention_dim": dim,
        "time_embed_dim": m.channels[0] * 4,
    })
}

/// Karlo's decoder sampler config (learned range), for `prediction`.
pub(crate) fn scheduler_config(prediction: PredictionType, variance: &str) -> Value {
    json!({
        "_class_name": "UnCLIPScheduler", "_diffusers_version": "0.42.1",
        "beta_schedule": "squaredcos_cap_v2", "clip_sample": true, "clip_sample_range": 1.0,
        "num_train_timesteps": 1000, "prediction_type": prediction, "variance_type": variance,
    })
}

fn parse<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> Result<T> {
    serde_json::from_value(v)
        .map_err(|e| TrainError::stage("decoder", format!("{what} config: {e}")))
}

/// The decoder's two models in one store under [`UNET`] and [`TEXT_PROJ`].
pub(crate) struct Model {
    pub vs: VarStore,
    pub unet: UNet2DConditionModel,
    pub text_proj: UnCLIPTextProjModel,
}

/// The configs from `decoder.model`, or from `decoder.init`'s folders.
fn configs(stage: &DecoderStage, dim: i64) -> Result<(UNet2DConditionConfig, TextProjConfig)> {
    let (unet, proj) = match (&stage.model, &stage.init) {
        (Some(m), _) => (
            parse(unet_config(m, dim, stage.resolution), "decoder")?,
            parse(text_proj_config(m, dim), "text_proj")?,
        ),
        (None, Some(init)) => {
            let (u, p) = init_dirs(init)?;
            (
                checkpoint::read_config::<UNet2DConditionModel>(&u)?,
                checkpoint::read_config::<UnCLIPTextProjModel>(&p)?,
            )
        }
        (None, None) => {
            return Err(TrainError::stage("decoder", "decoder.model or decoder.init is required"));
        }
    };
    unet.validate()?;
    proj.validate()?;
    Ok((unet, proj))
}

fn build(
    unet_cfg: &UNet2DConditionConfig,
    proj_cfg: &TextProjConfig,
    device: Device,
) -> Result<Model> {
    let vs = VarStore::new(device);
    let unet = UNet2DConditionModel::new(vs.root() / UNET, unet_cfg)?;
    let text_proj = UnCLIPTextProjModel::new(vs.root() / TEXT_PROJ, proj_cfg)?;
    Ok(Model { vs, unet, text_proj })
}

/// `decoder.init`'s decoder folder and its `text_proj` sibling.
fn init_dirs(init: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let unet = component_dir(init, "decoder", "decoder.init")?;
    let proj =
        unet.parent().map(|p| p.join("text_proj")).filter(|p| p.join("config.json").is_file());
    let proj = proj.ok_or_else(|| {
        TrainError::stage(
            "decoder",
            format!("decoder.init = {}: no text_proj folder beside the decoder", init.display()),
        )
    })?;
    Ok((unet, proj))
}

/// The tensors of a decoder folder and its text projection under the stage's prefixes.
pub(crate) fn folder_tensors(init: &Path) -> Result<HashMap<String, Tensor>> {
    let (unet, proj) = init_dirs(init)?;
    let mut all = HashMap::new();
    for (dir, prefix) in [(unet, UNET), (proj, TEXT_PROJ)] {
        let file = dir.join("diffusion_pytorch_model.safetensors");
        for (name, t) in read_tensors(&file)? {
            all.insert(format!("{prefix}.{name}"), t.f_to_kind(Kind::Float)?);
        }
    }
    Ok(all)
}

/// The model a fresh decoder stage starts from: built from `decoder.model` (seeded), with
/// `decoder.init`'s weights when given.
pub(crate) fn initial(
    ctx: &Ctx,
    stage: &DecoderStage,
    cond: &Conditioning,
) -> Result<(Model, UNet2DConditionConfig, TextProjConfig)> {
    let (unet_cfg, proj_cfg) = configs(stage, cond.embed_dim()?)?;
    seed_init(ctx);
    let model = build(&unet_cfg, &proj_cfg, ctx.device)?;
    if let Some(init) = &stage.init {
        warm_start_tensors(&model.vs, folder_tensors(init)?, &init.display().to_string())?;
    }
    Ok((model, unet_cfg, proj_cfg))
}

pub(crate) fn run(ctx: &Ctx) -> Result<StageSteps> {
    let stage = ctx
        .cfg
        .decoder
        .as_ref()
        .ok_or_else(|| TrainError::stage("decoder", "no [decoder] section"))?;
    let cond = ctx.conditioning()?;
    let device = ctx.device;
    let timesteps = if stage.high_noise > 0.0 {
        Timesteps::HighNoise { share: stage.high_noise, from: stage.high_noise_from }
    } else {
        Timesteps::Uniform
    };
    let pred = prediction(stage.prediction);
    let mut trainer = DecoderTrainer::karlo()
        .with_prediction(pred)
        .with_timesteps(timesteps)
        .with_edge_weight(stage.edge_weight)?;
    trainer.text_dropout = stage.text_dropout;
    let (model, unet_cfg, proj_cfg) = initial(ctx, stage, &cond)?;
    let t = &stage.train;
    let side = stage.resolution;
    let needs = |b| Needs {
        batch_size: b,
        resolution: Some(side),
        clip_resolution: Some(cond.image_size),
        low_resolution: None,
    };
    let (loader, holdout) = ctx.loaders("decoder", needs, t.batch_size)?;
    let empty = cond.encode_text(&[""])?;
    let mut step = |batch: &Batch| -> Result<(Tensor, Vec<f64>)> {
        let images = batch
            .images
            .as_ref()
            .ok_or_else(|| TrainError::stage("decoder", "the batch has no images"))?;
        let images = images.f_to_device(device)?;
        let text = cond.encode_text(&batch.captions)?;
        let image_embeddings = cond.image_embeds(batch, "decoder")?;
        let b = DecoderBatch {
            images: &images,
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
        let l = trainer.loss(&model.unet, &model.text_proj, &b, &mut step_noise(ctx.dist))?;
        let extra = vec![l.mse.f_double_value(&[])?, l.vb.f_double_value(&[])?];
        Ok((l.loss, extra))
    };
    let mut after = || Ok(());
    let grid_batch = super::grid_batch(ctx, needs)?;
    let (ucfg, pcfg) = (unet_cfg.clone(), proj_cfg.clone());
    let steps_n = ctx.cfg.validation.sample_steps;
    let mut pictures = |done: u64, ema: Option<&Ema>, dir: &Path| -> Result<()> {
        let Some(batch) = &grid_batch else { return Ok(()) };
        let mut eval = build(&ucfg, &pcfg, device)?;
        match ema {
            Some(e) => e.copy_to(&eval.vs)?,
            None => eval.vs.copy(&model.vs)?,
        }
        let samples = sample(&eval, &cond, batch, pred, steps_n, ctx.seed())?;
        let originals = batch.images.as_ref().map(|i| i.shallow_clone());
        super::super::grid::save(dir, done, originals.as_ref(), &samples)
    };
    let hooks = StageHooks { step: &mut step, after: &mut after, pictures: &mut pictures };
    let dir = ctx.stage_dir("decoder");
    let steps = loop_::train(
        ctx,
        "decoder",
        &model.vs,
        t,
        &["mse", "vb"],
        &loader,
        holdout.as_ref(),
        hooks,
    )?;
    if steps.finished && ctx.is_main() {
        let tensors = read_tensors(&dir.join(WEIGHTS))?;
        let dest = dir.join(MODEL);
        save_component::<UNet2DConditionModel>(&unet_cfg, &tensors, UNET, &dest.join("decoder"))?;
        save_component::<UnCLIPTextProjModel>(
            &proj_cfg,
            &tensors,
            TEXT_PROJ,
            &dest.join("text_proj"),
        )?;
        write_json(
            &dest.join("decoder_scheduler").join("scheduler_config.json"),
            &scheduler_config(pred, "learned_range"),
        )?;
    }
    Ok(steps)
}

/// Decoder samples for the batch's captions and image embeddings (guidance 3, fixed noise).
fn sample(
    m: &Model,
    cond: &Conditioning,
    batch: &Batch,
    pred: PredictionType,
    steps: usize,
    seed: u64,
) -> Result<Tensor> {
    let text = cond.encode_text(&batch.captions)?;
    let empty = cond.encode_text(&vec![""; batch.captions.len()])?;
    let embeds = cond.image_embeds(batch, "decoder")?;
    let cat = |a: &Tensor, b: &Tensor| Tensor::f_cat(&[a, b], 0);
    let inputs = DecoderInputs {
        image_embeddings: &embeds,
        prompt_embeds: &cat(&empty.text_embeds, &text.text_embeds)?,
        text_hidden_states: &cat(&empty.hidden_states, &text.hidden_states)?,
        text_mask: &cat(&empty.mask, &text.mask)?,
    };
    let mut scheduler = unclip_scheduler::UnCLIPScheduler::new(parse(
        scheduler_config(pred, "learned_range"),
        "scheduler",
    )?)?;
    let settings =
        DecoderSampling { num_inference_steps: steps, guidance_scale: Some(3.0), size: None };
    tch::manual_seed(seed as i64);
    Ok(sample_decoder(
        &m.unet,
        &m.text_proj,
        &inputs,
        &settings,
        &mut scheduler,
        &mut TorchNoise::unseeded(),
        None,
    )?)
}

/// A diffusers component from `cfg` with the tensors under `prefix.`.
fn save_component<M: Component>(
    cfg: &M::Config,
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    dest: &Path,
) -> Result<()> {
    let loaded = checkpoint::init::<M>(cfg, Device::Cpu, Kind::Float)?;
    let own: HashMap<String, Tensor> = tensors
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(&format!("{prefix}.")).map(|n| (n.to_string(), v.shallow_clone()))
        })
        .collect();
    load_tensors(&loaded.vs, &own, prefix, Unexpected::Error)?;
    std::fs::create_dir_all(dest).map_err(|e| TrainError::io(dest, e))?;
    checkpoint::save(&loaded, dest, None)?;
    Ok(())
}

/// Loads decoder weights (a finished decoder stage's `weights.safetensors`) into `vs` with the
/// checked loader, which names every missing or misshapen tensor. One difference is allowed: an
/// input convolution that gained input channels (coordinate inputs) gets zero weights for them,
/// so the fine-tune starts from exactly the old model.
pub fn warm_start(vs: &VarStore, path: &Path) -> Result<()> {
    warm_start_tensors(vs, read_tensors(path)?, &path.display().to_string())
}

fn warm_start_tensors(
    vs: &VarStore,
    mut saved: HashMap<String, Tensor>,
    source: &str,
) -> Result<()> {
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
    load_tensors(vs, &saved, source, Unexpected::Error)?;
    println!("decoder: started from {source}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_cfg(coordinates: bool, channels: Vec<i64>) -> DecoderModelConfig {
        DecoderModelConfig {
            channels,
            layers_per_block: 1,
            attention_head_dim: 16,
            norm_groups: 16,
            coordinates,
        }
    }

    /// A decoder (UNet + text projection) of `m`'s shape in a fresh VarStore.
    fn fresh(m: &DecoderModelConfig, seed: i64) -> Model {
        tch::manual_seed(seed);
        let unet: UNet2DConditionConfig = parse(unet_config(m, 32, 16), "decoder").unwrap();
        let proj: TextProjConfig = parse(text_proj_config(m, 32), "text_proj").unwrap();
        build(&unet, &proj, Device::Cpu).unwrap()
    }

    #[test]
    fn a_warm_start_with_coordinate_inputs_begins_as_the_old_decoder() {
        let dir = unclip_core::fsutil::scratch_dir("decoder-warm-start").unwrap();
        let path = dir.join("weights.safetensors");
        let plain = model_cfg(false, vec![16, 32]);
        let old = fresh(&plain, 1);
        old.vs.save(&path).unwrap();

        let coords = fresh(&model_cfg(true, vec![16, 32]), 2);
        warm_start(&coords.vs, &path).unwrap();
        let x = Tensor::randn([2, 3, 16, 16], (Kind::Float, Device::Cpu));
        let c = Tensor::randn([2, 5, 32], (Kind::Float, Device::Cpu));
        let class = Tensor::randn([2, 4 * 16], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[10i64, 900]);
        let (a, b) = tch::no_grad(|| {
            (
                old.unet.forward(&x, &t, Some(&c), Some(&class), None).unwrap(),
                coords.unet.forward(&x, &t, Some(&c), Some(&class), None).unwrap(),
            )
        });
        assert_eq!(
            Vec::<f32>::try_from(a.flatten(0, -1)).unwrap(),
            Vec::<f32>::try_from(b.flatten(0, -1)).unwrap()
        );

        // Anything else that differs is refused, naming the tensor.
        let wider = fresh(&model_cfg(false, vec![16, 48]), 3);
        let e = warm_start(&wider.vs, &path).unwrap_err().to_string();
        assert!(e.contains("decoder.") && e.contains("expected"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
