//! Building a sampler from a diffusers `scheduler_config.json`, dispatched on its `_class_name`.

use crate::{
    DdimInverseScheduler, DdimScheduler, DdpmScheduler, DpmSolverMultistepScheduler, Error, Result,
    Scheduler, UnCLIPScheduler,
};
use serde::de::DeserializeOwned;
use std::path::Path;

/// Python's `json` writes `-inf` as the non-JSON literal `-Infinity` (diffusers' default
/// `lambda_min_clipped`); outside strings we read it as `null`, which such fields take to mean
/// their default.
fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            in_string = c != '"' || escaped;
            escaped = c == '\\' && !escaped;
        } else if c == '"' {
            in_string = true;
        } else if rest.starts_with("-Infinity") {
            out.push_str("null");
            rest = &rest["-Infinity".len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Parses diffusers config JSON text into `T` (unknown keys ignored by the config structs).
pub fn parse_config<T: DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_str(&sanitize(text)).map_err(|e| Error::Config(e.to_string()))
}

/// Reads a diffusers config file into `T`, with the path in any error.
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = unclip_core::fsutil::read_text(path, unclip_core::config::MAX_JSON_BYTES)?;
    parse_config(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// The sampler a diffusers scheduler config (JSON text) describes: `UnCLIPScheduler`,
/// `DDPMScheduler`, `DDIMScheduler`, `DDIMInverseScheduler` or `DPMSolverMultistepScheduler`.
pub fn scheduler_from_json(text: &str) -> Result<Box<dyn Scheduler>> {
    let value: serde_json::Value = parse_config(text)?;
    let class = value.get("_class_name").and_then(|v| v.as_str()).unwrap_or("").to_string();
    fn de<T: DeserializeOwned>(v: serde_json::Value) -> Result<T> {
        serde_json::from_value(v).map_err(|e| Error::Config(e.to_string()))
    }
    Ok(match class.as_str() {
        "UnCLIPScheduler" => Box::new(UnCLIPScheduler::new(de(value)?)?),
        "DDPMScheduler" => Box::new(DdpmScheduler::new(de(value)?)?),
        "DDIMScheduler" => Box::new(DdimScheduler::new(de(value)?)?),
        "DDIMInverseScheduler" => Box::new(DdimInverseScheduler::new(de(value)?)?),
        "DPMSolverMultistepScheduler" => Box::new(DpmSolverMultistepScheduler::new(de(value)?)?),
        other => {
            return Err(Error::Config(format!(
                "unsupported scheduler _class_name {other:?} (supported: UnCLIPScheduler, \
                 DDPMScheduler, DDIMScheduler, DDIMInverseScheduler, DPMSolverMultistepScheduler)"
            )));
        }
    })
}

/// [`scheduler_from_json`] of a file (e.g. `decoder_scheduler/scheduler_config.json`).
pub fn scheduler_from_file(path: &Path) -> Result<Box<dyn Scheduler>> {
    let text = unclip_core::fsutil::read_text(path, unclip_core::config::MAX_JSON_BYTES)?;
    scheduler_from_json(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minus_infinity_outside_strings_becomes_null() {
        assert_eq!(
            sanitize(r#"{"a": -Infinity, "b": "x -Infinity \" -Infinity", "c": [1,-Infinity]}"#),
            r#"{"a": null, "b": "x -Infinity \" -Infinity", "c": [1,null]}"#
        );
    }

    #[test]
    fn unknown_class_is_a_config_error() {
        let e = scheduler_from_json(r#"{"_class_name": "EulerDiscreteScheduler"}"#);
        assert!(matches!(e, Err(Error::Config(m)) if m.contains("EulerDiscreteScheduler")));
        assert!(matches!(scheduler_from_json("{"), Err(Error::Config(_))));
    }
}
