//! Validation pictures: a grid PNG of what the model makes for held-out items (top row: the
//! reference — the held-out image, or the upsampler's input — bottom row: the samples).

use super::{Result, TrainError};
use std::path::Path;
use tch::Tensor;

/// Writes `<dir>/step-<done>.png` from (B, 3, H, W) tensors in [-1, 1].
pub(crate) fn save(
    dir: &Path,
    done: u64,
    reference: Option<&Tensor>,
    samples: &Tensor,
) -> Result<()> {
    let samples = samples.f_to_device(tch::Device::Cpu)?;
    let side = samples.size()[2];
    let mut rows = Vec::new();
    if let Some(r) = reference {
        let r = r.f_to_device(tch::Device::Cpu)?;
        let r = if r.size()[2] != side {
            unclip_decoder::upsample::resize_bicubic_aa(&r, side, side)?
        } else {
            r
        };
        rows.push(r);
    }
    rows.push(samples);
    let images: Vec<_> =
        rows.iter().map(crate::output::to_rgb_images).collect::<crate::Result<_>>()?;
    let cols = images[0].len() as u32;
    let s = side as u32;
    let pad = 2;
    let w = cols * (s + pad) + pad;
    let h = images.len() as u32 * (s + pad) + pad;
    let mut canvas = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    for (r, row) in images.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            image::imageops::replace(
                &mut canvas,
                img,
                (pad + c as u32 * (s + pad)) as i64,
                (pad + r as u32 * (s + pad)) as i64,
            );
        }
    }
    // Small models' pictures are enlarged (nearest neighbour) to at least 64 px per cell.
    let zoom = 64u32.div_ceil(s).max(1);
    let canvas = if zoom > 1 {
        image::imageops::resize(&canvas, w * zoom, h * zoom, image::imageops::FilterType::Nearest)
    } else {
        canvas
    };
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let path = dir.join(format!("step-{done:08}.png"));
    unclip_core::fsutil::atomic_write(&path, |tmp| {
        canvas
            .save_with_format(tmp, image::ImageFormat::Png)
            .map_err(|e| unclip_core::Error::InvalidArgument(format!("{}: {e}", tmp.display())))
    })?;
    println!("validation grid: {}", path.display());
    Ok(())
}
