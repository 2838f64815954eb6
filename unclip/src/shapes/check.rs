//! The analytic checker: reads an image back into background, objects and
//! their attributes with plain image statistics (no learned model), and
//! compares them with a prompt's [`Spec`].

use image::RgbImage;

use super::caption::{ObjectSpec, Spec};
use super::palette::{Color, dist2};
use super::scene::{Cell, PromptKind, Shape, Size};

/// A pixel is foreground when its RGB distance from the background exceeds
/// this (the closest palette pair is ~100 apart).
pub const FG_THRESHOLD: f32 = 48.0;

/// On noisy backgrounds the threshold is this times the 90th percentile of
/// the border pixels' distances from the background color, if larger.
pub const NOISE_MARGIN: f32 = 1.4;

/// Components smaller than this fraction of the image (soft area) are noise.
/// The smallest drawn object (a small triangle) covers ~1.6%.
pub const MIN_AREA_FRAC: f32 = 0.005;

/// Fill ratio (area over longest row x longest column) above which a
/// non-triangle is a square (square 1.0, disc 0.785).
pub const SQUARE_FILL: f32 = 0.89;

/// Vertical skewness of the mass below which an object is an upright triangle
/// (triangle -0.57, disc and square 0; blur shrinks both). A triangle's fill ratio is ~0.5, so a
/// fill below [`TRIANGLE_FILL`] also reads as a triangle.
pub const TRIANGLE_SKEW: f32 = -0.22;

/// See [`TRIANGLE_SKEW`].
pub const TRIANGLE_FILL: f32 = 0.66;

/// Fewest fully surrounded pixels from which an object's own full-coverage
/// color is read (else the palette color's is used).
pub const MIN_INTERIOR: usize = 4;

/// One object found in an image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detected {
    pub color: Color,
    pub shape: Shape,
    pub size: Size,
    pub cell: Cell,
    /// Mass centroid, `[x, y]` as fractions of the image side.
    pub center: [f32; 2],
    /// Soft area (sum of per-pixel coverage) as a fraction of the image.
    pub area: f32,
    /// Area over (longest row chord x longest column chord).
    pub fill: f32,
    /// Skewness of the mass along y (negative: bottom-heavy).
    pub skew: f32,
    /// Longest chord as a fraction of the image side.
    pub extent: f32,
}

/// What the checker found and, per attribute, whether the image agrees with
/// the prompt (`None`: the prompt says nothing about that attribute).
#[derive(Debug, Clone, PartialEq)]
pub struct CheckReport {
    pub kind: PromptKind,
    /// Background color as stated.
    pub background: Option<bool>,
    /// Exactly as many objects as the prompt names.
    pub count: Option<bool>,
    /// One object: its color. Two objects: both colors present (on any object).
    pub color: Option<bool>,
    /// One object: its shape. Two objects: both shapes present (on any object).
    pub shape: Option<bool>,
    /// Stated sizes, on the objects matched to the prompt's.
    pub size: Option<bool>,
    /// Stated grid cells, on the matched objects.
    pub position: Option<bool>,
    /// The stated relation between the matched objects.
    pub relation: Option<bool>,
    /// Two objects: each (color, shape) pair is present as one object.
    pub binding: Option<bool>,
    /// No object has the negated shape.
    pub negation: Option<bool>,
    pub detected_background: Color,
    /// Objects found, largest first.
    pub detected: Vec<Detected>,
}

/// The attributes a report scores (rows of an [`EvalTable`](super::EvalTable)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Attribute {
    Background,
    Count,
    Color,
    Shape,
    Size,
    Position,
    Relation,
    Binding,
    Negation,
    /// Every applicable attribute at once.
    All,
}

