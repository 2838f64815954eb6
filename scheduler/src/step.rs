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
        let parts = model_output.split_with_sizes([s[1], s[1]], 1);
        let mut it = parts.into_iter();
        let pred = it.next().expect("two parts");
        let var = it.next().expect("two parts");
        Ok((pred, Some(var)))
    } else if o == s {
        Ok((model_output.shallow_clone(), None))
    } else {
        Err(Error::Shape { what: "model output vs sample".into(), expected: s, found: o })
    }
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
