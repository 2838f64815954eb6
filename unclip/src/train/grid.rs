//! Validation pictures: a grid PNG of what the model makes for held-out items (top row: the
//! reference — the held-out image, or the upsampler's input — bottom row: the samples); the
//! prior's and CLIP's retrieval numbers over the held-out split and CLIP's similarity picture.

use super::loop_::Ctx;
use super::{Result, TrainError};
use crate::data::Batch;
use std::path::Path;
use tch::{Kind, Tensor};

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
    write_png(dir, done, canvas, s)
}

/// Writes `<dir>/step-<done>.png`; small models' pictures are enlarged (nearest neighbour) to
/// at least 64 px per `cell`.
fn write_png(dir: &Path, done: u64, canvas: image::RgbImage, cell: u32) -> Result<()> {
    let (w, h) = canvas.dimensions();
    let zoom = 64u32.div_ceil(cell).max(1);
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

/// Held-out items the prior's and CLIP's retrieval numbers are computed over, at most: one batch
/// kept in memory for the whole run.
pub(crate) const RETRIEVAL_ITEMS: usize = 256;

/// The held-out items (at most [`RETRIEVAL_ITEMS`]) in one batch, the same at every
/// validation, or `None` without a held-out split.
pub(crate) fn holdout_batch(
    ctx: &Ctx,
    needs: impl Fn(usize) -> super::source::Needs,
) -> Result<Option<Batch>> {
    let Some(h) = &ctx.data.holdout else { return Ok(None) };
    let n = h.len().min(RETRIEVAL_ITEMS);
    let l = super::source::loader(h.clone(), &ctx.cfg.data, ctx.seed(), 0x9e1d, needs(n))?;
    Ok(Some(l.batch(0)?))
}

/// Appends `step,<values>` to `<dir>/metrics.csv` (one row per step: a redone step replaces
/// its row) and prints the numbers.
pub(crate) fn log_metrics(
    stage: &str,
    dir: &Path,
    done: u64,
    columns: &[&str],
    values: &[f64],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let csv = dir.join("metrics.csv");
    let old = std::fs::read_to_string(&csv).unwrap_or_default();
    let mut text = format!("step,{}\n", columns.join(","));
    for line in old.lines().skip(1) {
        if line.split(',').next().and_then(|s| s.parse::<u64>().ok()).is_some_and(|s| s < done) {
            text.push_str(line);
            text.push('\n');
        }
    }
    let cells: Vec<String> = values.iter().map(|v| format!("{v:.5}")).collect();
    text.push_str(&format!("{done},{}\n", cells.join(",")));
    super::write_bytes(&csv, text.as_bytes())?;
    let shown: Vec<String> = columns.iter().zip(&cells).map(|(c, v)| format!("{c} {v}")).collect();
    println!("{stage}: step {done}: {}", shown.join(", "));
    Ok(())
}

/// Cosine similarities (N, M) of the rows of `a` (N, C) and `b` (M, C).
pub(crate) fn cosine(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let unit = |x: &Tensor| -> Result<Tensor> {
        let x = x.f_to_kind(Kind::Float)?;
        let n = x.f_norm_scalaropt_dim(2, [1i64].as_slice(), true)?.f_clamp_min(1e-12)?;
        Ok(x.f_div(&n)?)
    };
    Ok(unit(a)?.f_matmul(&unit(b)?.f_t_()?)?)
}

/// Fraction of rows of `scores` (N, N) whose largest entry is on the diagonal, and each row's
/// argmax.
pub(crate) fn top1(scores: &Tensor) -> Result<(f64, Tensor)> {
    let n = scores.size()[0];
    let best = scores.f_argmax(1, false)?;
    let hit = best.f_eq_tensor(&Tensor::f_arange(n, (Kind::Int64, scores.device()))?)?;
    Ok((hit.f_to_kind(Kind::Float)?.f_mean(Kind::Float)?.f_double_value(&[])?, best))
}

/// CLIP's picture: the held-out images on top, below them one row per caption (caption i
/// belongs to image i) whose cells are the caption's probabilities over the images (softmax of
/// `logits` (N, N), white = 1): a trained CLIP lights up the diagonal.
pub(crate) fn save_similarity(
    dir: &Path,
    done: u64,
    images: &Tensor,
    logits: &Tensor,
) -> Result<()> {
    let images = crate::output::to_rgb_images(&images.f_to_device(tch::Device::Cpu)?)?;
    let probs = logits.f_softmax(1, Kind::Float)?.f_to_device(tch::Device::Cpu)?;
    let n = images.len() as u32;
    let s = images.first().map_or(8, |i| i.width());
    let pad = 2;
    let step = s + pad;
    let mut canvas = image::RgbImage::from_pixel(
        n * step + pad,
        (n + 1) * step + pad + pad,
        image::Rgb([255, 255, 255]),
    );
    for (c, img) in images.iter().enumerate() {
        image::imageops::replace(&mut canvas, img, (pad + c as u32 * step) as i64, pad as i64);
    }
    let p: Vec<f32> = Vec::try_from(&probs.f_reshape([-1])?)?;
    for r in 0..n {
        for c in 0..n {
            let v = (p[(r * n + c) as usize].clamp(0.0, 1.0) * 255.0).round() as u8;
            // Dark blue for 0 through white for 1; the correct pair's cell gets a red frame.
            let color = image::Rgb([v, v, v.max(60)]);
            let (x0, y0) = (pad + c * step, 2 * pad + (r + 1) * step);
            for y in 0..s {
                for x in 0..s {
                    let edge = x < 2 || y < 2 || x + 2 >= s || y + 2 >= s;
                    let px = if r == c && edge { image::Rgb([220, 30, 30]) } else { color };
                    canvas.put_pixel(x0 + x, y0 + y, px);
                }
            }
        }
    }
    write_png(dir, done, canvas, s)
}
