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
    drop(crate::fsutil::open_regular(path)?);
    let st = mapped(path)?;
    let tensors = st.tensors()?;
    let mut out = HashMap::new();
    for (name, view) in tensors.iter() {
        let kind = kind_of(view.dtype()).ok_or_else(|| Error::BadCheckpoint {
            file: path.display().to_string(),
            message: format!("{name}: unsupported dtype {:?}", view.dtype()),
        })?;
        out.insert(
            name.clone(),
            Tensor::f_from_data_size(view.data(), &dims(view.shape())?, kind)?,
        );
    }
    Ok(out)
}

/// A memory-mapped safetensors file, parsed (header and data extents checked).
struct Mapped {
    map: memmap2::Mmap,
    file: String,
}

fn mapped(path: &Path) -> Result<Mapped> {
    let file = crate::fsutil::open_regular(path)?;
    // SAFETY: the map is read-only and lives only while the file is read; as with every loader
    // that maps checkpoints (the safetensors package, candle), the file must not be truncated
    // meanwhile.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let m = Mapped { map, file: path.display().to_string() };
    m.parse()?;
    Ok(m)
}

impl Mapped {
    fn parse(&self) -> Result<safetensors::SafeTensors<'_>> {
        safetensors::SafeTensors::deserialize(&self.map).map_err(|e| Error::BadCheckpoint {
            file: self.file.clone(),
            message: format!("not a safetensors file: {e}"),
        })
    }

    fn tensors(&self) -> Result<Vec<(String, safetensors::tensor::TensorView<'_>)>> {
        Ok(self.parse()?.tensors())
    }
}

/// A safetensors shape as libtorch's `i64` dims.
fn dims(shape: &[usize]) -> Result<Vec<i64>> {
    shape
        .iter()
        .map(|&d| i64::try_from(d))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::InvalidArgument(format!("tensor shape {shape:?} is too large")))
}

/// How many values a safetensors file holds (the sum over its tensors), read from its header
/// without loading anything.
pub fn stored_elements(path: &Path) -> Result<u128> {
    let m = mapped(path)?;
    let st = m.parse()?;
    let mut total: u128 = 0;
    for name in st.names() {
        let view = st.tensor(name).map_err(|e| Error::BadCheckpoint {
            file: m.file.clone(),
            message: format!("{name}: {e}"),
        })?;
        let n = view.shape().iter().try_fold(1u128, |n, &d| n.checked_mul(d as u128));
        total = n.and_then(|n| total.checked_add(n)).ok_or_else(|| Error::BadCheckpoint {
            file: m.file.clone(),
            message: format!("{name}: shape {:?} overflows", view.shape()),
        })?;
    }
    Ok(total)
}

/// Checks a model before it is allocated: the names and shapes its config implies (`layout`,
/// from [`crate::nn::measure`]) against the checkpoint's header, with the errors a load gives
/// (every missing tensor, the first misshapen one, unexpected ones), and its size in `kind`
/// against the memory `device` has free. A config asking for 10^12 channels is refused here,
/// naming the tensor, instead of aborting in an allocation.
pub fn check_layout(
    config: &Path,
    weights: &Path,
    layout: &crate::nn::Layout,
    unexpected: Unexpected,
    kind: Kind,
    device: tch::Device,
) -> Result<()> {
    let m = mapped(weights)?;
    let st = m.parse()?;
    let vars: HashMap<String, Vec<i64>> = layout.tensors.iter().cloned().collect();
    let shape_of = |n: &str| st.tensor(n).ok().and_then(|v| dims(v.shape()).ok());
    check_expected(&vars, st.names().into_iter(), shape_of, &m.file, unexpected)?;
    check_model_size(config, weights, layout.elements, kind, device)
}

