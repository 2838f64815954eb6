//! The down, mid and up blocks of both UNets: `ResnetDownsampleBlock2D` /
//! `SimpleCrossAttnDownBlock2D`, `UNetMidBlock2DSimpleCrossAttn` / `UNetMidBlock2D`,
//! `SimpleCrossAttnUpBlock2D` / `ResnetUpsampleBlock2D`. One down and one up type each, with the
//! attention layers present or not.

use crate::attention::{AddedKvAttention, SelfAttention};
use crate::config::TimeNorm;
use crate::layers::{Conv2d, GroupNorm};
use crate::resnet::{Resample, ResnetBlock2D, ResnetConfig};
use crate::{Error, Result};
use tch::{Tensor, nn};

/// The ResNet settings shared by every block of a UNet.
#[derive(Debug, Clone, Copy)]
pub struct ResnetCommon {
    pub temb_channels: i64,
    pub groups: i64,
    pub eps: f64,
    pub time_norm: TimeNorm,
    pub skip_time_act: bool,
    pub output_scale_factor: f64,
}

impl ResnetCommon {
    fn block(&self, p: nn::Path, cin: i64, cout: i64, resample: Resample) -> ResnetBlock2D {
        ResnetBlock2D::new(
            p,
            ResnetConfig {
                in_channels: cin,
                out_channels: cout,
                temb_channels: self.temb_channels,
                groups: self.groups,
                eps: self.eps,
                time_norm: self.time_norm,
                skip_time_act: self.skip_time_act,
                output_scale_factor: self.output_scale_factor,
                resample,
            },
        )
    }
}

/// Cross-attention settings of a block: channels per head and the context width.
#[derive(Debug, Clone, Copy)]
pub struct CrossAttn {
    pub head_dim: i64,
    pub context_dim: i64,
}

/// The conditioning that the attention layers read: context tokens (B, L, D) and an optional
/// additive mask (B, 1, L).
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub tokens: &'a Tensor,
    pub bias: Option<&'a Tensor>,
}

fn attend(attn: Option<&AddedKvAttention>, x: Tensor, ctx: Option<Context>) -> Result<Tensor> {
    match attn {
        None => Ok(x),
        Some(a) => {
            let ctx = ctx.ok_or_else(|| {
                Error::Input("this UNet has cross-attention: context tokens are required".into())
            })?;
            a.forward(&x, ctx.tokens, ctx.bias)
        }
    }
}

/// `ResnetDownsampleBlock2D` (no `attn`) or `SimpleCrossAttnDownBlock2D`.
#[derive(Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<AddedKvAttention>,
    downsampler: Option<ResnetBlock2D>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: nn::Path,
        cin: i64,
        cout: i64,
        layers: i64,
        add_downsample: bool,
        attn: Option<CrossAttn>,
        common: &ResnetCommon,
    ) -> Self {
        let resnets = (0..layers)
            .map(|i| {
                let c = if i == 0 { cin } else { cout };
                common.block(&p / "resnets" / i, c, cout, Resample::None)
            })
            .collect();
        let attentions = match attn {
            Some(a) => (0..layers)
                .map(|i| {
                    AddedKvAttention::new(
                        &p / "attentions" / i,
                        cout,
                        a.head_dim,
                        a.context_dim,
                        common.groups,
                        common.eps,
                    )
                })
                .collect(),
            None => Vec::new(),
        };
        let downsampler = add_downsample
            .then(|| common.block(&p / "downsamplers" / 0, cout, cout, Resample::Down));
        Self { resnets, attentions, downsampler }
    }

    /// Returns the output and the skip tensors it adds (one per layer, plus the downsampler's).
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: Option<Context>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.shallow_clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, temb)?;
            h = attend(self.attentions.get(i), h, ctx)?;
            skips.push(h.shallow_clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h, temb)?;
            skips.push(h.shallow_clone());
        }
        Ok((h, skips))
    }
}

/// `SimpleCrossAttnUpBlock2D` (with `attn`) or `ResnetUpsampleBlock2D`.
#[derive(Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<AddedKvAttention>,
    upsampler: Option<ResnetBlock2D>,
}

