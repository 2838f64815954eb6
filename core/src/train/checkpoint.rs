//! Periodic training checkpoints that survive a crash at any moment.
//!
//! Layout of a checkpoint directory:
//!
//! ```text
//! <dir>/step-00001000/model.safetensors      model variables, in their own dtype
//! <dir>/step-00001000/ema.safetensors        EMA weights (same names as the model), if any
//! <dir>/step-00001000/optimizer.safetensors  AdamW moments and step counts, if any
//! <dir>/step-00001000/state.json             the manifest (step, seed, EMA updates, metadata)
//! <dir>/latest.json                          the manifest of the newest complete checkpoint
//! ```
//!
//! Every file is written atomically and `latest.json` last, so a crash while saving leaves the
//! previous `latest.json` pointing at a complete checkpoint; [`Checkpointer::resume`] only
//! follows `latest.json`.

use super::{AdamW, Ema};
use crate::weights::{Unexpected, load_file, save_file};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use tch::nn::VarStore;

const LATEST: &str = "latest.json";
const MODEL: &str = "model.safetensors";
const EMA: &str = "ema.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";

/// What one checkpoint holds besides the tensors.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// Completed optimizer steps: the run continues with step index `step`.
    pub step: u64,
    /// The run's seed (per-step randomness derives from `(seed, step)`, see
    /// [`super::seed_step`]).
    pub seed: u64,
    /// The step directory, relative to the checkpoint directory.
    pub dir: String,
    /// EMA updates done, when the checkpoint has EMA weights.
    pub ema_updates: Option<u64>,
    pub has_optimizer: bool,
    /// Anything small the recipe wants back (its config, data position, ...).
    pub metadata: serde_json::Value,
}

/// What to save: borrowed from the training loop.
#[derive(Clone, Copy)]
pub struct Snapshot<'a> {
    pub model: &'a VarStore,
    pub ema: Option<&'a Ema>,
    pub optimizer: Option<&'a AdamW>,
    pub seed: u64,
    pub metadata: &'a serde_json::Value,
}

/// Writes checkpoints into one directory, keeping the newest `keep_last`.
#[derive(Debug, Clone)]
pub struct Checkpointer {
    dir: PathBuf,
    keep_last: usize,
}

fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn parse_step_dir(name: &str) -> Option<u64> {
    name.strip_prefix("step-").and_then(|s| s.parse().ok())
}

impl Checkpointer {
    /// Checkpoints go to `dir` (created if needed); only the newest `keep_last` (>= 1) stay.
    pub fn new(dir: impl Into<PathBuf>, keep_last: usize) -> Result<Self> {
        let dir = dir.into();
        if keep_last == 0 {
            return Err(Error::InvalidArgument("keep_last must be at least 1".into()));
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(Self { dir, keep_last })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True when a checkpoint is due after `step` completed steps with one every `every` steps,
    /// or at the last step.
    pub fn is_due(step: u64, every: u64, total: u64) -> bool {
        step == total || (every > 0 && step % every == 0)
    }

    /// Saves a checkpoint after `step` completed steps and returns its directory. Files are
    /// written one by one, atomically, then `latest.json`, then old checkpoints are pruned.
    pub fn save(&self, step: u64, snap: &Snapshot<'_>) -> Result<PathBuf> {
        let name = step_dir_name(step);
        let dir = self.dir.join(&name);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        save_file(snap.model, &dir.join(MODEL), None)?;
        if let Some(ema) = snap.ema {
            ema.save(&dir.join(EMA), None)?;
        }
        if let Some(opt) = snap.optimizer {
            opt.save(&dir.join(OPTIMIZER))?;
        }
        let manifest = Manifest {
            step,
            seed: snap.seed,
            dir: name,
            ema_updates: snap.ema.map(|e| e.updates()),
            has_optimizer: snap.optimizer.is_some(),
            metadata: snap.metadata.clone(),
        };
        crate::config::write_json(&dir.join(STATE), &manifest)?;
        crate::config::write_json(&self.dir.join(LATEST), &manifest)?;
        self.prune(step)?;
        Ok(dir)
    }

    /// Removes step directories beyond the newest `keep_last` up to `latest`, and any newer than
    /// `latest` (left by a run that crashed before its `latest.json` moved).
    fn prune(&self, latest: u64) -> Result<()> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let mut steps = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(s) = parse_step_dir(&name) {
                steps.push(s);
            } else if name.starts_with(&format!(".{LATEST}.tmp-")) {
                // A temporary file of an interrupted write of latest.json.
                let _ = std::fs::remove_file(entry.path());
            }
        }
        steps.sort_unstable();
        let kept: Vec<u64> =
            steps.iter().copied().filter(|s| *s <= latest).rev().take(self.keep_last).collect();
        for s in steps.into_iter().filter(|s| !kept.contains(s)) {
            let path = self.dir.join(step_dir_name(s));
            match std::fs::remove_dir_all(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io(path, e));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The manifest of the newest complete checkpoint, if any.
    pub fn latest(&self) -> Result<Option<Manifest>> {
        let path = self.dir.join(LATEST);
        if !path.exists() {
            return Ok(None);
        }
        let m: Manifest = crate::config::read_json(&path)?;
        if parse_step_dir(&m.dir) != Some(m.step) {
            return Err(Error::Checkpoint {
                path: path.display().to_string(),
                message: format!("names directory {:?} for step {}", m.dir, m.step),
            });
        }
        Ok(Some(m))
    }

    /// Loads the newest checkpoint into `model`, `optimizer` and `ema` and returns its manifest
    /// (continue with step index `manifest.step`), or `None` when there is none yet (a fresh
    /// start). Asking for an optimizer or EMA state that the checkpoint lacks is an error, since
    /// continuing without it would silently change the run.
    pub fn resume(
        &self,
        model: &VarStore,
        optimizer: Option<&mut AdamW>,
        ema: Option<&mut Ema>,
    ) -> Result<Option<Manifest>> {
        let Some(m) = self.latest()? else { return Ok(None) };
        let dir = self.dir.join(&m.dir);
        let missing = |what: &str| Error::Checkpoint {
            path: dir.display().to_string(),
            message: format!("has no {what} state to resume from"),
        };
        load_file(model, &dir.join(MODEL), Unexpected::Error)?;
        if let Some(opt) = optimizer {
            if !m.has_optimizer {
                return Err(missing("optimizer"));
            }
            opt.load(&dir.join(OPTIMIZER))?;
        }
        if let Some(ema) = ema {
            let updates = m.ema_updates.ok_or_else(|| missing("EMA"))?;
            ema.load(&dir.join(EMA), updates)?;
        }
        Ok(Some(m))
    }

    /// The weights file to ship from the newest checkpoint: the EMA weights when it has them,
    /// else the model's (both use the model's tensor names).
    pub fn best_weights(&self) -> Result<Option<PathBuf>> {
        Ok(self.latest()?.map(|m| {
            let dir = self.dir.join(&m.dir);
            dir.join(if m.ema_updates.is_some() { EMA } else { MODEL })
        }))
    }
}
