//! Training data from your own images: one [`Dataset`] abstraction over the layouts the field
//! uses, and a [`Loader`] that turns any of them into batches.
//!
//! Sources (each a [`Dataset`]):
//!
//! - [`ImageFolder`]: images (jpg, png, webp) with a same-stem `.txt` caption, or a
//!   `metadata.jsonl` with `file_name` and `text` (the Hugging Face imagefolder convention);
//! - [`WebDataset`]: tar shards as img2dataset writes them (`00000.tar` holding
//!   `000000000.jpg` + `000000000.txt`), from a list or a brace pattern
//!   (`data/{00000..00099}.tar`), indexed once and read by seeking, never extracted;
//! - [`EmbeddingShards`]: precomputed CLIP image and text embeddings with their keys and captions
//!   (safetensors shards, writable from Python; see [`embeddings`]), alone for the prior or joined
//!   to an image source by key ([`WithEmbeddings`]) for the decoder;
//! - [`Shapes`]: the generated shapes scenes behind the same interface.
//!
//! The [`Loader`] decodes and transforms on worker threads with a bounded prefetch queue; batch
//! `step` of a rank is a pure function of `(dataset, seed, step, rank, world_size)`, so a resumed
//! run sees the same batches. Bad items (undecodable image, missing or empty caption, a member
//! without its pair) are skipped, counted and logged with their key and shard; a run fails with
//! [`DataError::TooManyBad`] past [`LoaderConfig::max_bad_fraction`]. Missing shards and
//! misaligned embeddings are errors at once, naming the file and key.

pub mod embed;
pub mod embeddings;
mod error;
pub mod export;
mod folder;
mod loader;
mod pattern;
mod shapes;
mod transform;
mod webdataset;

pub use embed::{EmbedOptions, EmbedProgress, EmbedSummary, Embedder, embed_dataset};
pub use embeddings::{EmbeddingShards, WithEmbeddings, read_shard_rows, write_embedding_shard};
pub use error::DataError;
pub use export::{Captions, ImageFormat};
pub use folder::ImageFolder;
pub use loader::{Batch, Batches, Loader, LoaderConfig, SkipStats};
pub use pattern::expand_braces;
pub use shapes::Shapes;
pub use transform::{Crop, Transform, decode_image};
pub use webdataset::{WebDataset, WebDatasetOptions};

use image::RgbImage;

/// `Result` with a [`DataError`].
pub type DataResult<T> = std::result::Result<T, DataError>;

/// One training example.
#[derive(Debug, Clone)]
pub struct Item {
    /// Stable key: webdataset member key, image path relative to the folder, `shapes/<index>`...
    pub key: String,
    pub caption: String,
    /// `None` for embedding-only sources.
    pub image: Option<ImageData>,
    /// Precomputed CLIP embeddings, when the source has them.
    pub embeddings: Option<Embeddings>,
}

/// An image as the source holds it: file bytes (decoded on a loader worker) or pixels.
#[derive(Debug, Clone)]
pub enum ImageData {
    Encoded(Vec<u8>),
    Decoded(RgbImage),
}

/// Precomputed CLIP embeddings of one item (as stored: normalized or not, the source decides).
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    pub image: Vec<f32>,
    pub text: Vec<f32>,
}

/// A random-access dataset.
pub trait Dataset: Send + Sync {
    /// Number of items (bad ones included: they are found when read).
    fn len(&self) -> usize;
    /// Whether there is no item.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Item `index`; [`DataError::BadItem`] for a bad item (the loader skips and counts it), any
    /// other error stops the run.
    fn item(&self, index: usize) -> DataResult<Item>;
    /// One line saying what this is (source kind, root or shards, item count).
    fn describe(&self) -> String;
    /// The key of item `index` without reading it, where the source knows it from its index
    /// (joining embeddings to images by key needs it).
    fn key(&self, index: usize) -> Option<String> {
        let _ = index;
        None
    }
    /// The file or shard item `index` comes from, for messages about bad items.
    fn origin(&self, index: usize) -> Option<std::path::PathBuf> {
        let _ = index;
        None
    }
}

/// A caption from raw bytes: UTF-8, trimmed, not empty; otherwise a bad item.
pub(crate) fn caption_from_bytes(
    bytes: &[u8],
    key: &str,
    shard: Option<&std::path::Path>,
) -> DataResult<String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| DataError::bad(key, shard, format!("caption is not UTF-8 ({e})")))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(DataError::bad(key, shard, "empty caption"));
    }
    Ok(text.to_string())
}

/// Reads a regular file (not a device, pipe or folder) into memory.
pub(crate) fn read_regular(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"));
    }
    std::fs::read(path)
}
