//! Moving through CLIP image-embedding space (paper section 3): slerp interpolation between two
//! embeddings, and text diffs that move an image's embedding toward
//! `normalize(z_text_new - z_text_old)`.
//!
//! Karlo's decoder takes unnormalized embeddings, so directions are interpolated on the sphere
//! and the norm linearly.

use crate::output::image_to_tensor;
use crate::pipeline::{
    DecodeOptions, Generation, StepInfo, Unclip, check_count, check_finite_input, noise_for,
};
use crate::variation::Start;
use crate::{Error, Result};
use image::DynamicImage;
use tch::{Device, Kind, Tensor};
use unclip_scheduler::NoiseSource;

/// The interpolation positions [`slerp`] and [`text_diff_embedding`] accept: `[0, 1]`
/// interpolates; up to one interval beyond either end extrapolates along the same great circle
/// (and the norm linearly). Farther positions are refused: they are mistakes (a huge `theta`
/// lands at an angle no float can place), not requests.
pub const POSITION_RANGE: (f64, f64) = (-1.0, 2.0);

/// Below this sine of the angle between two directions they count as parallel or opposite.
const COLLINEAR_SIN: f64 = 1e-6;

fn check_position(name: &str, t: f64) -> Result<()> {
    let (lo, hi) = POSITION_RANGE;
    if !t.is_finite() || t < lo || t > hi {
        return Err(Error::Input(format!(
            "{name} = {t}: interpolation positions must be finite and within [{lo}, {hi}]"
        )));
    }
    Ok(())
}

/// Spherical interpolation of the directions of `a` and `b` (each (D) or (1, D)) at `t` (see
/// [`POSITION_RANGE`]), with the norm interpolated linearly; returns (1, D) f32 on the CPU.
/// Computed in f64.
///
/// Two directions that are exactly (to 1e-6 rad) opposite have no single great circle between
/// them; the path is then defined as the half circle through the unit vector orthogonal to `a`
/// nearest to the coordinate axis on which `a` is smallest (the first such axis): deterministic,
/// at constant angular speed, and ending at `b`. (Parallel directions blend linearly.) Inputs
/// with NaN or infinite values, zero vectors and positions outside the range are errors that
/// name the argument.
pub fn slerp(a: &Tensor, b: &Tensor, t: f64) -> Result<Tensor> {
    let (a, b) = (vector("slerp's a", a)?, vector("slerp's b", b)?);
    if a.len() != b.len() {
        return Err(Error::Input(format!("slerp of sizes {} and {}", a.len(), b.len())));
    }
    check_position("slerp's t", t)?;
    slerp_vec(&a, &b, t, "slerp's t")
}

/// An embedding (D) or (1, D) as f64 values, refused when it holds NaN or infinities.
fn vector(name: &str, x: &Tensor) -> Result<Vec<f64>> {
    let s = x.size();
    if !matches!(s.as_slice(), [_] | [1, _]) {
        return Err(Error::Input(format!(
            "{name}: expected one embedding (D) or (1, D), got {s:?}"
        )));
    }
    let v = Vec::<f64>::try_from(
        x.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?.f_flatten(0, -1)?,
    )?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::Input(format!(
            "{name} holds NaN or infinite values (element {i} is {})",
            v[i]
        )));
    }
    Ok(v)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// The unit vector orthogonal to the unit vector `u` nearest to the first coordinate axis on
/// which `u` is smallest (`None` in one dimension, where there is none).
fn orthogonal(u: &[f64]) -> Option<Vec<f64>> {
    if u.len() < 2 {
        return None;
    }
    let k = (0..u.len()).min_by(|&i, &j| u[i].abs().total_cmp(&u[j].abs()))?;
    // e_k minus its component along u; its norm is sqrt(1 - u_k^2) >= sqrt(1 - 1/D) > 0.
    let mut p: Vec<f64> = u.iter().map(|x| -u[k] * x).collect();
    p[k] += 1.0;
    let n = norm(&p);
    Some(p.iter().map(|x| x / n).collect())
}

