//! Training losses of the decoder and the upsamplers, and one optimizer step any loop can call.
//!
//! Decoder (unCLIP section 2.1, GLIDE's recipe): prediction MSE (epsilon as GLIDE and Karlo, or v:
//! [`DecoderTrainer::with_prediction`]) plus the learned-variance VLB term (weight 0.001, improved
//! DDPM), with conditioning dropout — the CLIP image embedding
//! replaced by the learned null embedding 10% of the time, the caption replaced by the empty
//! caption 50% of the time — so the model learns the unconditional half of guidance.
//! Upsamplers: random crops of the high-res image, with the low-res input (downsampled, then
//! upscaled exactly as at sampling time) corrupted by a Gaussian blur (kernel 3, sigma 0.6) or by
//! Gaussian noise augmentation.

use crate::text_proj::UnCLIPTextProjModel;
use crate::unet_2d::UNet2DModel;
use crate::unet_2d_condition::UNet2DConditionModel;
use crate::upsample::resize_bicubic_aa;
use crate::{Error, Result};
use tch::{Device, Kind, Tensor, nn};
use unclip_scheduler::{HYBRID_VLB_WEIGHT, NoiseSchedule, NoiseSource, PredictionType, VlbLoss};

/// The numbers one loss evaluation reports (0-d tensors; `loss` carries the graph).
#[derive(Debug)]
pub struct TrainLoss {
    /// What to backpropagate: `mse + vlb_weight * T * vb` (just `mse` without learned variance).
    pub loss: Tensor,
    /// Mean squared error of the prediction (epsilon, x0 or v) against its target.
    pub mse: Tensor,
    /// Mean VLB term in bits per dimension (0 without learned variance).
    pub vb: Tensor,
}

fn check_probability(name: &str, p: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&p) {
        return Err(Error::Input(format!("{name} must be a probability in [0, 1], got {p}")));
    }
    Ok(())
}

/// A (B) bool tensor, each entry true with probability `p`, drawn from `rng`.
fn bernoulli(rng: &mut dyn NoiseSource, b: i64, p: f64, device: Device) -> Result<Tensor> {
    const RES: i64 = 1 << 24;
    Ok(rng.randint(RES, &[b], device).f_lt((p * RES as f64).round() as i64)?)
}

/// How training timesteps are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Timesteps {
    /// Uniformly from 0..T (DDPM, GLIDE, Karlo).
    Uniform,
    /// Each row with probability `share` from `from..T`, else from 0..T. Where a small object
    /// goes and what shape it takes is decided at high noise (on 32 px shapes with the cosine
    /// schedule, above about t = 600); uniform draws spend most steps below that.
    HighNoise { share: f64, from: i64 },
}

impl Timesteps {
    /// (B) int64 timesteps on `device`.
    pub fn sample(
        self,
        schedule: &NoiseSchedule,
        b: i64,
        device: Device,
        rng: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let t = schedule.sample_timesteps(b as usize, device, rng);
        match self {
            Timesteps::Uniform => Ok(t),
            Timesteps::HighNoise { share, from } => {
                let n = schedule.num_train_timesteps() as i64;
                check_probability("high-noise share", share)?;
                if !(0..n).contains(&from) {
                    return Err(Error::Input(format!("high-noise start {from} must be in 0..{n}")));
                }
                let high = rng.randint(n - from, &[b], device).f_add_scalar(from)?;
                let pick = bernoulli(rng, b, share, device)?;
                Ok(high.f_where_self(&pick, &t)?)
            }
        }
    }
}

