//! `ClipModel`: either tower or both, loaded from any of transformers' three CLIP layouts;
//! normalized embeddings, cosine similarity and zero-shot classification.

use crate::config::{AnyConfig, ClipConfig, TextConfig, VisionConfig};
use crate::text::{TextEmbeds, TextTower};
use crate::vision::{ImageEmbeds, VisionTower};
use crate::{Error, Result};
use serde_json::{Value, json};
use std::path::Path;
use tch::{Device, Kind, Tensor, nn};
use unclip_core::weights::{self, Unexpected};

/// Which towers to build from a config (e.g. only the text encoder out of a full `CLIPModel` file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Towers {
    Both,
    Text,
    Vision,
}

/// A CLIP model with its own `VarStore`: tensor names equal the checkpoint's.
#[derive(Debug)]
pub struct ClipModel {
    vs: nn::VarStore,
    config: AnyConfig,
    text: Option<TextTower>,
    vision: Option<VisionTower>,
    logit_scale: Option<Tensor>,
}

/// What [`ClipModel::forward`] returns (transformers' `CLIPOutput`, without the tower details).
#[derive(Debug)]
pub struct ClipOutput {
    /// (images, texts): `exp(logit_scale) * cos(image, text)`.
    pub logits_per_image: Tensor,
    /// (texts, images), the transpose.
    pub logits_per_text: Tensor,
    /// Normalized embeddings.
    pub text_embeds: Tensor,
    pub image_embeds: Tensor,
}

