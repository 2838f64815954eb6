//! Errors of the data module. A [`DataError::BadItem`] is one example that cannot be used (the
//! loader skips and counts it); every other variant stops the run and names the file, shard or
//! key at fault.

use std::path::PathBuf;

/// What can go wrong reading training data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// One unusable example: undecodable image, empty or non-UTF-8 caption, a member without its
    /// pair. Skipped and counted by the loader.
    #[error("bad item {key}{}: {reason}", shard.as_ref().map(|s| format!(" (in {s})")).unwrap_or_default())]
    BadItem { key: String, shard: Option<String>, reason: String },
    #[error("io error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A shard named by the list or pattern that does not exist (or is not a regular file).
    #[error("shard {} is missing (or not a regular file)", path.display())]
    MissingShard { path: PathBuf },
    /// A shard that cannot be read at all (not a tar, truncated header, bad safetensors...).
    #[error("shard {}: {reason}", path.display())]
    BadShard { path: PathBuf, reason: String },
    /// Embeddings that do not line up with the images they were computed from.
    #[error("embedding shard {}: key {key:?} {reason}", path.display())]
    Misaligned { path: PathBuf, key: String, reason: String },
    /// A brace pattern that cannot be expanded.
    #[error("shard pattern {pattern:?}: {reason}")]
    Pattern { pattern: String, reason: String },
    /// More bad items than the configured fraction.
    #[error(
        "{skipped} of {seen} items were bad (more than the allowed fraction {max_fraction}); last: {}",
        last.join("; ")
    )]
    TooManyBad { skipped: u64, seen: u64, max_fraction: f64, last: Vec<String> },
    /// A dataset with no usable item.
    #[error("dataset {0} has no items")]
    Empty(String),
    /// A loader or source option out of range.
    #[error("invalid data option: {0}")]
    InvalidArgument(String),
    /// A loader worker thread that failed outside any item (a bug: reported, not hung on).
    #[error("loader worker: {0}")]
    Worker(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Core(#[from] unclip_core::Error),
}

impl DataError {
    /// Wraps an io error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }

    /// A bad item, with the shard (or file) it came from when there is one.
    pub fn bad(
        key: impl Into<String>,
        shard: Option<&std::path::Path>,
        reason: impl Into<String>,
    ) -> Self {
        DataError::BadItem {
            key: key.into(),
            shard: shard.map(|p| p.display().to_string()),
            reason: reason.into(),
        }
    }

    /// Whether the loader may skip this error as one bad example.
    pub fn is_bad_item(&self) -> bool {
        matches!(self, DataError::BadItem { .. })
    }
}
