//! Drawing a scene: exact shape tests on a supersampled grid, averaged per pixel
//! (anti-aliasing), at any image size.

use image::{Rgb, RgbImage};

use super::scene::Scene;

/// Renders `scene` as a `size` x `size` image. Edges are anti-aliased: each
/// pixel takes the fraction of its 8x8 (4x4 above 64 px) sub-samples that fall
/// inside an object. Objects never overlap, so each pixel blends at most one
/// object with the background.
pub fn render(scene: &Scene, size: u32) -> RgbImage {
    let bg = scene.background.rgbf();
    let mut img = RgbImage::from_pixel(size, size, Rgb(scene.background.rgb()));
    if size == 0 {
        return img;
    }
    let ss: u32 = if size <= 64 { 8 } else { 4 };
    let side = size as f32;
    for obj in &scene.objects {
        let fg = obj.color.rgbf();
        let [x0, y0, x1, y1] = obj.bbox();
        let px = |v: f32| ((v * side).floor().max(0.0) as u32).min(size - 1);
        for py in px(y0)..=px(y1) {
            for pxl in px(x0)..=px(x1) {
                let mut inside = 0u32;
                for sy in 0..ss {
                    let y = (py as f32 + (sy as f32 + 0.5) / ss as f32) / side;
                    for sx in 0..ss {
                        let x = (pxl as f32 + (sx as f32 + 0.5) / ss as f32) / side;
                        inside += u32::from(obj.contains(x, y));
                    }
                }
                if inside > 0 {
                    let a = inside as f32 / (ss * ss) as f32;
                    let c = [0, 1, 2].map(|i| (bg[i] + a * (fg[i] - bg[i])).round() as u8);
                    img.put_pixel(pxl, py, Rgb(c));
                }
            }
        }
    }
    img
}
