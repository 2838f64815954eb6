//! Data-parallel training of a stage over several processes (torchrun, Slurm or `train --nproc`)
//! through unclip-dist's c10d process group: parameters broadcast from rank 0 at the start and
//! after a resume, each rank trains on its shard of the data (`batch_size` is the global batch,
//! split evenly over the ranks), gradients and loss averaged in buckets after every backward pass
//! (before clipping and the optimizer), so AdamW and the EMA move identically everywhere; rank 0
//! alone writes checkpoints, logs, pictures and exports.
//!
//! Draws. By default each rank seeds its steps apart (rank 0 as a run of one) and draws the noise,
//! timesteps, dropout and crops of its own items. With [`Dist::with_global_draws`] every rank
//! draws those of the whole global batch from the step's shared seed and keeps the rows of its
//! items ([`StepNoise`]), so the run trains what one process with the global batch would, up to
//! the order of float sums: the check that the averaging is right, at world-size times the
//! drawing work.
//!
//! CLIP's contrastive loss needs the whole global batch (every caption against every image):
//! [`Dist::gather_global`] all-gathers the features as open_clip does.

use super::{Result, TrainError};
use std::rc::Rc;
use tch::{Kind, Tensor, nn::VarStore};
use unclip_core::train::{DataParallel, GradSync};
use unclip_dist::{DEFAULT_BUCKET_BYTES, GradBuckets, ProcessGroup};
use unclip_scheduler::{NoiseSource, TorchNoise};

/// The stages that can train data-parallel.
pub const DATA_PARALLEL_STAGES: &[&str] = &["clip", "prior", "decoder", "upsampler", "upsampler2"];

/// This process's place in a data-parallel run.
#[derive(Debug, Clone)]
pub struct Dist {
    pg: Rc<ProcessGroup>,
    global_draws: bool,
}

impl Dist {
    pub fn new(pg: ProcessGroup) -> Self {
        Self { pg: Rc::new(pg), global_draws: false }
    }

    /// Every rank draws the random numbers of the whole global batch and keeps its items' rows
    /// (see the module documentation): the run then matches one process on the global batch.
    /// Every rank of a run, and a resumed run, must use the same setting.
    pub fn with_global_draws(mut self, on: bool) -> Self {
        self.global_draws = on;
        self
    }

    pub fn global_draws(&self) -> bool {
        self.global_draws
    }

    /// Called after the loop seeded step `step`: with global draws every rank reseeds as a run
    /// of one process does (the loop seeds the ranks apart).
    pub(crate) fn seed_step(&self, seed: u64, step: u64) {
        if self.global_draws {
            unclip_core::train::seed_step(seed, step);
        }
    }

    /// The noise source of this rank's training step (see [`StepNoise`]); plain draws while
    /// autograd is off, so rank 0's held-out loss draws what a run of one process does.
    pub(crate) fn noise(&self) -> StepNoise {
        let global = self.global_draws && grad_enabled();
        StepNoise { rows: global.then_some((self.rank() as i64, self.world_size() as i64)) }
    }

    /// The global batch of `local` (this rank's `(B, ..)` rows, e.g. CLIP features): every
    /// rank's rows in rank order, this rank's own carrying their gradient (the gathered ones
    /// carry none), times the world size. Each rank then computes the loss of the whole global
    /// batch; the gradients it sends back reach only its own rows, so their sum over the ranks
    /// is the global loss's gradient and the buckets' mean, with the factor, equals it. Terms
    /// of the loss that do not go through the features (CLIP's temperature) get the same
    /// gradient on every rank, unscaled, and so the right mean too.
    pub fn gather_global(&self, stage: &str, local: &Tensor) -> Result<Tensor> {
        let detached = local.f_detach()?.f_contiguous()?;
        let mut all = self.pg.all_gather(&detached).map_err(|e| dist_err(stage, e))?;
        // Same value as `local` exactly (the difference is zero); gradient times the world size.
        let scaled =
            detached.f_add(&local.f_sub(&detached)?.f_mul_scalar(self.world_size() as f64)?)?;
        all[self.rank()] = scaled;
        Ok(Tensor::f_cat(&all, 0)?)
    }

    pub fn rank(&self) -> usize {
        self.pg.rank()
    }

    pub fn world_size(&self) -> usize {
        self.pg.world_size()
    }

    pub fn process_group(&self) -> &ProcessGroup {
        &self.pg
    }

