//! The run config: one TOML file (plus `--set key=value` overrides) that says what to train on,
//! which stages, their models and optimization. It is checked completely before any work: an
//! unknown key, a wrong type or an impossible value is a [`ConfigError`] naming the file, the key
//! and what was expected. The effective config (defaults filled in) is saved in the run folder.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A config problem: the file, the key (dotted path) and what was expected.
#[derive(Debug, thiserror::Error)]
#[error("{}: {}{message}", file.display(), key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: Option<String>,
    pub message: String,
}

impl ConfigError {
    fn new(file: &Path, key: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        Self { file: file.to_path_buf(), key: key.into(), message: message.into() }
    }
}

fn default_device() -> String {
    "cpu".into()
}
fn default_true() -> bool {
    true
}

/// Everything that determines a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub run: RunSection,
    pub data: DataConfig,
    #[serde(default)]
    pub validation: ValidationConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<TokenizerStage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip: Option<ClipStage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior: Option<PriorStage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder: Option<DecoderStage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upsampler: Option<UpsamplerStage>,
    /// A second upsampler after `[upsampler]` (e.g. 64 -> 256 px), exported as `super_res_2/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upsampler2: Option<UpsamplerStage>,
    #[serde(default)]
    pub export: ExportConfig,
}

/// `[run]`: where the run lives and what it runs on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// The run folder: one subfolder per stage, the effective config, the logs.
    pub out: PathBuf,
    #[serde(default)]
    pub seed: u64,
    /// `cpu`, `cuda`, `cuda:N`, `mps`.
    #[serde(default = "default_device")]
    pub device: String,
    /// libtorch CPU threads (libtorch's default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<i32>,
    /// The forward passes' precision (the weights and the optimizer stay f32).
    #[serde(default)]
    pub precision: Precision,
    /// A model folder (diffusers layout) whose tokenizer and CLIP encoders the prior and decoder
    /// condition on, when this run does not train its own (no `[tokenizer]`/`[clip]` stage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditioning: Option<PathBuf>,
}

/// `run.precision`: f32, or autocast to bf16 (CPU and CUDA) or f16 (CUDA only, without loss
/// scaling: small gradients can underflow) with f32 master weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

/// Which dataset source (see `unclip::data`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// The captioned-shapes generator (no files).
    Shapes,
    /// A folder of images with captions.
    ImageFolder,
    /// WebDataset tar shards.
    Webdataset,
    /// Precomputed CLIP embedding shards (prior only).
    Embeddings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CropKind {
    #[default]
    Center,
    Random,
}

/// `[data]`: the training data. The last `validation.items` items are held out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub source: SourceKind,
    /// The folder or shard pattern (every source but `shapes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// `shapes`: how many scenes (required); other sources: use at most this many items.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<usize>,
    #[serde(default)]
    pub crop: CropKind,
    #[serde(default)]
    pub hflip: bool,
    /// Decode threads.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Ready batches queued ahead.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// The run fails when more than this fraction of items is undecodable.
    #[serde(default = "default_bad")]
    pub max_bad_fraction: f64,
    /// `shapes`: how often each prompt kind is drawn, as weights for single, relation, binding
    /// and negation scenes (default `[40, 25, 20, 15]`), e.g. more two-object scenes. A draw that
    /// breaks a scene rule is redrawn, so two-object kinds come out somewhat below their share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind_weights: Option<[u32; 4]>,
}
fn default_workers() -> usize {
    2
}
fn default_prefetch() -> usize {
    2
}
fn default_bad() -> f64 {
    0.01
}

/// `[validation]`: the held-out split and what is shown during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// Items held out from the end of the dataset for the validation loss and grids (0: none).
    #[serde(default = "default_val_items")]
    pub items: usize,
    /// Pictures per validation grid (the first held-out items).
    #[serde(default = "default_grid")]
    pub grid: usize,
    /// Denoising steps of the grid samples.
    #[serde(default = "default_val_steps")]
    pub sample_steps: usize,
}
fn default_val_items() -> usize {
    64
}
fn default_grid() -> usize {
    8
}
fn default_val_steps() -> usize {
    25
}
impl Default for ValidationConfig {
    fn default() -> Self {
        Self { items: default_val_items(), grid: default_grid(), sample_steps: default_val_steps() }
    }
}

