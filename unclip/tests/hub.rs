//! Model ids through a fabricated Hugging Face hub cache: the layout `huggingface_hub` writes
//! (blobs, `snapshots/<commit>/` of symlinks to them, `refs/main`), built here from the embedded
//! model, resolved and loaded offline; a path wins over an id; a missing id names both places.

use std::path::{Path, PathBuf};
use unclip::{Error, LoadOptions, Unclip, hub};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn shapes() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/shapes")
}

/// `<cache>/models--org--name` holding `model` as `huggingface_hub` stores it: each file a blob
/// named by a made-up hash, the snapshot a tree of relative symlinks to the blobs.
fn fabricate(cache: &Path, id: &str, model: &Path) {
    let repo = hub::repo_dir(cache, id);
    let blobs = repo.join("blobs");
    let snap = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    let mut n = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        std::fs::create_dir_all(snap.join(&rel)).unwrap();
        for entry in std::fs::read_dir(model.join(&rel)).unwrap() {
            let entry = entry.unwrap();
            let rel = rel.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                stack.push(rel);
                continue;
            }
            n += 1;
            let blob = blobs.join(format!("{n:040x}"));
            std::fs::copy(entry.path(), &blob).unwrap();
            let up = "../".repeat(rel.components().count() + 1);
            let target = format!("{up}blobs/{n:040x}");
            std::os::unix::fs::symlink(target, snap.join(&rel)).unwrap();
        }
    }
}

fn temp_cache(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("unclip-hub-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn an_id_resolves_from_a_fabricated_cache_and_loads() {
    let cache = temp_cache("ok");
    fabricate(&cache, "unclip-test/shapes", &shapes());
    let snap = hub::resolve_in(Path::new("unclip-test/shapes"), Some(&cache)).unwrap();
    assert_eq!(snap, hub::repo_dir(&cache, "unclip-test/shapes").join("snapshots").join(COMMIT));
    assert!(snap.join("decoder/diffusion_pytorch_model.safetensors").is_symlink());

    // from_pretrained finds it through HF_HUB_CACHE, and it is the same model as the folder.
    // SAFETY: this is the only test of this binary that touches the environment, and it reads
    // it on this thread only.
    unsafe { std::env::set_var("HF_HUB_CACHE", &cache) };
    let opts = LoadOptions::default();
    let by_id = Unclip::from_pretrained("unclip-test/shapes", &opts).unwrap();
    let by_path = Unclip::from_pretrained(shapes(), &opts).unwrap();
    assert_eq!(by_id.sampling, by_path.sampling);
    let a = by_id.text_encoder.encode(&["a red circle"]).unwrap().conditioning;
    let b = by_path.text_encoder.encode(&["a red circle"]).unwrap().conditioning;
    assert!(a.text_embeds.equal(&b.text_embeds), "the id loaded other weights");

    // An id whose refs/main names a commit with no snapshot is not found.
    std::fs::write(hub::repo_dir(&cache, "unclip-test/shapes").join("refs/main"), "feedbeef")
        .unwrap();
    assert!(hub::snapshot(&cache, "unclip-test/shapes").is_none());
    std::fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn an_existing_folder_wins_over_an_id() {
    // `src/shapes` (relative to this crate, the tests' working directory) is id-shaped and a
    // folder; a cache entry of that name must not be taken instead.
    let cache = temp_cache("path");
    fabricate(&cache, "src/shapes", &shapes());
    assert!(hub::is_repo_id("src/shapes") && Path::new("src/shapes").is_dir());
    assert_eq!(
        hub::resolve_in(Path::new("src/shapes"), Some(&cache)).unwrap(),
        Path::new("src/shapes")
    );
    std::fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn a_missing_id_names_both_places_looked_at() {
    let cache = temp_cache("missing");
    let err = hub::resolve_in(Path::new("nobody/no-such-model"), Some(&cache)).unwrap_err();
    let Error::ModelNotFound { id, folder, cache: looked, .. } = &err else {
        panic!("expected ModelNotFound, got {err}");
    };
    assert_eq!(id, "nobody/no-such-model");
    assert!(folder.ends_with("nobody/no-such-model") && folder.is_absolute());
    assert_eq!(looked.as_deref(), Some(cache.join("models--nobody--no-such-model").as_path()));
    let msg = err.to_string();
    assert!(msg.contains(&folder.display().to_string()), "{msg}");
    assert!(msg.contains(&cache.join("models--nobody--no-such-model").display().to_string()));
    if !cfg!(feature = "hub") {
        assert!(msg.contains("huggingface-cli download nobody/no-such-model"), "{msg}");
    }

    // A path that is not id-shaped goes to the loader, which says the folder does not exist.
    assert_eq!(
        hub::resolve_in(Path::new("./nowhere"), Some(&cache)).unwrap(),
        Path::new("./nowhere")
    );
    let err = Unclip::from_pretrained("./nowhere", &LoadOptions::default()).err().unwrap();
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
    std::fs::remove_dir_all(&cache).unwrap();
}
