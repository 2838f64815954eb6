//! Helpers shared by the facade's test files on the tiny fixture folders.
#![allow(dead_code)] // each test binary uses its own subset

use std::sync::Mutex;
use tch::{Device, Kind};
use unclip::{LoadOptions, TextToImage, Unclip};
use unclip_core::testing::fixture_path;

/// libtorch has one global generator: tests that draw hold this lock.
static RNG: Mutex<()> = Mutex::new(());

pub fn lock() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

/// The tiny text-to-image fixture pipeline.
pub fn t2i() -> Unclip {
    Unclip::from_pretrained(fixture_path("pipeline/text2img"), &LoadOptions::default()).unwrap()
}

/// [`t2i`] with the variation fixture's CLIP image encoder added.
pub fn with_image_encoder() -> Unclip {
    let mut m = t2i();
    let var = fixture_path("pipeline/variation");
    m.load_image_encoder(
        &var.join("image_encoder"),
        Some(&var.join("feature_extractor")),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    m
}

/// A text-to-image request of two steps per stage, seeded.
pub fn small(prompt: &str) -> TextToImage {
    TextToImage {
        prior_steps: 2,
        decoder_steps: 2,
        super_res_steps: 2,
        seed: Some(3),
        ..TextToImage::new(prompt)
    }
}
