//! [`TrainLoop`]: the pieces of this module wired together the way every stage's recipe uses
//! them, so a recipe only supplies the loss of a step.

use super::{
    AdamW, AdamWConfig, Checkpointer, CsvLogger, Ema, EmaConfig, GradSync, LogRow, LrSchedule,
    Manifest, PlotOptions, Progress, Snapshot, StepOutcome, plot_loss_csv, seed_step, step_seed,
};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Tensor, nn::VarStore};

/// How a run is driven; serializable so a recipe's config file can hold it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoopConfig {
    pub total_steps: u64,
    pub seed: u64,
    pub schedule: LrSchedule,
    pub optimizer: AdamWConfig,
    /// `None` trains without EMA weights (then the model's weights are shipped).
    pub ema: Option<EmaConfig>,
    pub max_grad_norm: Option<f64>,
    /// A checkpoint every this many steps (and at the end).
    pub checkpoint_every: u64,
    pub keep_last: usize,
}

/// This process's part in a data-parallel run (see [`TrainLoop::open_data_parallel`]).
pub struct DataParallel {
    /// This process's rank; rank 0 alone writes the log, checkpoints and shipped weights.
    pub rank: usize,
    /// Averages the gradients (and the loss) over the ranks after each backward pass.
    pub sync: Box<GradSync>,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel").field("rank", &self.rank).finish_non_exhaustive()
    }
}

/// A run in `dir`: `dir/loss.csv`, `dir/loss.png`, and checkpoints in `dir` (see
/// [`Checkpointer`]). Opening it resumes from the newest checkpoint when there is one.
pub struct TrainLoop {
    cfg: LoopConfig,
    dir: PathBuf,
    opt: AdamW,
    ema: Option<Ema>,
    ckpt: Checkpointer,
    /// None on data-parallel ranks other than 0 (they write nothing).
    log: Option<CsvLogger>,
    dp: Option<DataParallel>,
    progress: Progress,
    start: u64,
    /// Training seconds of earlier processes of this run (from the checkpoint).
    secs_before: f64,
    clock: Instant,
    metadata: serde_json::Value,
}

