//! The loss-curve picture: raw losses and their moving average against the step, on a log-scale
//! y axis, drawn straight into an RGB image (8x8 bitmap glyphs for the labels, so no system font
//! is needed).

use crate::{Error, Result};
use image::{Rgb, RgbImage};
use std::path::Path;

/// Size and smoothing of the picture.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotOptions {
    pub width: u32,
    pub height: u32,
    /// Moving-average window in points; `None` picks about 1/25 of the series.
    pub window: Option<usize>,
    /// Text at the top; `None` writes a default.
    pub title: Option<String>,
}

impl Default for PlotOptions {
    fn default() -> Self {
        Self { width: 800, height: 450, window: None, title: None }
    }
}

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const AXIS: Rgb<u8> = Rgb([60, 60, 60]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const MINOR: Rgb<u8> = Rgb([242, 242, 242]);
const RAW: Rgb<u8> = Rgb([150, 185, 230]);
const SMOOTH: Rgb<u8> = Rgb([20, 60, 170]);
const TEXT: Rgb<u8> = Rgb([30, 30, 30]);
/// Margins around the plot area, in pixels.
const LEFT: f64 = 64.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 40.0;

/// Trailing moving average over `window` points (shorter at the start).
pub fn moving_average(values: &[f64], window: usize) -> Vec<f64> {
    let window = window.max(1);
    let mut out = Vec::with_capacity(values.len());
    let mut sum = 0.0;
    for (i, v) in values.iter().enumerate() {
        sum += v;
        if i >= window {
            sum -= values[i - window];
        }
        out.push(sum / (i + 1).min(window) as f64);
    }
    out
}

/// Blends `color` into pixel (x, y) with coverage `alpha` in [0, 1].
fn blend(img: &mut RgbImage, x: i64, y: i64, color: Rgb<u8>, alpha: f64) {
    if x < 0 || y < 0 || x >= img.width() as i64 || y >= img.height() as i64 || alpha <= 0.0 {
        return;
    }
    let a = alpha.min(1.0);
    let p = img.get_pixel_mut(x as u32, y as u32);
    for c in 0..3 {
        p.0[c] = (p.0[c] as f64 * (1.0 - a) + color.0[c] as f64 * a).round() as u8;
    }
}

/// An antialiased segment of width `thick`: each pixel near the segment is covered by how far
/// it lies inside the stroke.
fn segment(
    img: &mut RgbImage,
    (x0, y0): (f64, f64),
    (x1, y1): (f64, f64),
    thick: f64,
    color: Rgb<u8>,
) {
    let r = thick / 2.0 + 1.0;
    let (dx, dy) = (x1 - x0, y1 - y0);
    let len2 = dx * dx + dy * dy;
    for y in (y0.min(y1) - r).floor() as i64..=(y0.max(y1) + r).ceil() as i64 {
        for x in (x0.min(x1) - r).floor() as i64..=(x0.max(x1) + r).ceil() as i64 {
            let (px, py) = (x as f64, y as f64);
            let t = if len2 > 0.0 {
                (((px - x0) * dx + (py - y0) * dy) / len2).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let d = ((px - x0 - t * dx).powi(2) + (py - y0 - t * dy).powi(2)).sqrt();
            blend(img, x, y, color, thick / 2.0 + 0.5 - d);
        }
    }
}

fn hline(img: &mut RgbImage, y: i64, x0: i64, x1: i64, color: Rgb<u8>) {
    for x in x0..=x1 {
        blend(img, x, y, color, 1.0);
    }
}

fn vline(img: &mut RgbImage, x: i64, y0: i64, y1: i64, color: Rgb<u8>) {
    for y in y0..=y1 {
        blend(img, x, y, color, 1.0);
    }
}

/// Draws ASCII `text` with its top-left corner at (x, y) in 8x8 glyphs.
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, color: Rgb<u8>) {
    for (i, ch) in s.chars().enumerate() {
        let glyph = font8x8::legacy::BASIC_LEGACY[(ch as usize).min(127)];
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits >> col & 1 == 1 {
                    blend(img, x + 8 * i as i64 + col, y + row as i64, color, 1.0);
                }
            }
        }
    }
}

/// `m * 10^e` (m a digit) as a short label: `0.02`, `1`, `500`, `2e-5`.
fn tick_label(m: u32, e: i32) -> String {
    match e {
        0..=3 => format!("{m}{}", "0".repeat(e as usize)),
        -3..=-1 => format!("0.{}{m}", "0".repeat((-e - 1) as usize)),
        _ => format!("{m}e{e}"),
    }
}

/// A 1-2-5 step giving about `target` ticks over `span`.
fn nice_step(span: f64, target: f64) -> f64 {
    let raw = (span / target).max(1.0);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag)
}

