//! Data-parallel training through libtorch's own distributed engine, c10d: the same TCPStore
//! rendezvous, Gloo/NCCL process groups and collectives PyTorch DDP runs, reached through a small
//! C++ shim (csrc/) compiled against the libtorch headers. tch has no distributed API of its own.
//!
//! ```no_run
//! # fn step(params: &[tch::Tensor]) -> unclip_dist::Result<()> {
//! use unclip_dist::{GradBuckets, ProcessGroup, DEFAULT_BUCKET_BYTES};
//! let pg = ProcessGroup::from_env()?; // RANK, WORLD_SIZE, MASTER_ADDR, ... (torchrun, Slurm)
//! unclip_dist::broadcast_params(&pg, params, 0)?; // every rank starts from rank 0's weights
//! let mut buckets = GradBuckets::new(params, DEFAULT_BUCKET_BYTES)?;
//! // ... loss.backward() on this rank's shard of the batch ...
//! buckets.all_reduce_mean(&pg, params)?; // gradients averaged over the ranks
//! // ... optimizer step, identical on every rank ...
//! # Ok(()) }
//! ```
//!
//! A dead peer is an error, not a hang: a closed connection fails the collective at once, a peer
//! that stops answering fails it after [`Options::timeout`].

mod buckets;
mod env;
mod error;
mod ffi;
mod launch;
mod pg;

pub use buckets::{DEFAULT_BUCKET_BYTES, GradBuckets, broadcast_params};
pub use env::{DEFAULT_MASTER_PORT, DistEnv, first_slurm_host};
pub use error::{DistError, Result};
pub use launch::{LocalLaunch, WorkerExit, spawn_local};
pub use pg::{Backend, Options, ProcessGroup, ReduceOp};