/// Noises `x0` at timesteps drawn as `timesteps` says, runs `model` and scores its output: the mean
/// squared error of its first C channels against the `prediction` target, plus the VLB term when
/// it outputs 2C channels (learned variance).
#[allow(clippy::too_many_arguments)]
fn diffusion_loss(
    schedule: &NoiseSchedule,
    timesteps: Timesteps,
    prediction: PredictionType,
    vlb: &VlbLoss,
    vlb_weight: f64,
    x0: &Tensor,
    pixel_weights: Option<&Tensor>,
    rng: &mut dyn NoiseSource,
    model: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<TrainLoss> {
    let (b, c) = (x0.size()[0], x0.size()[1]);
    let t = timesteps.sample(schedule, b, x0.device(), rng)?;
    let noise = rng.randn(&x0.size(), x0.kind(), x0.device());
    let x_t = schedule.add_noise(x0, &noise, &t)?;
    let target = schedule.target(prediction, x0, &noise, &t)?;
    let out = model(&x_t, &t)?;
    let oc = out.size()[1];
    // The MSE term with per-pixel weights (B, 1, H, W) when given; `mse` stays the plain one, so
    // logs compare across runs.
    let weighted = |mse: &Tensor| -> Result<Tensor> {
        match pixel_weights {
            Some(w) => Ok(out
                .f_narrow(1, 0, c)?
                .f_sub(&target)?
                .f_square()?
                .f_mul(w)?
                .f_mean(out.kind())?),
            None => Ok(mse.shallow_clone()),
        }
    };
    if oc == 2 * c {
        let l = vlb.hybrid_loss(&out, prediction, &target, x0, &x_t, &t, vlb_weight)?;
        let loss = l.loss.f_sub(&l.mse)?.f_add(&weighted(&l.mse)?)?;
        Ok(TrainLoss { loss, mse: l.mse, vb: l.vb })
    } else if oc == c {
        let mse = out.f_mse_loss(&target, tch::Reduction::Mean)?;
        Ok(TrainLoss { loss: weighted(&mse)?, mse, vb: Tensor::from(0f32) })
    } else {
        Err(Error::Input(format!("model outputs {oc} channels for a {c}-channel image")))
    }
}

/// Color step (in [-1, 1] units, against the 3x3 mean) at which a pixel counts fully as edge.
const EDGE_STEP: f64 = 0.1;

/// Per-pixel loss weights (B, 1, H, W) of images `x0` (B, C, H, W) in [-1, 1]: `1 + extra` at
/// color edges (and their 3x3 neighbourhood), 1 on flat areas, scaled to mean 1 per image.
/// Small objects are a few percent of a 32 px image, so a plain MSE is mostly spent on flat
/// backgrounds; the weights put a share of it on outlines and corners.
pub fn edge_weights(x0: &Tensor, extra: f64) -> Result<Tensor> {
    let size = x0.size();
    if size.len() != 4 || size[2] < 2 || size[3] < 2 {
        return Err(Error::Input(format!("images must be (B, C, H>=2, W>=2), got {size:?}")));
    }
    if !(extra.is_finite() && extra >= 0.0) {
        return Err(Error::Input(format!("edge weight must be >= 0, got {extra}")));
    }
    let x0 = x0.f_detach()?;
    let mean = x0.f_avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None::<i64>)?;
    let step = x0.f_sub(&mean)?.f_abs()?.f_amax([1], true)?;
    let edge = step
        .f_max_pool2d([3, 3], [1, 1], [1, 1], [1, 1], false)?
        .f_div_scalar(EDGE_STEP)?
        .f_clamp_max(1.0)?;
    let w = edge.f_mul_scalar(extra)?.f_add_scalar(1.0)?;
    let per_image = w.f_mean_dim([1, 2, 3].as_slice(), true, w.kind())?;
    Ok(w.f_div(&per_image)?)
}

/// The encoding of the empty caption (what guidance uses as "no text"): CLIP text embedding
/// (1, D), last hidden states (1, L, D) and token mask (1, L).
#[derive(Debug)]
pub struct EmptyCaption<'a> {
    pub prompt_embeds: &'a Tensor,
    pub text_hidden_states: &'a Tensor,
    pub text_mask: &'a Tensor,
}

/// One decoder training batch: images in [-1, 1] and their CLIP conditioning (B rows each).
#[derive(Debug)]
pub struct DecoderBatch<'a> {
    pub images: &'a Tensor,
    pub image_embeddings: &'a Tensor,
    pub prompt_embeds: &'a Tensor,
    pub text_hidden_states: &'a Tensor,
    pub text_mask: &'a Tensor,
    /// Needed when captions are dropped (`text_dropout > 0`).
    pub empty_caption: Option<EmptyCaption<'a>>,
}

/// The decoder's training objective.
#[derive(Debug)]
pub struct DecoderTrainer {
    pub schedule: NoiseSchedule,
    vlb: VlbLoss,
    /// Probability of replacing the image embedding by the learned null embedding (unCLIP: 0.1).
    pub image_dropout: f64,
    /// Probability of replacing the caption by the empty caption (unCLIP: 0.5).
    pub text_dropout: f64,
    /// λ of L_simple + λ L_vlb (improved DDPM / GLIDE: 0.001).
    pub vlb_weight: f64,
    /// What the UNet predicts (epsilon by default, as GLIDE and Karlo).
    pub prediction: PredictionType,
    /// How timesteps are drawn (uniform by default).
    pub timesteps: Timesteps,
    /// Extra MSE weight on color edges of the image ([`edge_weights`]; 0: plain MSE).
    pub edge_weight: f64,
}

impl DecoderTrainer {
    /// Karlo's cosine schedule with unCLIP's dropout rates and the 0.001 VLB weight.
    pub fn karlo() -> Self {
        Self::new(NoiseSchedule::karlo(), 0.1, 0.5, HYBRID_VLB_WEIGHT).expect("valid defaults")
    }

