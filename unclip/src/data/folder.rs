//! A folder of images with captions: `photo.jpg` + `photo.txt`, or a `metadata.jsonl` whose lines
//! hold `file_name` (relative to the jsonl's folder) and `text` (the Hugging Face imagefolder
//! convention). Subfolders are walked; symbolic links to folders are not followed (no loops).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::{DataError, DataResult, Dataset, ImageData, Item, caption_from_bytes, read_regular};

/// Image extensions an [`ImageFolder`] picks up (lower case; matched case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// Where an image's caption comes from.
#[derive(Debug, Clone)]
enum Caption {
    /// A same-stem `.txt` file (read when the item is).
    File(PathBuf),
    /// A `metadata.jsonl` line (`None`: the line has no usable text).
    Inline(Option<String>),
    Missing,
}

#[derive(Debug, Clone)]
struct Entry {
    key: String,
    image: PathBuf,
    caption: Caption,
}

/// Images with captions under a root folder, in the order of their relative paths.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    entries: Vec<Entry>,
}

impl ImageFolder {
    /// Indexes `root` (every image file below it, and every `metadata.jsonl`).
    pub fn open(root: impl AsRef<Path>) -> DataResult<ImageFolder> {
        Self::open_with(root, "text")
    }

    /// Like [`ImageFolder::open`], reading captions from the jsonl field `text_field`.
    pub fn open_with(root: impl AsRef<Path>, text_field: &str) -> DataResult<ImageFolder> {
        let root = root.as_ref().to_path_buf();
        let meta = std::fs::metadata(&root).map_err(|e| DataError::io(&root, e))?;
        if !meta.is_dir() {
            return Err(DataError::InvalidArgument(format!("{} is not a folder", root.display())));
        }
        let mut images = BTreeMap::new(); // key -> path
        let mut texts = HashMap::new(); // key without extension -> .txt path
        let mut jsonl = Vec::new();
        walk(&root, &root, &mut images, &mut texts, &mut jsonl)?;
        let mut inline: HashMap<String, Option<String>> = HashMap::new();
        for file in jsonl {
            read_metadata(&root, &file, text_field, &mut inline, &mut images)?;
        }
        let entries = images
            .into_iter()
            .map(|(key, image)| {
                let caption = if let Some(t) = inline.remove(&key) {
                    Caption::Inline(t)
                } else if let Some(p) = texts.get(stem_key(&key)) {
                    Caption::File(p.clone())
                } else {
                    Caption::Missing
                };
                Entry { key, image, caption }
            })
            .collect();
        Ok(ImageFolder { root, entries })
    }
}

/// `a/b.jpg` -> `a/b`.
fn stem_key(key: &str) -> &str {
    let name_start = key.rfind('/').map_or(0, |i| i + 1);
    match key[name_start..].rfind('.') {
        Some(dot) if dot > 0 => &key[..name_start + dot],
        _ => key,
    }
}

/// The path of `path` under `root` with `/` separators.
fn relative_key(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

fn walk(
    root: &Path,
    dir: &Path,
    images: &mut BTreeMap<String, PathBuf>,
    texts: &mut HashMap<String, PathBuf>,
    jsonl: &mut Vec<PathBuf>,
) -> DataResult<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut children: Vec<PathBuf> = Vec::new();
    for entry in rd {
        children.push(entry.map_err(|e| DataError::io(dir, e))?.path());
    }
    children.sort();
    for path in children {
        let link = std::fs::symlink_metadata(&path).map_err(|e| DataError::io(&path, e))?;
        if link.is_dir() {
            walk(root, &path, images, texts, jsonl)?;
            continue;
        }
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        if name.starts_with('.') {
            continue; // hidden files and our own temporary files
        }
        let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
        let key = relative_key(root, &path);
        if name == "metadata.jsonl" {
            jsonl.push(path);
        } else if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            images.insert(key, path);
        } else if ext == "txt" {
            texts.insert(stem_key(&key).to_string(), path);
        }
    }
    Ok(())
}

/// Reads one `metadata.jsonl`: captions by image key. A line naming an image that is not there
/// becomes an item too (it is reported as bad when read, not silently dropped).
fn read_metadata(
    root: &Path,
    file: &Path,
    field: &str,
    inline: &mut HashMap<String, Option<String>>,
    images: &mut BTreeMap<String, PathBuf>,
) -> DataResult<()> {
    let text = std::fs::read_to_string(file).map_err(|e| DataError::io(file, e))?;
    let dir = file.parent().unwrap_or(root);
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |m: String| DataError::BadShard {
            path: file.to_path_buf(),
            reason: format!("line {}: {m}", n + 1),
        };
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not JSON ({e})")))?;
        let name = v
            .get("file_name")
            .and_then(|f| f.as_str())
            .ok_or_else(|| bad("no \"file_name\" string".into()))?;
        let path = dir.join(name);
        let key = relative_key(root, &path);
        let caption = v.get(field).and_then(|t| t.as_str()).map(str::to_string);
        images.entry(key.clone()).or_insert(path);
        inline.insert(key, caption);
    }
    Ok(())
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn item(&self, index: usize) -> DataResult<Item> {
        let e = self.entries.get(index).ok_or_else(|| {
            DataError::InvalidArgument(format!("index {index} past the {} items", self.len()))
        })?;
        let here = Some(e.image.as_path());
        let caption = match &e.caption {
            Caption::Missing => {
                return Err(DataError::bad(&e.key, here, "no caption (.txt or metadata.jsonl)"));
            }
            Caption::Inline(None) => {
                return Err(DataError::bad(&e.key, here, "metadata.jsonl line has no caption"));
            }
            Caption::Inline(Some(t)) => caption_from_bytes(t.as_bytes(), &e.key, here)?,
            Caption::File(p) => {
                let bytes = read_regular(p).map_err(|err| {
                    DataError::bad(&e.key, Some(p), format!("cannot read caption: {err}"))
                })?;
                caption_from_bytes(&bytes, &e.key, Some(p))?
            }
        };
        let bytes = read_regular(&e.image)
            .map_err(|err| DataError::bad(&e.key, here, format!("cannot read image: {err}")))?;
        Ok(Item {
            key: e.key.clone(),
            caption,
            image: Some(ImageData::Encoded(bytes)),
            embeddings: None,
        })
    }

    fn describe(&self) -> String {
        format!("image folder {} ({} images)", self.root.display(), self.entries.len())
    }

    fn key(&self, index: usize) -> Option<String> {
        self.entries.get(index).map(|e| e.key.clone())
    }

    fn origin(&self, index: usize) -> Option<PathBuf> {
        self.entries.get(index).map(|e| e.image.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems() {
        assert_eq!(stem_key("a/b.jpg"), "a/b");
        assert_eq!(stem_key("a.b/c"), "a.b/c");
        assert_eq!(stem_key("x.tar.jpg"), "x.tar");
        assert_eq!(stem_key(".hidden"), ".hidden");
    }
}
