//! unCLIP text-to-image on libtorch: the facade over the stage crates.
//!
//! ```text
//! prompt --clip--> text embedding --prior--> image embedding --decoder--> 64 px --upsamplers--> 256 px
//! ```
//!
//! The stage crates are re-exported: [`clip`], [`prior`], [`decoder`], [`scheduler`], [`core`].

pub mod error;
pub mod shapes;

pub use error::{Error, Result};
pub use unclip_clip as clip;
pub use unclip_core as core;
pub use unclip_core::tch;
pub use unclip_decoder as decoder;
pub use unclip_prior as prior;
pub use unclip_scheduler as scheduler;
