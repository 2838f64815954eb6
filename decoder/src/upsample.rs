//! The low-res input path of the super-resolution stage: torch's antialiased bicubic resize
//! (`F.interpolate(mode="bicubic", antialias=True, align_corners=False)`), which is what Karlo
//! feeds the upsampler; plain bicubic differs from it by up to 0.36.

use crate::{Error, Result};
use tch::Tensor;

/// Resizes (B, C, H, W) to (B, C, height, width) with antialiased bicubic interpolation.
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
    Ok(x.f_internal_upsample_bicubic2d_aa([height, width], false, None, None)?)
}
