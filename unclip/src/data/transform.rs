//! Image transforms a stage's batch needs: decode, square crop (center or random) resized to the
//! stage's resolution, an optional horizontal flip, and conversion to tensors in `[-1, 1]` or
//! CLIP-normalized. Resizing is Pillow's antialiased bicubic (the CLIP preprocessor's resampler),
//! so a model sees the pixels a PIL-based Python pipeline would give it.

use image::ImageReader;
use tch::Tensor;
use unclip_clip::preprocess::{CLIP_MEAN, CLIP_STD, Filter, Rgb8, resize};

use super::{DataError, DataResult, ImageData};

/// Where the square is cut from a non-square image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Crop {
    /// The middle square.
    #[default]
    Center,
    /// A square at a position drawn from `(seed, step, index)` (reproducible).
    Random,
}

/// How images become a stage's input: shortest side resized to `resolution`, cropped square.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transform {
    /// Output side (square).
    pub resolution: u32,
    pub crop: Crop,
    /// Flip half of the images left-right. Off by default: it turns "left of" in a caption
    /// into a lie.
    pub hflip: bool,
}

impl Transform {
    /// Center crop to `resolution`, no flip.
    pub fn new(resolution: u32) -> Transform {
        Transform { resolution, crop: Crop::Center, hflip: false }
    }

    /// The square crop of `img` resized to the resolution (and maybe flipped); `draw` is the
    /// item's random number (used by a random crop and the flip).
    pub fn apply(&self, img: &Rgb8, draw: u64) -> DataResult<Rgb8> {
        let square = self.crop_square(img, draw);
        let r = self.resolution as usize;
        let mut out = if square.width == r && square.height == r {
            square
        } else {
            resize(&square, r, r, Filter::Bicubic).map_err(clip_err)?
        };
        if self.flips(draw) {
            flip_horizontal(&mut out);
        }
        Ok(out)
    }

    /// Whether the item with this draw is flipped (the top bit: independent of the crop's low
    /// bits).
    pub fn flips(&self, draw: u64) -> bool {
        self.hflip && (draw >> 63) == 1
    }

    /// The largest square of `img`, centered or at a position drawn from `draw`.
    pub fn crop_square(&self, img: &Rgb8, draw: u64) -> Rgb8 {
        let side = img.width.min(img.height);
        let slack = img.width.max(img.height) - side;
        let offset = match self.crop {
            Crop::Center => slack / 2,
            // Multiply-shift onto 0..=slack from the low 32 bits.
            Crop::Random => (((draw & 0xFFFF_FFFF) * (slack as u64 + 1)) >> 32) as usize,
        };
        let (left, top) = if img.width > img.height { (offset, 0) } else { (0, offset) };
        crop(img, left, top, side, side)
    }
}

fn clip_err(e: unclip_clip::Error) -> DataError {
    DataError::InvalidArgument(e.to_string())
}

/// A `w` x `h` window of `img` at (`left`, `top`) (inside the image by construction).
fn crop(img: &Rgb8, left: usize, top: usize, w: usize, h: usize) -> Rgb8 {
    if left == 0 && top == 0 && w == img.width && h == img.height {
        return img.clone();
    }
    let mut data = Vec::with_capacity(w * h * 3);
    for y in top..top + h {
        let row = (y * img.width + left) * 3;
        data.extend_from_slice(&img.data[row..row + w * 3]);
    }
    Rgb8 { width: w, height: h, data }
}

pub(crate) fn flip_horizontal(img: &mut Rgb8) {
    let w = img.width;
    for row in img.data.chunks_exact_mut(w * 3) {
        for x in 0..w / 2 {
            for c in 0..3 {
                row.swap(x * 3 + c, (w - 1 - x) * 3 + c);
            }
        }
    }
}

/// Images larger than this many pixels are refused before decoding (a corrupt or hostile header
/// must not allocate gigabytes).
const MAX_PIXELS: u64 = 64 * 1024 * 1024;

/// Decodes an item's image to 8-bit RGB (alpha composited onto white, as CLIP's preprocessor
/// does); an undecodable or oversized image is a bad item named by `key` and `shard`.
pub fn decode_image(
    data: &ImageData,
    key: &str,
    shard: Option<&std::path::Path>,
) -> DataResult<Rgb8> {
    let bad = |reason: String| DataError::bad(key, shard, reason);
    match data {
        ImageData::Decoded(img) => {
            if img.width() == 0 || img.height() == 0 {
                return Err(bad("image has no pixels".into()));
            }
            Ok(Rgb8 {
                width: img.width() as usize,
                height: img.height() as usize,
                data: img.as_raw().clone(),
            })
        }
        ImageData::Encoded(bytes) => {
            let reader = ImageReader::new(std::io::Cursor::new(bytes))
                .with_guessed_format()
                .map_err(|e| bad(format!("cannot read image: {e}")))?;
            let (w, h) =
                reader.into_dimensions().map_err(|e| bad(format!("undecodable image: {e}")))?;
            if w == 0 || h == 0 || u64::from(w) * u64::from(h) > MAX_PIXELS {
                return Err(bad(format!("image is {w}x{h}: expected 1 to {MAX_PIXELS} pixels")));
            }
            let img = ImageReader::new(std::io::Cursor::new(bytes))
                .with_guessed_format()
                .map_err(|e| bad(format!("cannot read image: {e}")))?
                .decode()
                .map_err(|e| bad(format!("undecodable image: {e}")))?;
            Rgb8::from_image(&img).map_err(|e| bad(e.to_string()))
        }
    }
}