    pub fn new(
        schedule: NoiseSchedule,
        image_dropout: f64,
        text_dropout: f64,
        vlb_weight: f64,
    ) -> Result<Self> {
        check_probability("image_dropout", image_dropout)?;
        check_probability("text_dropout", text_dropout)?;
        if !(vlb_weight.is_finite() && vlb_weight >= 0.0) {
            return Err(Error::Input(format!("vlb_weight must be >= 0, got {vlb_weight}")));
        }
        let vlb = VlbLoss::new(&schedule);
        Ok(Self {
            schedule,
            vlb,
            image_dropout,
            text_dropout,
            vlb_weight,
            prediction: PredictionType::Epsilon,
            timesteps: Timesteps::Uniform,
            edge_weight: 0.0,
        })
    }

    /// Weighs the MSE `1 + extra` on the image's color edges ([`edge_weights`]).
    pub fn with_edge_weight(mut self, extra: f64) -> Result<Self> {
        if !(extra.is_finite() && extra >= 0.0) {
            return Err(Error::Input(format!("edge weight must be >= 0, got {extra}")));
        }
        self.edge_weight = extra;
        Ok(self)
    }

    /// Draws training timesteps as `timesteps` says.
    pub fn with_timesteps(mut self, timesteps: Timesteps) -> Self {
        self.timesteps = timesteps;
        self
    }

    /// Trains the UNet to predict `prediction` (the scheduler that samples it must use the same
    /// `prediction_type`).
    ///
    /// Why v: epsilon-MSE equals SNR·(x0-MSE), so at high noise (SNR ≈ 0.005 at t = 958) it
    /// barely sees an error in the image's global content; on small flat images that content
    /// stays readable from x_t until close to T, and an epsilon model learns to read it there
    /// instead of from the conditioning, then draws a random background from pure noise. v-MSE
    /// equals (1 + SNR)·(x0-MSE): the image's error counts fully at high noise, while the output
    /// stays as precise as epsilon's at low noise (which x0 prediction is not).
    pub fn with_prediction(mut self, prediction: PredictionType) -> Self {
        self.prediction = prediction;
        self
    }

    /// The loss on one batch (with gradients, in train mode). Draws timesteps, noise and the
    /// dropout decisions from `rng`.
    pub fn loss(
        &self,
        unet: &UNet2DConditionModel,
        text_proj: &UnCLIPTextProjModel,
        batch: &DecoderBatch,
        rng: &mut dyn NoiseSource,
    ) -> Result<TrainLoss> {
        let x0 = batch.images;
        let size = x0.size();
        if size.len() != 4 {
            return Err(Error::Input(format!("images must be (B, C, H, W), got {size:?}")));
        }
        let (b, device) = (size[0], x0.device());
        let (mut prompt, mut hidden, mut mask) = (
            batch.prompt_embeds.shallow_clone(),
            batch.text_hidden_states.shallow_clone(),
            batch.text_mask.shallow_clone(),
        );
        if self.text_dropout > 0.0 {
            let empty = batch.empty_caption.as_ref().ok_or_else(|| {
                Error::Input("text_dropout > 0 needs the empty caption's encoding".into())
            })?;
            let drop = bernoulli(rng, b, self.text_dropout, device)?;
            let pick = |cond: &Tensor, empty: &Tensor, what: &str| -> Result<Tensor> {
                let (cs, es) = (cond.size(), empty.size());
                if es.len() != cs.len() || es[0] != 1 || es[1..] != cs[1..] {
                    return Err(Error::Input(format!(
                        "empty caption {what} must be (1, ..) like {cs:?}, got {es:?}"
                    )));
                }
                let mut shape = vec![b];
                shape.resize(cs.len(), 1);
                let d = drop.f_reshape(shape.as_slice())?;
                Ok(empty
                    .f_to_kind(cond.kind())?
                    .f_expand(cs.as_slice(), false)?
                    .f_where_self(&d, cond)?)
            };
            prompt = pick(&prompt, empty.prompt_embeds, "prompt_embeds")?;
            hidden = pick(&hidden, empty.text_hidden_states, "hidden states")?;
            mask = pick(&mask, empty.text_mask, "mask")?;
        }
        let mut image = batch.image_embeddings.shallow_clone();
        if image.dim() != 2 || image.size()[0] != b {
            return Err(Error::Input(format!(
                "image_embeddings must be ({b}, D), got {:?}",
                image.size()
            )));
        }
        if self.image_dropout > 0.0 {
            let drop = bernoulli(rng, b, self.image_dropout, device)?.f_unsqueeze(1)?;
            let null = text_proj.null_image_embeddings(b)?.f_to_kind(image.kind())?;
            image = null.f_where_self(&drop, &image)?;
        }
        let proj = text_proj.forward(&image, &prompt, &hidden, false)?;
        let dec_mask = text_proj.decoder_attention_mask(&mask)?;
        let cond = crate::Conditioning::new(
            unet.config(),
            Some(&proj.encoder_hidden_states),
            Some(&proj.additive_clip_time_embeddings),
            Some(&dec_mask),
        )?;
        let weights =
            if self.edge_weight > 0.0 { Some(edge_weights(x0, self.edge_weight)?) } else { None };
        diffusion_loss(
            &self.schedule,
            self.timesteps,
            self.prediction,
            &self.vlb,
            self.vlb_weight,
            x0,
            weights.as_ref(),
            rng,
            |x_t, t| unet.forward_cond(x_t, t, &cond),
        )
    }
}

