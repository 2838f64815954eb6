//! CLIP configs as transformers writes them in `config.json`.
//!
//! Three layouts exist in the wild: a `CLIPModel` file with nested `text_config` / `vision_config`
//! (older files also carry `text_config_dict` / `vision_config_dict`, which win), and the flat
//! files of `CLIPTextModel(WithProjection)` and `CLIPVisionModel(WithProjection)`. Missing fields
//! take transformers' defaults, so a sparse config means what it means in Python.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// The MLP activation named by `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`, OpenAI CLIP's choice.
    QuickGelu,
    /// Exact (erf) GELU.
    Gelu,
    /// GELU with the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
    Silu,
}

impl Activation {
    /// Parses transformers' `ACT2FN` names that CLIP checkpoints use.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            other => {
                return Err(Error::Config(format!(
                    "unknown activation {other:?} (hidden_act): expected quick_gelu, gelu, gelu_new, \
                     gelu_pytorch_tanh, relu or silu"
                )));
            }
        })
    }

    /// Applies the activation elementwise.
    pub fn forward(self, x: &tch::Tensor) -> tch::Tensor {
        match self {
            Activation::QuickGelu => x * (x * 1.702).sigmoid(),
            Activation::Gelu => x.gelu("none"),
            Activation::GeluTanh => x.gelu("tanh"),
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
        }
    }
}

/// `eos_token_id` may be one id or a list (transformers accepts both).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

fn default_vocab() -> i64 {
    49408
}
fn d512() -> i64 {
    512
}
fn d2048() -> i64 {
    2048
}
fn d12() -> i64 {
    12
}
fn d8() -> i64 {
    8
}
fn d77() -> i64 {
    77
}
fn d768() -> i64 {
    768
}
fn d3072() -> i64 {
    3072
}
fn d3() -> i64 {
    3
}
fn d224() -> i64 {
    224
}
fn d32() -> i64 {
    32
}
fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn eps() -> f64 {
    1e-5
}
fn pad1() -> Option<i64> {
    Some(1)
}
fn bos() -> Option<i64> {
    Some(49406)
}
fn eos() -> Option<TokenIds> {
    Some(TokenIds::One(49407))
}
fn proj512() -> Option<i64> {
    Some(512)
}
fn logit_init() -> f64 {
    2.6592
}

/// transformers' `CLIPTextConfig` (the fields the model needs; defaults are transformers').
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    #[serde(default = "default_vocab")]
    pub vocab_size: i64,
    #[serde(default = "d512")]
    pub hidden_size: i64,
    #[serde(default = "d2048")]
    pub intermediate_size: i64,
    /// Output size of `text_projection` in `CLIPTextModelWithProjection`.
    #[serde(default = "proj512")]
    pub projection_dim: Option<i64>,
    #[serde(default = "d12")]
    pub num_hidden_layers: i64,
    #[serde(default = "d8")]
    pub num_attention_heads: i64,
    #[serde(default = "d77")]
    pub max_position_embeddings: i64,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "pad1")]
    pub pad_token_id: Option<i64>,
    #[serde(default = "bos")]
    pub bos_token_id: Option<i64>,
    #[serde(default = "eos")]
    pub eos_token_id: Option<TokenIds>,
}

impl Default for TextConfig {
    fn default() -> Self {
        serde_json::from_value(Value::Object(Default::default())).expect("defaults parse")
    }
}

/// How the pooled text feature picks its token (transformers' two rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EosRule {
    /// Configs with `eos_token_id == 2` (all pre-2023 CLIP files, Karlo's included): the position
    /// of the largest id, which is `<|endoftext|>` in CLIP's vocabulary.
    ArgmaxId,
    /// Otherwise: the first position holding this id.
    FirstId(i64),
}

impl TextConfig {
    /// Checks sizes and the activation name; returns the parsed activation.
    pub fn validate(&self) -> Result<Activation> {
        positive(
            "text_config",
            &[
                ("vocab_size", self.vocab_size),
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("max_position_embeddings", self.max_position_embeddings),
            ],
        )?;
        heads_divide("text_config", self.hidden_size, self.num_attention_heads)?;
        check_eps("text_config", self.layer_norm_eps)?;
        Activation::parse(&self.hidden_act)
    }

    /// The pooling rule transformers' `CLIPTextModel` applies for this config.
    pub fn eos_rule(&self) -> Result<EosRule> {
        match &self.eos_token_id {
            Some(TokenIds::One(2)) => Ok(EosRule::ArgmaxId),
            Some(TokenIds::One(id)) => Ok(EosRule::FirstId(*id)),
            // A one-element list never takes the legacy branch in transformers (`[2] != 2`).
            Some(TokenIds::Many(ids)) if ids.len() == 1 => Ok(EosRule::FirstId(ids[0])),
            other => Err(Error::Config(format!(
                "text_config.eos_token_id must be one token id, found {other:?}"
            ))),
        }
    }
}

