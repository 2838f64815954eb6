//! Gradient averaging in buckets: the gradients of many parameters are copied into a few flat
//! buffers of about `bucket_bytes` each, one all-reduce runs per buffer, and the averages are
//! copied back. Far fewer collectives than one per parameter (each has a fixed latency), and the
//! same idea as DDP's reducer, without its overlap of communication with the backward pass.

use tch::{Device, Kind, Tensor};

use crate::error::{DistError, Result};
use crate::pg::{ProcessGroup, ReduceOp};

/// PyTorch DDP's default bucket size.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

#[derive(Debug)]
struct Slot {
    param: usize,
    offset: i64,
    numel: i64,
}

#[derive(Debug)]
struct Bucket {
    flat: Tensor,
    slots: Vec<Slot>,
}

/// The bucket layout of one parameter list, with its flat buffers kept between steps.
///
/// Parameters are taken in the given order (it must be the same on every rank: build the model
/// the same way) and grouped by dtype and device; a parameter larger than a bucket gets its own.
#[derive(Debug)]
pub struct GradBuckets {
    buckets: Vec<Bucket>,
    shapes: Vec<(Vec<i64>, Kind, Device)>,
}

impl GradBuckets {
    /// Plans buckets of at most `bucket_bytes` (except single oversized parameters).
    pub fn new(params: &[Tensor], bucket_bytes: usize) -> Result<Self> {
        if bucket_bytes == 0 {
            return Err(DistError::InvalidArgument(
                "bucket size 0 bytes: expected at least 1".into(),
            ));
        }
        let shapes: Vec<_> = params.iter().map(|p| (p.size(), p.kind(), p.device())).collect();
        // (kind, device, slots, bytes) of the buckets being filled, one open bucket per group.
        let mut open: Vec<(Kind, Device, Vec<Slot>, usize)> = Vec::new();
        let mut done: Vec<(Kind, Device, Vec<Slot>)> = Vec::new();
        for (i, p) in params.iter().enumerate() {
            if !p.defined() {
                return Err(DistError::InvalidArgument(format!("parameter {i} is undefined")));
            }
            let numel = p.numel() as i64;
            let bytes = p.numel() * p.kind().elt_size_in_bytes();
            let (kind, device) = (p.kind(), p.device());
            let idx = match open.iter().position(|b| b.0 == kind && b.1 == device) {
                Some(idx) => idx,
                None => {
                    open.push((kind, device, Vec::new(), 0));
                    open.len() - 1
                }
            };
            if !open[idx].2.is_empty() && open[idx].3 + bytes > bucket_bytes {
                let (k, d, slots, _) =
                    std::mem::replace(&mut open[idx], (kind, device, Vec::new(), 0));
                done.push((k, d, slots));
            }
            let b = &mut open[idx];
            let offset = b.2.last().map_or(0, |s: &Slot| s.offset + s.numel);
            b.2.push(Slot { param: i, offset, numel });
            b.3 += bytes;
        }
        done.extend(open.into_iter().filter(|b| !b.2.is_empty()).map(|(k, d, s, _)| (k, d, s)));
        let buckets = done
            .into_iter()
            .map(|(kind, device, slots)| {
                let len = slots.last().map_or(0, |s| s.offset + s.numel);
                Ok(Bucket { flat: Tensor::f_zeros([len], (kind, device))?, slots })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GradBuckets { buckets, shapes })
    }

    /// Number of buckets (= collectives per step).
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Elements per bucket.
    pub fn bucket_numels(&self) -> Vec<i64> {
        self.buckets.iter().map(|b| b.flat.numel() as i64).collect()
    }

    /// Replaces every parameter's gradient by its mean over the ranks. Every parameter must have a
    /// gradient on every rank (as DDP without `find_unused_parameters`): a missing one is an error
    /// here rather than a silent divergence of the ranks.
    pub fn all_reduce_mean(&mut self, pg: &ProcessGroup, params: &[Tensor]) -> Result<()> {
        self.all_reduce(pg, params, ReduceOp::Mean)
    }

    /// As [`GradBuckets::all_reduce_mean`] with any reduction.
    pub fn all_reduce(&mut self, pg: &ProcessGroup, params: &[Tensor], op: ReduceOp) -> Result<()> {
        if params.len() != self.shapes.len() {
            return Err(DistError::InvalidArgument(format!(
                "{} parameters given, the buckets were planned for {}",
                params.len(),
                self.shapes.len()
            )));
        }
        let mut grads = Vec::with_capacity(params.len());
        for (i, (p, (shape, kind, device))) in params.iter().zip(&self.shapes).enumerate() {
            if p.size() != *shape || p.kind() != *kind || p.device() != *device {
                return Err(DistError::InvalidArgument(format!(
                    "parameter {i} is {:?} {:?} on {:?}, the buckets were planned for {shape:?} {kind:?} on {device:?}",
                    p.size(),
                    p.kind(),
                    p.device()
                )));
            }
            let g = p.grad();
            if !g.defined() {
                return Err(DistError::InvalidArgument(format!(
                    "parameter {i} (shape {shape:?}) has no gradient on rank {}; every parameter \
                     must take part in the loss on every rank",
                    pg.rank()
                )));
            }
            grads.push(g);
        }
        for bucket in &mut self.buckets {
            for s in &bucket.slots {
                bucket
                    .flat
                    .f_narrow(0, s.offset, s.numel)?
                    .f_copy_(&grads[s.param].f_reshape([-1])?)?;
            }
            pg.all_reduce(std::slice::from_mut(&mut bucket.flat), op)?;
            for s in &bucket.slots {
                let g = &mut grads[s.param];
                let src =
                    bucket.flat.f_narrow(0, s.offset, s.numel)?.f_view(g.size().as_slice())?;
                g.f_copy_(&src)?;
            }
        }
        Ok(())
    }
}

/// Broadcasts every tensor from rank `root` (parameters at start or after a resume), so all ranks
/// start from the same weights whatever their own initialisation drew.
pub fn broadcast_params(pg: &ProcessGroup, params: &[Tensor], root: usize) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let mut views: Vec<Tensor> = params.iter().map(Tensor::shallow_clone).collect();
    pg.broadcast(&mut views, root)
}