    pub(crate) fn barrier(&self, stage: &str) -> Result<()> {
        self.pg.barrier().map_err(|e| dist_err(stage, e))
    }

    /// This rank's share of the global batch `batch` (it must split evenly).
    pub(crate) fn per_rank_batch(&self, stage: &str, batch: usize) -> Result<usize> {
        let w = self.world_size();
        if batch % w != 0 || batch < w {
            return Err(TrainError::stage(
                stage,
                format!(
                    "{stage}.train.batch_size = {batch} does not split over {w} processes: the \
                     batch size is the global batch of a data-parallel run, expected a multiple of {w}"
                ),
            ));
        }
        Ok(batch / w)
    }

    /// Rank 0's values of the trainable variables, on every rank.
    pub(crate) fn broadcast(&self, stage: &str, vs: &VarStore) -> Result<()> {
        let params: Vec<Tensor> = trainable(vs).into_iter().map(|(_, t)| t).collect();
        unclip_dist::broadcast_params(&self.pg, &params, 0).map_err(|e| dist_err(stage, e))
    }

    /// Fails unless every rank resumed at the same step (they read one run folder).
    pub(crate) fn check_same(&self, stage: &str, what: &str, value: u64) -> Result<()> {
        let t = Tensor::from_slice(&[value as i64]);
        let all = self.pg.all_gather(&t).map_err(|e| dist_err(stage, e))?;
        let values: Vec<i64> =
            all.iter().map(|t| t.f_int64_value(&[0])).collect::<std::result::Result<_, _>>()?;
        if values.iter().any(|v| *v != values[0]) {
            return Err(TrainError::stage(
                stage,
                format!(
                    "the ranks disagree on the {what}: {values:?} (rank order); every rank must \
                     see the same run folder"
                ),
            ));
        }
        Ok(())
    }

    /// The loop's part of a data-parallel step for the model in `vs`.
    pub fn data_parallel(&self, stage: &str, vs: &VarStore) -> Result<DataParallel> {
        let params: Vec<Tensor> = trainable(vs).into_iter().map(|(_, t)| t).collect();
        let mut buckets =
            GradBuckets::new(&params, DEFAULT_BUCKET_BYTES).map_err(|e| dist_err(stage, e))?;
        let pg = self.pg.clone();
        let stage = stage.to_string();
        let sync: Box<GradSync> = Box::new(move |loss: f64| {
            let core = |e: unclip_dist::DistError| {
                unclip_core::Error::InvalidArgument(format!("{stage}: data-parallel step: {e}"))
            };
            buckets.all_reduce_mean(&pg, &params).map_err(core)?;
            let mut l = [Tensor::from_slice(&[loss])];
            pg.all_reduce_mean(&mut l).map_err(core)?;
            Ok(l[0].f_double_value(&[0])?)
        });
        Ok(DataParallel { rank: self.rank(), sync })
    }

    /// Fails unless every rank holds bit-identical trainable variables; returns their digest.
    pub(crate) fn check_identical(&self, stage: &str, vs: &VarStore) -> Result<u64> {
        let digest = digest(vs)?;
        // Two halves, so the u64 survives a trip through int64 without loss of meaning.
        let t = Tensor::from_slice(&[(digest >> 32) as i64, (digest & 0xffff_ffff) as i64]);
        let all = self.pg.all_gather(&t).map_err(|e| dist_err(stage, e))?;
        let mut digests = Vec::new();
        for t in &all {
            let v: Vec<i64> = Vec::try_from(t)?;
            digests.push(((v[0] as u64) << 32) | v[1] as u64);
        }
        if digests.iter().any(|d| *d != digest) {
            return Err(TrainError::stage(
                stage,
                format!("the ranks' parameters diverged: digests {digests:x?} (rank order)"),
            ));
        }
        Ok(digest)
    }
}

/// Noise for a training step: plain [`TorchNoise`], or with global draws (`rows = (rank,
/// world)`) each draw made for the whole global batch (its first dimension times the world
/// size) and cut to this rank's rows. The loader gives rank `r` of `w` the items at positions
/// `r, r + w, r + 2w, ...` of the global batch, so its rows are every `w`-th from `r`. Every
/// draw of the stages' losses is per item along the first dimension.
pub(crate) struct StepNoise {
    rows: Option<(i64, i64)>,
}

