//! Times one training step of the decoder and of the prior of a diffusers-layout unCLIP folder,
//! with the library's own training code, in the way `scripts/bench/theirs_train.py` times a plain
//! PyTorch loop over diffusers' models on the same folder (`scripts/bench_side_by_side.py --train`).
//!
//! A step is what `unclip_core::train::TrainLoop` does per batch: the stage's loss on the batch
//! (`unclip_decoder::train::DecoderTrainer::loss`: conditioning dropout, text projection, noising,
//! the UNet, MSE plus the learned-variance VLB term; `unclip_prior::train::PriorTrainer::loss`:
//! dropout, noising, the transformer, x0 MSE), then `AdamW::backward_step` (zero the gradients,
//! backward, clip the norm to 1, AdamW with weight decay 0.01 off biases, norms and embeddings),
//! then `Ema::update`. The batch is random data of the stage's shapes, made before the clock starts
//! (the data pipeline and the frozen CLIP are not part of the step).
//!
//! `cargo run --release -p unclip-benches --bin train_side_by_side -- --model DIR [--threads 1]
//!  [--batch 4,4] [--warmup 1] [--reps 5] [--channels-last] --json`

use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use unclip_benches::{Result, peak_rss_bytes};
use unclip_core::train::{AdamW, AdamWConfig, Ema, EmaConfig, default_no_decay};
use unclip_core::weights::{Unexpected, load_tensors, read_tensors};
use unclip_decoder::checkpoint::{Component, read_config};
use unclip_decoder::train::{DecoderBatch, DecoderTrainer, EmptyCaption};
use unclip_decoder::{UNet2DConditionModel, UnCLIPTextProjModel};
use unclip_prior::train::{PriorBatch, PriorTrainer, TrainOptions};
use unclip_prior::{PriorTransformer, TextConditioning};
use unclip_scheduler::{PredictionType, TorchNoise};

/// The optimizer, clipping and EMA settings of a `[<stage>.train]` section left at its defaults.
const LR: f64 = 1e-4;
const WEIGHT_DECAY: f64 = 0.01;
const GRAD_CLIP: f64 = 1.0;
const EMA_DECAY: f64 = 0.999;

struct Args {
    model: String,
    threads: i32,
    batch: [i64; 2],
    warmup: usize,
    reps: usize,
    json: bool,
    /// Re-lay the decoder's conv kernels channels-last before training (an experiment: the
    /// decoder stage trains in the default layout).
    channels_last: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        model: String::new(),
        threads: 1,
        batch: [4, 4],
        warmup: 1,
        reps: 5,
        json: false,
        channels_last: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or_else(|| anyhow::anyhow!("{k} needs a value"));
        match k.as_str() {
            "--model" => a.model = val()?,
            "--threads" => a.threads = val()?.parse()?,
            "--batch" => {
                let v: Vec<i64> =
                    val()?.split(',').map(str::parse).collect::<std::result::Result<_, _>>()?;
                anyhow::ensure!(
                    v.len() == 2 && v.iter().all(|&b| b > 0),
                    "--batch takes decoder,prior (> 0)"
                );
                a.batch = [v[0], v[1]];
            }
            "--warmup" => a.warmup = val()?.parse()?,
            "--reps" => a.reps = val()?.parse()?,
            "--json" => a.json = true,
            "--channels-last" => a.channels_last = true,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(!a.model.is_empty(), "--model DIR is required");
    anyhow::ensure!(a.reps > 0, "--reps must be at least 1");
    Ok(a)
}

/// Median seconds of `reps` steps after `warmup` untimed ones.
fn time(warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        v.push(t0.elapsed().as_secs_f64());
    }
    v.sort_by(f64::total_cmp);
    Ok(v[(reps - 1) / 2])
}

