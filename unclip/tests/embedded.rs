//! The embedded default model (`models/shapes/`, committed, trained by `train_embedded`) end to
//! end: loaded through `from_pretrained` and sampled from held-out prompts (attribute
//! combinations never seen in training). Short sampler settings keep this to seconds on the CPU.
//!
//! What is asserted is what the model reliably does today: its images sit closer, in its own
//! CLIP space, to their own prompt than to the other prompts. The analytic checker's accuracies
//! (background, color, shape, position) are far below the targets of issue #8 for now and are
//! reported by `cargo run --release --example evaluate` instead of asserted here.

use std::path::PathBuf;
use unclip::clip::similarity;
use unclip::shapes::{PromptKind, SceneGenerator, Split, caption};
use unclip::tch::{Device, Kind};
use unclip::{LoadOptions, TextToImage, Unclip};

fn load() -> Unclip {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/shapes");
    Unclip::from_pretrained(dir, &LoadOptions::new(Device::Cpu, Kind::Float))
        .expect("models/shapes is committed and loads")
}

fn request(prompts: Vec<String>, seed: u64) -> TextToImage {
    TextToImage {
        prompts,
        prior_steps: 10,
        decoder_steps: 10,
        super_res_steps: 3,
        seed: Some(seed),
        ..TextToImage::default()
    }
}

#[test]
fn held_out_prompts_give_images_closest_to_their_own_prompt() {
    let mut model = load();
    let generator = SceneGenerator::new(Split::HeldOut, 7).with_kinds(&[PromptKind::Single]);
    let prompts: Vec<String> = (0..8).map(|i| caption(&generator.scene(i))).collect();
    let out = model.text_to_image(&request(prompts.clone(), 0), &mut unclip::no_progress).unwrap();
    assert_eq!(out.images.size(), [8, 3, 64, 64]);
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let text = model.clip_text_embeddings(&refs).unwrap();
    let image = model.clip_image_embeddings(&out.images).unwrap();
    // (8, 8) cosines: row i = image i against every prompt.
    let sims = similarity(&image, &text, None).unwrap();
    let own = sims.diagonal(0, 0, 1).mean(Kind::Float).double_value(&[]);
    let other = (sims.sum(Kind::Float).double_value(&[]) - 8.0 * own) / 56.0;
    // The evaluation over 350 held-out prompts measured 0.32 against 0.02.
    assert!(own > other + 0.1, "own prompt {own:.3}, other prompts {other:.3}");
}

#[test]
fn the_readme_prompt_gives_the_same_image_for_the_same_seed() {
    let mut model = load();
    let prompt = || vec!["a red circle on a blue background".to_string()];
    let a = model.text_to_image(&request(prompt(), 3), &mut unclip::no_progress).unwrap();
    let b = model.text_to_image(&request(prompt(), 3), &mut unclip::no_progress).unwrap();
    let c = model.text_to_image(&request(prompt(), 4), &mut unclip::no_progress).unwrap();
    assert!(a.images.equal(&b.images), "same seed, same image");
    assert!(!a.images.equal(&c.images), "another seed, another image");
    let (lo, hi) = (a.images.min().double_value(&[]), a.images.max().double_value(&[]));
    assert!((0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi) && hi - lo > 0.2);
}