/// transformers' `CLIPVisionConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "d768")]
    pub hidden_size: i64,
    #[serde(default = "d3072")]
    pub intermediate_size: i64,
    #[serde(default = "proj512")]
    pub projection_dim: Option<i64>,
    #[serde(default = "d12")]
    pub num_hidden_layers: i64,
    #[serde(default = "d12")]
    pub num_attention_heads: i64,
    #[serde(default = "d3")]
    pub num_channels: i64,
    #[serde(default = "d224")]
    pub image_size: i64,
    #[serde(default = "d32")]
    pub patch_size: i64,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
}

impl Default for VisionConfig {
    fn default() -> Self {
        serde_json::from_value(Value::Object(Default::default())).expect("defaults parse")
    }
}

impl VisionConfig {
    pub fn validate(&self) -> Result<Activation> {
        positive(
            "vision_config",
            &[
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("num_channels", self.num_channels),
                ("image_size", self.image_size),
                ("patch_size", self.patch_size),
            ],
        )?;
        heads_divide("vision_config", self.hidden_size, self.num_attention_heads)?;
        check_eps("vision_config", self.layer_norm_eps)?;
        if self.image_size % self.patch_size != 0 {
            return Err(Error::Config(format!(
                "vision_config: image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            )));
        }
        Activation::parse(&self.hidden_act)
    }

    /// Patches per image plus the class token.
    pub fn num_positions(&self) -> i64 {
        let side = self.image_size / self.patch_size;
        side * side + 1
    }
}

/// transformers' `CLIPConfig` (a `CLIPModel` folder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    pub text_config: TextConfig,
    pub vision_config: VisionConfig,
    #[serde(default = "proj512")]
    pub projection_dim: Option<i64>,
    #[serde(default = "logit_init")]
    pub logit_scale_init_value: f64,
}

impl Default for ClipConfig {
    fn default() -> Self {
        Self {
            text_config: TextConfig::default(),
            vision_config: VisionConfig::default(),
            projection_dim: Some(512),
            logit_scale_init_value: logit_init(),
        }
    }
}

impl ClipConfig {
    /// The shared embedding size of both projections.
    pub fn projection_dim(&self) -> Result<i64> {
        match self.projection_dim {
            Some(d) if d > 0 => Ok(d),
            other => {
                Err(Error::Config(format!("projection_dim must be positive, found {other:?}")))
            }
        }
    }
}

/// Which model a `config.json` describes.
#[derive(Debug, Clone, PartialEq)]
pub enum AnyConfig {
    Clip(ClipConfig),
    Text(TextConfig),
    Vision(VisionConfig),
}

/// Overlays `text_config_dict`-style keys onto the nested config, as transformers does.
fn merged(root: &serde_json::Map<String, Value>, key: &str) -> Value {
    let mut base = match root.get(key) {
        Some(Value::Object(m)) => m.clone(),
        _ => Default::default(),
    };
    if let Some(Value::Object(over)) = root.get(&format!("{key}_dict")) {
        for (k, v) in over {
            base.insert(k.clone(), v.clone());
        }
    }
    Value::Object(base)
}

fn from_value<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::Config(format!("{what}: {e}")))
}

impl AnyConfig {
    /// Parses a config JSON value, telling the three layouts apart by `model_type`, then by shape.
    pub fn from_value(v: Value) -> Result<Self> {
        let Value::Object(root) = v else {
            return Err(Error::Config("config.json is not a JSON object".into()));
        };
        let model_type = root.get("model_type").and_then(Value::as_str).unwrap_or("");
        let nested = root.contains_key("text_config") || root.contains_key("vision_config");
        let vision_keys = root.contains_key("patch_size") || root.contains_key("image_size");
        let cfg = match model_type {
            "clip" => None,
            "clip_text_model" => {
                Some(AnyConfig::Text(from_value(Value::Object(root.clone()), "text config")?))
            }
            "clip_vision_model" => {
                Some(AnyConfig::Vision(from_value(Value::Object(root.clone()), "vision config")?))
            }
            _ if !nested && vision_keys => {
                Some(AnyConfig::Vision(from_value(Value::Object(root.clone()), "vision config")?))
            }
            _ if !nested => {
                Some(AnyConfig::Text(from_value(Value::Object(root.clone()), "text config")?))
            }
            _ => None,
        };
        let cfg = match cfg {
            Some(c) => c,
            None => {
                let text_config = from_value(merged(&root, "text_config"), "text_config")?;
                let vision_config = from_value(merged(&root, "vision_config"), "vision_config")?;
                let projection_dim = match root.get("projection_dim") {
                    None | Some(Value::Null) => Some(512),
                    Some(v) => Some(v.as_i64().ok_or_else(|| {
                        Error::Config(format!("projection_dim must be an integer, found {v}"))
                    })?),
                };
                let logit_scale_init_value = root
                    .get("logit_scale_init_value")
                    .and_then(Value::as_f64)
                    .unwrap_or(logit_init());
                AnyConfig::Clip(ClipConfig {
                    text_config,
                    vision_config,
                    projection_dim,
                    logit_scale_init_value,
                })
            }
        };
        match &cfg {
            AnyConfig::Clip(c) => {
                c.text_config.validate()?;
                c.text_config.eos_rule()?;
                c.vision_config.validate()?;
                c.projection_dim()?;
            }
            AnyConfig::Text(t) => {
                t.validate()?;
                t.eos_rule()?;
            }
            AnyConfig::Vision(v) => {
                v.validate()?;
            }
        }
        Ok(cfg)
    }