impl Attribute {
    /// All attributes, in table order.
    pub const ALL: [Attribute; 10] = [
        Attribute::Background,
        Attribute::Count,
        Attribute::Color,
        Attribute::Shape,
        Attribute::Size,
        Attribute::Position,
        Attribute::Relation,
        Attribute::Binding,
        Attribute::Negation,
        Attribute::All,
    ];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Attribute::Background => "background",
            Attribute::Count => "count",
            Attribute::Color => "color",
            Attribute::Shape => "shape",
            Attribute::Size => "size",
            Attribute::Position => "position",
            Attribute::Relation => "relation",
            Attribute::Binding => "binding",
            Attribute::Negation => "negation",
            Attribute::All => "all",
        }
    }
}

impl CheckReport {
    /// The result for one attribute (`All`: every applicable one passed).
    pub fn get(&self, a: Attribute) -> Option<bool> {
        match a {
            Attribute::Background => self.background,
            Attribute::Count => self.count,
            Attribute::Color => self.color,
            Attribute::Shape => self.shape,
            Attribute::Size => self.size,
            Attribute::Position => self.position,
            Attribute::Relation => self.relation,
            Attribute::Binding => self.binding,
            Attribute::Negation => self.negation,
            Attribute::All => Some(self.all_ok()),
        }
    }

    /// Whether every attribute the prompt states is right.
    pub fn all_ok(&self) -> bool {
        Attribute::ALL[..9].iter().all(|&a| self.get(a) != Some(false))
    }
}

/// Checks an image against a prompt's facts.
///
/// Rules: the background is the median border color; foreground pixels are
/// farther than [`FG_THRESHOLD`] from it; 8-connected foreground components
/// below [`MIN_AREA_FRAC`] are ignored. Each component's color is the palette
/// color whose blends with the background best fit its pixels; its coverage
/// per pixel is the projection onto the background-to-color line, which makes
/// area, centroid and chords insensitive to soft edges and blur. Shape: bottom-
/// heavy mass or low fill is a triangle, else fill above [`SQUARE_FILL`] is a
/// square, else a circle. Size: longest chord against the two drawn extents.
/// Position: the centroid's grid cell. Prompt objects are matched to the found
/// ones by the assignment that agrees on most attributes (shape and color
/// first); size, position and relation are judged on that assignment.
pub fn check(img: &RgbImage, spec: &Spec) -> CheckReport {
    let (bg_rgb, detected) = analyze(img);
    let detected_background = Color::nearest(bg_rgb);
    let objs = &spec.objects;
    let best = best_assignment(objs, &detected);
    // Judges an attribute on the best assignment, over the prompt objects
    // that state it (`None` if none does).
    let on_best = |stated: &dyn Fn(&ObjectSpec) -> bool,
                   ok: &dyn Fn(&ObjectSpec, &Detected) -> bool| {
        let mut res = None;
        for (k, o) in objs.iter().enumerate().filter(|(_, o)| stated(o)) {
            let r = best[k].is_some_and(|d| ok(o, &detected[d]));
            res = Some(res.unwrap_or(true) && r);
        }
        res
    };
    // A color the prompt leaves out matches anything.
    let color_ok = |o: &ObjectSpec, d: &Detected| o.color.is_none_or(|c| c == d.color);
    let shape_ok = |o: &ObjectSpec, d: &Detected| o.shape == d.shape;
    let has_color = |o: &ObjectSpec| o.color.is_some();
    let (color, shape, binding) = if objs.len() == 2 {
        let both = |o: &ObjectSpec, d: &Detected| color_ok(o, d) && shape_ok(o, d);
        (
            objs.iter().any(has_color).then(|| exists_matching(objs, &detected, color_ok)),
            Some(exists_matching(objs, &detected, shape_ok)),
            Some(exists_matching(objs, &detected, both)),
        )
    } else {
        (on_best(&has_color, &color_ok), on_best(&|_| true, &shape_ok), None)
    };
    let relation = spec.relation.map(|r| match (best.first(), best.get(1)) {
        (Some(Some(a)), Some(Some(b))) => r.holds(detected[*a].center, detected[*b].center),
        _ => false,
    });
    CheckReport {
        kind: spec.kind(),
        background: spec.background.map(|c| c == detected_background),
        count: (spec.background.is_some() || !objs.is_empty())
            .then_some(detected.len() == objs.len()),
        color,
        shape,
        size: on_best(&|o| o.size.is_some(), &|o, d| o.size == Some(d.size)),
        position: on_best(&|o| o.cell.is_some(), &|o, d| o.cell == Some(d.cell)),
        relation,
        binding,
        negation: spec.absent.map(|s| detected.iter().all(|d| d.shape != s)),
        detected_background,
        detected,
    }
}

