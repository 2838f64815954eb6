//! The run folder and the loop every stage shares: `TrainLoop` (seeded steps, checkpoints,
//! resume, EMA, CSV log, loss picture) plus held-out loss, validation pictures, non-finite
//! detection and completion markers.

use super::config::{RunConfig, TrainSettings};
use super::dist::{DATA_PARALLEL_STAGES, Dist};
use super::source::{self, Split};
use super::{Result, TrainError, write_bytes};
use crate::data::{Batch, Loader};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use tch::{Device, Kind, Tensor, nn::VarStore};
use unclip_clip::{ClipModel, ClipTokenizer, Towers, Truncation};
use unclip_core::train::{
    AdamWConfig, Checkpointer, DataParallel, Ema, EmaConfig, GradSync, LoopConfig, LrSchedule,
    TrainLoop, default_no_decay, seed_step,
};
use unclip_prior::TextConditioning;

/// The stored effective config of a run folder.
pub const STORED_CONFIG: &str = "config.toml";
/// The completion marker of a stage, written last (`fsutil::mark_complete`).
pub const DONE: &str = unclip_core::fsutil::COMPLETE_MARKER;
/// The shipped (EMA) weights of a stage in its own tensor names.
pub const WEIGHTS: &str = "weights.safetensors";
/// Where a finished stage's diffusers components lie: `<run>/<stage>/model/<component>/`.
pub const MODEL: &str = "model";

/// How this process runs the stages.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Run only this stage (its inputs must be finished).
    pub only: Option<String>,
    /// Stop the process after this many training steps (a checkpoint is not forced: rerunning
    /// resumes from the newest one). For time-boxed sessions and resume tests.
    pub stop_after: Option<u64>,
}

/// What a call to [`Trainer::run`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunSummary {
    /// Stages found complete or completed, in order.
    pub complete: Vec<String>,
    /// True when `stop_after` stopped the process before every stage was complete.
    pub stopped: bool,
    /// Steps trained by this process.
    pub steps: u64,
}

/// A run folder opened for a config.
pub struct Trainer {
    pub(crate) cfg: RunConfig,
    pub(crate) file: PathBuf,
    pub(crate) device: Device,
    pub(crate) dist: Option<Dist>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer").field("out", &self.cfg.run.out).field("file", &self.file).finish()
    }
}

impl Trainer {
    /// Checks every path the config names, prepares the run folder `run.out`: a new one gets the
    /// effective config (`config.toml`); an existing one must have been started with the same
    /// config, except for grown step counts (those stages resume up to the new count) and
    /// settings that do not change the weights. Leftover temporary files of killed writes are
    /// removed. `file` is the config file (named in errors).
    pub fn open(cfg: RunConfig, file: &Path) -> Result<Self> {
        preflight(&cfg, file)?;
        let device = unclip_core::parse_device(&cfg.run.device)?;
        let out = cfg.run.out.clone();
        std::fs::create_dir_all(&out).map_err(|e| TrainError::io(&out, e))?;
        unclip_core::fsutil::clean_stale_temps(&out)?;
        let stored = out.join(STORED_CONFIG);
        if stored.exists() {
            let text = std::fs::read_to_string(&stored).map_err(|e| TrainError::io(&stored, e))?;
            let old = RunConfig::parse(&text, &stored, &[])?;
            for (stage, before) in cfg.compare_with_stored(&old, file)? {
                let dir = out.join(stage);
                if unclip_core::fsutil::is_complete(&dir) {
                    let weights = dir.join(WEIGHTS);
                    if weights.exists() {
                        let kept = dir.join(format!("weights-{before}.safetensors"));
                        std::fs::rename(&weights, &kept)
                            .map_err(|e| TrainError::io(&weights, e))?;
                    }
                    unclip_core::fsutil::clear_complete(&dir)?;
                    println!("{stage}: extending from {before} steps");
                }
            }
        }
        write_bytes(&stored, cfg.to_toml().as_bytes())?;
        Ok(Self { cfg, file: file.to_path_buf(), device, dist: None })
    }

    /// [`Self::open`] for one rank of a data-parallel run (see [`super::dist`]): rank 0 prepares
    /// the run folder (which every rank must see: a shared file system across machines) while
    /// the others wait, then only check it. `device` replaces `run.device` (each rank its own
    /// GPU). A run of one process behaves as [`Self::open`].
    pub fn open_distributed(
        cfg: RunConfig,
        file: &Path,
        device: Device,
        dist: Dist,
    ) -> Result<Self> {
        let mut t = if dist.rank() == 0 {
            Self::open(cfg, file)?
        } else {
            preflight(&cfg, file)?;
            Self { cfg, file: file.to_path_buf(), device, dist: None }
        };
        t.device = device;
        dist.barrier("run")?;
        t.dist = (dist.world_size() > 1).then_some(dist);
        Ok(t)
    }

    /// This process's rank in a data-parallel run (0 otherwise).
    pub fn rank(&self) -> usize {
        self.dist.as_ref().map_or(0, Dist::rank)
    }

    pub fn config(&self) -> &RunConfig {
        &self.cfg
    }

    pub fn out(&self) -> &Path {
        &self.cfg.run.out
    }