/// How the upsampler's low-res input is corrupted in training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LowResCorruption {
    None,
    /// Gaussian blur, 3x3 kernel, this sigma (unCLIP's first upsampler: 0.6).
    Blur {
        sigma: f64,
    },
    /// Additive Gaussian noise of this standard deviation.
    Noise {
        std: f64,
    },
    /// Gaussian blur whose sigma is drawn per image, uniform in `min..=max` (kernel radius
    /// `ceil(2 max)`): teaches the upsampler to sharpen a decoder output that is softer than
    /// the 0.6 blur of [`Self::Blur`].
    BlurRange {
        min: f64,
        max: f64,
    },
}

/// The most a [`LowResCorruption::BlurRange`] may blur (kernel radius 8).
pub const MAX_BLUR_SIGMA: f64 = 4.0;

/// Per-image Gaussian blur of `x` (B, C, H, W): image `i` is blurred with `sigmas[i]` by a
/// separable kernel of the given radius, borders reflected.
pub fn gaussian_blur_per_image(x: &Tensor, sigmas: &[f64], radius: i64) -> Result<Tensor> {
    let size = x.size();
    if size.len() != 4 || size[0] != sigmas.len() as i64 {
        return Err(Error::Input(format!(
            "blur input must be (B, C, H, W) with B = {} sigmas, got {size:?}",
            sigmas.len()
        )));
    }
    if radius < 1 || size[2] <= radius || size[3] <= radius {
        return Err(Error::Input(format!(
            "blur radius {radius} needs images larger than it, got {size:?}"
        )));
    }
    if let Some(s) = sigmas.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
        return Err(Error::Input(format!("blur sigma must be positive, got {s}")));
    }
    let (b, c) = (size[0], size[1]);
    let k = 2 * radius + 1;
    let mut taps = Vec::with_capacity((b * c * k) as usize);
    for &sigma in sigmas {
        let g: Vec<f64> =
            (-radius..=radius).map(|d| (-(d * d) as f64 / (2.0 * sigma * sigma)).exp()).collect();
        let sum: f64 = g.iter().sum();
        for _ in 0..c {
            taps.extend(g.iter().map(|v| (v / sum) as f32));
        }
    }
    let taps = Tensor::from_slice(&taps).f_to_kind(x.kind())?.f_to_device(x.device())?;
    let rows = taps.f_reshape([b * c, 1, k, 1])?;
    let cols = taps.f_reshape([b * c, 1, 1, k])?;
    // Images and channels become groups of one convolution.
    let flat = x.f_reshape([1, b * c, size[2], size[3]])?;
    let flat = flat.f_reflection_pad2d([radius, radius, radius, radius])?;
    let flat = flat.f_conv2d(&rows, None::<&Tensor>, [1, 1], [0, 0], [1, 1], b * c)?;
    let flat = flat.f_conv2d(&cols, None::<&Tensor>, [1, 1], [0, 0], [1, 1], b * c)?;
    Ok(flat.f_reshape(size.as_slice())?)
}

