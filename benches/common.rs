//! Helpers shared by the benchmarks: peak memory, and the per-stage sampler steps of a loaded
//! pipeline, defined once so that the criterion benches and the side-by-side table binary time
//! the same work as `scripts/bench/theirs.py` does for diffusers.
//!
//! A "step" is one iteration of a sampling loop: the model call on the guided batch (prior,
//! decoder: 2 rows for 1 image) or on the sample with its low-resolution image (upsamplers),
//! guidance, and the scheduler's step. What the loops compute once (text encoding, the text
//! projection, the upsampled low-resolution image) is prepared before, outside the timing.

use tch::{Device, Kind, Tensor};
use unclip::traits::TextConditioning;
use unclip::{TextToImage, Unclip, no_progress};
use unclip_scheduler::{TorchNoise, classifier_free_guidance};

pub type Result<T> = anyhow::Result<T>;

/// The prompt every benchmark uses.
pub const PROMPT: &str = "a high-resolution photograph of a red frog";
pub const PRIOR_GUIDANCE: f64 = 4.0;
pub const DECODER_GUIDANCE: f64 = 8.0;

/// Peak resident set size of this process so far, in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `[uncond, cond]` text conditioning of [`PROMPT`] (one image, guided).
pub fn guided_text(m: &Unclip) -> Result<TextConditioning> {
    let cond = m.encode_prompts(&[PROMPT])?.conditioning;
    let uncond = m.encode_prompts(&[""])?.conditioning;
    Ok(uncond.cat(&cond)?)
}

/// A guided prior step at the middle timestep of a `steps`-step schedule; `None` without a prior.
pub fn prior_step<'a>(
    m: &'a mut Unclip,
    text: &'a TextConditioning,
    steps: usize,
) -> Result<Option<impl FnMut() -> Result<Tensor> + 'a>> {
    let Some(prior) = m.prior.as_deref() else { return Ok(None) };
    let s = m.prior_scheduler.as_mut();
    s.set_timesteps(steps)?;
    let t = s.timesteps()[s.timesteps().len() / 2];
    let x = Tensor::f_randn([1, prior.embedding_dim()], (prior.kind(), prior.device()))?;
    let mut noise = TorchNoise::new(0);
    Ok(Some(move || {
        let out = prior.predict(&Tensor::f_cat(&[&x, &x], 0)?, t, text)?;
        Ok(s.step(&classifier_free_guidance(&out, PRIOR_GUIDANCE, None)?, t, &x, &mut noise)?)
    }))
}

/// A guided decoder step (conditioning prepared once) at the middle timestep.
pub fn decoder_step<'a>(
    m: &'a mut Unclip,
    text: &TextConditioning,
    steps: usize,
) -> Result<impl FnMut() -> Result<Tensor> + 'a> {
    let dec = m.decoder.as_ref();
    let (c, h, w) = dec.sample_shape()?;
    let emb = Tensor::f_randn([1, embedding_dim(m.prior.as_deref())], (Kind::Float, Device::Cpu))?;
    let step = dec.prepare(&emb, text, true)?;
    let s = m.decoder_scheduler.as_mut();
    s.set_timesteps(steps)?;
    let t = s.timesteps()[s.timesteps().len() / 2];
    let x = Tensor::f_randn([1, c, h, w], (dec.kind(), dec.device()))?;
    let mut noise = TorchNoise::new(0);
    Ok(move || {
        let out = step.predict(&Tensor::f_cat(&[&x, &x], 0)?, t)?;
        Ok(s.step(&classifier_free_guidance(&out, DECODER_GUIDANCE, Some(c))?, t, &x, &mut noise)?)
    })
}

fn embedding_dim(prior: Option<&dyn unclip::Prior>) -> i64 {
    prior.map(|p| p.embedding_dim()).unwrap_or(768)
}

/// An upsampler step (`last`: the final step's model) on a random 64 px image; `None` without
/// an upsampler.
pub fn super_res_step<'a>(
    m: &'a mut Unclip,
    steps: usize,
    last: bool,
) -> Result<Option<impl FnMut() -> Result<Tensor> + 'a>> {
    let Some(up) = m.upsampler.as_deref() else { return Ok(None) };
    let (c, h, w) = up.sample_shape()?;
    let (_, sh, sw) = m.decoder.sample_shape()?;
    let small = Tensor::f_rand([1, c, sh, sw], (Kind::Float, Device::Cpu))?.f_mul_scalar(2.0)?;
    let low = up.condition(&small.f_sub_scalar(1.0)?)?;
    let s = m.super_res_scheduler.as_mut();
    s.set_timesteps(steps)?;
    let t = if last { *s.timesteps().last().unwrap_or(&0) } else { s.timesteps()[0] };
    let x = Tensor::f_randn([1, c, h, w], (up.kind(), up.device()))?;
    let mut noise = TorchNoise::new(0);
    Ok(Some(move || {
        let out = up.predict(&x, &low, t, last)?;
        Ok(s.step(&out, t, &x, &mut noise)?)
    }))
}

/// The whole text-to-image pipeline for [`PROMPT`], one image, seed 0.
pub fn pipeline(
    m: &mut Unclip,
    steps: [usize; 3],
) -> Result<Option<impl FnMut() -> Result<Tensor> + '_>> {
    if m.prior.is_none() {
        return Ok(None);
    }
    let req = TextToImage {
        prior_steps: steps[0],
        decoder_steps: steps[1],
        super_res_steps: steps[2],
        prior_guidance_scale: PRIOR_GUIDANCE,
        decoder_guidance_scale: DECODER_GUIDANCE,
        seed: Some(0),
        ..TextToImage::new(PROMPT)
    };
    Ok(Some(move || Ok(m.text_to_image(&req, &mut no_progress)?.images)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn peak_rss_grows_with_allocation() {
        if let Some(before) = super::peak_rss_bytes() {
            let v = vec![1u8; 64 << 20];
            std::hint::black_box(&v);
            assert!(super::peak_rss_bytes().unwrap() >= before.max(64 << 20));
        }
    }
}
