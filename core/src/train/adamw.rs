//! AdamW written over tch tensors, so its state (moments and step counts) can be checkpointed:
//! tch's built-in optimizer keeps that state inside libtorch where it cannot be saved, and a
//! resumed run would restart the moments from zero.

use super::clip::{GradNorm, clip_grad_norm};
use crate::{Error, Result};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use tch::{Kind, Tensor, nn::VarStore};

/// Hyper-parameters; the defaults are `torch.optim.AdamW`'s.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay: each step multiplies decayed weights by `1 - lr * weight_decay`.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

impl AdamWConfig {
    fn validate(&self) -> Result<()> {
        let ok = valid_lr(self.lr)
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps.is_finite()
            && self.eps > 0.0
            && self.weight_decay.is_finite()
            && self.weight_decay >= 0.0;
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "invalid AdamW settings {self:?}: need lr >= 0, betas in [0, 1), eps > 0, weight_decay >= 0"
            )))
        }
    }
}

fn valid_lr(lr: f64) -> bool {
    lr.is_finite() && lr >= 0.0
}

/// The usual no-decay rule by variable name: biases, normalization parameters (`norm`, `ln_`)
/// and embeddings (a variable or module whose name ends in `embedding(s)`, e.g.
/// `token_embedding.weight`, `positional_embedding`). Decaying those hurts more than it helps.
pub fn default_no_decay(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    let last = parts.last().copied().unwrap_or("");
    let module = if parts.len() >= 2 { parts[parts.len() - 2] } else { "" };
    let embedding = |s: &str| s.ends_with("embedding") || s.ends_with("embeddings");
    last == "bias"
        || parts.iter().any(|p| p.contains("norm") || p.starts_with("ln_") || *p == "ln")
        || embedding(last)
        || (last == "weight" && embedding(module))
}

/// One trainable variable with its Adam state.
struct Param {
    name: String,
    var: Tensor,
    decay: bool,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Updates applied to this variable (torch counts per parameter, too).
    steps: i64,
}

/// Gradient averaging over data-parallel processes (see [`AdamW::backward_step_synced`]): takes
/// the local loss, averages the gradients in place, returns the mean loss.
pub type GradSync = dyn FnMut(f64) -> Result<f64>;

/// What [`AdamW::backward_step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// The loss value (before the update).
    pub loss: f64,
    /// Global gradient norm before clipping (NaN / inf when the gradients were not finite).
    pub grad_norm: f64,
    /// True when the update was skipped because the loss or the gradients were not finite.
    pub skipped: bool,
}

/// AdamW over the trainable variables of one `VarStore` (those with `requires_grad`), matching
/// `torch.optim.AdamW` (single-tensor path) step for step.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<Param>,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("cfg", &self.cfg)
            .field("params", &self.params.len())
            .field("steps", &self.steps())
            .finish()
    }
}

impl AdamW {
    /// Weight decay on every trainable variable.
    pub fn new(vs: &VarStore, cfg: AdamWConfig) -> Result<Self> {
        Self::with_no_decay(vs, cfg, |_| false)
    }

    /// Weight decay on every trainable variable except those `no_decay(name)` selects (see
    /// [`default_no_decay`]).
    pub fn with_no_decay(
        vs: &VarStore,
        cfg: AdamWConfig,
        no_decay: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        cfg.validate()?;
        let mut named: Vec<(String, Tensor)> =
            vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        if named.is_empty() {
            return Err(Error::InvalidArgument("the VarStore has no trainable variables".into()));
        }
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let mut params = Vec::with_capacity(named.len());
        for (name, var) in named {
            if !var.is_floating_point() {
                return Err(Error::InvalidArgument(format!(
                    "trainable variable {name} is not floating point"
                )));
            }
            let exp_avg = var.f_zeros_like()?;
            let exp_avg_sq = var.f_zeros_like()?;
            let decay = !no_decay(&name);
            params.push(Param { name, var, decay, exp_avg, exp_avg_sq, steps: 0 });
        }
        Ok(Self { cfg, params })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    pub fn lr(&self) -> f64 {
        self.cfg.lr
    }

    /// Sets the learning rate of the next steps (what an [`super::LrSchedule`] drives).
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        if !valid_lr(lr) {
            return Err(Error::InvalidArgument(format!("learning rate must be >= 0, got {lr}")));
        }
        self.cfg.lr = lr;
        Ok(())
    }

