//! Precomputed CLIP embeddings, stored as safetensors shards that Python writes as easily as
//! this crate does:
//!
//! - tensors `image_embeds` and `text_embeds`, each `[N, D]` (f32, f16 or bf16; row `i` of both
//!   belongs to item `i`);
//! - header metadata `keys` and `captions`: JSON arrays of `N` strings (the item keys, e.g. the
//!   webdataset keys of the images the embeddings were computed from, and their captions);
//! - optional metadata `format` = `unclip-embeddings/1`, and anything else (the `embed` command
//!   records the CLIP folder as `model`).
//!
//! ```python
//! import json, numpy as np
//! from safetensors.numpy import save_file
//! save_file({"image_embeds": img.astype(np.float32), "text_embeds": txt.astype(np.float32)},
//!           "00000.safetensors", metadata={"keys": json.dumps(keys), "captions": json.dumps(captions)})
//! ```
//!
//! [`EmbeddingShards`] reads such shards (the prior trains on them alone); [`WithEmbeddings`] joins
//! them by key to an image source (the decoder's images with their embeddings). Only the headers
//! are read when opening; rows are read when their item is.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use tch::{Kind, Tensor};

use super::{DataError, DataResult, Dataset, Embeddings, Item};

/// The `format` metadata value this module writes.
pub const FORMAT: &str = "unclip-embeddings/1";
/// The tensor names of a shard.
pub const IMAGE_TENSOR: &str = "image_embeds";
pub const TEXT_TENSOR: &str = "text_embeds";
/// Headers above this size are refused (a shard of a million keys stays well below).
const MAX_HEADER: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    F32,
    F16,
    BF16,
}

impl Dtype {
    fn bytes(self) -> u64 {
        if self == Dtype::F32 { 4 } else { 2 }
    }
}

/// Where one `[N, D]` tensor's bytes lie in its file.
#[derive(Debug, Clone, Copy)]
struct Matrix {
    dtype: Dtype,
    dim: usize,
    /// Absolute file offset of row 0.
    start: u64,
}

impl Matrix {
    fn row(&self, file: &mut File, path: &Path, row: usize) -> DataResult<Vec<f32>> {
        let width = self.dtype.bytes() * self.dim as u64;
        file.seek(SeekFrom::Start(self.start + width * row as u64))
            .map_err(|e| DataError::io(path, e))?;
        let mut buf = vec![0u8; width as usize];
        file.read_exact(&mut buf).map_err(|e| DataError::io(path, e))?;
        Ok(match self.dtype {
            Dtype::F32 => {
                buf.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
            }
            Dtype::F16 => {
                buf.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            Dtype::BF16 => {
                buf.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
        })
    }
}

#[derive(Debug, Clone)]
struct Shard {
    path: PathBuf,
    keys: Vec<String>,
    captions: Vec<String>,
    image: Matrix,
    text: Matrix,
}

/// The header of one shard, checked: keys, captions and both matrices agree on `N`.
fn read_shard(path: &Path) -> DataResult<Shard> {
    let bad = |reason: String| DataError::BadShard { path: path.to_path_buf(), reason };
    if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return Err(DataError::MissingShard { path: path.to_path_buf() });
    }
    let mut f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let file_len = f.metadata().map_err(|e| DataError::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| bad("shorter than a safetensors header".into()))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || 8 + n > file_len {
        return Err(bad(format!("header length {n} does not fit the file ({file_len} bytes)")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| DataError::io(path, e))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON ({e})")))?;
    let meta = header.get("__metadata__").and_then(|m| m.as_object());
    let list = |name: &str| -> DataResult<Vec<String>> {
        let s = meta
            .and_then(|m| m.get(name))
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad(format!("no \"{name}\" metadata (a JSON list of strings)")))?;
        serde_json::from_str(s)
            .map_err(|e| bad(format!("\"{name}\" metadata is not a JSON list of strings ({e})")))
    };
    let (keys, captions) = (list("keys")?, list("captions")?);
    let rows = keys.len();
    if captions.len() != rows {
        return Err(bad(format!("{rows} keys but {} captions", captions.len())));
    }
    let data_start = 8 + n;
    let matrix = |name: &str| -> DataResult<Matrix> {
        let info = header.get(name).ok_or_else(|| bad(format!("no tensor {name}")))?;
        let dtype = match info.get("dtype").and_then(|d| d.as_str()) {
            Some("F32") => Dtype::F32,
            Some("F16") => Dtype::F16,
            Some("BF16") => Dtype::BF16,
            other => {
                return Err(bad(format!(
                    "tensor {name} has dtype {other:?}, expected F32, F16 or BF16"
                )));
            }
        };
        let shape: Vec<u64> = info
            .get("shape")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad(format!("tensor {name} has no shape")))?;
        let offsets: [u64; 2] = info
            .get("data_offsets")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad(format!("tensor {name} has no data_offsets")))?;
        let [r, d] = shape[..] else {
            return Err(bad(format!("tensor {name} has shape {shape:?}, expected [N, D]")));
        };
        if r != rows as u64 || d == 0 {
            return Err(bad(format!("tensor {name} has shape {shape:?} for {rows} keys")));
        }
        let size = r.checked_mul(d).and_then(|x| x.checked_mul(dtype.bytes()));
        let end = data_start.checked_add(offsets[1]);
        if size != offsets[1].checked_sub(offsets[0]) || end.is_none_or(|e| e > file_len) {
            return Err(bad(format!(
                "tensor {name}: data offsets {offsets:?} do not match its shape or the file"
            )));
        }
        Ok(Matrix { dtype, dim: d as usize, start: data_start + offsets[0] })
    };
    let (image, text) = (matrix(IMAGE_TENSOR)?, matrix(TEXT_TENSOR)?);
    Ok(Shard { path: path.to_path_buf(), keys, captions, image, text })
}