/// Draws `points` (step, loss) and their moving average into a PNG at `path` (written
/// atomically). Non-finite and non-positive losses cannot go on a log axis and are skipped.
pub fn plot_loss_curve(points: &[(f64, f64)], path: &Path, opts: &PlotOptions) -> Result<()> {
    let pts: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(s, l)| s.is_finite() && l.is_finite() && *l > 0.0)
        .collect();
    if pts.len() < 2 {
        return Err(Error::InvalidArgument(format!(
            "a loss curve needs at least 2 positive finite points, got {}",
            pts.len()
        )));
    }
    if opts.width < 200 || opts.height < 120 {
        return Err(Error::InvalidArgument("the picture must be at least 200x120".into()));
    }
    let window = opts.window.unwrap_or((pts.len() / 25).max(1));
    let losses: Vec<f64> = pts.iter().map(|p| p.1).collect();
    let smooth = moving_average(&losses, window);

    let (w, h) = (opts.width as f64, opts.height as f64);
    let (x_min, x_max) =
        pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let x_max = if x_max > x_min { x_max } else { x_min + 1.0 };
    let (lo, hi) = losses.iter().fold((f64::MAX, f64::MIN), |(a, b), l| (a.min(*l), b.max(*l)));
    let (mut e_lo, mut e_hi) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    if e_hi <= e_lo {
        e_hi = e_lo + 1;
    }
    // Keep the picture readable for losses spanning many decades.
    if e_hi - e_lo > 12 {
        e_lo = e_hi - 12;
    }
    let (plot_w, plot_h) = (w - LEFT - RIGHT, h - TOP - BOTTOM);
    let px = |s: f64| LEFT + (s - x_min) / (x_max - x_min) * plot_w;
    let py = |l: f64| {
        let f = (l.log10() - e_lo as f64) / (e_hi - e_lo) as f64;
        TOP + (1.0 - f.clamp(0.0, 1.0)) * plot_h
    };

    let mut img = RgbImage::from_pixel(opts.width, opts.height, WHITE);
    let (left, right, top, bottom) =
        (LEFT as i64, (w - RIGHT) as i64, TOP as i64, (h - BOTTOM) as i64);
    // Horizontal grid: decades (labelled) and 2..9 within each.
    for e in e_lo..=e_hi {
        let y = py(10f64.powi(e)).round() as i64;
        if e < e_hi {
            for m in 2..10 {
                let ym = py(m as f64 * 10f64.powi(e)).round() as i64;
                hline(&mut img, ym, left, right, MINOR);
                // Few decades: label 2 and 5 too, or the axis would carry two numbers.
                if e_hi - e_lo <= 2 && (m == 2 || m == 5) {
                    let label = tick_label(m, e);
                    text(&mut img, left - 6 - 8 * label.len() as i64, ym - 4, &label, TEXT);
                }
            }
        }
        hline(&mut img, y, left, right, GRID);
        let label = tick_label(1, e);
        text(&mut img, left - 6 - 8 * label.len() as i64, y - 4, &label, TEXT);
    }
    // Vertical grid at 1-2-5 steps.
    let step = nice_step(x_max - x_min, 6.0);
    let mut s = (x_min / step).ceil() * step;
    while s <= x_max + 1e-9 {
        let x = px(s).round() as i64;
        vline(&mut img, x, top, bottom, GRID);
        vline(&mut img, x, bottom, bottom + 4, AXIS);
        let label = format!("{}", s as i64);
        text(&mut img, x - 4 * label.len() as i64, bottom + 8, &label, TEXT);
        s += step;
    }
    vline(&mut img, left, top, bottom, AXIS);
    hline(&mut img, bottom, left, right, AXIS);

    let series = |img: &mut RgbImage, ys: &[f64], thick: f64, color: Rgb<u8>| {
        for i in 1..pts.len() {
            segment(
                img,
                (px(pts[i - 1].0), py(ys[i - 1])),
                (px(pts[i].0), py(ys[i])),
                thick,
                color,
            );
        }
    };
    series(&mut img, &losses, 1.0, RAW);
    series(&mut img, &smooth, 2.0, SMOOTH);

    let title = opts.title.clone().unwrap_or_else(|| match window {
        1 => "loss (log scale)".to_string(),
        w => format!("loss (log scale): raw, and mean of last {w} steps"),
    });
    text(&mut img, left, 10, &title, TEXT);
    text(&mut img, right - 32, bottom + 24, "step", TEXT);
    // Legend swatches, top right.
    for (i, (name, color)) in [("raw", RAW), ("avg", SMOOTH)].iter().enumerate() {
        let y = top + 8 + 14 * i as i64;
        let x = right - 64;
        segment(
            &mut img,
            (x as f64, y as f64 + 3.5),
            (x as f64 + 20.0, y as f64 + 3.5),
            2.0,
            *color,
        );
        text(&mut img, x + 26, y, name, TEXT);
    }

    crate::fsutil::atomic_write(path, |tmp| {
        img.save_with_format(tmp, image::ImageFormat::Png)
            .map_err(|e| Error::io(tmp, std::io::Error::other(e.to_string())))
    })
}

/// Plots the `step` and `loss` columns of a CSV log written by [`super::CsvLogger`].
pub fn plot_loss_csv(csv: &Path, png: &Path, opts: &PlotOptions) -> Result<()> {
    let log = super::read_csv(csv)?;
    let series = log.loss_series().ok_or_else(|| {
        Error::InvalidArgument(format!("{}: no step/loss columns", csv.display()))
    })?;
    plot_loss_curve(&series, png, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_steps() {
        assert_eq!(
            [tick_label(1, -2), tick_label(5, -1), tick_label(2, 0), tick_label(1, 3)],
            ["0.01", "0.5", "2", "1000"]
        );
        assert_eq!(tick_label(2, -5), "2e-5");
        assert_eq!(nice_step(600.0, 6.0), 100.0);
        assert_eq!(nice_step(9.0, 6.0), 2.0);
    }
}