fn slerp_vec(a: &[f64], b: &[f64], t: f64, t_name: &str) -> Result<Tensor> {
    let (na, nb) = (norm(a), norm(b));
    if na == 0.0 || nb == 0.0 {
        return Err(Error::Input("cannot interpolate the direction of a zero vector".into()));
    }
    let ua: Vec<f64> = a.iter().map(|x| x / na).collect();
    let ub: Vec<f64> = b.iter().map(|x| x / nb).collect();
    let cos = dot(&ua, &ub).clamp(-1.0, 1.0);
    // The part of ub orthogonal to ua: its norm is the sine of the angle, computed without
    // acos's loss of precision near 0 and 180 degrees.
    let perp: Vec<f64> = ua.iter().zip(&ub).map(|(x, y)| y - cos * x).collect();
    let sin = norm(&perp);
    let dir: Vec<f64> = if sin >= COLLINEAR_SIN {
        let omega = sin.atan2(cos);
        let (c, s) = ((t * omega).cos(), (t * omega).sin() / sin);
        ua.iter().zip(&perp).map(|(x, q)| c * x + s * q).collect()
    } else if cos > 0.0 {
        let d: Vec<f64> = ua.iter().zip(&ub).map(|(x, y)| (1.0 - t) * x + t * y).collect();
        let n = norm(&d);
        d.iter().map(|x| x / n).collect()
    } else {
        let p = orthogonal(&ua).ok_or_else(|| {
            Error::Input("cannot interpolate between opposite one-dimensional vectors".into())
        })?;
        let angle = t * std::f64::consts::PI;
        ua.iter().zip(&p).map(|(x, q)| angle.cos() * x + angle.sin() * q).collect()
    };
    let scale = na + t * (nb - na);
    if !(scale > 0.0 && scale.is_finite()) {
        return Err(Error::Input(format!(
            "{t_name} = {t} extrapolates the norm (from {na} at 0 to {nb} at 1) to {scale}: it \
             must stay positive"
        )));
    }
    let out: Vec<f32> = dir.iter().map(|x| (x * scale) as f32).collect();
    Ok(Tensor::f_from_slice(&out)?.f_unsqueeze(0)?)
}

/// The text-diff embedding of the paper: `slerp(z_i, z_d, theta)` with
/// `z_d = normalize(z_t_new - z_t_old)`, keeping the norm of `z_i`. Each input must be one
/// finite embedding (errors name it), `theta` within [`POSITION_RANGE`].
pub fn text_diff_embedding(
    z_image: &Tensor,
    z_text_old: &Tensor,
    z_text_new: &Tensor,
    theta: f64,
) -> Result<Tensor> {
    let zi = vector("z_image", z_image)?;
    let old = vector("z_text_old", z_text_old)?;
    let new = vector("z_text_new", z_text_new)?;
    if old.len() != new.len() || zi.len() != old.len() {
        return Err(Error::Input(format!(
            "text diff of sizes {} (image), {} and {} (texts)",
            zi.len(),
            old.len(),
            new.len()
        )));
    }
    check_position("theta", theta)?;
    let d: Vec<f64> = new.iter().zip(&old).map(|(n, o)| n - o).collect();
    let nd = norm(&d);
    if nd == 0.0 {
        return Err(Error::Input("the two captions have the same CLIP embedding".into()));
    }
    let ni = norm(&zi);
    if ni == 0.0 {
        return Err(Error::Input("z_image is the zero vector: it has no direction".into()));
    }
    // Unit direction scaled to |z_i|, so only the direction is interpolated.
    let zd: Vec<f64> = d.iter().map(|x| x * ni / nd).collect();
    slerp_vec(&zi, &zd, theta, "theta")
}

/// Noise that is the same for every row: each draw is made for one row and repeated, so frames
/// of an interpolation differ only through their embeddings.
pub struct SharedRows<'a>(pub &'a mut dyn NoiseSource);

