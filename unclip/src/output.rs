//! Generated images as `image::RgbImage`s, `ndarray` arrays and PNG files. 8-bit conversion is
//! diffusers' `(x * 255).round()` with numpy's rounding (half to even).

use crate::{Error, Result};
use image::RgbImage;
use ndarray::Array4;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// One value in [0, 1] to 8 bits as numpy rounds `x * 255` (ties to even), in float32.
pub fn quantize(v: f32) -> u8 {
    round_u8(v * 255.0f32)
}

fn round_u8(x: f32) -> u8 {
    x.round_ties_even().clamp(0.0, 255.0) as u8
}

fn check(images: &Tensor) -> Result<(usize, usize, usize)> {
    match images.size().as_slice() {
        &[b, 3, h, w] => Ok((b as usize, h as usize, w as usize)),
        s => Err(Error::Input(format!("images must be (B, 3, H, W), got {s:?}"))),
    }
}

/// (B, H, W, 3) float32 values of (B, 3, H, W) images (diffusers' `output_type="np"`).
pub fn to_ndarray(images: &Tensor) -> Result<Array4<f32>> {
    let (b, h, w) = check(images)?;
    let nhwc = images
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_permute([0, 2, 3, 1])?
        .f_contiguous()?;
    let data = Vec::<f32>::try_from(nhwc.f_flatten(0, -1)?)?;
    Array4::from_shape_vec((b, h, w, 3), data)
        .map_err(|e| Error::Pipeline(format!("array shape: {e}")))
}

/// 8-bit RGB images of (B, 3, H, W) tensors with values in [0, 1].
pub fn to_rgb_images(images: &Tensor) -> Result<Vec<RgbImage>> {
    let arr = to_ndarray(images)?;
    let (b, h, w, _) = arr.dim();
    (0..b)
        .map(|i| {
            let px: Vec<u8> =
                arr.index_axis(ndarray::Axis(0), i).iter().map(|&v| quantize(v)).collect();
            RgbImage::from_raw(w as u32, h as u32, px)
                .ok_or_else(|| Error::Pipeline("image buffer size".into()))
        })
        .collect()
}

/// Saves each image as `dir/{prefix}{index}.png` (creating `dir`); returns the paths.
pub fn save_pngs(images: &Tensor, dir: &Path, prefix: &str) -> Result<Vec<PathBuf>> {
    save_pngs_from(images, dir, prefix, 0)
}

/// [`save_pngs`] numbering from `first` (the chunks of [`crate::Unclip::text_to_image_chunked`]
/// written as they come: `image-0..7`, then `image-8..15`...).
pub fn save_pngs_from(
    images: &Tensor,
    dir: &Path,
    prefix: &str,
    first: usize,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| unclip_core::Error::io(dir, e))?;
    let mut paths = Vec::new();
    for (i, img) in to_rgb_images(images)?.iter().enumerate() {
        let path = dir.join(format!("{prefix}{}.png", first + i));
        write_image(img, &path)?;
        paths.push(path);
    }
    Ok(paths)
}

fn write_image(img: &RgbImage, path: &Path) -> Result<()> {
    img.save(path)
        .map_err(|e| Error::Image { path: path.display().to_string(), reason: e.to_string() })
}

/// Tiles (B, 3, H, W) images in [0, 1] into one PNG, `columns` per row, row-major, separated by
/// a 2-pixel white gap (e.g. the README's sample grid).
pub fn save_grid(images: &Tensor, path: &Path, columns: usize) -> Result<()> {
    let tiles = to_rgb_images(images)?;
    if tiles.is_empty() || columns == 0 {
        return Err(Error::Input("a grid needs at least one image and one column".into()));
    }
    let (w, h) = tiles[0].dimensions();
    let cols = columns.min(tiles.len()) as u32;
    let rows = tiles.len().div_ceil(columns) as u32;
    let gap = 2;
    let mut grid = RgbImage::from_pixel(
        cols * w + (cols - 1) * gap,
        rows * h + (rows - 1) * gap,
        image::Rgb([255, 255, 255]),
    );
    for (i, tile) in tiles.iter().enumerate() {
        let (c, r) = (i as u32 % cols, i as u32 / cols);
        image::imageops::replace(&mut grid, tile, (c * (w + gap)) as i64, (r * (h + gap)) as i64);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| unclip_core::Error::io(dir, e))?;
    }
    write_image(&grid, path)
}

