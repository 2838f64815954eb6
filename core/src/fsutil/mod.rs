//! File-system safety: atomic file writes (training never leaves a half-written checkpoint
//! behind), cleanup of the temporary files a killed write leaves, completion markers of stage
//! folders ([`mark_complete`]), installing a folder without losing what the target held
//! ([`install_dir`]), reads that open only regular files (a FIFO in place of a config would block
//! forever; a folder, device or symlink loop is named for what it is), and scratch folders.

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

/// What is at `path`, in words, for error messages: "a folder", "a FIFO (named pipe)", "a
/// symlink loop", "nothing (no such file or folder)", ...
pub fn describe(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(md) => kind_of(&md).to_string(),
        Err(e) => match std::fs::symlink_metadata(path) {
            Ok(l) if l.file_type().is_symlink() => {
                if e.kind() == std::io::ErrorKind::NotFound {
                    "a dangling symbolic link (its target does not exist)".into()
                } else {
                    format!("a symbolic link that does not resolve ({e}): a symlink loop")
                }
            }
            _ if e.kind() == std::io::ErrorKind::NotFound => {
                "nothing (no such file or folder)".into()
            }
            _ => format!("unreadable ({e})"),
        },
    }
}

fn kind_of(md: &std::fs::Metadata) -> &'static str {
    let t = md.file_type();
    if t.is_file() {
        return "a regular file";
    }
    if t.is_dir() {
        return "a folder";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
    }
    "not a regular file"
}

fn not_regular(path: &Path, expected: &str) -> Error {
    Error::NotRegular {
        path: path.to_path_buf(),
        found: format!("expected {expected}, found {}", describe(path)),
    }
}

/// Opens `path` for reading if it is a regular file (symlinks followed). Anything else is refused
/// with what it is, before opening: reading a FIFO blocks until a writer comes, a device never
/// ends, a folder or symlink loop would otherwise read as "does not exist".
pub fn open_regular(path: &Path) -> Result<std::fs::File> {
    match std::fs::metadata(path) {
        Ok(md) if md.is_file() => {}
        // Plainly absent: the io error (NotFound) with the path, as every reader reports it.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !is_present(path) => {
            return Err(Error::io(path, e));
        }
        _ => return Err(not_regular(path, "a regular file")),
    }
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // Checked again on the open file: the path may have been swapped meanwhile.
    let md = f.metadata().map_err(|e| Error::io(path, e))?;
    if !md.is_file() {
        return Err(not_regular(path, "a regular file"));
    }
    Ok(f)
}

/// Reads a whole regular file ([`open_regular`]) of at most `max` bytes (configs and tokenizer
/// files are small; a multi-gigabyte "config" is a wrong path, not something to read).
pub fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = open_regular(path)?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > max {
        return Err(Error::NotRegular {
            path: path.to_path_buf(),
            found: format!("{len} bytes, more than the {max} a file of this kind may have"),
        });
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(max + 1).read_to_end(&mut buf).map_err(|e| Error::io(path, e))?;
    Ok(buf)
}

/// [`read_regular`] as UTF-8 text; a binary file is refused as such.
pub fn read_text(path: &Path, max: u64) -> Result<String> {
    String::from_utf8(read_regular(path, max)?).map_err(|e| Error::NotRegular {
        path: path.to_path_buf(),
        found: format!(
            "not UTF-8 text (a binary file?): invalid byte at {}",
            e.utf8_error().valid_up_to()
        ),
    })
}

/// Checks that `path` is a folder (symlinks followed), saying what it is otherwise: a regular
/// file, a symlink loop, nothing.
pub fn ensure_dir(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(md) if md.is_dir() => Ok(()),
        _ => Err(not_regular(path, "a folder")),
    }
}

/// Whether `path` exists in any form (a dangling or looping symlink counts: it is something the
/// user put there, to be reported rather than skipped as absent).
pub fn is_present(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn special_files_are_named_not_opened() {
        let d = scratch_dir("fsutil-special").unwrap();
        let fifo = d.join("config.json");
        let status = std::process::Command::new("mkfifo").arg(&fifo).status();
        if status.map(|s| s.success()).unwrap_or(false) {
            // Would block forever if opened.
            let err = read_text(&fifo, 1024).unwrap_err().to_string();
            assert!(err.contains("FIFO") && err.contains("config.json"), "{err}");
        }
        let err = read_text(&d, 1024).unwrap_err().to_string();
        assert!(err.contains("found a folder"), "{err}");
        let a = d.join("a");
        std::os::unix::fs::symlink(d.join("b"), &a).unwrap();
        std::os::unix::fs::symlink(&a, d.join("b")).unwrap();
        let err = open_regular(&a).unwrap_err().to_string();
        assert!(err.contains("symlink loop"), "{err}");
        assert!(is_present(&a));
        let err = ensure_dir(&a).unwrap_err().to_string();
        assert!(err.contains("expected a folder") && err.contains("symlink loop"), "{err}");
        let file = d.join("f");
        std::fs::write(&file, [0xffu8, 0xfe, 0]).unwrap();
        let err = ensure_dir(&file).unwrap_err().to_string();
        assert!(err.contains("found a regular file"), "{err}");
        let err = read_text(&file, 1024).unwrap_err().to_string();
        assert!(err.contains("binary"), "{err}");
        let err = read_text(&file, 2).unwrap_err().to_string();
        assert!(err.contains("3 bytes"), "{err}");
        let err = read_text(&d.join("absent"), 2).unwrap_err().to_string();
        assert!(err.contains("absent") && err.contains("No such file"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }

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