impl NoiseSource for SharedRows<'_> {
    fn randn(&mut self, shape: &[i64], kind: Kind, device: Device) -> Tensor {
        let mut one = shape.to_vec();
        if one.is_empty() {
            return self.0.randn(shape, kind, device);
        }
        one[0] = 1;
        self.0.randn(&one, kind, device).expand(shape, false).contiguous()
    }
}

/// What the two ends of an interpolation are.
#[derive(Debug)]
pub enum Endpoint {
    Image(DynamicImage),
    Prompt(String),
    /// A CLIP image embedding (D) or (1, D).
    Embedding(Tensor),
}

impl Unclip {
    fn endpoint_embedding(&mut self, e: &Endpoint, seed: Option<u64>) -> Result<Tensor> {
        match e {
            Endpoint::Image(img) => self.embed_images(std::slice::from_ref(img)),
            Endpoint::Embedding(t) => Ok(t.shallow_clone()),
            Endpoint::Prompt(p) => {
                // The prior's image embedding for the prompt (Karlo's default settings).
                let req =
                    crate::TextToImage { prompts: vec![p.clone()], seed, ..Default::default() };
                let guided = true;
                let enc = self.text_encoder.encode(&[p.as_str()])?;
                let text = self.guidance_text(&enc.conditioning, "", guided)?;
                let mut noise = noise_for(seed);
                Ok(self.prior_embeddings(&enc.conditioning, &text, &req, &mut noise)?)
            }
        }
    }

    /// `frames` images along the slerp between two endpoints' image embeddings (t = 0 .. 1),
    /// decoded with the empty prompt and the same noise for every frame.
    pub fn interpolate(
        &mut self,
        from: &Endpoint,
        to: &Endpoint,
        frames: usize,
        opts: &DecodeOptions,
        progress: &mut dyn FnMut(&StepInfo),
    ) -> Result<Generation> {
        check_count("frames", frames)?;
        opts.validate()?;
        let a = self.endpoint_embedding(from, opts.seed)?;
        check_finite_input("the embedding of the `from` endpoint", &a)?;
        let b = self.endpoint_embedding(to, opts.seed.map(|s| s.wrapping_add(1)))?;
        check_finite_input("the embedding of the `to` endpoint", &b)?;
        let ts: Vec<f64> = (0..frames)
            .map(|i| if frames == 1 { 0.0 } else { i as f64 / (frames - 1) as f64 })
            .collect();
        let embeds = ts.iter().map(|&t| slerp(&a, &b, t)).collect::<Result<Vec<_>>>()?;
        let embeds = Tensor::f_cat(&embeds, 0)?;
        self.decode_frames(embeds, opts, None, progress)
    }

    /// The paper's text diffs: frames moving `image` toward `new_caption` and away from
    /// `caption` (its description) by each `theta` (0 = the image itself). With
    /// [`Start::DdimInversion`] every frame starts from the image's inverted latents.
    #[allow(clippy::too_many_arguments)]
    pub fn text_diff(
        &mut self,
        image: &DynamicImage,
        caption: &str,
        new_caption: &str,
        thetas: &[f64],
        start: Start,
        opts: &DecodeOptions,
        progress: &mut dyn FnMut(&StepInfo),
    ) -> Result<Generation> {
        if thetas.is_empty() {
            return Err(Error::Input("no theta values given".into()));
        }
        check_count("thetas", thetas.len())?;
        for (i, &th) in thetas.iter().enumerate() {
            check_position(&format!("thetas[{i}]"), th)?;
        }
        if caption.trim().is_empty() || new_caption.trim().is_empty() {
            return Err(Error::Input("text diffs need two non-empty captions".into()));
        }
        opts.validate()?;
        let zi = self.embed_images(std::slice::from_ref(image))?;
        let enc = self.text_encoder.encode(&[caption, new_caption])?;
        let zt = &enc.conditioning.text_embeds;
        let (old, new) = (zt.f_get(0)?, zt.f_get(1)?);
        let embeds = thetas
            .iter()
            .map(|&th| text_diff_embedding(&zi, &old, &new, th))
            .collect::<Result<Vec<_>>>()?;
        let embeds = Tensor::f_cat(&embeds, 0)?;
        let x0 = match start {
            Start::Noise => None,
            Start::DdimInversion { eta } => {
                let x = self.decoder_sized(&image_to_tensor(image)?)?;
                Some((x.f_expand([thetas.len() as i64, -1, -1, -1], false)?.f_contiguous()?, eta))
            }
        };
        let mut g = self.decode_frames(embeds, opts, x0, progress)?;
        g.warnings = enc.warnings;
        Ok(g)
    }