impl UpBlock {
    /// `layers` resnets; resnet `i` takes the previous output (`prev_out` for i = 0, else
    /// `cout`) concatenated with a skip (`skip_last` channels for the last one, else `cout`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: nn::Path,
        prev_out: i64,
        cout: i64,
        skip_last: i64,
        layers: i64,
        add_upsample: bool,
        attn: Option<CrossAttn>,
        common: &ResnetCommon,
    ) -> Self {
        let resnets = (0..layers)
            .map(|i| {
                let skip = if i == layers - 1 { skip_last } else { cout };
                let prev = if i == 0 { prev_out } else { cout };
                common.block(&p / "resnets" / i, prev + skip, cout, Resample::None)
            })
            .collect();
        let attentions = match attn {
            Some(a) => (0..layers)
                .map(|i| {
                    AddedKvAttention::new(
                        &p / "attentions" / i,
                        cout,
                        a.head_dim,
                        a.context_dim,
                        common.groups,
                        common.eps,
                    )
                })
                .collect(),
            None => Vec::new(),
        };
        let upsampler =
            add_upsample.then(|| common.block(&p / "upsamplers" / 0, cout, cout, Resample::Up));
        Self { resnets, attentions, upsampler }
    }

    pub fn num_layers(&self) -> usize {
        self.resnets.len()
    }

    /// Consumes one skip tensor per layer from the end of `skips`.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        ctx: Option<Context>,
    ) -> Result<Tensor> {
        let mut h = x.shallow_clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .ok_or_else(|| Error::Input("UNet skip connections exhausted".into()))?;
            h = resnet.forward(&Tensor::f_cat(&[h, skip], 1)?, temb)?;
            h = attend(self.attentions.get(i), h, ctx)?;
        }
        if let Some(u) = &self.upsampler {
            h = u.forward(&h, temb)?;
        }
        Ok(h)
    }
}

/// `UNetMidBlock2DSimpleCrossAttn` (`resnets.0 -> attentions.0 -> resnets.1`, cross-attention) or
/// `UNetMidBlock2D` (`resnets.0 -> [attentions.0] -> resnets.1`, self-attention or none).
#[derive(Debug)]
pub struct MidBlock {
    resnets: [ResnetBlock2D; 2],
    cross: Option<AddedKvAttention>,
    self_attn: Option<SelfAttention>,
}

/// Which attention the mid block has.
#[derive(Debug, Clone, Copy)]
pub enum MidAttention {
    Cross(CrossAttn),
    /// Self-attention with channels per head, group-norm groups (if any) and output rescale.
    SelfAttn {
        head_dim: i64,
        groups: Option<i64>,
        rescale: f64,
    },
    None,
}

impl MidBlock {
    pub fn new(p: nn::Path, channels: i64, attn: MidAttention, common: &ResnetCommon) -> Self {
        let resnets = [
            common.block(&p / "resnets" / 0, channels, channels, Resample::None),
            common.block(&p / "resnets" / 1, channels, channels, Resample::None),
        ];
        let a = &p / "attentions" / 0;
        let (cross, self_attn) = match attn {
            MidAttention::Cross(c) => (
                Some(AddedKvAttention::new(
                    a,
                    channels,
                    c.head_dim,
                    c.context_dim,
                    common.groups,
                    common.eps,
                )),
                None,
            ),
            MidAttention::SelfAttn { head_dim, groups, rescale } => {
                (None, Some(SelfAttention::new(a, channels, head_dim, groups, common.eps, rescale)))
            }
            MidAttention::None => (None, None),
        };
        Self { resnets, cross, self_attn }
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, ctx: Option<Context>) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, temb)?;
        h = attend(self.cross.as_ref(), h, ctx)?;
        if let Some(a) = &self.self_attn {
            h = a.forward(&h)?;
        }
        self.resnets[1].forward(&h, temb)
    }
}

/// What both UNets share once the time embedding is computed: `conv_in`, the down blocks (their
/// outputs kept as skips), the mid block, the up blocks (consuming the skips), then
/// `conv_norm_out -> SiLU -> conv_out`. Tensor names sit at the UNet's root.
#[derive(Debug)]
pub struct UNetTrunk {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: Option<MidBlock>,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl UNetTrunk {
    /// `sample` (B, C, H, W), `temb` (B, time_embed_dim), `ctx` the cross-attention context.
    /// Runs channels-last inside when the kernels are (`Loaded::to_channels_last`); the result
    /// is contiguous either way.
    pub fn forward(&self, sample: &Tensor, temb: &Tensor, ctx: Option<Context>) -> Result<Tensor> {
        let cl = unclip_core::nn::is_channels_last(&self.conv_in.ws);
        let sample =
            if cl { unclip_core::nn::channels_last(sample)? } else { sample.shallow_clone() };
        let mut h = self.conv_in.forward(&sample)?;
        let mut skips = vec![h.shallow_clone()];
        for block in &self.down_blocks {
            let (out, s) = block.forward(&h, temb, ctx)?;
            h = out;
            skips.extend(s);
        }
        if let Some(mid) = &self.mid_block {
            h = mid.forward(&h, temb, ctx)?;
        }
        for block in &self.up_blocks {
            h = block.forward(&h, &mut skips, temb, ctx)?;
        }
        let h = unclip_core::nn::silu_(self.conv_norm_out.forward(&h)?)?;
        let out = self.conv_out.forward(&h)?;
        if cl { Ok(out.f_contiguous()?) } else { Ok(out) }
    }
}
