//! The run's dataset from `[data]`, split into training items and the held-out tail.

use super::config::{CropKind, DataConfig, SourceKind};
use super::{Result, TrainError};
use crate::data::{self, Crop, DataError, Dataset, Item, Loader, LoaderConfig, Transform};
use crate::shapes::{self, SceneGenerator};
use std::sync::Arc;

/// Items `start..start + len` of another dataset.
pub struct Subset {
    inner: Arc<dyn Dataset>,
    start: usize,
    len: usize,
    name: &'static str,
}

impl Subset {
    /// `None` when the range does not lie inside `inner`.
    pub fn new(
        inner: Arc<dyn Dataset>,
        start: usize,
        len: usize,
        name: &'static str,
    ) -> Option<Self> {
        (start.checked_add(len)? <= inner.len()).then_some(Self { inner, start, len, name })
    }
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.len
    }
    fn item(&self, index: usize) -> std::result::Result<Item, DataError> {
        self.inner.item(self.start + index)
    }
    fn describe(&self) -> String {
        format!(
            "{} items {}..{} of {}",
            self.name,
            self.start,
            self.start + self.len,
            self.inner.describe()
        )
    }
}

/// The shapes source's scene generator: item `i` of the dataset is its scene `i` (stages that
/// rebuild scenes from item keys, like CLIP's counterpart groups, use this same generator).
pub(crate) fn shapes_generator(cfg: &DataConfig, seed: u64) -> SceneGenerator {
    SceneGenerator::new(shapes::Split::Train, seed)
        .with_kind_weights(cfg.kind_weights.unwrap_or(shapes::DEFAULT_KIND_WEIGHTS))
}

/// The training and held-out datasets (`holdout` items from the end; `None` when 0).
pub(crate) struct Split {
    pub train: Arc<dyn Dataset>,
    pub holdout: Option<Arc<dyn Dataset>>,
}

/// Opens `[data]`; `side` is the largest image side any stage needs (the shapes generator renders
/// at it).
pub(crate) fn open(cfg: &DataConfig, seed: u64, side: u32, holdout: usize) -> Result<Split> {
    let full: Arc<dyn Dataset> = match cfg.source {
        SourceKind::Shapes => {
            let n = cfg.items.unwrap_or(0);
            Arc::new(data::Shapes::new(shapes_generator(cfg, seed), n, side)?)
        }
        SourceKind::ImageFolder => Arc::new(data::ImageFolder::open(path(cfg)?)?),
        SourceKind::Webdataset => {
            let p = path(cfg)?;
            let opts = data::WebDatasetOptions::default();
            if p.is_dir() {
                // Every .tar of the folder, in name order.
                let mut shards: Vec<std::path::PathBuf> = std::fs::read_dir(p)
                    .map_err(|e| TrainError::io(p, e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|f| f.extension().is_some_and(|x| x == "tar"))
                    .collect();
                shards.sort();
                Arc::new(data::WebDataset::open(&shards, &opts)?)
            } else {
                Arc::new(data::WebDataset::from_pattern(&p.to_string_lossy(), &opts)?)
            }
        }
        SourceKind::Embeddings => Arc::new(data::EmbeddingShards::open_dir(path(cfg)?)?),
    };
    let total = match (cfg.source, cfg.items) {
        (SourceKind::Shapes, _) | (_, None) => full.len(),
        (_, Some(n)) => n.min(full.len()),
    };
    if total <= holdout {
        return Err(TrainError::stage(
            "data",
            format!(
                "{} has {total} items; validation.items holds out {holdout}, leaving none to train on",
                full.describe()
            ),
        ));
    }
    let train = Subset::new(full.clone(), 0, total - holdout, "training")
        .map(|s| Arc::new(s) as Arc<dyn Dataset>);
    let held = (holdout > 0)
        .then(|| Subset::new(full.clone(), total - holdout, holdout, "held-out"))
        .flatten()
        .map(|s| Arc::new(s) as Arc<dyn Dataset>);
    Ok(Split { train: train.expect("range checked above"), holdout: held })
}

fn path(cfg: &DataConfig) -> Result<&std::path::Path> {
    cfg.path
        .as_deref()
        .ok_or_else(|| TrainError::stage("data", "data.path is required for this source"))
}

/// What one stage's batches need.
pub(crate) struct Needs {
    pub batch_size: usize,
    pub resolution: Option<u32>,
    pub clip_resolution: Option<u32>,
    pub low_resolution: Option<u32>,
}

/// A loader over `dataset` for a stage (`salt` keeps stages' batch orders apart).
pub(crate) fn loader(
    dataset: Arc<dyn Dataset>,
    cfg: &DataConfig,
    seed: u64,
    salt: u64,
    needs: Needs,
) -> Result<Loader> {
    loader_sharded(dataset, cfg, seed, salt, needs, (0, 1))
}

/// [`loader`] reading shard `rank` of `world` (see `LoaderConfig::rank`).
pub(crate) fn loader_sharded(
    dataset: Arc<dyn Dataset>,
    cfg: &DataConfig,
    seed: u64,
    salt: u64,
    needs: Needs,
    (rank, world_size): (usize, usize),
) -> Result<Loader> {
    let crop = match cfg.crop {
        CropKind::Center => Crop::Center,
        CropKind::Random => Crop::Random,
    };
    let config = LoaderConfig {
        batch_size: needs.batch_size,
        seed: seed ^ salt,
        rank,
        world_size,
        workers: cfg.workers,
        prefetch: cfg.prefetch,
        transform: needs.resolution.map(|r| Transform { resolution: r, crop, hflip: cfg.hflip }),
        clip_resolution: needs.clip_resolution,
        low_resolution: needs.low_resolution,
        max_bad_fraction: cfg.max_bad_fraction,
    };
    Ok(Loader::new(dataset, config)?)
}

/// A stable per-stage seed offset, so stages do not share batch orders.
pub(crate) fn salt(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapes::{PromptKind, parse_caption};

    /// `data.kind_weights` reaches the generated dataset: only binding scenes when only binding
    /// has weight.
    #[test]
    fn kind_weights_reach_the_shapes_source() {
        let text = "[run]\nout = \"runs/x\"\nconditioning = \"models/shapes\"\n[data]\nsource = \"shapes\"\nitems = 40\n\
                    kind_weights = [0, 0, 1, 0]\n[decoder]\nresolution = 16\n[decoder.model]\nchannels = [16, 32]\n\
                    [decoder.train]\nsteps = 1\nbatch_size = 1\nlr = 1e-4\n";
        let cfg =
            super::super::RunConfig::parse(text, std::path::Path::new("run.toml"), &[]).unwrap();
        let split = open(&cfg.data, 0, 16, 0).unwrap();
        for i in 0..split.train.len() {
            let caption = split.train.item(i).unwrap().caption;
            let kind = parse_caption(&caption).map(|s| s.kind());
            assert_eq!(kind, Some(PromptKind::Binding), "{caption}");
        }
    }
}