/// `[<stage>.train]`: optimization and bookkeeping of one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    pub steps: u64,
    /// Items of one forward/backward pass (the global batch in a data-parallel run).
    pub batch_size: usize,
    /// Micro-batches of `batch_size` per optimizer step (gradient accumulation): each step
    /// updates as one step on `accumulate * batch_size` items would, for losses that are a mean
    /// over items (the contrastive CLIP loss sees only each micro-batch's negatives).
    #[serde(default = "default_accumulate")]
    pub accumulate: usize,
    pub lr: f64,
    /// Linear warmup steps (default: steps / 20, at most 500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<u64>,
    /// The cosine schedule ends at `lr * lr_floor`.
    #[serde(default = "default_floor")]
    pub lr_floor: f64,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    /// EMA decay of the shipped weights (0: no EMA, the raw weights are shipped).
    #[serde(default = "default_ema")]
    pub ema_decay: f64,
    /// Global gradient-norm clipping (0: none).
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
    /// A checkpoint every this many steps (default: steps / 10, at most 500) and at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<u64>,
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// Held-out loss and a validation grid every this many steps (0: only at the end).
    #[serde(default)]
    pub validate_every: u64,
    /// Stop after this many non-finite steps in a row (each one is skipped and counted).
    #[serde(default = "default_nonfinite")]
    pub max_nonfinite: u64,
}
fn default_accumulate() -> usize {
    1
}
fn default_floor() -> f64 {
    0.1
}
fn default_wd() -> f64 {
    0.01
}
fn default_ema() -> f64 {
    0.999
}
fn default_clip() -> f64 {
    1.0
}
fn default_keep() -> usize {
    2
}
fn default_nonfinite() -> u64 {
    10
}

impl TrainSettings {
    pub fn warmup_steps(&self) -> u64 {
        self.warmup.unwrap_or((self.steps / 20).clamp(1, 500)).min(self.steps)
    }
    pub fn checkpoint_interval(&self) -> u64 {
        self.checkpoint_every.unwrap_or((self.steps / 10).clamp(1, 500))
    }
}

/// `[tokenizer]`: a byte-level BPE trained on the captions (CLIP's file format).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerStage {
    pub vocab_size: usize,
    /// Token budget of a caption, start and end tokens included.
    pub context_length: usize,
    /// Captions the merges are learned from (the first ones of the training split).
    #[serde(default = "default_tok_captions")]
    pub captions: usize,
}
fn default_tok_captions() -> usize {
    20_000
}

/// `[clip.model]`: both towers share the width; the text width is the projection width.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipModelConfig {
    pub width: i64,
    pub layers: i64,
    #[serde(default = "default_heads")]
    pub heads: i64,
    pub image_size: i64,
    pub patch_size: i64,
}
fn default_heads() -> i64 {
    4
}

/// `[clip]`: CLIP trained contrastively on (caption, image) pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipStage {
    /// Start from a model folder's `text_encoder` and `image_encoder` instead of `model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ClipModelConfig>,
    /// Shapes only: batches of groups of this many counterpart scenes (hard negatives).
    #[serde(default = "default_one")]
    pub counterparts: usize,
    /// Train the text tower alone (and the temperature): the image tower stays as loaded, so
    /// the image embeddings a model folder's prior predicts and its decoder is conditioned on
    /// keep their meaning. Needs `clip.init`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub freeze_image: bool,
    /// Train the image tower alone (and the temperature): the text embeddings and hidden
    /// states a model folder's prior and decoder read keep their meaning. Needs `clip.init`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub freeze_text: bool,
    /// Shapes only: per scene of the batch, this many negative images without a caption: the
    /// scene with one of its objects drawn twice (`Scene::copies`), the decoder's commonest
    /// wrong count. Every caption is scored against them, so CLIP learns to tell a copy from
    /// the scene, and decoder best-of-N by CLIP (`decoder_candidates`) can reject it.
    #[serde(default, skip_serializing_if = "is_zero_count")]
    pub copy_negatives: usize,
    /// Weight of a term keeping the image tower near the one loaded from `clip.init`: `1 -
    /// cosine` of each captioned image's embedding to the loaded tower's (logged as
    /// `image_drift`). Image variations condition the folder's decoder on these embeddings.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub anchor_image: f64,
    pub train: TrainSettings,
}
fn is_zero_count(n: &usize) -> bool {
    *n == 0
}
fn default_one() -> usize {
    1
}