    /// Names of the optimized variables, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }

    /// Whether weight decay applies to `name` (`None` if it is not optimized).
    pub fn decays(&self, name: &str) -> Option<bool> {
        self.params.iter().find(|p| p.name == name).map(|p| p.decay)
    }

    /// The largest per-variable step count: the number of updates applied so far.
    pub fn steps(&self) -> i64 {
        self.params.iter().map(|p| p.steps).max().unwrap_or(0)
    }

    /// Zeroes the gradients (keeps them allocated, like tch's optimizer).
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.var.zero_grad();
        }
    }

    fn grads(&self) -> Vec<Tensor> {
        self.params.iter().map(|p| p.var.grad()).filter(|g| g.defined()).collect()
    }

    /// Global L2 norm of the gradients, clipped to `max_norm` when finite (see
    /// [`clip_grad_norm`]).
    pub fn clip_grad_norm(&self, max_norm: f64) -> Result<GradNorm> {
        clip_grad_norm(&self.grads(), max_norm)
    }

    /// One AdamW update from the current gradients, in place under `no_grad`. Variables that
    /// never had a gradient are left alone, as torch does; note that after a first
    /// [`Self::zero_grad`] a variable keeps a (zero) gradient, like with tch's own optimizer or
    /// torch's `zero_grad(set_to_none=False)`, so weight decay and the moments still move it.
    pub fn step(&mut self) -> Result<()> {
        let AdamWConfig { lr, beta1, beta2, eps, weight_decay } = self.cfg;
        tch::no_grad(|| -> Result<()> {
            for p in &mut self.params {
                let grad = p.var.grad();
                if !grad.defined() {
                    continue;
                }
                p.steps += 1;
                if p.decay && weight_decay != 0.0 {
                    let _ = p.var.f_mul_scalar_(1.0 - lr * weight_decay)?;
                }
                let _ = p.exp_avg.f_lerp_(&grad, 1.0 - beta1)?;
                let _ = p.exp_avg_sq.f_mul_scalar_(beta2)?;
                let _ = p.exp_avg_sq.f_addcmul_(&grad.f_mul_scalar(1.0 - beta2)?, &grad)?;
                let step = p.steps as f64;
                let bias_correction1 = 1.0 - beta1.powf(step);
                let bias_correction2 = 1.0 - beta2.powf(step);
                let step_size = lr / bias_correction1;
                let denom = p
                    .exp_avg_sq
                    .f_sqrt()?
                    .f_div_scalar(bias_correction2.sqrt())?
                    .f_add_scalar(eps)?;
                let update = p.exp_avg.f_div(&denom)?.f_mul_scalar(-step_size)?;
                let _ = p.var.f_add_(&update)?;
            }
            Ok(())
        })
    }

    /// The whole step for a scalar `loss`: zero the gradients, backpropagate, clip to
    /// `max_grad_norm` if given, and update — unless the loss or the gradient norm is not
    /// finite, in which case the weights and the optimizer state stay untouched and the outcome
    /// says `skipped` (one bad batch does not poison the run).
    pub fn backward_step(
        &mut self,
        loss: &Tensor,
        max_grad_norm: Option<f64>,
    ) -> Result<StepOutcome> {
        self.backward_step_synced(loss, max_grad_norm, None)
    }

    /// [`Self::backward_step`] for data-parallel training: after the backward pass `sync` gets
    /// this process's loss, must replace every gradient by its mean over the processes and
    /// return the mean loss. The backward pass runs even when the local loss is not finite (its
    /// gradients then poison the mean), so every process takes part in every collective and all
    /// of them skip or take the step together; clipping sees the averaged gradients.
    pub fn backward_step_synced(
        &mut self,
        loss: &Tensor,
        max_grad_norm: Option<f64>,
        sync: Option<&mut GradSync>,
    ) -> Result<StepOutcome> {
        if loss.numel() != 1 {
            return Err(Error::InvalidArgument(format!(
                "the loss must be a scalar, got shape {:?}",
                loss.size()
            )));
        }
        let mut value = loss.f_to_kind(Kind::Double)?.f_double_value(&[])?;
        self.zero_grad();
        if let Some(sync) = sync {
            loss.f_backward()?;
            value = sync(value)?;
        } else if value.is_finite() {
            loss.f_backward()?;
        }
        if !value.is_finite() {
            self.zero_grad();
            return Ok(StepOutcome { loss: value, grad_norm: f64::NAN, skipped: true });
        }
        let norm = match max_grad_norm {
            Some(m) => self.clip_grad_norm(m)?,
            None => super::clip::grad_norm(&self.grads())?,
        };
        if !norm.is_finite() {
            self.zero_grad();
            return Ok(StepOutcome { loss: value, grad_norm: norm.norm, skipped: true });
        }
        self.step()?;
        Ok(StepOutcome { loss: value, grad_norm: norm.norm, skipped: false })
    }

    /// The state as named CPU tensors: `exp_avg.<var>`, `exp_avg_sq.<var>` and `step.<var>`
    /// (int64, shape `[1]`).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let cpu = |t: &Tensor| -> Result<Tensor> {
            Ok(t.f_detach()?.f_to_device(tch::Device::Cpu)?.f_contiguous()?)
        };
        let mut out = Vec::with_capacity(3 * self.params.len());
        for p in &self.params {
            out.push((format!("exp_avg.{}", p.name), cpu(&p.exp_avg)?));
            out.push((format!("exp_avg_sq.{}", p.name), cpu(&p.exp_avg_sq)?));
            out.push((format!("step.{}", p.name), Tensor::from_slice(&[p.steps])));
        }
        Ok(out)
    }

    /// Writes [`Self::state_tensors`] as a safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let state = self.state_tensors()?;
        crate::fsutil::atomic_write(path, |tmp| Ok(Tensor::write_safetensors(&state, tmp)?))
    }

    /// Restores the state from named tensors (as [`Self::state_tensors`] wrote them). The names
    /// must match this optimizer's variables exactly; nothing is changed on an error.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, source: &str) -> Result<()> {
        let bad = |message: String| Error::Checkpoint { path: source.into(), message };
        let mut expected = BTreeSet::new();
        for p in &self.params {
            for key in ["exp_avg", "exp_avg_sq", "step"] {
                expected.insert(format!("{key}.{}", p.name));
            }
        }
        let missing: Vec<&String> = expected.iter().filter(|k| !state.contains_key(*k)).collect();
        if !missing.is_empty() {
            return Err(bad(format!("optimizer state lacks {missing:?}")));
        }
        let extra: Vec<&String> = state.keys().filter(|k| !expected.contains(*k)).collect();
        if !extra.is_empty() {
            return Err(bad(format!("optimizer state has unknown entries {extra:?}")));
        }
        let mut steps = Vec::with_capacity(self.params.len());
        for p in &self.params {
            for key in ["exp_avg", "exp_avg_sq"] {
                let t = &state[&format!("{key}.{}", p.name)];
                if t.size() != p.var.size() {
                    return Err(bad(format!(
                        "{key}.{} has shape {:?}, expected {:?}",
                        p.name,
                        t.size(),
                        p.var.size()
                    )));
                }
            }
            let s = &state[&format!("step.{}", p.name)];
            if s.numel() != 1 || s.kind() != Kind::Int64 {
                return Err(bad(format!("step.{} must be one int64", p.name)));
            }
            let n = s.f_int64_value(&[0])?;
            if n < 0 {
                return Err(bad(format!("step.{} is negative ({n})", p.name)));
            }
            steps.push(n);
        }
        tch::no_grad(|| -> Result<()> {
            for (p, n) in self.params.iter_mut().zip(steps) {
                p.exp_avg.f_copy_(&state[&format!("exp_avg.{}", p.name)])?;
                p.exp_avg_sq.f_copy_(&state[&format!("exp_avg_sq.{}", p.name)])?;
                p.steps = n;
            }
            Ok(())
        })
    }

    /// Reads a file written by [`Self::save`] into this optimizer.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let state = crate::weights::read_tensors(path)?;
        self.load_state(&state, &path.display().to_string())
    }
}
