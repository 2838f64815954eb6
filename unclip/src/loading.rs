//! `from_pretrained` / `save_pretrained` for diffusers-layout unCLIP folders (`model_index.json`,
//! one folder per component), as `kakaobrain/karlo-v1-alpha` and
//! `karlo-v1-alpha-image-variations` are published. Device and dtype are chosen per component.

use crate::pipeline::{CascadeStage, Unclip};
use crate::sampling::SamplingDefaults;
use crate::stages::{ClipImageEncoder, ClipTextEncoder, KarloDecoder, KarloPrior, KarloUpsampler};
use crate::{Error, Result};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};
use unclip_clip::{ClipModel, ClipTokenizer};
use unclip_core::fsutil::{describe, is_present};
use unclip_decoder::checkpoint;
use unclip_prior::PriorTransformer;
use unclip_scheduler::{
    DdimScheduler, DdimSchedulerConfig, DdpmScheduler, DdpmSchedulerConfig, DpmSolverConfig,
    DpmSolverMultistepScheduler, Scheduler, UnCLIPScheduler, UnCLIPSchedulerConfig, VarianceType,
};

/// Component folder names of the two Karlo pipelines.
pub const TEXT_TO_IMAGE: &str = "UnCLIPPipeline";
pub const IMAGE_VARIATION: &str = "UnCLIPImageVariationPipeline";
const SCHEDULERS: [&str; 3] = ["prior_scheduler", "decoder_scheduler", "super_res_scheduler"];
/// The optional second upsampler and its sampler ([`crate::CascadeStage`]; not in Karlo folders).
pub const SUPER_RES_2: &str = "super_res_2";
pub const SUPER_RES_2_SCHEDULER: &str = "super_res_2_scheduler";

/// Where each component is loaded: a default device and dtype, overridable per component
/// (names as the folders: `text_encoder`, `image_encoder`, `prior`, `text_proj`, `decoder`,
/// `super_res_first`, `super_res_last`, `super_res_2`).
///
/// ```no_run
/// # use unclip::{LoadOptions, tch::{Device, Kind}};
/// // UNets in f16 on the GPU, CLIP in f32 on the CPU.
/// let opts = LoadOptions::new(Device::Cuda(0), Kind::Half)
///     .component("text_encoder", Device::Cpu, Kind::Float)
///     .component("image_encoder", Device::Cpu, Kind::Float);
/// ```
#[derive(Debug, Clone)]
pub struct LoadOptions {
    device: Device,
    kind: Kind,
    overrides: BTreeMap<String, (Device, Kind)>,
    channels_last: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self::new(Device::Cpu, Kind::Float)
    }
}

impl LoadOptions {
    pub fn new(device: Device, kind: Kind) -> Self {
        let channels_last = device == Device::Cpu;
        Self { device, kind, overrides: BTreeMap::new(), channels_last }
    }

    /// Runs the decoder and upsampler UNets channels-last (same values up to float rounding,
    /// other kernels; see `unclip_core::nn::channels_last`). On by default on the CPU, where it
    /// made the embedded model's super-resolution steps 15% faster and its decoder steps 8%
    /// (`benches/README.md`); off by default on CUDA, where it was not measured.
    pub fn channels_last(mut self, on: bool) -> Self {
        self.channels_last = on;
        self
    }

    /// Device and dtype of one component.
    pub fn component(mut self, name: &str, device: Device, kind: Kind) -> Self {
        self.overrides.insert(name.to_string(), (device, kind));
        self
    }

    /// Device and dtype `name` is loaded with.
    pub fn for_component(&self, name: &str) -> (Device, Kind) {
        self.overrides.get(name).copied().unwrap_or((self.device, self.kind))
    }

    fn check(&self) -> Result<()> {
        let known = [
            "text_encoder",
            "image_encoder",
            "prior",
            "text_proj",
            "decoder",
            "super_res_first",
            "super_res_last",
            SUPER_RES_2,
        ];
        for (name, (device, kind)) in self
            .overrides
            .iter()
            .chain(std::iter::once((&String::new(), &(self.device, self.kind))))
        {
            if !name.is_empty() && !known.contains(&name.as_str()) {
                return Err(Error::Input(format!(
                    "unknown component {name:?} in load options (known: {})",
                    known.join(", ")
                )));
            }
            unclip_core::check_device(*device)?;
            if !matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16) {
                return Err(Error::Input(format!("dtype must be f32, f16 or bf16, got {kind:?}")));
            }
            unclip_core::check_device(*device)?;
        }
        Ok(())
    }
}

