//! The error type of the foundation crate; every other crate wraps it.

/// Errors a user can cause: bad device or dtype names, broken checkpoints, bad configs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("io error on {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid device {0:?}: expected cpu, cuda, cuda:N or auto")]
    InvalidDevice(String),
    #[error("CUDA was requested ({requested}) but {reason}")]
    CudaUnavailable { requested: String, reason: String },
    #[error("invalid dtype {0:?}: expected f32, f16 or bf16")]
    InvalidDtype(String),
    #[error("checkpoint {file}: missing tensor(s) {names:?}")]
    MissingTensors { file: String, names: Vec<String> },
    #[error("checkpoint {file}: tensor {name} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch { file: String, name: String, expected: Vec<i64>, found: Vec<i64> },
    #[error("checkpoint {file}: {message}")]
    BadCheckpoint { file: String, message: String },
    #[error("checkpoint {file}: unexpected tensor(s) {names:?}")]
    UnexpectedTensors { file: String, names: Vec<String> },
    #[error("config {path}: {message}")]
    Config { path: String, message: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Installing a folder ([`crate::fsutil::install_dir`]) was refused or failed.
    #[error("install {path}: {message}")]
    Install { path: std::path::PathBuf, message: String },
    #[error("{what} would need {needed} of memory ({available})")]
    TooLarge { what: String, needed: String, available: String },
    #[error("could not allocate {what}: {message}")]
    Allocation { what: String, message: String },
    #[error("{path}: {found}")]
    NotRegular { path: std::path::PathBuf, found: String },
    #[error("training checkpoint {path}: {message}")]
    Checkpoint { path: String, message: String },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an io error with the path it happened on.
    pub fn io(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tch_errors_convert() {
        // A shape error raised inside libtorch comes back as a value, not an abort.
        let a = tch::Tensor::zeros([2, 3], (tch::Kind::Float, tch::Device::Cpu));
        let b = tch::Tensor::zeros([4, 5], (tch::Kind::Float, tch::Device::Cpu));
        let err: Error = a.f_matmul(&b).unwrap_err().into();
        assert!(matches!(err, Error::Torch(_)));
        assert!(err.to_string().starts_with("libtorch:"));
    }

    #[test]
    fn messages_name_the_tensor() {
        let e = Error::ShapeMismatch {
            file: "decoder.safetensors".into(),
            name: "conv_in.weight".into(),
            expected: vec![320, 3, 3, 3],
            found: vec![320, 6, 3, 3],
        };
        let s = e.to_string();
        assert!(
            s.contains("conv_in.weight")
                && s.contains("[320, 3, 3, 3]")
                && s.contains("[320, 6, 3, 3]")
        );
    }
}
