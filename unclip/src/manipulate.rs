//! Moving through CLIP image-embedding space (paper section 3): slerp interpolation between two
//! embeddings, and text diffs that move an image's embedding toward
//! `normalize(z_text_new - z_text_old)`.
//!
//! Karlo's decoder takes unnormalized embeddings, so directions are interpolated on the sphere
//! and the norm linearly.

use crate::output::image_to_tensor;
use crate::pipeline::{DecodeOptions, Generation, StepInfo, Unclip, check_steps, noise_for};
use crate::variation::Start;
use crate::{Error, Result};
use image::DynamicImage;
use tch::{Device, Kind, Tensor};
use unclip_scheduler::NoiseSource;

/// Spherical interpolation of the directions of `a` and `b` (each (D) or (1, D)) at `t` in
/// [0, 1], with the norm interpolated linearly; falls back to a linear blend for (anti)parallel
/// vectors.
pub fn slerp(a: &Tensor, b: &Tensor, t: f64) -> Result<Tensor> {
    let (a, b) = (flat(a)?, flat(b)?);
    if a.size() != b.size() {
        return Err(Error::Input(format!("slerp of sizes {:?} and {:?}", a.size(), b.size())));
    }
    if !t.is_finite() {
        return Err(Error::Input(format!("interpolation position must be finite, got {t}")));
    }
    let (na, nb) = (a.f_norm()?.double_value(&[]), b.f_norm()?.double_value(&[]));
    if na == 0.0 || nb == 0.0 {
        return Err(Error::Input("cannot interpolate the direction of a zero vector".into()));
    }
    let (ua, ub) = (a.f_div_scalar(na)?, b.f_div_scalar(nb)?);
    let cos = ua.f_dot(&ub)?.double_value(&[]).clamp(-1.0, 1.0);
    let omega = cos.acos();
    let dir = if omega.sin().abs() < 1e-6 {
        ua.f_mul_scalar(1.0 - t)?.f_add(&ub.f_mul_scalar(t)?)?
    } else {
        let s = omega.sin();
        ua.f_mul_scalar(((1.0 - t) * omega).sin() / s)?
            .f_add(&ub.f_mul_scalar((t * omega).sin() / s)?)?
    };
    let dir = dir.f_div_scalar(dir.f_norm()?.double_value(&[]))?;
    Ok(dir.f_mul_scalar(na * (1.0 - t) + nb * t)?.f_unsqueeze(0)?)
}

fn flat(x: &Tensor) -> Result<Tensor> {
    let s = x.size();
    match s.as_slice() {
        [_] => Ok(x.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?),
        [1, _] => Ok(x.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_squeeze_dim(0)?),
        _ => Err(Error::Input(format!("expected one embedding (D) or (1, D), got {s:?}"))),
    }
}

/// The text-diff embedding of the paper: `slerp(z_i, z_d, theta)` with
/// `z_d = normalize(z_t_new - z_t_old)`, keeping the norm of `z_i`.
pub fn text_diff_embedding(
    z_image: &Tensor,
    z_text_old: &Tensor,
    z_text_new: &Tensor,
    theta: f64,
) -> Result<Tensor> {
    let d = flat(z_text_new)?.f_sub(&flat(z_text_old)?)?;
    let nd = d.f_norm()?.double_value(&[]);
    if nd == 0.0 {
        return Err(Error::Input("the two captions have the same CLIP embedding".into()));
    }
    let zi = flat(z_image)?;
    let ni = zi.f_norm()?.double_value(&[]);
    // Unit direction scaled to |z_i|, so only the direction is interpolated.
    let zd = d.f_mul_scalar(ni / nd)?;
    slerp(&zi, &zd, theta)
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
        check_steps("frames", frames)?;
        opts.validate()?;
        let a = self.endpoint_embedding(from, opts.seed)?;
        let b = self.endpoint_embedding(to, opts.seed.map(|s| s + 1))?;
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

    #[test]
    fn shared_rows_repeat_one_draw() {
        let mut base = unclip_scheduler::TorchNoise::new(3);
        let t = SharedRows(&mut base).randn(&[3, 2], Kind::Float, Device::Cpu);
        assert!(t.get(0).equal(&t.get(2)));
    }
}