    fn decode_frames(
        &mut self,
        embeds: Tensor,
        opts: &DecodeOptions,
        x0: Option<(Tensor, f64)>,
        progress: &mut dyn FnMut(&StepInfo),
    ) -> Result<Generation> {
        let n = embeds.size()[0];
        let mut base = noise_for(opts.seed);
        let mut noise = SharedRows(&mut base);
        let (small, images) = match x0 {
            None => self.decode_empty_text(&embeds, &[""], 1, opts, &mut noise, progress)?,
            Some((x, eta)) => self.decode_inverted(&embeds, &x, eta, opts, &mut noise, progress)?,
        };
        Ok(Generation {
            images,
            image_small: small,
            image_embeddings: embeds,
            source_index: (0..n as usize).collect(),
            candidates: None,
            decoder_candidates: None,
            warnings: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slerp_ends_and_norms() {
        let a = Tensor::from_slice(&[3.0f32, 0.0, 0.0]);
        let b = Tensor::from_slice(&[0.0f32, 1.0, 0.0]);
        let s0 = slerp(&a, &b, 0.0).unwrap();
        let s1 = slerp(&a, &b, 1.0).unwrap();
        assert!(s0.f_sub(&a.unsqueeze(0)).unwrap().abs().max().double_value(&[]) < 1e-6);
        assert!(s1.f_sub(&b.unsqueeze(0)).unwrap().abs().max().double_value(&[]) < 1e-6);
        let mid = slerp(&a, &b, 0.5).unwrap();
        // 45 degrees, norm halfway between 3 and 1.
        let m = Vec::<f32>::try_from(mid.squeeze()).unwrap();
        assert!((m[0] - m[1]).abs() < 1e-5 && (m[0].hypot(m[1]) - 2.0).abs() < 1e-5);
        assert!(slerp(&a, &Tensor::zeros([3], (Kind::Float, Device::Cpu)), 0.5).is_err());
        assert!(slerp(&a, &b, f64::NAN).is_err());
    }

    #[test]
    fn text_diff_keeps_norm_and_moves_toward_the_difference() {
        let zi = Tensor::from_slice(&[2.0f32, 0.0, 0.0]);
        let old = Tensor::from_slice(&[0.0f32, 1.0, 0.0]);
        let new = Tensor::from_slice(&[0.0f32, 1.0, 1.0]);
        let e = text_diff_embedding(&zi, &old, &new, 1.0).unwrap();
        let v = Vec::<f32>::try_from(e.squeeze()).unwrap();
        assert!((v[0]).abs() < 1e-5 && (v[2] - 2.0).abs() < 1e-5);
        assert!(text_diff_embedding(&zi, &old, &old, 0.5).is_err());
    }

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    /// Opposite directions: a defined half circle, the same every time, no NaN; its midpoint is
    /// orthogonal to both ends, its ends are the inputs, its speed constant.
    #[test]
    fn slerp_between_opposites_is_a_defined_half_circle() {
        let a = Tensor::from_slice(&[0.6f32, -0.8, 0.1, 0.3]);
        let b = a.neg() * 2.0;
        for t in [0.0, 0.25, 0.5, 0.75, 1.0] {
            let v = values(&slerp(&a, &b, t).unwrap());
            assert!(v.iter().all(|x| x.is_finite()), "t={t}: {v:?}");
            // Norm interpolated linearly between |a| and 2|a|.
            let na = values(&a).iter().map(|x| x * x).sum::<f64>().sqrt();
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!((n - na * (1.0 + t)).abs() < 1e-5, "t={t}");
            // Angle to a grows as t * 180 degrees.
            let cos = v.iter().zip(values(&a)).map(|(x, y)| x * y).sum::<f64>() / (n * na);
            assert!((cos - (t * std::f64::consts::PI).cos()).abs() < 1e-5, "t={t}: {cos}");
        }
        assert!(max_abs(&slerp(&a, &b, 1.0).unwrap(), &b.unsqueeze(0)) < 1e-5);
        assert!(slerp(&a, &b, 0.5).unwrap().equal(&slerp(&a, &b, 0.5).unwrap()));
        // The text-diff form: an image embedding exactly opposite the caption difference.
        let old = Tensor::from_slice(&[0.0f32, 0.0, 0.0, 0.0]);
        let e = text_diff_embedding(&a, &old, &a.neg(), 0.5).unwrap();
        assert!(values(&e).iter().all(|x| x.is_finite()));
        // One dimension has no orthogonal direction: an error, not NaN.
        let one = Tensor::from_slice(&[1.0f32]);
        assert!(slerp(&one, &one.neg(), 0.5).is_err());
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// NaN or infinite inputs and absurd positions are errors naming the argument.
    #[test]
    fn non_finite_and_extreme_arguments_are_named() {
        let a = Tensor::from_slice(&[1.0f32, 0.0, 0.0]);
        let nan = Tensor::from_slice(&[1.0f32, f32::NAN, 0.0]);
        let inf = Tensor::from_slice(&[f32::INFINITY, 0.0, 0.0]);
        let msg = |r: Result<Tensor>| r.unwrap_err().to_string();
        assert!(msg(slerp(&nan, &a, 0.5)).contains("slerp's a"));
        assert!(msg(slerp(&a, &inf, 0.5)).contains("slerp's b"));
        for t in [f64::NAN, f64::INFINITY, 1e308, -1e308, 2.5, -1.5] {
            assert!(msg(slerp(&a, &a, t)).contains("slerp's t"), "{t}");
        }
        let old = Tensor::from_slice(&[0.0f32, 1.0, 0.0]);
        let new = Tensor::from_slice(&[0.0f32, 0.0, 1.0]);
        assert!(msg(text_diff_embedding(&nan, &old, &new, 0.5)).contains("z_image"));
        assert!(msg(text_diff_embedding(&a, &inf, &new, 0.5)).contains("z_text_old"));
        assert!(msg(text_diff_embedding(&a, &old, &nan, 0.5)).contains("z_text_new"));
        assert!(msg(text_diff_embedding(&a, &old, &new, 1e308)).contains("theta"));
        assert!(msg(text_diff_embedding(&a, &old, &new, f64::NAN)).contains("theta"));
        // Extrapolation that would turn the norm negative is refused too.
        let big = Tensor::from_slice(&[0.0f32, 5.0, 0.0]);
        assert!(msg(slerp(&a, &big, -1.0)).contains("norm"));
        // Within range, everything stays finite.
        for t in [-1.0, -0.5, 0.0, 0.3, 1.0, 2.0] {
            let v = values(&text_diff_embedding(&a, &old, &new, t).unwrap());
            assert!(v.iter().all(|x| x.is_finite()), "{t}");
        }
    }

    #[test]
    fn shared_rows_repeat_one_draw() {
        let mut base = unclip_scheduler::TorchNoise::new(3);
        let t = SharedRows(&mut base).randn(&[3, 2], Kind::Float, Device::Cpu);
        assert!(t.get(0).equal(&t.get(2)));
    }
}