/// `[prior.model]`: a Karlo-layout `PriorTransformer` (width = the CLIP's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorModelConfig {
    pub layers: i64,
    #[serde(default = "default_heads")]
    pub heads: i64,
}

/// `[prior]`: the diffusion prior (x0 prediction) on the conditioning CLIP's embeddings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorStage {
    /// A `prior` component folder (or a model folder holding one) to fine-tune.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<PriorModelConfig>,
    /// Probability of training on the empty caption.
    #[serde(default = "default_prior_drop")]
    pub text_dropout: f64,
    /// Images the embedding statistics (`clip_mean`, `clip_std`) are fitted on (fresh models).
    #[serde(default = "default_stat_items")]
    pub stat_items: usize,
    pub train: TrainSettings,
}
fn default_prior_drop() -> f64 {
    0.1
}
fn default_stat_items() -> usize {
    4096
}

/// `[decoder.model]`: a Karlo-layout `UNet2DConditionModel` + `UnCLIPTextProjModel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderModelConfig {
    pub channels: Vec<i64>,
    #[serde(default = "default_layers")]
    pub layers_per_block: i64,
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: i64,
    #[serde(default = "default_groups")]
    pub norm_groups: i64,
    /// Give the decoder each pixel's coordinates as two extra input channels.
    #[serde(default)]
    pub coordinates: bool,
}
fn default_layers() -> i64 {
    2
}
fn default_head_dim() -> i64 {
    32
}
fn default_groups() -> i64 {
    16
}

/// What the diffusion models predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    #[default]
    Epsilon,
    VPrediction,
    Sample,
}

/// `[decoder]`: the 64 px (Karlo) decoder conditioned on CLIP image embeddings and captions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderStage {
    /// A `decoder` component folder (its `text_proj` sibling comes with it) or a model folder.
    /// With `model` too, the weights must fit it, except for added coordinate input channels
    /// (which start at zero).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<DecoderModelConfig>,
    /// Output side in pixels.
    pub resolution: u32,
    #[serde(default)]
    pub prediction: Prediction,
    /// Probability of replacing the caption by the empty one (unCLIP: 0.5).
    #[serde(default = "default_half")]
    pub text_dropout: f64,
    /// Share of timesteps drawn from `high_noise_from..T` instead of uniformly.
    #[serde(default)]
    pub high_noise: f64,
    #[serde(default = "default_high_from")]
    pub high_noise_from: i64,
    /// Extra weight of the MSE on the image's color edges (0: plain MSE): a small decoder
    /// otherwise spends its loss on flat backgrounds and draws small shapes as round blobs.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub edge_weight: f64,
    pub train: TrainSettings,
}
fn is_zero(v: &f64) -> bool {
    *v == 0.0
}
fn default_half() -> f64 {
    0.5
}
fn default_high_from() -> i64 {
    500
}

/// `[upsampler.model]`: a Karlo super-resolution `UNet2DModel` (no attention).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpsamplerModelConfig {
    pub channels: Vec<i64>,
    #[serde(default = "default_layers")]
    pub layers_per_block: i64,
    #[serde(default = "default_groups")]
    pub norm_groups: i64,
}

