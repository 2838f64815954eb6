//! Behaviour of the facade on the tiny fixture folders: errors instead of panics, save/load
//! round trip, reproducibility, best-of-N, reranking, swapped stages, variations from DDIM
//! inversion, interpolation, text diffs.

use std::path::Path;
use tch::{Device, Kind, Tensor};
use unclip::{
    DecodeOptions, Endpoint, Error, LoadOptions, Start, TextToImage, Unclip, Variations,
    no_progress,
};
use unclip_core::testing::{fixture_path, max_abs_diff};

mod common;
use common::{lock, small, t2i, with_image_encoder};

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("unclip-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dst = to.join(p.file_name().unwrap());
        if p.is_dir() { copy_dir(&p, &dst) } else { std::fs::copy(&p, &dst).map(|_| ()).unwrap() }
    }
}

#[test]
fn folders_that_are_not_checkpoints_are_errors_listing_problems() {
    let e = Unclip::from_pretrained("/nonexistent/karlo", &LoadOptions::default()).unwrap_err();
    assert!(matches!(e, Error::Checkpoint { .. }), "{e}");
    let e =
        Unclip::from_pretrained(fixture_path("clip/full"), &LoadOptions::default()).unwrap_err();
    assert!(e.to_string().contains("model_index.json"), "{e}");

    let d = tmp("broken");
    copy_dir(&fixture_path("pipeline/text2img"), &d);
    std::fs::remove_dir_all(d.join("prior")).unwrap();
    std::fs::remove_file(d.join("decoder/diffusion_pytorch_model.safetensors")).unwrap();
    let msg = Unclip::from_pretrained(&d, &LoadOptions::default()).unwrap_err().to_string();
    assert!(msg.contains("missing folder prior/"), "{msg}");
    assert!(msg.contains("missing decoder/diffusion_pytorch_model.safetensors"), "{msg}");

    // A component with a wrong tensor shape names the component.
    let d2 = tmp("misshapen");
    copy_dir(&fixture_path("pipeline/text2img"), &d2);
    let cfg = d2.join("text_proj/config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"time_embed_dim\": 64", "\"time_embed_dim\": 48");
    std::fs::write(&cfg, text).unwrap();
    let e = Unclip::from_pretrained(&d2, &LoadOptions::default()).unwrap_err();
    assert!(matches!(&e, Error::Component { name, .. } if name == "text_proj"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::remove_dir_all(&d2);

    let bad = LoadOptions::default().component("unet", Device::Cpu, Kind::Float);
    assert!(Unclip::from_pretrained(fixture_path("pipeline/text2img"), &bad).is_err());
    let bad = LoadOptions::new(Device::Cpu, Kind::Int64);
    assert!(Unclip::from_pretrained(fixture_path("pipeline/text2img"), &bad).is_err());
}

#[test]
fn bad_requests_are_errors() {
    let mut m = t2i();
    let mut run = |r: TextToImage| m.text_to_image(&r, &mut no_progress).unwrap_err();
    assert!(matches!(run(TextToImage::new("  ")), Error::Input(_)));
    assert!(matches!(run(TextToImage { prompts: vec![], ..small("x") }), Error::Input(_)));
    assert!(matches!(run(TextToImage { prior_steps: 0, ..small("x") }), Error::Input(_)));
    assert!(matches!(run(TextToImage { decoder_steps: 0, ..small("x") }), Error::Input(_)));
    assert!(matches!(run(TextToImage { super_res_steps: 0, ..small("x") }), Error::Input(_)));
    assert!(matches!(run(TextToImage { num_images_per_prompt: 0, ..small("x") }), Error::Input(_)));
    assert!(matches!(
        run(TextToImage { prior_guidance_scale: 0.0, ..small("x") }),
        Error::Input(_)
    ));
    assert!(matches!(
        run(TextToImage { decoder_guidance_scale: -1.0, ..small("x") }),
        Error::Input(_)
    ));
    assert!(matches!(
        run(TextToImage { decoder_guidance_scale: f64::NAN, ..small("x") }),
        Error::Input(_)
    ));
    assert!(matches!(
        run(TextToImage { prior_guidance_scale: f64::INFINITY, ..small("x") }),
        Error::Input(_)
    ));
    // No image encoder in a text-to-image folder.
    let img = image::DynamicImage::new_rgb8(8, 8);
    assert!(matches!(
        m.variations(&[img], &Variations::default(), &mut no_progress),
        Err(Error::Pipeline(_))
    ));
    assert!(matches!(
        unclip::output::open_image(Path::new("/nonexistent.png")),
        Err(Error::Image { .. })
    ));
    let not_png = tmp("notpng.png");
    std::fs::write(&not_png, b"hello").unwrap();
    assert!(matches!(unclip::output::open_image(&not_png), Err(Error::Image { .. })));
    let _ = std::fs::remove_file(&not_png);
}

#[test]
fn long_prompts_are_truncated_and_reported() {
    let _g = lock();
    let mut m = t2i();
    let long = "a red house by the sea ".repeat(30);
    let out = m.text_to_image(&small(&long), &mut no_progress).unwrap();
    assert_eq!(out.warnings.len(), 1, "{:?}", out.warnings);
    assert!(out.warnings[0].contains("truncated"));
    assert_eq!(out.images.size(), [1, 3, 32, 32]);
}

#[test]
fn seeds_reproduce_and_callbacks_see_every_step() {
    let _g = lock();
    let mut m = t2i();
    let mut seen = Vec::new();
    let a = m
        .text_to_image(&small("horse"), &mut |s| seen.push((s.stage, s.step, s.total, s.timestep)))
        .unwrap();
    let b = m.text_to_image(&small("horse"), &mut no_progress).unwrap();
    assert!(a.images.equal(&b.images));
    let c = m
        .text_to_image(&TextToImage { seed: Some(4), ..small("horse") }, &mut no_progress)
        .unwrap();
    assert!(max_abs_diff(&a.images, &c.images) > 1e-3);
    use unclip::Stage::*;
    assert_eq!(
        seen,
        [
            (Prior, 0, 2, 999),
            (Prior, 1, 2, 0),
            (Decoder, 0, 2, 999),
            (Decoder, 1, 2, 0),
            (SuperRes, 0, 2, 999),
            (SuperRes, 1, 2, 0)
        ]
    );
    assert_eq!(a.image_small.size(), [1, 3, 16, 16]);
    assert_eq!(a.image_embeddings.size(), [1, 32]);
}

#[test]
fn save_pretrained_round_trips() {
    let _g = lock();
    let mut m = with_image_encoder();
    let d = tmp("saved");
    // Karlo's sampling settings are not written; others are, and come back.
    m.save_pretrained(&d).unwrap();
    assert!(!d.join("sampling_config.json").exists());
    m.sampling.decoder_guidance_scale = 3.0;
    m.save_pretrained(&d).unwrap();
    for f in [
        "model_index.json",
        "prior/config.json",
        "text_proj/diffusion_pytorch_model.safetensors",
        "super_res_last/config.json",
        "decoder_scheduler/scheduler_config.json",
        "tokenizer/tokenizer.json",
        "image_encoder/model.safetensors",
        "feature_extractor/preprocessor_config.json",
        "sampling_config.json",
    ] {
        assert!(d.join(f).is_file(), "{f} not written");
    }
    let mut back = Unclip::from_pretrained(&d, &LoadOptions::default()).unwrap();
    assert!(back.image_encoder.is_some());
    assert_eq!(back.sampling, m.sampling);
    let a = m.text_to_image(&small("horse"), &mut no_progress).unwrap();
    let b = back.text_to_image(&small("horse"), &mut no_progress).unwrap();
    assert!(a.images.equal(&b.images));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn per_component_dtype_loads() {
    let _g = lock();
    let opts = LoadOptions::new(Device::Cpu, Kind::Float).component(
        "decoder",
        Device::Cpu,
        Kind::BFloat16,
    );
    let mut m = Unclip::from_pretrained(fixture_path("pipeline/text2img"), &opts).unwrap();
    assert_eq!(m.decoder.kind(), Kind::BFloat16);
    let lo = m.text_to_image(&small("horse"), &mut no_progress).unwrap();
    assert_eq!(lo.images.kind(), Kind::Float);
    assert!(bool::try_from(lo.images.isfinite().all()).unwrap());
    // One decoder evaluation in bf16 vs f32 on the same inputs: close, not equal. (Whole
    // images are not compared: sampling at t = 999 amplifies any difference ~1e4 times.)
    let hi = t2i();
    let text = hi.encode_prompts(&["horse"]).unwrap().conditioning;
    tch::manual_seed(0);
    let emb = Tensor::randn([1, 32], (Kind::Float, Device::Cpu));
    let x = Tensor::randn([1, 3, 16, 16], (Kind::Float, Device::Cpu));
    let a = m.decoder.prepare(&emb, &text, false).unwrap().predict(&x, 500).unwrap();
    let b = hi.decoder.prepare(&emb, &text, false).unwrap().predict(&x, 500).unwrap();
    assert_eq!(a.kind(), Kind::BFloat16);
    let (d, scale) = (max_abs_diff(&a, &b), b.abs().max().double_value(&[]));
    assert!(d > 0.0 && d < 0.05 * scale, "bf16 vs f32 decoder output: {d} (max {scale})");
}

#[test]
fn whole_pipeline_runs_in_bf16_on_the_cpu() {
    // libtorch's CPU antialiased bicubic resize (the upsampler's input) has no bf16 kernel;
    // `resize_bicubic_aa` resizes in f32 for it. diffusers' pipeline fails here.
    let _g = lock();
    let opts = LoadOptions::new(Device::Cpu, Kind::BFloat16);
    let mut m = Unclip::from_pretrained(fixture_path("pipeline/text2img"), &opts).unwrap();
    let up = m.upsampler.as_deref().expect("the fixture has upsamplers");
    assert_eq!(up.kind(), Kind::BFloat16);
    let out = m.text_to_image(&small("horse"), &mut no_progress).unwrap();
    assert_eq!(out.images.size(), [1, 3, 32, 32]);
    assert!(bool::try_from(out.images.isfinite().all()).unwrap());
}

#[test]
fn the_prior_alone_draws_what_text_to_image_decodes() {
    let _g = lock();
    let mut m = t2i();
    for req in [
        TextToImage {
            prompts: vec!["horse".into(), "a red house".into()],
            num_images_per_prompt: 2,
            ..small("")
        },
        TextToImage { prior_candidates: 3, ..small("horse") },
        TextToImage { prior_guidance_scale: 1.0, decoder_guidance_scale: 1.0, ..small("horse") },
    ] {
        let full = m.text_to_image(&req, &mut no_progress).unwrap();
        let alone = m.prior_image_embeddings(&req).unwrap();
        assert!(alone.equal(&full.image_embeddings), "{req:?}");
    }
    // Another seed, another draw; bad requests are errors, as for text_to_image.
    let five = TextToImage { prior_steps: 5, ..small("horse") };
    let a = m.prior_image_embeddings(&five).unwrap();
    let b = m.prior_image_embeddings(&TextToImage { seed: Some(4), ..five.clone() }).unwrap();
    // (The fixture's random prior barely depends on its noise: 7.5e-4 apart here.)
    assert!(max_abs_diff(&a, &b) > 1e-5);
    for (req, says) in [
        (small(" "), "prompt 0 is empty"),
        (TextToImage { prior_steps: 0, ..small("horse") }, "prior_steps"),
        (TextToImage { prior_candidates: 0, ..small("horse") }, "prior_candidates"),
        (TextToImage { prior_guidance_scale: f64::NAN, ..small("horse") }, "prior_guidance"),
    ] {
        let e = m.prior_image_embeddings(&req).unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
    }
    m.prior = None;
    let e = m.prior_image_embeddings(&small("horse")).unwrap_err().to_string();
    assert!(e.contains("no prior"), "{e}");
}

#[test]
fn best_of_n_keeps_the_candidate_closest_to_the_text() {
    let _g = lock();
    let mut m = t2i();
    let req = TextToImage {
        prior_candidates: 3,
        prompts: vec!["horse".into(), "a red house".into()],
        ..small("")
    };
    let out = m.text_to_image(&req, &mut no_progress).unwrap();
    let c = out.candidates.as_ref().unwrap();
    assert_eq!(c.embeddings.size(), [3, 2, 32]);
    let best = c.scores.argmax(0, false);
    assert!(best.equal(&c.chosen));
    for i in 0..2 {
        let k = c.chosen.int64_value(&[i]);
        assert!(out.image_embeddings.get(i).equal(&c.embeddings.get(k).get(i)));
    }
}

#[test]
fn decoder_best_of_n_upsamples_the_decoder_image_closest_to_the_text() {
    let _g = lock();
    let mut m = with_image_encoder();
    let req = TextToImage {
        decoder_candidates: 3,
        prompts: vec!["horse".into(), "a red house".into()],
        ..small("")
    };
    let out = m.text_to_image(&req, &mut no_progress).unwrap();
    assert_eq!(out.images.size()[0], 2);
    assert!(out.candidates.is_none());
    let c = out.decoder_candidates.as_ref().unwrap();
    assert_eq!(c.scores.size(), [3, 2]);
    assert!(c.scores.argmax(0, false).equal(&c.chosen));
    // The decoder image kept (and upsampled) is the candidate that was scored best.
    let unit = (&out.image_small * 0.5 + 0.5).clamp(0.0, 1.0);
    let kept = m.image_encoder.as_ref().unwrap().embed_tensor(&unit).unwrap();
    for i in 0..2 {
        let k = c.chosen.int64_value(&[i]);
        assert!(max_abs_diff(&kept.get(i), &c.embeddings.get(k).get(i)) < 1e-5);
    }
    let err = t2i().text_to_image(&req, &mut no_progress).unwrap_err();
    assert!(err.to_string().contains("decoder_candidates"), "{err}");
    let zero = TextToImage { decoder_candidates: 0, ..req };
    assert!(m.text_to_image(&zero, &mut no_progress).is_err());
}

#[test]
fn reranking_orders_by_clip_similarity() {
    let _g = lock();
    let mut m = with_image_encoder();
    let r = m.generate_reranked(&small("horse"), 3, &mut no_progress).unwrap();
    assert_eq!(r.generation.images.size()[0], 3);
    assert!(r.scores.windows(2).all(|w| w[0] >= w[1]), "{:?}", r.scores);
    // The scores are the similarities of the returned images.
    let text = m.encode_prompts(&["horse"]).unwrap().conditioning.text_embeds;
    let img = m.image_encoder.as_ref().unwrap().embed_tensor(&r.generation.images).unwrap();
    let sims = Tensor::cosine_similarity(&img, &text.expand([3, -1], false), 1, 1e-8);
    assert!((sims.double_value(&[0]) - r.scores[0]).abs() < 1e-5);
    assert!(t2i().generate_reranked(&small("horse"), 2, &mut no_progress).is_err());
}

#[test]
fn stages_can_be_swapped() {
    let _g = lock();
    let mut m = t2i();
    // No upsampler: the decoder's image is the output.
    m.upsampler = None;
    let out = m.text_to_image(&small("horse"), &mut no_progress).unwrap();
    assert_eq!(out.images.size(), [1, 3, 16, 16]);
    let expect = (out.image_small.shallow_clone() * 0.5 + 0.5).clamp(0.0, 1.0);
    assert!(out.images.equal(&expect));
    // A DDIM decoder sampler (consumes only the noise channels).
    let ddim = unclip::scheduler::DdimScheduler::new(unclip::scheduler::DdimSchedulerConfig {
        beta_schedule: unclip::scheduler::BetaSchedule::SquaredcosCapV2,
        ..Default::default()
    })
    .unwrap();
    m.decoder_scheduler = Box::new(ddim);
    m.decoder_learned_variance = false;
    let out = m.text_to_image(&small("horse"), &mut no_progress).unwrap();
    assert!(bool::try_from(out.images.isfinite().all()).unwrap());
}

#[test]
fn variations_interpolation_and_text_diffs_run() {
    let _g = lock();
    let mut m =
        Unclip::from_pretrained(fixture_path("pipeline/variation"), &LoadOptions::default())
            .unwrap();
    let img = unclip::output::open_image(&fixture_path("pipeline/input.png")).unwrap();
    let dec = DecodeOptions {
        decoder_steps: 4,
        decoder_guidance_scale: 2.0,
        super_res_steps: 2,
        seed: Some(1),
    };
    // From the DDIM inversion of the image, eta 0: deterministic, and different from noise.
    let inv =
        Variations { decode: dec, start: Start::DdimInversion { eta: 0.0 }, ..Default::default() };
    let mut stages = Vec::new();
    let a = m.variations(std::slice::from_ref(&img), &inv, &mut |s| stages.push(s.stage)).unwrap();
    assert_eq!(&stages[..4], [unclip::Stage::Inversion; 4]);
    let b = m.variations(std::slice::from_ref(&img), &inv, &mut no_progress).unwrap();
    assert!(a.images.equal(&b.images));
    let n = m
        .variations(
            std::slice::from_ref(&img),
            &Variations { decode: dec, ..Default::default() },
            &mut no_progress,
        )
        .unwrap();
    assert!(max_abs_diff(&a.image_small, &n.image_small) > 1e-3);

    // Interpolation: ends are the two embeddings, frames share their noise.
    let other = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(20, 20, |x, y| {
        image::Rgb([(x * 12) as u8, (y * 12) as u8, 90])
    }));
    let g = m
        .interpolate(
            &Endpoint::Image(img.clone()),
            &Endpoint::Image(other.clone()),
            3,
            &dec,
            &mut no_progress,
        )
        .unwrap();
    assert_eq!(g.images.size()[0], 3);
    let ea = m.embed_images(std::slice::from_ref(&img)).unwrap();
    let eb = m.embed_images(std::slice::from_ref(&other)).unwrap();
    assert!(max_abs_diff(&g.image_embeddings.get(0), &ea.get(0)) < 1e-5);
    assert!(max_abs_diff(&g.image_embeddings.get(2), &eb.get(0)) < 1e-5);
    // Same embedding twice -> identical frames (shared noise).
    let same = m
        .interpolate(
            &Endpoint::Embedding(ea.shallow_clone()),
            &Endpoint::Embedding(ea.shallow_clone()),
            2,
            &dec,
            &mut no_progress,
        )
        .unwrap();
    assert!(max_abs_diff(&same.images.get(0), &same.images.get(1)) < 1e-6);
    // A prompt endpoint needs a prior, which a variation folder lacks.
    assert!(
        m.interpolate(
            &Endpoint::Prompt("horse".into()),
            &Endpoint::Image(img.clone()),
            2,
            &dec,
            &mut no_progress
        )
        .is_err()
    );

    // Text diffs: theta 0 is the image's own embedding.
    let g = m
        .text_diff(
            &img,
            "a photo of noise",
            "a photo of a horse",
            &[0.0, 0.25, 0.5],
            Start::Noise,
            &dec,
            &mut no_progress,
        )
        .unwrap();
    assert_eq!(g.images.size()[0], 3);
    assert!(max_abs_diff(&g.image_embeddings.get(0), &ea.get(0)) < 1e-4);
    assert!(m.text_diff(&img, "", "horse", &[0.5], Start::Noise, &dec, &mut no_progress).is_err());
    assert!(m.text_diff(&img, "a", "b", &[], Start::Noise, &dec, &mut no_progress).is_err());
    let g = m
        .text_diff(
            &img,
            "a photo of noise",
            "a horse",
            &[0.3],
            Start::DdimInversion { eta: 0.0 },
            &dec,
            &mut no_progress,
        )
        .unwrap();
    assert_eq!(g.images.size(), [1, 3, 32, 32]);
}

#[test]
fn outputs_write_pngs() {
    let _g = lock();
    let mut m = t2i();
    let out = m.text_to_image(&small("horse"), &mut no_progress).unwrap();
    let d = tmp("pngs");
    let paths = unclip::output::save_pngs(&out.images, &d, "img-").unwrap();
    let back = image::open(&paths[0]).unwrap().to_rgb8();
    assert_eq!(back, unclip::output::to_rgb_images(&out.images).unwrap()[0]);
    let arr = unclip::output::to_ndarray(&out.images).unwrap();
    assert_eq!(arr.dim(), (1, 32, 32, 3));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn negative_prompt_and_unguided_runs() {
    let _g = lock();
    let mut m = t2i();
    let base = m.text_to_image(&small("horse"), &mut no_progress).unwrap();
    let explicit = TextToImage { negative_prompt: String::new(), ..small("horse") };
    assert!(m.text_to_image(&explicit, &mut no_progress).unwrap().images.equal(&base.images));
    let neg = TextToImage { negative_prompt: "a red house".into(), ..small("horse") };
    let other = m.text_to_image(&neg, &mut no_progress).unwrap();
    assert!(max_abs_diff(&other.image_embeddings, &base.image_embeddings) > 1e-4);
    // Both scales <= 1: no guidance batch, the prior sees one row per image. A user-supplied
    // prior wrapping the loaded one records what it is given.
    struct Counting {
        inner: Box<dyn unclip::Prior>,
        rows: std::rc::Rc<std::cell::RefCell<Vec<i64>>>,
    }
    impl unclip::Prior for Counting {
        fn embedding_dim(&self) -> i64 {
            self.inner.embedding_dim()
        }
        fn device(&self) -> Device {
            self.inner.device()
        }
        fn kind(&self) -> Kind {
            self.inner.kind()
        }
        fn predict(
            &self,
            x: &Tensor,
            t: i64,
            text: &unclip::traits::TextConditioning,
        ) -> unclip::Result<Tensor> {
            self.rows.borrow_mut().push(x.size()[0]);
            self.inner.predict(x, t, text)
        }
        fn post_process(&self, x: &Tensor) -> unclip::Result<Tensor> {
            self.inner.post_process(x)
        }
        fn save_pretrained(&self, dir: &Path) -> unclip::Result<()> {
            self.inner.save_pretrained(dir)
        }
    }
    let rows = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let inner = m.prior.take().unwrap();
    m.prior = Some(Box::new(Counting { inner, rows: rows.clone() }));
    m.text_to_image(&small("horse"), &mut no_progress).unwrap();
    assert_eq!(*rows.borrow(), [2, 2]);
    rows.borrow_mut().clear();
    let plain =
        TextToImage { prior_guidance_scale: 1.0, decoder_guidance_scale: 0.5, ..small("horse") };
    let out = m.text_to_image(&plain, &mut no_progress).unwrap();
    assert_eq!(*rows.borrow(), [1, 1]);
    assert!(bool::try_from(out.images.isfinite().all()).unwrap());
}

#[test]
fn super_resolution_runs_alone_and_checks_its_input() {
    let _g = lock();
    let mut m = t2i();
    let (_, h, w) = m.upsampler.as_ref().unwrap().sample_shape().unwrap();
    let (_, hs, ws) = m.decoder.sample_shape().unwrap();
    let small = Tensor::rand([2, 3, hs, ws], (Kind::Float, Device::Cpu));
    let a = m.super_resolve(&small, 2, Some(5)).unwrap();
    assert_eq!(a.size(), [2, 3, h, w]);
    assert!(a.min().double_value(&[]) >= 0.0 && a.max().double_value(&[]) <= 1.0);
    let b = m.super_resolve(&small, 2, Some(5)).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0, "same seed, same images");
    let c = m.super_resolve(&small, 2, Some(6)).unwrap();
    assert!(max_abs_diff(&a, &c) > 0.0, "another seed, other images");
    let err = |r: unclip::Result<Tensor>| r.unwrap_err();
    assert!(matches!(err(m.super_resolve(&small, 0, None)), Error::Input(_)));
    let gray = Tensor::rand([2, 1, hs, ws], (Kind::Float, Device::Cpu));
    assert!(matches!(err(m.super_resolve(&gray, 2, None)), Error::Input(_)));
    assert!(matches!(err(m.super_resolve(&Tensor::from(0.5f32), 2, None)), Error::Input(_)));
    m.upsampler = None;
    assert!(matches!(err(m.super_resolve(&small, 2, None)), Error::Input(_)));
}
