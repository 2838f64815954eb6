//! Exponential moving average of a model's weights: the weights that get shipped, since they are
//! smoother than the last optimizer step's (diffusion models sample markedly better from them).

use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;
use tch::{Kind, Tensor, nn::VarStore};

/// EMA settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EmaConfig {
    /// The decay in the long run, e.g. 0.9999.
    pub decay: f64,
    /// Ramp the decay up like diffusers' `EMAModel` (`min(decay, (1 + n) / (10 + n))` at update
    /// `n + 1`, and a plain copy at the first update), so early random weights fade out quickly.
    pub warmup: bool,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self { decay: 0.9999, warmup: true }
    }
}

/// Shadow copies of every variable of a `VarStore`, under the same names. Trainable variables
/// are averaged (in f32 for f16 / bf16 models); the others (buffers such as CLIP statistics)
/// are copied as they are.
pub struct Ema {
    cfg: EmaConfig,
    /// (name, shadow, averaged?) sorted by name.
    shadow: Vec<(String, Tensor, bool)>,
    updates: u64,
}

impl std::fmt::Debug for Ema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ema")
            .field("cfg", &self.cfg)
            .field("vars", &self.shadow.len())
            .field("updates", &self.updates)
            .finish()
    }
}

impl Ema {
    /// Starts from a copy of the current weights of `vs`.
    pub fn new(vs: &VarStore, cfg: EmaConfig) -> Result<Self> {
        if !(cfg.decay.is_finite() && (0.0..=1.0).contains(&cfg.decay)) {
            return Err(Error::InvalidArgument(format!(
                "EMA decay must be in [0, 1], got {}",
                cfg.decay
            )));
        }
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let shadow = tch::no_grad(|| {
            vars.into_iter()
                .map(|(n, t)| {
                    let avg = t.requires_grad() && t.is_floating_point();
                    // A half-precision shadow would round away updates of (1 - 0.9999) * delta.
                    let kind = match t.kind() {
                        Kind::Half | Kind::BFloat16 if avg => Kind::Float,
                        k => k,
                    };
                    let mut s = t.f_zeros_like()?.f_to_kind(kind)?;
                    s.f_copy_(&t)?;
                    Ok((n, s, avg))
                })
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(Self { cfg, shadow, updates: 0 })
    }

    pub fn config(&self) -> &EmaConfig {
        &self.cfg
    }

    /// Updates applied so far (saved in checkpoints: the warmup depends on it).
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// The decay the next [`Self::update`] will use.
    pub fn next_decay(&self) -> f64 {
        if !self.cfg.warmup {
            return self.cfg.decay;
        }
        let n = self.updates as f64;
        if self.updates == 0 { 0.0 } else { self.cfg.decay.min((1.0 + n) / (10.0 + n)) }
    }

    fn check_same_vars(&self, vars: &HashMap<String, Tensor>, what: &str) -> Result<()> {
        if vars.len() != self.shadow.len() {
            return Err(Error::InvalidArgument(format!(
                "{what} has {} variables, the EMA {}",
                vars.len(),
                self.shadow.len()
            )));
        }
        for (name, s, _) in &self.shadow {
            match vars.get(name) {
                None => {
                    return Err(Error::InvalidArgument(format!("{what} lacks variable {name}")));
                }
                Some(v) if v.size() != s.size() => {
                    return Err(Error::InvalidArgument(format!(
                        "{what}: {name} has shape {:?}, the EMA {:?}",
                        v.size(),
                        s.size()
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Moves the shadow toward the current weights of `vs` (the model the EMA was made from):
    /// `shadow += (1 - decay) * (weight - shadow)`, one `lerp_` kernel per variable.
    pub fn update(&mut self, vs: &VarStore) -> Result<()> {
        let vars = vs.variables();
        self.check_same_vars(&vars, "the model")?;
        let one_minus = 1.0 - self.next_decay();
        tch::no_grad(|| -> Result<()> {
            for (name, s, avg) in &mut self.shadow {
                let w = &vars[name.as_str()];
                if *avg {
                    if w.kind() == s.kind() {
                        let _ = s.f_lerp_(w, one_minus)?;
                    } else {
                        let _ = s.f_lerp_(&w.f_to_kind(s.kind())?, one_minus)?;
                    }
                } else {
                    s.f_copy_(w)?;
                }
            }
            Ok(())
        })?;
        self.updates += 1;
        Ok(())
    }

    /// Copies the averaged weights into `vs` (e.g. before evaluating or exporting).
    pub fn copy_to(&self, vs: &VarStore) -> Result<()> {
        let vars = vs.variables();
        self.check_same_vars(&vars, "the target model")?;
        tch::no_grad(|| -> Result<()> {
            for (name, s, _) in &self.shadow {
                let mut v = vars[name.as_str()].shallow_clone();
                v.f_copy_(s)?;
            }
            Ok(())
        })
    }

    /// The shadow weight of `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.shadow.iter().find(|(n, _, _)| n == name).map(|(_, t, _)| t)
    }

    /// The averaged weights under the model's own names, on the CPU, optionally cast to `kind`.
    pub fn tensors(&self, kind: Option<Kind>) -> Result<Vec<(String, Tensor)>> {
        self.shadow
            .iter()
            .map(|(n, t, _)| {
                let t = t.f_to_device(tch::Device::Cpu)?;
                let t = match kind {
                    Some(k) if t.is_floating_point() => t.f_to_kind(k)?,
                    _ => t,
                };
                Ok((n.clone(), t.f_contiguous()?))
            })
            .collect()
    }

    /// Writes the averaged weights as a safetensors file with the model's tensor names,
    /// atomically: the file loads into the model with [`crate::weights::load_file`], so the
    /// shipped model can be the EMA.
    pub fn save(&self, path: &Path, kind: Option<Kind>) -> Result<()> {
        let named = self.tensors(kind)?;
        crate::fsutil::atomic_write(path, |tmp| Ok(Tensor::write_safetensors(&named, tmp)?))
    }

    /// Restores the shadow from a file written by [`Self::save`] and the update count (from the
    /// checkpoint manifest). Checks names and shapes first; nothing changes on an error.
    pub fn load(&mut self, path: &Path, updates: u64) -> Result<()> {
        let tensors = crate::weights::read_tensors(path)?;
        let source = path.display().to_string();
        self.check_same_vars(&tensors, &source)
            .map_err(|e| Error::Checkpoint { path: source.clone(), message: e.to_string() })?;
        tch::no_grad(|| -> Result<()> {
            for (name, s, _) in &mut self.shadow {
                s.f_copy_(&tensors[name.as_str()])?;
            }
            Ok(())
        })?;
        self.updates = updates;
        Ok(())
    }
}
