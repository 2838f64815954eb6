//! Parity of the towers with transformers 5.24.0 (fixtures/gen_clip.py), at 1e-4.

use tch::{Device, Kind, Tensor};
use unclip_clip::{ClipModel, Error, Towers, model::similarity};
use unclip_core::testing::{assert_close, fixture_path, load_fixture};

const TOL: f64 = 1e-4;

fn load(name: &str, towers: Towers) -> ClipModel {
    ClipModel::load(&fixture_path(&format!("clip/{name}")), towers, Device::Cpu, Kind::Float)
        .unwrap()
}

#[test]
fn text_legacy_eos_rule_quick_gelu() {
    // This file also carries an old `position_ids` buffer, which must be ignored.
    let m = load("text_legacy", Towers::Both);
    let r = load_fixture("clip/outputs_text_legacy.safetensors");
    let out = tch::no_grad(|| m.encode_text(&r["input_ids"], None)).unwrap();
    assert_close("last_hidden_state", &out.last_hidden_state, &r["last_hidden_state"], TOL, 0.0);
    assert_close("pooled", &out.pooled, &r["pooled"], TOL, 0.0);
    assert_close("text_embeds", &out.text_embeds, &r["text_embeds"], TOL, 0.0);
    let out = tch::no_grad(|| m.encode_text(&r["input_ids"], Some(&r["attention_mask"]))).unwrap();
    assert_close(
        "masked last_hidden_state",
        &out.last_hidden_state,
        &r["masked_last_hidden_state"],
        TOL,
        0.0,
    );
    assert_close("masked pooled", &out.pooled, &r["masked_pooled"], TOL, 0.0);
    assert_close("masked text_embeds", &out.text_embeds, &r["masked_text_embeds"], TOL, 0.0);
}