    /// True when stage `name`'s completion marker exists.
    pub fn is_complete(&self, name: &str) -> bool {
        unclip_core::fsutil::is_complete(&self.out().join(name))
    }

    /// Runs every unfinished stage of the config in order (or `opts.only`).
    pub fn run(&self, opts: &RunOptions) -> Result<RunSummary> {
        if let Some(t) = self.cfg.run.threads {
            tch::set_num_threads(t);
        }
        let stages = self.cfg.stages();
        if let Some(only) = &opts.only {
            if !stages.contains(&only.as_str()) {
                return Err(TrainError::stage(
                    only,
                    format!("not in {} (it has {})", self.file.display(), stages.join(", ")),
                ));
            }
        }
        let side = self.max_side();
        let split =
            source::open(&self.cfg.data, self.cfg.run.seed, side, self.cfg.validation.items)?;
        println!("data: {}", split.train.describe());
        let mut summary = RunSummary::default();
        for name in stages {
            if opts.only.as_deref().is_some_and(|o| o != name) {
                continue;
            }
            if self.is_complete(name) {
                println!("{name}: complete ({})", self.out().join(name).join(DONE).display());
                summary.complete.push(name.into());
                continue;
            }
            let budget = opts.stop_after.map(|n| n.saturating_sub(summary.steps));
            if budget == Some(0) {
                summary.stopped = true;
                break;
            }
            if let Some(d) = &self.dist {
                // The tokenizer is not trained by steps: rank 0 alone builds it.
                if name != "tokenizer" && !DATA_PARALLEL_STAGES.contains(&name) {
                    return Err(TrainError::stage(
                        name,
                        format!(
                            "trains with one process only (data parallel is implemented for {}); \
                             run it alone first (`--stage {name}` without --nproc/torchrun), then \
                             rerun the {} processes",
                            DATA_PARALLEL_STAGES.join(", "),
                            d.world_size()
                        ),
                    ));
                }
            }
            let ctx = Ctx {
                cfg: &self.cfg,
                out: self.out(),
                device: self.device,
                data: &split,
                budget,
                dist: self.dist.as_ref(),
            };
            let steps = super::stages::run(&ctx, name)?;
            summary.steps += steps.steps;
            if steps.finished && self.rank() == 0 {
                write_marker(&self.out().join(name), name, &self.cfg)?;
            }
            if let Some(d) = &self.dist {
                d.barrier(name)?; // the next stage reads rank 0's exports and marker
            }
            if steps.finished {
                summary.complete.push(name.into());
            } else {
                summary.stopped = true;
                println!(
                    "{name}: stopped after {} steps of this process; rerun to resume",
                    summary.steps
                );
                break;
            }
        }
        Ok(summary)
    }

    /// The weights the decoder stage starts from at step 0 (before any training or checkpoint),
    /// under the stage's names (`decoder.*`, `text_proj.*`): to check what a fine-tune starts
    /// from.
    pub fn initial_decoder_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let stage = self
            .cfg
            .decoder
            .as_ref()
            .ok_or_else(|| TrainError::stage("decoder", "no [decoder] section"))?;
        let split = source::open(
            &self.cfg.data,
            self.cfg.run.seed,
            self.max_side(),
            self.cfg.validation.items,
        )?;
        let ctx = Ctx {
            cfg: &self.cfg,
            out: self.out(),
            device: self.device,
            data: &split,
            budget: None,
            dist: None,
        };
        let cond = ctx.conditioning()?;
        let (model, _, _) = super::stages::decoder::initial(&ctx, stage, &cond)?;
        let mut named: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(named)
    }

    /// The largest image side a stage needs.
    fn max_side(&self) -> u32 {
        let c = &self.cfg;
        let mut side = 32;
        if let Some(d) = &c.decoder {
            side = side.max(d.resolution);
        }
        for u in [&c.upsampler, &c.upsampler2].into_iter().flatten() {
            side = side.max(u.resolution);
        }
        if let Some(m) = c.clip.as_ref().and_then(|c| c.model.as_ref()) {
            side = side.max(m.image_size as u32);
        }
        side
    }
}

/// The marker that says stage `name` is complete; written atomically, after everything else.
fn write_marker(dir: &Path, name: &str, cfg: &RunConfig) -> Result<()> {
    let steps = cfg.train_settings(name).map(|t| t.steps);
    let v = serde_json::json!({ "stage": name, "steps": steps, "complete": true });
    Ok(unclip_core::fsutil::mark_complete(dir, &v)?)
}

