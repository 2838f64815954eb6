//! Times one training step of the decoder and of the prior of a diffusers-layout unCLIP folder, and
//! of a two-tower CLIP, with the library's own training code, in the way
//! `scripts/bench/theirs_train.py` times a plain PyTorch loop over diffusers' and transformers'
//! models on the same folders (`scripts/bench_side_by_side.py --train`).
//!
//! A step is what `unclip_core::train::TrainLoop` does per batch: the stage's loss on the batch
//! (`unclip_decoder::train::DecoderTrainer::loss`: conditioning dropout, text projection, noising,
//! the UNet, MSE plus the learned-variance VLB term; `unclip_prior::train::PriorTrainer::loss`:
//! dropout, noising, the transformer, x0 MSE), then `AdamW::backward_step` (zero the gradients,
//! backward, clip the norm to 1, AdamW with weight decay 0.01 off biases, norms and embeddings),
//! then `Ema::update`. CLIP (the CLIP stage, `unclip::train`): both towers, the contrastive loss
//! (`unclip_clip::contrastive_loss`), the same update, the temperature clamped. The batch is random
//! data of the stage's shapes, made before the clock starts (the data pipeline and the frozen CLIP
//! are not part of the step).
//!
//! Each timing is the median wall-clock time of `--reps` steps, and beside it the median CPU time
//! of the process over the same steps (on a machine shared with other work the CPU time is the
//! steadier figure: it leaves out the time spent waiting for a core). `--phases` times the parts
//! of a step separately (forward, backward, clipping and AdamW, EMA; CPU time).
//!
//! `cargo run --release -p unclip-benches --bin train_side_by_side -- --model DIR [--threads 1]
//!  [--batch 4,4] [--clip DIR --clip-batch 8] [--warmup 1] [--reps 5] [--phases] [--channels-last]
//!  --json`

use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use unclip_benches::{Result, peak_rss_bytes};
use unclip_clip::train::MAX_LOGIT_SCALE;
use unclip_clip::{AnyConfig, ClipModel, Towers, contrastive_loss};
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
/// The CLIP stage's initial temperature (transformers' `logit_scale_init_value`).
const LOGIT_SCALE_INIT: f64 = 2.6592;

struct Args {
    model: String,
    threads: i32,
    batch: [i64; 2],
    clip: Option<String>,
    clip_batch: i64,
    warmup: usize,
    reps: usize,
    json: bool,
    phases: bool,
    /// Re-lay the decoder's conv kernels channels-last before training (an experiment: the
    /// decoder stage trains in the default layout).
    channels_last: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        model: String::new(),
        threads: 1,
        batch: [4, 4],
        clip: None,
        clip_batch: 8,
        warmup: 1,
        reps: 5,
        json: false,
        phases: false,
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
            "--clip" => a.clip = Some(val()?),
            "--clip-batch" => a.clip_batch = val()?.parse()?,
            "--warmup" => a.warmup = val()?.parse()?,
            "--reps" => a.reps = val()?.parse()?,
            "--json" => a.json = true,
            "--phases" => a.phases = true,
            "--channels-last" => a.channels_last = true,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(!a.model.is_empty(), "--model DIR is required");
    anyhow::ensure!(a.reps > 0, "--reps must be at least 1");
    anyhow::ensure!(a.clip_batch >= 2, "--clip-batch must be at least 2 (contrastive pairs)");
    Ok(a)
}

/// CPU time of this process so far (all its threads), in seconds: `CLOCK_PROCESS_CPUTIME_ID`, the
/// clock Python's `time.process_time` reads.
fn cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// The clock of one step: with `--phases`, the CPU time of each part.
struct Laps {
    on: bool,
    last: f64,
    parts: Vec<(&'static str, f64)>,
}

impl Laps {
    fn new(on: bool) -> Self {
        Self { on, last: if on { cpu_seconds() } else { 0.0 }, parts: Vec::new() }
    }