/// Refuses a model before it is allocated when its `config` implies more parameter elements
/// (`implied`) than its checkpoint `weights` holds, or more bytes in `kind` than `device` has
/// free.
pub fn check_model_size(
    config: &Path,
    weights: &Path,
    implied: u128,
    kind: Kind,
    device: tch::Device,
) -> Result<()> {
    let held = stored_elements(weights)?;
    if implied > held {
        return Err(Error::Config {
            path: config.display().to_string(),
            message: format!(
                "describes a model of {implied} parameter values, but {} holds only {held}: a size in the config is wrong for this checkpoint",
                weights.display()
            ),
        });
    }
    let bytes = implied.saturating_mul(crate::memory::element_size(kind));
    crate::memory::ensure_fits(&format!("the model of {}", config.display()), bytes, device)
}

/// Whether a variable of `var` kind may be filled from a file tensor of `file` kind: floats from
/// any float dtype (f16 and bf16 files load into f32 models and back), never from integers or
/// booleans (a cast would silently turn them into weights).
fn dtype_compatible(var: Kind, file: Kind) -> bool {
    let float = |k: Kind| matches!(k, Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double);
    !float(var) || float(file)
}

fn check_dtype(source: &str, name: &str, var: Kind, file: Kind) -> Result<()> {
    if dtype_compatible(var, file) {
        Ok(())
    } else {
        Err(Error::BadCheckpoint {
            file: source.into(),
            message: format!(
                "tensor {name} has dtype {}, expected a floating-point dtype (f32, f16 or bf16) for a weight of the model's {}",
                crate::dtype::dtype_name(file),
                crate::dtype::dtype_name(var)
            ),
        })
    }
}

