//! What the prior is conditioned on: the CLIP text encoder's outputs for a batch of prompts.

use crate::{Error, PriorConfig, Result};
use tch::{Kind, Tensor};

/// CLIP text outputs for B prompts: `text_embeds` (B, E') (the projected pooled embedding),
/// `hidden_states` (B, N, E) (the last hidden states) and `mask` (B, N) (true/1 = real token).
/// The unconditional branch of guidance and the dropped rows in training are the empty prompt's
/// conditioning.
#[derive(Debug)]
pub struct TextConditioning {
    pub text_embeds: Tensor,
    pub hidden_states: Tensor,
    pub mask: Tensor,
}

impl Clone for TextConditioning {
    fn clone(&self) -> Self {
        Self {
            text_embeds: self.text_embeds.shallow_clone(),
            hidden_states: self.hidden_states.shallow_clone(),
            mask: self.mask.shallow_clone(),
        }
    }
}

impl TextConditioning {
    /// Checks that the three tensors agree with each other (batch, token count) and are 2-D/3-D.
    pub fn new(text_embeds: Tensor, hidden_states: Tensor, mask: Tensor) -> Result<Self> {
        let (e, h, m) = (text_embeds.size(), hidden_states.size(), mask.size());
        if e.len() != 2 || h.len() != 3 || m.len() != 2 {
            return Err(Error::Input(format!(
                "text conditioning must be embeds (B, E), hidden states (B, N, E) and mask (B, N); \
                 got {e:?}, {h:?}, {m:?}"
            )));
        }
        if e[0] != h[0] || e[0] != m[0] {
            return Err(Error::Input(format!(
                "text conditioning batch sizes differ: embeds {}, hidden states {}, mask {}",
                e[0], h[0], m[0]
            )));
        }
        if h[1] != m[1] {
            return Err(Error::Input(format!(
                "text mask has {} tokens but the hidden states have {}",
                m[1], h[1]
            )));
        }
        if e[0] == 0 {
            return Err(Error::Input("text conditioning has an empty batch".into()));
        }
        let mask = if mask.kind() == Kind::Bool { mask } else { mask.f_ne(0)? };
        Ok(Self { text_embeds, hidden_states, mask })
    }

    /// Number of prompts.
    pub fn batch(&self) -> i64 {
        self.text_embeds.size()[0]
    }

    /// Checks the sizes against a prior's config.
    pub fn check(&self, cfg: &PriorConfig) -> Result<()> {
        let (e, h) = (self.text_embeds.size(), self.hidden_states.size());
        if e[1] != cfg.embedding_proj_dim() {
            return Err(Error::Input(format!(
                "text embeddings have size {}, the prior expects {}",
                e[1],
                cfg.embedding_proj_dim()
            )));
        }
        if h[1] != cfg.num_embeddings || h[2] != cfg.embedding_dim {
            return Err(Error::Input(format!(
                "text hidden states are ({}, {}) per prompt, the prior expects ({}, {})",
                h[1], h[2], cfg.num_embeddings, cfg.embedding_dim
            )));
        }
        Ok(())
    }

    /// `b` rows: itself when it has `b` rows, its single row repeated when it has one (the
    /// empty prompt is encoded once), an error otherwise.
    pub fn expand_to(&self, b: i64) -> Result<Self> {
        match self.batch() {
            n if n == b => Ok(self.clone()),
            1 => Ok(Self {
                text_embeds: self.text_embeds.f_expand([b, -1], false)?,
                hidden_states: self.hidden_states.f_expand([b, -1, -1], false)?,
                mask: self.mask.f_expand([b, -1], false)?,
            }),
            n => Err(Error::Input(format!(
                "unconditional text has batch {n}; expected 1 or the prompt batch {b}"
            ))),
        }
    }

    /// The batch repeated `n` times, block after block: row `k * B + i` is prompt `i`.
    pub fn repeat(&self, n: i64) -> Result<Self> {
        Ok(Self {
            text_embeds: self.text_embeds.f_repeat([n, 1])?,
            hidden_states: self.hidden_states.f_repeat([n, 1, 1])?,
            mask: self.mask.f_repeat([n, 1])?,
        })
    }

    /// The same conditioning on `device` (a no-op when it is there already).
    pub fn to_device(&self, device: tch::Device) -> Result<Self> {
        Ok(Self {
            text_embeds: self.text_embeds.f_to_device(device)?,
            hidden_states: self.hidden_states.f_to_device(device)?,
            mask: self.mask.f_to_device(device)?,
        })
    }

    /// Rows of `self` followed by rows of `other` (the guidance batch is `[uncond, cond]`).
    pub fn cat(&self, other: &Self) -> Result<Self> {
        Ok(Self {
            text_embeds: Tensor::f_cat(&[&self.text_embeds, &other.text_embeds], 0)?,
            hidden_states: Tensor::f_cat(&[&self.hidden_states, &other.hidden_states], 0)?,
            mask: Tensor::f_cat(&[&self.mask, &other.mask], 0)?,
        })
    }

    /// Row-wise choice: `other`'s row where `take_other` (B,) is true, else `self`'s.
    pub fn where_rows(&self, take_other: &Tensor, other: &Self) -> Result<Self> {
        let sel = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
            let mut shape = vec![-1i64];
            shape.extend(std::iter::repeat_n(1, a.dim() - 1));
            let m = take_other.f_reshape(shape.as_slice())?.f_to_device(a.device())?;
            Ok(b.f_to_device(a.device())?.f_where_self(&m, a)?)
        };
        Ok(Self {
            text_embeds: sel(&self.text_embeds, &other.text_embeds)?,
            hidden_states: sel(&self.hidden_states, &other.hidden_states)?,
            mask: sel(&self.mask, &other.mask)?,
        })
    }
}
