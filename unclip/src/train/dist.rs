//! Data-parallel training of a stage over several processes (torchrun, Slurm or `train --nproc`)
//! through unclip-dist's c10d process group: parameters broadcast from rank 0 at the start and
//! after a resume, each rank trains on its shard of the data (`batch_size` is the global batch,
//! split evenly over the ranks), gradients and loss averaged in buckets after every backward pass
//! (before clipping and the optimizer), so AdamW and the EMA move identically everywhere; rank 0
//! alone writes checkpoints, logs, pictures and exports.

use super::{Result, TrainError};
use std::rc::Rc;
use tch::{Kind, Tensor, nn::VarStore};
use unclip_core::train::{DataParallel, GradSync};
use unclip_dist::{DEFAULT_BUCKET_BYTES, GradBuckets, ProcessGroup};

/// The stages that can train data-parallel.
pub const DATA_PARALLEL_STAGES: &[&str] = &["prior", "decoder"];

/// This process's place in a data-parallel run.
#[derive(Debug, Clone)]
pub struct Dist {
    pg: Rc<ProcessGroup>,
}

impl Dist {
    pub fn new(pg: ProcessGroup) -> Self {
        Self { pg: Rc::new(pg) }
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