impl std::fmt::Debug for TrainLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainLoop")
            .field("dir", &self.dir)
            .field("start", &self.start)
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl TrainLoop {
    /// Sets up the optimizer (no decay where `no_decay(name)`), EMA, log and checkpoints for the
    /// model in `vs`, and resumes if `dir` holds a checkpoint. `extra_columns` are logged after
    /// the base ones; `metadata` is stored in every checkpoint (a resumed run gets the stored one
    /// back from [`Self::metadata`]).
    pub fn open(
        dir: &Path,
        vs: &VarStore,
        cfg: LoopConfig,
        no_decay: impl Fn(&str) -> bool,
        extra_columns: &[&str],
        metadata: serde_json::Value,
        label: &str,
    ) -> Result<Self> {
        Self::open_data_parallel(dir, vs, cfg, no_decay, extra_columns, metadata, label, None)
    }

    /// [`Self::open`] for one rank of a data-parallel run (`None`: a run of one process). Every
    /// rank resumes from the same checkpoint in `dir` (a folder all ranks see); only rank 0 writes
    /// there. Each rank seeds its steps apart (rank 0 as a run of one), so the ranks draw
    /// different noise for their different items.
    #[allow(clippy::too_many_arguments)]
    pub fn open_data_parallel(
        dir: &Path,
        vs: &VarStore,
        cfg: LoopConfig,
        no_decay: impl Fn(&str) -> bool,
        extra_columns: &[&str],
        metadata: serde_json::Value,
        label: &str,
        dp: Option<DataParallel>,
    ) -> Result<Self> {
        cfg.schedule.validate()?;
        if cfg.total_steps == 0 {
            return Err(Error::InvalidArgument("total_steps must be at least 1".into()));
        }
        let mut opt = AdamW::with_no_decay(vs, cfg.optimizer, no_decay)?;
        let mut ema = cfg.ema.map(|c| Ema::new(vs, c)).transpose()?;
        let ckpt = Checkpointer::new(dir, cfg.keep_last)?;
        let resumed: Option<Manifest> = ckpt.resume(vs, Some(&mut opt), ema.as_mut())?;
        let (start, secs_before, metadata) = match resumed {
            Some(m) => {
                if m.seed != cfg.seed {
                    return Err(Error::Checkpoint {
                        path: dir.display().to_string(),
                        message: format!("was trained with seed {}, not {}", m.seed, cfg.seed),
                    });
                }
                let secs = m.metadata["secs"].as_f64().unwrap_or(0.0);
                (m.step, secs, m.metadata["user"].clone())
            }
            None => (0, 0.0, metadata),
        };
        let writer = dp.as_ref().is_none_or(|d| d.rank == 0);
        let log = if writer {
            Some(CsvLogger::resume(&dir.join("loss.csv"), extra_columns, start)?)
        } else {
            None
        };
        let progress = Progress::new(label, start, cfg.total_steps);
        Ok(Self {
            cfg,
            dir: dir.to_path_buf(),
            opt,
            ema,
            ckpt,
            log,
            dp,
            progress,
            start,
            secs_before,
            clock: Instant::now(),
            metadata,
        })
    }

    /// The step indices still to run (all of them for a fresh run).
    pub fn remaining(&self) -> std::ops::Range<u64> {
        self.start..self.cfg.total_steps
    }

    /// The step this process started at (0, or where the checkpoint left off).
    pub fn start_step(&self) -> u64 {
        self.start
    }

    pub fn metadata(&self) -> &serde_json::Value {
        &self.metadata
    }

    pub fn ema(&self) -> Option<&Ema> {
        self.ema.as_ref()
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    pub fn progress(&mut self) -> &mut Progress {
        &mut self.progress
    }

    /// Replaces the progress display (e.g. [`Progress::lines`] into a log file).
    pub fn set_progress(&mut self, progress: Progress) {
        self.progress = progress;
    }

    /// Call first in step `step`: seeds libtorch for the step and sets its learning rate.
    pub fn begin_step(&mut self, step: u64) -> Result<()> {
        match self.dp.as_ref().map_or(0, |d| d.rank) {
            0 => seed_step(self.cfg.seed, step),
            rank => seed_step(step_seed(self.cfg.seed, step), rank as u64),
        }
        self.opt.set_lr(self.cfg.schedule.lr(step))
    }

    /// Call last in step `step` with its loss: updates the model (clipped, skipped if not
    /// finite), the EMA, the log and the progress, and checkpoints when due.
    pub fn end_step(
        &mut self,
        step: u64,
        vs: &VarStore,
        loss: &Tensor,
        extra: &[f64],
    ) -> Result<StepOutcome> {
        let sync = self.dp.as_mut().map(|d| &mut *d.sync);
        let out = self.opt.backward_step_synced(loss, self.cfg.max_grad_norm, sync)?;
        if let Some(ema) = &mut self.ema {
            ema.update(vs)?;
        }
        let done = step + 1;
        let secs = self.secs();
        let row = LogRow {
            step: done,
            loss: out.loss,
            lr: self.opt.lr(),
            grad_norm: out.grad_norm,
            secs,
            extra: extra.to_vec(),
        };
        let Some(log) = &mut self.log else {
            return Ok(out); // not rank 0: no log, progress or checkpoints
        };
        log.log(&row)?;
        self.progress.update(done, out.loss, self.opt.lr());
        if out.skipped {
            self.progress.println(&format!("step {done}: loss or gradients not finite, skipped"));
        }
        if Checkpointer::is_due(done, self.cfg.checkpoint_every, self.cfg.total_steps) {
            self.save(done, vs)?;
        }
        Ok(out)
    }

    fn secs(&self) -> f64 {
        self.secs_before + self.clock.elapsed().as_secs_f64()
    }

    /// Writes a checkpoint after `done` completed steps.
    pub fn save(&mut self, done: u64, vs: &VarStore) -> Result<PathBuf> {
        let meta = serde_json::json!({ "secs": self.secs(), "user": self.metadata });
        let snap = Snapshot {
            model: vs,
            ema: self.ema.as_ref(),
            optimizer: Some(&self.opt),
            seed: self.cfg.seed,
            metadata: &meta,
        };
        self.ckpt.save(done, &snap)
    }

    /// After the last step: draws `loss.png` from the log and writes the weights to ship (the
    /// EMA's when there is one, under the model's names) to `weights`, optionally cast to `kind`.
    /// Ranks other than 0 of a data-parallel run write nothing.
    pub fn finish(mut self, vs: &VarStore, weights: &Path, kind: Option<tch::Kind>) -> Result<()> {
        if self.log.is_none() {
            return Ok(());
        }
        self.progress.finish();
        let csv = self.dir.join("loss.csv");
        if super::read_csv(&csv)?.rows.len() >= 2 {
            plot_loss_csv(&csv, &self.dir.join("loss.png"), &PlotOptions::default())?;
        }
        match &self.ema {
            Some(ema) => ema.save(weights, kind),
            None => crate::weights::save_file(vs, weights, kind),
        }
    }
}