fn json_file(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn int(v: &Value, key: &str, file: &str) -> Result<i64> {
    v[key].as_i64().ok_or_else(|| anyhow::anyhow!("{file}: {key} is not an integer"))
}

/// AdamW and EMA over every variable of `vs`, as the stage runners build them.
fn optimizer(vs: &VarStore) -> Result<(AdamW, Ema)> {
    let cfg = AdamWConfig { lr: LR, weight_decay: WEIGHT_DECAY, ..Default::default() };
    let opt = AdamW::with_no_decay(vs, cfg, default_no_decay)?;
    let ema = Ema::new(vs, EmaConfig { decay: EMA_DECAY, warmup: true })?;
    Ok((opt, ema))
}

fn rand(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
}

/// Median seconds of one decoder training step (UNet and text projection trained together, as the
/// decoder stage does).
fn decoder_step(
    dir: &Path,
    b: i64,
    warmup: usize,
    reps: usize,
    channels_last: bool,
) -> Result<f64> {
    let (udir, pdir) = (dir.join("decoder"), dir.join("text_proj"));
    let ucfg = read_config::<UNet2DConditionModel>(&udir)?;
    let pcfg = read_config::<UnCLIPTextProjModel>(&pdir)?;
    let vs = VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::build(vs.root() / "decoder", &ucfg)?;
    let text_proj = UnCLIPTextProjModel::build(vs.root() / "text_proj", &pcfg)?;
    let mut saved = HashMap::new();
    for (d, prefix) in [(&udir, "decoder"), (&pdir, "text_proj")] {
        for (name, t) in read_tensors(&d.join("diffusion_pytorch_model.safetensors"))? {
            saved.insert(format!("{prefix}.{name}"), t.f_to_kind(Kind::Float)?);
        }
    }
    load_tensors(&vs, &saved, &dir.display().to_string(), Unexpected::Error)?;
    if channels_last {
        unclip_core::nn::vars_to_channels_last(&vs)?;
    }
    let raw = json_file(&udir.join("config.json"))?;
    let side = int(&raw, "sample_size", "decoder/config.json")?;
    let c = int(&raw, "in_channels", "decoder/config.json")?
        - raw["coordinate_channels"].as_i64().unwrap_or(0);
    let sched = json_file(&dir.join("decoder_scheduler").join("scheduler_config.json"))?;
    let prediction = match sched["prediction_type"].as_str() {
        Some("v_prediction") => PredictionType::VPrediction,
        Some("sample") => PredictionType::Sample,
        _ => PredictionType::Epsilon,
    };
    let d = pcfg.clip_embeddings_dim;
    let te = json_file(&dir.join("text_encoder").join("config.json"))?;
    let l = int(&te, "max_position_embeddings", "text_encoder/config.json")?;
    let trainer = DecoderTrainer::karlo().with_prediction(prediction);

    let images = rand(&[b, c, side, side]).clamp(-1.0, 1.0);
    let (image_embeddings, prompt_embeds, hidden) =
        (rand(&[b, d]), rand(&[b, d]), rand(&[b, l, d]));
    let mask = Tensor::ones([b, l], (Kind::Bool, Device::Cpu));
    let (e_prompt, e_hidden) = (rand(&[1, d]), rand(&[1, l, d]));
    let e_mask = Tensor::ones([1, l], (Kind::Bool, Device::Cpu));
    let batch = DecoderBatch {
        images: &images,
        image_embeddings: &image_embeddings,
        prompt_embeds: &prompt_embeds,
        text_hidden_states: &hidden,
        text_mask: &mask,
        empty_caption: Some(EmptyCaption {
            prompt_embeds: &e_prompt,
            text_hidden_states: &e_hidden,
            text_mask: &e_mask,
        }),
    };
    let (mut opt, mut ema) = optimizer(&vs)?;
    let mut rng = TorchNoise::new(0);
    time(warmup, reps, || {
        let l = trainer.loss(&unet, &text_proj, &batch, &mut rng)?;
        opt.backward_step(&l.loss, Some(GRAD_CLIP))?;
        ema.update(&vs)?;
        Ok(())
    })
}

/// Median seconds of one prior training step.
fn prior_step(dir: &Path, b: i64, warmup: usize, reps: usize) -> Result<f64> {
    let (vs, prior) =
        PriorTransformer::from_pretrained(&dir.join("prior"), Device::Cpu, Kind::Float)?;
    let cfg = prior.config();
    let (e, n) = (cfg.embedding_dim, cfg.num_embeddings);
    let text = |rows: i64| {
        TextConditioning::new(
            rand(&[rows, cfg.embedding_proj_dim()]),
            rand(&[rows, n, e]),
            Tensor::ones([rows, n], (Kind::Bool, Device::Cpu)),
        )
    };
    let trainer = PriorTrainer::karlo(text(1)?, TrainOptions::default())?;
    let batch = PriorBatch { image_embeds: rand(&[b, cfg.clip_embed_dim()]), text: text(b)? };
    let (mut opt, mut ema) = optimizer(&vs)?;
    let mut rng = TorchNoise::new(0);
    time(warmup, reps, || {
        let loss = trainer.loss(&prior, &batch, &mut rng)?;
        opt.backward_step(&loss, Some(GRAD_CLIP))?;
        ema.update(&vs)?;
        Ok(())
    })
}

fn main() -> Result<()> {
    let a = parse_args()?;
    tch::set_num_threads(a.threads);
    tch::manual_seed(0);
    let dir = Path::new(&a.model);
    let dec = decoder_step(dir, a.batch[0], a.warmup, a.reps, a.channels_last)?;
    let prior = prior_step(dir, a.batch[1], a.warmup, a.reps)?;
    let res = serde_json::json!({
        "decoder_train_step": dec,
        "prior_train_step": prior,
        "peak_rss_bytes": peak_rss_bytes(),
        "threads": tch::get_num_threads(),
    });
    if a.json {
        println!("{res}");
    } else {
        println!("decoder train step (batch {}): {:.1} ms", a.batch[0], dec * 1e3);
        println!("prior train step (batch {}): {:.1} ms", a.batch[1], prior * 1e3);
    }
    Ok(())
}
