//! What every stage shares: the run context, the frozen CLIP the later stages condition on, and
//! the training loop around `unclip_core::train::TrainLoop` (seeded steps, batches by step,
//! checkpoints, resume, EMA, CSV log, loss picture).

use crate::data::Shapes;
use crate::recipe::{Optim, Recipe};
use anyhow::Context;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor, nn::VarStore};
use unclip::clip::{AnyConfig, ClipModel, ClipTokenizer, Towers, Truncation};
use unclip::core::fsutil;
use unclip::core::train::{TrainLoop, batch_indices, default_no_decay};
use unclip::prior::TextConditioning;

pub struct Ctx {
    pub out: PathBuf,
    pub recipe: Recipe,
    pub device: Device,
    /// Seconds per step measured by each stage's loop (after its first step).
    pub timings: RefCell<Vec<(String, f64)>>,
}

impl Ctx {
    pub fn new(out: PathBuf, recipe: Recipe, device: Device) -> Self {
        Self { out, recipe, device, timings: RefCell::new(Vec::new()) }
    }

    pub fn data(&self) -> Shapes {
        let r = &self.recipe;
        Shapes::new(r.seed, r.train_scenes, r.high_res, r.low_res)
    }

    pub fn tokenizer(&self) -> anyhow::Result<ClipTokenizer> {
        let dir = self.out.join("tokenizer");
        ClipTokenizer::from_dir(&dir).with_context(|| {
            format!("loading the tokenizer from {} (run --stage tokenizer)", dir.display())
        })
    }

    /// The trained CLIP (both towers, EMA weights), frozen.
    pub fn clip(&self) -> anyhow::Result<ClipModel> {
        let dir = self.out.join("clip");
        let config = AnyConfig::read(&dir.join("config.json"))
            .with_context(|| format!("no trained CLIP in {} (run --stage clip)", dir.display()))?;
        let mut model = ClipModel::new(config, Towers::Both, self.device, Kind::Float)?;
        model.load_weights(&dir.join(WEIGHTS), unclip::core::weights::Unexpected::Error)?;
        model.var_store_mut().freeze();
        Ok(model)
    }
}

/// The shipped (EMA) weights of a stage, written when it finishes.
pub const WEIGHTS: &str = "weights.safetensors";

/// Writes a small file atomically.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    unclip::core::fsutil::atomic_write(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| unclip::core::Error::io(tmp, e))
    })?;
    Ok(())
}

/// CLIP text conditioning of captions as the pipeline computes it: the text tower without a
/// padding mask (CLIP's causal mask suffices), the token mask kept for the prior and decoder.
pub fn encode_text(
    clip: &ClipModel,
    tok: &ClipTokenizer,
    captions: &[impl AsRef<str>],
) -> anyhow::Result<TextConditioning> {
    let enc = tok.encode_batch(captions, Truncation::Truncate, clip.device())?;
    let out = tch::no_grad(|| clip.encode_text(&enc.input_ids, None))?;
    let mask = enc.attention_mask.f_ne(0)?;
    Ok(TextConditioning::new(out.text_embeds, out.last_hidden_state, mask)?)
}

/// CLIP image embeddings (unnormalized, as the pipeline's image encoder returns them).
pub fn encode_images(clip: &ClipModel, pixels: &Tensor) -> anyhow::Result<Tensor> {
    Ok(tch::no_grad(|| clip.encode_image(pixels))?.image_embeds)
}