/// Every path the config names exists, before any work.
fn preflight(cfg: &RunConfig, file: &Path) -> Result<()> {
    let missing = |key: &str, p: &Path, what: &str| -> Result<()> {
        if p.exists() {
            Ok(())
        } else {
            Err(super::ConfigError {
                file: file.to_path_buf(),
                key: Some(key.into()),
                message: format!("{} does not exist (expected {what})", p.display()),
            }
            .into())
        }
    };
    if let Some(p) = &cfg.data.path {
        missing("data.path", p, "the training data")?;
    }
    if let Some(p) = &cfg.run.conditioning {
        missing("run.conditioning", p, "a model folder")?;
        for c in ["tokenizer", "text_encoder", "image_encoder"] {
            missing("run.conditioning", &p.join(c), &format!("its {c} component"))?;
        }
    }
    for (key, p) in [
        ("clip.init", cfg.clip.as_ref().and_then(|s| s.init.as_ref())),
        ("prior.init", cfg.prior.as_ref().and_then(|s| s.init.as_ref())),
        ("decoder.init", cfg.decoder.as_ref().and_then(|s| s.init.as_ref())),
        ("upsampler.init", cfg.upsampler.as_ref().and_then(|s| s.init.as_ref())),
        ("upsampler2.init", cfg.upsampler2.as_ref().and_then(|s| s.init.as_ref())),
    ] {
        if let Some(p) = p {
            missing(key, p, "a component folder or a model folder")?;
        }
    }
    Ok(())
}

/// What a stage runner sees.
pub(crate) struct Ctx<'a> {
    pub cfg: &'a RunConfig,
    pub out: &'a Path,
    pub device: Device,
    pub data: &'a Split,
    /// Steps this process may still train (None: no limit).
    pub budget: Option<u64>,
    /// Set in a data-parallel run of more than one process.
    pub dist: Option<&'a Dist>,
}

/// How far a stage got.
#[derive(Debug)]
pub(crate) struct StageSteps {
    pub steps: u64,
    pub finished: bool,
}

impl Ctx<'_> {
    pub fn seed(&self) -> u64 {
        self.cfg.run.seed
    }

    /// Rank 0 (or a run of one process): the process that writes.
    pub fn is_main(&self) -> bool {
        self.dist.is_none_or(|d| d.rank() == 0)
    }

    pub fn stage_dir(&self, name: &str) -> PathBuf {
        self.out.join(name)
    }

    /// A conditioning component (`tokenizer`, `text_encoder`, `image_encoder`): this run's stage
    /// output when it trains it, else `run.conditioning`'s.
    pub fn component(&self, name: &str) -> Result<PathBuf> {
        let stage = if name == "tokenizer" { "tokenizer" } else { "clip" };
        let own = match stage {
            "tokenizer" => self.cfg.tokenizer.is_some(),
            _ => self.cfg.clip.is_some(),
        };
        if own {
            let dir = self.stage_dir(stage);
            if !unclip_core::fsutil::is_complete(&dir) {
                return Err(TrainError::stage(
                    stage,
                    format!(
                        "not complete yet ({} missing): run it first",
                        dir.join(DONE).display()
                    ),
                ));
            }
            return Ok(dir.join(MODEL).join(name));
        }
        match &self.cfg.run.conditioning {
            Some(folder) => Ok(folder.join(name)),
            None => Err(TrainError::stage(
                stage,
                "no [tokenizer]/[clip] stage and no run.conditioning folder",
            )),
        }
    }

    pub fn tokenizer(&self) -> Result<ClipTokenizer> {
        let dir = self.component("tokenizer")?;
        Ok(ClipTokenizer::from_dir(&dir)?)
    }

    /// The frozen CLIP the prior and the decoder condition on.
    pub fn conditioning(&self) -> Result<Conditioning> {
        let tok = self.tokenizer()?;
        let text = ClipModel::load(
            &self.component("text_encoder")?,
            Towers::Text,
            self.device,
            Kind::Float,
        )?;
        let vision = ClipModel::load(
            &self.component("image_encoder")?,
            Towers::Vision,
            self.device,
            Kind::Float,
        )?;
        let image_size = vision.vision_config().map(|v| v.image_size).unwrap_or(224) as u32;
        Ok(Conditioning { tok, text, vision, image_size })
    }

    /// The training loader of a stage, and the held-out one.
    pub fn loaders(
        &self,
        name: &str,
        needs: impl Fn(usize) -> source::Needs,
        batch: usize,
    ) -> Result<(Loader, Option<Loader>)> {
        let salt = source::salt(name);
        let (rank, world) = self.dist.map_or((0, 1), |d| (d.rank(), d.world_size()));
        let per_rank = match self.dist {
            Some(d) => d.per_rank_batch(name, batch)?,
            None => batch,
        };
        let train = source::loader_sharded(
            self.data.train.clone(),
            &self.cfg.data,
            self.seed(),
            salt,
            needs(per_rank),
            (rank, world),
        )?;
        let held = match &self.data.holdout {
            Some(h) => Some(source::loader(
                h.clone(),
                &self.cfg.data,
                self.seed(),
                salt,
                needs(batch.min(h.len())),
            )?),
            None => None,
        };
        Ok((train, held))
    }
}

/// The frozen tokenizer and CLIP towers.
pub(crate) struct Conditioning {
    pub tok: ClipTokenizer,
    pub text: ClipModel,
    pub vision: ClipModel,
    /// The image tower's input side.
    pub image_size: u32,
}

impl Conditioning {
    /// CLIP text conditioning as the pipeline computes it (no padding mask in the text tower;
    /// the token mask kept for the prior and the decoder).
    pub fn encode_text(&self, captions: &[impl AsRef<str>]) -> Result<TextConditioning> {
        let enc = self.tok.encode_batch(captions, Truncation::Truncate, self.text.device())?;
        let out = tch::no_grad(|| self.text.encode_text(&enc.input_ids, None))?;
        let mask = enc.attention_mask.f_ne(0)?;
        Ok(TextConditioning::new(out.text_embeds, out.last_hidden_state, mask)?)
    }