/// The files a component folder must have.
pub(crate) fn required_files(component: &str) -> &'static [&'static str] {
    match component {
        "tokenizer" => &[],
        "text_encoder" | "image_encoder" => &["config.json", "model.safetensors"],
        "feature_extractor" => &["preprocessor_config.json"],
        c if c.ends_with("scheduler") => &["scheduler_config.json"],
        _ => &["config.json", "diffusion_pytorch_model.safetensors"],
    }
}

/// The components a pipeline class needs.
pub(crate) fn required_components(class: &str) -> &'static [&'static str] {
    match class {
        IMAGE_VARIATION => &[
            "tokenizer",
            "text_encoder",
            "image_encoder",
            "feature_extractor",
            "text_proj",
            "decoder",
            "super_res_first",
            "super_res_last",
            "decoder_scheduler",
            "super_res_scheduler",
        ],
        _ => &[
            "tokenizer",
            "text_encoder",
            "prior",
            "text_proj",
            "decoder",
            "super_res_first",
            "super_res_last",
            "prior_scheduler",
            "decoder_scheduler",
            "super_res_scheduler",
        ],
    }
}

/// The components a folder of `class` must have in full: the class's own, and the optional second
/// upsampler and its sampler when `index` lists them (the loader and the hub download agree on it).
pub(crate) fn listed_components(class: &str, index: &Value) -> Vec<&'static str> {
    let cascade: &[&str] =
        if index.get(SUPER_RES_2).is_some() { &[SUPER_RES_2, SUPER_RES_2_SCHEDULER] } else { &[] };
    required_components(class).iter().chain(cascade).copied().collect()
}

/// Reads `model_index.json` and checks that every component folder and file is there; the error
/// lists everything missing at once.
pub fn inspect(dir: &Path) -> Result<(String, Value)> {
    let index_path = dir.join("model_index.json");
    if !dir.is_dir() {
        return Err(Error::Checkpoint {
            dir: dir.to_path_buf(),
            problems: vec![format!("expected a folder, found {}", describe(dir))],
        });
    }
    if !is_present(&index_path) {
        return Err(Error::Checkpoint {
            dir: dir.to_path_buf(),
            problems: vec!["no model_index.json: not a diffusers pipeline folder".into()],
        });
    }
    let index: Value = unclip_core::config::read_json(&index_path)?;
    let class = index.get("_class_name").and_then(Value::as_str).unwrap_or("").to_string();
    if class != TEXT_TO_IMAGE && class != IMAGE_VARIATION {
        return Err(Error::Checkpoint {
            dir: dir.to_path_buf(),
            problems: vec![format!(
                "model_index.json names pipeline {class:?}, not {TEXT_TO_IMAGE} or {IMAGE_VARIATION}"
            )],
        });
    }
    let mut problems = Vec::new();
    for comp in listed_components(&class, &index) {
        if index.get(comp).is_none() {
            problems.push(format!("model_index.json does not list {comp}"));
        }
        let sub = dir.join(comp);
        if !is_present(&sub) {
            problems.push(format!("missing folder {comp}/"));
            continue;
        }
        if !sub.is_dir() {
            problems.push(format!("{comp}/ should be a folder, found {}", describe(&sub)));
            continue;
        }
        for f in required_files(comp) {
            let file = sub.join(f);
            if !is_present(&file) {
                problems.push(format!("missing {comp}/{f}"));
            } else if !file.is_file() {
                problems.push(format!(
                    "{comp}/{f} should be a regular file, found {}",
                    describe(&file)
                ));
            }
        }
        if comp == "tokenizer"
            && !is_present(&sub.join("tokenizer.json"))
            && !(is_present(&sub.join("vocab.json")) && is_present(&sub.join("merges.txt")))
        {
            problems.push("missing tokenizer/vocab.json + merges.txt (or tokenizer.json)".into());
        }
    }
    if problems.is_empty() {
        Ok((class, index))
    } else {
        Err(Error::Checkpoint { dir: dir.to_path_buf(), problems })
    }
}