/// Square images of one size as a `(B, 3, R, R)` f32 tensor in `[-1, 1]`.
pub(crate) fn to_signed_batch(imgs: &[Rgb8]) -> DataResult<Tensor> {
    to_planar_batch(imgs, |_, v| f32::from(v) / 127.5 - 1.0)
}

/// Square images of one size as a `(B, 3, C, C)` f32 tensor normalized with CLIP's mean and std.
pub(crate) fn to_clip_batch(imgs: &[Rgb8]) -> DataResult<Tensor> {
    let mean = CLIP_MEAN.map(|v| v as f32);
    let std = CLIP_STD.map(|v| v as f32);
    to_planar_batch(imgs, |c, v| (f32::from(v) / 255.0 - mean[c]) / std[c])
}

/// `(B, 3, H, W)` f32 from interleaved RGB, each value mapped by `f(channel, value)`. Computed
/// here rather than with libtorch ops: loader threads calling libtorch would each start its
/// OpenMP team and compete with the training step's for the cores.
fn to_planar_batch(imgs: &[Rgb8], f: impl Fn(usize, u8) -> f32) -> DataResult<Tensor> {
    let first =
        imgs.first().ok_or_else(|| DataError::InvalidArgument("empty image batch".into()))?;
    let (w, h) = (first.width, first.height);
    let plane = w * h;
    let mut out = vec![0f32; imgs.len() * 3 * plane];
    for (img, dst) in imgs.iter().zip(out.chunks_exact_mut(3 * plane)) {
        if (img.width, img.height) != (w, h) {
            return Err(DataError::InvalidArgument(format!(
                "images of one batch differ in size: {}x{} and {w}x{h}",
                img.width, img.height
            )));
        }
        for (p, px) in img.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                dst[c * plane + p] = f(c, px[c]);
            }
        }
    }
    Ok(Tensor::f_from_slice(&out)?.f_view([imgs.len() as i64, 3, h as i64, w as i64])?)
}

/// Resizes a square image to `side` x `side` (Pillow's antialiased bicubic).
pub(crate) fn resize_square(img: &Rgb8, side: u32) -> DataResult<Rgb8> {
    let s = side as usize;
    if img.width == s && img.height == s {
        return Ok(img.clone());
    }
    resize(img, s, s, Filter::Bicubic).map_err(clip_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: usize, h: usize) -> Rgb8 {
        let data = (0..h).flat_map(|y| (0..w).flat_map(move |x| [x as u8, y as u8, 7])).collect();
        Rgb8 { width: w, height: h, data }
    }

    #[test]
    fn crops_are_square_and_placed() {
        let img = gradient(40, 20);
        let center = Transform::new(20).crop_square(&img, 0);
        assert_eq!((center.width, center.height, center.data[0]), (20, 20, 10));
        let t = Transform { crop: Crop::Random, ..Transform::new(20) };
        let lefts: std::collections::BTreeSet<u8> = (0..200u64)
            .map(|d| t.crop_square(&img, d.wrapping_mul(0x9E37_79B9_7F4A_7C15)).data[0])
            .collect();
        assert_eq!(lefts.first(), Some(&0));
        assert_eq!(lefts.last(), Some(&20));
        let out = Transform::new(8).apply(&gradient(30, 50), 0).unwrap();
        assert_eq!((out.width, out.height), (8, 8));
    }

    #[test]
    fn flip_only_when_asked() {
        let img = gradient(4, 4);
        let flip = Transform { hflip: true, ..Transform::new(4) };
        assert_eq!(Transform::new(4).apply(&img, u64::MAX).unwrap(), img);
        assert_eq!(flip.apply(&img, 0).unwrap(), img);
        let f = flip.apply(&img, u64::MAX).unwrap();
        assert_eq!(&f.data[..3], &img.data[9..12]);
    }

    #[test]
    fn tensors_have_the_right_ranges() {
        let imgs = [gradient(4, 4), gradient(4, 4)];
        let t = to_signed_batch(&imgs).unwrap();
        assert_eq!(t.size(), [2, 3, 4, 4]);
        assert_eq!(t.double_value(&[0, 0, 0, 0]), -1.0);
        assert!((t.double_value(&[1, 0, 0, 3]) - (3.0 / 127.5 - 1.0)).abs() < 1e-6);
        let c = to_clip_batch(&imgs).unwrap();
        let expect = (7.0 / 255.0 - CLIP_MEAN[2]) / CLIP_STD[2];
        assert!((c.double_value(&[0, 2, 1, 1]) - expect).abs() < 1e-6);
        assert!(to_signed_batch(&[gradient(4, 4), gradient(3, 4)]).is_err());
    }

    #[test]
    fn bad_bytes_are_bad_items() {
        let e =
            decode_image(&ImageData::Encoded(b"not an image".to_vec()), "k1", None).unwrap_err();
        assert!(e.is_bad_item() && e.to_string().contains("k1"), "{e}");
    }
}