/// `[upsampler]`: low -> high resolution, trained on random crops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpsamplerStage {
    /// A `super_res_first` component folder or a model folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<UpsamplerModelConfig>,
    pub low_resolution: u32,
    pub resolution: u32,
    /// Side of the high-resolution crops trained on.
    pub crop: i64,
    /// Gaussian blur of the low-resolution input (unCLIP's first upsampler; 0: none).
    #[serde(default)]
    pub blur_sigma: f64,
    /// With it, each image's blur sigma is drawn uniformly from `blur_sigma..=blur_sigma_max`
    /// (so the upsampler learns to sharpen decoder outputs softer than `blur_sigma`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blur_sigma_max: Option<f64>,
    #[serde(default)]
    pub prediction: Prediction,
    pub train: TrainSettings,
}

/// `[export]`: what the exported model folder recommends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// `sampling_config.json`'s decoder guidance (Karlo's 8 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_guidance_scale: Option<f64>,
    /// `sampling_config.json`'s decoder best-of-N (kept from the base folder when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_candidates: Option<usize>,
    /// Store the weights in f16 (else f32).
    #[serde(default = "default_true")]
    pub half: bool,
    /// The folder's second upsampler (`super_res_2`) becomes its only one (`super_res_first`
    /// and `super_res_last`), the first is dropped: for a decoder retrained at the first
    /// upsampler's output size (Karlo's cascade: a 64 px decoder, then 64 -> 256 px).
    #[serde(default)]
    pub drop_first_upsampler: bool,
}

/// A file without `[export]` gets the same defaults as an empty `[export]` (f16 weights).
impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            decoder_guidance_scale: None,
            decoder_candidates: None,
            half: true,
            drop_first_upsampler: false,
        }
    }
}

/// The stages in training order.
pub const STAGES: [&str; 6] = ["tokenizer", "clip", "prior", "decoder", "upsampler", "upsampler2"];

