//! Loading and saving components in the diffusers layout: `<dir>/config.json` +
//! `<dir>/diffusion_pytorch_model.safetensors`, tensor names as in the checkpoint.

use crate::config::{TextProjConfig, UNet2DConditionConfig, UNet2DConfig};
use crate::{Result, UNet2DConditionModel, UNet2DModel, UnCLIPTextProjModel};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::Path;
use tch::{Device, Kind, nn};
use unclip_core::weights::{Unexpected, load_file, save_file};

/// File names of a diffusers component directory.
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";

/// A model built from a config, with its tensors under the given path.
pub trait Component: Sized {
    type Config: Serialize + DeserializeOwned + Clone;
    /// The diffusers class name written to `config.json` (`_class_name`).
    const CLASS_NAME: &'static str;
    fn build(p: nn::Path, cfg: &Self::Config) -> Result<Self>;
    /// Checks a parsed config (called before building).
    fn validate(cfg: &Self::Config) -> Result<()>;
}

impl Component for UNet2DConditionModel {
    type Config = UNet2DConditionConfig;
    const CLASS_NAME: &'static str = "UNet2DConditionModel";
    fn build(p: nn::Path, cfg: &Self::Config) -> Result<Self> {
        UNet2DConditionModel::new(p, cfg)
    }
    fn validate(cfg: &Self::Config) -> Result<()> {
        cfg.validate()
    }
}

impl Component for UNet2DModel {
    type Config = UNet2DConfig;
    const CLASS_NAME: &'static str = "UNet2DModel";
    fn build(p: nn::Path, cfg: &Self::Config) -> Result<Self> {
        UNet2DModel::new(p, cfg)
    }
    fn validate(cfg: &Self::Config) -> Result<()> {
        cfg.validate()
    }
}

impl Component for UnCLIPTextProjModel {
    type Config = TextProjConfig;
    const CLASS_NAME: &'static str = "UnCLIPTextProjModel";
    fn build(p: nn::Path, cfg: &Self::Config) -> Result<Self> {
        UnCLIPTextProjModel::new(p, cfg)
    }
    fn validate(cfg: &Self::Config) -> Result<()> {
        cfg.validate()
    }
}

/// A model together with the store that owns its variables and the config it was built from.
#[derive(Debug)]
pub struct Loaded<M: Component> {
    pub vs: nn::VarStore,
    pub model: M,
    pub config: M::Config,
}

impl<M: Component> Loaded<M> {
    /// Stores the conv kernels channels-last, so the UNets run channels-last inside (same
    /// values; faster convolutions on oneDNN CPUs, see `benches/README.md`).
    pub fn to_channels_last(&self) -> Result<()> {
        Ok(unclip_core::nn::vars_to_channels_last(&self.vs)?)
    }
}

/// Reads and validates `<dir>/config.json` (sizes beyond any real model refused by key).
pub fn read_config<M: Component>(dir: &Path) -> Result<M::Config> {
    let path = dir.join(CONFIG_FILE);
    let cfg: M::Config = unclip_core::config::read_model_json(&path)?;
    M::validate(&cfg).map_err(|e| match e {
        crate::Error::Config(m) => crate::Error::Config(format!("{}: {m}", path.display())),
        e => e,
    })?;
    Ok(cfg)
}

fn build<M: Component>(cfg: &M::Config, device: Device, kind: Kind) -> Result<Loaded<M>> {
    M::validate(cfg)?;
    unclip_core::check_device(device)?;
    let mut vs = nn::VarStore::new(device);
    // Set before building so the variables are created in `kind` (no f32 copy first).
    vs.set_kind(kind);
    let model = M::build(vs.root(), cfg)?;
    Ok(Loaded { vs, model, config: cfg.clone() })
}

/// The names and shapes of the variables `cfg` implies, computed without allocating them.
pub fn layout<M: Component>(cfg: &M::Config) -> Result<unclip_core::nn::Layout> {
    unclip_core::nn::measure(|| build::<M>(cfg, Device::Cpu, Kind::Float))
}

/// Builds a freshly initialized model (for training from scratch) on `device` in `kind`; a
/// config too large for the device's memory is refused with the memory it would need.
pub fn init<M: Component>(cfg: &M::Config, device: Device, kind: Kind) -> Result<Loaded<M>> {
    let n = layout::<M>(cfg)?.elements;
    let bytes = n.saturating_mul(unclip_core::memory::element_size(kind));
    unclip_core::memory::ensure_fits(
        &format!("a {} of {n} parameters", M::CLASS_NAME),
        bytes,
        device,
    )?;
    unclip_core::nn::guarded(M::CLASS_NAME, || build::<M>(cfg, device, kind))
}

/// Loads a component directory: config, model, weights (every missing, misshapen or unexpected
/// tensor is an error that names it). f16/bf16 files load into `kind`. The config is sized
/// against the checkpoint before anything is allocated (see
/// [`unclip_core::weights::check_layout`]).
pub fn load<M: Component>(dir: &Path, device: Device, kind: Kind) -> Result<Loaded<M>> {
    let cfg = read_config::<M>(dir)?;
    let weights = dir.join(WEIGHTS_FILE);
    let layout = layout::<M>(&cfg)?;
    let config = dir.join(CONFIG_FILE);
    unclip_core::weights::check_layout(
        &config,
        &weights,
        &layout,
        Unexpected::Error,
        kind,
        device,
    )?;
    // Every variable is overwritten below: skip the random initialisation.
    let loaded = unclip_core::nn::for_loading(|| build::<M>(&cfg, device, kind))?;
    load_file(&loaded.vs, &weights, Unexpected::Error)?;
    Ok(loaded)
}

/// Writes `config.json` (with `_class_name`) and the weights (optionally cast to `kind`).
pub fn save<M: Component>(loaded: &Loaded<M>, dir: &Path, kind: Option<Kind>) -> Result<()> {
    let mut value = serde_json::to_value(&loaded.config)
        .map_err(|e| crate::Error::Config(format!("cannot serialize config: {e}")))?;
    if let Some(obj) = value.as_object_mut() {
        obj.insert("_class_name".into(), M::CLASS_NAME.into());
    }
    unclip_core::config::write_json(&dir.join(CONFIG_FILE), &value)?;
    save_file(&loaded.vs, &dir.join(WEIGHTS_FILE), kind)?;
    Ok(())
}