#[test]
fn f16_file_loads_into_f32() {
    let dir = fixture_path("clip/text_legacy");
    let m = ClipModel::new(
        unclip_clip::AnyConfig::read(&dir.join("config.json")).unwrap(),
        Towers::Both,
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    m.load_weights(&dir.join("model_f16.safetensors"), unclip_core::weights::Unexpected::Error)
        .unwrap();
    let r = load_fixture("clip/outputs_text_legacy.safetensors");
    let out = tch::no_grad(|| m.encode_text(&r["input_ids"], None)).unwrap();
    assert_eq!(out.text_embeds.kind(), Kind::Float);
    assert_close(
        "f16 last_hidden_state",
        &out.last_hidden_state,
        &r["f16_last_hidden_state"],
        TOL,
        0.0,
    );
    assert_close("f16 text_embeds", &out.text_embeds, &r["f16_text_embeds"], TOL, 0.0);
}

#[test]
fn text_eos_token_rule_gelu() {
    let m = load("text_eos", Towers::Both);
    let r = load_fixture("clip/outputs_text_eos.safetensors");
    let out = tch::no_grad(|| m.encode_text(&r["input_ids"], None)).unwrap();
    assert_close("last_hidden_state", &out.last_hidden_state, &r["last_hidden_state"], TOL, 0.0);
    assert_close("pooled", &out.pooled, &r["pooled"], TOL, 0.0);
    assert_close("text_embeds", &out.text_embeds, &r["text_embeds"], TOL, 0.0);
}

#[test]
fn vision_tower() {
    let m = load("vision", Towers::Both);
    let r = load_fixture("clip/outputs_vision.safetensors");
    let out = tch::no_grad(|| m.encode_image(&r["pixel_values"])).unwrap();
    assert_close("last_hidden_state", &out.last_hidden_state, &r["last_hidden_state"], TOL, 0.0);
    assert_close("pooled", &out.pooled, &r["pooled"], TOL, 0.0);
    assert_close("image_embeds", &out.image_embeds, &r["image_embeds"], TOL, 0.0);
}

#[test]
fn full_model_logits_and_single_towers() {
    let m = load("full", Towers::Both);
    let r = load_fixture("clip/outputs_full.safetensors");
    let out = tch::no_grad(|| m.forward(&r["input_ids"], None, &r["pixel_values"])).unwrap();
    assert_close("logits_per_image", &out.logits_per_image, &r["logits_per_image"], TOL, 0.0);
    assert_close("logits_per_text", &out.logits_per_text, &r["logits_per_text"], TOL, 0.0);
    assert_close(
        "text_embeds (normalized)",
        &out.text_embeds,
        &r["text_embeds_normalized"],
        TOL,
        0.0,
    );
    assert_close(
        "image_embeds (normalized)",
        &out.image_embeds,
        &r["image_embeds_normalized"],
        TOL,
        0.0,
    );
    let te = tch::no_grad(|| m.encode_text(&r["input_ids"], None)).unwrap().text_embeds;
    let ie = tch::no_grad(|| m.encode_image(&r["pixel_values"])).unwrap().image_embeds;
    assert_close("text_embeds", &te, &r["text_embeds"], TOL, 0.0);
    assert_close("image_embeds", &ie, &r["image_embeds"], TOL, 0.0);
    // Cosine similarity without scale: logits / exp(logit_scale) (= e^2 in the fixture config).
    let cos = similarity(&ie, &te, None).unwrap();
    assert_close("cosine", &(cos * 2f64.exp()), &r["logits_per_image"], TOL, 0.0);
    let probs = m.zero_shot(&r["pixel_values"], &r["input_ids"], None).unwrap();
    assert_close(
        "zero-shot probs",
        &probs,
        &r["logits_per_image"].softmax(-1, Kind::Float),
        1e-5,
        0.0,
    );

    // Each tower alone out of the full file.
    let t = load("full", Towers::Text);
    assert!(t.vision().is_err() && t.logit_scale().is_err());
    let te2 = tch::no_grad(|| t.encode_text(&r["input_ids"], None)).unwrap().text_embeds;
    assert_close("text tower alone", &te2, &r["text_embeds"], TOL, 0.0);
    let v = load("full", Towers::Vision);
    let ie2 = tch::no_grad(|| v.encode_image(&r["pixel_values"])).unwrap().image_embeds;
    assert_close("vision tower alone", &ie2, &r["image_embeds"], TOL, 0.0);
}

#[test]
fn save_round_trip_same_layout() {
    let m = load("full", Towers::Both);
    let dir = std::env::temp_dir().join(format!("unclip-clip-save-{}", std::process::id()));
    m.save(&dir, None).unwrap();
    let names = |p: &std::path::Path| {
        let mut k: Vec<String> =
            unclip_core::weights::read_tensors(p).unwrap().into_keys().collect();
        k.sort();
        k
    };
    assert_eq!(
        names(&dir.join("model.safetensors")),
        names(&fixture_path("clip/full/model.safetensors"))
    );
    let again = ClipModel::load(&dir, Towers::Both, Device::Cpu, Kind::Float).unwrap();
    assert_eq!(again.config(), m.config());
    let r = load_fixture("clip/outputs_full.safetensors");
    let out = tch::no_grad(|| again.forward(&r["input_ids"], None, &r["pixel_values"])).unwrap();
    assert_close("reloaded logits", &out.logits_per_image, &r["logits_per_image"], TOL, 0.0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bf16_model_runs() {
    let m = ClipModel::load(&fixture_path("clip/full"), Towers::Both, Device::Cpu, Kind::BFloat16)
        .unwrap();
    let r = load_fixture("clip/outputs_full.safetensors");
    let out = tch::no_grad(|| m.forward(&r["input_ids"], None, &r["pixel_values"])).unwrap();
    assert_eq!(out.logits_per_image.kind(), Kind::BFloat16);
    assert_close("bf16 logits", &out.logits_per_image, &r["logits_per_image"], 0.1, 0.05);
}

#[test]
fn user_errors_are_errors() {
    let m = load("full", Towers::Both);
    let ids = Tensor::from_slice(&[998i64, 5, 999]).view([1, 3]);
    let too_long = Tensor::zeros([1, 17], (Kind::Int64, Device::Cpu));
    let e = m.encode_text(&too_long, None).unwrap_err();
    assert!(e.to_string().contains("context length 16"), "{e}");
    let e = m.encode_text(&Tensor::from_slice(&[1000i64]).view([1, 1]), None).unwrap_err();
    assert!(e.to_string().contains("0..1000"), "{e}");
    assert!(m.encode_text(&Tensor::zeros([0, 3], (Kind::Int64, Device::Cpu)), None).is_err());
    assert!(m.encode_text(&ids.to_kind(Kind::Float), None).is_err());
    assert!(m.encode_text(&ids, Some(&Tensor::ones([1, 4], (Kind::Int64, Device::Cpu)))).is_err());
    let e = m.encode_image(&Tensor::zeros([1, 3, 32, 32], (Kind::Float, Device::Cpu))).unwrap_err();
    assert!(matches!(e, Error::Input(_)) && e.to_string().contains("16, 16"), "{e}");

    // Missing tensors are named, shape mismatches shown as expected vs found.
    let dir = fixture_path("clip");
    let text_cfg = unclip_clip::AnyConfig::read(&dir.join("text_legacy/config.json")).unwrap();
    let t = ClipModel::new(text_cfg, Towers::Both, Device::Cpu, Kind::Float).unwrap();
    let e =
        t.load_weights(&dir.join("text_eos/model.safetensors"), Default::default()).unwrap_err();
    let s = e.to_string();
    assert!(s.contains("text_model.encoder.layers.4") || s.contains("shape"), "{s}");
    let e = t.load_weights(&dir.join("vision/model.safetensors"), Default::default()).unwrap_err();
    assert!(e.to_string().contains("text_model.embeddings.token_embedding.weight"), "{e}");
    let small = unclip_clip::AnyConfig::Text(unclip_clip::TextConfig {
        vocab_size: 1000,
        hidden_size: 32,
        intermediate_size: 37,
        num_attention_heads: 4,
        num_hidden_layers: 5,
        projection_dim: Some(16),
        eos_token_id: Some(unclip_clip::config::TokenIds::One(2)),
        ..Default::default()
    });
    let t = ClipModel::new(small, Towers::Both, Device::Cpu, Kind::Float).unwrap();
    let e =
        t.load_weights(&dir.join("text_legacy/model.safetensors"), Default::default()).unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains("text_projection.weight") && s.contains("[16, 32]") && s.contains("[32, 32]"),
        "{s}"
    );
    assert!(ClipModel::load(&dir.join("nowhere"), Towers::Both, Device::Cpu, Kind::Float).is_err());
    assert!(
        ClipModel::load(&dir.join("text_legacy"), Towers::Vision, Device::Cpu, Kind::Float)
            .is_err()
    );
}
