//! AdamW written over tch tensors, so its state (moments and step counts) can be checkpointed:
//! tch's built-in optimizer keeps that state inside libtorch where it cannot be saved, and a
//! resumed run would restart the moments from zero.
//!
//! The moments live in flat buckets (variables of one decay group, dtype and device side by side,
//! up to [`BUCKET_ELEMS`] elements) and each variable's state is a view into its bucket. A step
//! then updates a bucket with a dozen whole-bucket kernels instead of about ten small kernels per
//! variable: with hundreds of small variables (biases, norms) the per-kernel overhead was most of
//! the optimizer's time. tch 0.26 binds neither libtorch's `_fused_adamw_` nor its `_foreach_`
//! kernels, which would do the same in C++.

use super::clip::GradNorm;
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

/// Most elements in one bucket: bounds the temporaries of a step (a few times this, 16 MiB each
/// in f32) however large the model; a variable larger than this gets a bucket of its own.
pub const BUCKET_ELEMS: i64 = 1 << 22;

/// How a variable lies in memory: its dims from outermost to innermost. Bucket slices are in
/// this order, so that views of them have the variable's own strides (a channels-last kernel's
/// gradient and moments stay channels-last, as autograd's layout contract wants).
#[derive(Debug, Clone)]
struct Layout {
    order: Vec<i64>,
    /// The sizes in that order.
    sizes: Vec<i64>,
    /// The permutation back to the variable's dims.
    inverse: Vec<i64>,
}

impl Layout {
    fn of(t: &Tensor) -> Self {
        let (size, stride) = (t.size(), t.stride());
        let mut order: Vec<i64> = (0..size.len() as i64).collect();
        order.sort_by_key(|&d| std::cmp::Reverse(stride[d as usize]));
        let mut inverse = vec![0i64; order.len()];
        for (k, &d) in order.iter().enumerate() {
            inverse[d as usize] = k as i64;
        }
        let sizes = order.iter().map(|&d| size[d as usize]).collect();
        Self { order, sizes, inverse }
    }

    /// `t`'s elements flat in memory order (a view when `t` is dense).
    fn flatten(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.f_permute(self.order.as_slice())?.f_reshape([-1])?)
    }

    /// `len` elements of `flat` from `start` as a tensor shaped and strided like the variable.
    fn view(&self, flat: &Tensor, start: i64, len: i64) -> Result<Tensor> {
        Ok(flat
            .f_narrow(0, start, len)?
            .f_view(self.sizes.as_slice())?
            .f_permute(self.inverse.as_slice())?)
    }
}

/// One trainable variable with its Adam state.
struct Param {
    name: String,
    var: Tensor,
    layout: Layout,
    decay: bool,
    /// Views into the bucket's flat moments, shaped like `var`.
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Updates applied to this variable (torch counts per parameter, too).
    steps: i64,
}

/// Variables updated together: same decay flag, dtype and device, moments stored flat.
struct Bucket {
    /// Indices into `AdamW::params`, in order; member `i` occupies `offsets[i]..offsets[i+1]`.
    members: Vec<usize>,
    offsets: Vec<i64>,
    decay: bool,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// The members' gradients, once they are views of one buffer (see `AdamW::bucket_grads`).
    grad: Option<Tensor>,
}

/// Groups `params` (in order) into buckets of at most `cap` elements per (decay, dtype, device).
fn make_buckets(params: &[(String, Tensor, bool)], cap: i64) -> Result<Vec<Bucket>> {
    let mut open: Vec<((bool, Kind, tch::Device), Vec<usize>, i64)> = Vec::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, (_, var, decay)) in params.iter().enumerate() {
        let key = (*decay, var.kind(), var.device());
        let n = var.numel() as i64;
        let slot = open.iter().position(|(k, _, _)| *k == key);
        match slot {
            Some(j) if open[j].2 + n <= cap => {
                open[j].1.push(i);
                open[j].2 += n;
            }
            Some(j) => {
                let (_, full, _) = std::mem::replace(&mut open[j], (key, vec![i], n));
                groups.push(full);
            }
            None => open.push((key, vec![i], n)),
        }
    }
    groups.extend(open.into_iter().map(|(_, m, _)| m));
    groups.sort_by_key(|m| m[0]);
    groups
        .into_iter()
        .map(|members| {
            let mut offsets = vec![0i64];
            for &i in &members {
                offsets.push(offsets.last().copied().unwrap_or(0) + params[i].1.numel() as i64);
            }
            let first = &params[members[0]].1;
            let total = *offsets.last().unwrap_or(&0);
            let opts = (first.kind(), first.device());
            Ok(Bucket {
                decay: params[members[0]].2,
                exp_avg: Tensor::f_zeros([total], opts)?,
                exp_avg_sq: Tensor::f_zeros([total], opts)?,
                grad: None,
                members,
                offsets,
            })
        })
        .collect()
}