impl RunConfig {
    /// Reads `path`, applies `key=value` overrides (dotted keys; values in TOML syntax, or bare
    /// strings) and validates the result. `run.out` relative paths stay relative to the working
    /// folder, like every other path in the file.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        if !path.is_file() {
            return Err(ConfigError::new(path, None, "no such config file"));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, None, format!("cannot read: {e}")))?;
        Self::parse(&text, path, overrides)
    }

    /// As [`Self::load`] from the file's text (`file` names it in errors).
    pub fn parse(text: &str, file: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::new(file, None, e.to_string()))?;
        for o in overrides {
            apply_override(&mut table, o).map_err(|(key, msg)| ConfigError::new(file, key, msg))?;
        }
        let cfg: RunConfig =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                let key = (key != "." && !key.is_empty()).then_some(key);
                ConfigError::new(file, key, e.into_inner().to_string())
            })?;
        cfg.validate().map_err(|(key, msg)| ConfigError::new(file, Some(key), msg))?;
        Ok(cfg)
    }

    /// The effective config as TOML (defaults filled in).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print the config: {e}\n"))
    }

    /// Stages present in the file, in training order.
    pub fn stages(&self) -> Vec<&'static str> {
        let present = [
            self.tokenizer.is_some(),
            self.clip.is_some(),
            self.prior.is_some(),
            self.decoder.is_some(),
            self.upsampler.is_some(),
            self.upsampler2.is_some(),
        ];
        STAGES.iter().zip(present).filter(|(_, p)| *p).map(|(s, _)| *s).collect()
    }

    /// The train settings of stage `name`.
    pub fn train_settings(&self, name: &str) -> Option<&TrainSettings> {
        match name {
            "clip" => self.clip.as_ref().map(|s| &s.train),
            "prior" => self.prior.as_ref().map(|s| &s.train),
            "decoder" => self.decoder.as_ref().map(|s| &s.train),
            "upsampler" => self.upsampler.as_ref().map(|s| &s.train),
            "upsampler2" => self.upsampler2.as_ref().map(|s| &s.train),
            _ => None,
        }
    }

    fn train_settings_mut(&mut self, name: &str) -> Option<&mut TrainSettings> {
        match name {
            "clip" => self.clip.as_mut().map(|s| &mut s.train),
            "prior" => self.prior.as_mut().map(|s| &mut s.train),
            "decoder" => self.decoder.as_mut().map(|s| &mut s.train),
            "upsampler" => self.upsampler.as_mut().map(|s| &mut s.train),
            "upsampler2" => self.upsampler2.as_mut().map(|s| &mut s.train),
            _ => None,
        }
    }

    /// Impossible values, as (key, what was expected).
    fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: &str| Err((k.to_string(), m.to_string()));
        if self.run.out.as_os_str().is_empty() {
            return err("run.out", "a folder path, got an empty string");
        }
        if unclip_core::parse_device(&self.run.device).is_err() {
            return err("run.device", "cpu, cuda, cuda:N or mps");
        }
        let device = unclip_core::parse_device(&self.run.device).ok();
        match (self.run.precision, device) {
            (Precision::F16, Some(d)) if !d.is_cuda() => {
                return err(
                    "run.precision",
                    "\"f32\" or \"bf16\" on this device: \"f16\" autocast needs run.device = \"cuda\" \
                     (libtorch's CPU autocast is bf16)",
                );
            }
            (Precision::Bf16, Some(d)) if !(d.is_cuda() || d == tch::Device::Cpu) => {
                return err(
                    "run.precision",
                    "\"f32\" on this device (autocast runs on cpu and cuda)",
                );
            }
            _ => {}
        }
        if let Some(t) = self.run.threads {
            if !(1..=1024).contains(&t) {
                return err("run.threads", "a thread count from 1 to 1024");
            }
        }
        let d = &self.data;
        match (d.source, &d.path) {
            (SourceKind::Shapes, _) if d.items.is_none() => {
                return err("data.items", "the number of shapes scenes (source = \"shapes\")");
            }
            (SourceKind::Shapes, _) => {}
            (_, None) => {
                return err("data.path", "the data's folder or shards (required for this source)");
            }
            (_, Some(p)) if p.as_os_str().is_empty() => {
                return err("data.path", "a path, got an empty string");
            }
            _ => {}
        }
        if d.items == Some(0) {
            return err("data.items", "at least 1");
        }
        if d.workers == 0 {
            return err("data.workers", "at least 1 decode thread");
        }
        if !(0.0..=1.0).contains(&d.max_bad_fraction) {
            return err("data.max_bad_fraction", "a fraction in [0, 1]");
        }
        if let Some(w) = d.kind_weights {
            if d.source != SourceKind::Shapes {
                return err("data.kind_weights", "only with source = \"shapes\"");
            }
            if w.iter().all(|&x| x == 0) || w.iter().any(|&x| x > 1000) {
                return err(
                    "data.kind_weights",
                    "four weights from 0 to 1000 (single, relation, binding, negation), not all 0",
                );
            }
        }
        if self.stages().is_empty() {
            return err(
                "stages",
                "at least one stage section: [tokenizer], [clip], [prior], [decoder], [upsampler] or [upsampler2]",
            );
        }
        if self.validation.grid > 64 {
            return err("validation.grid", "at most 64 pictures");
        }
        if self.validation.sample_steps == 0 || self.validation.sample_steps > 1000 {
            return err("validation.sample_steps", "from 1 to 1000");
        }
        for name in STAGES {
            if let Some(t) = self.train_settings(name) {
                validate_train(name, t)?;
            }
        }
        let conditioned = self.prior.is_some() || self.decoder.is_some();
        let own_clip = self.clip.is_some();
        if conditioned && !own_clip && self.run.conditioning.is_none() {
            return err(
                "run.conditioning",
                "a model folder whose tokenizer and CLIP encoders the prior/decoder condition on \
                 (or a [clip] stage in this run)",
            );
        }
        if own_clip && self.tokenizer.is_none() && self.run.conditioning.is_none() {
            return err(
                "tokenizer",
                "a [tokenizer] stage, or run.conditioning naming a folder with a tokenizer",
            );
        }
        if let Some(t) = &self.tokenizer {
            if t.vocab_size < 514 + 1 {
                return err(
                    "tokenizer.vocab_size",
                    "at least 515 (512 byte symbols, 2 specials, a merge)",
                );
            }
            if t.context_length < 3 {
                return err("tokenizer.context_length", "at least 3 tokens");
            }
            if t.captions == 0 {
                return err("tokenizer.captions", "at least 1");
            }
        }
        if let Some(c) = &self.clip {
            if c.init.is_none() == c.model.is_none() {
                return err("clip.model", "exactly one of clip.model and clip.init");
            }
            if let Some(m) = &c.model {
                if m.width <= 0 || m.layers <= 0 || m.heads <= 0 || m.width % m.heads != 0 {
                    return err("clip.model.width", "positive, divisible by clip.model.heads");
                }
                if m.patch_size <= 0 || m.image_size <= 0 || m.image_size % m.patch_size != 0 {
                    return err(
                        "clip.model.image_size",
                        "a positive multiple of clip.model.patch_size",
                    );
                }
            }
            if c.freeze_image && c.init.is_none() {
                return err("clip.freeze_image", "needs clip.init (a trained image tower to keep)");
            }
            if c.freeze_text && c.init.is_none() {
                return err("clip.freeze_text", "needs clip.init (a trained text tower to keep)");
            }
            if c.freeze_text && c.freeze_image {
                return err(
                    "clip.freeze_text",
                    "false when clip.freeze_image is true (nothing would train but the temperature)",
                );
            }
            if !(c.anchor_image.is_finite() && c.anchor_image >= 0.0) {
                return err("clip.anchor_image", "a finite weight >= 0");
            }
            if c.anchor_image > 0.0 && (c.init.is_none() || c.freeze_image) {
                return err(
                    "clip.anchor_image",
                    "0 unless clip.init loads an image tower that trains",
                );
            }
            if c.copy_negatives > 0 && d.source != SourceKind::Shapes {
                return err("clip.copy_negatives", "0 unless data.source = \"shapes\"");
            }
            if c.copy_negatives > 8 {
                return err("clip.copy_negatives", "at most 8 per scene");
            }
            if c.counterparts == 0 {
                return err("clip.counterparts", "at least 1 (1: plain batches)");
            }
            if c.counterparts > 1 && d.source != SourceKind::Shapes {
                return err("clip.counterparts", "1 unless data.source = \"shapes\"");
            }
        }
        if let Some(p) = &self.prior {
            if p.init.is_none() == p.model.is_none() {
                return err("prior.model", "exactly one of prior.model and prior.init");
            }
            if let Some(m) = &p.model {
                if m.layers <= 0 || m.heads <= 0 {
                    return err("prior.model.layers", "positive layers and heads");
                }
            }
            if !(0.0..=1.0).contains(&p.text_dropout) {
                return err("prior.text_dropout", "a probability in [0, 1]");
            }
            if p.stat_items == 0 {
                return err("prior.stat_items", "at least 1");
            }
        }
        if let Some(dc) = &self.decoder {
            if dc.init.is_none() && dc.model.is_none() {
                return err(
                    "decoder.model",
                    "decoder.model or decoder.init (both: the model's shape, the folder's weights)",
                );
            }
            if let Some(m) = &dc.model {
                if m.channels.is_empty()
                    || m.channels.iter().any(|&c| c <= 0 || c % m.norm_groups != 0)
                {
                    return err(
                        "decoder.model.channels",
                        "positive channel counts divisible by norm_groups",
                    );
                }
                if m.layers_per_block <= 0 || m.attention_head_dim <= 0 {
                    return err("decoder.model.layers_per_block", "positive layers and head size");
                }
            }
            if !(4..=1024).contains(&dc.resolution) {
                return err("decoder.resolution", "a side from 4 to 1024 pixels");
            }
            if !(0.0..=1.0).contains(&dc.text_dropout) {
                return err("decoder.text_dropout", "a probability in [0, 1]");
            }
            if !(0.0..=1.0).contains(&dc.high_noise) {
                return err("decoder.high_noise", "a share in [0, 1]");
            }
            if !(dc.edge_weight.is_finite() && (0.0..=100.0).contains(&dc.edge_weight)) {
                return err("decoder.edge_weight", "from 0 to 100");
            }
            if !(0..1000).contains(&dc.high_noise_from) {
                return err("decoder.high_noise_from", "a timestep in 0..1000");
            }
        }
        for (name, u) in [("upsampler", &self.upsampler), ("upsampler2", &self.upsampler2)] {
            if let Some(u) = u {
                validate_upsampler(name, u)?;
            }
        }
        if let Some(g) = self.export.decoder_guidance_scale {
            if !(g.is_finite() && (0.0..=100.0).contains(&g)) {
                return err("export.decoder_guidance_scale", "a finite scale from 0 to 100");
            }
        }
        if let Some(k) = self.export.decoder_candidates {
            if !(1..=16).contains(&k) {
                return err("export.decoder_candidates", "from 1 (off) to 16");
            }
        }
        Ok(())
    }

    /// Compares this config with the one a run folder was started with. Only what cannot change
    /// the trained weights may differ (threads, data workers and prefetch, validation, export),
    /// and step counts may grow (the stage resumes from its last checkpoint up to the new count).
    /// Returns the stages whose step count grew, with their old count; an error names every
    /// other key that differs.
    pub fn compare_with_stored(
        &self,
        old: &RunConfig,
        file: &Path,
    ) -> Result<Vec<(&'static str, u64)>, ConfigError> {
        let mut same = self.clone();
        let mut grown = Vec::new();
        same.run.threads = old.run.threads;
        same.data.workers = old.data.workers;
        same.data.prefetch = old.data.prefetch;
        same.validation = old.validation.clone();
        same.export = old.export.clone();
        for name in STAGES {
            let (Some(new), Some(before)) =
                (same.train_settings_mut(name), old.train_settings(name))
            else {
                continue;
            };
            if new.steps < before.steps {
                return Err(ConfigError::new(
                    file,
                    Some(format!("{name}.train.steps")),
                    format!(
                        "{} asked, the run already had {}; steps can only grow",
                        new.steps, before.steps
                    ),
                ));
            }
            if new.steps > before.steps {
                grown.push((name, before.steps));
            }
            new.steps = before.steps;
            new.validate_every = before.validate_every;
        }
        // A stage section added or removed is fine (stages are independent folders); compare the
        // sections both have.
        macro_rules! keep_absent {
            ($($f:ident),*) => {$(
                if same.$f.is_none() || old.$f.is_none() { same.$f = old.$f.clone(); }
            )*};
        }
        keep_absent!(tokenizer, clip, prior, decoder, upsampler, upsampler2);
        if &same != old {
            let a = toml::Value::try_from(&same).ok();
            let b = toml::Value::try_from(old).ok();
            let mut keys = Vec::new();
            if let (Some(a), Some(b)) = (a, b) {
                diff_keys(&a, &b, String::new(), &mut keys);
            }
            return Err(ConfigError::new(
                file,
                keys.first().cloned(),
                format!(
                    "differs from the run folder's stored config.toml in {}: use a new run.out, or \
                     change only step counts (and threads, workers, validation, export)",
                    if keys.is_empty() { "some setting".into() } else { keys.join(", ") }
                ),
            ));
        }
        Ok(grown)
    }
}

