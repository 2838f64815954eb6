//! Writing any [`Dataset`] out in the layouts the sources read: webdataset tar shards
//! (img2dataset's naming: shard `00000.tar`, keys `000000000`) or an image folder with `.txt`
//! captions or a `metadata.jsonl`. Used to make the committed test data from shapes renders, and
//! by users converting data. Bad items are skipped; every file is written atomically.

use std::io::Write;
use std::path::{Path, PathBuf};

use image::ImageEncoder;
use unclip_clip::preprocess::Rgb8;

use super::{DataError, DataResult, Dataset, decode_image};

/// How images are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// JPEG at this quality (1..=100).
    Jpeg(u8),
    Png,
}

impl ImageFormat {
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Jpeg(_) => "jpg",
            ImageFormat::Png => "png",
        }
    }

    /// The encoded file of an 8-bit RGB image.
    pub fn encode(self, img: &Rgb8) -> DataResult<Vec<u8>> {
        let mut out = Vec::new();
        let (w, h) = (img.width as u32, img.height as u32);
        let res = match self {
            ImageFormat::Jpeg(q) => image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, q)
                .write_image(&img.data, w, h, image::ExtendedColorType::Rgb8),
            ImageFormat::Png => image::codecs::png::PngEncoder::new(&mut out).write_image(
                &img.data,
                w,
                h,
                image::ExtendedColorType::Rgb8,
            ),
        };
        res.map_err(|e| DataError::InvalidArgument(format!("cannot encode a {w}x{h} image: {e}")))?;
        Ok(out)
    }
}

/// Items `range` of `dataset`, good ones only: (key, caption, image).
fn good_items(
    dataset: &dyn Dataset,
    range: std::ops::Range<usize>,
) -> DataResult<Vec<(String, String, Rgb8)>> {
    let mut out = Vec::new();
    for i in range {
        let item = match dataset.item(i) {
            Ok(item) => item,
            Err(e) if e.is_bad_item() => continue,
            Err(e) => return Err(e),
        };
        let Some(data) = &item.image else { continue };
        match decode_image(data, &item.key, None) {
            Ok(img) => out.push((item.key, item.caption, img)),
            Err(e) if e.is_bad_item() => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Writes `dataset` as tar shards of `per_shard` items into `dir`: `00000.tar`, `00001.tar`...
/// Member keys are img2dataset's (`{shard:05}{index in shard:04}`). Returns the shard paths.
pub fn write_webdataset(
    dataset: &dyn Dataset,
    dir: &Path,
    per_shard: usize,
    format: ImageFormat,
) -> DataResult<Vec<PathBuf>> {
    if per_shard == 0 || per_shard > 10_000 {
        return Err(DataError::InvalidArgument(format!(
            "per_shard {per_shard} is not in 1..=10000"
        )));
    }
    let mut paths = Vec::new();
    for (s, start) in (0..dataset.len()).step_by(per_shard).enumerate() {
        let items = good_items(dataset, start..(start + per_shard).min(dataset.len()))?;
        let path = dir.join(format!("{s:05}.tar"));
        let mut members: Vec<(String, Vec<u8>)> = Vec::new();
        for (i, (_, caption, img)) in items.iter().enumerate() {
            let key = format!("{s:05}{i:04}");
            members.push((format!("{key}.{}", format.extension()), format.encode(img)?));
            members.push((format!("{key}.txt"), caption.clone().into_bytes()));
        }
        write_tar(&path, &members)?;
        paths.push(path);
    }
    Ok(paths)
}

/// Writes a tar file of (name, bytes) members atomically.
pub fn write_tar(path: &Path, members: &[(String, Vec<u8>)]) -> DataResult<()> {
    unclip_core::fsutil::atomic_write(path, |tmp| {
        let io = |e: std::io::Error| unclip_core::Error::io(tmp, e);
        let file = std::fs::File::create(tmp).map_err(io)?;
        let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
        for (name, bytes) in members {
            let mut header = tar::Header::new_ustar();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0); // reproducible bytes
            header.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut header, name, bytes.as_slice()).map_err(io)?;
        }
        tar.into_inner().map_err(io)?.flush().map_err(io)
    })?;
    Ok(())
}

/// Layout of an exported image folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Captions {
    /// `name.txt` next to `name.jpg`.
    TxtFiles,
    /// One `metadata.jsonl` with `file_name` and `text`.
    MetadataJsonl,
}

/// Writes `dataset` as an image folder in `dir` (files `00000.jpg`...). Returns the image paths.
pub fn write_image_folder(
    dataset: &dyn Dataset,
    dir: &Path,
    format: ImageFormat,
    captions: Captions,
) -> DataResult<Vec<PathBuf>> {
    let mut paths = Vec::new();
    let mut jsonl = String::new();
    let write = |path: &Path, bytes: &[u8]| {
        unclip_core::fsutil::atomic_write(path, |tmp| {
            std::fs::write(tmp, bytes).map_err(|e| unclip_core::Error::io(tmp, e))
        })
    };
    for (i, (_, caption, img)) in good_items(dataset, 0..dataset.len())?.into_iter().enumerate() {
        let name = format!("{i:05}.{}", format.extension());
        let path = dir.join(&name);
        write(&path, &format.encode(&img)?)?;
        match captions {
            Captions::TxtFiles => write(&dir.join(format!("{i:05}.txt")), caption.as_bytes())?,
            Captions::MetadataJsonl => {
                let line = serde_json::json!({ "file_name": name, "text": caption });
                jsonl.push_str(&line.to_string());
                jsonl.push('\n');
            }
        }
        paths.push(path);
    }
    if captions == Captions::MetadataJsonl {
        write(&dir.join("metadata.jsonl"), jsonl.as_bytes())?;
    }
    Ok(paths)
}
