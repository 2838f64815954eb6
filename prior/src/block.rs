//! The prior's transformer block: diffusers' `BasicTransformerBlock` as the prior configures it
//! (self-attention only, biased projections, GELU feed-forward, pre-LayerNorm).

use crate::Result;
use tch::{Tensor, nn, nn::Module};
use unclip_core::nn::multi_head_attention;

/// Self-attention with biased q/k/v/out projections (`attn1.{to_q,to_k,to_v,to_out.0}`).
#[derive(Debug)]
pub struct SelfAttention {
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
    heads: i64,
}

impl SelfAttention {
    pub fn new(p: nn::Path, dim: i64, heads: i64) -> Self {
        let c = Default::default();
        Self {
            to_q: unclip_core::nn::linear(&p / "to_q", dim, dim, c),
            to_k: unclip_core::nn::linear(&p / "to_k", dim, dim, c),
            to_v: unclip_core::nn::linear(&p / "to_v", dim, dim, c),
            to_out: unclip_core::nn::linear(&p / "to_out" / "0", dim, dim, c),
            heads,
        }
    }

    /// `x` (B, L, D); `mask` additive, broadcastable to (B, heads, L, L).
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (q, k, v) = (self.to_q.forward(x), self.to_k.forward(x), self.to_v.forward(x));
        let out = multi_head_attention(&q, &k, &v, self.heads, mask)?;
        Ok(self.to_out.forward(&out))
    }
}

/// `ff.net.0.proj` (D -> 4D) -> exact GELU -> `ff.net.2` (4D -> D).
#[derive(Debug)]
pub struct FeedForward {
    proj: nn::Linear,
    out: nn::Linear,
}

impl FeedForward {
    pub fn new(p: nn::Path, dim: i64) -> Self {
        let net = &p / "net";
        Self {
            proj: unclip_core::nn::linear(&net / "0" / "proj", dim, 4 * dim, Default::default()),
            out: unclip_core::nn::linear(&net / "2", 4 * dim, dim, Default::default()),
        }
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.out.forward(&self.proj.forward(x).gelu("none"))
    }
}

/// `x += attn1(norm1 x); x += ff(norm3 x)`. There is no `norm2`: the prior has no cross-attention.
#[derive(Debug)]
pub struct TransformerBlock {
    norm1: nn::LayerNorm,
    attn1: SelfAttention,
    norm3: nn::LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    pub fn new(p: nn::Path, dim: i64, heads: i64) -> Self {
        let ln = nn::LayerNormConfig { eps: 1e-5, ..Default::default() };
        Self {
            norm1: unclip_core::nn::layer_norm(&p / "norm1", dim, ln),
            attn1: SelfAttention::new(&p / "attn1", dim, heads),
            norm3: unclip_core::nn::layer_norm(&p / "norm3", dim, ln),
            ff: FeedForward::new(&p / "ff", dim),
        }
    }

    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let x = x + self.attn1.forward(&self.norm1.forward(x), mask)?;
        Ok(&x + self.ff.forward(&self.norm3.forward(&x)))
    }
}
