//! Flags shared by every example (device and dtype selection, the model folder, seed, output
//! folder) and the progress bars of the unCLIP examples.

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use unclip::{DecodeOptions, LoadOptions, SamplingDefaults, Stage, StepInfo, Unclip};
use unclip_core::tch::{Device, Kind};

/// The embedded default model (`models/shapes/`, trained by `configs/shapes/`), found from any
/// working directory.
pub const EMBEDDED_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/shapes");

/// `--device` and `--dtype`, as every example takes them.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// cpu, cuda, cuda:N or auto (default: the UNCLIP_DEVICE variable, else CUDA when available).
    #[arg(long)]
    pub device: Option<String>,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

impl RuntimeArgs {
    /// The device to run on, or a clear error (e.g. CUDA asked for but absent).
    pub fn device(&self) -> unclip_core::Result<Device> {
        unclip_core::select_device(self.device.as_deref())
    }

    /// The floating-point kind to run in.
    pub fn dtype(&self) -> unclip_core::Result<Kind> {
        unclip_core::parse_dtype(&self.dtype)
    }
}

/// A clap value parser for flags that take a finite number > 0 (scales, factors): refuses 0,
/// negative values, NaN and infinities with a message clap prefixes with the flag's name.
pub fn positive_finite(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number"))?;
    if v.is_finite() && v > 0.0 { Ok(v) } else { Err(format!("{v} is not a finite number > 0")) }
}

/// The libtorch CPU thread counts the examples accept (`--threads`).
pub const THREADS_RANGE: std::ops::RangeInclusive<i64> = 1..=1024;

/// The model and run flags of the unCLIP examples.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A diffusers-layout unCLIP folder (e.g. a download of kakaobrain/karlo-v1-alpha); the
    /// default is the embedded shapes model that ships in the repository.
    #[arg(long, default_value = EMBEDDED_MODEL)]
    pub model: PathBuf,
    #[command(flatten)]
    pub rt: RuntimeArgs,
    /// Device of the CLIP encoders (default: --device), e.g. `cpu` to leave GPU memory to the UNets.
    #[arg(long)]
    pub clip_device: Option<String>,
    /// A CLIP image encoder folder (config.json + model.safetensors, in the text encoder's space),
    /// for models without one (karlo-v1-alpha): e.g. karlo-v1-alpha-image-variations/image_encoder.
    /// Its preprocessor_config.json is looked for beside it, then in ../feature_extractor.
    #[arg(long)]
    pub image_encoder: Option<PathBuf>,
    /// Same seed, same images.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder for the PNGs.
    #[arg(long, default_value = "out")]
    pub out: PathBuf,
}

impl ModelArgs {
    /// Loads the model: UNets and prior on --device in --dtype, CLIP on --clip-device (f32 on the
    /// CPU, else --dtype).
    pub fn load(&self) -> anyhow::Result<Unclip> {
        let (device, kind) = (self.rt.device()?, self.rt.dtype()?);
        let clip_device = match &self.clip_device {
            Some(d) => unclip_core::select_device(Some(d))?,
            None => device,
        };
        let clip_kind = if clip_device == Device::Cpu { Kind::Float } else { kind };
        let opts = LoadOptions::new(device, kind)
            .component("text_encoder", clip_device, clip_kind)
            .component("image_encoder", clip_device, clip_kind);
        let mut model = Unclip::from_pretrained(&self.model, &opts)?;
        if let Some(dir) = &self.image_encoder {
            let beside = dir.join("preprocessor_config.json");
            let sibling = dir.join("..").join("feature_extractor");
            let processor = if beside.is_file() {
                None
            } else if sibling.join("preprocessor_config.json").is_file() {
                Some(sibling)
            } else {
                None
            };
            model.load_image_encoder(dir, processor.as_deref(), clip_device, clip_kind)?;
        }
        Ok(model)
    }
}

/// Decoder and super-resolution flags; each one left out takes the model folder's recommended
/// value (`sampling_config.json`, else Karlo's: 25 decoder and 7 super-resolution steps,
/// guidance 8). The examples that start from an image embedding take only these.
#[derive(Debug, Clone, Args)]
pub struct DecodeArgs {
    /// Decoder steps.
    #[arg(long)]
    pub decoder_steps: Option<usize>,
    /// Decoder classifier-free guidance scale.
    #[arg(long)]
    pub decoder_guidance: Option<f64>,
    /// Steps of each super-resolution stage.
    #[arg(long)]
    pub super_res_steps: Option<usize>,
}

