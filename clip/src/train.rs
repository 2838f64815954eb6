//! Contrastive training (CLIP's objective): an N x N image-text logit matrix, symmetric
//! cross-entropy with the matching pairs on the diagonal, a learned temperature clamped to
//! `logit_scale <= ln 100` as in CLIP, and one optimizer step any training loop can call.

use crate::model::ClipModel;
use crate::{Error, Result};
use tch::{Kind, Tensor, nn, nn::OptimizerConfig};

/// CLIP's cap on the learned log temperature: logits are scaled by at most 100.
pub const MAX_LOGIT_SCALE: f64 = 4.605_170_185_988_092; // ln(100)

/// Symmetric cross-entropy of (N, N + M) logits whose row i / column i pair is the positive.
/// The M columns past N are images without a caption of their own (hard negatives, NegCLIP's
/// image side): every caption is scored against them, but they have no row to be matched to,
/// so the image-to-caption half runs over the first N columns only. M = 0 is CLIP's loss.
pub fn contrastive_loss(logits_per_text: &Tensor) -> Result<Tensor> {
    let size = logits_per_text.size();
    if size.len() != 2 || size[1] < size[0] || size[0] < 2 {
        return Err(Error::Input(format!(
            "contrastive loss needs (N, N + M) logits with N >= 2 pairs and M >= 0 extra \
             images, got {size:?}"
        )));
    }
    let n = size[0];
    let targets = Tensor::f_arange(n, (Kind::Int64, logits_per_text.device()))?;
    let logits = logits_per_text.f_to_kind(Kind::Float)?;
    let ce = |l: &Tensor| {
        l.f_cross_entropy_loss::<Tensor>(&targets, None, tch::Reduction::Mean, -100, 0.0)
    };
    let text_loss = ce(&logits)?;
    let image_loss = ce(&logits.f_narrow(1, 0, n)?.f_tr()?)?;
    Ok(text_loss.f_add(&image_loss)?.f_div_scalar(2.0)?)
}

/// Optimizer settings of [`ClipTrainer`].
#[derive(Debug, Clone, Copy)]
pub struct TrainConfig {
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Gradient-norm clip (none when `None`).
    pub max_grad_norm: Option<f64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self { learning_rate: 1e-4, weight_decay: 0.1, max_grad_norm: Some(1.0) }
    }
}

/// AdamW over all of a model's variables, with CLIP's temperature clamp after each step.
pub struct ClipTrainer {
    opt: nn::Optimizer,
    cfg: TrainConfig,
}

impl std::fmt::Debug for ClipTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTrainer").field("cfg", &self.cfg).finish()
    }
}

impl ClipTrainer {
    /// Needs a model with both towers and `logit_scale` (a `CLIPModel` config).
    pub fn new(model: &ClipModel, cfg: TrainConfig) -> Result<Self> {
        model.text()?;
        model.vision()?;
        model.logit_scale()?;
        let finite_pos = |v: f64| v.is_finite() && v > 0.0;
        if !finite_pos(cfg.learning_rate) || !cfg.weight_decay.is_finite() || cfg.weight_decay < 0.0
        {
            return Err(Error::Input(format!("invalid training settings {cfg:?}")));
        }
        if let Some(g) = cfg.max_grad_norm {
            if !finite_pos(g) {
                return Err(Error::Input(format!("max_grad_norm must be positive, got {g}")));
            }
        }
        let adam = nn::AdamW { wd: cfg.weight_decay, ..Default::default() };
        let opt = adam.build(model.var_store(), cfg.learning_rate)?;
        Ok(Self { opt, cfg })
    }

    /// One step on a batch of N matching (caption, image) pairs; returns the loss before the step.
    pub fn step(
        &mut self,
        model: &ClipModel,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        pixel_values: &Tensor,
    ) -> Result<f64> {
        let (nt, ni) = (input_ids.size().first().copied(), pixel_values.size().first().copied());
        if nt != ni {
            return Err(Error::Input(format!(
                "{nt:?} captions for {ni:?} images: pairs must match"
            )));
        }
        let out = model.forward(input_ids, attention_mask, pixel_values)?;
        let loss = contrastive_loss(&out.logits_per_text)?;
        let value = loss.f_double_value(&[])?;
        if !value.is_finite() {
            return Err(Error::Input(format!(
                "loss is {value}: diverged (lower the learning rate?)"
            )));
        }
        self.opt.zero_grad();
        loss.f_backward()?;
        if let Some(g) = self.cfg.max_grad_norm {
            self.opt.clip_grad_norm(g);
        }
        self.opt.step();
        tch::no_grad(|| -> Result<()> {
            let mut s = model.logit_scale()?.shallow_clone();
            let _ = s.f_clamp_(0.0, MAX_LOGIT_SCALE)?;
            Ok(())
        })?;
        Ok(value)
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.opt.set_lr(lr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_matches_definition() {
        let logits = Tensor::from_slice(&[2.0f32, 0.5, -1.0, 1.0]).view([2, 2]);
        let loss = contrastive_loss(&logits).unwrap().double_value(&[]);
        // rows: -log softmax([2, .5])[0], -log softmax([-1, 1])[1]; columns: [2, -1][0], [.5, 1][1].
        let nll = |a: f64, b: f64| -(a.exp() / (a.exp() + b.exp())).ln();
        let expected =
            ((nll(2.0, 0.5) + nll(1.0, -1.0)) / 2.0 + (nll(2.0, -1.0) + nll(1.0, 0.5)) / 2.0) / 2.0;
        assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
        assert!(contrastive_loss(&Tensor::zeros([3, 2], (Kind::Float, tch::Device::Cpu))).is_err());
        assert!(contrastive_loss(&Tensor::zeros([1, 1], (Kind::Float, tch::Device::Cpu))).is_err());
    }

    /// A third column is an image with no caption: it joins each caption's softmax and is no
    /// row's target; the image-to-caption half ignores it.
    #[test]
    fn extra_columns_are_negatives_for_captions_only() {
        let logits = Tensor::from_slice(&[2.0f32, 0.5, 1.5, -1.0, 1.0, 0.0]).view([2, 3]);
        let loss = contrastive_loss(&logits).unwrap().double_value(&[]);
        let nll = |x: &[f64], i: usize| -(x[i].exp() / x.iter().map(|v| v.exp()).sum::<f64>()).ln();
        let text = (nll(&[2.0, 0.5, 1.5], 0) + nll(&[-1.0, 1.0, 0.0], 1)) / 2.0;
        let image = (nll(&[2.0, -1.0], 0) + nll(&[0.5, 1.0], 1)) / 2.0;
        assert!((loss - (text + image) / 2.0).abs() < 1e-6, "{loss}");
        // A negative the captions prefer raises the loss; a square matrix is CLIP's loss.
        let worse = Tensor::from_slice(&[2.0f32, 0.5, 3.0, -1.0, 1.0, 0.0]).view([2, 3]);
        assert!(contrastive_loss(&worse).unwrap().double_value(&[]) > loss);
        let square = contrastive_loss(&logits.narrow(1, 0, 2)).unwrap().double_value(&[]);
        assert!(square < loss);
    }
}