/// Runs (or resumes) a stage's loop in `<out>/<name>/`: `step` gets the step index and the
/// batch's dataset indices and returns the loss (with its graph) and extra logged numbers;
/// `after` runs after each optimizer update. Writes the EMA weights to `<dir>/weights.safetensors`
/// at the end, then the stage's completion marker (`unclip_core::fsutil::mark_complete`). A
/// marked stage is done and skipped. (Weights without a marker, from a run before markers or
/// killed between the two writes, are complete too: they are written atomically, last; they get
/// their marker.)
#[allow(clippy::too_many_arguments)]
pub fn train(
    ctx: &Ctx,
    name: &str,
    vs: &VarStore,
    optim: &Optim,
    extra_columns: &[&str],
    mut step: impl FnMut(u64, &[usize]) -> anyhow::Result<(Tensor, Vec<f64>)>,
    mut after: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<PathBuf> {
    let dir = ctx.out.join(name);
    let weights = dir.join(WEIGHTS);
    if fsutil::is_complete(&dir) || weights.is_file() {
        if !fsutil::is_complete(&dir) {
            mark_done(&dir, name, optim.steps)?;
        }
        println!("{name}: done already ({})", weights.display());
        return Ok(weights);
    }
    let cfg = optim.loop_config(ctx.recipe.seed);
    let meta = serde_json::json!({ "stage": name, "optim": optim });
    let mut run = TrainLoop::open(&dir, vs, cfg, default_no_decay, extra_columns, meta, name)?;
    let start = run.start_step();
    if start > 0 {
        println!("{name}: resuming at step {start} of {}", optim.steps);
    }
    let len = ctx.recipe.train_scenes;
    let mut clock: Option<(Instant, u64)> = None;
    for s in run.remaining() {
        run.begin_step(s)?;
        let idx = batch_indices(len, optim.batch, ctx.recipe.seed ^ hash(name), s)?;
        let (loss, extra) = step(s, &idx)?;
        run.end_step(s, vs, &loss, &extra)?;
        after()?;
        if clock.is_none() {
            clock = Some((Instant::now(), s + 1));
        }
    }
    if let Some((t, first)) = clock {
        let n = optim.steps.saturating_sub(first);
        if n > 0 {
            let per = t.elapsed().as_secs_f64() / n as f64;
            ctx.timings.borrow_mut().push((name.to_string(), per));
        }
    }
    run.finish(vs, &weights, None)?;
    mark_done(&dir, name, optim.steps)?;
    println!("{name}: finished; loss curve {}", dir.join("loss.png").display());
    Ok(weights)
}

/// Writes the completion marker of the stage folder `dir`, after all its files.
pub fn mark_done(dir: &Path, name: &str, steps: u64) -> anyhow::Result<()> {
    let info = serde_json::json!({ "stage": name, "steps": steps });
    fsutil::mark_complete(dir, &info)?;
    Ok(())
}

/// A stable per-stage seed offset, so stages do not share batch orders.
fn hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Measures seconds per step of every stage (full sizes, a few steps, in a scratch folder) and
/// prints the estimated duration of the full recipe.
pub fn estimate(recipe: &Recipe, out: &Path, device: Device) -> anyhow::Result<()> {
    let scratch = out.with_extension("estimate");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)?;
    }
    let mut probe = recipe.clone();
    for o in [&mut probe.clip, &mut probe.prior, &mut probe.decoder, &mut probe.upsampler] {
        o.steps = 4;
        o.warmup = 1;
        o.checkpoint_every = 100;
    }
    let ctx = Ctx::new(scratch.clone(), probe, device);
    crate::tokenizer::run(&ctx)?;
    crate::clip_stage::run(&ctx)?;
    crate::prior_stage::run(&ctx)?;
    crate::decoder_stage::run(&ctx)?;
    crate::upsampler_stage::run(&ctx)?;
    let mut total = 0.0;
    println!("\nestimate for the full recipe on {device:?}:");
    for (name, per) in ctx.timings.borrow().iter() {
        let steps = match name.as_str() {
            "clip" => recipe.clip.steps,
            "prior" => recipe.prior.steps,
            "decoder" => recipe.decoder.steps,
            _ => recipe.upsampler.steps,
        };
        let secs = per * steps as f64;
        total += secs;
        println!("  {name:<10} {per:>7.3} s/step x {steps:>6} steps = {:>6.1} min", secs / 60.0);
    }
    println!("  total      {:.1} min (+ checkpoints and export)", total / 60.0);
    std::fs::remove_dir_all(&scratch)?;
    Ok(())
}

/// The shipped weights of a finished stage.
pub fn stage_weights(ctx: &Ctx, stage: &str) -> anyhow::Result<PathBuf> {
    let p = ctx.out.join(stage).join(WEIGHTS);
    anyhow::ensure!(p.exists(), "stage {stage} has not finished ({} missing)", p.display());
    Ok(p)
}
