//! The loader: batches from any [`Dataset`], decoded and transformed on worker threads.
//!
//! Order. Rank `r` of `w` reads positions `r, r + w, r + 2w, ...` of the endless sequence of
//! per-epoch permutations (each a function of `(seed, epoch)`, core's
//! [`epoch_permutation`]); its batch `step` is positions `step * B .. (step + 1) * B` of that
//! stream. So every item is read once per epoch over all ranks, and batch `step` is a pure
//! function of `(dataset, seed, step, rank, world_size)`: a resumed run asks for the same step
//! and gets the same batch.
//!
//! Bad items. A slot whose item is bad takes the next good item after the batch in the rank's
//! stream (so the batch has no duplicate and stays deterministic); each bad item is counted and
//! logged once with its key and shard, and when more than `max_bad_fraction` of the distinct
//! items read were bad (once `min(len, 100)` items were read) the loader returns
//! [`DataError::TooManyBad`].
//!
//! Threads. [`Loader::iter_from`] hands steps to `workers` threads; at most `prefetch` batches
//! are ready or being built ahead of the consumer, so memory stays bounded whatever the speed of
//! the training step. A worker that panics becomes an error, never a hang.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tch::Tensor;
use unclip_clip::preprocess::Rgb8;
use unclip_core::train::{epoch_permutation, step_seed};

use super::transform::{flip_horizontal, resize_square, to_clip_batch, to_signed_batch};
use super::{DataError, DataResult, Dataset, Embeddings, Transform, decode_image};

/// What a batch should contain, and how its images are made.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub seed: u64,
    /// Items are sharded by rank: rank `rank` of `world_size` reads every `world_size`-th item.
    pub rank: usize,
    pub world_size: usize,
    /// Decode threads of [`Loader::iter_from`] (0: build batches on the caller's thread).
    pub workers: usize,
    /// Batches ready or in progress ahead of the consumer (at least 1).
    pub prefetch: usize,
    /// `None`: no images needed (the prior trains on embeddings).
    pub transform: Option<Transform>,
    /// `Some(n)`: also CLIP-normalized pixels at `n` x `n` (from the same crop).
    pub clip_resolution: Option<u32>,
    /// `Some(n)`: also the transformed image downsampled to `n` (an upsampler's input).
    pub low_resolution: Option<u32>,
    /// Fail the run when more than this fraction of the items read were bad.
    pub max_bad_fraction: f64,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 32,
            seed: 0,
            rank: 0,
            world_size: 1,
            workers: 2,
            prefetch: 4,
            transform: None,
            clip_resolution: None,
            low_resolution: None,
            max_bad_fraction: 0.05,
        }
    }
}

/// One batch, on the CPU (the trainer moves it to its device).
#[derive(Debug)]
pub struct Batch {
    pub keys: Vec<String>,
    pub captions: Vec<String>,
    /// `(B, 3, R, R)` f32 in `[-1, 1]`.
    pub images: Option<Tensor>,
    /// `(B, 3, r, r)` f32 in `[-1, 1]`.
    pub low: Option<Tensor>,
    /// `(B, 3, c, c)` f32, CLIP-normalized.
    pub clip_pixels: Option<Tensor>,
    /// `(B, D)` f32, when every item of the batch has precomputed embeddings.
    pub image_embeds: Option<Tensor>,
    /// `(B, D)` f32, likewise.
    pub text_embeds: Option<Tensor>,
}

/// Bad items met so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SkipStats {
    /// Distinct items read (good and bad).
    pub seen: u64,
    /// Distinct bad items found (each is logged once); the run fails when `skipped / seen`
    /// passes `max_bad_fraction`.
    pub skipped: u64,
    /// Times a slot passed over a bad item (a bad item is met again every epoch).
    pub skips: u64,
    /// The last few bad items: key, shard and reason.
    pub last: Vec<String>,
}

const KEEP_LAST: usize = 8;
const MIN_READS_FOR_FRACTION: usize = 100;

/// Batches from a [`Dataset`]; see the module documentation for order, bad items and threads.
pub struct Loader {
    inner: Arc<Inner>,
}

struct Inner {
    dataset: Arc<dyn Dataset>,
    config: LoaderConfig,
    len: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// One bit per item: read at least once.
    read: Vec<u64>,
    seen: u64,
    skips: u64,
    last: VecDeque<String>,
    bad: HashSet<usize>,
    /// The two most recent epoch permutations (a batch spans at most two epochs... or more for
    /// tiny datasets, which recompute cheaply).
    perms: Vec<(u64, Arc<Vec<usize>>)>,
}

