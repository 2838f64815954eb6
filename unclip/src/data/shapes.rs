//! The generated shapes scenes as a [`Dataset`]: item `i` is scene `i` of a split, rendered at a
//! fixed size, with its caption. Nothing is read from disk and no item is ever bad.

use crate::shapes::{Scene, SceneGenerator, Split, caption, render};

use super::{DataError, DataResult, Dataset, ImageData, Item};

/// `len` scenes of a [`SceneGenerator`], rendered at `size` px.
#[derive(Debug, Clone)]
pub struct Shapes {
    generator: SceneGenerator,
    len: usize,
    size: u32,
}

impl Shapes {
    /// Scenes `0..len` of `generator`, rendered `size` x `size`.
    pub fn new(generator: SceneGenerator, len: usize, size: u32) -> DataResult<Shapes> {
        if size == 0 || len == 0 {
            return Err(DataError::InvalidArgument(format!(
                "shapes source needs len > 0 and size > 0 (got len {len}, size {size})"
            )));
        }
        Ok(Shapes { generator, len, size })
    }

    /// The training split with `seed`.
    pub fn train(seed: u64, len: usize, size: u32) -> DataResult<Shapes> {
        Self::new(SceneGenerator::new(Split::Train, seed), len, size)
    }

    /// The scene behind item `index` (for shapes-specific batches, e.g. contrastive groups).
    pub fn scene(&self, index: usize) -> Scene {
        self.generator.scene(index as u64)
    }

    pub fn generator(&self) -> &SceneGenerator {
        &self.generator
    }

    pub fn size(&self) -> u32 {
        self.size
    }
}

impl Dataset for Shapes {
    fn len(&self) -> usize {
        self.len
    }

    fn item(&self, index: usize) -> DataResult<Item> {
        if index >= self.len {
            return Err(DataError::InvalidArgument(format!(
                "index {index} past the {} items",
                self.len
            )));
        }
        let scene = self.scene(index);
        Ok(Item {
            key: format!("shapes/{index}"),
            caption: caption(&scene),
            image: Some(ImageData::Decoded(render(&scene, self.size))),
            embeddings: None,
        })
    }

    fn describe(&self) -> String {
        format!("shapes scenes ({} at {} px)", self.len, self.size)
    }

    fn key(&self, index: usize) -> Option<String> {
        (index < self.len).then(|| format!("shapes/{index}"))
    }
}