impl DecodeArgs {
    /// `d` with these flags applied.
    fn apply(&self, d: SamplingDefaults) -> SamplingDefaults {
        SamplingDefaults {
            decoder_steps: self.decoder_steps.unwrap_or(d.decoder_steps),
            decoder_guidance_scale: self.decoder_guidance.unwrap_or(d.decoder_guidance_scale),
            super_res_steps: self.super_res_steps.unwrap_or(d.super_res_steps),
            ..d
        }
    }

    /// The model's recommended decoder and super-resolution settings with these flags applied.
    pub fn resolve(&self, model: &Unclip) -> DecodeOptions {
        self.apply(model.sampling).decode_options()
    }
}

/// Text-to-image flags: the prior's and best-of-N's, then the decoder's. Each one left out
/// takes the model folder's recommended value (Karlo's: 25 prior steps, guidance 4).
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Prior steps.
    #[arg(long)]
    pub prior_steps: Option<usize>,
    /// Prior guidance scale.
    #[arg(long)]
    pub prior_guidance: Option<f64>,
    #[command(flatten)]
    pub decode: DecodeArgs,
    /// Decoder best-of-N: decoder images drawn per image, the one closest to the prompt in
    /// CLIP space is upsampled (needs an image encoder).
    #[arg(long)]
    pub decoder_candidates: Option<usize>,
    /// Prior best-of-N: prior samples per image, the one closest to the prompt in CLIP space is
    /// decoded.
    #[arg(long, default_value_t = 1)]
    pub candidates: usize,
}

impl SamplingArgs {
    /// The model's recommended settings with the given flags applied.
    pub fn resolve(&self, model: &Unclip) -> SamplingDefaults {
        let d = self.decode.apply(model.sampling);
        SamplingDefaults {
            prior_steps: self.prior_steps.unwrap_or(d.prior_steps),
            prior_guidance_scale: self.prior_guidance.unwrap_or(d.prior_guidance_scale),
            decoder_candidates: self.decoder_candidates.unwrap_or(d.decoder_candidates),
            ..d
        }
    }
}

/// One progress bar, restarted for every sampling stage.
pub struct Progress {
    bar: ProgressBar,
}

impl Default for Progress {
    fn default() -> Self {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} ({elapsed})")
                .expect("valid template")
                .progress_chars("=> "),
        );
        Self { bar }
    }
}

impl Progress {
    /// The per-step callback to hand to the pipeline.
    pub fn update(&mut self, s: &StepInfo) {
        if s.step == 0 {
            self.bar.reset();
            self.bar.set_length(s.total as u64);
            self.bar.set_message(match s.stage {
                Stage::Prior => "prior",
                Stage::Decoder => "decoder",
                Stage::SuperRes => "super-res",
                Stage::SuperRes2 => "super-res 2",
                Stage::Inversion => "inversion",
            });
        }
        self.bar.set_position(s.step as u64 + 1);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Prints the run's warnings and writes the images as `out/{prefix}{i}.png`.
pub fn save(g: &unclip::Generation, out: &std::path::Path, prefix: &str) -> anyhow::Result<()> {
    save_from(g, out, prefix, 0)
}

/// [`save`] numbering the files from `first` (a chunk of a larger request).
pub fn save_from(
    g: &unclip::Generation,
    out: &std::path::Path,
    prefix: &str,
    first: usize,
) -> anyhow::Result<()> {
    for w in &g.warnings {
        eprintln!("warning: {w}");
    }
    for p in unclip::output::save_pngs_from(&g.images, out, prefix, first)? {
        println!("wrote {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        rt: RuntimeArgs,
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from(["x", "--device", "cpu", "--dtype", "bf16"]).unwrap();
        assert_eq!(cli.rt.device().unwrap(), Device::Cpu);
        assert_eq!(cli.rt.dtype().unwrap(), Kind::BFloat16);
        let bad = Cli::try_parse_from(["x", "--device", "quantum"]).unwrap();
        assert!(bad.rt.device().is_err());
    }

    #[test]
    fn positive_finite_refuses_zero_negative_and_non_finite() {
        assert_eq!(positive_finite("0.5"), Ok(0.5));
        for bad in ["0", "-1", "NaN", "inf", "-inf", "abc", "1e999"] {
            assert!(positive_finite(bad).is_err(), "{bad}");
        }
    }
}
