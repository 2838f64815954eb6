//! A run's finished stages as a diffusers-layout model folder that `Unclip::from_pretrained`
//! loads, also swapping stages into an existing model folder (a fine-tuned decoder into a Karlo
//! folder).
//!
//! Export never deletes what it did not write: the new folder is built beside the target
//! (`.<name>.export-<pid>`), loaded back as a check, then swapped in by renames. A target that
//! holds anything but a model folder's entries, a target inside the run folder, and a target
//! containing it are refused, naming the paths.

use super::loop_::{DONE, MODEL};
use super::{Result, TrainError, write_json};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// Where and how to export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The model folder to write (replaced when it is a model folder already; its components that
    /// the run did not train are kept).
    pub to: PathBuf,
    /// Components the run did not train come from this model folder when `to` does not exist.
    pub base: Option<PathBuf>,
    /// Store weights in f16.
    pub half: bool,
    /// `sampling_config.json`'s decoder guidance (kept from the base folder when `None`).
    pub decoder_guidance_scale: Option<f64>,
}

/// Entries a model folder may hold (anything else in a target is the user's and refused).
const MODEL_ENTRIES: [&str; 16] = [
    "model_index.json",
    "sampling_config.json",
    "README.md",
    "tokenizer",
    "text_encoder",
    "image_encoder",
    "feature_extractor",
    "prior",
    "prior_scheduler",
    "text_proj",
    "decoder",
    "decoder_scheduler",
    "super_res_first",
    "super_res_last",
    "super_res_scheduler",
    "image_normalizer",
];

/// The components each stage writes into `<run>/<stage>/model/`.
const STAGE_COMPONENTS: [(&str, &[&str]); 5] = [
    ("tokenizer", &["tokenizer"]),
    ("clip", &["text_encoder", "image_encoder", "feature_extractor"]),
    ("prior", &["prior", "prior_scheduler"]),
    ("decoder", &["decoder", "text_proj", "decoder_scheduler"]),
    ("upsampler", &["super_res_first", "super_res_last", "super_res_scheduler"]),
];

fn class_of(component: &str) -> Value {
    let (lib, class) = match component {
        "tokenizer" => ("transformers", "CLIPTokenizer"),
        "text_encoder" => ("transformers", "CLIPTextModelWithProjection"),
        "image_encoder" => ("transformers", "CLIPVisionModelWithProjection"),
        "feature_extractor" => ("transformers", "CLIPImageProcessor"),
        "prior" => ("diffusers", "PriorTransformer"),
        "text_proj" => ("unclip", "UnCLIPTextProjModel"),
        "decoder" => ("diffusers", "UNet2DConditionModel"),
        "super_res_first" | "super_res_last" => ("diffusers", "UNet2DModel"),
        _ => ("diffusers", "UnCLIPScheduler"),
    };
    json!([lib, class])
}

fn err(msg: String) -> TrainError {
    TrainError::Export(msg)
}

/// An absolute, symlink-resolved path, also for a path that does not exist yet (its nearest
/// existing ancestor is resolved).
fn resolved(p: &Path) -> Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map_err(|e| TrainError::io(p, e))?.join(p)
    };
    let mut tail = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = cur.canonicalize() {
            let mut out = c;
            for t in tail.iter().rev() {
                out.push(t);
            }
            return Ok(out);
        }
        match (cur.file_name(), cur.parent()) {
            (Some(n), Some(parent)) => {
                tail.push(n.to_os_string());
                cur = parent;
            }
            _ => return Ok(abs),
        }
    }
}

/// Refuses a target inside the run folder or containing it (the lost-helper's `fsutil` may
/// grow a shared version of this check).
pub(crate) fn check_target_outside(run: &Path, target: &Path) -> Result<()> {
    let (r, t) = (resolved(run)?, resolved(target)?);
    if t.starts_with(&r) {
        return Err(err(format!(
            "the target {} lies inside the run folder {}: export to a folder outside it",
            target.display(),
            run.display()
        )));
    }
    if r.starts_with(&t) {
        return Err(err(format!(
            "the target {} contains the run folder {}: export to a folder outside it",
            target.display(),
            run.display()
        )));
    }
    Ok(())
}

