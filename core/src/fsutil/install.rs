//! Installing a folder (an exported model) at a path the user gives, without ever deleting what
//! it did not write.
//!
//! The copy is written beside the target (`.<name>.tmp-<pid>`), then swapped in by renames: the
//! previous target is renamed aside (`.<name>.old-<pid>`), the copy renamed onto the target, and
//! only then is the previous one removed. A crash leaves the previous target, or the new one, or
//! (between the two renames) both siblings, never a half-copied target. Every installed folder
//! carries a manifest of the files it was installed with (`.unclip-install.json`): a target
//! holding exactly such an install (or nothing) may be replaced; anything else there (the user's
//! own files, another model, a file added to an install) is refused unless `overwrite` is given.

use super::{pid_alive, sync_dir, tagged_pid, temp_sibling};
use crate::{Error, Result};
use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

/// The manifest [`install_dir`] writes into each folder it installs: the relative paths of
/// everything it wrote (folders end in `/`).
pub const INSTALL_MANIFEST: &str = ".unclip-install.json";

/// What [`install_dir`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The target, resolved (absolute, symbolic links followed).
    pub path: PathBuf,
    /// Whether something (a previous install, an empty folder, or with `overwrite` anything)
    /// was at the target and has been replaced.
    pub replaced: bool,
    /// The previous target, moved aside, when removing it after the swap failed: left for the
    /// user (the install itself succeeded).
    pub leftover: Option<PathBuf>,
}

fn err(path: &Path, message: impl Into<String>) -> Error {
    Error::Install { path: path.to_path_buf(), message: message.into() }
}

/// `p` absolute, with every existing part's symbolic links and `.`/`..` resolved and the
/// missing tail appended lexically: two paths name the same place exactly when they resolve
/// equal, even when the target does not exist yet.
pub fn resolve_path(p: &Path) -> Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        let cwd = std::env::current_dir().map_err(|e| Error::io(".", e))?;
        cwd.join(p)
    };
    let mut cur = PathBuf::new();
    let mut exists = true;
    for c in abs.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => cur.push(c.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                if exists {
                    cur = cur.join("..").canonicalize().map_err(|e| Error::io(&cur, e))?;
                } else {
                    cur.pop();
                }
            }
            Component::Normal(name) => {
                let next = cur.join(name);
                if exists && std::fs::symlink_metadata(&next).is_ok() {
                    cur = next.canonicalize().map_err(|e| Error::io(&next, e))?;
                } else {
                    exists = false;
                    cur = next;
                }
            }
        }
    }
    Ok(cur)
}

/// Every entry under `dir` as a relative path with `/` separators (folders end in `/`).
fn entries(dir: &Path) -> Result<BTreeSet<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) -> Result<()> {
        for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let e = e.map_err(|e| Error::io(dir, e))?;
            let path = e.path();
            let ty = e.file_type().map_err(|e| Error::io(&path, e))?;
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let rel: Vec<String> =
                rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            let rel = rel.join("/");
            if ty.is_dir() {
                out.insert(format!("{rel}/"));
                walk(root, &path, out)?;
            } else {
                out.insert(rel);
            }
        }
        Ok(())
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

/// What `dir` holds beyond what its install manifest lists (everything, without a manifest).
fn foreign_entries(dir: &Path) -> Result<Vec<String>> {
    let mut found = entries(dir)?;
    found.remove(INSTALL_MANIFEST);
    let listed: BTreeSet<String> = std::fs::read_to_string(dir.join(INSTALL_MANIFEST))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| {
            v.get("entries")?
                .as_array()?
                .iter()
                .map(|e| e.as_str().map(str::to_string))
                .collect::<Option<BTreeSet<String>>>()
        })
        .unwrap_or_default();
    Ok(found.difference(&listed).cloned().collect())
}

/// Copies the folder `src` to `dest` (which must not exist): folders and regular files only
/// (a link or special file is an error naming it), each file synced.
pub fn copy_tree(src: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir(dest).map_err(|e| Error::io(dest, e))?;
    for e in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let e = e.map_err(|e| Error::io(src, e))?;
        let (from, to) = (e.path(), dest.join(e.file_name()));
        let ty = e.file_type().map_err(|e| Error::io(&from, e))?;
        if ty.is_dir() {
            copy_tree(&from, &to)?;
        } else if ty.is_file() {
            std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
            let f = std::fs::File::open(&to).map_err(|e| Error::io(&to, e))?;
            f.sync_all().map_err(|e| Error::io(&to, e))?;
        } else {
            return Err(err(
                &from,
                "not a regular file or folder (a link or special file): refusing to copy it",
            ));
        }
    }
    sync_dir(dest);
    Ok(())
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn shown(given: &Path, resolved: &Path) -> String {
    if given == resolved {
        given.display().to_string()
    } else {
        format!("{} (= {})", given.display(), resolved.display())
    }
}