/// How well a found object fits a prompt object (shape and color weigh most).
fn affinity(o: &ObjectSpec, d: &Detected) -> u32 {
    3 * u32::from(o.shape == d.shape)
        + 3 * u32::from(o.color == Some(d.color))
        + u32::from(o.size == Some(d.size))
        + u32::from(o.cell == Some(d.cell))
}

/// For each prompt object (at most two), the index of its found object under
/// the injective assignment of highest total affinity (ties: larger objects).
fn best_assignment(objs: &[ObjectSpec], det: &[Detected]) -> Vec<Option<usize>> {
    let n = det.len();
    let mut best: (u32, Vec<Option<usize>>) = (0, vec![None; objs.len()]);
    let mut consider = |cand: Vec<Option<usize>>| {
        let score: u32 =
            cand.iter().zip(objs).map(|(d, o)| d.map_or(0, |d| 1 + affinity(o, &det[d]))).sum();
        if score > best.0 {
            best = (score, cand);
        }
    };
    match objs.len() {
        1 => (0..n).for_each(|i| consider(vec![Some(i)])),
        2 => {
            for i in 0..n {
                consider(vec![Some(i), None]);
                consider(vec![None, Some(i)]);
                for j in (0..n).filter(|&j| j != i) {
                    consider(vec![Some(i), Some(j)]);
                }
            }
        }
        _ => {}
    }
    best.1
}

/// Whether the (at most two) prompt objects can be given distinct found
/// objects that each satisfy `ok`.
fn exists_matching(
    objs: &[ObjectSpec],
    det: &[Detected],
    ok: impl Fn(&ObjectSpec, &Detected) -> bool,
) -> bool {
    match objs {
        [] => true,
        [a] => det.iter().any(|d| ok(a, d)),
        [a, b] => (0..det.len())
            .any(|i| ok(a, &det[i]) && (0..det.len()).any(|j| j != i && ok(b, &det[j]))),
        _ => false,
    }
}

/// Background color estimate and the significant objects, largest first.
pub fn analyze(img: &RgbImage) -> ([f32; 3], Vec<Detected>) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return ([0.0; 3], Vec::new());
    }
    let px = |x: usize, y: usize| img.get_pixel(x as u32, y as u32).0.map(f32::from);
    let mut border: Vec<[f32; 3]> = Vec::new();
    for x in 0..w {
        border.push(px(x, 0));
        border.push(px(x, h - 1));
    }
    for y in 1..h.saturating_sub(1) {
        border.push(px(0, y));
        border.push(px(w - 1, y));
    }
    let bg = median_rgb(&border);
    // On a noisy background, raise the threshold above the noise: the 90th
    // percentile of border distances, scaled to about the 99th for Gaussian
    // noise (objects touching the border move the 90th percentile little).
    let mut border_d: Vec<f32> = border.iter().map(|p| dist2(*p, bg).sqrt()).collect();
    border_d.sort_by(f32::total_cmp);
    let q90 = border_d[(border_d.len() * 9) / 10];
    let t = FG_THRESHOLD.max(NOISE_MARGIN * q90);
    let t2 = t * t;
    let d2: Vec<f32> = (0..w * h).map(|i| dist2(px(i % w, i / w), bg)).collect();
    let mut label = vec![usize::MAX; w * h];
    let mut comps: Vec<Vec<usize>> = Vec::new();
    for start in 0..w * h {
        if d2[start] <= t2 || label[start] != usize::MAX {
            continue;
        }
        let id = comps.len();
        let mut members = vec![start];
        label[start] = id;
        let mut k = 0;
        while k < members.len() {
            let (x, y) = (members[k] % w, members[k] / w);
            k += 1;
            for (nx, ny) in neighbours(x, y, w, h) {
                let q = ny * w + nx;
                if d2[q] > t2 && label[q] == usize::MAX {
                    label[q] = id;
                    members.push(q);
                }
            }
        }
        comps.push(members);
    }
    let side = w.max(h) as f32;
    let mut found: Vec<Detected> = comps
        .iter()
        .filter_map(|m| measure(m, &label, &d2, &px, bg, w, h, side))
        .filter(|d| d.area >= MIN_AREA_FRAC * (w * h) as f32 / (side * side))
        .collect();
    found.sort_by(|a, b| b.area.total_cmp(&a.area));
    (bg, found)
}

