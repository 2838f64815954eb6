//! The basic layers, with fallible forwards: tch's `Module::forward` panics on a libtorch error,
//! these return it as an [`Error::Torch`](crate::Error) instead. Parameters are created by tch's
//! builders (same names, same initialization), only the forward differs.

use crate::Result;
use tch::{Tensor, nn};

/// `nn.Linear`: `weight` [out, in], `bias` [out].
#[derive(Debug)]
pub struct Linear {
    pub ws: Tensor,
    pub bs: Option<Tensor>,
}

impl Linear {
    pub fn new(p: nn::Path, c_in: i64, c_out: i64) -> Self {
        let l = unclip_core::nn::linear(p, c_in, c_out, Default::default());
        Self { ws: l.ws, bs: l.bs }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_linear(&self.ws, self.bs.as_ref())?)
    }
}

/// `nn.Conv2d` with stride 1 and "same" padding (all the UNets need).
#[derive(Debug)]
pub struct Conv2d {
    pub ws: Tensor,
    pub bs: Option<Tensor>,
    padding: i64,
}

impl Conv2d {
    pub fn new(p: nn::Path, c_in: i64, c_out: i64, kernel: i64) -> Self {
        let padding = (kernel - 1) / 2;
        let c = unclip_core::nn::conv2d(
            p,
            c_in,
            c_out,
            kernel,
            nn::ConvConfig { padding, ..Default::default() },
        );
        Self { ws: c.ws, bs: c.bs, padding }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.padding;
        Ok(x.f_conv2d(&self.ws, self.bs.as_ref(), [1, 1], [p, p], [1, 1], 1)?)
    }
}

/// `nn.GroupNorm` with affine parameters.
#[derive(Debug)]
pub struct GroupNorm {
    ws: Option<Tensor>,
    bs: Option<Tensor>,
    groups: i64,
    eps: f64,
}

impl GroupNorm {
    pub fn new(p: nn::Path, groups: i64, channels: i64, eps: f64) -> Self {
        let g = unclip_core::nn::group_norm(
            p,
            groups,
            channels,
            nn::GroupNormConfig { eps, ..Default::default() },
        );
        Self { ws: g.ws, bs: g.bs, groups, eps }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_group_norm(self.groups, self.ws.as_ref(), self.bs.as_ref(), self.eps, true)?)
    }

    /// `forward(x) * (1 + scale) + shift`, `scale` and `shift` (B, C, 1, 1) (the resnets'
    /// "scale_shift" time conditioning). Without autograd both affine steps fold into one
    /// `addcmul`: `norm(x) * (w (1 + scale)) + (b (1 + scale) + shift)`; with it, the plain
    /// form, so training runs the same ops as before the folding.
    pub fn forward_scale_shift(
        &self,
        x: &Tensor,
        scale: &Tensor,
        shift: &Tensor,
    ) -> Result<Tensor> {
        let s1 = scale.f_add_scalar(1.0)?;
        if x.requires_grad() || s1.requires_grad() || shift.requires_grad() {
            return Ok(self.forward(x)?.f_mul(&s1)?.f_add(shift)?);
        }
        let n = x.f_group_norm(self.groups, None::<&Tensor>, None::<&Tensor>, self.eps, true)?;
        let c = x.size()[1];
        let gain = match &self.ws {
            Some(w) => w.f_view([1, c, 1, 1])?.f_mul(&s1)?,
            None => s1.shallow_clone(),
        };
        let bias = match &self.bs {
            Some(b) => b.f_view([1, c, 1, 1])?.f_mul(&s1)?.f_add(shift)?,
            None => shift.shallow_clone(),
        };
        Ok(bias.f_addcmul(&n, &gain)?)
    }
}

/// `nn.LayerNorm` over the last dimension.
#[derive(Debug)]
pub struct LayerNorm {
    ws: Option<Tensor>,
    bs: Option<Tensor>,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    pub fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        let l =
            unclip_core::nn::layer_norm(p, dim, nn::LayerNormConfig { eps, ..Default::default() });
        Self { ws: l.ws, bs: l.bs, dim, eps }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_layer_norm([self.dim], self.ws.as_ref(), self.bs.as_ref(), self.eps, true)?)
    }
}