/// Refuses `target` (resolved from `dest`) when it is, lies inside, or contains `guard`.
fn keep_clear(dest: &Path, target: &Path, what: &str, guard: &Path) -> Result<()> {
    let r = resolve_path(guard)?;
    let relation = if r == target {
        "is"
    } else if target.starts_with(&r) {
        "is inside"
    } else if r.starts_with(target) {
        "contains"
    } else {
        return Ok(());
    };
    Err(err(
        dest,
        format!(
            "the target {} {relation} {what} {}: refusing to install there (nothing was changed); \
             choose a folder outside it",
            shown(dest, target),
            shown(guard, &r)
        ),
    ))
}

/// The checks [`install_dir`] makes on its target before writing anything, for a caller that
/// wants to refuse a bad target before long work (an export): `dest` is, lies inside or contains
/// none of `keep_clear_of`, and holds nothing but a previous install (or nothing) unless
/// `overwrite`. Returns the resolved target ([`resolve_path`]).
pub fn check_install_target(
    dest: &Path,
    keep_clear_of: &[&Path],
    overwrite: bool,
) -> Result<PathBuf> {
    let target = resolve_path(dest)?;
    if target.parent().is_none() || target.file_name().is_none() {
        return Err(err(dest, "cannot install onto a file-system root"));
    }
    for guard in keep_clear_of {
        keep_clear(dest, &target, "the protected folder", guard)?;
    }
    let Ok(m) = std::fs::symlink_metadata(&target) else {
        return Ok(target);
    };
    if overwrite {
        return Ok(target);
    }
    if !m.is_dir() {
        return Err(err(
            dest,
            format!(
                "{} exists and is not a folder: refusing to replace it (nothing was changed; pass \
                 the overwrite flag to replace it)",
                shown(dest, &target)
            ),
        ));
    }
    let foreign = foreign_entries(&target)?;
    if !foreign.is_empty() {
        let n = foreign.len();
        let mut list: Vec<String> = foreign.into_iter().take(10).collect();
        if n > 10 {
            list.push(format!("... and {} more", n - 10));
        }
        return Err(err(
            dest,
            format!(
                "{} holds files that are not a previous install of a model (no {} lists them): \
                 {}; refusing to replace it (nothing was changed). Choose another target, or pass \
                 the overwrite flag to replace it",
                shown(dest, &target),
                INSTALL_MANIFEST,
                list.join(", ")
            ),
        ));
    }
    Ok(target)
}

/// Cleans up after an install of `dest` killed midway (by another process, now gone), from the
/// names only [`install_dir`] uses beside the target: its copies (`.<name>.tmp-<pid>`) are
/// removed; a previous target set aside for the swap (`.<name>.old-<pid>`) is put back when the
/// target is missing (killed between the two renames), else removed (the swap had completed).
/// Returns the paths restored or removed.
pub fn recover_killed_install(dest: &Path) -> Result<Vec<PathBuf>> {
    let target = resolve_path(dest)?;
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return Ok(Vec::new());
    };
    let Ok(list) = std::fs::read_dir(parent) else { return Ok(Vec::new()) };
    let name = name.to_string_lossy();
    let (copy, aside) = (format!(".{name}.tmp-"), format!(".{name}.old-"));
    let mine = std::process::id();
    let mut done = Vec::new();
    for e in list {
        let e = e.map_err(|e| Error::io(parent, e))?;
        let file_name = e.file_name();
        let Some(n) = file_name.to_str() else { continue };
        let path = e.path();
        let dead = |tag: &str| tagged_pid(n, tag).is_some_and(|p| p != mine && !pid_alive(p));
        if n.starts_with(&copy) && dead(".tmp-") {
            remove_any(&path).map_err(|x| Error::io(&path, x))?;
        } else if n.starts_with(&aside) && dead(".old-") {
            if std::fs::symlink_metadata(&target).is_err() {
                std::fs::rename(&path, &target).map_err(|x| Error::io(&path, x))?;
            } else {
                remove_any(&path).map_err(|x| Error::io(&path, x))?;
            }
        } else {
            continue;
        }
        done.push(path);
    }
    Ok(done)
}

