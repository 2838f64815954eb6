//! Computing embedding shards (the clip-retrieval step): a CLIP text and image encoder run over
//! any [`Dataset`], written as [`embeddings`](super::embeddings) shards.
//!
//! Output shard `k` (`{k:05}.safetensors`) holds the good items among source items
//! `k * shard_size .. (k + 1) * shard_size`, in order. Shards are written atomically and a
//! finished shard is never redone, so an interrupted run is resumed by running it again; a
//! shard that does not read back whole (e.g. truncated by a crash of the disk) is redone.
//! `embed.json` records the source and shard size, and a rerun with different ones is refused.
//!
//! Stored embeddings are what the pipeline computes at inference (unnormalized
//! `CLIPTextModelWithProjection.text_embeds` and `CLIPVisionModelWithProjection.image_embeds`),
//! so a prior or decoder trained on them sees the same inputs as when sampling.

use std::path::{Path, PathBuf};
use std::time::Instant;

use image::{DynamicImage, RgbImage};
use tch::{Device, Kind, Tensor};
use unclip_clip::preprocess::Rgb8;

use super::embeddings::{FORMAT, read_shard_rows, write_embedding_shard};
use super::{DataError, Dataset, decode_image};
use crate::stages::{ClipImageEncoder, ClipTextEncoder};
use crate::traits::{ImageEncoder, TextEncoder};
use crate::{Error, Result};

/// CLIP's two towers, loaded from an unCLIP folder (`text_encoder/`, `tokenizer/`,
/// `image_encoder/`, `feature_extractor/`, as Karlo or `models/shapes`) or from one transformers
/// `CLIPModel` folder (both towers, tokenizer and `preprocessor_config.json` inside).
pub struct Embedder {
    text: ClipTextEncoder,
    image: ClipImageEncoder,
    source: PathBuf,
}

impl Embedder {
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Embedder> {
        let (text, image) = if dir.join("text_encoder").is_dir() {
            let image_dir = dir.join("image_encoder");
            if !image_dir.is_dir() {
                return Err(Error::Input(format!(
                    "{} has no image_encoder/ (an image encoder is needed for image embeddings)",
                    dir.display()
                )));
            }
            (
                ClipTextEncoder::load(
                    &dir.join("text_encoder"),
                    &dir.join("tokenizer"),
                    device,
                    kind,
                )?,
                ClipImageEncoder::load(
                    &image_dir,
                    &dir.join("feature_extractor/preprocessor_config.json"),
                    device,
                    kind,
                )?,
            )
        } else {
            let tok = if dir.join("tokenizer").is_dir() {
                dir.join("tokenizer")
            } else {
                dir.to_path_buf()
            };
            (
                ClipTextEncoder::load(dir, &tok, device, kind)?,
                ClipImageEncoder::load(dir, &dir.join("preprocessor_config.json"), device, kind)?,
            )
        };
        Ok(Embedder { text, image, source: dir.to_path_buf() })
    }

    /// (image, text) embeddings `(B, D)` f32 on the CPU: what the pipeline's image and text
    /// encoders give for these images and captions.
    pub fn embed(&self, images: &[Rgb8], captions: &[&str]) -> Result<(Tensor, Tensor)> {
        if images.len() != captions.len() || images.is_empty() {
            return Err(Error::Input(format!(
                "{} images and {} captions: expected the same, non-zero number",
                images.len(),
                captions.len()
            )));
        }
        let decoded = images
            .iter()
            .map(|i| {
                RgbImage::from_raw(i.width as u32, i.height as u32, i.data.clone())
                    .map(DynamicImage::ImageRgb8)
                    .ok_or_else(|| Error::Input("image buffer does not match its size".into()))
            })
            .collect::<Result<Vec<_>>>()?;
        let image = self.image.embed_images(&decoded)?;
        let text = self.text.encode(captions)?.conditioning.text_embeds;
        let cpu = |t: Tensor| -> Result<Tensor> {
            Ok(t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?)
        };
        Ok((cpu(image)?, cpu(text)?))
    }

    /// The folder the encoders came from.
    pub fn source(&self) -> &Path {
        &self.source
    }
}

