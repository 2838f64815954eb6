//! The safe face of c10d: a process group over Gloo or NCCL and its collectives.

use std::path::Path;
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use crate::env::DistEnv;
use crate::error::{DistError, Result};
use crate::ffi;

/// c10d's communication backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors, any machine (always compiled in).
    Gloo,
    /// CUDA tensors, one GPU per rank (compiled in when libtorch_cuda was found at build time).
    Nccl,
}

impl Backend {
    /// The backend PyTorch picks for tensors on `device`: NCCL for CUDA, Gloo otherwise.
    pub fn for_device(device: Device) -> Self {
        if device.is_cuda() { Backend::Nccl } else { Backend::Gloo }
    }

    /// Whether this build can create the backend.
    pub fn available(self) -> bool {
        match self {
            Backend::Gloo => true,
            Backend::Nccl => ffi::has_nccl(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = DistError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "gloo" => Ok(Backend::Gloo),
            "nccl" => Ok(Backend::Nccl),
            _ => Err(DistError::InvalidArgument(format!("backend {s:?}: expected gloo or nccl"))),
        }
    }
}

/// How a process group is created.
#[derive(Debug, Clone)]
pub struct Options {
    pub backend: Backend,
    /// Rendezvous and per-collective timeout: a peer that neither answers nor closes its socket
    /// within it turns the collective into an error (c10d's own timeout; PyTorch's default is 30
    /// minutes). NCCL enforces it with its watchdog, which by default ends the process.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options { backend: Backend::Gloo, timeout: Duration::from_secs(30 * 60) }
    }
}

/// A reduction of [`ProcessGroup::all_reduce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum divided by the world size (NCCL natively; Gloo sums and divides).
    Mean,
    Min,
    Max,
}

impl ReduceOp {
    fn raw(self) -> i32 {
        match self {
            ReduceOp::Sum => ffi::SUM,
            ReduceOp::Mean => ffi::AVG,
            ReduceOp::Min => ffi::MIN,
            ReduceOp::Max => ffi::MAX,
        }
    }
}

/// One rank's membership in a group of `world_size` processes, through libtorch's c10d.
///
/// Every collective blocks until done (or failed) and must be called by every rank in the same
/// order with tensors of the same shapes and dtypes.
pub struct ProcessGroup {
    handle: ffi::PgHandle,
    rank: usize,
    world_size: usize,
    local_rank: usize,
    backend: Backend,
    timeout: Duration,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("local_rank", &self.local_rank)
            .field("backend", &self.backend)
            .finish()
    }
}

impl ProcessGroup {
    /// Joins the job described by the environment (torchrun/Slurm variables, see
    /// [`DistEnv::from_env`]) with Gloo and the default timeout.
    pub fn from_env() -> Result<Self> {
        Self::init(&DistEnv::from_env()?, &Options::default())
    }

    /// Rendezvous through a TCPStore served by rank 0 at `env.master_addr:env.master_port`.
    pub fn init(env: &DistEnv, opts: &Options) -> Result<Self> {
        check_world(env.rank, env.world_size)?;
        let at = format!("{}:{}", env.master_addr, env.master_port);
        let (store, _port) = ffi::tcp_store(
            &env.master_addr,
            env.master_port,
            env.rank == 0 && !env.agent_store,
            to_i32(env.world_size)?,
            timeout_ms(opts.timeout)?,
        )
        .map_err(|message| DistError::Rendezvous {
            at,
            rank: env.rank,
            world_size: env.world_size,
            message,
        })?;
        // Gloo binds to this machine's hostname unless the job is on loopback (or
        // GLOO_SOCKET_IFNAME says otherwise, which c10d reads itself).
        let loopback = matches!(env.master_addr.as_str(), "127.0.0.1" | "localhost" | "::1");
        let hostname =
            (loopback && std::env::var_os("GLOO_SOCKET_IFNAME").is_none()).then_some("127.0.0.1");
        Self::with_store(&store, env.rank, env.world_size, env.local_rank, opts, hostname)
    }

    /// Rendezvous through a FileStore: a file every rank can reach (a shared file system for
    /// several machines). The file must not be left over from an earlier job.
    pub fn init_file(
        path: &Path,
        rank: usize,
        world_size: usize,
        local_rank: usize,
        opts: &Options,
    ) -> Result<Self> {
        check_world(rank, world_size)?;
        let at = path.display().to_string();
        let store = ffi::file_store(&at, to_i32(world_size)?, timeout_ms(opts.timeout)?)
            .map_err(|message| DistError::Rendezvous { at, rank, world_size, message })?;
        Self::with_store(&store, rank, world_size, local_rank, opts, None)
    }