/// Checks that `path` is a complete, well-formed shard; returns its number of rows.
pub fn read_shard_rows(path: &Path) -> DataResult<usize> {
    read_shard(path).map(|s| s.keys.len())
}

/// Embedding shards read as one dataset (items have no image).
#[derive(Debug, Clone)]
pub struct EmbeddingShards {
    shards: Vec<Shard>,
    /// (shard, row) of each item.
    rows: Vec<(u32, u32)>,
}

impl EmbeddingShards {
    /// These shards, in order. A missing or malformed shard is an error naming it.
    pub fn open(paths: &[PathBuf]) -> DataResult<EmbeddingShards> {
        if paths.is_empty() {
            return Err(DataError::InvalidArgument("no embedding shard given".into()));
        }
        let shards = paths.iter().map(|p| read_shard(p)).collect::<DataResult<Vec<_>>>()?;
        let (dim_i, dim_t) = (shards[0].image.dim, shards[0].text.dim);
        let mut rows = Vec::new();
        for (s, shard) in shards.iter().enumerate() {
            if (shard.image.dim, shard.text.dim) != (dim_i, dim_t) {
                return Err(DataError::BadShard {
                    path: shard.path.clone(),
                    reason: format!(
                        "embedding sizes {}/{} differ from {}'s {dim_i}/{dim_t}",
                        shard.image.dim,
                        shard.text.dim,
                        shards[0].path.display()
                    ),
                });
            }
            rows.extend((0..shard.keys.len()).map(|r| (s as u32, r as u32)));
        }
        Ok(EmbeddingShards { shards, rows })
    }

    /// Every `*.safetensors` in `dir`, in name order (hidden and temporary files ignored).
    pub fn open_dir(dir: &Path) -> DataResult<EmbeddingShards> {
        Self::open(&shard_files(dir)?)
    }

    /// (image, text) embedding sizes.
    pub fn dims(&self) -> (usize, usize) {
        (self.shards[0].image.dim, self.shards[0].text.dim)
    }

