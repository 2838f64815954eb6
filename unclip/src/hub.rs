//! Model ids: `Unclip::from_pretrained("kakaobrain/karlo-v1-alpha", ..)` finds the model in the
//! local Hugging Face hub cache, the layout `huggingface-cli download` and `huggingface_hub`
//! write (`<cache>/models--org--name/refs/main` holds a commit, `snapshots/<commit>/` the files),
//! with no network. With the `hub` cargo feature, a model missing there is downloaded into that
//! cache first (the `hf-hub` crate). An existing folder always wins over an id.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The hub cache folder, as `huggingface_hub` picks it: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`. `None` when none of these
/// variables (nor `HOME`) is set.
pub fn cache_dir() -> Option<PathBuf> {
    cache_dir_with(|k| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from))
}

/// [`cache_dir`] with the environment given as a lookup function.
pub fn cache_dir_with(var: impl Fn(&str) -> Option<PathBuf>) -> Option<PathBuf> {
    if let Some(dir) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return Some(dir);
    }
    let home = var("HF_HOME")
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/huggingface")))?;
    Some(home.join("hub"))
}

/// Whether `name` has the shape of a hub repo id, `org/name` (letters, digits, `-`, `_`, `.`;
/// no `..`), rather than of a path like `./x`, `/x` or `a/b/c`.
pub fn is_repo_id(name: &str) -> bool {
    let ok = |part: &str| {
        !part.is_empty()
            && !part.starts_with('.')
            && !part.contains("..")
            && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(name.split_once('/'), Some((org, repo)) if ok(org) && ok(repo))
}

/// The cache folder of repo `id`: `<cache>/models--org--name`.
pub fn repo_dir(cache: &Path, id: &str) -> PathBuf {
    cache.join(format!("models--{}", id.replace('/', "--")))
}

/// The snapshot of `id` in `cache` that `refs/main` names (or the only snapshot, for a download
/// made at a pinned commit, which writes no ref), when it is there.
pub fn snapshot(cache: &Path, id: &str) -> Option<PathBuf> {
    let repo = repo_dir(cache, id);
    let snapshots = repo.join("snapshots");
    if let Ok(commit) = std::fs::read_to_string(repo.join("refs/main")) {
        let commit = commit.trim();
        // A commit is a plain name: never a path out of the cache.
        if !commit.is_empty() && commit.chars().all(|c| c.is_ascii_alphanumeric()) {
            let dir = snapshots.join(commit);
            return dir.is_dir().then_some(dir);
        }
        return None;
    }
    let mut dirs = std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir());
    match (dirs.next(), dirs.next()) {
        (Some(only), None) => Some(only),
        _ => None,
    }
}

/// The folder `name` designates: `name` itself when it exists (or is not id-shaped: the loader
/// then reports the missing folder), else the cached snapshot of the repo id `name` in
/// [`cache_dir`] (downloaded there first with the `hub` feature), else [`Error::ModelNotFound`]
/// naming both places looked at.
pub fn resolve(name: &Path) -> Result<PathBuf> {
    resolve_in(name, cache_dir().as_deref())
}

/// [`resolve`] with the hub cache given (`None`: there is none, no `HOME`).
pub fn resolve_in(name: &Path, cache: Option<&Path>) -> Result<PathBuf> {
    if name.exists() {
        return Ok(name.to_path_buf());
    }
    let Some(id) = name.to_str().filter(|s| is_repo_id(s)) else {
        return Ok(name.to_path_buf());
    };
    let folder = std::env::current_dir().map_or(name.to_path_buf(), |cwd| cwd.join(name));
    let Some(cache) = cache else {
        let download = Some("no hub cache: set HF_HUB_CACHE or HF_HOME".to_string());
        return Err(Error::ModelNotFound { id: id.into(), folder, cache: None, download });
    };
    let cached = snapshot(cache, id);
    if let Some(dir) = &cached {
        if !cfg!(feature = "hub") || crate::loading::inspect(dir).is_ok() {
            return Ok(dir.clone());
        }
    }
    #[cfg(feature = "hub")]
    let download = match download::fetch(id, cache) {
        Ok(dir) => return Ok(dir),
        Err(why) => Some(why),
    };
    #[cfg(not(feature = "hub"))]
    let download = None;
    let cache = Some(repo_dir(cache, id));
    Err(Error::ModelNotFound { id: id.to_string(), folder, cache, download })
}