/// One item, transformed.
struct Ready {
    key: String,
    caption: String,
    image: Option<Rgb8>,
    low: Option<Rgb8>,
    clip: Option<Rgb8>,
    embeddings: Option<Embeddings>,
}

impl Loader {
    /// Checks the configuration against the dataset.
    pub fn new(dataset: Arc<dyn Dataset>, config: LoaderConfig) -> DataResult<Loader> {
        let bad = |m: String| Err(DataError::InvalidArgument(m));
        let len = dataset.len();
        if len == 0 {
            return Err(DataError::Empty(dataset.describe()));
        }
        if config.batch_size == 0 {
            return bad("batch_size must be at least 1".into());
        }
        if config.world_size == 0 || config.rank >= config.world_size {
            return bad(format!(
                "rank {} is not in 0..world_size ({})",
                config.rank, config.world_size
            ));
        }
        if !(0.0..=1.0).contains(&config.max_bad_fraction) {
            return bad(format!("max_bad_fraction {} is not in [0, 1]", config.max_bad_fraction));
        }
        match &config.transform {
            Some(t) if t.resolution == 0 => return bad("transform resolution must be > 0".into()),
            None if config.clip_resolution.is_some() || config.low_resolution.is_some() => {
                return bad("clip_resolution and low_resolution need a transform".into());
            }
            _ => {}
        }
        if config.clip_resolution == Some(0) || config.low_resolution == Some(0) {
            return bad("clip_resolution and low_resolution must be > 0".into());
        }
        let state = Mutex::new(State::default());
        Ok(Loader { inner: Arc::new(Inner { dataset, config, len, state }) })
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.inner.config
    }

    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.inner.dataset
    }

    /// Batches per epoch for this rank (the last one may reach into the next epoch).
    pub fn steps_per_epoch(&self) -> u64 {
        let c = &self.inner.config;
        (self.inner.len as u64).div_ceil((c.batch_size * c.world_size) as u64)
    }

    /// Batch number `step` of this rank (a pure function of dataset, seed, step, rank, world).
    pub fn batch(&self, step: u64) -> DataResult<Batch> {
        self.inner.batch(step)
    }

    /// The dataset indices batch `step` starts from, before bad items are replaced.
    pub fn indices(&self, step: u64) -> Vec<usize> {
        let b = self.inner.config.batch_size as u64;
        (step * b..(step + 1) * b).map(|p| self.inner.index_at(p)).collect()
    }

    /// Batches `start..` (endless), built on worker threads with a bounded prefetch queue.
    /// After an error the iterator ends.
    pub fn iter_from(&self, start: u64) -> Batches<'_> {
        Batches::new(self, start)
    }

    /// Bad items met so far by this loader.
    pub fn skipped(&self) -> SkipStats {
        let s = self.inner.lock();
        SkipStats {
            seen: s.seen,
            skipped: s.bad.len() as u64,
            skips: s.skips,
            last: s.last.iter().cloned().collect(),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves only counters behind: keep going with them.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The dataset index at position `p` of this rank's stream.
    fn index_at(&self, p: u64) -> usize {
        let c = &self.config;
        let global = p as u128 * c.world_size as u128 + c.rank as u128;
        let epoch = (global / self.len as u128) as u64;
        let offset = (global % self.len as u128) as usize;
        let perm = {
            let mut s = self.lock();
            match s.perms.iter().find(|(e, _)| *e == epoch) {
                Some((_, p)) => p.clone(),
                None => {
                    let p = Arc::new(epoch_permutation(self.len, c.seed, epoch));
                    if s.perms.len() >= 2 {
                        s.perms.remove(0);
                    }
                    s.perms.push((epoch, p.clone()));
                    p
                }
            }
        };
        perm[offset]
    }

    fn batch(&self, step: u64) -> DataResult<Batch> {
        let b = self.config.batch_size as u64;
        let mut ready = Vec::with_capacity(self.config.batch_size);
        let mut used = HashSet::new();
        // Replacements for bad slots come from the positions after this batch.
        let mut spare = (step + 1) * b;
        for slot in 0..b {
            let mut pos = step * b + slot;
            let mut tries = 0usize;
            loop {
                let index = self.index_at(pos);
                // A dataset smaller than the batch repeats items; only replacements avoid them.
                let fresh =
                    pos < (step + 1) * b || used.len() >= self.len || !used.contains(&index);
                if fresh {
                    match self.load(index, step) {
                        Ok(r) => {
                            used.insert(index);
                            ready.push(r);
                            break;
                        }
                        Err(e) if e.is_bad_item() => self.record_bad(index, &e)?,
                        Err(e) => return Err(e),
                    }
                    tries += 1;
                    if tries > self.len {
                        return Err(self.too_many_bad());
                    }
                }
                pos = spare;
                spare += 1;
            }
        }
        self.assemble(ready)
    }

    fn load(&self, index: usize, step: u64) -> DataResult<Ready> {
        {
            let mut s = self.lock();
            if s.read.is_empty() {
                s.read = vec![0; self.len.div_ceil(64)];
            }
            let (word, bit) = (index / 64, 1u64 << (index % 64));
            if s.read[word] & bit == 0 {
                s.read[word] |= bit;
                s.seen += 1;
            }
            if s.bad.contains(&index) {
                drop(s);
                // Known bad: read again for its message (cheap for most sources) is not needed.
                return Err(DataError::BadItem {
                    key: self.dataset.key(index).unwrap_or_else(|| format!("#{index}")),
                    shard: None,
                    reason: "bad (seen before)".into(),
                });
            }
        }
        let item = self.dataset.item(index)?;
        let mut r = Ready {
            key: item.key,
            caption: item.caption,
            image: None,
            low: None,
            clip: None,
            embeddings: item.embeddings,
        };
        if let Some(t) = &self.config.transform {
            let data = item
                .image
                .ok_or_else(|| DataError::bad(&r.key, None, "the source has no image for it"))?;
            let origin = self.dataset.origin(index);
            let decoded = decode_image(&data, &r.key, origin.as_deref())?;
            let draw = step_seed(step_seed(self.config.seed, step), index as u64);
            let img = t.apply(&decoded, draw)?;
            if let Some(n) = self.config.low_resolution {
                r.low = Some(resize_square(&img, n)?);
            }
            if let Some(n) = self.config.clip_resolution {
                // From the crop at full detail, not from the already reduced image.
                let square = t.crop_square(&decoded, draw);
                let mut clip = resize_square(&square, n)?;
                if t.flips(draw) {
                    flip_horizontal(&mut clip);
                }
                r.clip = Some(clip);
            }
            r.image = Some(img);
        }
        Ok(r)
    }

    fn record_bad(&self, index: usize, e: &DataError) -> DataResult<()> {
        let mut s = self.lock();
        s.skips += 1;
        if s.bad.insert(index) {
            let msg = e.to_string();
            eprintln!("data: skipped {msg}");
            if s.last.len() == KEEP_LAST {
                s.last.pop_front();
            }
            s.last.push_back(msg);
        }
        let min_reads = self.len.min(MIN_READS_FOR_FRACTION) as u64;
        if s.seen >= min_reads && s.bad.len() as f64 > self.config.max_bad_fraction * s.seen as f64
        {
            drop(s);
            return Err(self.too_many_bad());
        }
        Ok(())
    }

    fn too_many_bad(&self) -> DataError {
        let s = self.lock();
        DataError::TooManyBad {
            skipped: s.bad.len() as u64,
            seen: s.seen,
            max_fraction: self.config.max_bad_fraction,
            last: s.last.iter().cloned().collect(),
        }
    }

    fn assemble(&self, ready: Vec<Ready>) -> DataResult<Batch> {
        let images: Option<Vec<Rgb8>> = ready.iter().map(|r| r.image.clone()).collect();
        let low: Option<Vec<Rgb8>> = ready.iter().map(|r| r.low.clone()).collect();
        let clip: Option<Vec<Rgb8>> = ready.iter().map(|r| r.clip.clone()).collect();
        let (image_embeds, text_embeds) = if ready.iter().all(|r| r.embeddings.is_some()) {
            let pick = |f: fn(&Embeddings) -> &Vec<f32>| stack_rows(&ready, f);
            (Some(pick(|e| &e.image)?), Some(pick(|e| &e.text)?))
        } else {
            (None, None)
        };
        Ok(Batch {
            keys: ready.iter().map(|r| r.key.clone()).collect(),
            captions: ready.iter().map(|r| r.caption.clone()).collect(),
            images: images.as_deref().map(to_signed_batch).transpose()?,
            low: low.as_deref().map(to_signed_batch).transpose()?,
            clip_pixels: clip.as_deref().map(to_clip_batch).transpose()?,
            image_embeds,
            text_embeds,
        })
    }
}

/// `(B, D)` from one embedding vector per item (all of one length).
fn stack_rows(ready: &[Ready], field: fn(&Embeddings) -> &Vec<f32>) -> DataResult<Tensor> {
    let rows: Vec<&Vec<f32>> =
        ready.iter().map(|r| field(r.embeddings.as_ref().expect("checked by caller"))).collect();
    let d = rows[0].len();
    let mut flat = Vec::with_capacity(rows.len() * d);
    for (row, r) in rows.iter().zip(ready) {
        if row.len() != d {
            return Err(DataError::InvalidArgument(format!(
                "item {} has a {}-dim embedding, others of its batch {d}",
                r.key,
                row.len()
            )));
        }
        flat.extend_from_slice(row);
    }
    Ok(Tensor::f_from_slice(&flat)?.f_view([rows.len() as i64, d as i64])?)
}

/// The iterator of [`Loader::iter_from`]. Dropping it stops and joins its workers.
pub struct Batches<'a> {
    loader: &'a Loader,
    next: u64,
    pipe: Option<Arc<Pipe>>,
    handles: Vec<JoinHandle<()>>,
    done: bool,
}

