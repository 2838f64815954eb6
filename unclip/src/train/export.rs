//! A run's finished stages as a diffusers-layout model folder that `Unclip::from_pretrained`
//! loads, also swapping stages into an existing model folder (a fine-tuned decoder into a Karlo
//! folder).
//!
//! Export never deletes what it did not write: the new folder is built in the run folder
//! (`.export.tmp-<pid>`), loaded back as a check, then installed by `fsutil::install_dir`
//! (copied beside the target, swapped in by renames). A target holding anything but a previous
//! install (unless `overwrite`), the run folder, a folder inside it and one containing it are
//! refused before any work, naming the paths.

use super::loop_::{DONE, MODEL};
use super::{Result, TrainError, write_json};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use unclip_core::fsutil;

/// Where and how to export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The model folder to write (replaced when it is empty or a previous install, i.e. its
    /// `.unclip-install.json` lists everything it holds; its components that the run did not
    /// train are kept).
    pub to: PathBuf,
    /// Components the run did not train come from this model folder when `to` does not exist.
    pub base: Option<PathBuf>,
    /// Replace a target that holds more than a previous install (see `fsutil::install_dir`);
    /// the run folder, and folders inside or around it, are refused even so.
    pub overwrite: bool,
    /// Store weights in f16.
    pub half: bool,
    /// `sampling_config.json`'s decoder guidance (kept from the base folder when `None`; the
    /// file's other settings are the base folder's either way).
    pub decoder_guidance_scale: Option<f64>,
    /// `sampling_config.json`'s decoder best-of-N (kept from the base folder when `None`).
    pub decoder_candidates: Option<usize>,
    /// Promote `super_res_2` to the only upsampler (see `ExportConfig::drop_first_upsampler`).
    pub drop_first_upsampler: bool,
}

/// The components each stage writes into `<run>/<stage>/model/`.
const STAGE_COMPONENTS: [(&str, &[&str]); 6] = [
    ("tokenizer", &["tokenizer"]),
    ("clip", &["text_encoder", "image_encoder", "feature_extractor"]),
    ("prior", &["prior", "prior_scheduler"]),
    ("decoder", &["decoder", "text_proj", "decoder_scheduler"]),
    ("upsampler", &["super_res_first", "super_res_last", "super_res_scheduler"]),
    ("upsampler2", &[crate::loading::SUPER_RES_2, crate::loading::SUPER_RES_2_SCHEDULER]),
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
        "super_res_first" | "super_res_last" | "super_res_2" => ("diffusers", "UNet2DModel"),
        _ => ("diffusers", "UnCLIPScheduler"),
    };
    json!([lib, class])
}

fn err(msg: String) -> TrainError {
    TrainError::Export(msg)
}

