//! Non-finite values and numeric arguments at their extremes, on the tiny fixture folders: NaN
//! inputs are refused naming the argument, a loop whose latents turn NaN stops naming its stage
//! and step, slerp between opposite embeddings is defined, absurd counts are argument errors,
//! and a CUDA device that is not there is the device error (not a panic inside tch).

use std::cell::Cell;
use std::path::Path;
use tch::{Device, Kind, Tensor};
use unclip::traits::TextConditioning;
use unclip::{
    DecodeOptions, Decoder, DecoderStep, Endpoint, Error, LoadOptions, Prior, Stage, Start,
    TextToImage, Unclip, Upsampler, Variations, no_progress,
};
use unclip_core::testing::fixture_path;

mod common;
use common::{lock, small, with_image_encoder as model};

fn dec() -> DecodeOptions {
    DecodeOptions { decoder_steps: 2, super_res_steps: 2, seed: Some(1), ..Default::default() }
}

fn image() -> image::DynamicImage {
    image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(20, 20, |x, y| {
        image::Rgb([(x * 12) as u8, 60, (y * 12) as u8])
    }))
}

fn finite(t: &Tensor) -> bool {
    bool::try_from(t.isfinite().all()).unwrap()
}

fn input_err<T: std::fmt::Debug>(r: unclip::Result<T>, names: &[&str]) {
    let e = r.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Input(_)), "{msg}");
    for n in names {
        assert!(msg.contains(n), "{n:?} not named in: {msg}");
    }
}

/// NaN or infinite embeddings and positions given to decode, interpolation and text diffs are
/// errors naming the argument, before any sampling.
#[test]
fn non_finite_inputs_are_refused_naming_the_argument() {
    let _g = lock();
    let mut m = model();
    let e = m.embed_images(&[image()]).unwrap();
    let d = e.size()[1];
    let nan = e.copy();
    let _ = nan.get(0).get(d - 1).fill_(f64::NAN);
    let inf = e.copy().fill_(f64::INFINITY);

    input_err(m.decode(&nan, &[""], &dec(), &mut no_progress), &["image_embeddings", "NaN"]);
    input_err(m.decode(&inf, &["a"], &dec(), &mut no_progress), &["image_embeddings"]);
    let ok = Endpoint::Embedding(e.shallow_clone());
    let bad = Endpoint::Embedding(nan.shallow_clone());
    input_err(m.interpolate(&bad, &ok, 3, &dec(), &mut no_progress), &["from"]);
    input_err(m.interpolate(&ok, &bad, 3, &dec(), &mut no_progress), &["to"]);
    input_err(unclip::slerp(&e, &nan, 0.5), &["slerp's b"]);
    let z = Tensor::zeros([d], (Kind::Float, Device::Cpu));
    input_err(unclip::text_diff_embedding(&nan, &z, &e, 0.5), &["z_image"]);
    let img = image();
    for (th, name) in [(1e308, "thetas[1]"), (f64::NAN, "thetas[1]"), (-1e308, "thetas[1]")] {
        input_err(
            m.text_diff(
                &img,
                "a photo",
                "a drawing",
                &[0.0, th],
                Start::Noise,
                &dec(),
                &mut no_progress,
            ),
            &[name],
        );
    }
    let pixels = Tensor::full([1, 3, 16, 16], f64::NAN, (Kind::Float, Device::Cpu));
    input_err(m.super_resolve(&pixels, 2, Some(0)), &["images"]);
}

/// Interpolating between an embedding and its exact opposite (a valid request) gives finite
/// frames along a defined half circle: the middle frame's embedding is orthogonal to both ends.
#[test]
fn opposite_embeddings_interpolate_to_finite_images() {
    let _g = lock();
    let mut m = model();
    let e = m.embed_images(&[image()]).unwrap();
    let mut opposite = || {
        m.interpolate(
            &Endpoint::Embedding(e.shallow_clone()),
            &Endpoint::Embedding(e.neg()),
            3,
            &dec(),
            &mut no_progress,
        )
        .unwrap()
    };
    let g = opposite();
    assert!(finite(&g.image_embeddings) && finite(&g.images), "NaN frames");
    let mid = g.image_embeddings.get(1);
    let cos = (mid.dot(&e.get(0)) / (mid.norm() * e.get(0).norm())).double_value(&[]);
    assert!(cos.abs() < 1e-5, "middle frame at cos {cos} to the start, not 90 degrees");
    let end = g.image_embeddings.get(2);
    assert!((end + e.get(0)).abs().max().double_value(&[]) < 1e-4, "ends at the opposite");
    // Same request, same frames.
    assert!(opposite().images.equal(&g.images));
}

/// The stage's predictions turn NaN from its second call on (a broken weight, say).
struct Poison {
    calls: Cell<usize>,
}

impl Poison {
    fn new() -> Self {
        Self { calls: Cell::new(0) }
    }

    fn apply(&self, out: Tensor) -> unclip::Result<Tensor> {
        let n = self.calls.get();
        self.calls.set(n + 1);
        Ok(if n >= 1 { out.f_full_like(f64::NAN)? } else { out })
    }
}