struct Pipe {
    state: Mutex<PipeState>,
    changed: Condvar,
}

struct PipeState {
    /// The step the consumer waits for.
    wanted: u64,
    /// The next step a worker will build.
    claim: u64,
    ready: BTreeMap<u64, DataResult<Batch>>,
    stop: bool,
}

impl Pipe {
    fn lock(&self) -> MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<'a> Batches<'a> {
    fn new(loader: &'a Loader, start: u64) -> Batches<'a> {
        let workers = loader.inner.config.workers;
        if workers == 0 {
            return Batches { loader, next: start, pipe: None, handles: Vec::new(), done: false };
        }
        let ahead = loader.inner.config.prefetch.max(1) as u64;
        let pipe = Arc::new(Pipe {
            state: Mutex::new(PipeState {
                wanted: start,
                claim: start,
                ready: BTreeMap::new(),
                stop: false,
            }),
            changed: Condvar::new(),
        });
        let handles = (0..workers)
            .map(|_| {
                let (pipe, inner) = (pipe.clone(), loader.inner.clone());
                std::thread::spawn(move || work(&pipe, &inner, ahead))
            })
            .collect();
        Batches { loader, next: start, pipe: Some(pipe), handles, done: false }
    }
}

fn work(pipe: &Pipe, inner: &Inner, ahead: u64) {
    loop {
        let step = {
            let mut s = pipe.lock();
            loop {
                if s.stop {
                    return;
                }
                if s.claim < s.wanted + ahead {
                    s.claim += 1;
                    break s.claim - 1;
                }
                s = pipe.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
        };
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| inner.batch(step)))
            .unwrap_or_else(|_| Err(DataError::Worker(format!("panicked building batch {step}"))));
        let mut s = pipe.lock();
        if s.stop {
            return;
        }
        s.ready.insert(step, result);
        pipe.changed.notify_all();
    }
}

impl Iterator for Batches<'_> {
    type Item = DataResult<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let result = match &self.pipe {
            None => self.loader.batch(self.next),
            Some(pipe) => {
                let mut s = pipe.lock();
                loop {
                    if let Some(r) = s.ready.remove(&self.next) {
                        s.wanted = self.next + 1;
                        pipe.changed.notify_all();
                        break r;
                    }
                    s = pipe.changed.wait(s).unwrap_or_else(|p| p.into_inner());
                }
            }
        };
        self.next += 1;
        if result.is_err() {
            self.done = true;
            self.shut_down();
        }
        Some(result)
    }
}

impl Batches<'_> {
    fn shut_down(&mut self) {
        if let Some(pipe) = &self.pipe {
            pipe.lock().stop = true;
            pipe.changed.notify_all();
        }
        for h in self.handles.drain(..) {
            // A worker's panic was already turned into an error for its batch.
            let _ = h.join();
        }
    }
}

impl Drop for Batches<'_> {
    fn drop(&mut self) {
        self.shut_down();
    }
}
