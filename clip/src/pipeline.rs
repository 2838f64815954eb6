//! A CLIP checkpoint folder as one object: model, tokenizer and image processor, for zero-shot
//! classification of images against label prompts.

use crate::model::{ClipModel, Towers};
use crate::preprocess::{ImageProcessor, ProcessorConfig};
use crate::tokenizer::{ClipTokenizer, Truncation};
use crate::{Error, Result};
use image::DynamicImage;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Model + tokenizer + processor of one folder.
#[derive(Debug)]
pub struct ClipPipeline {
    pub model: ClipModel,
    pub tokenizer: ClipTokenizer,
    pub processor: ImageProcessor,
}

/// One label's score for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelScore {
    pub label: String,
    pub probability: f64,
}

impl ClipPipeline {
    /// Loads `dir`: `config.json` + `model.safetensors` (a `CLIPModel`), the tokenizer from `dir`
    /// or `dir/tokenizer` (tokenizer.json or vocab.json + merges.txt), and
    /// `preprocessor_config.json` from `dir` or `dir/feature_extractor` (default: CLIP's processor
    /// at the model's image size).
    pub fn from_dir(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let model = ClipModel::load(dir, Towers::Both, device, kind)?;
        let has_tok = |d: &Path| d.join("tokenizer.json").exists() || d.join("vocab.json").exists();
        let tok_dir = [dir.to_path_buf(), dir.join("tokenizer")]
            .into_iter()
            .find(|d| has_tok(d))
            .ok_or_else(|| {
            Error::Tokenizer(format!(
                "no tokenizer.json or vocab.json in {} or its tokenizer/",
                dir.display()
            ))
        })?;
        let ctx = model.text_config().map(|t| t.max_position_embeddings as usize).unwrap_or(77);
        let tokenizer = ClipTokenizer::from_dir(&tok_dir)?;
        let tokenizer = if tokenizer.context_length() > ctx {
            tokenizer.with_context_length(ctx)?
        } else {
            tokenizer
        };
        let proc_file = [
            dir.join("preprocessor_config.json"),
            dir.join("feature_extractor/preprocessor_config.json"),
        ]
        .into_iter()
        .find(|p| p.exists());
        let processor = match proc_file {
            Some(p) => ImageProcessor::new(ProcessorConfig::read(&p)?),
            None => {
                let side = model.vision_config().map(|v| v.image_size as usize).unwrap_or(224);
                ImageProcessor::new(ProcessorConfig::clip(side))
            }
        };
        Ok(Self { model, tokenizer, processor })
    }

    /// Probabilities over `labels` for each image, each label written into `template` at `{}`
    /// (e.g. "a photo of a {}."). Labels are sorted by probability, highest first.
    pub fn classify(
        &self,
        images: &[DynamicImage],
        labels: &[&str],
        template: &str,
    ) -> Result<Vec<Vec<LabelScore>>> {
        if labels.is_empty() {
            return Err(Error::Input("no labels given".into()));
        }
        if let Some(l) = labels.iter().find(|l| l.trim().is_empty()) {
            return Err(Error::Input(format!("empty label {l:?}")));
        }
        if !template.contains("{}") {
            return Err(Error::Input(format!("template {template:?} has no {{}} for the label")));
        }
        let prompts: Vec<String> = labels.iter().map(|l| template.replace("{}", l)).collect();
        let device = self.model.device();
        let enc = self.tokenizer.encode_batch(&prompts, Truncation::Error, device)?;
        let pixels = self.processor.preprocess_batch(images)?.f_to_device(device)?;
        let probs = self.model.zero_shot(&pixels, &enc.input_ids, Some(&enc.attention_mask))?;
        let probs = probs.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?;
        (0..images.len() as i64)
            .map(|i| {
                let row = Vec::<f64>::try_from(probs.f_get(i)?)?;
                let mut scores: Vec<LabelScore> = labels
                    .iter()
                    .zip(row)
                    .map(|(l, p)| LabelScore { label: l.to_string(), probability: p })
                    .collect();
                scores.sort_by(|a, b| b.probability.total_cmp(&a.probability));
                Ok(scores)
            })
            .collect()
    }

    /// Normalized text embeddings of prompts (B, projection_dim), without gradients.
    pub fn embed_text(&self, prompts: &[&str]) -> Result<Tensor> {
        let enc =
            self.tokenizer.encode_batch(prompts, Truncation::Truncate, self.model.device())?;
        tch::no_grad(|| {
            crate::model::normalize(
                &self.model.encode_text(&enc.input_ids, Some(&enc.attention_mask))?.text_embeds,
            )
        })
    }

    /// Normalized image embeddings (B, projection_dim), without gradients.
    pub fn embed_images(&self, images: &[DynamicImage]) -> Result<Tensor> {
        let px = self.processor.preprocess_batch(images)?.f_to_device(self.model.device())?;
        tch::no_grad(|| crate::model::normalize(&self.model.encode_image(&px)?.image_embeds))
    }
}
