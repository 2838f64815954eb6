//! File-system safety: atomic file writes (training never leaves a half-written checkpoint
//! behind), cleanup of the temporary files a killed write leaves, completion markers of stage
//! folders ([`mark_complete`]), installing a folder without losing what the target held
//! ([`install_dir`]), and scratch folders.

mod complete;
mod install;

pub use complete::{COMPLETE_MARKER, clear_complete, is_complete, mark_complete, read_complete};
pub use install::{
    INSTALL_MANIFEST, Installed, check_install_target, copy_tree, install_dir,
    recover_killed_install, resolve_path,
};

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// An empty folder `<system temp>/unclip-<tag>-<pid>` (emptied first if it exists): scratch
/// space for tests and probes that run in parallel processes without colliding.
pub fn scratch_dir(tag: &str) -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("unclip-{tag}-{}", std::process::id()));
    if d.exists() {
        std::fs::remove_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    }
    std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    Ok(d)
}

/// The temporary sibling [`atomic_write`] (and [`install_dir`]) writes `path` through:
/// `.<name>.tmp-<pid>`, a name [`clean_stale_temps`] recognises.
pub fn temp_sibling(path: &Path) -> Result<PathBuf> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{} has no file name", path.display())))?;
    Ok(dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id())))
}

/// The process id in a temporary name written by [`temp_sibling`] (`.<name>.tmp-<pid>`).
fn temp_pid(name: &str) -> Option<u32> {
    tagged_pid(name, ".tmp-")
}

/// The process id in a name `.<stem><tag><pid>` (`tag` such as `.tmp-` or `.old-`).
fn tagged_pid(name: &str, tag: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (stem, pid) = rest.rsplit_once(tag)?;
    if stem.is_empty() || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` may still be writing: this process, or (where `/proc` exists) any live
/// process. Elsewhere only this process counts as alive.
fn pid_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc_root = Path::new("/proc");
    proc_root.join("self").exists() && proc_root.join(pid.to_string()).exists()
}

/// Removes, under `dir` (recursively, without following symbolic links), the temporary files
/// and folders of atomic writes whose process is gone (`.<name>.tmp-<pid>`, see
/// [`temp_sibling`]): a write killed between creating its temporary file and renaming it leaves
/// one behind. Returns what was removed. Call it when a run opens its folder again.
pub fn clean_stale_temps(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if std::fs::symlink_metadata(dir).map(|m| m.is_dir()).unwrap_or(false) {
        clean_into(dir, &mut removed)?;
    }
    Ok(removed)
}

fn clean_into(dir: &Path, removed: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let ty = entry.file_type().map_err(|e| Error::io(&path, e))?;
        let stale = entry.file_name().to_str().and_then(temp_pid).is_some_and(|p| !pid_alive(p));
        if stale {
            let r = if ty.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            r.map_err(|e| Error::io(&path, e))?;
            removed.push(path);
        } else if ty.is_dir() {
            clean_into(&path, removed)?;
        }
    }
    Ok(())
}

/// Flushes a folder's entries (renames into it) to disk; a no-op where folders cannot be opened.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Writes a file through `write` into a temporary sibling, syncs it, then renames it over `path`.
/// A crash at any point leaves either the old file or the new one, never a torn one (and at most
/// a temporary `.<name>.tmp-<pid>` that [`clean_stale_temps`] removes).
pub fn atomic_write<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&Path) -> Result<()>,
{
    let tmp = temp_sibling(path)?;
    let dir = tmp.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let result = write(&tmp).and_then(|()| {
        let f = std::fs::File::open(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_dir_is_empty_each_time() {
        let d = scratch_dir("fsutil-scratch").unwrap();
        assert!(d.is_dir() && std::fs::read_dir(&d).unwrap().next().is_none());
        std::fs::write(d.join("left-over"), b"x").unwrap();
        assert_eq!(scratch_dir("fsutil-scratch").unwrap(), d);
        assert!(std::fs::read_dir(&d).unwrap().next().is_none(), "emptied");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn failed_write_keeps_old_file() {
        let dir = std::env::temp_dir().join(format!("unclip-core-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ckpt.bin");
        atomic_write(&path, |p| std::fs::write(p, b"old").map_err(|e| Error::io(p, e))).unwrap();
        let failed = atomic_write(&path, |p| {
            std::fs::write(p, b"half").map_err(|e| Error::io(p, e))?;
            Err(Error::InvalidArgument("interrupted".into()))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "temporary file left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn temp_names_parse() {
        assert_eq!(temp_pid(".weights.safetensors.tmp-123"), Some(123));
        assert_eq!(temp_pid(".a.tmp-7"), Some(7));
        for name in ["weights.safetensors", ".tmp-5", ".a.tmp-", ".a.tmp-12x", "a.tmp-5", ".a.tmp5"]
        {
            assert_eq!(temp_pid(name), None, "{name}");
        }
        let t = temp_sibling(Path::new("run/clip/weights.safetensors")).unwrap();
        let name = t.file_name().unwrap().to_str().unwrap();
        assert_eq!(temp_pid(name), Some(std::process::id()));
        assert_eq!(t.parent().unwrap(), Path::new("run/clip"));
    }

    /// A killed write's temporary file (here: of a process id that cannot be running) is removed
    /// on the next run of the folder, in subfolders too; live writers' files and everything else
    /// stay.
    #[test]
    fn stale_temporaries_are_cleaned() {
        let d = scratch_dir("fsutil-stale").unwrap();
        let sub = d.join("clip").join("step-000100");
        std::fs::create_dir_all(&sub).unwrap();
        // Above Linux's pid_max (2^22): no such process.
        let dead = 4_999_999u32;
        let stale = [
            d.join(format!(".recipe.json.tmp-{dead}")),
            sub.join(format!(".model.safetensors.tmp-{dead}")),
        ];
        for p in &stale {
            std::fs::write(p, b"half").unwrap();
        }
        let stale_dir = d.join(format!(".model.tmp-{dead}"));
        std::fs::create_dir_all(stale_dir.join("prior")).unwrap();
        let live = d.join(format!(".latest.json.tmp-{}", std::process::id()));
        let keep =
            [d.join("recipe.json"), sub.join("model.safetensors"), d.join(".hidden"), live.clone()];
        for p in &keep {
            std::fs::write(p, b"x").unwrap();
        }
        let mut removed = clean_stale_temps(&d).unwrap();
        removed.sort();
        let mut want = vec![stale[0].clone(), stale[1].clone(), stale_dir.clone()];
        want.sort();
        assert_eq!(removed, want);
        for p in &keep {
            assert!(p.exists(), "{} removed", p.display());
        }
        assert!(clean_stale_temps(&d).unwrap().is_empty());
        assert!(clean_stale_temps(&d.join("absent")).unwrap().is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