    /// Unnormalized image embeddings of CLIP-normalized pixels.
    pub fn encode_images(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(tch::no_grad(|| self.vision.encode_image(&pixels.f_to_device(self.vision.device())?))?
            .image_embeds)
    }

    /// The batch's image embeddings: precomputed ones when the source has them, else CLIP's.
    pub fn image_embeds(&self, batch: &Batch, stage: &str) -> Result<Tensor> {
        if let Some(e) = &batch.image_embeds {
            return Ok(e.f_to_device(self.vision.device())?);
        }
        match &batch.clip_pixels {
            Some(p) => self.encode_images(p),
            None => Err(TrainError::stage(
                stage,
                "the batch has neither image embeddings nor CLIP pixels",
            )),
        }
    }

    pub fn embed_dim(&self) -> Result<i64> {
        let v = self
            .vision
            .vision_config()
            .ok_or_else(|| TrainError::stage("conditioning", "no vision config"))?;
        Ok(v.projection_dim.unwrap_or(v.hidden_size))
    }
}

/// The core loop's settings from a stage's `[<stage>.train]`: warmup then cosine decay to
/// `lr * lr_floor`.
pub(crate) fn loop_config(t: &TrainSettings, seed: u64) -> LoopConfig {
    LoopConfig {
        total_steps: t.steps,
        seed,
        schedule: LrSchedule::WarmupCosine {
            peak: t.lr,
            floor: t.lr * t.lr_floor,
            warmup_steps: t.warmup_steps(),
            total_steps: t.steps,
        },
        optimizer: AdamWConfig { lr: t.lr, weight_decay: t.weight_decay, ..Default::default() },
        ema: (t.ema_decay > 0.0).then_some(EmaConfig { decay: t.ema_decay, warmup: true }),
        max_grad_norm: (t.grad_clip > 0.0).then_some(t.grad_clip),
        checkpoint_every: t.checkpoint_interval(),
        keep_last: t.keep_checkpoints,
    }
}

/// What a stage supplies to [`train`].
pub(crate) struct StageHooks<'a> {
    /// The loss (with its graph) of a batch, and extra logged numbers.
    pub step: &'a mut dyn FnMut(&Batch) -> Result<(Tensor, Vec<f64>)>,
    /// After each optimizer update (e.g. clamping CLIP's temperature).
    pub after: &'a mut dyn FnMut() -> Result<()>,
    /// Validation pictures after `done` steps, with the EMA weights when there are any; writes
    /// into the given folder.
    pub pictures: &'a mut dyn FnMut(u64, Option<&Ema>, &Path) -> Result<()>,
}

/// Seed of the held-out loss's noise, the same at every validation.
const VALIDATION_SEED: u64 = 0x7661_6c69_6461_7465;