/// The 8-neighbours of a pixel inside a `w` x `h` image.
fn neighbours(x: usize, y: usize, w: usize, h: usize) -> impl Iterator<Item = (usize, usize)> {
    (-1i64..=1).flat_map(move |dy| {
        (-1i64..=1).filter_map(move |dx| {
            let (nx, ny) = (x as i64 + dx, y as i64 + dy);
            let inside = (dx, dy) != (0, 0) && nx >= 0 && ny >= 0 && nx < w as i64 && ny < h as i64;
            inside.then_some((nx as usize, ny as usize))
        })
    })
}

/// Measures one component (`members`, pixel indices): color, soft-mask
/// statistics, and the attributes read from them.
#[allow(clippy::too_many_arguments)]
fn measure(
    members: &[usize],
    label: &[usize],
    d2: &[f32],
    px: &dyn Fn(usize, usize) -> [f32; 3],
    bg: [f32; 3],
    w: usize,
    h: usize,
    side: f32,
) -> Option<Detected> {
    // Color: the palette color that best explains the pixels as blends of it
    // over the background (distance to the background-color segment), while
    // the object's most distinct pixels stay close to it (else a farther color
    // in the same direction, black for a gray object on white, would fit as
    // well). Unlike a plain median, this reads small blurred objects, which
    // have no pure interior pixels.
    let pixels: Vec<[f32; 3]> = members.iter().map(|&i| px(i % w, i / w)).collect();
    let far = members.iter().map(|&i| d2[i]).fold(0.0f32, f32::max);
    let core: Vec<[f32; 3]> =
        members.iter().filter(|&&i| d2[i] >= 0.5 * far).map(|&i| px(i % w, i / w)).collect();
    let bg_label = Color::nearest(bg);
    let score = |c: Color| {
        let rgb = c.rgbf();
        blend_residual(&pixels, bg, rgb) + core.iter().map(|p| dist2(*p, rgb)).sum::<f32>()
    };
    let color = Color::ALL
        .into_iter()
        .filter(|&c| c != bg_label)
        .map(|c| (c, score(c)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(bg_label, |(c, _)| c);
    let fg = color.rgbf();
    let axis = [fg[0] - bg[0], fg[1] - bg[1], fg[2] - bg[2]];
    let norm2 = dist2(fg, bg).max(1.0);
    let project = |p: [f32; 3]| (0..3).map(|c| (p[c] - bg[c]) * axis[c]).sum::<f32>() / norm2;
    // Full coverage is where the object's interior lies on that line: 1 for
    // the palette color itself, less or more for a drifted color. Read from
    // pixels whose 8 neighbours are all in the component (small blurred
    // objects have none; they keep the palette's scale).
    let id = label[*members.first()?];
    let interior: Vec<f32> = members
        .iter()
        .filter(|&&i| {
            neighbours(i % w, i / w, w, h).filter(|&(x, y)| label[y * w + x] == id).count() == 8
        })
        .map(|&i| project(px(i % w, i / w)))
        .collect();
    let full = if interior.len() >= MIN_INTERIOR { median(interior).clamp(0.6, 1.5) } else { 1.0 };
    // Soft mask over the component and a one-pixel ring around it (edge
    // pixels below the threshold still carry partial coverage).
    let mut region: Vec<usize> = members.to_vec();
    let mut seen = std::collections::HashSet::new();
    seen.extend(members.iter().copied());
    for &i in members {
        for (nx, ny) in neighbours(i % w, i / w, w, h) {
            let q = ny * w + nx;
            if label[q] == usize::MAX && seen.insert(q) {
                region.push(q);
            }
        }
    }
    let mut rows = vec![0.0f32; h];
    let mut cols = vec![0.0f32; w];
    let (mut m0, mut mx, mut my) = (0.0f64, 0.0f64, 0.0f64);
    let mut weights = Vec::with_capacity(region.len());
    for &q in &region {
        let (x, y) = (q % w, q / w);
        let p = px(x, y);
        let wt = (project(p) / full).clamp(0.0, 1.0);
        rows[y] += wt;
        cols[x] += wt;
        m0 += f64::from(wt);
        mx += f64::from(wt) * (x as f64 + 0.5);
        my += f64::from(wt) * (y as f64 + 0.5);
        weights.push((y, wt));
    }
    if m0 <= 0.0 {
        return None;
    }
    let (cx, cy) = (mx / m0, my / m0);
    let (mut v2, mut v3) = (0.0f64, 0.0f64);
    for &(y, wt) in &weights {
        let dy = y as f64 + 0.5 - cy;
        v2 += f64::from(wt) * dy * dy;
        v3 += f64::from(wt) * dy * dy * dy;
    }
    let (var, third) = (v2 / m0, v3 / m0);
    let skew = if var > 0.0 { (third / var.powf(1.5)) as f32 } else { 0.0 };
    let wmax = rows.iter().copied().fold(0.0f32, f32::max);
    let hmax = cols.iter().copied().fold(0.0f32, f32::max);
    let area = m0 as f32;
    let fill = area / (wmax * hmax).max(1e-6);
    let shape = if skew < TRIANGLE_SKEW || fill < TRIANGLE_FILL {
        Shape::Triangle
    } else if fill > SQUARE_FILL {
        Shape::Square
    } else {
        Shape::Circle
    };
    let extent = wmax.max(hmax) / side;
    let center = [(cx as f32) / side, (cy as f32) / side];
    Some(Detected {
        color,
        shape,
        size: Size::nearest(extent),
        cell: Cell::of_point(center),
        center,
        area: area / (side * side),
        fill,
        skew,
        extent,
    })
}

/// Sum over `pixels` of the squared distance to the segment from `bg` to `fg`
/// (how badly "a blend of `fg` over `bg`" explains them).
fn blend_residual(pixels: &[[f32; 3]], bg: [f32; 3], fg: [f32; 3]) -> f32 {
    let axis = [fg[0] - bg[0], fg[1] - bg[1], fg[2] - bg[2]];
    let norm2 = dist2(fg, bg).max(1.0);
    pixels
        .iter()
        .map(|p| {
            let a = ((0..3).map(|c| (p[c] - bg[c]) * axis[c]).sum::<f32>() / norm2).clamp(0.0, 1.0);
            dist2(*p, [0, 1, 2].map(|c| bg[c] + a * axis[c]))
        })
        .sum()
}

/// Median of values (zero for none).
fn median(mut v: Vec<f32>) -> f32 {
    v.sort_by(f32::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Per-channel median of RGB values (zero for none).
fn median_rgb(px: &[[f32; 3]]) -> [f32; 3] {
    if px.is_empty() {
        return [0.0; 3];
    }
    [0, 1, 2].map(|c| {
        let mut v: Vec<f32> = px.iter().map(|p| p[c]).collect();
        v.sort_by(f32::total_cmp);
        v[v.len() / 2]
    })
}
