//! Model-independent training machinery that every stage's recipe composes in a few lines:
//!
//! - [`AdamW`]: decoupled weight decay with a no-decay rule by name, state that checkpoints;
//! - [`LrSchedule`]: warmup, then constant, cosine or linear decay to a floor;
//! - [`clip_grad_norm`]: global-norm clipping that refuses non-finite gradients;
//! - [`Ema`]: moving-average weights under the model's names (what gets shipped);
//! - [`Checkpointer`]: atomic periodic checkpoints with a `latest.json` written last, resume;
//! - [`seed_step`] / [`batch_indices`]: randomness and data order as functions of the step, so a
//!   resumed run repeats an uninterrupted one bit for bit on the CPU;
//! - [`CsvLogger`], [`plot_loss_curve`], [`Progress`]: loss log, loss picture, progress bar;
//! - [`TrainLoop`]: all of the above wired together; a recipe supplies each step's loss.
//!
//! A loop from the pieces, sketched (or the same with [`TrainLoop`] in a few lines):
//!
//! ```no_run
//! # use unclip_core::train::*;
//! # fn loss_of(vs: &tch::nn::VarStore, idx: &[usize]) -> tch::Tensor { vs.trainable_variables()[0].sum(tch::Kind::Float) * idx.len() as f64 }
//! # fn main() -> unclip_core::Result<()> {
//! let vs = tch::nn::VarStore::new(tch::Device::Cpu); // ... the model's layers on vs.root()
//! let (seed, total) = (0, 1000);
//! let sched = LrSchedule::WarmupCosine { peak: 1e-4, floor: 1e-5, warmup_steps: 100, total_steps: total };
//! let mut opt = AdamW::with_no_decay(&vs, AdamWConfig::default(), default_no_decay)?;
//! let mut ema = Ema::new(&vs, EmaConfig::default())?;
//! let ckpt = Checkpointer::new("runs/prior", 3)?;
//! let start = ckpt.resume(&vs, Some(&mut opt), Some(&mut ema))?.map_or(0, |m| m.step);
//! let mut log = CsvLogger::resume("runs/prior/loss.csv".as_ref(), &[], start)?;
//! let mut bar = Progress::new("prior", start, total);
//! for step in start..total {
//!     seed_step(seed, step);
//!     let batch = batch_indices(10_000, 32, seed, step)?;
//!     opt.set_lr(sched.lr(step))?;
//!     let out = opt.backward_step(&loss_of(&vs, &batch), Some(1.0))?;
//!     ema.update(&vs)?;
//!     let row = LogRow { step: step + 1, loss: out.loss, lr: opt.lr(), grad_norm: out.grad_norm, secs: 0.0, extra: vec![] };
//!     log.log(&row)?;
//!     bar.update(step + 1, out.loss, opt.lr());
//!     if Checkpointer::is_due(step + 1, 100, total) {
//!         let meta = serde_json::json!({});
//!         ckpt.save(step + 1, &Snapshot { model: &vs, ema: Some(&ema), optimizer: Some(&opt), seed, metadata: &meta })?;
//!     }
//! }
//! plot_loss_csv("runs/prior/loss.csv".as_ref(), "runs/prior/loss.png".as_ref(), &PlotOptions::default())?;
//! # Ok(()) }
//! ```

mod adamw;
mod checkpoint;
mod clip;
mod csv_log;
mod data_order;
mod ema;
mod plot;
mod progress;
mod run;
mod schedule;

pub use adamw::{AdamW, AdamWConfig, GradSync, StepOutcome, default_no_decay};
pub use checkpoint::{Checkpointer, Manifest, Snapshot};
pub use clip::{GradNorm, clip_grad_norm, grad_norm};
pub use csv_log::{BASE_COLUMNS, CsvLogger, LogRow, LossLog, read_csv};
pub use data_order::{batch_indices, epoch_permutation, seed_step, step_seed};
pub use ema::{Ema, EmaConfig};
pub use plot::{PlotOptions, moving_average, plot_loss_csv, plot_loss_curve};
pub use progress::Progress;
pub use run::{DataParallel, LoopConfig, TrainLoop};
pub use schedule::LrSchedule;