/// Installs a copy of the folder `src` at `dest`, replacing what was there only when nothing is
/// lost by it:
///
/// - `dest` may be neither inside nor contain `src` or any folder of `keep_clear_of` (e.g. the
///   run folder the model was exported from): such a target is always refused;
/// - an existing `dest` is replaced when it is empty or holds exactly a previous install (the
///   files its `.unclip-install.json` lists); anything else (the user's files, a file that is
///   not a folder, a folder with files added) is refused, listing what it holds, unless
///   `overwrite` is true;
/// - the copy (folders and regular files only) is written beside `dest` and swapped in by
///   renames; the previous target is removed only after the swap.
///
/// Errors name every path involved. What an earlier killed install of the same target left
/// beside it is cleaned up first ([`recover_killed_install`]).
pub fn install_dir(
    src: &Path,
    dest: &Path,
    keep_clear_of: &[&Path],
    overwrite: bool,
) -> Result<Installed> {
    let src_r = resolve_path(src)?;
    if !std::fs::metadata(&src_r).map(|m| m.is_dir()).unwrap_or(false) {
        return Err(err(src, "the folder to install does not exist or is not a folder"));
    }
    recover_killed_install(dest)?;
    let target = check_install_target(dest, keep_clear_of, overwrite)?;
    keep_clear(dest, &target, "the folder being installed", src)?;
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(err(dest, "cannot install onto a file-system root"));
    };
    let existing = std::fs::symlink_metadata(&target).ok();
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let staging = temp_sibling(&target)?;
    remove_any(&staging).map_err(|e| Error::io(&staging, e))?;
    let written = copy_tree(&src_r, &staging).and_then(|()| {
        let mut listed = entries(&staging)?;
        listed.remove(INSTALL_MANIFEST);
        let manifest = serde_json::json!({
            // No source path: it is a temporary folder on the machine that installed, and the
            // manifest is committed with model folders.
            "installed_by": "unclip-rs fsutil::install_dir",
            "entries": listed,
        });
        crate::config::write_json(&staging.join(INSTALL_MANIFEST), &manifest)
    });
    if let Err(e) = written {
        let _ = remove_any(&staging);
        return Err(e);
    }
    let aside = parent.join(format!(".{}.old-{}", name.to_string_lossy(), std::process::id()));
    if existing.is_some() {
        remove_any(&aside).map_err(|e| Error::io(&aside, e))?;
        if let Err(e) = std::fs::rename(&target, &aside) {
            let _ = remove_any(&staging);
            return Err(err(
                dest,
                format!(
                    "moving the previous {} aside to {} failed ({e}); nothing was changed",
                    target.display(),
                    aside.display()
                ),
            ));
        }
    }
    if let Err(e) = std::fs::rename(&staging, &target) {
        let restored = existing.is_none() || std::fs::rename(&aside, &target).is_ok();
        let _ = remove_any(&staging);
        let state = if restored {
            "the previous content is back in place".to_string()
        } else {
            format!("the previous content is at {}", aside.display())
        };
        return Err(err(
            dest,
            format!(
                "renaming {} onto {} failed ({e}); {state}",
                staging.display(),
                target.display()
            ),
        ));
    }
    sync_dir(parent);
    let leftover = match existing {
        Some(_) => remove_any(&aside).err().map(|_| aside),
        None => None,
    };
    Ok(Installed { path: target, replaced: existing.is_some(), leftover })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsutil::scratch_dir;

    fn model(dir: &Path, tag: &str) {
        std::fs::create_dir_all(dir.join("prior")).unwrap();
        std::fs::write(dir.join("model_index.json"), tag).unwrap();
        std::fs::write(dir.join("prior").join("weights.safetensors"), tag).unwrap();
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap()
    }

    #[test]
    fn resolves_missing_tails_and_dots() {
        let d = scratch_dir("fsutil-resolve").unwrap();
        let d = d.canonicalize().unwrap();
        std::fs::create_dir_all(d.join("run")).unwrap();
        assert_eq!(resolve_path(&d.join("run/./x/../y")).unwrap(), d.join("run/y"));
        assert_eq!(resolve_path(&d.join("run/model/..")).unwrap(), d.join("run"));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(d.join("run"), d.join("link")).unwrap();
            assert_eq!(resolve_path(&d.join("link/model")).unwrap(), d.join("run/model"));
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn installs_replaces_its_own_and_refuses_the_rest() {
        let d = scratch_dir("fsutil-install").unwrap();
        let run = d.join("run");
        let src = run.join("model");
        model(&src, "v1");
        let dest = d.join("models").join("shapes");

        // Fresh target; the parent is created.
        let got = install_dir(&src, &dest, &[&run], false).unwrap();
        assert!(!got.replaced && got.leftover.is_none());
        assert_eq!(read(&dest.join("prior/weights.safetensors")), "v1");
        assert!(dest.join(INSTALL_MANIFEST).is_file());
        // A previous install is replaced, and nothing is left beside it.
        model(&src, "v2");
        assert!(install_dir(&src, &dest, &[&run], false).unwrap().replaced);
        assert_eq!(read(&dest.join("model_index.json")), "v2");
        let siblings: Vec<_> = std::fs::read_dir(d.join("models")).unwrap().collect();
        assert_eq!(siblings.len(), 1);

        // A file added to the install is the user's: refused, kept, named.
        std::fs::write(dest.join("prior").join("notes.txt"), "mine").unwrap();
        let e = install_dir(&src, &dest, &[&run], false).unwrap_err().to_string();
        assert!(e.contains("prior/notes.txt") && e.contains(&dest.display().to_string()), "{e}");
        assert_eq!(read(&dest.join("prior/notes.txt")), "mine");
        // ... unless overwrite is asked for.
        install_dir(&src, &dest, &[&run], true).unwrap();
        assert!(!dest.join("prior/notes.txt").exists());

        // A folder of the user's files: refused, untouched.
        let user = d.join("photos");
        std::fs::create_dir_all(user.join("2024")).unwrap();
        std::fs::write(user.join("2024").join("cat.png"), "cat").unwrap();
        let e = install_dir(&src, &user, &[&run], false).unwrap_err().to_string();
        assert!(e.contains("2024/cat.png") && e.contains("photos"), "{e}");
        assert_eq!(read(&user.join("2024/cat.png")), "cat");
        // A file at the target: refused.
        let file = d.join("file");
        std::fs::write(&file, "data").unwrap();
        assert!(install_dir(&src, &file, &[&run], false).is_err());
        assert_eq!(read(&file), "data");
        // An empty folder is replaced.
        let empty = d.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        assert!(install_dir(&src, &empty, &[&run], false).unwrap().replaced);

        // The run folder, a folder inside it, a folder containing it: refused even with
        // overwrite, nothing deleted.
        std::fs::write(run.join("recipe.json"), "r").unwrap();
        for (target, word) in [
            (run.clone(), "is the protected folder"),
            (run.join("sub"), "is inside"),
            (src.clone(), "is inside"),
            (d.clone(), "contains"),
            (src.join("prior"), "is inside"),
        ] {
            let e = install_dir(&src, &target, &[&run], true).unwrap_err().to_string();
            assert!(e.contains(word) && e.contains(&target.display().to_string()), "{e}");
            assert!(e.contains(&run.display().to_string()), "{e}");
        }
        // Without a protected folder, the source itself (or a folder in or around it) is still
        // refused.
        for target in [src.clone(), src.join("prior"), run.clone()] {
            let e = install_dir(&src, &target, &[], true).unwrap_err().to_string();
            assert!(e.contains("the folder being installed"), "{e}");
        }
        assert_eq!(read(&run.join("recipe.json")), "r");
        assert_eq!(read(&src.join("model_index.json")), "v2");
        assert!(!run.join("sub").exists());
        // A missing source is named.
        let e = install_dir(&d.join("nothing"), &d.join("x"), &[], false).unwrap_err();
        assert!(e.to_string().contains("nothing"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A copy left by a killed install (its process gone) is removed by the next install.
    #[test]
    fn stale_staging_is_removed() {
        let d = scratch_dir("fsutil-install-stale").unwrap();
        let src = d.join("src");
        model(&src, "v1");
        let stale = d.join(".shapes.tmp-4999999");
        model(&stale, "half");
        let other = d.join(".other.tmp-4999999");
        std::fs::create_dir_all(&other).unwrap();
        install_dir(&src, &d.join("shapes"), &[], false).unwrap();
        assert!(!stale.exists());
        assert!(other.exists(), "another target's copy is not this install's business");
        // Killed between the two renames: the previous install, set aside, is put back.
        let target = d.join("shapes");
        std::fs::rename(&target, d.join(".shapes.old-4999999")).unwrap();
        let done = recover_killed_install(&target).unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(read(&target.join("model_index.json")), "v1");
        // Killed after the swap, before removing the previous one: it is removed.
        model(&d.join(".shapes.old-4999999"), "v0");
        install_dir(&src, &target, &[], false).unwrap();
        assert!(!d.join(".shapes.old-4999999").exists());
        assert_eq!(read(&target.join("model_index.json")), "v1");
        // A live process's (this one's) names are left alone.
        let live = d.join(format!(".shapes.old-{}", std::process::id()));
        std::fs::create_dir_all(&live).unwrap();
        assert!(recover_killed_install(&target).unwrap().is_empty() && live.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
