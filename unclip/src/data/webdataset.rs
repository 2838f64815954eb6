//! WebDataset tar shards as img2dataset writes them: `00000.tar` holding `000000000.jpg`,
//! `000000000.txt` (and maybe `000000000.json`), members grouped by key. A member's key is its
//! path up to the first dot of its file name, the rest is its extension (webdataset's rule).
//!
//! Each shard is indexed once when the dataset is opened (tar headers only, seeking over the
//! data); items are then read by offset, so shards are streamed in any order, never extracted.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::{DataError, DataResult, Dataset, ImageData, Item, caption_from_bytes, expand_braces};

/// Members larger than this are refused as bad items instead of read into memory.
const MAX_MEMBER_BYTES: u64 = 256 * 1024 * 1024;

/// Which member extensions hold the image and the caption, in order of preference (open_clip's
/// `--image-key jpg;png;webp --text-key txt`). Matched case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebDatasetOptions {
    pub image_keys: Vec<String>,
    pub text_keys: Vec<String>,
}

impl Default for WebDatasetOptions {
    fn default() -> Self {
        WebDatasetOptions {
            image_keys: ["jpg", "jpeg", "png", "webp"].map(String::from).to_vec(),
            text_keys: vec!["txt".into()],
        }
    }
}

impl WebDatasetOptions {
    /// From open_clip-style lists: `"jpg;png;webp"` and `"txt"`.
    pub fn from_lists(image_keys: &str, text_keys: &str) -> DataResult<WebDatasetOptions> {
        let split = |s: &str, what: &str| {
            let v: Vec<String> = s
                .split(';')
                .map(|k| k.trim().trim_start_matches('.').to_lowercase())
                .filter(|k| !k.is_empty())
                .collect();
            if v.is_empty() {
                Err(DataError::InvalidArgument(format!("no {what} extension in {s:?}")))
            } else {
                Ok(v)
            }
        };
        Ok(WebDatasetOptions {
            image_keys: split(image_keys, "image")?,
            text_keys: split(text_keys, "text")?,
        })
    }
}

/// A member's place in its shard.
#[derive(Debug, Clone, Copy)]
struct Span {
    offset: u64,
    size: u64,
}

#[derive(Debug, Clone)]
struct Sample {
    shard: u32,
    key: String,
    /// The preferred image member and its rank in `image_keys`.
    image: Option<(usize, Span)>,
    text: Option<(usize, Span)>,
}

/// Samples of a list of tar shards, in shard order, then member order.
#[derive(Debug, Clone)]
pub struct WebDataset {
    shards: Vec<PathBuf>,
    samples: Vec<Sample>,
    warnings: Vec<String>,
}

impl WebDataset {
    /// The shards a brace pattern names (`data/{00000..00099}.tar`), all of which must exist.
    pub fn from_pattern(pattern: &str, options: &WebDatasetOptions) -> DataResult<WebDataset> {
        let paths: Vec<PathBuf> = expand_braces(pattern)?.into_iter().map(PathBuf::from).collect();
        Self::open(&paths, options)
    }

    /// These shards, in this order. A missing shard is an error at once.
    pub fn open(shards: &[PathBuf], options: &WebDatasetOptions) -> DataResult<WebDataset> {
        if shards.is_empty() {
            return Err(DataError::InvalidArgument("no webdataset shard given".into()));
        }
        if options.image_keys.is_empty() || options.text_keys.is_empty() {
            return Err(DataError::InvalidArgument(
                "image and text extensions must not be empty".into(),
            ));
        }
        for path in shards {
            if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
                return Err(DataError::MissingShard { path: path.clone() });
            }
        }
        let mut ds =
            WebDataset { shards: shards.to_vec(), samples: Vec::new(), warnings: Vec::new() };
        for (i, path) in shards.iter().enumerate() {
            let shard = u32::try_from(i)
                .map_err(|_| DataError::InvalidArgument("more than 2^32 shards".into()))?;
            index_shard(path, shard, options, &mut ds.samples, &mut ds.warnings)?;
        }
        for w in &ds.warnings {
            eprintln!("data: {w}");
        }
        Ok(ds)
    }

    /// Problems met while indexing that did not stop it (a shard cut short: its readable part
    /// is used).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    pub fn shards(&self) -> &[PathBuf] {
        &self.shards
    }

    /// The shard item `index` is in (its position in [`WebDataset::shards`]).
    pub fn shard_of(&self, index: usize) -> Option<usize> {
        self.samples.get(index).map(|s| s.shard as usize)
    }
}

