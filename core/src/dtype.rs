//! Floating-point dtype names used by flags and loaders.

use crate::{Error, Result};
use tch::Kind;

/// Parses `f32`/`float32`/`fp32`, `f16`/`float16`/`fp16`/`half`, `bf16`/`bfloat16`.
pub fn parse_dtype(name: &str) -> Result<Kind> {
    match name.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" | "fp32" | "float" => Ok(Kind::Float),
        "f16" | "float16" | "fp16" | "half" => Ok(Kind::Half),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        _ => Err(Error::InvalidDtype(name.into())),
    }
}

/// The short name of a floating-point kind (`f32`, `f16`, `bf16`, or its debug name).
pub fn dtype_name(kind: Kind) -> String {
    match kind {
        Kind::Float => "f32".into(),
        Kind::Half => "f16".into(),
        Kind::BFloat16 => "bf16".into(),
        Kind::Double => "f64".into(),
        k => format!("{k:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for k in [Kind::Float, Kind::Half, Kind::BFloat16] {
            assert_eq!(parse_dtype(&dtype_name(k)).unwrap(), k);
        }
        assert!(matches!(parse_dtype("int8"), Err(Error::InvalidDtype(_))));
    }
}