/// A depthwise 3x3 Gaussian blur with reflected borders.
pub fn gaussian_blur3(x: &Tensor, sigma: f64) -> Result<Tensor> {
    if !(sigma.is_finite() && sigma > 0.0) {
        return Err(Error::Input(format!("blur sigma must be positive, got {sigma}")));
    }
    let size = x.size();
    if size.len() != 4 || size[2] < 2 || size[3] < 2 {
        return Err(Error::Input(format!("blur input must be (B, C, H>=2, W>=2), got {size:?}")));
    }
    let g: Vec<f64> =
        [-1.0f64, 0.0, 1.0].iter().map(|d| (-d * d / (2.0 * sigma * sigma)).exp()).collect();
    let s: f64 = g.iter().sum();
    let g: Vec<f64> = g.iter().map(|v| v / s).collect();
    let k: Vec<f32> = (0..9).map(|i| (g[i / 3] * g[i % 3]) as f32).collect();
    let c = size[1];
    let kernel = Tensor::from_slice(&k)
        .f_reshape([1, 1, 3, 3])?
        .f_expand([c, 1, 3, 3], false)?
        .f_to_kind(x.kind())?
        .f_to_device(x.device())?;
    let padded = x.f_reflection_pad2d([1, 1, 1, 1])?;
    Ok(padded.f_conv2d(&kernel, None::<&Tensor>, [1, 1], [0, 0], [1, 1], c)?)
}

/// The upsampler's training objective.
#[derive(Debug)]
pub struct UpsamplerTrainer {
    pub schedule: NoiseSchedule,
    vlb: VlbLoss,
    /// High-res / low-res size ratio (Karlo 64 -> 256: 4).
    pub scale: i64,
    /// Side of the square random crop of the high-res image (unCLIP: a quarter of the target).
    pub crop: i64,
    pub corruption: LowResCorruption,
    pub vlb_weight: f64,
    /// What the UNet predicts (epsilon by default; see [`DecoderTrainer::with_prediction`]).
    pub prediction: PredictionType,
}

impl UpsamplerTrainer {
    /// unCLIP's first upsampler (64 -> 256 px): crops a quarter of the target side (64 px), low-res
    /// input blurred with sigma 0.6, Karlo's cosine schedule.
    pub fn karlo() -> Self {
        Self::new(NoiseSchedule::karlo(), 4, 64, LowResCorruption::Blur { sigma: 0.6 })
            .expect("valid defaults")
    }

    pub fn new(
        schedule: NoiseSchedule,
        scale: i64,
        crop: i64,
        corruption: LowResCorruption,
    ) -> Result<Self> {
        if scale < 1 || crop < 1 {
            return Err(Error::Input(format!("scale {scale} and crop {crop} must be positive")));
        }
        if let LowResCorruption::Noise { std } = corruption {
            if !(std.is_finite() && std >= 0.0) {
                return Err(Error::Input(format!("noise std must be >= 0, got {std}")));
            }
        }
        if let LowResCorruption::BlurRange { min, max } = corruption {
            if !(min > 0.0 && min <= max && max <= MAX_BLUR_SIGMA) {
                return Err(Error::Input(format!(
                    "blur sigma range must satisfy 0 < min <= max <= {MAX_BLUR_SIGMA}, \
                     got {min}..={max}"
                )));
            }
        }
        let vlb = VlbLoss::new(&schedule);
        Ok(Self {
            schedule,
            vlb,
            scale,
            crop,
            corruption,
            vlb_weight: HYBRID_VLB_WEIGHT,
            prediction: PredictionType::Epsilon,
        })
    }

    /// Trains the UNet to predict `prediction`. An epsilon upsampler has the decoder's weakness
    /// at high noise: sampling starts from pure noise, and it drew backgrounds of another color
    /// than its low-res input's.
    pub fn with_prediction(mut self, prediction: PredictionType) -> Self {
        self.prediction = prediction;
        self
    }

    /// The model input's conditioning half for `high` (B, C, H, W): downsample by `scale`,
    /// corrupt, upscale back to (H, W) as sampling does.
    pub fn low_res_input(&self, high: &Tensor, rng: &mut dyn NoiseSource) -> Result<Tensor> {
        let size = high.size();
        if size.len() != 4 || size[2] % self.scale != 0 || size[3] % self.scale != 0 {
            return Err(Error::Input(format!(
                "high-res images must be (B, C, H, W) with H, W divisible by {}, got {size:?}",
                self.scale
            )));
        }
        let (h, w) = (size[2], size[3]);
        let low = resize_bicubic_aa(high, h / self.scale, w / self.scale)?;
        let low = match self.corruption {
            LowResCorruption::None => low,
            LowResCorruption::Blur { sigma } => gaussian_blur3(&low, sigma)?,
            LowResCorruption::Noise { std } => {
                low.f_add(&rng.randn(&low.size(), low.kind(), low.device()).f_mul_scalar(std)?)?
            }
            LowResCorruption::BlurRange { min, max } => {
                const LEVELS: i64 = 1000;
                let draws = rng.randint(LEVELS + 1, &[size[0]], Device::Cpu);
                let sigmas = (0..size[0])
                    .map(|i| {
                        let u = draws.f_int64_value(&[i])? as f64 / LEVELS as f64;
                        Ok(min + (max - min) * u)
                    })
                    .collect::<Result<Vec<f64>>>()?;
                gaussian_blur_per_image(&low, &sigmas, (2.0 * max).ceil() as i64)?
            }
        };
        resize_bicubic_aa(&low, h, w)
    }