/// Bias-corrected step sizes of update number `step` (1-based).
struct StepScalars {
    /// `-lr / (1 - beta1^step)`.
    neg_step_size: f64,
    /// `sqrt(1 - beta2^step)`.
    bias_correction2_sqrt: f64,
}

impl StepScalars {
    fn new(cfg: &AdamWConfig, step: i64) -> Self {
        let step = step as f64;
        Self {
            neg_step_size: -cfg.lr / (1.0 - cfg.beta1.powf(step)),
            bias_correction2_sqrt: (1.0 - cfg.beta2.powf(step)).sqrt(),
        }
    }
}

/// One AdamW update of `var` (any shape; flat for a bucket) in place, torch's single-tensor
/// formula: decay, `m = lerp(m, g, 1 - beta1)`, `v = beta2 v + (1 - beta2) g^2`, then
/// `var += -step_size * m / (sqrt(v) / sqrt(bc2) + eps)`.
fn adamw_update(
    cfg: &AdamWConfig,
    decay: bool,
    step: i64,
    var: &mut Tensor,
    grad: &Tensor,
    exp_avg: &mut Tensor,
    exp_avg_sq: &mut Tensor,
) -> Result<()> {
    let s = StepScalars::new(cfg, step);
    if decay && cfg.weight_decay != 0.0 {
        let _ = var.f_mul_scalar_(1.0 - cfg.lr * cfg.weight_decay)?;
    }
    let _ = exp_avg.f_lerp_(grad, 1.0 - cfg.beta1)?;
    let _ = exp_avg_sq.f_mul_scalar_(cfg.beta2)?;
    let _ = exp_avg_sq.f_addcmul_(&grad.f_mul_scalar(1.0 - cfg.beta2)?, grad)?;
    let mut denom = exp_avg_sq.f_sqrt()?;
    let _ = denom.f_div_scalar_(s.bias_correction2_sqrt)?;
    let _ = denom.f_add_scalar_(cfg.eps)?;
    // var += m / (denom / -step_size): addcdiv has no scale argument in tch.
    let _ = denom.f_div_scalar_(s.neg_step_size)?;
    let _ = var.f_addcdiv_(exp_avg, &denom)?;
    Ok(())
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
    buckets: Vec<Bucket>,
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
        Self::bucketed(vs, cfg, no_decay, BUCKET_ELEMS)
    }

    fn bucketed(
        vs: &VarStore,
        cfg: AdamWConfig,
        no_decay: impl Fn(&str) -> bool,
        cap: i64,
    ) -> Result<Self> {
        cfg.validate()?;
        let mut named: Vec<(String, Tensor)> =
            vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        if named.is_empty() {
            return Err(Error::InvalidArgument("the VarStore has no trainable variables".into()));
        }
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let mut flagged = Vec::with_capacity(named.len());
        for (name, var) in named {
            if !var.is_floating_point() {
                return Err(Error::InvalidArgument(format!(
                    "trainable variable {name} is not floating point"
                )));
            }
            let decay = !no_decay(&name);
            flagged.push((name, var, decay));
        }
        let buckets = make_buckets(&flagged, cap)?;
        let mut views: Vec<Option<(Layout, (Tensor, Tensor))>> =
            (0..flagged.len()).map(|_| None).collect();
        for b in &buckets {
            for (k, &i) in b.members.iter().enumerate() {
                let (start, len) = (b.offsets[k], b.offsets[k + 1] - b.offsets[k]);
                let layout = Layout::of(&flagged[i].1);
                let views_of =
                    (layout.view(&b.exp_avg, start, len)?, layout.view(&b.exp_avg_sq, start, len)?);
                views[i] = Some((layout, views_of));
            }
        }
        let params = flagged
            .into_iter()
            .zip(views)
            .map(|((name, var, decay), v)| {
                let (layout, (exp_avg, exp_avg_sq)) = v.expect("every variable is in a bucket");
                Param { name, var, layout, decay, exp_avg, exp_avg_sq, steps: 0 }
            })
            .collect();
        Ok(Self { cfg, params, buckets })
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

    /// Zeroes the gradients (keeps them allocated, like tch's optimizer): one kernel per bucket
    /// whose gradients are views of its buffer.
    pub fn zero_grad(&mut self) {
        let flat = self.flat_grads();
        for (b, g) in self.buckets.iter().zip(flat) {
            match g {
                Some(mut g) => {
                    let _ = g.zero_();
                }
                None => b.members.iter().for_each(|&i| self.params[i].var.zero_grad()),
            }
        }
    }

    /// Global L2 norm of the gradients, clipped to `max_norm` when finite (as
    /// [`super::clip_grad_norm`], over the flat gradient buffers where the gradients are views of them).
    pub fn clip_grad_norm(&self, max_norm: f64) -> Result<GradNorm> {
        if !(max_norm.is_finite() && max_norm > 0.0) {
            return Err(Error::InvalidArgument(format!("max_norm must be > 0, got {max_norm}")));
        }
        let norm = tch::no_grad(|| self.clip_flat(&self.flat_grads(), Some(max_norm)))?;
        Ok(GradNorm { norm, clipped: norm.is_finite() && max_norm / (norm + 1e-6) < 1.0 })
    }

    /// One AdamW update from the current gradients, in place under `no_grad`. Variables that
    /// never had a gradient are left alone, as torch does; note that after a first
    /// [`Self::zero_grad`] a variable keeps a (zero) gradient, like with tch's own optimizer or
    /// torch's `zero_grad(set_to_none=False)`, so weight decay and the moments still move it.
    pub fn step(&mut self) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            let grads = self.bucket_grads()?;
            self.apply(&grads)
        })
    }

    /// Each bucket's gradients as one flat tensor, when all its members have a gradient and the
    /// same step count (always, in a loop that never skips a variable); `None` otherwise (its
    /// members are then updated one by one). The first time, the members' gradients are copied
    /// into a flat buffer and re-pointed at views of it, so that backward accumulates into the
    /// buffer from then on and the flat gradients cost nothing (tch's `zero_grad` zeroes in
    /// place, keeping the views).
    fn bucket_grads(&mut self) -> Result<Vec<Option<Tensor>>> {
        let mut out = self.flat_grads();
        for (b, flat) in self.buckets.iter_mut().zip(out.iter_mut()) {
            if flat.is_some() {
                continue;
            }
            let steps = self.params[b.members[0]].steps;
            let mut grads = Vec::with_capacity(b.members.len());
            for &i in &b.members {
                let p = &self.params[i];
                let g = p.var.grad();
                if !g.defined() || p.steps != steps {
                    break;
                }
                grads.push(g);
            }
            if grads.len() < b.members.len() {
                continue;
            }
            let layouts: Vec<&Layout> = b.members.iter().map(|&i| &self.params[i].layout).collect();
            let parts: Vec<Tensor> =
                grads.iter().zip(&layouts).map(|(g, l)| l.flatten(g)).collect::<Result<_>>()?;
            let buffer = Tensor::f_cat(&parts, 0)?;
            for (k, g) in grads.iter_mut().enumerate() {
                let (start, len) = (b.offsets[k], b.offsets[k + 1] - b.offsets[k]);
                g.set_data(&layouts[k].view(&buffer, start, len)?);
            }
            b.grad = Some(buffer.shallow_clone());
            *flat = Some(buffer);
        }
        Ok(out)
    }

    /// Each bucket's flat gradient buffer where its members' gradients are (still) views of it
    /// and their step counts agree, else `None`.
    fn flat_grads(&self) -> Vec<Option<Tensor>> {
        self.buckets
            .iter()
            .map(|b| {
                let flat = b.grad.as_ref()?;
                let base = flat.data_ptr() as usize;
                let elt = flat.kind().elt_size_in_bytes();
                let steps = self.params[b.members[0]].steps;
                let viewed = b.members.iter().zip(&b.offsets).all(|(&i, &off)| {
                    let p = &self.params[i];
                    let g = p.var.grad();
                    p.steps == steps
                        && g.defined()
                        && g.data_ptr() as usize == base + off as usize * elt
                });
                viewed.then(|| flat.shallow_clone())
            })
            .collect()
    }

    /// The update from `grads` (as [`Self::bucket_grads`] made them, possibly clipped since).
    fn apply(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        let cfg = self.cfg;
        for (b, g) in self.buckets.iter_mut().zip(grads) {
            let Some(g) = g else {
                for &i in &b.members {
                    let p = &mut self.params[i];
                    let grad = p.var.grad();
                    if !grad.defined() {
                        continue;
                    }
                    p.steps += 1;
                    adamw_update(
                        &cfg,
                        p.decay,
                        p.steps,
                        &mut p.var,
                        &grad,
                        &mut p.exp_avg,
                        &mut p.exp_avg_sq,
                    )?;
                }
                continue;
            };
            let step = self.params[b.members[0]].steps + 1;
            // One variable dense in memory is updated through a flat view of itself; several
            // are gathered, updated together and written back.
            let lone = match b.members.as_slice() {
                [i] => {
                    let p = &self.params[*i];
                    p.var.f_permute(p.layout.order.as_slice())?.f_view([-1]).ok()
                }
                _ => None,
            };
            let written_in_place = lone.is_some();
            let mut flat = match lone {
                Some(view) => view,
                None => {
                    let vars: Vec<Tensor> = b
                        .members
                        .iter()
                        .map(|&i| self.params[i].layout.flatten(&self.params[i].var))
                        .collect::<Result<_>>()?;
                    Tensor::f_cat(&vars, 0)?
                }
            };
            adamw_update(&cfg, b.decay, step, &mut flat, g, &mut b.exp_avg, &mut b.exp_avg_sq)?;
            for (k, &i) in b.members.iter().enumerate() {
                let p = &mut self.params[i];
                p.steps = step;
                if !written_in_place {
                    let (start, len) = (b.offsets[k], b.offsets[k + 1] - b.offsets[k]);
                    p.var.f_copy_(&p.layout.view(&flat, start, len)?)?;
                }
            }
        }
        Ok(())
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
        if let Some(m) = max_grad_norm {
            if !(m.is_finite() && m > 0.0) {
                return Err(Error::InvalidArgument(format!("max_norm must be > 0, got {m}")));
            }
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
        tch::no_grad(|| -> Result<StepOutcome> {
            let grads = self.bucket_grads()?;
            let norm = self.clip_flat(&grads, max_grad_norm)?;
            if !norm.is_finite() {
                self.zero_grad();
                return Ok(StepOutcome { loss: value, grad_norm: norm, skipped: true });
            }
            self.apply(&grads)?;
            Ok(StepOutcome { loss: value, grad_norm: norm, skipped: false })
        })
    }

    /// The global gradient norm over the buckets' flat gradients (and the gradients of the
    /// members of other buckets), and, with `max_norm`, all of them scaled by
    /// `min(1, max_norm / (norm + 1e-6))` as torch's `clip_grad_norm_` does. A non-finite norm
    /// leaves them untouched.
    fn clip_flat(&self, grads: &[Option<Tensor>], max_norm: Option<f64>) -> Result<f64> {
        let mut parts: Vec<Tensor> = Vec::new();
        for (b, g) in self.buckets.iter().zip(grads) {
            match g {
                Some(g) => parts.push(g.shallow_clone()),
                None => {
                    for &i in &b.members {
                        let g = self.params[i].var.grad();
                        if g.defined() {
                            parts.push(g);
                        }
                    }
                }
            }
        }
        if parts.is_empty() {
            return Ok(0.0);
        }
        let device = parts[0].device();
        let norms = parts
            .iter()
            .map(|g| Ok(g.f_norm()?.f_to_kind(Kind::Float)?.f_to_device(device)?))
            .collect::<Result<Vec<Tensor>>>()?;
        let total = Tensor::f_stack(&norms, 0)?.f_norm()?;
        let norm = total.f_to_kind(Kind::Double)?.f_double_value(&[])?;
        let Some(max_norm) = max_norm else { return Ok(norm) };
        if !norm.is_finite() || max_norm / (norm + 1e-6) >= 1.0 {
            return Ok(norm);
        }
        let coef = max_norm / (norm + 1e-6);
        for g in &mut parts {
            let _ = g.f_mul_scalar_(coef)?;
        }
        Ok(norm)
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

#[cfg(test)]
mod tests {
    //! The bucketed AdamW, its clipping and the `lerp_` EMA against a plain f64 implementation of
    //! the textbook formulas (torch's `AdamW` and `clip_grad_norm_` documentation, diffusers'
    //! `EMAModel` warmup), one element at a time.
    use super::*;
    use crate::train::{Ema, EmaConfig};
    use tch::Device;

    /// One variable of the reference: values, moments, step count, decay flag, loss coefficients.
    struct Ref {
        w: Vec<f64>,
        m: Vec<f64>,
        v: Vec<f64>,
        steps: i32,
        decay: bool,
        c: Vec<f64>,
        shadow: Vec<f64>,
    }

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&t.to_kind(Kind::Double).contiguous().view([-1])).unwrap()
    }

    /// `n` deterministic values in [-scale, scale) (no draw from libtorch's global generator,
    /// which other tests seed).
    fn pseudo(n: i64, seed: i64, scale: f64) -> Vec<f32> {
        (0..n)
            .map(|j| ((((j * 7919 + seed * 104_729) % 1000) as f64 / 500.0 - 1.0) * scale) as f32)
            .collect()
    }

    /// Variables of several shapes and both decay groups, one channels-last, and `lonely.bias`
    /// that never gets a gradient (its bucket then takes the one-by-one path).
    fn model() -> (VarStore, Vec<(String, Tensor)>) {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let init = tch::nn::Init::Const(0.0);
        for (name, shape) in [
            ("a.weight", vec![3i64, 4]),
            ("a.bias", vec![4]),
            ("conv.weight", vec![2, 3, 3, 3]),
            ("norm.weight", vec![5]),
            ("lonely.bias", vec![7]),
            ("scale", vec![]),
        ] {
            let (module, leaf) = name.rsplit_once('.').unwrap_or(("", name));
            let path = if module.is_empty() { root.clone() } else { &root / module };
            let mut v = path.var(leaf, &shape, init);
            let n = shape.iter().product::<i64>();
            let vals = Tensor::from_slice(&pseudo(n, n, 1.0)).view(shape.as_slice());
            tch::no_grad(|| v.copy_(&vals));
        }
        crate::nn::vars_to_channels_last(&vs).unwrap();
        // Loss coefficients: grad = c + w, large enough for the clip to bite.
        let mut coefs: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .enumerate()
            .map(|(k, (n, t))| {
                let c = Tensor::from_slice(&pseudo(t.numel() as i64, k as i64 + 3, 3.0));
                (n, c.view(t.size().as_slice()))
            })
            .collect();
        coefs.sort_by(|a, b| a.0.cmp(&b.0));
        (vs, coefs)
    }

    fn loss(vs: &VarStore, coefs: &[(String, Tensor)]) -> Tensor {
        let vars = vs.variables();
        let mut total = Tensor::zeros([], (Kind::Float, Device::Cpu));
        for (name, c) in coefs {
            if name == "lonely.bias" {
                continue;
            }
            let w = &vars[name.as_str()];
            total = total + (w * c).sum(Kind::Float) + (w * w).sum(Kind::Float) * 0.5;
        }
        total
    }

    fn run(cap: i64) {
        let (vs, coefs) = model();
        let cfg = AdamWConfig { lr: 0.02, beta1: 0.8, beta2: 0.95, eps: 1e-6, weight_decay: 0.3 };
        let mut opt = AdamW::bucketed(&vs, cfg, default_no_decay, cap).unwrap();
        let mut ema = Ema::new(&vs, EmaConfig { decay: 0.9, warmup: true }).unwrap();
        let vars = vs.variables();
        let mut refs: Vec<Ref> = coefs
            .iter()
            .map(|(name, c)| {
                let w = values(&vars[name.as_str()]);
                Ref {
                    m: vec![0.0; w.len()],
                    v: vec![0.0; w.len()],
                    steps: 0,
                    decay: !default_no_decay(name),
                    c: values(c),
                    shadow: w.clone(),
                    w,
                }
            })
            .collect();
        let names: Vec<String> = coefs.iter().map(|(n, _)| n.clone()).collect();
        let schedule = [(0.02, Some(0.5)), (0.01, Some(0.5)), (0.02, None), (0.005, Some(2.0))];
        for (k, &(lr, clip)) in schedule.iter().enumerate() {
            opt.set_lr(lr).unwrap();
            let out = opt.backward_step(&loss(&vs, &coefs), clip).unwrap();
            assert!(!out.skipped);
            // The reference step.
            let mut grads: Vec<Option<Vec<f64>>> = refs
                .iter()
                .zip(&names)
                .map(|(r, n)| {
                    (n != "lonely.bias").then(|| r.w.iter().zip(&r.c).map(|(w, c)| w + c).collect())
                })
                .collect();
            let norm = grads.iter().flatten().flatten().map(|g| g * g).sum::<f64>().sqrt();
            assert!((out.grad_norm - norm).abs() <= 1e-5 * norm, "norm {}: {norm}", out.grad_norm);
            if let Some(max) = clip {
                let coef = max / (norm + 1e-6);
                if coef < 1.0 {
                    grads.iter_mut().flatten().flatten().for_each(|g| *g *= coef);
                }
            }
            for (r, g) in refs.iter_mut().zip(&grads) {
                let Some(g) = g else { continue };
                r.steps += 1;
                let bc1 = 1.0 - cfg.beta1.powi(r.steps);
                let bc2 = 1.0 - cfg.beta2.powi(r.steps);
                for (j, &gj) in g.iter().enumerate() {
                    if r.decay {
                        r.w[j] *= 1.0 - lr * cfg.weight_decay;
                    }
                    r.m[j] = cfg.beta1 * r.m[j] + (1.0 - cfg.beta1) * gj;
                    r.v[j] = cfg.beta2 * r.v[j] + (1.0 - cfg.beta2) * gj * gj;
                    let (m_hat, v_hat) = (r.m[j] / bc1, r.v[j] / bc2);
                    r.w[j] -= lr * m_hat / (v_hat.sqrt() + cfg.eps);
                }
            }
            let n = k as f64;
            let d = if k == 0 { 0.0 } else { 0.9f64.min((1.0 + n) / (10.0 + n)) };
            ema.update(&vs).unwrap();
            for r in refs.iter_mut() {
                for (s, w) in r.shadow.iter_mut().zip(&r.w) {
                    *s = d * *s + (1.0 - d) * w;
                }
            }
            let state: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
            for (r, name) in refs.iter().zip(&names) {
                let close = |what: &str, got: &Tensor, want: &[f64]| {
                    for (j, (a, b)) in values(got).iter().zip(want).enumerate() {
                        assert!(
                            (a - b).abs() <= 2e-5 * b.abs().max(1.0),
                            "cap {cap}, step {}: {what} {name}[{j}] = {a}, plain AdamW {b}",
                            k + 1
                        );
                    }
                };
                close("weight", &vars[name.as_str()], &r.w);
                close("exp_avg", &state[&format!("exp_avg.{name}")], &r.m);
                close("exp_avg_sq", &state[&format!("exp_avg_sq.{name}")], &r.v);
                close("EMA", ema.get(name).unwrap(), &r.shadow);
                assert_eq!(
                    state[&format!("step.{name}")].int64_value(&[0]),
                    r.steps as i64,
                    "{name}"
                );
            }
        }
        // The conv kernel kept its layout (updated through the bucket, written back).
        assert!(crate::nn::is_channels_last(&vars["conv.weight"]));
    }

    #[test]
    fn bucketed_adamw_clipping_and_ema_match_a_plain_implementation() {
        run(BUCKET_ELEMS);
    }

    #[test]
    fn small_buckets_and_lone_variables_match_too() {
        // 16 elements: most buckets hold one variable, the 54-element kernel is alone in its own.
        run(16);
    }
}