/// Reads a shard's headers into samples grouped by key (order of first appearance).
fn index_shard(
    path: &Path,
    shard: u32,
    options: &WebDatasetOptions,
    samples: &mut Vec<Sample>,
    warnings: &mut Vec<String>,
) -> DataResult<()> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    let mut archive = tar::Archive::new(file);
    let entries = archive.entries_with_seek().map_err(|e| DataError::io(path, e))?;
    let first = samples.len();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    let mut members = 0usize;
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                if members == 0 {
                    return Err(DataError::BadShard {
                        path: path.to_path_buf(),
                        reason: format!("not a readable tar file ({e})"),
                    });
                }
                warnings.push(format!(
                    "shard {}: unreadable after {members} members ({e}); the rest is skipped",
                    path.display()
                ));
                break;
            }
        };
        members += 1;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = match entry.path() {
            Ok(p) => p.to_string_lossy().replace('\\', "/"),
            Err(_) => continue,
        };
        let (key, ext) = split_member(&name);
        let Some(ext) = ext else { continue };
        let ext = ext.to_lowercase();
        let span = Span { offset: entry.raw_file_position(), size: entry.size() };
        if span.offset.saturating_add(span.size) > file_len {
            warnings.push(format!(
                "shard {}: member {name} runs past the end of the file (cut short); skipped",
                path.display()
            ));
            continue;
        }
        let image_rank = options.image_keys.iter().position(|k| *k == ext);
        let text_rank = options.text_keys.iter().position(|k| *k == ext);
        if image_rank.is_none() && text_rank.is_none() {
            continue;
        }
        let slot = *by_key.entry(key.to_string()).or_insert_with(|| {
            samples.push(Sample { shard, key: key.to_string(), image: None, text: None });
            samples.len() - 1
        });
        let s = &mut samples[slot];
        if let Some(r) = image_rank
            && s.image.is_none_or(|(old, _)| r < old)
        {
            s.image = Some((r, span));
        }
        if let Some(r) = text_rank
            && s.text.is_none_or(|(old, _)| r < old)
        {
            s.text = Some((r, span));
        }
    }
    if samples.len() == first && members == 0 {
        warnings.push(format!("shard {}: empty", path.display()));
    }
    Ok(())
}

/// `dir/000001.seg.png` -> (`dir/000001`, `seg.png`).
fn split_member(name: &str) -> (&str, Option<&str>) {
    let start = name.rfind('/').map_or(0, |i| i + 1);
    match name[start..].find('.') {
        Some(dot) => (&name[..start + dot], Some(&name[start + dot + 1..])),
        None => (name, None),
    }
}

impl WebDataset {
    fn read_span(&self, s: &Sample, span: Span) -> DataResult<Vec<u8>> {
        let path = &self.shards[s.shard as usize];
        if span.size > MAX_MEMBER_BYTES {
            return Err(DataError::bad(
                &s.key,
                Some(path),
                format!("member of {} bytes (more than {MAX_MEMBER_BYTES})", span.size),
            ));
        }
        let mut f = File::open(path).map_err(|e| DataError::io(path, e))?;
        f.seek(SeekFrom::Start(span.offset)).map_err(|e| DataError::io(path, e))?;
        let mut buf = Vec::with_capacity(span.size as usize);
        f.take(span.size).read_to_end(&mut buf).map_err(|e| DataError::io(path, e))?;
        if buf.len() as u64 != span.size {
            return Err(DataError::bad(
                &s.key,
                Some(path),
                "member cut short (shard changed since indexing?)",
            ));
        }
        Ok(buf)
    }
}

impl Dataset for WebDataset {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn item(&self, index: usize) -> DataResult<Item> {
        let s = self.samples.get(index).ok_or_else(|| {
            DataError::InvalidArgument(format!("index {index} past the {} items", self.len()))
        })?;
        let shard = &self.shards[s.shard as usize];
        let (Some((_, text)), Some((_, image))) = (s.text, s.image) else {
            let missing = if s.text.is_none() { "caption" } else { "image" };
            return Err(DataError::bad(
                &s.key,
                Some(shard),
                format!("member without its {missing}"),
            ));
        };
        let caption = caption_from_bytes(&self.read_span(s, text)?, &s.key, Some(shard))?;
        let bytes = self.read_span(s, image)?;
        Ok(Item {
            key: s.key.clone(),
            caption,
            image: Some(ImageData::Encoded(bytes)),
            embeddings: None,
        })
    }

    fn describe(&self) -> String {
        let first = self.shards.first().map(|p| p.display().to_string()).unwrap_or_default();
        format!(
            "webdataset of {} shard(s) from {first} ({} samples)",
            self.shards.len(),
            self.samples.len()
        )
    }

    fn key(&self, index: usize) -> Option<String> {
        self.samples.get(index).map(|s| s.key.clone())
    }

    fn origin(&self, index: usize) -> Option<PathBuf> {
        self.samples.get(index).map(|s| self.shards[s.shard as usize].clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_split_at_the_first_dot() {
        assert_eq!(split_member("000000001.jpg"), ("000000001", Some("jpg")));
        assert_eq!(split_member("d.x/0001.seg.png"), ("d.x/0001", Some("seg.png")));
        assert_eq!(split_member("README"), ("README", None));
    }

    #[test]
    fn extension_lists() {
        let o = WebDatasetOptions::from_lists("JPG; png;.webp", "txt").unwrap();
        assert_eq!(o.image_keys, ["jpg", "png", "webp"]);
        assert!(WebDatasetOptions::from_lists("", "txt").is_err());
    }
}