/// A scheduler from its `scheduler_config.json` (`_class_name` picks the sampler), and whether it
/// consumes a learned variance (2x channels).
pub fn load_scheduler(path: &Path) -> Result<(Box<dyn Scheduler>, bool, Value)> {
    let value: Value = unclip_core::config::read_json(path)?;
    let class = value.get("_class_name").and_then(Value::as_str).unwrap_or("UnCLIPScheduler");
    let learned = |v: VarianceType| matches!(v, VarianceType::Learned | VarianceType::LearnedRange);
    let (s, l): (Box<dyn Scheduler>, bool) = match class {
        "UnCLIPScheduler" => {
            let cfg = UnCLIPSchedulerConfig::from_file(path)?;
            let l = learned(cfg.variance_type);
            (Box::new(UnCLIPScheduler::new(cfg)?), l)
        }
        "DDPMScheduler" => {
            let cfg = DdpmSchedulerConfig::from_file(path)?;
            let l = learned(cfg.variance_type);
            (Box::new(DdpmScheduler::new(cfg)?), l)
        }
        "DDIMScheduler" => {
            (Box::new(DdimScheduler::new(DdimSchedulerConfig::from_file(path)?)?), false)
        }
        "DPMSolverMultistepScheduler" => {
            (Box::new(DpmSolverMultistepScheduler::new(DpmSolverConfig::from_file(path)?)?), false)
        }
        other => {
            return Err(Error::Checkpoint {
                dir: path.to_path_buf(),
                problems: vec![format!("unsupported scheduler class {other:?}")],
            });
        }
    };
    Ok((s, l, value))
}

/// transformers' `CLIPImageProcessor` config for `side`-pixel models (what
/// [`ProcessorConfig::clip`] does).
pub(crate) fn clip_processor_json(side: usize) -> Value {
    json!({
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": true,
        "do_resize": true,
        "size": {"shortest_edge": side},
        "resample": 3,
        "do_center_crop": true,
        "crop_size": {"height": side, "width": side},
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    })
}

fn karlo_scheduler_config(name: &str) -> Value {
    let (variance, prediction, range) = match name {
        "prior_scheduler" => ("fixed_small_log", "sample", 5.0),
        "decoder_scheduler" => ("learned_range", "epsilon", 1.0),
        _ => ("fixed_small_log", "epsilon", 1.0),
    };
    json!({
        "_class_name": "UnCLIPScheduler",
        "beta_schedule": "squaredcos_cap_v2",
        "clip_sample": true,
        "clip_sample_range": range,
        "num_train_timesteps": 1000,
        "prediction_type": prediction,
        "variance_type": variance,
    })
}

/// Loads the decoder-crate component `name` from `dir` with its device and dtype, channels-last
/// when `opts` asks (a no-op for models without conv kernels, like the text projection).
fn load_component<M: checkpoint::Component>(
    opts: &LoadOptions,
    name: &str,
    dir: &Path,
) -> Result<checkpoint::Loaded<M>> {
    let (device, kind) = opts.for_component(name);
    checkpoint::load(dir, device, kind)
        .and_then(|m| {
            if opts.channels_last {
                m.to_channels_last()?;
            }
            Ok(m)
        })
        .map_err(|e| component_err(name, dir)(e.into()))
}

/// A tokenizer that pads prompts longer than the text encoder's positions would fail every
/// prompt; refused at load naming both files and the key to change.
fn check_context(dir: &Path, tokenizer: &ClipTokenizer, model: &ClipModel) -> Result<()> {
    let Some(text) = model.text_config() else {
        return Ok(());
    };
    let (ctx, vocab) = (text.max_position_embeddings, text.vocab_size);
    let tokens = tokenizer.vocab_size() as i64;
    if tokens > vocab {
        return Err(Error::Checkpoint {
            dir: dir.to_path_buf(),
            problems: vec![format!(
                "the tokenizer has {tokens} tokens (tokenizer/vocab.json plus the special tokens of tokenizer_config.json / special_tokens_map.json: {}), but text_encoder/config.json has vocab_size {vocab}: a special token is missing from vocab.json, or vocab_size is wrong",
                tokenizer.special_tokens().join(", ")
            )],
        });
    }
    if tokenizer.context_length() as i64 > ctx {
        return Err(Error::Checkpoint {
            dir: dir.to_path_buf(),
            problems: vec![format!(
                "tokenizer/tokenizer_config.json: model_max_length {} is longer than the {ctx} positions of text_encoder/config.json (max_position_embeddings): set model_max_length to at most {ctx}",
                tokenizer.context_length()
            )],
        });
    }
    Ok(())
}

fn component_err<'a>(name: &'a str, dir: &'a Path) -> impl Fn(Error) -> Error + 'a {
    move |e| Error::Component {
        name: name.to_string(),
        dir: dir.to_path_buf(),
        source: Box::new(e),
    }
}

