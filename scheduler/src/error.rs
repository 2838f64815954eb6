//! Errors of the scheduler crate.

/// Everything a user of this crate can get wrong, plus errors from libtorch and the foundation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] unclip_core::Error),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("invalid scheduler config: {0}")]
    Config(String),
    #[error("invalid number of inference steps {steps}: {reason}")]
    Steps { steps: usize, reason: String },
    #[error("timestep {0} is not in the schedule")]
    TimestepNotInSchedule(i64),
    #[error("shape mismatch: {what}: expected {expected:?}, found {found:?}")]
    Shape { what: String, expected: Vec<i64>, found: Vec<i64> },
    #[error("set_timesteps must be called before step")]
    NotInitialized,
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_errors_convert() {
        let t = tch::Tensor::zeros([2, 3], (tch::Kind::Float, tch::Device::Cpu));
        let e: Error = t.f_view([7]).unwrap_err().into();
        assert!(matches!(e, Error::Torch(_)));
        let e: Error = unclip_core::parse_device("abacus").unwrap_err().into();
        assert!(matches!(e, Error::Core(unclip_core::Error::InvalidDevice(_))));
    }
}
