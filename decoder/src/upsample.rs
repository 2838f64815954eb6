//! The low-res input path of the super-resolution stage: torch's antialiased bicubic resize
//! (`F.interpolate(mode="bicubic", antialias=True, align_corners=False)`), which is what Karlo
//! feeds the upsampler; plain bicubic differs from it by up to 0.36.

use crate::{Error, Result};
use tch::{Kind, Tensor};

/// Resizes (B, C, H, W) to (B, C, height, width) with antialiased bicubic interpolation.
/// f16 and bf16 inputs are resized in f32 and cast back: libtorch's CPU kernel exists for f32
/// and f64 only ("not implemented for 'BFloat16'"), and the image is small next to the UNet.
pub fn resize_bicubic_aa(x: &Tensor, height: i64, width: i64) -> Result<Tensor> {
    let size = x.size();
    if size.len() != 4 || size.contains(&0) {
        return Err(Error::Input(format!(
            "resize input must be a non-empty (B, C, H, W), got {size:?}"
        )));
    }
    if height <= 0 || width <= 0 {
        return Err(Error::Input(format!("resize target {height}x{width} must be positive")));
    }
    if !x.is_floating_point() {
        return Err(Error::Input(format!(
            "resize input must be floating point, got {:?}",
            x.kind()
        )));
    }
    let kind = x.kind();
    if matches!(kind, Kind::Half | Kind::BFloat16) {
        let y = resize_bicubic_aa(&x.f_to_kind(Kind::Float)?, height, width)?;
        return Ok(y.f_to_kind(kind)?);
    }
    Ok(x.f_internal_upsample_bicubic2d_aa([height, width], false, None, None)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduced_precision_resizes_like_f32_rounded() {
        let x = Tensor::rand([1, 3, 8, 6], (Kind::Float, tch::Device::Cpu));
        let want = resize_bicubic_aa(&x, 16, 12).unwrap();
        for kind in [Kind::Half, Kind::BFloat16] {
            let got = resize_bicubic_aa(&x.to_kind(kind), 16, 12).unwrap();
            assert_eq!(got.kind(), kind);
            let err = (got.to_kind(Kind::Float) - &want).abs().max().double_value(&[]);
            assert!(err < 2e-2, "{kind:?}: {err}");
        }
    }
}