/// Entries of an existing target that a model folder does not hold.
fn foreign_entries(target: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(target).map_err(|e| TrainError::io(target, e))? {
        let e = e.map_err(|e| TrainError::io(target, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !MODEL_ENTRIES.contains(&name.as_str()) {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Removes temporary files of interrupted atomic writes (`.<name>.tmp-<pid>`) under `dir`
/// (the lost-helper's `fsutil` may grow a shared version of this).
pub(crate) fn remove_temp_files(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            remove_temp_files(&e.path())?;
        } else if ft.is_file() && is_temp_name(&name) {
            std::fs::remove_file(e.path()).map_err(|err| TrainError::io(&e.path(), err))?;
        }
    }
    Ok(())
}

fn is_temp_name(name: &str) -> bool {
    name.starts_with('.')
        && name
            .rsplit_once(".tmp-")
            .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

fn copy_dir(src: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).map_err(|e| TrainError::io(dest, e))?;
    for e in std::fs::read_dir(src).map_err(|e| TrainError::io(src, e))? {
        let e = e.map_err(|e| TrainError::io(src, e))?;
        let to = dest.join(e.file_name());
        let ft = e.file_type().map_err(|err| TrainError::io(&e.path(), err))?;
        if ft.is_dir() {
            copy_dir(&e.path(), &to)?;
        } else if ft.is_file() {
            std::fs::copy(e.path(), &to).map_err(|err| TrainError::io(&e.path(), err))?;
        }
    }
    Ok(())
}

/// Copies a component folder, storing float tensors of `*.safetensors` files in f16 if `half`.
fn copy_component(src: &Path, dest: &Path, half: bool) -> Result<()> {
    copy_dir(src, dest)?;
    if !half {
        return Ok(());
    }
    for e in std::fs::read_dir(dest).map_err(|e| TrainError::io(dest, e))?.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let tensors = unclip_core::weights::read_tensors(&p)?;
            let mut named: Vec<(String, tch::Tensor)> = Vec::with_capacity(tensors.len());
            for (k, t) in tensors {
                let t = if t.is_floating_point() { t.f_to_kind(tch::Kind::Half)? } else { t };
                named.push((k, t));
            }
            named.sort_by(|a, b| a.0.cmp(&b.0));
            unclip_core::fsutil::atomic_write(&p, |tmp| {
                Ok(tch::Tensor::write_safetensors(&named, tmp)?)
            })?;
        }
    }
    Ok(())
}

/// Cleans up after an export killed midway, from the names only this module uses beside the
/// target: its staging folders (`.<name>.export-<pid>`) are removed; a previous model folder set
/// aside for the swap (`.<name>.replaced-<pid>`) is put back when the target is missing (killed
/// between the two renames), else removed (the swap had completed).
fn recover(parent: &Path, name: &str, target: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(parent) else { return Ok(()) };
    let (staging, replaced) = (format!(".{name}.export-"), format!(".{name}.replaced-"));
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let p = e.path();
        let numbered = |prefix: &str| {
            n.strip_prefix(prefix)
                .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        };
        if numbered(&staging) && p.is_dir() {
            std::fs::remove_dir_all(&p).map_err(|err| TrainError::io(&p, err))?;
        } else if numbered(&replaced) && p.is_dir() {
            if target.exists() {
                std::fs::remove_dir_all(&p).map_err(|err| TrainError::io(&p, err))?;
            } else {
                std::fs::rename(&p, target).map_err(|err| TrainError::io(&p, err))?;
                println!(
                    "export: restored {} (set aside by an interrupted export)",
                    target.display()
                );
            }
        }
    }
    Ok(())
}