    /// Ends the part `name` (started where the previous one ended).
    fn lap(&mut self, name: &'static str) {
        if self.on {
            let now = cpu_seconds();
            self.parts.push((name, now - self.last));
            self.last = now;
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(v.len() - 1) / 2]
}

/// Medians over the timed steps: wall clock, CPU time, and the parts' CPU times.
struct Timing {
    wall: f64,
    cpu: f64,
    parts: Vec<(&'static str, f64)>,
}

/// Times `reps` steps after `warmup` untimed ones.
fn time(
    warmup: usize,
    reps: usize,
    phases: bool,
    mut f: impl FnMut(&mut Laps) -> Result<()>,
) -> Result<Timing> {
    for _ in 0..warmup {
        f(&mut Laps::new(false))?;
    }
    let (mut wall, mut cpu, mut parts) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let mut laps = Laps::new(phases);
        let (t0, c0) = (Instant::now(), cpu_seconds());
        f(&mut laps)?;
        cpu.push(cpu_seconds() - c0);
        wall.push(t0.elapsed().as_secs_f64());
        parts.push(laps.parts);
    }
    let names: Vec<&'static str> = parts[0].iter().map(|p| p.0).collect();
    let parts = names
        .iter()
        .enumerate()
        .map(|(i, &n)| (n, median(parts.iter().map(|p| p[i].1).collect())))
        .collect();
    Ok(Timing { wall: median(wall), cpu: median(cpu), parts })
}

/// The update part of a step, as `TrainLoop::end_step` does it: `AdamW::backward_step` (zero the
/// gradients, backward, clip, AdamW), then the EMA. With phases on, the same through the
/// optimizer's parts, so that backward and the update are timed apart.
fn update(
    opt: &mut AdamW,
    ema: &mut Ema,
    vs: &VarStore,
    loss: &Tensor,
    laps: &mut Laps,
) -> Result<()> {
    laps.lap("forward");
    if laps.on {
        opt.zero_grad();
        loss.f_backward()?;
        laps.lap("backward");
        if opt.clip_grad_norm(GRAD_CLIP)?.is_finite() {
            opt.step()?;
        }
    } else {
        opt.backward_step(loss, Some(GRAD_CLIP))?;
    }
    laps.lap("optimizer");
    ema.update(vs)?;
    laps.lap("ema");
    Ok(())
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

/// One decoder training step (UNet and text projection trained together, as the decoder stage
/// does).
fn decoder_step(a: &Args, dir: &Path) -> Result<Timing> {
    let b = a.batch[0];
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
    if a.channels_last {
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
    time(a.warmup, a.reps, a.phases, |laps| {
        let l = trainer.loss(&unet, &text_proj, &batch, &mut rng)?;
        update(&mut opt, &mut ema, &vs, &l.loss, laps)
    })
}

/// One prior training step.
fn prior_step(a: &Args, dir: &Path) -> Result<Timing> {
    let b = a.batch[1];
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
    time(a.warmup, a.reps, a.phases, |laps| {
        let loss = trainer.loss(&prior, &batch, &mut rng)?;
        update(&mut opt, &mut ema, &vs, &loss, laps)
    })
}

/// Both CLIP towers from `dir`: a transformers `CLIPModel` folder (`config.json`,
/// `model.safetensors`), or a pipeline folder's `text_encoder` and `image_encoder` joined as the
/// CLIP stage joins them (the temperature at its initial value).
fn clip_model(dir: &Path) -> Result<ClipModel> {
    if dir.join("config.json").is_file() {
        return Ok(ClipModel::load(dir, Towers::Both, Device::Cpu, Kind::Float)?);
    }
    let (tdir, idir) = (dir.join("text_encoder"), dir.join("image_encoder"));
    let text = json_file(&tdir.join("config.json"))?;
    let vision = json_file(&idir.join("config.json"))?;
    let cfg = json!({
        "model_type": "clip",
        "projection_dim": text["projection_dim"],
        "logit_scale_init_value": LOGIT_SCALE_INIT,
        "text_config": text,
        "vision_config": vision,
    });
    let model =
        ClipModel::new(AnyConfig::from_value(cfg)?, Towers::Both, Device::Cpu, Kind::Float)?;
    let mut tensors = read_tensors(&tdir.join("model.safetensors"))?;
    tensors.extend(read_tensors(&idir.join("model.safetensors"))?);
    tensors.insert("logit_scale".into(), model.logit_scale()?.detach());
    load_tensors(model.var_store(), &tensors, &dir.display().to_string(), Unexpected::Error)?;
    Ok(model)
}

/// One CLIP training step on `--clip-batch` random (caption, image) pairs: full-length token
/// ids below the end-of-text id, which closes each caption.
fn clip_step(a: &Args, dir: &Path) -> Result<Timing> {
    let model = clip_model(dir)?;
    let (tc, vc) = match model.config() {
        AnyConfig::Clip(c) => (&c.text_config, &c.vision_config),
        _ => anyhow::bail!("{}: not a two-tower CLIP", dir.display()),
    };
    let (b, l) = (a.clip_batch, tc.max_position_embeddings);
    let eos = match tc.eos_rule()? {
        unclip_clip::config::EosRule::FirstId(id) => id,
        unclip_clip::config::EosRule::ArgmaxId => tc.vocab_size - 1,
    };
    let ids = Tensor::randint(eos, [b, l], (Kind::Int64, Device::Cpu));
    let _ = ids.narrow(1, l - 1, 1).fill_(eos);
    let pixels = rand(&[b, 3, vc.image_size, vc.image_size]);
    let vs = model.var_store();
    let (mut opt, mut ema) = optimizer(vs)?;
    time(a.warmup, a.reps, a.phases, |laps| {
        let out = model.forward(&ids, None, &pixels)?;
        let loss = contrastive_loss(&out.logits_per_text)?;
        update(&mut opt, &mut ema, vs, &loss, laps)?;
        tch::no_grad(|| -> Result<()> {
            let _ = model.logit_scale()?.shallow_clone().f_clamp_(0.0, MAX_LOGIT_SCALE)?;
            Ok(())
        })
    })
}

fn main() -> Result<()> {
    let a = parse_args()?;
    tch::set_num_threads(a.threads);
    tch::manual_seed(0);
    let dir = Path::new(&a.model);
    let mut rows = vec![
        ("decoder", a.batch[0], decoder_step(&a, dir)?),
        ("prior", a.batch[1], prior_step(&a, dir)?),
    ];
    if let Some(clip) = &a.clip {
        rows.push(("clip", a.clip_batch, clip_step(&a, Path::new(clip))?));
    }
    let mut res = json!({
        "peak_rss_bytes": peak_rss_bytes(),
        "threads": tch::get_num_threads(),
    });
    for (name, _, t) in &rows {
        res[format!("{name}_train_step")] = json!(t.wall);
        res[format!("{name}_train_step_cpu")] = json!(t.cpu);
        if a.phases {
            let parts: serde_json::Map<String, Value> =
                t.parts.iter().map(|(n, s)| (n.to_string(), json!(s))).collect();
            res[format!("{name}_phases_cpu")] = Value::Object(parts);
        }
    }
    if a.json {
        println!("{res}");
    } else {
        for (name, b, t) in &rows {
            let parts: Vec<String> =
                t.parts.iter().map(|(n, s)| format!("{n} {:.1}", s * 1e3)).collect();
            println!(
                "{name} train step (batch {b}): {:.1} ms wall, {:.1} ms CPU{}",
                t.wall * 1e3,
                t.cpu * 1e3,
                if parts.is_empty() {
                    String::new()
                } else {
                    format!(" ({} ms)", parts.join(", "))
                }
            );
        }
    }
    Ok(())
}
