//! Completion markers of stage folders. A stage writes several files; judging it complete by one
//! of them (say the first) wedges a run killed before the others. The marker is written last,
//! atomically, after every file of the stage: a folder without it is redone.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The marker file a complete stage folder holds.
pub const COMPLETE_MARKER: &str = "complete.json";

fn marker(dir: &Path) -> PathBuf {
    dir.join(COMPLETE_MARKER)
}

/// Whether `dir` holds a completion marker (see [`mark_complete`]).
pub fn is_complete(dir: &Path) -> bool {
    marker(dir).is_file()
}

/// Marks `dir` complete: writes `complete.json` (holding `info`, any JSON the stage wants to
/// keep, e.g. its step count) atomically. Call it after every other file of the stage is
/// written (and synced: [`super::atomic_write`] does both).
pub fn mark_complete(dir: &Path, info: &serde_json::Value) -> Result<()> {
    crate::config::write_json(&marker(dir), info)?;
    super::sync_dir(dir);
    Ok(())
}

/// The `info` stored by [`mark_complete`], or `None` when `dir` is not marked complete.
pub fn read_complete(dir: &Path) -> Result<Option<serde_json::Value>> {
    if !is_complete(dir) {
        return Ok(None);
    }
    crate::config::read_json(&marker(dir)).map(Some)
}

/// Removes the marker, so the stage is redone (or continued) by the next run; a no-op when
/// there is none.
pub fn clear_complete(dir: &Path) -> Result<()> {
    let m = marker(dir);
    match std::fs::remove_file(&m) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(m, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsutil::scratch_dir;

    #[test]
    fn marker_round_trip() {
        let d = scratch_dir("fsutil-complete").unwrap();
        let stage = d.join("tokenizer");
        assert!(!is_complete(&stage));
        assert_eq!(read_complete(&stage).unwrap(), None);
        mark_complete(&stage, &serde_json::json!({"files": 3})).unwrap();
        assert!(is_complete(&stage));
        assert_eq!(read_complete(&stage).unwrap().unwrap()["files"], 3);
        clear_complete(&stage).unwrap();
        assert!(!is_complete(&stage));
        clear_complete(&stage).unwrap();
        // Only the marker's own folder entry remains: nothing temporary left behind.
        assert_eq!(std::fs::read_dir(&stage).unwrap().count(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
