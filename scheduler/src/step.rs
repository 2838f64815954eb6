//! Checks and helpers every sampler's `step` shares.

use crate::{Error, Result};
use tch::Tensor;

/// What one reverse step produced.
#[derive(Debug)]
pub struct StepOutput {
    /// The sample at the next (less noisy) timestep.
    pub prev_sample: Tensor,
    /// The model's estimate of x0 at this step (after clipping / thresholding), for previews.
    pub pred_original_sample: Tensor,
}

/// Validates `model_output` against `sample` and splits off learned-variance channels.
///
/// The output must have the sample's shape, or (when `learned`) twice its channels (dim 1):
/// then the first half is the prediction and the second the variance channels.
pub(crate) fn split_output(
    model_output: &Tensor,
    sample: &Tensor,
    learned: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (o, s) = (model_output.size(), sample.size());
    if s.len() < 2 {
        return Err(Error::Shape {
            what: "sample must be batched with a channel dimension".into(),
            expected: vec![-1, -1],
            found: s,
        });
    }
    if model_output.device() != sample.device() {
        return Err(Error::InvalidInput(format!(
            "model output on {:?} but sample on {:?}",
            model_output.device(),
            sample.device()
        )));
    }
    let mut doubled = s.clone();
    doubled[1] *= 2;
    if learned {
        if o != doubled {
            return Err(Error::Shape {
                what: "model output with learned variance (2x the sample's channels)".into(),
                expected: doubled,
                found: o,
            });
        }
        let mut it = model_output.f_split_with_sizes([s[1], s[1]], 1)?.into_iter();
        match (it.next(), it.next()) {
            (Some(pred), Some(var)) => Ok((pred, Some(var))),
            _ => Err(Error::Shape {
                what: "model output split into prediction and variance".into(),
                expected: doubled,
                found: model_output.size(),
            }),
        }
    } else if o == s {
        Ok((model_output.shallow_clone(), None))
    } else {
        Err(Error::Shape { what: "model output vs sample".into(), expected: s, found: o })
    }
}

/// What happens to the x0 estimate before it is used: Imagen's dynamic thresholding, or
/// clipping to ±range, or nothing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum X0Clamp {
    None,
    Clip(f64),
    Threshold { ratio: f64, max_value: f64 },
}

impl X0Clamp {
    /// diffusers' precedence: thresholding wins over clip_sample.
    pub(crate) fn new(
        thresholding: bool,
        ratio: f64,
        max_value: f64,
        clip: bool,
        range: f64,
    ) -> Result<Self> {
        if thresholding {
            if !(ratio > 0.0 && ratio <= 1.0) {
                return Err(Error::Config(format!(
                    "dynamic_thresholding_ratio must lie in (0, 1], got {ratio}"
                )));
            }
            if !(max_value.is_finite() && max_value >= 1.0) {
                return Err(Error::Config(format!(
                    "sample_max_value must be a finite number >= 1, got {max_value}"
                )));
            }
            Ok(X0Clamp::Threshold { ratio, max_value })
        } else if clip {
            if !(range.is_finite() && range > 0.0) {
                return Err(Error::Config(format!(
                    "clip_sample_range must be positive, got {range}"
                )));
            }
            Ok(X0Clamp::Clip(range))
        } else {
            Ok(X0Clamp::None)
        }
    }

    pub(crate) fn apply(&self, x0: Tensor) -> Tensor {
        match *self {
            X0Clamp::None => x0,
            X0Clamp::Clip(r) => x0.clamp(-r, r),
            X0Clamp::Threshold { ratio, max_value } => dynamic_threshold(&x0, ratio, max_value),
        }
    }
}

