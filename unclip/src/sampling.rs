//! The sampling settings a model folder recommends (`sampling_config.json` at its root, in the
//! spirit of transformers' `generation_config.json`). Karlo's defaults (25/25/7 steps, guidance
//! 4 and 8) suit Karlo; a small model can need others: the embedded shapes model's decoder draws
//! extra objects and wrong backgrounds at guidance 8 (README, "The embedded model"). diffusers
//! ignores the file, so the folder stays a valid diffusers pipeline.

use crate::pipeline::{DecodeOptions, TextToImage, check_guidance, check_steps};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// File name of the recommended settings in a pipeline folder.
pub const SAMPLING_CONFIG: &str = "sampling_config.json";

/// Steps and guidance scales a model is meant to be sampled with. Absent fields (and an absent
/// file) take Karlo's values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingDefaults {
    pub prior_steps: usize,
    pub prior_guidance_scale: f64,
    pub decoder_steps: usize,
    pub decoder_guidance_scale: f64,
    /// Decoder best-of-N ([`TextToImage::decoder_candidates`]); 1 (off) unless a folder says.
    pub decoder_candidates: usize,
    pub super_res_steps: usize,
}

impl Default for SamplingDefaults {
    fn default() -> Self {
        Self::KARLO
    }
}

impl SamplingDefaults {
    /// UnCLIPPipeline's defaults, which [`TextToImage`] and [`DecodeOptions`] also start from.
    pub const KARLO: Self = Self {
        prior_steps: 25,
        prior_guidance_scale: 4.0,
        decoder_steps: 25,
        decoder_guidance_scale: 8.0,
        decoder_candidates: 1,
        super_res_steps: 7,
    };

    pub fn validate(&self) -> Result<()> {
        check_steps("prior_steps", self.prior_steps)?;
        check_steps("decoder_steps", self.decoder_steps)?;
        check_steps("super_res_steps", self.super_res_steps)?;
        check_guidance("prior_guidance_scale", self.prior_guidance_scale)?;
        crate::pipeline::check_count("decoder_candidates", self.decoder_candidates)?;
        check_guidance("decoder_guidance_scale", self.decoder_guidance_scale)
    }

    /// `<dir>/sampling_config.json`, or the defaults when the folder has none.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(SAMPLING_CONFIG);
        if !path.is_file() {
            return Ok(Self::default());
        }
        let s: Self = unclip_core::config::read_json(&path)?;
        s.validate().map_err(|e| Error::Checkpoint {
            dir: dir.to_path_buf(),
            problems: vec![format!("{SAMPLING_CONFIG}: {e}")],
        })?;
        Ok(s)
    }

    /// Writes `<dir>/sampling_config.json` (atomically).
    pub fn write(&self, dir: &Path) -> Result<()> {
        self.validate()?;
        Ok(unclip_core::config::write_json(&dir.join(SAMPLING_CONFIG), self)?)
    }

    /// A text-to-image request for `prompt` with these settings.
    pub fn text_to_image(&self, prompt: impl Into<String>) -> TextToImage {
        TextToImage {
            prior_steps: self.prior_steps,
            prior_guidance_scale: self.prior_guidance_scale,
            decoder_steps: self.decoder_steps,
            decoder_guidance_scale: self.decoder_guidance_scale,
            decoder_candidates: self.decoder_candidates,
            super_res_steps: self.super_res_steps,
            ..TextToImage::new(prompt)
        }
    }

    /// Decoder and super-resolution settings with these values.
    pub fn decode_options(&self) -> DecodeOptions {
        DecodeOptions {
            decoder_steps: self.decoder_steps,
            decoder_guidance_scale: self.decoder_guidance_scale,
            super_res_steps: self.super_res_steps,
            seed: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        unclip_core::fsutil::scratch_dir(&format!("sampling-{name}")).unwrap()
    }

    #[test]
    fn absent_file_and_fields_are_karlos() {
        let d = scratch("absent");
        assert_eq!(SamplingDefaults::read(&d).unwrap(), SamplingDefaults::default());
        std::fs::write(d.join(SAMPLING_CONFIG), r#"{"decoder_guidance_scale": 3.0}"#).unwrap();
        let s = SamplingDefaults::read(&d).unwrap();
        assert_eq!(s.decoder_guidance_scale, 3.0);
        assert_eq!(s.prior_guidance_scale, 4.0);
        let req = s.text_to_image("a red circle");
        assert_eq!((req.decoder_guidance_scale, req.decoder_steps), (3.0, 25));
        assert_eq!(req.prompts, ["a red circle"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_values_and_unknown_keys_are_errors() {
        let d = scratch("bad");
        for text in [
            r#"{"decoder_steps": 0}"#,
            r#"{"prior_guidance_scale": -1}"#,
            r#"{"guidance": 3}"#,
            r#"{"decoder_candidates": 0}"#,
        ] {
            std::fs::write(d.join(SAMPLING_CONFIG), text).unwrap();
            assert!(SamplingDefaults::read(&d).is_err(), "{text}");
        }
        let s = SamplingDefaults { super_res_steps: 3, ..Default::default() };
        s.write(&d).unwrap();
        assert_eq!(SamplingDefaults::read(&d).unwrap(), s);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