/// Copies a component folder, storing float tensors of `*.safetensors` files in f16 if `half`.
fn copy_component(src: &Path, dest: &Path, half: bool) -> Result<()> {
    fsutil::copy_tree(src, dest)?;
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

/// Exports the complete stages of the run folder `run` (see the module docs); returns the
/// target folder, resolved.
pub fn export(run: &Path, opts: &ExportOptions) -> Result<PathBuf> {
    let target = &opts.to;
    if !run.is_dir() {
        return Err(err(format!("no run folder at {}", run.display())));
    }
    // A bad target is refused before any work, and again by `install_dir` at the swap.
    fsutil::recover_killed_install(target)?;
    fsutil::check_install_target(target, &[run], opts.overwrite)?;
    let stages: Vec<(&str, &[&str])> = STAGE_COMPONENTS
        .iter()
        .copied()
        .filter(|(s, _)| fsutil::is_complete(&run.join(s)))
        .collect();
    if stages.is_empty() {
        return Err(err(format!("no complete stage in {} (no <stage>/{DONE})", run.display())));
    }
    let base = if target.join("model_index.json").is_file() {
        Some(target.clone())
    } else {
        opts.base.clone()
    };
    if let Some(b) = &base {
        if !b.join("model_index.json").is_file() {
            return Err(err(format!(
                "base {} is not a model folder (no model_index.json)",
                b.display()
            )));
        }
    }
    // Built inside the run folder (a killed export's copy is a stale temporary there), loaded
    // back as a check, then installed.
    fsutil::clean_stale_temps(run)?;
    let staging = fsutil::temp_sibling(&run.join("export"))?;
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| TrainError::io(&staging, e))?;
    }
    let result = build(run, &stages, base.as_deref(), &staging, opts)
        .and_then(|()| {
            crate::Unclip::from_pretrained(
                &staging,
                &crate::LoadOptions::new(tch::Device::Cpu, tch::Kind::Float),
            )
            .map_err(|e| err(format!("the exported folder does not load: {e}")))
        })
        .and_then(|_| Ok(fsutil::install_dir(&staging, target, &[run], opts.overwrite)?));
    let _ = std::fs::remove_dir_all(&staging);
    let installed = result?;
    if let Some(left) = &installed.leftover {
        println!("export: the previous folder could not be removed; it is at {}", left.display());
    }
    let trained: Vec<&str> = stages.iter().map(|(s, _)| *s).collect();
    println!("export: {} ({} from {})", target.display(), trained.join(", "), run.display());
    Ok(installed.path)
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
    let mut base_sampling = crate::SamplingDefaults::default();
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
                    fsutil::copy_tree(&src, &dest.join(k))?;
                    index.insert(k.clone(), v.clone());
                }
            }
        }
        if b.join("sampling_config.json").is_file() {
            // Read where it lives, so a bad file is reported under the user's path, not the
            // staging copy's; its settings are the ones a decoder guidance override keeps.
            base_sampling = crate::SamplingDefaults::read(b)?;
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
    if opts.drop_first_upsampler {
        if from_run.contains(&"super_res_first") {
            return Err(err(
                "export.drop_first_upsampler drops the first upsampler, which this run trained"
                    .into(),
            ));
        }
        promote_second_upsampler(dest, &mut index)?;
    }
    if let (Some(b), true) = (base, from_run.contains(&"decoder")) {
        check_decoder_size(&dest.join("decoder"), b, opts.drop_first_upsampler)?;
    }
    write_json(&dest.join("model_index.json"), &Value::Object(index))?;
    if opts.decoder_guidance_scale.is_some() || opts.decoder_candidates.is_some() {
        // The other settings stay the base folder's (read above), else Karlo's: a decoder
        // swapped into a folder must not reset the prior guidance that folder was tuned for.
        let mut sampling = base_sampling;
        if let Some(g) = opts.decoder_guidance_scale {
            sampling.decoder_guidance_scale = g;
        }
        if let Some(k) = opts.decoder_candidates {
            sampling.decoder_candidates = k;
        }
        sampling.write(dest)?;
    }
    Ok(())
}

/// `sample_size` of a component's `config.json` (`None` when the folder has no such component).
fn sample_size(component: &Path) -> Result<Option<Value>> {
    let f = component.join("config.json");
    if !f.is_file() {
        return Ok(None);
    }
    let v: Value = unclip_core::config::read_json(&f)?;
    Ok(v.get("sample_size").cloned())
}

/// A decoder swapped into a folder must draw what the folder's first upsampler takes: the old
/// decoder's size, or with `drop_first_upsampler` the dropped upsampler's output size (what the
/// promoted one was made to take). A mismatch would be resized silently at sampling time.
fn check_decoder_size(new_decoder: &Path, base: &Path, drop_first_upsampler: bool) -> Result<()> {
    let (component, what) = if drop_first_upsampler {
        ("super_res_first", "the output size of the first upsampler it drops")
    } else {
        ("decoder", "the size of the decoder it replaces")
    };
    let (Some(new), Some(want)) = (sample_size(new_decoder)?, sample_size(&base.join(component))?)
    else {
        return Ok(());
    };
    if new != want {
        // The run's decoder may be meant to replace the first upsampler.
        let hint = if !drop_first_upsampler
            && sample_size(&base.join("super_res_first"))?.as_ref() == Some(&new)
        {
            ", or set export.drop_first_upsampler = true to drop the first upsampler"
        } else {
            ""
        };
        return Err(err(format!(
            "the run's decoder draws {new} px but {} expects {want} px ({what}, in {}); train at \
             decoder.resolution = {want}{hint}",
            base.display(),
            base.join(component).join("config.json").display(),
        )));
    }
    Ok(())
}

