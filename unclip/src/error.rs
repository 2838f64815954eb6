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
    /// A sampling loop's latents became NaN or infinite (broken weights, an extreme guidance
    /// scale...): the run stops instead of returning garbage images.
    #[error(
        "the {stage} stage produced non-finite values (NaN or inf) at step {step} of {total}; \
         its weights, inputs or settings are broken"
    )]
    NonFinite { stage: crate::pipeline::Stage, step: usize, total: usize },
    /// A Hugging Face repo id that is neither a folder nor in the local hub cache.
    #[error("{}", model_not_found(id, folder, cache.as_deref(), download.as_deref()))]
    ModelNotFound {
        id: String,
        /// The folder looked at (the id as a path from the current directory).
        folder: std::path::PathBuf,
        /// The hub cache folder looked at (`<cache>/models--org--name`).
        cache: Option<std::path::PathBuf>,
        /// Why downloading failed (with the `hub` feature), or why there is no cache.
        download: Option<String>,
    },
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
}

fn model_not_found(
    id: &str,
    folder: &std::path::Path,
    cache: Option<&std::path::Path>,
    download: Option<&str>,
) -> String {
    let cache = cache.map_or("no Hugging Face hub cache".into(), |c| {
        format!("no snapshot in the Hugging Face hub cache at {}", c.display())
    });
    let fix = match download {
        Some(why) => format!("; downloading failed: {why}"),
        None => format!(
            ". Download it (`huggingface-cli download {id}`; the cache is HF_HUB_CACHE, else \
             HF_HOME/hub, else ~/.cache/huggingface/hub), pass its folder, or build unclip with \
             the `hub` feature to download it"
        ),
    };
    format!("model {id:?} not found: no folder {}, and {cache}{fix}", folder.display())
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