struct PoisonedPrior(Box<dyn Prior>, Poison);

impl Prior for PoisonedPrior {
    fn embedding_dim(&self) -> i64 {
        self.0.embedding_dim()
    }
    fn device(&self) -> Device {
        self.0.device()
    }
    fn kind(&self) -> Kind {
        self.0.kind()
    }
    fn predict(&self, latents: &Tensor, t: i64, text: &TextConditioning) -> unclip::Result<Tensor> {
        self.1.apply(self.0.predict(latents, t, text)?)
    }
    fn post_process(&self, latents: &Tensor) -> unclip::Result<Tensor> {
        self.0.post_process(latents)
    }
    fn save_pretrained(&self, dir: &Path) -> unclip::Result<()> {
        self.0.save_pretrained(dir)
    }
}

struct PoisonedDecoder(Box<dyn Decoder>, Poison);

struct PoisonedStep<'a>(Box<dyn DecoderStep + 'a>, &'a Poison);

impl DecoderStep for PoisonedStep<'_> {
    fn predict(&self, sample: &Tensor, t: i64) -> unclip::Result<Tensor> {
        self.1.apply(self.0.predict(sample, t)?)
    }
}

impl Decoder for PoisonedDecoder {
    fn sample_shape(&self) -> unclip::Result<(i64, i64, i64)> {
        self.0.sample_shape()
    }
    fn out_channels(&self) -> i64 {
        self.0.out_channels()
    }
    fn device(&self) -> Device {
        self.0.device()
    }
    fn kind(&self) -> Kind {
        self.0.kind()
    }
    fn prepare<'a>(
        &'a self,
        image_embeddings: &Tensor,
        text: &TextConditioning,
        guided: bool,
    ) -> unclip::Result<Box<dyn DecoderStep + 'a>> {
        self.1.calls.set(0);
        Ok(Box::new(PoisonedStep(self.0.prepare(image_embeddings, text, guided)?, &self.1)))
    }
    fn save_pretrained(&self, a: &Path, b: &Path) -> unclip::Result<()> {
        self.0.save_pretrained(a, b)
    }
}

struct PoisonedUpsampler(Box<dyn Upsampler>, Poison);

impl Upsampler for PoisonedUpsampler {
    fn sample_shape(&self) -> unclip::Result<(i64, i64, i64)> {
        self.0.sample_shape()
    }
    fn device(&self) -> Device {
        self.0.device()
    }
    fn kind(&self) -> Kind {
        self.0.kind()
    }
    fn condition(&self, image_small: &Tensor) -> unclip::Result<Tensor> {
        self.0.condition(image_small)
    }
    fn predict(&self, s: &Tensor, low: &Tensor, t: i64, last: bool) -> unclip::Result<Tensor> {
        self.1.apply(self.0.predict(s, low, t, last)?)
    }
    fn save_pretrained(&self, a: &Path, b: &Path) -> unclip::Result<()> {
        self.0.save_pretrained(a, b)
    }
}

fn assert_non_finite<T: std::fmt::Debug>(r: unclip::Result<T>, stage: Stage, step: usize) {
    let e = r.unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, Error::NonFinite { stage: s, step: n, total: 2 } if s == stage && n == step),
        "{msg}"
    );
    assert!(
        msg.contains(&stage.to_string()) && msg.contains(&format!("step {step} of 2")),
        "{msg}"
    );
}

/// A stage whose latents turn NaN stops the run with an error naming the stage and the step, in
/// every pipeline: text-to-image (prior, decoder, super-resolution), variations, interpolation,
/// text diffs.
#[test]
fn non_finite_loops_stop_naming_stage_and_step() {
    let _g = lock();
    let img = image();
    let mut m = model();
    let prior = m.prior.take().unwrap();
    m.prior = Some(Box::new(PoisonedPrior(prior, Poison::new())));
    assert_non_finite(m.text_to_image(&small("a horse"), &mut no_progress), Stage::Prior, 2);

    let mut m = model();
    let decoder = std::mem::replace(&mut m.decoder, model().decoder);
    m.decoder = Box::new(PoisonedDecoder(decoder, Poison::new()));
    assert_non_finite(m.text_to_image(&small("a horse"), &mut no_progress), Stage::Decoder, 2);
    let var = Variations { decode: dec(), ..Default::default() };
    assert_non_finite(
        m.variations(std::slice::from_ref(&img), &var, &mut no_progress),
        Stage::Decoder,
        2,
    );
    let ends = (Endpoint::Image(img.clone()), Endpoint::Image(img.clone()));
    assert_non_finite(
        m.interpolate(&ends.0, &ends.1, 2, &dec(), &mut no_progress),
        Stage::Decoder,
        2,
    );
    assert_non_finite(
        m.text_diff(
            &img,
            "a photo",
            "a drawing",
            &[0.0, 0.5],
            Start::Noise,
            &dec(),
            &mut no_progress,
        ),
        Stage::Decoder,
        2,
    );
    // The inversion loop of DDIM-inversion variations is checked the same way.
    let inv = Variations {
        decode: dec(),
        start: Start::DdimInversion { eta: 0.0 },
        ..Default::default()
    };
    assert_non_finite(
        m.variations(std::slice::from_ref(&img), &inv, &mut no_progress),
        Stage::Inversion,
        2,
    );

    let mut m = model();
    let up = m.upsampler.take().unwrap();
    m.upsampler = Some(Box::new(PoisonedUpsampler(up, Poison::new())));
    assert_non_finite(m.text_to_image(&small("a horse"), &mut no_progress), Stage::SuperRes, 2);
}