/// Downloads of missing model files through the `hf-hub` crate (feature `hub`), from
/// `HF_ENDPOINT` (default: the Hugging Face hub), with `HF_TOKEN` when set.
#[cfg(feature = "hub")]
mod download {
    use std::path::{Path, PathBuf};

    /// Files a component may have besides the ones the loader requires: read when present.
    const OPTIONAL: [&str; 4] = [
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
        "feature_extractor/preprocessor_config.json",
        crate::sampling::SAMPLING_CONFIG,
    ];

    /// Fetches `model_index.json` and every file the loader needs for the pipeline it names
    /// into `cache` (files already there are not fetched again); the snapshot folder, or why not.
    pub fn fetch(id: &str, cache: &Path) -> Result<PathBuf, String> {
        let cache_handle = hf_hub::Cache::new(cache.to_path_buf());
        let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache_handle);
        if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
            builder = builder.with_token(Some(token));
        }
        // A mirror, as huggingface_hub reads it.
        if let Some(endpoint) = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()) {
            builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
        }
        let api = builder.build().map_err(|e| e.to_string())?;
        let repo = api.model(id.to_string());
        let get = |file: &str| repo.get(file).map_err(|e| format!("{file}: {e}"));
        let index_path = get("model_index.json")?;
        let dir = index_path.parent().ok_or("model_index.json has no folder")?.to_path_buf();
        let index: serde_json::Value =
            unclip_core::config::read_json(&index_path).map_err(|e| e.to_string())?;
        let class = index.get("_class_name").and_then(|v| v.as_str()).unwrap_or("");
        // The tokenizer: vocab.json + merges.txt (CLIP's files), else tokenizer.json.
        if let Err(why) = get("tokenizer/vocab.json").and_then(|_| get("tokenizer/merges.txt")) {
            get("tokenizer/tokenizer.json").map_err(|e| format!("{why}; {e}"))?;
        }
        // What the loader checks, and the image encoder when the index lists it.
        let mut comps = crate::loading::listed_components(class, &index);
        if index.get("image_encoder").is_some() && !comps.contains(&"image_encoder") {
            comps.push("image_encoder");
        }
        let mut files: Vec<String> = Vec::new();
        for comp in comps {
            for f in crate::loading::required_files(comp) {
                files.push(format!("{comp}/{f}"));
            }
        }
        for f in &files {
            get(f)?;
        }
        for f in OPTIONAL {
            // Absent from many repos; a failure here is no failure of the model.
            let _ = repo.get(f);
        }
        Ok(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_paths_are_told_apart() {
        for id in ["kakaobrain/karlo-v1-alpha", "fusing/karlo-image-variations-diffusers", "a/b.c"]
        {
            assert!(is_repo_id(id), "{id}");
        }
        for path in ["karlo", "/abs/path", "./x/y", "../models/shapes", "a/b/c", "a/", "/b", "a/.."]
        {
            assert!(!is_repo_id(path), "{path}");
        }
    }

    #[test]
    fn cache_dir_follows_huggingface_hub() {
        fn env<'a>(pairs: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<PathBuf> + 'a {
            move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| PathBuf::from(v))
        }
        let all =
            [("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h"), ("XDG_CACHE_HOME", "/x"), ("HOME", "/u")];
        assert_eq!(
            cache_dir_with(env(&[("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h")])),
            Some("/c".into())
        );
        assert_eq!(cache_dir_with(env(&all[1..])), Some("/h/hub".into()));
        assert_eq!(cache_dir_with(env(&all[2..])), Some("/x/huggingface/hub".into()));
        assert_eq!(cache_dir_with(env(&all[3..])), Some("/u/.cache/huggingface/hub".into()));
        assert_eq!(cache_dir_with(env(&[])), None);
    }
}