    /// Reads `config.json` (any of the three layouts).
    pub fn read(path: &Path) -> Result<Self> {
        let v: Value = unclip_core::config::read_model_json(path)?;
        Self::from_value(v).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            e => e,
        })
    }
}

fn positive(what: &str, fields: &[(&str, i64)]) -> Result<()> {
    for (name, v) in fields {
        if *v <= 0 {
            return Err(Error::Config(format!("{what}.{name} must be positive, found {v}")));
        }
    }
    Ok(())
}

/// A normalization epsilon must be finite and positive: zero divides by zero on a constant
/// input, a negative one takes the square root of a negative variance (NaN images).
fn check_eps(what: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(Error::Config(format!("{what}.layer_norm_eps must be finite and > 0, found {v}")))
    }
}

fn heads_divide(what: &str, hidden: i64, heads: i64) -> Result<()> {
    if hidden % heads != 0 {
        return Err(Error::Config(format!(
            "{what}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_the_three_layouts() {
        let dir = unclip_core::testing::fixture_path("clip");
        match AnyConfig::read(&dir.join("full/config.json")).unwrap() {
            AnyConfig::Clip(c) => {
                assert_eq!(c.projection_dim, Some(20));
                assert_eq!(c.text_config.hidden_act, "gelu");
                assert_eq!(c.vision_config.patch_size, 4);
                assert_eq!(c.logit_scale_init_value, 2.0);
            }
            other => panic!("{other:?}"),
        }
        match AnyConfig::read(&dir.join("text_legacy/config.json")).unwrap() {
            AnyConfig::Text(t) => assert_eq!(t.eos_rule().unwrap(), EosRule::ArgmaxId),
            other => panic!("{other:?}"),
        }
        match AnyConfig::read(&dir.join("text_eos/config.json")).unwrap() {
            AnyConfig::Text(t) => assert_eq!(t.eos_rule().unwrap(), EosRule::FirstId(500)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            AnyConfig::read(&dir.join("vision/config.json")).unwrap(),
            AnyConfig::Vision(v) if v.patch_size == 1 && v.image_size == 32
        ));
    }

    #[test]
    fn old_dict_keys_override_and_defaults_apply() {
        // The shape of openai/clip-vit-large-patch14's config.json (2022): sparse dicts.
        let v = json!({
            "model_type": "clip", "projection_dim": 768,
            "text_config": {"hidden_size": 1, "eos_token_id": 2},
            "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072,
                                 "num_attention_heads": 12, "projection_dim": 768},
            "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096,
                                   "num_attention_heads": 16, "num_hidden_layers": 24,
                                   "patch_size": 14, "projection_dim": 768}
        });
        let AnyConfig::Clip(c) = AnyConfig::from_value(v).unwrap() else { panic!() };
        assert_eq!(c.text_config.hidden_size, 768);
        assert_eq!(c.text_config.vocab_size, 49408);
        assert_eq!(c.text_config.eos_rule().unwrap(), EosRule::ArgmaxId);
        assert_eq!(c.vision_config.num_positions(), 257);
        assert_eq!(c.logit_scale_init_value, 2.6592);
    }

    #[test]
    fn bad_configs_are_errors() {
        let e =
            AnyConfig::from_value(json!({"model_type": "clip_text_model", "hidden_act": "mish"}))
                .unwrap_err();
        assert!(e.to_string().contains("mish"), "{e}");
        let e = AnyConfig::from_value(json!({"model_type": "clip_text_model", "hidden_size": 30,
                                             "num_attention_heads": 8}))
        .unwrap_err();
        assert!(e.to_string().contains("multiple"), "{e}");
        let e = AnyConfig::from_value(json!({"model_type": "clip_vision_model", "image_size": 30,
                                             "patch_size": 4}))
        .unwrap_err();
        assert!(e.to_string().contains("patch_size"), "{e}");
        assert!(AnyConfig::from_value(json!([1, 2])).is_err());
        assert!(
            AnyConfig::from_value(json!({"model_type": "clip_text_model", "hidden_size": "x"}))
                .is_err()
        );
    }
}