/// Moves `super_res_2` (and its scheduler) of the folder being built into the first upsampler's
/// place, `super_res_first` and `super_res_last` (Karlo's layout: the same UNet for both).
fn promote_second_upsampler(dest: &Path, index: &mut serde_json::Map<String, Value>) -> Result<()> {
    use crate::loading::{SUPER_RES_2, SUPER_RES_2_SCHEDULER};
    for c in [SUPER_RES_2, SUPER_RES_2_SCHEDULER] {
        if !index.contains_key(c) || !dest.join(c).is_dir() {
            return Err(err(format!(
                "export.drop_first_upsampler: neither the run nor the base folder has {c}/"
            )));
        }
    }
    for c in ["super_res_first", "super_res_last", "super_res_scheduler"] {
        let p = dest.join(c);
        if p.exists() {
            std::fs::remove_dir_all(&p).map_err(|e| TrainError::io(&p, e))?;
        }
        index.insert(c.into(), class_of(c));
    }
    let rename = |from: &str, to: &str| -> Result<()> {
        std::fs::rename(dest.join(from), dest.join(to))
            .map_err(|e| TrainError::io(&dest.join(from), e))
    };
    rename(SUPER_RES_2, "super_res_first")?;
    rename(SUPER_RES_2_SCHEDULER, "super_res_scheduler")?;
    fsutil::copy_tree(&dest.join("super_res_first"), &dest.join("super_res_last"))?;
    index.remove(SUPER_RES_2);
    index.remove(SUPER_RES_2_SCHEDULER);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The run folder, a folder inside it and one containing it are refused before any work,
    /// naming both paths; nothing is deleted.
    #[test]
    fn targets_inside_or_containing_the_run_are_refused() {
        let d = fsutil::scratch_dir("export-targets").unwrap();
        let run = d.join("run");
        std::fs::create_dir_all(run.join("prior")).unwrap();
        std::fs::write(run.join("prior/weights.safetensors"), b"w").unwrap();
        for bad in [run.clone(), run.join("model"), d.clone()] {
            for overwrite in [false, true] {
                let opts = ExportOptions {
                    to: bad.clone(),
                    base: None,
                    overwrite,
                    half: false,
                    decoder_guidance_scale: None,
                    decoder_candidates: None,
                    drop_first_upsampler: false,
                };
                let e = export(&run, &opts).unwrap_err().to_string();
                assert!(e.contains(&bad.display().to_string()), "{e}");
                assert!(e.contains(&run.display().to_string()), "{e}");
            }
        }
        assert_eq!(std::fs::read(run.join("prior/weights.safetensors")).unwrap(), b"w");
        assert!(!run.join("model").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A base folder whose sampling_config.json is out of range is reported under the base's
    /// path (the staging copy is an internal folder the user never named).
    #[test]
    fn a_bad_base_sampling_config_names_the_base() {
        let d = fsutil::scratch_dir("export-bad-sampling").unwrap();
        let (run, base, dest) = (d.join("run"), d.join("base"), d.join("staging"));
        std::fs::create_dir_all(&run).unwrap();
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(base.join("model_index.json"), b"{}").unwrap();
        std::fs::write(base.join("sampling_config.json"), br#"{"decoder_guidance_scale": -1}"#)
            .unwrap();
        let opts = ExportOptions {
            to: d.join("out"),
            base: None,
            overwrite: false,
            half: false,
            decoder_guidance_scale: Some(3.0),
            decoder_candidates: None,
            drop_first_upsampler: false,
        };
        let e = build(&run, &[], Some(&base), &dest, &opts).unwrap_err().to_string();
        assert!(e.contains(&base.display().to_string()), "{e}");
        assert!(e.contains("decoder_guidance_scale"), "{e}");
        assert!(!e.contains(&dest.display().to_string()), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
