//! Errors of the unclip crate.

/// Everything a user of this crate can get wrong, plus errors from libtorch and the foundation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] unclip_core::Error),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Scheduler(#[from] unclip_scheduler::Error),
    #[error(transparent)]
    Clip(#[from] unclip_clip::Error),
    #[error(transparent)]
    Prior(#[from] unclip_prior::Error),
    #[error(transparent)]
    Decoder(#[from] unclip_decoder::Error),
    #[error("{0}")]
    Pipeline(String),
    /// A folder that is not a (complete) unCLIP checkpoint: every problem found.
    #[error("{} is not a usable unCLIP checkpoint:\n  - {}", dir.display(), problems.join("\n  - "))]
    Checkpoint { dir: std::path::PathBuf, problems: Vec<String> },
    /// A component that failed to load (missing/misshapen tensors, bad config...).
    #[error("component {name} ({}): {source}", dir.display())]
    Component { name: String, dir: std::path::PathBuf, source: Box<Error> },
    #[error("image {path}: {reason}")]
    Image { path: String, reason: String },
    #[error("invalid input: {0}")]
    Input(String),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
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
