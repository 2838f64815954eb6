//! Reading `config.json` files (diffusers and transformers write one next to each weight file).

use crate::{Error, Result};
use serde::de::DeserializeOwned;
use std::path::Path;

/// Largest JSON file read as a config (real ones are a few KiB; tokenizer.json some MiB).
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// Largest integer a model config may hold anywhere (widths, counts, vocabulary sizes): real
/// models stay below 10^6, and with every size under 2^24 no product of two of them overflows
/// the `i64` shape arithmetic of the model constructors.
pub const MAX_CONFIG_INT: u64 = 1 << 24;

/// Parses a JSON config file into `T`, with the path in any error. Only a regular file is read
/// (see [`crate::fsutil::open_regular`]).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = crate::fsutil::read_text(path, MAX_JSON_BYTES)?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Config { path: path.display().to_string(), message: e.to_string() })
}

/// [`read_json`] for a model's `config.json`: any integer above [`MAX_CONFIG_INT`] (or below its
/// negative) is refused naming its key, before a model is sized from it.
pub fn read_model_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let value: serde_json::Value = read_json(path)?;
    check_ints(&value, &mut String::new())
        .map_err(|message| Error::Config { path: path.display().to_string(), message })?;
    serde_json::from_value(value)
        .map_err(|e| Error::Config { path: path.display().to_string(), message: e.to_string() })
}

fn check_ints(v: &serde_json::Value, key: &mut String) -> std::result::Result<(), String> {
    use serde_json::Value;
    match v {
        Value::Number(n) => {
            let big = match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => u > MAX_CONFIG_INT,
                (None, Some(i)) => i.unsigned_abs() > MAX_CONFIG_INT,
                _ => false, // a float: the typed parse decides whether it may stand here
            };
            if big {
                return Err(format!(
                    "{key} = {n} is out of range (sizes and counts must be within +-{MAX_CONFIG_INT})"
                ));
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = key.len();
                key.push_str(&format!("[{i}]"));
                check_ints(item, key)?;
                key.truncate(len);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                let len = key.len();
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(k);
                check_ints(item, key)?;
                key.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Writes `value` as pretty JSON, atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Config { path: path.display().to_string(), message: e.to_string() })?;
    crate::fsutil::atomic_write(path, |tmp| {
        std::fs::write(tmp, &text).map_err(|e| Error::io(tmp, e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, serde::Serialize, Debug, PartialEq)]
    struct Cfg {
        hidden_size: i64,
    }

    #[test]
    fn reads_back_and_reports_bad_json() {
        let dir = std::env::temp_dir().join(format!("unclip-core-cfg-{}", std::process::id()));
        let path = dir.join("config.json");
        write_json(&path, &Cfg { hidden_size: 32 }).unwrap();
        assert_eq!(read_json::<Cfg>(&path).unwrap(), Cfg { hidden_size: 32 });
        std::fs::write(&path, "{\"hidden_size\": \"big\"}").unwrap();
        let err = read_json::<Cfg>(&path).unwrap_err();
        assert!(matches!(err, Error::Config { .. }) && err.to_string().contains("config.json"));
        std::fs::write(
            &path,
            "{\"hidden_size\": 32, \"text_config\": {\"widths\": [1, 1000000000000]}}",
        )
        .unwrap();
        read_json::<serde_json::Value>(&path).unwrap();
        let err = read_model_json::<serde_json::Value>(&path).unwrap_err().to_string();
        assert!(err.contains("text_config.widths[1] = 1000000000000"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