fn validate_train(name: &str, t: &TrainSettings) -> Result<(), (String, String)> {
    let k = |f: &str| format!("{name}.train.{f}");
    let fin = |v: f64| v.is_finite();
    if t.steps == 0 || t.steps > 100_000_000 {
        return Err((k("steps"), "from 1 to 100000000".into()));
    }
    if t.batch_size == 0 || t.batch_size > 65_536 {
        return Err((k("batch_size"), "from 1 to 65536".into()));
    }
    if t.accumulate == 0 || t.accumulate > 4096 {
        return Err((k("accumulate"), "micro-batches per optimizer step, from 1 to 4096".into()));
    }
    if !(fin(t.lr) && t.lr > 0.0 && t.lr < 1.0) {
        return Err((k("lr"), "a learning rate in (0, 1)".into()));
    }
    if !(fin(t.lr_floor) && (0.0..=1.0).contains(&t.lr_floor)) {
        return Err((k("lr_floor"), "a fraction of lr in [0, 1]".into()));
    }
    if !(fin(t.weight_decay) && (0.0..1.0).contains(&t.weight_decay)) {
        return Err((k("weight_decay"), "in [0, 1)".into()));
    }
    if !(fin(t.ema_decay) && (0.0..1.0).contains(&t.ema_decay)) {
        return Err((k("ema_decay"), "in [0, 1) (0: no EMA)".into()));
    }
    if !(fin(t.grad_clip) && t.grad_clip >= 0.0) {
        return Err((k("grad_clip"), "a non-negative norm (0: no clipping)".into()));
    }
    if t.checkpoint_every == Some(0) {
        return Err((k("checkpoint_every"), "at least 1".into()));
    }
    if t.keep_checkpoints == 0 {
        return Err((k("keep_checkpoints"), "at least 1".into()));
    }
    if t.max_nonfinite == 0 {
        return Err((k("max_nonfinite"), "at least 1".into()));
    }
    Ok(())
}