/// How [`embed_dataset`] batches and shards.
#[derive(Debug, Clone)]
pub struct EmbedOptions {
    /// Source items per output shard.
    pub shard_size: usize,
    /// Images per CLIP call.
    pub batch_size: usize,
    /// Threads reading and decoding items.
    pub workers: usize,
    /// Fail when more than this fraction of the items read were bad.
    pub max_bad_fraction: f64,
    /// Stop after writing this many shards (the rest is done by a later run).
    pub max_shards: Option<usize>,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        EmbedOptions {
            shard_size: 10_000,
            batch_size: 64,
            workers: 2,
            max_bad_fraction: 0.05,
            max_shards: None,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EmbedSummary {
    /// Items embedded by this run.
    pub items: usize,
    /// Bad items skipped by this run.
    pub skipped: usize,
    pub shards_written: usize,
    /// Shards found finished and left alone.
    pub shards_resumed: usize,
    /// Shards still to do (after `max_shards`).
    pub shards_left: usize,
    pub seconds: f64,
    /// The last few bad items (key, shard, reason).
    pub last_skipped: Vec<String>,
}

/// Progress of [`embed_dataset`]: source items handled (done or resumed) of the total.
#[derive(Debug, Clone, Copy)]
pub struct EmbedProgress {
    pub done: usize,
    pub total: usize,
    pub skipped: usize,
}

/// The shard file for output shard `k`.
pub fn shard_path(out: &Path, k: usize) -> PathBuf {
    out.join(format!("{k:05}.safetensors"))
}

/// Embeds `dataset` into shards in `out` (see the module documentation), resuming a previous
/// run. `progress` is called after every batch.
pub fn embed_dataset(
    embedder: &Embedder,
    dataset: &dyn Dataset,
    out: &Path,
    options: &EmbedOptions,
    progress: &mut dyn FnMut(EmbedProgress),
) -> Result<EmbedSummary> {
    let start = Instant::now();
    let (len, size) = (dataset.len(), options.shard_size);
    if size == 0 || options.batch_size == 0 {
        return Err(
            DataError::InvalidArgument("shard_size and batch_size must be > 0".into()).into()
        );
    }
    if len == 0 {
        return Err(DataError::Empty(dataset.describe()).into());
    }
    std::fs::create_dir_all(out).map_err(|e| DataError::io(out, e))?;
    check_manifest(embedder, dataset, out, size)?;
    let shards = len.div_ceil(size);
    let mut summary = EmbedSummary::default();
    let (mut seen, mut done) = (0usize, 0usize);
    for k in 0..shards {
        let range = k * size..((k + 1) * size).min(len);
        let path = shard_path(out, k);
        if read_shard_rows(&path).is_ok() {
            summary.shards_resumed += 1;
            done += range.len();
            progress(EmbedProgress { done, total: len, skipped: summary.skipped });
            continue;
        }
        if options.max_shards.is_some_and(|m| summary.shards_written >= m) {
            summary.shards_left += 1;
            continue;
        }
        let (mut keys, mut captions) = (Vec::new(), Vec::new());
        let (mut image_rows, mut text_rows) = (Vec::new(), Vec::new());
        for chunk_start in range.clone().step_by(options.batch_size) {
            let chunk = chunk_start..(chunk_start + options.batch_size).min(range.end);
            let n = chunk.len();
            let read = read_parallel(dataset, chunk, options.workers)?;
            seen += n;
            let mut good = Vec::new();
            for r in read {
                match r {
                    Ok(x) => good.push(x),
                    Err(e) => {
                        let msg = e.to_string();
                        eprintln!("embed: skipped {msg}");
                        summary.skipped += 1;
                        if summary.last_skipped.len() == 8 {
                            summary.last_skipped.remove(0);
                        }
                        summary.last_skipped.push(msg);
                    }
                }
            }
            if summary.skipped as f64 > options.max_bad_fraction * seen as f64
                && seen >= len.min(100)
            {
                return Err(DataError::TooManyBad {
                    skipped: summary.skipped as u64,
                    seen: seen as u64,
                    max_fraction: options.max_bad_fraction,
                    last: summary.last_skipped.clone(),
                }
                .into());
            }
            if !good.is_empty() {
                let imgs: Vec<Rgb8> = good.iter().map(|g| g.2.clone()).collect();
                let caps: Vec<&str> = good.iter().map(|g| g.1.as_str()).collect();
                let (i, t) = embedder.embed(&imgs, &caps)?;
                image_rows.push(i);
                text_rows.push(t);
                for (key, caption, _) in good {
                    keys.push(key);
                    captions.push(caption);
                }
            }
            done += n;
            progress(EmbedProgress { done, total: len, skipped: summary.skipped });
        }
        let (image, text) = if image_rows.is_empty() {
            // A shard of bad items only: written empty, so a rerun does not redo it.
            let (di, dt) = embedder_dims(embedder)?;
            (
                Tensor::zeros([0, di], (Kind::Float, Device::Cpu)),
                Tensor::zeros([0, dt], (Kind::Float, Device::Cpu)),
            )
        } else {
            (Tensor::f_cat(&image_rows, 0)?, Tensor::f_cat(&text_rows, 0)?)
        };
        let model = embedder.source.display().to_string();
        write_embedding_shard(&path, &keys, &captions, &image, &text, &[("model", &model)])?;
        summary.items += keys.len();
        summary.shards_written += 1;
    }
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// The embedding sizes, from one dummy item (only needed for a shard with no good item).
fn embedder_dims(embedder: &Embedder) -> Result<(i64, i64)> {
    let px = Rgb8 { width: 1, height: 1, data: vec![0; 3] };
    let (i, t) = embedder.embed(&[px], &[""])?;
    Ok((i.size()[1], t.size()[1]))
}

type Good = (String, String, Rgb8);

/// Items of `range` read and decoded on `workers` threads, in order.
fn read_parallel(
    dataset: &dyn Dataset,
    range: std::ops::Range<usize>,
    workers: usize,
) -> Result<Vec<std::result::Result<Good, DataError>>> {
    let read_one = |i: usize| -> std::result::Result<Good, DataError> {
        let item = dataset.item(i)?;
        let origin = dataset.origin(i);
        let data = item.image.as_ref().ok_or_else(|| {
            DataError::bad(&item.key, origin.as_deref(), "the source has no image for it")
        })?;
        let img = decode_image(data, &item.key, origin.as_deref())?;
        Ok((item.key, item.caption, img))
    };
    let indices: Vec<usize> = range.collect();
    let per = indices.len().div_ceil(workers.max(1)).max(1);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = indices
            .chunks(per)
            .map(|c| s.spawn(move || c.iter().map(|&i| read_one(i)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join().unwrap_or_else(|_| {
                    vec![Err(DataError::Worker("a reader thread panicked".into()))]
                })
            })
            .collect()
    });
    // Anything but a bad item stops the run.
    let mut out = Vec::with_capacity(results.len());
    for r in results {
        match r {
            Err(e) if !e.is_bad_item() => return Err(e.into()),
            r => out.push(r),
        }
    }
    Ok(out)
}

/// Writes `embed.json` on the first run; refuses a rerun with another source or shard size.
fn check_manifest(
    embedder: &Embedder,
    dataset: &dyn Dataset,
    out: &Path,
    shard_size: usize,
) -> Result<()> {
    let path = out.join("embed.json");
    let manifest = serde_json::json!({
        "format": FORMAT,
        "source": dataset.describe(),
        "items": dataset.len(),
        "shard_size": shard_size,
        "model": embedder.source.display().to_string(),
    });
    if path.is_file() {
        let old: serde_json::Value = unclip_core::config::read_json(&path)?;
        for field in ["items", "shard_size", "model"] {
            if old.get(field) != manifest.get(field) {
                return Err(DataError::InvalidArgument(format!(
                    "{} was written for {field} {}, this run has {}: use another output folder",
                    path.display(),
                    old.get(field).unwrap_or(&serde_json::Value::Null),
                    manifest[field]
                ))
                .into());
            }
        }
        return Ok(());
    }
    let text = serde_json::to_string_pretty(&manifest).expect("json");
    unclip_core::fsutil::atomic_write(&path, |tmp| {
        std::fs::write(tmp, text.as_bytes()).map_err(|e| unclip_core::Error::io(tmp, e))
    })?;
    Ok(())
}