static CHECK_FINITE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether loads check every weight for NaN and infinity (on by default: on Karlo's folder it
/// is within the noise of the load, see `benches/README.md`). Off is for trusted files only.
pub fn set_check_finite(on: bool) {
    CHECK_FINITE.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Refuses a loaded variable holding NaN or infinity (a broken checkpoint, or f32 values too
/// large for the f16 they were loaded as): a model with one would draw black images silently.
fn check_finite(source: &str, name: &str, var: &Tensor) -> Result<()> {
    if !CHECK_FINITE.load(std::sync::atomic::Ordering::Relaxed) || !var.is_floating_point() {
        return Ok(());
    }
    // One reduction, no temporary: a NaN or an infinity anywhere makes the sum non-finite. Only
    // then (or when finite values overflow the f32 sum) is each element looked at.
    if f64::try_from(var.f_sum(Kind::Float)?)?.is_finite()
        || bool::try_from(var.f_isfinite()?.f_all()?)?
    {
        return Ok(());
    }
    let nan = i64::try_from(var.f_isnan()?.f_sum(Kind::Int64)?)?;
    let all = var.numel();
    Err(Error::BadCheckpoint {
        file: source.into(),
        message: format!(
            "tensor {name} holds non-finite values ({nan} NaN, {} infinite of {all}{})",
            i64::try_from(var.f_isinf()?.f_sum(Kind::Int64)?)?,
            if var.kind() == Kind::Half { "; f16 overflows above 65504" } else { "" }
        ),
    })
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
    let vars: HashMap<String, Vec<i64>> =
        vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
    check_expected(&vars, file_names, shape_of, source, unexpected)
}

/// [`check_names_and_shapes`] against the names and shapes a model has (or would have).
fn check_expected<'a>(
    vars: &HashMap<String, Vec<i64>>,
    file_names: impl Iterator<Item = &'a str>,
    shape_of: impl Fn(&str) -> Option<Vec<i64>>,
    source: &str,
    unexpected: Unexpected,
) -> Result<Vec<String>> {
    let mut names: Vec<String> = vars.keys().cloned().collect();
    names.sort();
    let missing: Vec<String> = names.iter().filter(|k| shape_of(k).is_none()).cloned().collect();
    if !missing.is_empty() {
        return Err(Error::MissingTensors { file: source.into(), names: missing });
    }
    for name in &names {
        let found = shape_of(name).unwrap_or_default();
        let expected = vars[name].clone();
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
            check_dtype(source, &name, var.kind(), tensors[&name].kind())?;
            var.f_copy_(&tensors[&name])?;
            check_finite(source, &name, &var)?;
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
/// every tensor, as reading the file first would take). Only a regular file is opened; an
/// integer or boolean tensor where a float weight is expected, and a weight with NaN or
/// infinite values, are refused naming the tensor.
pub fn load_file(vs: &VarStore, path: &Path, unexpected: Unexpected) -> Result<()> {
    let source = path.display().to_string();
    let m = mapped(path)?;
    let bad = |message: String| Error::BadCheckpoint { file: source.clone(), message };
    let st = m.parse()?;
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
            let mut var = vars[&name].shallow_clone();
            check_dtype(&source, &name, var.kind(), kind)?;
            let src = Tensor::f_from_data_size(view.data(), &dims(view.shape())?, kind)?;
            var.f_copy_(&src)?;
            check_finite(&source, &name, &var)?;
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

    #[test]
    fn refuses_wrong_dtype_class_and_non_finite_weights() {
        let path = tmpfile("dtype.safetensors");
        let write = |w: Tensor, b: Tensor| {
            Tensor::write_safetensors(&[("proj.weight", w), ("proj.bias", b)], &path).unwrap()
        };
        let load = |kind: Kind| {
            let mut vs = VarStore::new(Device::Cpu);
            model(&vs, 3);
            vs.set_kind(kind);
            load_file(&vs, &path, Unexpected::Error)
        };
        let f = |v: f64| Tensor::full([3, 4], v, (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        // int64 and bool weights: refused, naming the tensor and both dtypes.
        write(f(1.0).to_kind(Kind::Int64), b.copy());
        let err = load(Kind::Float).unwrap_err().to_string();
        assert!(
            err.contains("proj.weight") && err.contains("Int64") && err.contains("f32"),
            "{err}"
        );
        write(f(1.0), b.to_kind(Kind::Bool));
        let err = load(Kind::Float).unwrap_err().to_string();
        assert!(err.contains("proj.bias") && err.contains("Bool"), "{err}");
        // Half and bfloat16 files load.
        write(f(1.0).to_kind(Kind::BFloat16), b.to_kind(Kind::Half));
        load(Kind::Float).unwrap();
        // NaN and infinity are refused; so is an f32 value that overflows the f16 it loads into.
        write(f(f64::NAN), b.copy());
        let err = load(Kind::Float).unwrap_err().to_string();
        assert!(err.contains("proj.weight") && err.contains("12 NaN"), "{err}");
        write(f(1.0), b.copy().fill_(f64::INFINITY));
        assert!(load(Kind::Float).unwrap_err().to_string().contains("3 infinite"));
        write(f(1e6), b.copy());
        load(Kind::Float).unwrap();
        let err = load(Kind::Half).unwrap_err().to_string();
        assert!(err.contains("f16 overflows"), "{err}");
        // The reading path refuses the same.
        write(f(1.0).to_kind(Kind::Int64), b.copy());
        let vs = VarStore::new(Device::Cpu);
        model(&vs, 3);
        let err =
            load_tensors(&vs, &read_tensors(&path).unwrap(), "t", Unexpected::Error).unwrap_err();
        assert!(err.to_string().contains("proj.weight"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_config_larger_than_its_checkpoint_is_refused_before_allocating() {
        let vs = VarStore::new(Device::Cpu);
        model(&vs, 3);
        let path = tmpfile("size.safetensors");
        save_file(&vs, &path, None).unwrap();
        assert_eq!(stored_elements(&path).unwrap(), 15);
        let cfg = Path::new("some/config.json");
        check_model_size(cfg, &path, 15, Kind::Float, Device::Cpu).unwrap();
        let err = check_model_size(cfg, &path, 10u128.pow(12), Kind::Float, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("some/config.json") && err.contains("holds only 15"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
}
