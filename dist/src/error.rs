//! The error type of unclip-dist.

use std::time::Duration;

/// Everything that can go wrong in rendezvous, collectives or launching workers.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A launcher variable is missing, unparsable or inconsistent.
    #[error("environment variable {name}: {problem}")]
    Env { name: String, problem: String },
    /// The TCPStore/FileStore could not be reached or created (includes rendezvous timeouts).
    #[error("rendezvous at {at} (rank {rank} of {world_size}) failed: {message}")]
    Rendezvous { at: String, rank: usize, world_size: usize, message: String },
    /// The process group could not be created.
    #[error("creating the {backend} process group (rank {rank} of {world_size}) failed: {message}")]
    Init { backend: &'static str, rank: usize, world_size: usize, message: String },
    /// A collective failed inside c10d: a peer died or left, or the timeout passed.
    #[error(
        "{op} on rank {rank} of {world_size} ({backend}, timeout {timeout:?}) failed: {message}"
    )]
    Collective {
        op: &'static str,
        backend: &'static str,
        rank: usize,
        world_size: usize,
        timeout: Duration,
        message: String,
    },
    /// A tensor handed to a collective does not fit it (caught before calling c10d).
    #[error("{op}: tensor {index}: {problem}")]
    BadTensor { op: &'static str, index: usize, problem: String },
    /// A caller argument is out of range (root rank, bucket size, parameter list...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The NCCL backend was asked for but is not in this build.
    #[error(
        "the NCCL backend is not compiled into this build of unclip-dist (it needs libtorch with \
         libtorch_cuda and the CUDA/NCCL headers at build time; see dist/build.rs)"
    )]
    NcclUnavailable,
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A local worker could not be started.
    #[error("starting local worker {rank} ({program}): {source}")]
    Spawn {
        rank: usize,
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// A local worker ended badly (the others were stopped).
    #[error("local worker {rank} of {nproc} {status}")]
    WorkerFailed { rank: usize, nproc: usize, status: String },
    #[error("launcher io error: {0}")]
    Io(#[from] std::io::Error),
}

/// `Result` with [`DistError`].
pub type Result<T> = std::result::Result<T, DistError>;
