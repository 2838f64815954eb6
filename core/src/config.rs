//! Reading `config.json` files (diffusers and transformers write one next to each weight file).

use crate::{Error, Result};
use serde::de::DeserializeOwned;
use std::path::Path;

/// Parses a JSON config file into `T`, with the path in any error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Config { path: path.display().to_string(), message: e.to_string() })
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
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