/// Counts at their extremes (usize::MAX, just above the per-call limit, products that overflow)
/// are argument errors naming the argument, never a panic or a libtorch "repeats must be
/// non-negative".
#[test]
fn extreme_counts_are_argument_errors() {
    let _g = lock();
    let mut m = model();
    let img = image();
    let max = unclip::pipeline::MAX_BATCH;
    let mut t2i = |r: TextToImage| m.text_to_image(&r, &mut no_progress);
    input_err(
        t2i(TextToImage { num_images_per_prompt: usize::MAX, ..small("x") }),
        &["num_images_per_prompt"],
    );
    input_err(
        t2i(TextToImage { prior_candidates: usize::MAX, ..small("x") }),
        &["prior_candidates"],
    );
    input_err(
        t2i(TextToImage { num_images_per_prompt: max + 1, ..small("x") }),
        &["num_images_per_prompt"],
    );
    input_err(
        t2i(TextToImage { num_images_per_prompt: 2048, prior_candidates: 1024, ..small("x") }),
        &["num_images_per_prompt (2048)", "prior_candidates (1024)", "prompts (1)"],
    );
    assert!(t2i(TextToImage { decoder_steps: usize::MAX, ..small("x") }).is_err());
    assert!(t2i(TextToImage { prior_steps: usize::MAX, ..small("x") }).is_err());
    input_err(
        t2i(TextToImage { prior_guidance_scale: f64::MAX * 2.0, ..small("x") }),
        &["prior_guidance_scale"],
    );

    input_err(m.generate_reranked(&small("x"), usize::MAX, &mut no_progress), &["rerank"]);
    let var = Variations { num_images_per_image: usize::MAX, decode: dec(), ..Default::default() };
    input_err(
        m.variations(std::slice::from_ref(&img), &var, &mut no_progress),
        &["num_images_per_image"],
    );
    let ends = (Endpoint::Image(img.clone()), Endpoint::Image(img.clone()));
    input_err(m.interpolate(&ends.0, &ends.1, usize::MAX, &dec(), &mut no_progress), &["frames"]);
    let eta = Variations {
        decode: dec(),
        start: Start::DdimInversion { eta: f64::NAN },
        ..Default::default()
    };
    input_err(m.variations(std::slice::from_ref(&img), &eta, &mut no_progress), &["eta"]);
    let steps = DecodeOptions { super_res_steps: usize::MAX, ..dec() };
    assert!(m.interpolate(&ends.0, &ends.1, 2, &steps, &mut no_progress).is_err());
    // The largest seed is a seed like any other (the second endpoint's seed wraps).
    let seeded = DecodeOptions { seed: Some(u64::MAX), ..dec() };
    let far = Endpoint::Prompt("a horse".into());
    assert!(m.interpolate(&far, &far, 2, &seeded, &mut no_progress).is_ok());
}

/// A component placed on a CUDA device that is not there is the device error, from every entry
/// point, not a panic inside tch.
#[test]
fn absent_cuda_devices_are_device_errors() {
    let absent = if unclip_core::cuda_available() { Device::Cuda(4096) } else { Device::Cuda(0) };
    let dir = fixture_path("pipeline/text2img");
    let check = |e: String| assert!(e.contains("CUDA was requested"), "{e}");
    check(
        Unclip::from_pretrained(&dir, &LoadOptions::new(absent, Kind::Float))
            .unwrap_err()
            .to_string(),
    );
    let one = LoadOptions::default().component("decoder", absent, Kind::Float);
    check(Unclip::from_pretrained(&dir, &one).unwrap_err().to_string());
    let mut m = model();
    let var = fixture_path("pipeline/variation");
    check(
        m.load_image_encoder(&var.join("image_encoder"), None, absent, Kind::Float)
            .unwrap_err()
            .to_string(),
    );
    check(
        unclip::prior::PriorTransformer::from_pretrained(&dir.join("prior"), absent, Kind::Float)
            .unwrap_err()
            .to_string(),
    );
    check(
        unclip::decoder::checkpoint::load::<unclip::decoder::UNet2DConditionModel>(
            &dir.join("decoder"),
            absent,
            Kind::Float,
        )
        .unwrap_err()
        .to_string(),
    );
    check(
        unclip::clip::ClipModel::load(
            &dir.join("text_encoder"),
            unclip::clip::Towers::Text,
            absent,
            Kind::Float,
        )
        .unwrap_err()
        .to_string(),
    );
}
