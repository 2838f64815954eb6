//! The two attention layers of the UNets: GLIDE's attention over the image positions with the
//! context tokens' keys/values added in front (decoder), and plain spatial self-attention
//! (the super-res mid block).

use crate::Result;
use crate::layers::{GroupNorm, Linear};
use std::sync::Mutex;
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
    context_kv: Mutex<Option<ContextKv>>,
}

/// The context tokens' keys and values, kept from the last call: a sampling loop passes the same
/// context at every step (classifier-free guidance included), so they are projected once.
#[derive(Debug)]
struct ContextKv {
    /// Identity of the inputs they came from: the context tensor (held, so its memory cannot be
    /// reused by another tensor), its shape, strides and in-place version, and the versions of the
    /// projection weights (a load or an optimizer step changes them).
    context: Tensor,
    key: Vec<i64>,
    k: Tensor,
    v: Tensor,
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
            context_kv: Mutex::new(None),
        }
    }

    fn identity(&self, context: &Tensor) -> Vec<i64> {
        let mut key = context.size();
        key.extend(context.stride());
        key.push(context.internal_version());
        for l in [&self.add_k_proj, &self.add_v_proj] {
            key.push(l.ws.internal_version());
            key.extend(l.bs.as_ref().map(Tensor::internal_version));
        }
        key
    }

    /// `add_k_proj(context)`, `add_v_proj(context)`, reused while the same context comes back.
    /// Only results outside autograd are kept (training needs the graph of each step).
    fn context_kv(&self, context: &Tensor) -> Result<(Tensor, Tensor)> {
        let key = self.identity(context);
        let mut memo = self.context_kv.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = memo.as_ref() {
            let same = m.context.data_ptr() == context.data_ptr()
                && m.context.device() == context.device()
                && m.context.kind() == context.kind()
                && m.key == key;
            if same {
                return Ok((m.k.shallow_clone(), m.v.shallow_clone()));
            }
        }
        let (k, v) = (self.add_k_proj.forward(context)?, self.add_v_proj.forward(context)?);
        *memo = if k.requires_grad() || v.requires_grad() {
            None
        } else {
            let (k, v) = (k.shallow_clone(), v.shallow_clone());
            Some(ContextKv { context: context.shallow_clone(), key, k, v })
        };
        Ok((k, v))
    }

    /// `x` (B, C, H, W); `context` (B, L, context_dim); `bias` an additive mask (B, 1, L) over the
    /// context tokens (0 keep, -10000 drop). Image positions are never masked.
    pub fn forward(&self, x: &Tensor, context: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let h = to_tokens(&self.group_norm.forward(x)?)?;
        let q = self.to_q.forward(&h)?;
        let (ck, cv) = self.context_kv(context)?;
        let k = Tensor::f_cat(&[ck, self.to_k.forward(&h)?], 1)?;
        let v = Tensor::f_cat(&[cv, self.to_v.forward(&h)?], 1)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn layer(vs: &nn::VarStore) -> AddedKvAttention {
        AddedKvAttention::new(vs.root() / "attn", 8, 4, 6, 2, 1e-5)
    }

    #[test]
    fn context_keys_are_reused_only_for_the_same_unchanged_context() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let attn = layer(&vs);
        let x = Tensor::randn([2, 8, 3, 3], (Kind::Float, Device::Cpu));
        let mut ctx = Tensor::randn([2, 5, 6], (Kind::Float, Device::Cpu));
        let fresh = |attn: &AddedKvAttention, ctx: &Tensor| {
            *attn.context_kv.lock().unwrap() = None;
            tch::no_grad(|| attn.forward(&x, ctx, None)).unwrap()
        };
        let first = fresh(&attn, &ctx);
        let again = tch::no_grad(|| attn.forward(&x, &ctx, None)).unwrap();
        assert!(attn.context_kv.lock().unwrap().is_some(), "kept under no_grad");
        assert!(first.equal(&again));
        // An in-place change of the context is seen.
        let _ = tch::no_grad(|| ctx.f_mul_scalar_(2.0)).unwrap();
        let changed = tch::no_grad(|| attn.forward(&x, &ctx, None)).unwrap();
        assert!(changed.equal(&fresh(&attn, &ctx)) && !changed.equal(&first));
        // So is a change of the projection weights (e.g. a checkpoint loaded afterwards).
        let _ = tch::no_grad(|| attn.add_k_proj.ws.shallow_clone().f_add_scalar_(0.5)).unwrap();
        let reloaded = tch::no_grad(|| attn.forward(&x, &ctx, None)).unwrap();
        assert!(reloaded.equal(&fresh(&attn, &ctx)) && !reloaded.equal(&changed));
        // With autograd on, nothing is kept and gradients reach the projections.
        *attn.context_kv.lock().unwrap() = None;
        attn.forward(&x, &ctx, None).unwrap().sum(Kind::Float).backward();
        assert!(attn.context_kv.lock().unwrap().is_none());
        assert!(attn.add_k_proj.ws.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}
