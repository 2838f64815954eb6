//! The real Karlo configs (`fixtures/data/decoder/karlo/*/config.json`, written by diffusers) build
//! exactly the tensor names and shapes of the Karlo checkpoints (`tensors.txt`, listed by diffusers
//! from the same configs on its meta device; identical to the reference karlo-tensor-names.txt).
//!
//! tch 0.26 has no meta device, so the models are really built, into f16 VarStores (about 1.8 GB
//! for the decoder, 1.4 GB for a super-res UNet), one at a time.

use std::path::Path;
use tch::{Device, Kind};
use unclip_core::testing::fixture_path;
use unclip_decoder::checkpoint::{Component, init, read_config};
use unclip_decoder::{UNet2DConditionModel, UNet2DModel, UnCLIPTextProjModel};

fn expected(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("tensors.txt")).unwrap();
    let mut lines: Vec<String> = text.lines().filter(|l| !l.is_empty()).map(String::from).collect();
    lines.sort();
    lines
}

/// The big models are built one at a time to bound memory.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn layout<M: Component>(name: &str) -> (Vec<String>, Vec<String>) {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = fixture_path(&format!("decoder/karlo/{name}"));
    let cfg = read_config::<M>(&dir).unwrap();
    let loaded = init::<M>(&cfg, Device::Cpu, Kind::Half).unwrap();
    let mut ours: Vec<String> =
        loaded.vs.variables().into_iter().map(|(n, t)| format!("{n}\t{:?}", t.size())).collect();
    ours.sort();
    (ours, expected(&dir))
}

fn check<M: Component>(name: &str, count: usize) {
    let (ours, theirs) = layout::<M>(name);
    assert_eq!(theirs.len(), count, "{name}: reference list");
    let missing: Vec<_> = theirs.iter().filter(|l| !ours.contains(l)).collect();
    let extra: Vec<_> = ours.iter().filter(|l| !theirs.contains(l)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "{name}: missing {missing:?}, extra {extra:?}");
}

#[test]
fn karlo_text_proj_layout() {
    check::<UnCLIPTextProjModel>("text_proj", 11);
}

#[test]
fn karlo_decoder_layout() {
    check::<UNet2DConditionModel>("decoder", 716);
}

#[test]
fn karlo_super_res_layout() {
    check::<UNet2DModel>("super_res_first", 408);
}