/// Runs (or resumes) a stage's loop in `<run>/<name>/`; at the end writes the shipped weights
/// (`weights.safetensors`: EMA when enabled) and returns `finished: true`. Steps whose loss or
/// gradients are not finite are skipped and counted (`nonfinite` column of `validation.csv`
/// and the log); `max_nonfinite` of them in a row stop the run with [`TrainError::NonFinite`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn train(
    ctx: &Ctx,
    name: &str,
    vs: &VarStore,
    t: &TrainSettings,
    extra_columns: &[&str],
    loader: &Loader,
    holdout: Option<&Loader>,
    hooks: StageHooks,
) -> Result<StageSteps> {
    let StageHooks { step: forward, after, pictures } = hooks;
    // The loss's forward pass in `run.precision`; backward passes run outside autocast.
    let (precision, device) = (ctx.cfg.run.precision, ctx.device);
    let mut step = |b: &Batch| super::precision::autocast(precision, device, || forward(b))?;
    let dir = ctx.stage_dir(name);
    let cfg = loop_config(t, ctx.seed());
    let meta = serde_json::json!({ "stage": name, "train": t });
    let dp = match ctx.dist {
        Some(d) => {
            d.broadcast(name, vs)?; // the start: rank 0's initial weights (and so EMA)
            Some(d.data_parallel(name, vs)?)
        }
        None => None,
    };
    let micro = t.accumulate.max(1) as u64;
    let accum = (micro > 1).then(|| Rc::new(RefCell::new(Accumulated::new(vs))));
    let dp = match &accum {
        Some(a) => Some(Accumulated::hook(a.clone(), dp, ctx.dist.map_or(0, |d| d.rank()))),
        None => dp,
    };
    let mut run = TrainLoop::open_data_parallel(
        &dir,
        vs,
        cfg,
        default_no_decay,
        extra_columns,
        meta,
        name,
        dp,
    )?;
    let start = run.start_step();
    if let Some(d) = ctx.dist {
        d.check_same(name, "step to resume from", start)?;
        d.broadcast(name, vs)?; // after a resume: rank 0's checkpoint
    }
    if start > 0 {
        println!("{name}: resuming at step {start} of {}", t.steps);
    }
    let mut in_a_row = 0u64;
    let mut skipped = 0u64;
    let mut done_here = 0u64;
    // Optimizer step `s` reads micro-batches `s * micro ..`: a function of the step, as the
    // noise is (seeded once per step), so a resumed run draws what an uninterrupted one does.
    let mut batches = loader.iter_from(start * micro);
    let mut next = move || -> Result<Batch> {
        Ok(batches.next().ok_or_else(|| TrainError::stage(name, "the data loader ended"))??)
    };
    for s in run.remaining() {
        if ctx.budget.is_some_and(|b| done_here >= b) {
            return Ok(StageSteps { steps: done_here, finished: false });
        }
        run.begin_step(s)?;
        if let Some(d) = ctx.dist {
            d.seed_step(ctx.seed(), s);
        }
        let out = match &accum {
            None => {
                let (loss, extra) = step(&next()?)?;
                run.end_step(s, vs, &loss, &extra)?
            }
            Some(acc) => {
                // Each micro-batch's loss / micro: the gradients sum to the whole batch's mean.
                acc.borrow_mut().reset();
                let mut extras = Vec::new();
                for _ in 1..micro {
                    let (loss, extra) = step(&next()?)?;
                    let part = loss.f_div_scalar(micro as f64)?;
                    part.f_backward()?;
                    acc.borrow_mut().loss += part.f_double_value(&[])?;
                    extras.push(extra);
                }
                acc.borrow_mut().keep()?;
                let (loss, extra) = step(&next()?)?;
                extras.push(extra);
                let mean = mean_columns(&extras);
                run.end_step(s, vs, &loss.f_div_scalar(micro as f64)?, &mean)?
            }
        };
        done_here += 1;
        if out.skipped {
            in_a_row += 1;
            skipped += 1;
            if in_a_row >= t.max_nonfinite {
                let ck = Checkpointer::new(&dir, t.keep_checkpoints)?;
                let checkpoint = match ck.latest()? {
                    Some(m) => format!("{} (step {})", dir.join(&m.dir).display(), m.step),
                    None => format!("none yet in {}", dir.display()),
                };
                return Err(TrainError::NonFinite {
                    stage: name.into(),
                    count: in_a_row,
                    first: s + 2 - in_a_row,
                    step: s + 1,
                    last_good: s + 1 - in_a_row,
                    checkpoint,
                });
            }
        } else {
            in_a_row = 0;
            after()?;
        }
        let done = s + 1;
        let due = (t.validate_every > 0 && done % t.validate_every == 0) || done == t.steps;
        if due && ctx.is_main() {
            validate(name, &dir, done, &run, holdout, skipped, &mut step, pictures, ctx.seed())?;
        }
    }
    drop(next); // the loader's prefetch threads end here
    if let Some(d) = ctx.dist {
        let digest = d.check_identical(name, vs)?;
        if d.rank() == 0 {
            println!(
                "{name}: the {} ranks hold identical parameters (digest {digest:016x})",
                d.world_size()
            );
        }
    }
    let weights = dir.join(WEIGHTS);
    run.finish(vs, &weights, None)?;
    if skipped > 0 {
        println!("{name}: {skipped} non-finite steps skipped by this process");
    }
    println!("{name}: finished; loss curve {}", dir.join("loss.png").display());
    Ok(StageSteps { steps: done_here, finished: true })
}

/// Gradient accumulation's state: the gradients (and loss) of a step's first micro-batches,
/// kept while the optimizer backpropagates the last one (its backward pass starts by zeroing
/// the gradients), then added back before the update (and before the all-reduce of a
/// data-parallel run: one per optimizer step).
struct Accumulated {
    params: Vec<Tensor>,
    kept: Vec<Option<Tensor>>,
    /// Sum of the first micro-batches' scaled losses.
    loss: f64,
}

impl Accumulated {
    fn new(vs: &VarStore) -> Self {
        let params: Vec<Tensor> =
            vs.trainable_variables().into_iter().filter(|t| t.requires_grad()).collect();
        let kept = params.iter().map(|_| None).collect();
        Self { params, kept, loss: 0.0 }
    }

    /// Before a step's first micro-batch.
    fn reset(&mut self) {
        for p in &mut self.params {
            p.zero_grad();
        }
        self.loss = 0.0;
    }

    /// After the first micro-batches' backward passes: keep their gradient sums.
    fn keep(&mut self) -> Result<()> {
        for (p, k) in self.params.iter().zip(&mut self.kept) {
            let g = p.grad();
            match (g.defined(), k.as_mut()) {
                (false, _) => *k = None,
                (true, Some(buf)) => {
                    buf.f_copy_(&g)?;
                }
                (true, None) => *k = Some(g.f_detach_copy()?),
            }
        }
        Ok(())
    }

    /// The optimizer's gradient hook: adds the kept gradients to the last micro-batch's, then
    /// runs `inner` (a data-parallel run's all-reduce) on the sums; returns the step's loss.
    fn hook(me: Rc<RefCell<Self>>, inner: Option<DataParallel>, rank: usize) -> DataParallel {
        let mut inner = inner.map(|d| d.sync);
        let sync: Box<GradSync> = Box::new(move |last: f64| {
            let a = me.borrow();
            tch::no_grad(|| -> unclip_core::Result<()> {
                for (p, k) in a.params.iter().zip(&a.kept) {
                    let mut g = p.grad();
                    if let (true, Some(k)) = (g.defined(), k) {
                        let _ = g.f_add_(k)?;
                    }
                }
                Ok(())
            })?;
            let loss = last + a.loss;
            match &mut inner {
                Some(all_reduce) => all_reduce(loss),
                None => Ok(loss),
            }
        });
        DataParallel { rank, sync }
    }
}