    /// The shard files, in order.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.shards.iter().map(|s| s.path.clone()).collect()
    }

    fn embeddings(&self, index: usize) -> DataResult<(&Shard, usize, Embeddings)> {
        let &(s, r) = self.rows.get(index).ok_or_else(|| {
            DataError::InvalidArgument(format!("index {index} past the {} items", self.rows.len()))
        })?;
        let shard = &self.shards[s as usize];
        let mut f = File::open(&shard.path).map_err(|e| DataError::io(&shard.path, e))?;
        let image = shard.image.row(&mut f, &shard.path, r as usize)?;
        let text = shard.text.row(&mut f, &shard.path, r as usize)?;
        Ok((shard, r as usize, Embeddings { image, text }))
    }
}

/// Every `*.safetensors` file in `dir`, sorted by name.
pub fn shard_files(dir: &Path) -> DataResult<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let path = entry.map_err(|e| DataError::io(dir, e))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        if !name.starts_with('.') && name.ends_with(".safetensors") && path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(DataError::InvalidArgument(format!(
            "no .safetensors shard in {}",
            dir.display()
        )));
    }
    Ok(out)
}

impl Dataset for EmbeddingShards {
    fn len(&self) -> usize {
        self.rows.len()
    }

    fn item(&self, index: usize) -> DataResult<Item> {
        let (shard, r, embeddings) = self.embeddings(index)?;
        let key = shard.keys[r].clone();
        let caption =
            super::caption_from_bytes(shard.captions[r].as_bytes(), &key, Some(&shard.path))?;
        Ok(Item { key, caption, image: None, embeddings: Some(embeddings) })
    }

    fn describe(&self) -> String {
        let (i, t) = self.dims();
        format!(
            "{} embedding shard(s) from {} ({} items, image {i} / text {t} dims)",
            self.shards.len(),
            self.shards[0].path.display(),
            self.rows.len()
        )
    }

    fn key(&self, index: usize) -> Option<String> {
        let &(s, r) = self.rows.get(index)?;
        Some(self.shards[s as usize].keys[r as usize].clone())
    }

    fn origin(&self, index: usize) -> Option<PathBuf> {
        let &(s, _) = self.rows.get(index)?;
        Some(self.shards[s as usize].path.clone())
    }
}

/// An image source with the embeddings of its items, joined by key (the decoder's data).
///
/// Opening checks every embedding key against the image source: a key the images do not have
/// (shards computed from other images, or shuffled) is [`DataError::Misaligned`] naming the
/// shard and key. An image without embeddings (`embed` found it bad) is a bad item; a caption that
/// differs from the one embedded is `Misaligned` when read.
pub struct WithEmbeddings {
    images: Arc<dyn Dataset>,
    embeddings: EmbeddingShards,
    /// Embedding item of each image item.
    joined: Vec<Option<usize>>,
}

impl WithEmbeddings {
    pub fn new(
        images: Arc<dyn Dataset>,
        embeddings: EmbeddingShards,
    ) -> DataResult<WithEmbeddings> {
        let mut image_keys: HashMap<String, usize> = HashMap::with_capacity(images.len());
        for i in 0..images.len() {
            let key = images.key(i).ok_or_else(|| {
                DataError::InvalidArgument(format!(
                    "{} does not know its keys, so embeddings cannot be joined to it",
                    images.describe()
                ))
            })?;
            image_keys.insert(key, i);
        }
        let mut joined = vec![None; images.len()];
        let mut seen: HashSet<&str> = HashSet::new();
        for (e, &(s, r)) in embeddings.rows.iter().enumerate() {
            let shard = &embeddings.shards[s as usize];
            let key = &shard.keys[r as usize];
            let misaligned = |reason: String| DataError::Misaligned {
                path: shard.path.clone(),
                key: key.clone(),
                reason,
            };
            let Some(&i) = image_keys.get(key) else {
                return Err(misaligned(format!(
                    "is not in the image source ({})",
                    images.describe()
                )));
            };
            if !seen.insert(key) {
                return Err(misaligned("appears twice in the embedding shards".into()));
            }
            joined[i] = Some(e);
        }
        Ok(WithEmbeddings { images, embeddings, joined })
    }

