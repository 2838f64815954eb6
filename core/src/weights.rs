//! Checked safetensors loading into a `VarStore`, and saving from one.
//!
//! tch's own `VarStore::load` stops at the first problem with a terse message; users of real
//! checkpoints need every missing tensor named and each shape mismatch shown as expected vs found.

use crate::{Error, Result};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use tch::{Kind, Tensor, nn::VarStore};

/// What to do with tensors in the file that the model does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unexpected {
    /// Refuse the file (the default: a wrong file should not half-load).
    #[default]
    Error,
    /// Ignore them, e.g. when loading the text tower out of a full `CLIPModel` file.
    Ignore,
}

/// Tensor names that old checkpoints carry as buffers and that no model here has as a parameter.
fn always_ignored(name: &str) -> bool {
    name.ends_with("position_ids")
}

/// Reads every tensor of a safetensors file (in the file's dtype, on CPU).
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    Ok(Tensor::read_safetensors(path)?.into_iter().collect())
}

/// Copies `tensors` into the variables of `vs`, converting dtype and device to the variables'.
/// Every missing tensor and every shape mismatch is reported in one error. `source` names the file
/// in messages.
pub fn load_tensors(
    vs: &VarStore,
    tensors: &HashMap<String, Tensor>,
    source: &str,
    unexpected: Unexpected,
) -> Result<()> {
    let vars = vs.variables();
    let mut missing: Vec<String> =
        vars.keys().filter(|k| !tensors.contains_key(*k)).cloned().collect();
    missing.sort();
    if !missing.is_empty() {
        return Err(Error::MissingTensors { file: source.into(), names: missing });
    }
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in &names {
        let (var, src) = (&vars[*name], &tensors[*name]);
        if var.size() != src.size() {
            return Err(Error::ShapeMismatch {
                file: source.into(),
                name: (*name).clone(),
                expected: var.size(),
                found: src.size(),
            });
        }
    }
    if unexpected == Unexpected::Error {
        let extra: BTreeSet<&String> =
            tensors.keys().filter(|k| !vars.contains_key(*k) && !always_ignored(k)).collect();
        if !extra.is_empty() {
            return Err(Error::UnexpectedTensors {
                file: source.into(),
                names: extra.into_iter().cloned().collect(),
            });
        }
    }
    tch::no_grad(|| -> Result<()> {
        for name in names {
            let mut var = vars[name].shallow_clone();
            var.f_copy_(&tensors[name])?;
        }
        Ok(())
    })
}

/// Loads a safetensors file into `vs` with [`load_tensors`].
pub fn load_file(vs: &VarStore, path: &Path, unexpected: Unexpected) -> Result<()> {
    let tensors = read_tensors(path)?;
    load_tensors(vs, &tensors, &path.display().to_string(), unexpected)
}

/// Saves all variables of `vs` as a safetensors file, optionally cast to `kind` (e.g. f16 to halve
/// the size), written atomically.
pub fn save_file(vs: &VarStore, path: &Path, kind: Option<Kind>) -> Result<()> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| {
            let t = t.detach().to_device(tch::Device::Cpu);
            let t = match kind {
                Some(k) => t.to_kind(k),
                None => t,
            };
            (n, t.contiguous())
        })
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    crate::fsutil::atomic_write(path, |tmp| Ok(Tensor::write_safetensors(&named, tmp)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, nn};

    fn model(vs: &VarStore, out: i64) {
        let p = vs.root();
        let _ = nn::linear(&p / "proj", 4, out, Default::default());
    }

    fn tmpfile(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("unclip-core-{}-{name}", std::process::id()))
    }

    #[test]
    fn round_trip_and_errors() {
        let vs = VarStore::new(Device::Cpu);
        model(&vs, 3);
        let path = tmpfile("w.safetensors");
        save_file(&vs, &path, Some(Kind::Half)).unwrap();

        // Loads back (f16 file into f32 variables).
        let vs2 = VarStore::new(Device::Cpu);
        model(&vs2, 3);
        load_file(&vs2, &path, Unexpected::Error).unwrap();
        let (a, b) = (&vs.variables()["proj.weight"], &vs2.variables()["proj.weight"]);
        assert_eq!(b.kind(), Kind::Float);
        assert!(a.allclose(b, 1e-3, 1e-3, false));

        // Shape mismatch names the tensor, expected vs found.
        let vs3 = VarStore::new(Device::Cpu);
        model(&vs3, 5);
        match load_file(&vs3, &path, Unexpected::Error) {
            Err(Error::ShapeMismatch { name, expected, found, .. }) => {
                assert_eq!(name, "proj.bias");
                assert_eq!((expected, found), (vec![5], vec![3]));
            }
            other => panic!("expected a shape mismatch, got {other:?}"),
        }

        // Missing tensors are all listed.
        let vs4 = VarStore::new(Device::Cpu);
        model(&vs4, 3);
        let _ = nn::linear(vs4.root() / "head", 3, 2, Default::default());
        match load_file(&vs4, &path, Unexpected::Error) {
            Err(Error::MissingTensors { names, .. }) => {
                assert_eq!(names, vec!["head.bias".to_string(), "head.weight".to_string()])
            }
            other => panic!("expected missing tensors, got {other:?}"),
        }

        // Unexpected tensors are refused unless asked to ignore them.
        let vs5 = VarStore::new(Device::Cpu);
        let _ = nn::linear(
            vs5.root() / "proj",
            4,
            3,
            nn::LinearConfig { bias: false, ..Default::default() },
        );
        assert!(matches!(
            load_file(&vs5, &path, Unexpected::Error),
            Err(Error::UnexpectedTensors { .. })
        ));
        load_file(&vs5, &path, Unexpected::Ignore).unwrap();

        assert!(matches!(
            load_file(&vs5, &tmpfile("absent"), Unexpected::Error),
            Err(Error::Io { .. })
        ));
        std::fs::remove_file(&path).unwrap();
    }
}