impl Unclip {
    /// Loads a diffusers-layout unCLIP folder (`UnCLIPPipeline` or
    /// `UnCLIPImageVariationPipeline`), or a Hugging Face repo id (`org/name`) from the local hub
    /// cache when no such folder exists (see [`crate::hub`]). A folder that is not one, or that
    /// lacks components or files, is an error listing every problem; a component whose tensors
    /// are missing or misshapen is an error naming the component and the tensors.
    pub fn from_pretrained(dir: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        opts.check()?;
        let dir = &crate::hub::resolve(dir.as_ref())?;
        let (class, index) = inspect(dir)?;
        let sub = |c: &str| dir.join(c);

        let text_encoder = {
            let (device, kind) = opts.for_component("text_encoder");
            let d = sub("text_encoder");
            let encoder = ClipTextEncoder::load(&d, &sub("tokenizer"), device, kind)
                .map_err(component_err("text_encoder", &d))?;
            check_context(dir, &encoder.tokenizer, &encoder.model)
                .map_err(component_err("text_encoder", &d))?;
            encoder
        };
        let prior = if class == TEXT_TO_IMAGE {
            let (device, kind) = opts.for_component("prior");
            let d = sub("prior");
            let (vs, model) = PriorTransformer::from_pretrained(&d, device, kind)
                .map_err(|e| component_err("prior", &d)(e.into()))?;
            Some(Box::new(KarloPrior { vs, model }) as Box<dyn crate::traits::Prior>)
        } else {
            None
        };
        let image_encoder = if sub("image_encoder").is_dir() {
            let (device, kind) = opts.for_component("image_encoder");
            let d = sub("image_encoder");
            let pj = sub("feature_extractor").join("preprocessor_config.json");
            let encoder = ClipImageEncoder::load(&d, &pj, device, kind)
                .map_err(component_err("image_encoder", &d))?;
            Some(Box::new(encoder) as Box<dyn crate::traits::ImageEncoder>)
        } else {
            None
        };
        let decoder = KarloDecoder {
            unet: load_component(opts, "decoder", &sub("decoder"))?,
            text_proj: load_component(opts, "text_proj", &sub("text_proj"))?,
        };
        let upsampler = KarloUpsampler {
            first: load_component(opts, "super_res_first", &sub("super_res_first"))?,
            last: Some(load_component(opts, "super_res_last", &sub("super_res_last"))?),
        };

        let upsampler_2 = if index.get(SUPER_RES_2).is_some() {
            let d = sub(SUPER_RES_2);
            let upsampler =
                KarloUpsampler { first: load_component(opts, SUPER_RES_2, &d)?, last: None };
            let path = sub(SUPER_RES_2_SCHEDULER).join("scheduler_config.json");
            let (scheduler, _, v) =
                load_scheduler(&path).map_err(component_err(SUPER_RES_2_SCHEDULER, &path))?;
            Some((CascadeStage { upsampler: Box::new(upsampler), scheduler }, v))
        } else {
            None
        };

        let mut configs = BTreeMap::new();
        let mut scheds = Vec::new();
        let mut learned = false;
        for name in SCHEDULERS {
            let path = sub(name).join("scheduler_config.json");
            let (s, l, v) = if is_present(&path) {
                load_scheduler(&path).map_err(component_err(name, &path))?
            } else {
                // The variation pipeline has no prior scheduler: Karlo's.
                load_scheduler_value(karlo_scheduler_config(name))?
            };
            if name == "decoder_scheduler" {
                learned = l;
            }
            configs.insert(name.to_string(), v);
            scheds.push(s);
        }
        let [prior_scheduler, decoder_scheduler, super_res_scheduler]: [Box<dyn Scheduler>; 3] =
            scheds.try_into().map_err(|_| Error::Pipeline("expected 3 schedulers".into()))?;
        let mut pipe = Unclip::new(
            Box::new(text_encoder),
            prior,
            Box::new(decoder),
            Some(Box::new(upsampler)),
            prior_scheduler,
            decoder_scheduler,
            super_res_scheduler,
        );
        if let Some((stage, v)) = upsampler_2 {
            configs.insert(SUPER_RES_2_SCHEDULER.to_string(), v);
            pipe.upsampler_2 = Some(stage);
        }
        pipe.image_encoder = image_encoder;
        pipe.decoder_learned_variance = learned;
        pipe.scheduler_configs = configs;
        pipe.source_class = class;
        pipe.sampling = SamplingDefaults::read(dir)?;
        Ok(pipe)
    }

