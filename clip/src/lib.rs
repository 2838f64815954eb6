//! CLIP text and vision encoders, CLIP's BPE tokenizer, preprocessing and contrastive training; transformers-compatible weights.
//!
//! - [`config`]: transformers' `config.json` in its three CLIP layouts;
//! - [`encoder`]: the pre-LN transformer layer both towers share;
//! - [`text`] / [`vision`]: the towers, named as the checkpoints name their tensors;
//! - [`model`]: [`ClipModel`] (either tower or both), similarity and zero-shot classification;
//! - [`tokenizer`]: CLIP's BPE tokenizer, identical ids to transformers' `CLIPTokenizer`;
//! - [`preprocess`]: `CLIPImageProcessor` (PIL's bicubic resize, crop, normalize);
//! - [`train`]: the contrastive loss and an optimizer step;
//! - [`pipeline`]: a checkpoint folder as model + tokenizer + processor.
//!
//! Loading Karlo's text encoder (a `CLIPTextModelWithProjection` folder) and encoding a prompt:
//!
//! ```no_run
//! use unclip_clip::{ClipModel, ClipTokenizer, Towers, Truncation};
//! use tch::{Device, Kind};
//! # fn main() -> unclip_clip::Result<()> {
//! let karlo = std::path::Path::new("karlo-v1-alpha");
//! let model = ClipModel::load(&karlo.join("text_encoder"), Towers::Text, Device::Cpu, Kind::Float)?;
//! let tok = ClipTokenizer::from_dir(&karlo.join("tokenizer"))?;
//! let enc = tok.encode_batch(&["a red circle to the left of a blue square"], Truncation::Truncate, Device::Cpu)?;
//! assert!(!enc.truncated[0]);
//! let out = tch::no_grad(|| model.encode_text(&enc.input_ids, Some(&enc.attention_mask)))?;
//! println!("{:?} {:?}", out.text_embeds.size(), out.last_hidden_state.size()); // [1, 768] [1, 77, 768]
//! # Ok(())
//! # }
//! ```

pub mod config;
pub mod encoder;
pub mod error;
pub mod model;
pub mod pipeline;
pub mod preprocess;
pub mod text;
pub mod tokenizer;
pub mod train;
pub mod vision;

pub use config::{AnyConfig, ClipConfig, TextConfig, VisionConfig};
pub use error::{Error, Result};
/// Re-exported so users open images with the same `image` version.
pub use image;
pub use model::{ClipModel, ClipOutput, Towers, normalize, similarity};
pub use pipeline::{ClipPipeline, LabelScore};
pub use preprocess::{ImageProcessor, ProcessorConfig};
pub use tokenizer::{ClipTokenizer, Encoding, Truncation};
pub use train::{ClipTrainer, TrainConfig, contrastive_loss};