/// The column means of the micro-batches' extra logged numbers.
fn mean_columns(rows: &[Vec<f64>]) -> Vec<f64> {
    let n = rows.len().max(1) as f64;
    let width = rows.first().map_or(0, Vec::len);
    (0..width)
        .map(|c| rows.iter().map(|r| r.get(c).copied().unwrap_or(f64::NAN)).sum::<f64>() / n)
        .collect()
}

/// Held-out loss (training weights, fixed noise) appended to `validation.csv`, and the stage's
/// pictures (EMA weights) in `validation/step-<done>/`.
#[allow(clippy::too_many_arguments)]
fn validate(
    name: &str,
    dir: &Path,
    done: u64,
    run: &TrainLoop,
    holdout: Option<&Loader>,
    skipped: u64,
    step: &mut dyn FnMut(&Batch) -> Result<(Tensor, Vec<f64>)>,
    pictures: &mut dyn FnMut(u64, Option<&Ema>, &Path) -> Result<()>,
    seed: u64,
) -> Result<()> {
    let mut held = f64::NAN;
    if let Some(h) = holdout {
        let n = h.steps_per_epoch().max(1);
        let mut sum = 0.0;
        for i in 0..n {
            seed_step(seed ^ VALIDATION_SEED, i);
            let b = h.batch(i)?;
            let (loss, _) = tch::no_grad(|| step(&b))?;
            sum += loss.f_double_value(&[])?;
        }
        held = sum / n as f64;
    }
    let csv = dir.join("validation.csv");
    let mut text = match std::fs::read_to_string(&csv) {
        Ok(t) => t,
        Err(_) => "step,heldout_loss,nonfinite_skipped\n".to_string(),
    };
    // Rows of a previous process beyond this step were redone: keep one row per step.
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.split(',').next().and_then(|s| s.parse::<u64>().ok()).is_none_or(|s| s < done)
        })
        .collect();
    text = kept.join("\n") + "\n";
    text.push_str(&format!("{done},{held},{skipped}\n"));
    write_bytes(&csv, text.as_bytes())?;
    if held.is_finite() {
        println!("{name}: step {done}: held-out loss {held:.5}");
    }
    let pics = dir.join("validation");
    pictures(done, run.ema(), &pics)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::source::Needs;

    /// Steps whose loss is not finite are skipped; `max_nonfinite` of them in a row stop the run
    /// with the step and the last good checkpoint.
    #[test]
    fn non_finite_steps_are_skipped_then_stop_the_run() {
        let dir = unclip_core::fsutil::scratch_dir("train-nonfinite").unwrap();
        let text = format!(
            "[run]\nout = {:?}\nconditioning = \"x\"\n[data]\nsource = \"shapes\"\nitems = 16\n\
             [validation]\nitems = 0\n[decoder]\nresolution = 8\n[decoder.model]\nchannels = [16]\n\
             [decoder.train]\nsteps = 20\nbatch_size = 2\nlr = 0.01\ncheckpoint_every = 1\nmax_nonfinite = 3\n",
            dir.display().to_string()
        );
        let cfg = RunConfig::parse(&text, Path::new("t.toml"), &[]).unwrap();
        let split = source::open(&cfg.data, 0, 8, 0).unwrap();
        let ctx = Ctx {
            cfg: &cfg,
            out: &dir,
            device: Device::Cpu,
            data: &split,
            budget: None,
            dist: None,
        };
        let needs = |b| Needs {
            batch_size: b,
            resolution: Some(8),
            clip_resolution: None,
            low_resolution: None,
        };
        let (loader, _) = ctx.loaders("toy", needs, 2).unwrap();
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[3], tch::nn::Init::Const(1.0));
        let mut calls = 0;
        let mut step = |_: &Batch| -> Result<(Tensor, Vec<f64>)> {
            calls += 1;
            let loss = w.square().sum(Kind::Float);
            // Steps 1 and 2 are fine, then NaN (step 4 alone is fine: the count restarts).
            Ok((if calls <= 2 || calls == 4 { loss } else { loss * f64::NAN }, vec![]))
        };
        let mut after = || Ok(());
        let mut pictures = |_: u64, _: Option<&Ema>, _: &Path| Ok(());
        let hooks = StageHooks { step: &mut step, after: &mut after, pictures: &mut pictures };
        let t = &cfg.decoder.as_ref().unwrap().train;
        let e = train(&ctx, "toy", &vs, t, &[], &loader, None, hooks).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, TrainError::NonFinite { count: 3, first: 5, step: 7, last_good: 4, .. }),
            "{msg}"
        );
        assert!(
            msg.contains("stage toy")
                && msg.contains("steps 5 to 7")
                && msg.contains("step-00000007 (step 7)"),
            "{msg}"
        );
        // The skipped steps left the weights as the good steps made them.
        let good: Vec<f32> = Vec::try_from(&w.detach()).unwrap();
        assert!(good.iter().all(|v| v.is_finite() && *v < 1.0), "{good:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A stable 64-bit mix (splitmix64's finalizer).
    fn mix(mut x: u64) -> u64 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    /// A standard normal value that is a function of `h` alone (Box-Muller).
    fn normal(h: u64) -> f32 {
        let u = |x: u64| ((mix(x) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        ((-2.0 * u(h).ln()).sqrt() * (std::f64::consts::TAU * u(h ^ 0x5555)).cos()) as f32
    }

    fn key_hash(key: &str) -> u64 {
        key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
    }

    /// Rows of `width` values each, a function of (row's item, stream) only.
    fn rows(items: &[u64], stream: u64, width: usize) -> Vec<f32> {
        let mut v = Vec::with_capacity(items.len() * width);
        for &item in items {
            for c in 0..width as u64 {
                v.push(normal(mix(item ^ mix(stream ^ mix(c)))));
            }
        }
        v
    }

    /// Noise keyed by (optimizer step, item, draw): an item gets the same timestep, noise and
    /// dropout decision whether it sits in a micro-batch or in the whole batch.
    struct KeyedNoise {
        step: u64,
        items: Vec<u64>,
        draw: u64,
    }

    impl unclip_scheduler::NoiseSource for KeyedNoise {
        fn randn(&mut self, shape: &[i64], kind: Kind, device: Device) -> Tensor {
            assert_eq!(shape[0] as usize, self.items.len());
            let width = shape[1..].iter().product::<i64>() as usize;
            self.draw += 1;
            let v = rows(&self.items, mix(self.step) ^ self.draw, width);
            Tensor::from_slice(&v).view(shape).to_kind(kind).to_device(device)
        }

        fn randint(&mut self, high: i64, shape: &[i64], device: Device) -> Tensor {
            assert_eq!(shape, [self.items.len() as i64]);
            self.draw += 1;
            let v: Vec<i64> = self
                .items
                .iter()
                .map(|&i| (mix(i ^ mix(mix(self.step) ^ self.draw)) % high as u64) as i64)
                .collect();
            Tensor::from_slice(&v).to_device(device)
        }
    }

    /// What [`train_prior`] returns.
    struct Trained {
        vars: Vec<(String, Tensor)>,
        losses: Vec<f64>,
        /// The kind of a matrix product inside the loss's forward pass, at each call.
        matmul_kinds: Vec<Kind>,
    }

    /// Trains a tiny prior (1 layer, width 16) with `accumulate` micro-batches of `batch` items
    /// for `steps` steps at learning rate `lr` in `precision`, starting from `init`'s weights.
    fn train_prior(
        init: &VarStore,
        accumulate: usize,
        batch: usize,
        (steps, lr, precision): (u64, f64, &str),
    ) -> Trained {
        use unclip_prior::{PriorBatch, PriorConfig, PriorTrainer, PriorTransformer, TrainOptions};
        let dir = unclip_core::fsutil::scratch_dir(&format!(
            "train-prior-{accumulate}x{batch}-{precision}"
        ))
        .unwrap();
        let text = format!(
            "[run]\nout = {:?}\nconditioning = \"x\"\nprecision = \"{precision}\"\n\
             [data]\nsource = \"shapes\"\nitems = 24\n\
             [validation]\nitems = 0\n[decoder]\nresolution = 8\n[decoder.model]\nchannels = [16]\n\
             [decoder.train]\nsteps = {steps}\nbatch_size = {batch}\naccumulate = {accumulate}\n\
             lr = {lr}\nwarmup = 1\nema_decay = 0.0\ngrad_clip = 0.5\n",
            dir.display().to_string()
        );
        let cfg = RunConfig::parse(&text, Path::new("t.toml"), &[]).unwrap();
        let split = source::open(&cfg.data, 0, 8, 0).unwrap();
        let ctx = Ctx {
            cfg: &cfg,
            out: &dir,
            device: Device::Cpu,
            data: &split,
            budget: None,
            dist: None,
        };
        let needs = |b| Needs {
            batch_size: b,
            resolution: Some(8),
            clip_resolution: None,
            low_resolution: None,
        };
        let (loader, _) = ctx.loaders("toy", needs, batch).unwrap();
        let (dim, tokens) = (16usize, 4usize);
        let m = crate::train::config::PriorModelConfig { layers: 1, heads: 2 };
        let pc: PriorConfig = serde_json::from_value(super::super::stages::prior::model_config(
            &m,
            dim as i64,
            tokens as i64,
        ))
        .unwrap();
        let mut vs = VarStore::new(Device::Cpu);
        let model = PriorTransformer::new(vs.root(), &pc).unwrap();
        vs.copy(init).unwrap();
        let text_of = |items: &[u64]| {
            let n = items.len() as i64;
            TextConditioning::new(
                Tensor::from_slice(&rows(items, 1, dim)).view([n, dim as i64]),
                Tensor::from_slice(&rows(items, 2, tokens * dim)).view([
                    n,
                    tokens as i64,
                    dim as i64,
                ]),
                Tensor::ones([n, tokens as i64], (Kind::Bool, Device::Cpu)),
            )
            .unwrap()
        };
        let trainer =
            PriorTrainer::karlo(text_of(&[0]), TrainOptions { cond_drop_prob: 0.3 }).unwrap();
        let mut calls = 0u64;
        let mut matmul_kinds = Vec::new();
        let mut step = |b: &Batch| -> Result<(Tensor, Vec<f64>)> {
            let probe = Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
            matmul_kinds.push(probe.matmul(&probe).kind());
            let items: Vec<u64> = b.keys.iter().map(|k| key_hash(k)).collect();
            let n = items.len() as i64;
            let pb = PriorBatch {
                image_embeds: Tensor::from_slice(&rows(&items, 3, dim)).view([n, dim as i64]),
                text: text_of(&items),
            };
            let step = calls / accumulate as u64;
            calls += 1;
            let mut noise = KeyedNoise { step, items, draw: 0 };
            Ok((trainer.loss(&model, &pb, &mut noise)?, vec![]))
        };
        let mut after = || Ok(());
        let mut pictures = |_: u64, _: Option<&Ema>, _: &Path| Ok(());
        let hooks = StageHooks { step: &mut step, after: &mut after, pictures: &mut pictures };
        let t = &cfg.decoder.as_ref().unwrap().train;
        let out = train(&ctx, "toy", &vs, t, &[], &loader, None, hooks).unwrap();
        assert!(out.finished && out.steps == steps);
        assert_eq!(calls, steps * accumulate as u64);
        let log = unclip_core::train::read_csv(&dir.join("toy/loss.csv")).unwrap();
        let losses = log.column("loss").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Trained { vars, losses, matmul_kinds }
    }

    /// A tiny prior's weights made by `PriorTransformer::new` under seed 11.
    fn tiny_prior() -> VarStore {
        let init = VarStore::new(Device::Cpu);
        let _lock = unclip_scheduler::global_rng_lock();
        tch::manual_seed(11);
        let m = crate::train::config::PriorModelConfig { layers: 1, heads: 2 };
        let pc: unclip_prior::PriorConfig =
            serde_json::from_value(super::super::stages::prior::model_config(&m, 16, 4)).unwrap();
        unclip_prior::PriorTransformer::new(init.root(), &pc).unwrap();
        init
    }

    fn max_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
        a.iter()
            .zip(b)
            .map(|((n, x), (m, y))| {
                assert_eq!(n, m);
                (x - y).abs().max().double_value(&[])
            })
            .fold(0.0, f64::max)
    }

    /// Two micro-batches of 2 per step update the weights as one batch of 4 does (same items in
    /// the same order, the same draws per item), within float rounding; one batch of 2 does not.
    #[test]
    fn accumulated_micro_batches_update_as_one_large_batch() {
        let init = tiny_prior();
        let start: Vec<(String, Tensor)> = {
            let mut v: Vec<_> = init.variables().into_iter().collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v.into_iter().map(|(n, t)| (n, t.copy())).collect()
        };
        let run = (3, 1e-3, "f32");
        let micro = train_prior(&init, 2, 2, run).vars;
        let whole = train_prior(&init, 1, 4, run).vars;
        let half = train_prior(&init, 1, 2, run).vars;
        let (same, moved, other) =
            (max_diff(&micro, &whole), max_diff(&whole, &start), max_diff(&half, &whole));
        println!("2 x 2 vs 1 x 4: {same:e}; moved {moved:e}; 1 x 2 vs 1 x 4: {other:e}");
        assert!(same < 1e-5, "2 x 2 vs 1 x 4 differ by {same}");
        assert!(moved > 1e-3 && other > 1e-4, "moved {moved}, 1 x 2 vs 1 x 4 {other}");
    }

    /// `run.precision = "bf16"`: the loss's matrix products run in bf16 (autocast), the weights
    /// stay f32, and a tiny prior trains: finite losses, lower after 30 steps than at the start.
    /// The f32 run of the same steps does not see bf16.
    #[test]
    fn a_bf16_run_trains_with_f32_master_weights() {
        let init = tiny_prior();
        let bf16 = train_prior(&init, 1, 4, (30, 3e-3, "bf16"));
        assert!(bf16.matmul_kinds.iter().all(|k| *k == Kind::BFloat16), "{:?}", bf16.matmul_kinds);
        assert!(bf16.vars.iter().all(|(_, t)| t.kind() == Kind::Float));
        let l = &bf16.losses;
        assert!(l.iter().all(|v| v.is_finite()), "{l:?}");
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
        let (first, last) = (mean(&l[..5]), mean(&l[l.len() - 5..]));
        println!("bf16 prior: mean loss of steps 1-5 {first:.4}, of steps 26-30 {last:.4}");
        assert!(last < 0.8 * first, "{first} -> {last}: {l:?}");
        let f32 = train_prior(&init, 1, 4, (2, 3e-3, "f32"));
        assert!(f32.matmul_kinds.iter().all(|k| *k == Kind::Float));
        // Autocast is off again once the run is over.
        let probe = Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
        assert_eq!(probe.matmul(&probe).kind(), Kind::Float);
    }
}