/// Exports the complete stages of the run folder `run` (see the module docs); returns the
/// target folder.
pub fn export(run: &Path, opts: &ExportOptions) -> Result<PathBuf> {
    let target = &opts.to;
    if !run.is_dir() {
        return Err(err(format!("no run folder at {}", run.display())));
    }
    check_target_outside(run, target)?;
    let stages: Vec<(&str, &[&str])> = STAGE_COMPONENTS
        .iter()
        .copied()
        .filter(|(s, _)| run.join(s).join(DONE).is_file())
        .collect();
    if stages.is_empty() {
        return Err(err(format!("no complete stage in {} (no <stage>/{DONE})", run.display())));
    }
    let name = target
        .file_name()
        .ok_or_else(|| err(format!("{} has no folder name", target.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| TrainError::io(parent, e))?;
    recover(parent, &name, target)?;
    let exists = target.exists();
    if exists {
        if !target.is_dir() || !target.join("model_index.json").is_file() {
            return Err(err(format!(
                "{} exists and is not a model folder (no model_index.json); refusing to replace it",
                target.display()
            )));
        }
        let foreign = foreign_entries(target)?;
        if !foreign.is_empty() {
            let list: Vec<String> = foreign.iter().map(|p| p.display().to_string()).collect();
            return Err(err(format!(
                "{} holds entries that are not part of a model folder, refusing to replace it: {}",
                target.display(),
                list.join(", ")
            )));
        }
    }
    let base = if exists { Some(target.clone()) } else { opts.base.clone() };
    if let Some(b) = &base {
        if !b.join("model_index.json").is_file() {
            return Err(err(format!(
                "base {} is not a model folder (no model_index.json)",
                b.display()
            )));
        }
    }
    let pid = std::process::id();
    let staging = parent.join(format!(".{name}.export-{pid}"));
    let old = parent.join(format!(".{name}.replaced-{pid}"));
    let result = build(run, &stages, base.as_deref(), &staging, opts).and_then(|()| {
        crate::Unclip::from_pretrained(
            &staging,
            &crate::LoadOptions::new(tch::Device::Cpu, tch::Kind::Float),
        )
        .map_err(|e| err(format!("the exported folder does not load: {e}")))
        .map(|_| ())
    });
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    if exists {
        std::fs::rename(target, &old).map_err(|e| TrainError::io(target, e))?;
        if let Err(e) = std::fs::rename(&staging, target) {
            // Put the previous folder back.
            let _ = std::fs::rename(&old, target);
            return Err(TrainError::io(target, e));
        }
        std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
    } else {
        std::fs::rename(&staging, target).map_err(|e| TrainError::io(target, e))?;
    }
    let trained: Vec<&str> = stages.iter().map(|(s, _)| *s).collect();
    println!("export: {} ({} from {})", target.display(), trained.join(", "), run.display());
    Ok(target.clone())
}

fn build(
    run: &Path,
    stages: &[(&str, &[&str])],
    base: Option<&Path>,
    dest: &Path,
    opts: &ExportOptions,
) -> Result<()> {
    std::fs::create_dir_all(dest).map_err(|e| TrainError::io(dest, e))?;
    let mut index = serde_json::Map::new();
    let mut from_run: Vec<&str> = Vec::new();
    for (stage, comps) in stages {
        for c in comps.iter() {
            let src = run.join(stage).join(MODEL).join(c);
            if !src.is_dir() {
                return Err(err(format!(
                    "{} is missing though {stage} is complete",
                    src.display()
                )));
            }
            copy_component(&src, &dest.join(c), opts.half && *c != "tokenizer")?;
            index.insert(c.to_string(), class_of(c));
            from_run.push(c);
        }
    }
    let mut class = None;
    if let Some(b) = base {
        let old: Value = unclip_core::config::read_json(&b.join("model_index.json"))?;
        if let Some(obj) = old.as_object() {
            for (k, v) in obj {
                if k == "_class_name" {
                    class = v.as_str().map(str::to_string);
                    continue;
                }
                if k.starts_with('_') || from_run.contains(&k.as_str()) {
                    continue;
                }
                let src = b.join(k);
                if src.is_dir() {
                    copy_dir(&src, &dest.join(k))?;
                    index.insert(k.clone(), v.clone());
                }
            }
        }
        if b.join("sampling_config.json").is_file() {
            std::fs::copy(b.join("sampling_config.json"), dest.join("sampling_config.json"))
                .map_err(|e| TrainError::io(&b.join("sampling_config.json"), e))?;
        }
    }
    let class = if index.contains_key("prior") {
        "UnCLIPPipeline".to_string()
    } else {
        class.unwrap_or_else(|| "UnCLIPImageVariationPipeline".into())
    };
    index.insert("_class_name".into(), json!(class));
    index.insert("_diffusers_version".into(), json!("0.42.1"));
    write_json(&dest.join("model_index.json"), &Value::Object(index))?;
    if let Some(g) = opts.decoder_guidance_scale {
        let s =
            crate::SamplingDefaults { decoder_guidance_scale: g, ..crate::SamplingDefaults::KARLO };
        s.write(dest)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_swap_is_undone() {
        let d = unclip_core::fsutil::scratch_dir("export-recover").unwrap();
        let target = d.join("model");
        std::fs::create_dir_all(d.join(".model.replaced-42")).unwrap();
        std::fs::write(d.join(".model.replaced-42/model_index.json"), b"{}").unwrap();
        std::fs::create_dir_all(d.join(".model.export-42")).unwrap();
        std::fs::create_dir_all(d.join(".model.export-x")).unwrap();
        recover(&d, "model", &target).unwrap();
        assert!(target.join("model_index.json").is_file(), "the previous folder is back");
        assert!(!d.join(".model.export-42").exists() && !d.join(".model.replaced-42").exists());
        assert!(d.join(".model.export-x").exists(), "only this module's names are touched");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn temp_names_are_recognised() {
        assert!(is_temp_name(".vocab.json.tmp-123"));
        assert!(!is_temp_name("vocab.json"));
        assert!(!is_temp_name(".vocab.json.tmp-"));
        assert!(!is_temp_name(".hidden"));
    }

    #[test]
    fn targets_inside_or_containing_the_run_are_refused() {
        let d = unclip_core::fsutil::scratch_dir("export-targets").unwrap();
        let run = d.join("run");
        std::fs::create_dir_all(&run).unwrap();
        for bad in [run.clone(), run.join("model"), d.clone()] {
            let e = check_target_outside(&run, &bad).unwrap_err().to_string();
            assert!(e.contains(&bad.display().to_string()) && e.contains("run folder"), "{e}");
        }
        check_target_outside(&run, &d.join("model")).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }
}