/// Reads an image file (any format the `image` crate decodes), with a clear error.
pub fn open_image(path: &Path) -> Result<image::DynamicImage> {
    unclip_clip::preprocess::read_image(path).map_err(|e| {
        let shown = path.display().to_string();
        let reason = match e {
            unclip_clip::Error::Image(m) => {
                m.strip_prefix(&format!("{shown}: ")).unwrap_or(&m).to_string()
            }
            unclip_clip::Error::Core(unclip_core::Error::Io { source, .. }) => source.to_string(),
            unclip_clip::Error::Core(unclip_core::Error::NotRegular { found, .. }) => found,
            e => e.to_string(),
        };
        Error::Image { path: shown, reason }
    })
}

/// (1, 3, H, W) float32 in [0, 1] of a decoded image.
pub fn image_to_tensor(img: &image::DynamicImage) -> Result<Tensor> {
    let rgb = img.to_rgb8();
    let (w, h) = (rgb.width() as i64, rgb.height() as i64);
    Ok(Tensor::f_from_slice(rgb.as_raw())?
        .f_view([h, w, 3])?
        .f_permute([2, 0, 1])?
        .f_to_kind(Kind::Float)?
        .f_div_scalar(255.0)?
        .f_unsqueeze(0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_tiles_row_major_with_gaps() {
        // Five 2x3 (h x w) images of gray levels 0.0, 0.25, .. 1.0, three per row.
        let levels = Tensor::from_slice(&[0.0f32, 0.25, 0.5, 0.75, 1.0]).view([5, 1, 1, 1]);
        let images = levels.expand([5, 3, 2, 3], false);
        let path = std::env::temp_dir().join(format!("unclip-grid-{}.png", std::process::id()));
        save_grid(&images, &path, 3).unwrap();
        let grid = image::open(&path).unwrap().to_rgb8();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(grid.dimensions(), (3 * 3 + 2 * 2, 2 * 2 + 2));
        let at = |x: u32, y: u32| grid.get_pixel(x, y).0[0];
        assert_eq!((at(0, 0), at(5, 0), at(10, 1)), (0, 64, 128)); // first row
        assert_eq!((at(0, 4), at(5, 5)), (191, 255)); // second row
        assert_eq!((at(3, 0), at(0, 2), at(12, 5)), (255, 255, 255)); // gaps and the empty cell
        assert!(save_grid(&images, &path, 0).is_err());
    }

    #[test]
    fn rounds_half_to_even() {
        assert_eq!(round_u8(0.5), 0);
        assert_eq!(round_u8(1.5), 2);
        assert_eq!(round_u8(2.5), 2);
        assert_eq!(round_u8(3.5), 4);
        assert_eq!(quantize(1.0), 255);
        assert_eq!(quantize(-0.1), 0);
    }

    #[test]
    fn layouts_agree() {
        let t = Tensor::rand([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        let arr = to_ndarray(&t).unwrap();
        let imgs = to_rgb_images(&t).unwrap();
        let v = t.double_value(&[1, 2, 3, 4]) as f32;
        assert_eq!(arr[[1, 3, 4, 2]], v);
        assert_eq!(imgs[1].get_pixel(4, 3)[2], quantize(v));
        assert!(to_ndarray(&Tensor::zeros([2, 4, 4], (Kind::Float, Device::Cpu))).is_err());
    }
}
