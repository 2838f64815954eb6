//! CLIP scores of prompts and images in the model's own CLIP space, and reranking: generate K
//! images per prompt and order them by CLIP similarity to the prompt.

use crate::pipeline::{Generation, StepInfo, TextToImage, Unclip};
use crate::{Error, Result};
use tch::{Device, Kind, Tensor};

/// Reranked images of one run.
#[derive(Debug)]
pub struct Ranked {
    /// The generation, images reordered per prompt from most to least similar.
    pub generation: Generation,
    /// Cosine similarity of each (reordered) image to its prompt.
    pub scores: Vec<f64>,
}

impl Unclip {
    /// The text encoder's CLIP embeddings of `prompts` (N, D), f32 on the CPU.
    pub fn clip_text_embeddings(&self, prompts: &[&str]) -> Result<Tensor> {
        let embeds = self.text_encoder.encode(prompts)?.conditioning.text_embeds;
        Ok(embeds.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?)
    }

    /// The image encoder's CLIP embeddings of `images` ((N, 3, H, W) in [0, 1]) (N, D), f32 on
    /// the CPU. Needs an image encoder in the text encoder's space.
    pub fn clip_image_embeddings(&self, images: &Tensor) -> Result<Tensor> {
        let enc = self.image_encoder.as_deref().ok_or_else(|| {
            Error::Pipeline(
                "CLIP image scores need an image encoder (Unclip::load_image_encoder)".into(),
            )
        })?;
        Ok(enc.embed_tensor(images)?.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?)
    }

    /// Generates `k` images per prompt and returns them ordered by CLIP similarity to their
    /// prompt, best first. Needs an image encoder in the same CLIP space as the text encoder.
    pub fn generate_reranked(
        &mut self,
        req: &TextToImage,
        k: usize,
        progress: &mut dyn FnMut(&StepInfo),
    ) -> Result<Ranked> {
        crate::pipeline::check_count("the rerank count k (images per prompt)", k)?;
        if self.image_encoder.is_none() {
            return Err(Error::Pipeline(
                "reranking needs an image encoder (Unclip::load_image_encoder)".into(),
            ));
        }
        let req = TextToImage { num_images_per_prompt: k, ..req.clone() };
        let g = self.text_to_image(&req, progress)?;
        let prompts: Vec<&str> = req.prompts.iter().map(String::as_str).collect();
        let img = self.clip_image_embeddings(&g.images)?;
        let text =
            self.clip_text_embeddings(&prompts)?.f_repeat_interleave_self_int(k as i64, 0, None)?;
        let sims = Vec::<f64>::try_from(
            Tensor::f_cosine_similarity(&img, &text, 1, 1e-8)?.f_to_kind(Kind::Double)?,
        )?;
        let mut order = Vec::with_capacity(sims.len());
        for p in 0..prompts.len() {
            let mut idx: Vec<usize> = (p * k..(p + 1) * k).collect();
            idx.sort_by(|&a, &b| sims[b].total_cmp(&sims[a]));
            order.extend(idx);
        }
        let index = Tensor::f_from_slice(&order.iter().map(|&i| i as i64).collect::<Vec<_>>())?;
        let pick = |t: &Tensor| t.f_index_select(0, &index.f_to_device(t.device())?);
        let generation = Generation {
            images: pick(&g.images)?,
            image_small: pick(&g.image_small)?,
            image_embeddings: pick(&g.image_embeddings)?,
            source_index: order.iter().map(|&i| g.source_index[i]).collect(),
            candidates: g.candidates,
            decoder_candidates: g.decoder_candidates,
            warnings: g.warnings,
        };
        Ok(Ranked { generation, scores: order.iter().map(|&i| sims[i]).collect() })
    }
}