impl StepNoise {
    /// A run of one process: libtorch's generator as the loop seeded it.
    pub(crate) fn single() -> Self {
        Self { rows: None }
    }

    fn global_shape(&self, shape: &[i64]) -> Option<(Vec<i64>, i64, i64)> {
        let (rank, world) = self.rows?;
        let (first, rest) = shape.split_first()?;
        let mut global = vec![first * world];
        global.extend_from_slice(rest);
        Some((global, rank, world))
    }

    fn own_rows(t: Tensor, rank: i64, world: i64) -> Tensor {
        let n = t.size()[0];
        t.slice(0, rank, n, world).contiguous()
    }
}

impl NoiseSource for StepNoise {
    fn randn(&mut self, shape: &[i64], kind: Kind, device: tch::Device) -> Tensor {
        match self.global_shape(shape) {
            Some((g, rank, world)) => {
                let all = TorchNoise::unseeded().randn(&g, Kind::Float, tch::Device::Cpu);
                Self::own_rows(all, rank, world).to_device(device).to_kind(kind)
            }
            None => TorchNoise::unseeded().randn(shape, kind, device),
        }
    }

    fn randint(&mut self, high: i64, shape: &[i64], device: tch::Device) -> Tensor {
        match self.global_shape(shape) {
            Some((g, rank, world)) => {
                let all = TorchNoise::unseeded().randint(high, &g, tch::Device::Cpu);
                Self::own_rows(all, rank, world).to_device(device)
            }
            None => TorchNoise::unseeded().randint(high, shape, device),
        }
    }
}

/// Whether autograd records (false inside `tch::no_grad`): tch does not expose the mode, but an
/// operation on a tensor that requires gradients yields one only while it records.
fn grad_enabled() -> bool {
    let probe = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    (&probe * 1.0).requires_grad()
}

/// The noise of a training step for `dist` (or a run of one process).
pub(crate) fn step_noise(dist: Option<&Dist>) -> StepNoise {
    dist.map_or_else(StepNoise::single, Dist::noise)
}

/// Trainable variables sorted by name: the same order on every rank.
fn trainable(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> =
        vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// FNV-1a over the bytes of every trainable variable (name order).
fn digest(vs: &VarStore) -> Result<u64> {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for (name, t) in trainable(vs) {
        let flat = t.f_detach()?.f_to_kind(Kind::Float)?.f_reshape([-1])?;
        let values: Vec<f32> = Vec::try_from(&flat)?;
        for b in name.bytes().chain(values.iter().flat_map(|v| v.to_bits().to_le_bytes())) {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    Ok(h)
}

fn dist_err(stage: &str, e: unclip_dist::DistError) -> TrainError {
    TrainError::stage(stage, format!("data-parallel: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// With global draws rank `r` of `w` gets rows `r, r + w, ...` of what one process draws
    /// for the whole batch from the same seed: the rows of its items in the loader's order.
    #[test]
    fn global_draws_are_the_ranks_rows_of_one_process_draws() {
        let _lock = unclip_scheduler::global_rng_lock();
        let whole = |seed: i64| {
            tch::manual_seed(seed);
            let mut one = StepNoise::single();
            (one.randn(&[6, 2, 3], Kind::Float, Device::Cpu), one.randint(1000, &[6], Device::Cpu))
        };
        let (n, t) = whole(4);
        for rank in 0..3i64 {
            tch::manual_seed(4);
            let mut own = StepNoise { rows: Some((rank, 3)) };
            let a = own.randn(&[2, 2, 3], Kind::Float, Device::Cpu);
            let b = own.randint(1000, &[2], Device::Cpu);
            assert!(a.equal(&n.slice(0, rank, 6, 3)), "rank {rank}: noise");
            assert!(b.equal(&t.slice(0, rank, 6, 3)), "rank {rank}: integers");
        }
        // A draw without a batch dimension is the same on every rank, as in one process.
        tch::manual_seed(9);
        let s1 = StepNoise::single().randn(&[], Kind::Float, Device::Cpu);
        tch::manual_seed(9);
        let s2 = StepNoise { rows: Some((1, 2)) }.randn(&[], Kind::Float, Device::Cpu);
        assert!(s1.equal(&s2));
    }

    #[test]
    fn grad_mode_is_seen() {
        assert!(grad_enabled());
        assert!(!tch::no_grad(grad_enabled));
        assert!(grad_enabled());
    }
}
