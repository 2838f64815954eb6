//! A second super-resolution stage (`super_res_2/`, run after Karlo's upsamplers): loaded when
//! `model_index.json` lists it, run on the first upsampler's output, saved back, and refused with
//! a named error when its sampler is missing. Built from the tiny fixture by reusing its
//! convolutional upsampler at twice the size.

mod common;

use common::{lock, small};
use serde_json::Value;
use std::path::{Path, PathBuf};
use unclip::{LoadOptions, Unclip};
use unclip_core::fsutil::{copy_tree, scratch_dir};
use unclip_core::testing::fixture_path;

fn read(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn write(p: &Path, v: &Value) {
    std::fs::write(p, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

/// The text-to-image fixture with `super_res_2` = its first upsampler at twice the sample size.
fn cascade_fixture(tag: &str) -> (PathBuf, i64) {
    let dir = scratch_dir(tag).unwrap().join("model");
    copy_tree(&fixture_path("pipeline/text2img"), &dir).unwrap();
    copy_tree(&dir.join("super_res_first"), &dir.join("super_res_2")).unwrap();
    copy_tree(&dir.join("super_res_scheduler"), &dir.join("super_res_2_scheduler")).unwrap();
    let cfg_path = dir.join("super_res_2/config.json");
    let mut cfg = read(&cfg_path);
    let side = cfg["sample_size"].as_i64().unwrap() * 2;
    cfg["sample_size"] = side.into();
    write(&cfg_path, &cfg);
    let mut index = read(&dir.join("model_index.json"));
    index["super_res_2"] = serde_json::json!(["diffusers", "UNet2DModel"]);
    index["super_res_2_scheduler"] = serde_json::json!(["diffusers", "UnCLIPScheduler"]);
    write(&dir.join("model_index.json"), &index);
    (dir, side)
}

#[test]
fn second_upsampler_runs_after_the_first_and_round_trips() {
    let _g = lock();
    let (dir, side) = cascade_fixture("cascade-run");
    let mut m = Unclip::from_pretrained(&dir, &LoadOptions::default()).unwrap();
    assert!(m.upsampler_2.is_some());
    let first_side = m.upsampler.as_ref().unwrap().sample_shape().unwrap().1;
    let req = small("a red circle");
    let g = m.text_to_image(&req, &mut unclip::no_progress).unwrap();
    assert_eq!(g.images.size(), [1, 3, side, side]);
    assert!(side > first_side);
    assert!(bool::try_from(g.images.isfinite().all()).unwrap());
    // The decoder's image is unchanged by the extra stage.
    let mut plain =
        Unclip::from_pretrained(fixture_path("pipeline/text2img"), &LoadOptions::default())
            .unwrap();
    let p = plain.text_to_image(&req, &mut unclip::no_progress).unwrap();
    assert_eq!(p.images.size(), [1, 3, first_side, first_side]);
    assert!(p.image_small.equal(&g.image_small));

    // Saved and loaded back: same components, same images bit for bit.
    let saved = dir.parent().unwrap().join("saved");
    m.save_pretrained(&saved).unwrap();
    let index = read(&saved.join("model_index.json"));
    assert!(index.get("super_res_2").is_some() && index.get("super_res_2_scheduler").is_some());
    let mut back = Unclip::from_pretrained(&saved, &LoadOptions::default()).unwrap();
    let again = back.text_to_image(&req, &mut unclip::no_progress).unwrap();
    assert!(again.images.equal(&g.images));
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

#[test]
fn a_listed_second_upsampler_without_its_sampler_is_named() {
    let (dir, _) = cascade_fixture("cascade-missing");
    std::fs::remove_dir_all(dir.join("super_res_2_scheduler")).unwrap();
    let e = Unclip::from_pretrained(&dir, &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("super_res_2_scheduler"), "{e}");
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}