    /// The loss on random `crop` x `crop` crops of `high` (B, C, H, W) in [-1, 1].
    pub fn loss(
        &self,
        unet: &UNet2DModel,
        high: &Tensor,
        rng: &mut dyn NoiseSource,
    ) -> Result<TrainLoss> {
        let low_up = self.low_res_input(high, rng)?;
        let size = high.size();
        let (b, h, w) = (size[0], size[2], size[3]);
        if self.crop > h || self.crop > w {
            return Err(Error::Input(format!(
                "crop {} is larger than the images ({h}x{w})",
                self.crop
            )));
        }
        if unet.config().in_channels != 2 * size[1] {
            return Err(Error::Input(format!(
                "the upsampler takes {} channels, images have {}",
                unet.config().in_channels,
                size[1]
            )));
        }
        let oy = rng.randint(h - self.crop + 1, &[b], Device::Cpu);
        let ox = rng.randint(w - self.crop + 1, &[b], Device::Cpu);
        let mut xs = Vec::with_capacity(b as usize);
        let mut lows = Vec::with_capacity(b as usize);
        for i in 0..b {
            let (y, x) = (oy.int64_value(&[i]), ox.int64_value(&[i]));
            let crop = |t: &Tensor| -> Result<Tensor> {
                Ok(t.f_narrow(0, i, 1)?.f_narrow(2, y, self.crop)?.f_narrow(3, x, self.crop)?)
            };
            xs.push(crop(high)?);
            lows.push(crop(&low_up)?);
        }
        let x0 = Tensor::f_cat(&xs, 0)?;
        let low = Tensor::f_cat(&lows, 0)?;
        diffusion_loss(
            &self.schedule,
            Timesteps::Uniform,
            self.prediction,
            &self.vlb,
            self.vlb_weight,
            &x0,
            None,
            rng,
            |x_t, t| unet.forward(&Tensor::f_cat(&[x_t, &low], 1)?, t, None),
        )
    }
}

/// One optimizer step on `loss`: zero the gradients, backpropagate, update. Returns the loss.
pub fn train_step(opt: &mut nn::Optimizer, loss: &Tensor) -> Result<f64> {
    opt.zero_grad();
    loss.f_backward()?;
    opt.step();
    Ok(loss.f_double_value(&[])?)
}

