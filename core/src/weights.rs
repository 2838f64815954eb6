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

/// Checks a file's tensor names and shapes against the variables of `vs` before anything is
/// copied: every missing tensor, the first shape mismatch (expected vs found) and, unless
/// ignored, every unexpected tensor are reported. Returns the variable names, sorted.
fn check_names_and_shapes<'a>(
    vs: &VarStore,
    file_names: impl Iterator<Item = &'a str>,
    shape_of: impl Fn(&str) -> Option<Vec<i64>>,
    source: &str,
    unexpected: Unexpected,
) -> Result<Vec<String>> {
    let vars = vs.variables();
    let mut names: Vec<String> = vars.keys().cloned().collect();
    names.sort();
    let missing: Vec<String> = names.iter().filter(|k| shape_of(k).is_none()).cloned().collect();
    if !missing.is_empty() {
        return Err(Error::MissingTensors { file: source.into(), names: missing });
    }
    for name in &names {
        let found = shape_of(name).unwrap_or_default();
        let expected = vars[name].size();
        if expected != found {
            return Err(Error::ShapeMismatch {
                file: source.into(),
                name: name.clone(),
                expected,
                found,
            });
        }
    }
    if unexpected == Unexpected::Error {
        let extra: BTreeSet<String> = file_names
            .filter(|k| !vars.contains_key(*k) && !always_ignored(k))
            .map(str::to_string)
            .collect();
        if !extra.is_empty() {
            return Err(Error::UnexpectedTensors {
                file: source.into(),
                names: extra.into_iter().collect(),
            });
        }
    }
    Ok(names)
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
    let names = check_names_and_shapes(
        vs,
        tensors.keys().map(String::as_str),
        |n| tensors.get(n).map(Tensor::size),
        source,
        unexpected,
    )?;
    let vars = vs.variables();
    tch::no_grad(|| -> Result<()> {
        for name in names {
            let mut var = vars[&name].shallow_clone();
            var.f_copy_(&tensors[&name])?;
        }
        Ok(())
    })
}

/// The libtorch kind of a safetensors dtype, for the dtypes checkpoints hold.
fn kind_of(dtype: safetensors::Dtype) -> Option<Kind> {
    use safetensors::Dtype as D;
    Some(match dtype {
        D::F16 => Kind::Half,
        D::BF16 => Kind::BFloat16,
        D::F32 => Kind::Float,
        D::F64 => Kind::Double,
        D::I64 => Kind::Int64,
        D::I32 => Kind::Int,
        D::I16 => Kind::Int16,
        D::I8 => Kind::Int8,
        D::U8 => Kind::Uint8,
        D::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Loads a safetensors file into `vs` with the checks of [`load_tensors`], streaming: the file is
/// memory-mapped and each tensor is converted and copied into its variable on its own, so the
/// peak memory is the model plus one tensor (not the model plus the whole file plus a copy of
/// every tensor, as reading the file first would take).
pub fn load_file(vs: &VarStore, path: &Path, unexpected: Unexpected) -> Result<()> {
    let source = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and dropped before returning; as with every loader that maps
    // checkpoints (the safetensors package, candle), the file must not be truncated meanwhile.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let bad = |message: String| Error::BadCheckpoint { file: source.clone(), message };
    let st = safetensors::SafeTensors::deserialize(&map)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let shape_of = |n: &str| {
        st.tensor(n).ok().map(|v| v.shape().iter().map(|&d| d as i64).collect::<Vec<i64>>())
    };
    let file_names = st.names();
    let names =
        check_names_and_shapes(vs, file_names.iter().copied(), shape_of, &source, unexpected)?;
    let vars = vs.variables();
    tch::no_grad(|| -> Result<()> {
        for name in names {
            let view = st.tensor(&name).map_err(|e| bad(format!("{name}: {e}")))?;
            let kind = kind_of(view.dtype())
                .ok_or_else(|| bad(format!("{name}: unsupported dtype {:?}", view.dtype())))?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let src = Tensor::f_from_data_size(view.data(), &shape, kind)?;
            let mut var = vars[&name].shallow_clone();
            var.f_copy_(&src)?;
        }
        Ok(())
    })
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

    #[test]
    fn streamed_load_equals_read_then_copy_and_refuses_garbage() {
        let vs = VarStore::new(Device::Cpu);
        model(&vs, 3);
        let path = tmpfile("s.safetensors");
        for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
            save_file(&vs, &path, Some(kind)).unwrap();
            let (a, b) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
            model(&a, 3);
            model(&b, 3);
            load_file(&a, &path, Unexpected::Error).unwrap();
            let tensors = read_tensors(&path).unwrap();
            load_tensors(&b, &tensors, "s", Unexpected::Error).unwrap();
            for (name, t) in a.variables() {
                assert!(t.equal(&b.variables()[&name]), "{name} in {kind:?}");
            }
        }
        std::fs::write(&path, b"not a safetensors file").unwrap();
        let err = load_file(&vs, &path, Unexpected::Error).unwrap_err();
        assert!(matches!(err, Error::BadCheckpoint { .. }), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
}
