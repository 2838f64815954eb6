//! The towers built from Karlo's configs (openai/clip-vit-large-patch14 text and vision) have
//! exactly the tensor names and shapes of the real checkpoints (fixtures/data/karlo-tensor-names.txt,
//! listed from the Karlo layouts by diffusers/transformers on the meta device).
//! One layer is built (to stay light); layer 0 and every non-layer tensor are compared, and the
//! per-layer count is checked against the file's totals.

use serde_json::json;
use std::collections::BTreeMap;
use tch::{Device, Kind};
use unclip_clip::{AnyConfig, ClipModel, Towers};

fn section(name: &str) -> BTreeMap<String, Vec<i64>> {
    let path = unclip_core::testing::fixture_path("karlo-tensor-names.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = BTreeMap::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("== ") {
            inside = line.starts_with(&format!("== {name} "));
            continue;
        }
        if inside && !line.trim().is_empty() && !line.starts_with('#') {
            let (n, shape) = line.split_once('\t').unwrap();
            out.insert(n.to_string(), serde_json::from_str(shape).unwrap());
        }
    }
    assert!(!out.is_empty(), "no section {name} in {}", path.display());
    out
}

fn built(cfg: serde_json::Value) -> BTreeMap<String, Vec<i64>> {
    let m =
        ClipModel::new(AnyConfig::from_value(cfg).unwrap(), Towers::Both, Device::Cpu, Kind::Float)
            .unwrap();
    m.var_store().variables().into_iter().map(|(k, v)| (k, v.size())).collect()
}

fn compare(name: &str, ours: BTreeMap<String, Vec<i64>>, layers: usize) {
    let reference = section(name);
    let in_layer = |n: &str| n.contains(".layers.");
    let keep = |n: &str| !in_layer(n) || n.contains(".layers.0.");
    let want: BTreeMap<_, _> =
        reference.iter().filter(|(n, _)| keep(n)).map(|(n, s)| (n.clone(), s.clone())).collect();
    assert_eq!(ours, want, "{name}: names/shapes differ");
    let per_layer = ours.keys().filter(|n| in_layer(n)).count();
    let outside = ours.len() - per_layer;
    assert_eq!(outside + per_layer * layers, reference.len(), "{name}: tensor count");
}

#[test]
fn karlo_text_encoder_layout() {
    let cfg = json!({"model_type": "clip_text_model", "architectures": ["CLIPTextModelWithProjection"],
        "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 1,
        "projection_dim": 768, "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu",
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1});
    compare("text_encoder", built(cfg), 12);
}

#[test]
fn karlo_image_encoder_layout() {
    let cfg = json!({"model_type": "clip_vision_model", "architectures": ["CLIPVisionModelWithProjection"],
        "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 1,
        "projection_dim": 768, "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu"});
    compare("image_encoder", built(cfg), 24);
}