/// Same as [`train_step`] with gradient-norm clipping at `max_norm`.
pub fn train_step_clipped(opt: &mut nn::Optimizer, loss: &Tensor, max_norm: f64) -> Result<f64> {
    opt.zero_grad();
    loss.f_backward()?;
    opt.clip_grad_norm(max_norm);
    opt.step();
    Ok(loss.f_to_kind(Kind::Double)?.f_double_value(&[])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use unclip_scheduler::TorchNoise;

    /// The loss of a stand-in model that outputs zeros (and a fixed variance), and the mean
    /// squared `prediction` target recomputed from the noised input it received.
    fn zero_output_loss(prediction: PredictionType) -> (f64, f64) {
        let schedule = NoiseSchedule::karlo();
        let vlb = VlbLoss::new(&schedule);
        let _lock = unclip_scheduler::global_rng_lock();
        let x0 = Tensor::rand([16, 3, 8, 8], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let mut expected = 0.0;
        let mut rng = TorchNoise::new(5);
        let uniform = Timesteps::Uniform;
        let loss = diffusion_loss(
            &schedule,
            uniform,
            prediction,
            &vlb,
            1e-3,
            &x0,
            None,
            &mut rng,
            |x_t, t| {
                let ac =
                    schedule.alphas_cumprod_tensor(Kind::Float, Device::Cpu).index_select(0, t);
                let ac = ac.view([-1, 1, 1, 1]);
                let s1 = (ac.neg() + 1.0).sqrt();
                let noise: Tensor = (x_t - ac.sqrt() * &x0) / &s1;
                let target = match prediction {
                    PredictionType::Epsilon => noise,
                    PredictionType::Sample => x0.shallow_clone(),
                    PredictionType::VPrediction => ac.sqrt() * noise - s1 * &x0,
                };
                expected = target.square().mean(Kind::Float).double_value(&[]);
                Ok(Tensor::cat(&[x_t.zeros_like(), x_t.zeros_like()], 1))
            },
        )
        .unwrap();
        (loss.mse.double_value(&[]), expected)
    }

    #[test]
    fn the_loss_scores_the_chosen_prediction_target() {
        for p in [PredictionType::Epsilon, PredictionType::Sample, PredictionType::VPrediction] {
            let (mse, expected) = zero_output_loss(p);
            assert!(
                (mse - expected).abs() < 1e-4 * expected,
                "{p:?}: mse {mse}, expected {expected}"
            );
        }
        assert_eq!(
            DecoderTrainer::karlo().with_prediction(PredictionType::VPrediction).prediction,
            PredictionType::VPrediction
        );
    }

    #[test]
    fn high_noise_timesteps_take_their_share_from_the_top_range() {
        let schedule = NoiseSchedule::karlo();
        let _lock = unclip_scheduler::global_rng_lock();
        let mut rng = TorchNoise::new(3);
        let draw = |ts: Timesteps, rng: &mut TorchNoise| -> Vec<i64> {
            let t = ts.sample(&schedule, 4000, Device::Cpu, rng).unwrap();
            Vec::<i64>::try_from(&t).unwrap()
        };
        let share_high =
            |t: &[i64]| t.iter().filter(|&&v| v >= 600).count() as f64 / t.len() as f64;
        let all = draw(Timesteps::HighNoise { share: 1.0, from: 600 }, &mut rng);
        assert!(all.iter().all(|&v| (600..1000).contains(&v)));
        assert!(all.contains(&600) && all.contains(&999));
        let uniform = draw(Timesteps::Uniform, &mut rng);
        assert!(uniform.iter().all(|&v| (0..1000).contains(&v)));
        // Uniform: 40% land in 600..1000; with half the rows moved there, 70%.
        assert!((share_high(&uniform) - 0.4).abs() < 0.03, "{}", share_high(&uniform));
        let half = draw(Timesteps::HighNoise { share: 0.5, from: 600 }, &mut rng);
        assert!((share_high(&half) - 0.7).abs() < 0.03, "{}", share_high(&half));
        for bad in [
            Timesteps::HighNoise { share: 1.5, from: 600 },
            Timesteps::HighNoise { share: 0.5, from: 1000 },
            Timesteps::HighNoise { share: 0.5, from: -1 },
        ] {
            assert!(bad.sample(&schedule, 4, Device::Cpu, &mut rng).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn per_image_blur_uses_each_images_sigma_and_keeps_flat_images() {
        // A white dot in the middle of two images; a flat gray third.
        let x = Tensor::zeros([3, 2, 9, 9], (Kind::Float, Device::Cpu));
        let _ = x.narrow(0, 0, 2).narrow(2, 4, 1).narrow(3, 4, 1).fill_(1.0);
        let _ = x.narrow(0, 2, 1).fill_(0.5);
        let out = gaussian_blur_per_image(&x, &[0.6, 1.4, 1.0], 3).unwrap();
        assert_eq!(out.size(), x.size());
        let peak = |i: i64| out.double_value(&[i, 1, 4, 4]);
        // A wider blur spreads the dot further: a lower peak, the same total.
        assert!(peak(0) > peak(1) + 0.1, "{} {}", peak(0), peak(1));
        for i in 0..2 {
            let total = out.get(i).get(0).sum(Kind::Double).double_value(&[]);
            assert!((total - 1.0).abs() < 1e-5, "{total}");
        }
        let flat = (out.get(2) - 0.5).abs().max().double_value(&[]);
        assert!(flat < 1e-6, "{flat}");
        // The 1-D taps at sigma 0.6: the dot's centre is the square of the middle tap.
        let g: Vec<f64> = (-3i32..=3).map(|d| (-(d * d) as f64 / 0.72).exp()).collect();
        let mid = g[3] / g.iter().sum::<f64>();
        assert!((peak(0) - mid * mid).abs() < 1e-5, "{} {}", peak(0), mid * mid);
        for (sigmas, radius) in [(vec![0.6, 1.0], 3), (vec![0.6, 0.0, 1.0], 3), (vec![1.0; 3], 9)] {
            assert!(gaussian_blur_per_image(&x, &sigmas, radius).is_err(), "{sigmas:?} {radius}");
        }
    }

    #[test]
    fn a_blur_range_draws_sigmas_within_it() {
        let _lock = unclip_scheduler::global_rng_lock();
        let high = Tensor::rand([8, 3, 32, 32], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let (min, max) = (0.5, 2.0);
        let trainer = |c| UpsamplerTrainer::new(NoiseSchedule::karlo(), 2, 8, c).unwrap();
        let ranged = trainer(LowResCorruption::BlurRange { min, max })
            .low_res_input(&high, &mut TorchNoise::new(5))
            .unwrap();
        // The same images blurred at each end of the range (the kernel radius of `max`).
        let low = resize_bicubic_aa(&high, 16, 16).unwrap();
        let at = |sigma: f64| {
            let b = gaussian_blur_per_image(&low, &[sigma; 8], 4).unwrap();
            resize_bicubic_aa(&b, 32, 32).unwrap()
        };
        let (softest, sharpest) = (at(max), at(min));
        let energy = |t: &Tensor, i: i64| {
            let d = t.get(i).diff(1, 2, None::<Tensor>, None::<Tensor>);
            d.square().mean(Kind::Double).double_value(&[])
        };
        let mut seen = Vec::new();
        for i in 0..8 {
            let e = energy(&ranged, i);
            assert!(e >= energy(&softest, i) * (1.0 - 1e-6), "image {i}");
            assert!(e <= energy(&sharpest, i) * (1.0 + 1e-6), "image {i}");
            seen.push(e / energy(&sharpest, i));
        }
        // Sigmas are drawn per image, not once per batch.
        let spread = seen.iter().cloned().fold(f64::MIN, f64::max)
            - seen.iter().cloned().fold(f64::MAX, f64::min);
        assert!(spread > 0.05, "{seen:?}");
        for (min, max) in [(0.0, 1.0), (1.0, 0.5), (0.5, MAX_BLUR_SIGMA + 1.0)] {
            let bad = LowResCorruption::BlurRange { min, max };
            assert!(UpsamplerTrainer::new(NoiseSchedule::karlo(), 2, 8, bad).is_err());
        }
    }

    #[test]
    fn edge_weights_favour_outlines_and_average_one() {
        // A flat image gets weight 1 everywhere.
        let flat = Tensor::full([1, 3, 16, 16], 0.3, (Kind::Float, Device::Cpu));
        let w = edge_weights(&flat, 8.0).unwrap();
        assert_eq!(w.size(), [1, 1, 16, 16]);
        assert!((w - 1.0).abs().max().double_value(&[]) < 1e-6);
        // A 6 px square: its outline weighs more than its inside and the background.
        let x = Tensor::full([2, 3, 16, 16], -1.0, (Kind::Float, Device::Cpu));
        let _ = x.narrow(0, 0, 1).narrow(2, 5, 6).narrow(3, 5, 6).fill_(1.0);
        let w = edge_weights(&x, 8.0).unwrap();
        let at = |y, x| w.double_value(&[0, 0, y, x]);
        assert!(at(5, 5) > 2.0 * at(0, 0), "corner {} background {}", at(5, 5), at(0, 0));
        assert!(at(5, 8) > 2.0 * at(8, 8), "edge {} inside {}", at(5, 8), at(8, 8));
        for i in 0..2 {
            let m = w.get(i).mean(Kind::Double).double_value(&[]);
            assert!((m - 1.0).abs() < 1e-5, "{m}");
        }
        assert!(edge_weights(&x, -1.0).is_err());
        assert!(edge_weights(&x, f64::NAN).is_err());
        assert!(
            edge_weights(&Tensor::zeros([3, 16, 16], (Kind::Float, Device::Cpu)), 1.0).is_err()
        );
    }

    #[test]
    fn unit_pixel_weights_leave_the_loss_unchanged() {
        let schedule = NoiseSchedule::karlo();
        let vlb = VlbLoss::new(&schedule);
        let _lock = unclip_scheduler::global_rng_lock();
        let x0 = Tensor::rand([2, 3, 8, 8], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let ones = Tensor::ones([2, 1, 8, 8], (Kind::Float, Device::Cpu));
        let twos = ones.copy() * 2.0;
        let _ = twos.narrow(0, 1, 1).fill_(0.0);
        let run = |w: Option<&Tensor>| {
            let mut rng = TorchNoise::new(9);
            let model = |x_t: &Tensor, _: &Tensor| Ok(Tensor::cat(&[x_t * 0.5, x_t * 0.1], 1));
            let l = diffusion_loss(
                &schedule,
                Timesteps::Uniform,
                PredictionType::VPrediction,
                &vlb,
                1e-3,
                &x0,
                w,
                &mut rng,
                model,
            )
            .unwrap();
            (l.loss.double_value(&[]), l.mse.double_value(&[]))
        };
        let (plain, plain_mse) = run(None);
        let (unit, unit_mse) = run(Some(&ones));
        assert!((plain - unit).abs() < 1e-9 * plain.abs().max(1.0), "{plain} {unit}");
        // Weights 2 on the first image, 0 on the second: only the loss moves, not the logged MSE.
        let (skewed, skewed_mse) = run(Some(&twos));
        assert!((skewed - plain).abs() > 1e-6, "{skewed} {plain}");
        assert_eq!((plain_mse, unit_mse), (skewed_mse, unit_mse));
    }
}
