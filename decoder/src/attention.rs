//! The two attention layers of the UNets: GLIDE's attention over the image positions with the
//! context tokens' keys/values added in front (decoder), and plain spatial self-attention
//! (the super-res mid block).

use crate::Result;
use crate::layers::{GroupNorm, Linear};
use tch::{Kind, Tensor, nn};
use unclip_core::nn::multi_head_attention;

/// (B, C, H, W) -> (B, HW, C).
fn to_tokens(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.size4()?;
    Ok(x.f_reshape([b, c, h * w])?.f_transpose(1, 2)?)
}

/// (B, HW, C) -> (B, C, H, W) with the shape of `like`.
fn from_tokens(x: &Tensor, like: &Tensor) -> Result<Tensor> {
    Ok(x.f_transpose(1, 2)?.f_reshape(like.size())?)
}

/// diffusers' `Attention` with `added_kv_proj_dim` run by `AttnAddedKVProcessor`: queries from the
/// group-normalized image, keys/values = [context tokens (`add_k_proj`/`add_v_proj`), image
/// positions (`to_k`/`to_v`)], output projected and added to the input.
#[derive(Debug)]
pub struct AddedKvAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    add_k_proj: Linear,
    add_v_proj: Linear,
    to_out: Linear,
    heads: i64,
}

impl AddedKvAttention {
    /// `channels` must be a multiple of `head_dim` (checked by the config).
    pub fn new(
        p: nn::Path,
        channels: i64,
        head_dim: i64,
        context_dim: i64,
        groups: i64,
        eps: f64,
    ) -> Self {
        Self {
            group_norm: GroupNorm::new(&p / "group_norm", groups, channels, eps),
            to_q: Linear::new(&p / "to_q", channels, channels),
            to_k: Linear::new(&p / "to_k", channels, channels),
            to_v: Linear::new(&p / "to_v", channels, channels),
            add_k_proj: Linear::new(&p / "add_k_proj", context_dim, channels),
            add_v_proj: Linear::new(&p / "add_v_proj", context_dim, channels),
            to_out: Linear::new(&p / "to_out" / 0, channels, channels),
            heads: channels / head_dim,
        }
    }

    /// `x` (B, C, H, W); `context` (B, L, context_dim); `bias` an additive mask (B, 1, L) over the
    /// context tokens (0 keep, -10000 drop). Image positions are never masked.
    pub fn forward(&self, x: &Tensor, context: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let h = to_tokens(&self.group_norm.forward(x)?)?;
        let q = self.to_q.forward(&h)?;
        let k = Tensor::f_cat(&[self.add_k_proj.forward(context)?, self.to_k.forward(&h)?], 1)?;
        let v = Tensor::f_cat(&[self.add_v_proj.forward(context)?, self.to_v.forward(&h)?], 1)?;
        let mask = match bias {
            Some(b) => {
                let hw = h.size()[1];
                Some(b.f_constant_pad_nd([0, hw])?.f_unsqueeze(1)?)
            }
            None => None,
        };
        let out = multi_head_attention(&q, &k, &v, self.heads, mask.as_ref())?;
        let out = self.to_out.forward(&out)?;
        Ok(from_tokens(&out, x)?.f_add(x)?)
    }
}

/// diffusers' `Attention` as `UNetMidBlock2D` builds it: self-attention over the image positions,
/// optional group norm, residual, divided by `rescale`.
#[derive(Debug)]
pub struct SelfAttention {
    group_norm: Option<GroupNorm>,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: i64,
    rescale: f64,
}

impl SelfAttention {
    pub fn new(
        p: nn::Path,
        channels: i64,
        head_dim: i64,
        groups: Option<i64>,
        eps: f64,
        rescale: f64,
    ) -> Self {
        Self {
            group_norm: groups.map(|g| GroupNorm::new(&p / "group_norm", g, channels, eps)),
            to_q: Linear::new(&p / "to_q", channels, channels),
            to_k: Linear::new(&p / "to_k", channels, channels),
            to_v: Linear::new(&p / "to_v", channels, channels),
            to_out: Linear::new(&p / "to_out" / 0, channels, channels),
            heads: channels / head_dim,
            rescale,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = match &self.group_norm {
            Some(g) => g.forward(x)?,
            None => x.shallow_clone(),
        };
        let h = to_tokens(&h)?;
        let (q, k, v) = (self.to_q.forward(&h)?, self.to_k.forward(&h)?, self.to_v.forward(&h)?);
        let out = self.to_out.forward(&multi_head_attention(&q, &k, &v, self.heads, None)?)?;
        let out = from_tokens(&out, x)?.f_add(x)?;
        if self.rescale == 1.0 { Ok(out) } else { Ok(out.f_div_scalar(self.rescale)?) }
    }
}

/// The additive bias of a keep-mask: `(1 - mask) * -10000`, shape (B, 1, L), in `kind`.
pub fn mask_to_bias(mask: &Tensor, kind: Kind) -> Result<Tensor> {
    Ok(mask.f_to_kind(kind)?.f_neg()?.f_add_scalar(1.0)?.f_mul_scalar(-10000.0)?.f_unsqueeze(1)?)
}
