//! Converting between images and the `[-1, 1]` float tensors the diffusion
//! models train on and sample (the pipeline's `[0, 1]` outputs are converted
//! by the crate's `output` module instead).

use image::RgbImage;
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// An image as a `[3, H, W]` float tensor on the CPU, scaled to `[-1, 1]`.
pub fn to_signed_tensor(img: &RgbImage) -> Result<Tensor> {
    let (w, h) = (i64::from(img.width()), i64::from(img.height()));
    let t = Tensor::f_from_slice(img.as_raw())?
        .f_view([h, w, 3])?
        .f_permute([2, 0, 1])?
        .f_to_kind(Kind::Float)?;
    Ok(t.f_div_scalar(127.5)?.f_sub_scalar(1.0)?)
}

/// A `[3, H, W]` or `[1, 3, H, W]` tensor in `[-1, 1]` (any device, any
/// float kind) as an image; values outside the range are clamped.
pub fn from_signed_tensor(t: &Tensor) -> Result<RgbImage> {
    let size = t.size();
    let t = match size.as_slice() {
        [3, _, _] => t.shallow_clone(),
        [1, 3, _, _] => t.f_squeeze_dim(0)?,
        _ => return Err(Error::Input(format!("expected a [3, H, W] image tensor, got {size:?}"))),
    };
    if !t.is_floating_point() {
        return Err(Error::Input(format!("expected a float image tensor, got {:?}", t.kind())));
    }
    let (h, w) = (t.size()[1], t.size()[2]);
    let bytes = t
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_clamp(-1.0, 1.0)?
        .f_add_scalar(1.0)?
        .f_mul_scalar(127.5)?
        .f_round()?
        .f_to_kind(Kind::Uint8)?
        .f_permute([1, 2, 0])?
        .f_contiguous()?
        .f_view([-1])?;
    let raw = Vec::<u8>::try_from(&bytes)?;
    let (w, h) = (u32::try_from(w), u32::try_from(h));
    match (w, h) {
        (Ok(w), Ok(h)) => RgbImage::from_raw(w, h, raw)
            .ok_or_else(|| Error::Input("image tensor size mismatch".into())),
        _ => Err(Error::Input("image tensor too large".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapes::{SceneGenerator, Split, render};

    #[test]
    fn round_trip_is_exact() {
        let img = render(&SceneGenerator::new(Split::Train, 4).scene(0), 32);
        let t = to_signed_tensor(&img).unwrap();
        assert_eq!(t.size(), [3, 32, 32]);
        assert!(t.min().double_value(&[]) >= -1.0 && t.max().double_value(&[]) <= 1.0);
        assert_eq!(from_signed_tensor(&t).unwrap(), img);
        assert_eq!(from_signed_tensor(&t.unsqueeze(0)).unwrap(), img);
        assert!(from_signed_tensor(&t.unsqueeze(0).repeat([2, 1, 1, 1])).is_err());
        assert!(from_signed_tensor(&Tensor::zeros([3, 4, 4], (Kind::Int64, Device::Cpu))).is_err());
    }
}