    fn with_store(
        store: &ffi::StoreHandle,
        rank: usize,
        world_size: usize,
        local_rank: usize,
        opts: &Options,
        hostname: Option<&str>,
    ) -> Result<Self> {
        let backend = opts.backend;
        if !backend.available() {
            return Err(DistError::NcclUnavailable);
        }
        let args = ffi::PgArgs {
            backend: match backend {
                Backend::Gloo => ffi::GLOO,
                Backend::Nccl => ffi::NCCL,
            },
            rank: to_i32(rank)?,
            world_size: to_i32(world_size)?,
            timeout_ms: timeout_ms(opts.timeout)?,
            device_index: match backend {
                Backend::Gloo => -1,
                Backend::Nccl => to_i32(local_rank)?,
            },
            hostname,
        };
        let handle = ffi::process_group(store, &args).map_err(|message| DistError::Init {
            backend: backend.name(),
            rank,
            world_size,
            message,
        })?;
        Ok(ProcessGroup { handle, rank, world_size, local_rank, backend, timeout: opts.timeout })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Rank 0: the one that writes checkpoints, logs and exports.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Where this rank's tensors live: `cuda:LOCAL_RANK` for NCCL, the CPU for Gloo.
    pub fn device(&self) -> Device {
        match self.backend {
            Backend::Gloo => Device::Cpu,
            Backend::Nccl => Device::Cuda(self.local_rank),
        }
    }

    /// In-place reduction of each tensor across ranks (one collective per tensor; see
    /// [`crate::GradBuckets`] for many small tensors).
    pub fn all_reduce(&self, tensors: &mut [Tensor], op: ReduceOp) -> Result<()> {
        for (i, t) in tensors.iter_mut().enumerate() {
            self.check_tensor("all_reduce", i, t)?;
            if op == ReduceOp::Mean && !t.is_floating_point() {
                return Err(DistError::BadTensor {
                    op: "all_reduce",
                    index: i,
                    problem: format!("a mean needs a floating-point tensor, got {:?}", t.kind()),
                });
            }
            self.handle
                .all_reduce(t, op.raw())
                .map_err(|m| self.collective_err("all_reduce", m))?;
        }
        Ok(())
    }

    /// Sums each tensor over the ranks, in place.
    pub fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()> {
        self.all_reduce(tensors, ReduceOp::Sum)
    }

    /// Averages each tensor over the ranks, in place.
    pub fn all_reduce_mean(&self, tensors: &mut [Tensor]) -> Result<()> {
        self.all_reduce(tensors, ReduceOp::Mean)
    }

    /// Overwrites each tensor with rank `root`'s values (e.g. parameters at start and resume).
    pub fn broadcast(&self, tensors: &mut [Tensor], root: usize) -> Result<()> {
        if root >= self.world_size {
            return Err(DistError::InvalidArgument(format!(
                "broadcast root {root}: expected a rank below the world size {}",
                self.world_size
            )));
        }
        for (i, t) in tensors.iter_mut().enumerate() {
            self.check_tensor("broadcast", i, t)?;
            self.handle
                .broadcast(t, root as i32)
                .map_err(|m| self.collective_err("broadcast", m))?;
        }
        Ok(())
    }

    /// Every rank's `input`, in rank order (all inputs must share shape and dtype).
    pub fn all_gather(&self, input: &Tensor) -> Result<Vec<Tensor>> {
        self.check_tensor("all_gather", 0, input)?;
        let mut outputs = (0..self.world_size)
            .map(|_| input.f_empty_like())
            .collect::<std::result::Result<Vec<_>, _>>()?;
        self.handle
            .all_gather(&mut outputs, input)
            .map_err(|m| self.collective_err("all_gather", m))?;
        Ok(outputs)
    }

    /// Waits until every rank got here.
    pub fn barrier(&self) -> Result<()> {
        self.handle.barrier().map_err(|m| self.collective_err("barrier", m))
    }

    fn check_tensor(&self, op: &'static str, index: usize, t: &Tensor) -> Result<()> {
        let bad = |problem: String| DistError::BadTensor { op, index, problem };
        if !t.defined() {
            return Err(bad("undefined tensor".into()));
        }
        if !t.is_contiguous() {
            return Err(bad(format!(
                "not contiguous (shape {:?}); call .contiguous() first",
                t.size()
            )));
        }
        if t.is_sparse() {
            return Err(bad("sparse tensors are not supported".into()));
        }
        if t.kind() == Kind::ComplexFloat || t.kind() == Kind::ComplexDouble {
            return Err(bad(format!("{:?} is not supported", t.kind())));
        }
        match (self.backend, t.device()) {
            (Backend::Nccl, Device::Cuda(_)) | (Backend::Gloo, Device::Cpu) => Ok(()),
            (backend, device) => Err(bad(format!(
                "on {device:?}, but the {} group works on {:?}",
                backend.name(),
                self.device()
            ))),
        }
    }

    fn collective_err(&self, op: &'static str, message: String) -> DistError {
        DistError::Collective {
            op,
            backend: self.backend.name(),
            rank: self.rank,
            world_size: self.world_size,
            timeout: self.timeout,
            message,
        }
    }
}

fn check_world(rank: usize, world_size: usize) -> Result<()> {
    if world_size == 0 || rank >= world_size {
        return Err(DistError::InvalidArgument(format!(
            "rank {rank} of world size {world_size}: expected 0 <= rank < world size"
        )));
    }
    Ok(())
}

fn to_i32(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| DistError::InvalidArgument(format!("{v} does not fit c10d's int")))
}

fn timeout_ms(t: Duration) -> Result<i64> {
    let ms = i64::try_from(t.as_millis()).unwrap_or(i64::MAX);
    if ms <= 0 {
        return Err(DistError::InvalidArgument(format!("timeout {t:?}: expected at least 1 ms")));
    }
    Ok(ms)
}