    /// How many image items have embeddings.
    pub fn joined(&self) -> usize {
        self.joined.iter().filter(|j| j.is_some()).count()
    }
}

impl Dataset for WithEmbeddings {
    fn len(&self) -> usize {
        self.images.len()
    }

    fn item(&self, index: usize) -> DataResult<Item> {
        let mut item = self.images.item(index)?;
        let Some(e) = self.joined.get(index).copied().flatten() else {
            return Err(DataError::bad(
                &item.key,
                self.images.origin(index).as_deref(),
                "no precomputed embeddings",
            ));
        };
        let (shard, r, embeddings) = self.embeddings.embeddings(e)?;
        if shard.captions[r].trim() != item.caption {
            return Err(DataError::Misaligned {
                path: shard.path.clone(),
                key: item.key,
                reason: format!(
                    "was embedded with caption {:?}, the image source has {:?}",
                    shard.captions[r], item.caption
                ),
            });
        }
        item.embeddings = Some(embeddings);
        Ok(item)
    }

    fn describe(&self) -> String {
        format!("{} joined with {}", self.images.describe(), self.embeddings.describe())
    }

    fn key(&self, index: usize) -> Option<String> {
        self.images.key(index)
    }

    fn origin(&self, index: usize) -> Option<PathBuf> {
        self.images.origin(index)
    }
}

/// A safetensors file of f32 tensors, byte for byte the same for the same input (the header's
/// entries in a fixed order, unlike a hash map's).
fn safetensors_bytes(
    metadata: serde_json::Map<String, serde_json::Value>,
    tensors: &[(&str, Vec<usize>, Vec<u8>)],
) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), metadata.into());
    let mut offset = 0usize;
    for (name, shape, bytes) in tensors {
        let info = serde_json::json!({
            "dtype": "F32",
            "shape": shape,
            "data_offsets": [offset, offset + bytes.len()],
        });
        header.insert(name.to_string(), info);
        offset += bytes.len();
    }
    let mut json = serde_json::Value::Object(header).to_string().into_bytes();
    // The data starts 8-byte aligned, as the reference writer pads it.
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (_, _, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    out
}

/// Writes one shard atomically (a temporary file renamed into place, so an interrupted write
/// never leaves a shard that looks complete). `image` and `text` are `[N, D]` float tensors on
/// any device; `extra` adds metadata entries (e.g. `("model", "models/shapes")`).
pub fn write_embedding_shard(
    path: &Path,
    keys: &[String],
    captions: &[String],
    image: &Tensor,
    text: &Tensor,
    extra: &[(&str, &str)],
) -> DataResult<()> {
    let n = keys.len();
    if captions.len() != n {
        return Err(DataError::InvalidArgument(format!(
            "{n} keys but {} captions",
            captions.len()
        )));
    }
    let mut tensors = Vec::new();
    for (name, t) in [(IMAGE_TENSOR, image), (TEXT_TENSOR, text)] {
        let size = t.size();
        if size.len() != 2 || size[0] != n as i64 {
            return Err(DataError::InvalidArgument(format!(
                "{name} has shape {size:?}, expected [{n}, D]"
            )));
        }
        let flat = t
            .f_to_device(tch::Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?
            .f_flatten(0, -1)?;
        let v = Vec::<f32>::try_from(&flat)?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        tensors.push((name, size.iter().map(|&d| d as usize).collect::<Vec<_>>(), bytes));
    }
    let to_json = |v: &[String]| serde_json::to_string(v).expect("strings serialize");
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), FORMAT.into());
    meta.insert("keys".into(), to_json(keys).into());
    meta.insert("captions".into(), to_json(captions).into());
    for (k, v) in extra {
        meta.insert(k.to_string(), v.to_string().into());
    }
    let bytes = safetensors_bytes(meta, &tensors);
    unclip_core::fsutil::atomic_write(path, |tmp| {
        std::fs::write(tmp, &bytes).map_err(|e| unclip_core::Error::io(tmp, e))
    })?;
    Ok(())
}