impl ClipModel {
    /// A randomly initialised model (transformers-like init) for `config`, in `kind` on `device`.
    pub fn new(config: AnyConfig, towers: Towers, device: Device, kind: Kind) -> Result<Self> {
        unclip_core::check_device(device)?;
        let mut vs = nn::VarStore::new(device);
        let root = vs.root();
        let (mut text, mut vision, mut logit_scale) = (None, None, None);
        let want_text = towers != Towers::Vision;
        let want_vision = towers != Towers::Text;
        match &config {
            AnyConfig::Clip(c) => {
                let d = c.projection_dim()?;
                if want_text {
                    text = Some(TextTower::new(root.clone(), &c.text_config, d)?);
                }
                if want_vision {
                    vision = Some(VisionTower::new(root.clone(), &c.vision_config, d)?);
                }
                if towers == Towers::Both {
                    let init = nn::Init::Const(c.logit_scale_init_value);
                    logit_scale = Some(unclip_core::nn::var(&root, "logit_scale", &[], init));
                }
            }
            AnyConfig::Text(t) if want_text => {
                text = Some(TextTower::new(root.clone(), t, proj_dim(t.projection_dim)?)?)
            }
            AnyConfig::Vision(v) if want_vision => {
                vision = Some(VisionTower::new(root.clone(), v, proj_dim(v.projection_dim)?)?)
            }
            _ => {
                return Err(Error::Config(format!(
                    "asked for the {towers:?} tower(s) of a config that has only the other one"
                )));
            }
        }
        if !matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double) {
            return Err(Error::Input(format!("model dtype must be floating point, got {kind:?}")));
        }
        vs.set_kind(kind);
        Ok(Self { vs, config, text, vision, logit_scale })
    }

    /// Loads `dir/config.json` and `dir/model.safetensors` (f32, f16 or bf16 files, converted to `kind`).
    /// With `Towers::Text` or `Towers::Vision` the other tower's tensors in the file are ignored.
    pub fn load(dir: &Path, towers: Towers, device: Device, kind: Kind) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = AnyConfig::read(&config_path)?;
        let weights = dir.join("model.safetensors");
        // Sized against the checkpoint before anything is allocated.
        let layout = Self::layout(&config, towers)?;
        let unexpected =
            if towers == Towers::Both { Unexpected::Error } else { Unexpected::Ignore };
        weights::check_layout(&config_path, &weights, &layout, unexpected, kind, device)?;
        // Every variable is overwritten below: skip the random initialisation.
        let model = unclip_core::nn::for_loading(|| Self::new(config, towers, device, kind))?;
        model.load_weights(&weights, unexpected)?;
        Ok(model)
    }

    /// The names and shapes of the variables the `towers` of `config` imply, computed without
    /// allocating them.
    pub fn layout(config: &AnyConfig, towers: Towers) -> Result<unclip_core::nn::Layout> {
        unclip_core::nn::measure(|| Self::new(config.clone(), towers, Device::Cpu, Kind::Float))
    }

    /// Copies a safetensors file's tensors into this model (every missing/misshapen tensor is named).
    pub fn load_weights(&self, path: &Path, unexpected: Unexpected) -> Result<()> {
        Ok(weights::load_file(&self.vs, path, unexpected)?)
    }

    /// Writes `config.json` and `model.safetensors` in transformers' layout (optionally cast, e.g. to f16).
    pub fn save(&self, dir: &Path, kind: Option<Kind>) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| unclip_core::Error::io(dir, e))?;
        unclip_core::config::write_json(&dir.join("config.json"), &self.config_json())?;
        Ok(weights::save_file(&self.vs, &dir.join("model.safetensors"), kind)?)
    }

    /// The config as transformers writes it, with `model_type` and `architectures`.
    pub fn config_json(&self) -> Value {
        let with = |v: Value, model_type: &str, arch: &str| {
            let mut v = v;
            v["model_type"] = json!(model_type);
            v["architectures"] = json!([arch]);
            v
        };
        match &self.config {
            AnyConfig::Clip(c) => {
                let mut v = serde_json::to_value(c).expect("config serializes");
                v["text_config"]["model_type"] = json!("clip_text_model");
                v["vision_config"]["model_type"] = json!("clip_vision_model");
                with(v, "clip", "CLIPModel")
            }
            AnyConfig::Text(t) => with(
                serde_json::to_value(t).expect("config serializes"),
                "clip_text_model",
                "CLIPTextModelWithProjection",
            ),
            AnyConfig::Vision(v) => with(
                serde_json::to_value(v).expect("config serializes"),
                "clip_vision_model",
                "CLIPVisionModelWithProjection",
            ),
        }
    }

    pub fn config(&self) -> &AnyConfig {
        &self.config
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The text config, when this model has a text tower.
    pub fn text_config(&self) -> Option<&TextConfig> {
        self.text.as_ref().map(|t| t.text_model.config())
    }

    pub fn vision_config(&self) -> Option<&VisionConfig> {
        self.vision.as_ref().map(|v| v.vision_model.config())
    }

    pub fn clip_config(&self) -> Option<&ClipConfig> {
        match &self.config {
            AnyConfig::Clip(c) => Some(c),
            _ => None,
        }
    }

    pub fn text(&self) -> Result<&TextTower> {
        self.text.as_ref().ok_or_else(|| Error::Input("this CLIP model has no text tower".into()))
    }

    pub fn vision(&self) -> Result<&VisionTower> {
        self.vision
            .as_ref()
            .ok_or_else(|| Error::Input("this CLIP model has no vision tower".into()))
    }

    /// The learned log temperature (a `CLIPModel` parameter; absent in single-tower files).
    pub fn logit_scale(&self) -> Result<&Tensor> {
        self.logit_scale.as_ref().ok_or_else(|| {
            Error::Input("this CLIP model has no logit_scale (single-tower checkpoint)".into())
        })
    }

    /// Text features: `last_hidden_state`, `pooled` and unnormalized `text_embeds`.
    pub fn encode_text(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<TextEmbeds> {
        self.text()?.forward(input_ids, attention_mask)
    }

    /// Image features from preprocessed pixels (B, 3, S, S).
    pub fn encode_image(&self, pixel_values: &Tensor) -> Result<ImageEmbeds> {
        self.vision()?.forward(pixel_values)
    }

    /// Both towers, normalized embeddings and the scaled cosine logits.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        pixel_values: &Tensor,
    ) -> Result<ClipOutput> {
        let text_embeds = normalize(&self.encode_text(input_ids, attention_mask)?.text_embeds)?;
        let image_embeds = normalize(&self.encode_image(pixel_values)?.image_embeds)?;
        let logits_per_text =
            similarity(&text_embeds, &image_embeds, Some(&self.logit_scale()?.f_exp()?))?;
        let logits_per_image = logits_per_text.f_tr()?;
        Ok(ClipOutput { logits_per_image, logits_per_text, text_embeds, image_embeds })
    }

    /// Zero-shot classification: (images, labels) probabilities that each image shows each label,
    /// given one tokenized prompt per label. Runs without gradients.
    pub fn zero_shot(
        &self,
        pixel_values: &Tensor,
        label_ids: &Tensor,
        label_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        tch::no_grad(|| {
            let out = self.forward(label_ids, label_mask, pixel_values)?;
            Ok(out.logits_per_image.f_softmax(-1, Kind::Float)?)
        })
    }
}

fn proj_dim(d: Option<i64>) -> Result<i64> {
    match d {
        Some(d) if d > 0 => Ok(d),
        other => Err(Error::Config(format!("projection_dim must be positive, found {other:?}"))),
    }
}

/// `x / ||x||` along the last dimension (transformers' `_get_vector_norm`).
pub fn normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.f_pow_tensor_scalar(2)?.f_sum_dim_intlist(-1, true, None)?.f_sqrt()?;
    Ok(x.f_div(&norm)?)
}

/// (N, M) cosine similarities of `a` (N, D) and `b` (M, D) (normalized here), times `scale`
/// (e.g. `exp(logit_scale)`) when given.
pub fn similarity(a: &Tensor, b: &Tensor, scale: Option<&Tensor>) -> Result<Tensor> {
    let (sa, sb) = (a.size(), b.size());
    if sa.len() != 2 || sb.len() != 2 || sa[1] != sb[1] {
        return Err(Error::Input(format!(
            "similarity needs (N, D) and (M, D) embeddings, got {sa:?} and {sb:?}"
        )));
    }
    let b = b.f_to_device(a.device())?;
    let logits = normalize(a)?.f_matmul(&normalize(&b)?.f_tr()?)?;
    match scale {
        Some(s) => Ok(logits.f_mul(&s.f_to_device(a.device())?)?),
        None => Ok(logits),
    }
}