    /// Writes the pipeline in the diffusers layout: `model_index.json`, one folder per component
    /// (weights in their loaded dtype), the scheduler configs it was loaded with (Karlo's for
    /// samplers it was built without), and `sampling_config.json` when [`Unclip::sampling`]
    /// differs from Karlo's settings. A stage that cannot be saved is an error.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| unclip_core::Error::io(dir, e))?;
        let sub = |c: &str| -> PathBuf { dir.join(c) };
        let mut index = serde_json::Map::new();
        let class = if self.prior.is_some() { TEXT_TO_IMAGE } else { IMAGE_VARIATION };
        index.insert("_class_name".into(), json!(class));
        index.insert("_diffusers_version".into(), json!("0.42.1"));
        let mut add = |name: &str, lib: &str, cls: &str| {
            index.insert(name.into(), json!([lib, cls]));
        };
        self.text_encoder.save_tokenizer(&sub("tokenizer"))?;
        add("tokenizer", "transformers", "CLIPTokenizer");
        self.text_encoder.save_pretrained(&sub("text_encoder"))?;
        add("text_encoder", "transformers", "CLIPTextModelWithProjection");
        if let Some(p) = &self.prior {
            p.save_pretrained(&sub("prior"))?;
            add("prior", "diffusers", "PriorTransformer");
        }
        if let Some(e) = &self.image_encoder {
            e.save_pretrained(&sub("image_encoder"), &sub("feature_extractor"))?;
            add("image_encoder", "transformers", "CLIPVisionModelWithProjection");
            add("feature_extractor", "transformers", "CLIPImageProcessor");
        }
        self.decoder.save_pretrained(&sub("decoder"), &sub("text_proj"))?;
        add("decoder", "diffusers", "UNet2DConditionModel");
        add("text_proj", "unclip", "UnCLIPTextProjModel");
        if let Some(u) = &self.upsampler {
            u.save_pretrained(&sub("super_res_first"), &sub("super_res_last"))?;
            add("super_res_first", "diffusers", "UNet2DModel");
            add("super_res_last", "diffusers", "UNet2DModel");
        }
        if let Some(stage) = &self.upsampler_2 {
            stage.upsampler.save_pretrained(&sub(SUPER_RES_2), &sub(SUPER_RES_2))?;
            add(SUPER_RES_2, "diffusers", "UNet2DModel");
            let v =
                self.scheduler_configs.get(SUPER_RES_2_SCHEDULER).cloned().ok_or_else(|| {
                    Error::Pipeline("the second upsampler has no scheduler config to save".into())
                })?;
            let d = sub(SUPER_RES_2_SCHEDULER);
            std::fs::create_dir_all(&d).map_err(|e| unclip_core::Error::io(&d, e))?;
            unclip_core::config::write_json(&d.join("scheduler_config.json"), &v)?;
            add(SUPER_RES_2_SCHEDULER, "diffusers", "UnCLIPScheduler");
        }
        for name in SCHEDULERS {
            if name == "prior_scheduler" && self.prior.is_none() {
                continue;
            }
            let v = self
                .scheduler_configs
                .get(name)
                .cloned()
                .unwrap_or_else(|| karlo_scheduler_config(name));
            let cls = v.get("_class_name").and_then(Value::as_str).unwrap_or("UnCLIPScheduler");
            add(name, "diffusers", cls);
            std::fs::create_dir_all(sub(name)).map_err(|e| unclip_core::Error::io(sub(name), e))?;
            unclip_core::config::write_json(&sub(name).join("scheduler_config.json"), &v)?;
        }
        if self.sampling != SamplingDefaults::default() {
            self.sampling.write(dir)?;
        }
        unclip_core::config::write_json(&dir.join("model_index.json"), &Value::Object(index))?;
        Ok(())
    }
}

fn load_scheduler_value(v: Value) -> Result<(Box<dyn Scheduler>, bool, Value)> {
    let cfg: UnCLIPSchedulerConfig = serde_json::from_value(v.clone())
        .map_err(|e| Error::Pipeline(format!("built-in scheduler config: {e}")))?;
    let learned = cfg.variance_type == VarianceType::LearnedRange;
    Ok((Box::new(UnCLIPScheduler::new(cfg)?), learned, v))
}

impl Unclip {
    /// Adds a CLIP image encoder (for variations, interpolation, text diffs and reranking) from
    /// a transformers folder (`config.json` + `model.safetensors`, a vision or full CLIP model)
    /// and an optional folder with `preprocessor_config.json` (default: CLIP's processor at the
    /// model's image size). It must share the text encoder's embedding space.
    pub fn load_image_encoder(
        &mut self,
        encoder_dir: &Path,
        processor_dir: Option<&Path>,
        device: Device,
        kind: Kind,
    ) -> Result<()> {
        let pj = processor_dir.unwrap_or(encoder_dir).join("preprocessor_config.json");
        let encoder = ClipImageEncoder::load(encoder_dir, &pj, device, kind)
            .map_err(component_err("image_encoder", encoder_dir))?;
        self.image_encoder = Some(Box::new(encoder));
        Ok(())
    }
}