/// Sets `a.b.c=value` in `table`; the value is parsed as TOML (`3`, `1e-4`, `true`, `[1, 2]`,
/// `"text"`), or taken as a plain string when it does not parse.
fn apply_override(table: &mut toml::Table, spec: &str) -> Result<(), (Option<String>, String)> {
    let Some((key, raw)) = spec.split_once('=') else {
        return Err((None, format!("--set {spec:?}: expected key=value")));
    };
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err((
            Some(key.into()),
            format!("--set {spec:?}: expected a dotted key like decoder.train.steps"),
        ));
    }
    let value: toml::Value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        let entry =
            cur.entry(p.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
        cur = entry.as_table_mut().ok_or_else(|| {
            (Some(key.to_string()), format!("--set: `{p}` is a value, not a section"))
        })?;
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

fn diff_keys(a: &toml::Value, b: &toml::Value, prefix: String, out: &mut Vec<String>) {
    match (a, b) {
        (toml::Value::Table(x), toml::Value::Table(y)) => {
            let mut names: Vec<&String> = x.keys().chain(y.keys()).collect();
            names.sort();
            names.dedup();
            for n in names {
                let p = if prefix.is_empty() { n.clone() } else { format!("{prefix}.{n}") };
                match (x.get(n), y.get(n)) {
                    (Some(u), Some(v)) => diff_keys(u, v, p, out),
                    _ => out.push(p),
                }
            }
        }
        _ if a != b => out.push(prefix),
        _ => {}
    }
}

/// `[upsampler]` or `[upsampler2]` (`name`): impossible values as (key, what was expected).
fn validate_upsampler(name: &str, u: &UpsamplerStage) -> Result<(), (String, String)> {
    let err = |k: &str, m: String| Err((format!("{name}.{k}"), m));
    if u.init.is_none() == u.model.is_none() {
        return err("model", format!("exactly one of {name}.model and {name}.init"));
    }
    if let Some(m) = &u.model {
        if m.channels.is_empty() || m.channels.iter().any(|&c| c <= 0 || c % m.norm_groups != 0) {
            return err(
                "model.channels",
                "positive channel counts divisible by norm_groups".into(),
            );
        }
    }
    if u.low_resolution == 0
        || u.resolution <= u.low_resolution
        || u.resolution % u.low_resolution != 0
        || u.resolution > 4096
    {
        return err("resolution", format!("a multiple of {name}.low_resolution, larger than it"));
    }
    if u.crop <= 0 || u.crop > u.resolution as i64 {
        return err("crop", format!("from 1 to {name}.resolution"));
    }
    if !(0.0..=10.0).contains(&u.blur_sigma) {
        return err("blur_sigma", "from 0 to 10".into());
    }
    if let Some(max) = u.blur_sigma_max {
        let limit = unclip_decoder::train::MAX_BLUR_SIGMA;
        if !(u.blur_sigma > 0.0 && u.blur_sigma <= max && max <= limit) {
            return err(
                "blur_sigma_max",
                format!("from {name}.blur_sigma (which must be above 0) to {limit}"),
            );
        }
    }
    Ok(())
}