/// Classifier-free guidance on a model output for the batch `[uncond; cond]` (halves along
/// dim 0): `u + scale * (c - u)`. With `channels`, only the first `channels` channels (dim 1)
/// are guided and the conditional half's other channels (a learned variance) are kept, as
/// diffusers' UnCLIPPipeline does.
pub fn classifier_free_guidance(
    model_output: &Tensor,
    scale: f64,
    channels: Option<i64>,
) -> Result<Tensor> {
    let halves = model_output.f_chunk(2, 0)?;
    let (u, c) = (&halves[0], &halves[1]);
    let n = c.size().get(1).copied().unwrap_or(0);
    match channels {
        Some(k) if n > k => {
            let (gu, gc) = (u.f_narrow(1, 0, k)?, c.f_narrow(1, 0, k)?);
            let guided = gu.f_add(&gc.f_sub(&gu)?.f_mul_scalar(scale)?)?;
            Ok(Tensor::f_cat(&[guided, c.f_narrow(1, k, n - k)?], 1)?)
        }
        _ => Ok(u.f_add(&c.f_sub(u)?.f_mul_scalar(scale)?)?),
    }
}

/// Imagen's dynamic thresholding: per sample, s = the `ratio` quantile of |x0| clamped to
/// [1, `max_value`]; x0 is clamped to ±s and divided by s.
pub fn dynamic_threshold(x0: &Tensor, ratio: f64, max_value: f64) -> Tensor {
    let kind = x0.kind();
    let x = if matches!(kind, tch::Kind::Float | tch::Kind::Double) {
        x0.shallow_clone()
    } else {
        x0.to_kind(tch::Kind::Float)
    };
    let shape = x.size();
    let flat = x.reshape([shape[0], -1]);
    let s = flat
        .abs()
        .quantile_scalar(ratio, Some(1), false, "linear")
        .clamp(1.0, max_value)
        .unsqueeze(1);
    let out = flat.clamp_tensor(Some(&(-&s)), Some(&s)) / s;
    out.reshape(&shape).to_kind(kind)
}

/// Index of `t` in `timesteps`, or the error naming it.
pub(crate) fn index_of(timesteps: &[i64], t: i64) -> Result<usize> {
    if timesteps.is_empty() {
        return Err(Error::NotInitialized);
    }
    timesteps.iter().position(|&s| s == t).ok_or(Error::TimestepNotInSchedule(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn guidance_mixes_the_halves_and_keeps_the_conditional_variance() {
        let opts = (Kind::Float, Device::Cpu);
        let u = Tensor::full([1, 4, 2, 2], 1.0, opts);
        let c = Tensor::cat(
            &[Tensor::full([1, 2, 2, 2], 3.0, opts), Tensor::full([1, 2, 2, 2], 7.0, opts)],
            1,
        );
        let out = Tensor::cat(&[&u, &c], 0);
        // Every channel guided: 1 + 2 * (c - 1).
        let all = classifier_free_guidance(&out, 2.0, None).unwrap();
        assert_eq!(all.size(), [1, 4, 2, 2]);
        assert_eq!(all.narrow(1, 0, 2).mean(Kind::Float).double_value(&[]), 5.0);
        assert_eq!(all.narrow(1, 2, 2).mean(Kind::Float).double_value(&[]), 13.0);
        // Two guided channels; the variance channels are the conditional half's.
        let eps = classifier_free_guidance(&out, 2.0, Some(2)).unwrap();
        assert_eq!(eps.narrow(1, 0, 2).mean(Kind::Float).double_value(&[]), 5.0);
        assert_eq!(eps.narrow(1, 2, 2).mean(Kind::Float).double_value(&[]), 7.0);
        // Scale 1 is the conditional output.
        assert!(classifier_free_guidance(&out, 1.0, Some(2)).unwrap().equal(&c));
    }

    #[test]
    fn split_checks_shapes() {
        let x = Tensor::zeros([2, 3, 4, 4], (Kind::Float, Device::Cpu));
        let o = Tensor::zeros([2, 6, 4, 4], (Kind::Float, Device::Cpu));
        let (p, v) = split_output(&o, &x, true).unwrap();
        assert_eq!(p.size(), x.size());
        assert_eq!(v.unwrap().size(), x.size());
        assert!(matches!(split_output(&o, &x, false), Err(Error::Shape { .. })));
        assert!(matches!(split_output(&x, &x, true), Err(Error::Shape { .. })));
        let flat = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        assert!(split_output(&flat, &flat, false).is_err());
        assert!(matches!(index_of(&[], 3), Err(Error::NotInitialized)));
        assert!(matches!(index_of(&[5, 3], 4), Err(Error::TimestepNotInSchedule(4))));
    }
}
