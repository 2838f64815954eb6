//! Atomic file writes (training never leaves a half-written checkpoint behind), and scratch
//! folders.

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

/// Writes a file through `write` into a temporary sibling, syncs it, then renames it over `path`.
/// A crash at any point leaves either the old file or the new one, never a torn one.
pub fn atomic_write<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&Path) -> Result<()>,
{
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{path:?} has no file name")))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
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
}
